//! The demo's and the benchmark's pictures, as SVG files (`plotters`, SVG backend only:
//! the text is left to whatever displays the file, so no font is needed here).
//!
//! Two kinds: replies per 10 ms per generation across upgrades, with vertical lines
//! where the upgrade was requested, where it flipped and where the old generation was
//! gone; and the selector's cost per datagram as horizontal bars next to the floor.

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::loadgen::{TIMELINE_BUCKET, Timeline};

const FONT: &str = "sans-serif";

/// One colour per generation, in turn (generation `g` gets `PALETTE[g % len]`).
const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(23, 190, 207),
];

/// What a vertical line marks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MarkKind {
    /// `supervisor upgrade` was started.
    Request,
    /// The new generation receives every new datagram from here on.
    Flip,
    /// The old generation drained, exited and its sockets closed.
    Gone,
}

impl MarkKind {
    fn color(self) -> RGBColor {
        match self {
            MarkKind::Request => RGBColor(150, 150, 150),
            MarkKind::Flip => RGBColor(214, 39, 40),
            MarkKind::Gone => RGBColor(20, 20, 20),
        }
    }

    fn legend(self) -> &'static str {
        match self {
            MarkKind::Request => "upgrade requested",
            MarkKind::Flip => "flip: new generation receives",
            MarkKind::Gone => "old generation gone",
        }
    }
}

/// A vertical line at `secs` from the start of sending.
#[derive(Clone, Copy, Debug)]
pub struct Mark {
    pub secs: f64,
    pub kind: MarkKind,
}

/// Where the pictures go by default: `target/<kind>/` of the build this binary belongs
/// to (the binary is `target/<profile>/<name>`), else `./<kind>`.
pub fn default_dir(kind: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join(kind)))
        .unwrap_or_else(|| PathBuf::from(kind))
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Replies per 10 ms per generation over time, with the marks as vertical lines.
/// Trailing empty buckets (the wait for stragglers) are left out. With `zoom`
/// (seconds, from..to) a second panel below shows that window alone.
pub fn replies_over_time(
    path: &Path,
    title: &str,
    timeline: &Timeline,
    marks: &[Mark],
    zoom: Option<(f64, f64)>,
) -> Result<(), String> {
    let bucket = TIMELINE_BUCKET.as_secs_f64();
    let used = (0..timeline.len())
        .rev()
        .find(|&i| timeline.per_generation.values().any(|v| v[i] > 0))
        .map_or(0, |i| i + 1);
    if used == 0 {
        return Err("no replies to draw".into());
    }
    let x_end = (used as f64 * bucket).max(marks.iter().map(|m| m.secs).fold(0.0, f64::max));

    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let height = if zoom.is_some() { 760 } else { 420 };
    let root = SVGBackend::new(path, (960, height)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    match zoom {
        None => panel(&root, title, timeline, marks, (0.0, x_end))?,
        Some((from, to)) => {
            let (top, bottom) = root.split_vertically(380);
            panel(&top, title, timeline, marks, (0.0, x_end))?;
            panel(
                &bottom,
                &format!("the same, {:.2} s to {:.2} s", from.max(0.0), to.min(x_end)),
                timeline,
                marks,
                (from.max(0.0), to.min(x_end)),
            )?;
        }
    }
    root.present().map_err(err)?;
    Ok(())
}

/// One chart of [`replies_over_time`] over `x` (seconds).
fn panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    title: &str,
    timeline: &Timeline,
    marks: &[Mark],
    x: (f64, f64),
) -> Result<(), String> {
    let bucket = TIMELINE_BUCKET.as_secs_f64();
    let (from, to) = (x.0, x.1.max(x.0 + bucket));
    let first = (from / bucket).floor() as usize;
    let last = ((to / bucket).ceil() as usize + 1).min(timeline.len());
    let y_max = timeline
        .per_generation
        .values()
        .flat_map(|v| v[first.min(last)..last].iter())
        .copied()
        .max()
        .unwrap_or(1)
        .max(1) as f64
        // Room above the highest point for the legend.
        * 1.6;
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 17))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(from..to, 0f64..y_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the client started sending")
        .y_desc("replies per 10 ms")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .light_line_style(WHITE)
        .draw()
        .map_err(err)?;

    for (g, counts) in &timeline.per_generation {
        let color = PALETTE[*g as usize % PALETTE.len()];
        // A generation's line runs from the bucket before its first reply to the one
        // after its last (not along zero all the time before it started or after it
        // was gone), each bucket's count at its middle.
        let (Some(born), Some(died)) = (
            counts.iter().position(|&n| n > 0),
            counts.iter().rposition(|&n| n > 0),
        ) else {
            continue;
        };
        let (lo, hi) = (first.max(born.saturating_sub(1)), last.min(died + 2));
        if lo >= hi {
            continue;
        }
        let points = counts[lo..hi]
            .iter()
            .enumerate()
            .map(|(i, &n)| ((lo + i) as f64 * bucket + bucket / 2.0, n as f64))
            .filter(|&(t, _)| t >= from && t <= to);
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(err)?
            .label(format!("generation {g}"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }

    for kind in [MarkKind::Request, MarkKind::Flip, MarkKind::Gone] {
        let lines: Vec<_> = marks
            .iter()
            .filter(|m| m.kind == kind && m.secs >= from && m.secs <= to)
            .map(|m| {
                PathElement::new(
                    vec![(m.secs, 0.0), (m.secs, y_max)],
                    kind.color().stroke_width(1),
                )
            })
            .collect();
        if lines.is_empty() {
            continue;
        }
        let color = kind.color();
        chart
            .draw_series(lines)
            .map_err(err)?
            .label(kind.legend())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(1))
            });
    }

    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(180, 180, 180))
        .label_font((FONT, 13))
        .draw()
        .map_err(err)?;
    Ok(())
}

