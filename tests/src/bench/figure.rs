//! One figure of the benchmark as its module hands it to `src/bin/bench.rs`: a title,
//! text around the tables, and the raw figures as JSON.
use serde_json::Value;

use super::table::Table;

#[derive(Debug, Default)]
pub struct Figure {
    pub title: String,
    pub intro: Vec<String>,
    pub tables: Vec<Table>,
    pub notes: Vec<String>,
    pub json: Value,
}

/// Runs one measurement, reporting progress on stderr; a panic (a supervisor that
/// would not start, say) becomes `Err` with its first line, so the figure still shows
/// the other rows.
pub fn measure<T>(label: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    eprint!("bench: {label} ... ");
    let t = std::time::Instant::now();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        let text = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into());
        text.lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(200)
            .collect::<String>()
    });
    match &r {
        Ok(_) => eprintln!("{:.1} s", t.elapsed().as_secs_f64()),
        Err(e) => eprintln!("FAILED: {e}"),
    }
    r
}
