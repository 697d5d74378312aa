//! The phase lines `supervisor upgrade` prints, e.g. `[   0.202s] generation 2: flipped,
//! now serving`: the time is counted by the daemon from when it received the request.

use std::time::Duration;

/// One phase line.
#[derive(Clone, Debug, PartialEq)]
pub struct Phase {
    pub at: Duration,
    pub text: String,
}

/// Parses one line; `None` for anything that is not a phase line (e.g. the final
/// `upgrade succeeded: ...`).
pub fn parse_line(line: &str) -> Option<Phase> {
    let rest = line.trim_start().strip_prefix('[')?;
    let (time, text) = rest.split_once("s]")?;
    let secs: f64 = time.trim().parse().ok()?;
    if !secs.is_finite() || secs < 0.0 {
        return None;
    }
    Some(Phase {
        at: Duration::from_secs_f64(secs),
        text: text.trim().to_string(),
    })
}

/// All phase lines of an upgrade's output.
pub fn parse(output: &str) -> Vec<Phase> {
    output.lines().filter_map(parse_line).collect()
}

/// The two moments of an upgrade a user cares about, from its phase lines.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct UpgradeTiming {
    /// Request to "flipped": when new datagrams started to go to the new generation.
    pub flip: Option<Duration>,
    /// Request to "drained and removed": when the old generation was gone.
    pub gone: Option<Duration>,
}

pub fn timing(phases: &[Phase]) -> UpgradeTiming {
    let find = |needle: &str| {
        phases
            .iter()
            .find(|p| p.text.contains(needle))
            .map(|p| p.at)
    };
    UpgradeTiming {
        flip: find("flipped"),
        gone: find("drained and removed"),
    }
}

/// The flip latency the daemon appends to its "flipped" line: `(... 0.123 ms after
/// the last READY=1)`.
pub fn after_ready(text: &str) -> Option<Duration> {
    let end = text.find(" ms after the last READY=1")?;
    let start = text[..end].rfind('(')? + 1;
    let ms: f64 = text[start..end].trim().parse().ok()?;
    (ms.is_finite() && ms >= 0.0).then(|| Duration::from_secs_f64(ms / 1e3))
}

/// Median and maximum; `None` for no values.
pub fn median_max(values: &[Duration]) -> Option<(Duration, Duration)> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort();
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2
    };
    Some((median, v[n - 1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_cli_format() {
        let out = "[   0.000s] generation 2: building\n\
                   [   0.041s] generation 2: worker 0 spawned, pid 7\n\
                   [   0.202s] generation 2: flipped, now serving\n\
                   [  12.480s] generation 1: drained and removed\n\
                   upgrade succeeded: generation 2 serves\n";
        let p = parse(out);
        assert_eq!(p.len(), 4);
        assert_eq!(p[1].text, "generation 2: worker 0 spawned, pid 7");
        let t = timing(&p);
        assert_eq!(t.flip, Some(Duration::from_millis(202)));
        assert_eq!(t.gone, Some(Duration::from_millis(12_480)));
        assert_eq!(parse_line("upgrade succeeded: x"), None);
        assert_eq!(timing(&[]), UpgradeTiming::default());
    }

    #[test]
    fn flip_latency_from_the_flipped_line() {
        let us = Duration::from_micros;
        assert_eq!(
            after_ready("generation 2: flipped, now serving (0.041 ms after the last READY=1)"),
            Some(us(41))
        );
        assert_eq!(after_ready("generation 2: flipped, now serving"), None);
    }

    #[test]
    fn median_and_max() {
        let ms = Duration::from_millis;
        assert_eq!(median_max(&[]), None);
        assert_eq!(median_max(&[ms(3), ms(1), ms(2)]), Some((ms(2), ms(3))));
        assert_eq!(
            median_max(&[ms(4), ms(1), ms(2), ms(3)]),
            Some((ms(2) + ms(1) / 2, ms(4)))
        );
    }
}