/// One bar of the selector-cost picture.
#[derive(Clone, Debug)]
pub struct CostBar {
    pub label: String,
    pub ns: f64,
    /// The empty program every `SK_REUSEPORT` program pays for (drawn grey, and as a
    /// thin line across the other bars).
    pub floor: bool,
}

/// Nanoseconds per datagram as horizontal bars, top to bottom in the given order.
pub fn selector_cost(path: &Path, title: &str, bars: &[CostBar]) -> Result<(), String> {
    if bars.is_empty() {
        return Err("no cost measured".into());
    }
    let max = bars.iter().map(|b| b.ns).fold(0.0, f64::max).max(1.0);
    // Room right of the longest bar for its label.
    let x_end = max * 1.7;
    let floor = bars.iter().find(|b| b.floor).map(|b| b.ns);
    let n = bars.len();

    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let height = 90 + 34 * n as u32;
    let root = SVGBackend::new(path, (860, height)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(10)
        .build_cartesian_2d(0f64..x_end, -0.6f64..(n as f64 - 0.4))
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .x_desc("ns per datagram (kernel BPF statistics: run_time_ns / run_cnt)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .light_line_style(WHITE)
        .draw()
        .map_err(err)?;

    // Top to bottom: row 0 at the top.
    let y = |i: usize| (n - 1 - i) as f64;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            let color = if b.floor {
                RGBColor(170, 170, 170)
            } else {
                PALETTE[0]
            };
            Rectangle::new([(0.0, y(i) - 0.32), (b.ns, y(i) + 0.32)], color.filled())
        }))
        .map_err(err)?;
    let style = TextStyle::from((FONT, 13).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            let above = match floor {
                Some(f) if !b.floor => format!(" ({:+.1} above the floor)", b.ns - f),
                _ => String::new(),
            };
            Text::new(
                format!("{}: {:.1} ns{above}", b.label, b.ns),
                (b.ns + max * 0.02, y(i)),
                style.clone(),
            )
        }))
        .map_err(err)?;
    if let Some(f) = floor {
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(f, -0.6), (f, n as f64 - 0.4)],
                RGBColor(90, 90, 90).stroke_width(1),
            )))
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}
