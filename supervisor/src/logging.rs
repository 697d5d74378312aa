//! Where the daemon's log lines go, and in which shape.
//!
//! - **journal**: started by systemd with stderr connected to the journal (the
//!   `JOURNAL_STREAM` variable names stderr's `device:inode`, sd_journal_print(3)
//!   and systemd.exec(5)), events go straight to journald through
//!   `tracing-journald`, with structured fields (`PRIORITY`, `SUPERVISOR_GENERATION`,
//!   `SUPERVISOR_WORKER_PID`, ...) that `journalctl -o json` shows and
//!   `journalctl SUPERVISOR_GENERATION=3` filters on. The device:inode match, not the
//!   mere presence of the variable, decides: a child of a systemd service that
//!   redirected stderr (or a shell started from one) inherits the variable but its
//!   stderr is not the journal. If the journal socket cannot be opened, the lines
//!   go to stderr (which is the journal) with sd-daemon(3) `<N>` priority
//!   prefixes, so journald still records their priority.
//! - **text** (otherwise): one human line per event on stderr.
//! - **json** (`SUPERVISOR_LOG_FORMAT=json`): one JSON object per line on stderr,
//!   `timestamp`, `level`, `message` and the event's fields at the top level, for
//!   log shippers.
//!
//! `SUPERVISOR_LOG_FORMAT` (`text`, `json`, `journal`) overrides the detection;
//! `SUPERVISOR_LOG` is the level filter. Chosen at start-up, as the simplest thing
//! that is robust: no runtime switching, no second sink.
use std::fmt;

use tracing::{Event, Subscriber};
use tracing_subscriber::{
    EnvFilter,
    fmt::{FmtContext, FormatEvent, FormatFields, format},
    layer::SubscriberExt,
    registry::LookupSpan,
    util::SubscriberInitExt,
};

pub const FORMAT_ENV: &str = "SUPERVISOR_LOG_FORMAT";
const FILTER_ENV: &str = "SUPERVISOR_LOG";

/// Fields that only repeat what the message says: left out of text lines (JSON and
/// the journal keep them, as fields to filter on).
const IN_MESSAGE: &[&str] = &["generation", "worker", "worker_pid"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
    Journal,
}

/// `JOURNAL_STREAM`'s value: `<device>:<inode>`, both decimal.
fn parse_journal_stream(value: &str) -> Option<(u64, u64)> {
    let (dev, ino) = value.trim().split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

/// The format from `SUPERVISOR_LOG_FORMAT` (if set) or from whether stderr
/// (`stderr_id`: its device and inode) is the stream `JOURNAL_STREAM` names.
fn choose(
    requested: Option<&str>,
    journal_stream: Option<&str>,
    stderr_id: Option<(u64, u64)>,
) -> Result<Format, String> {
    match requested.map(str::trim) {
        None | Some("") | Some("auto") => {}
        Some("text") => return Ok(Format::Text),
        Some("json") => return Ok(Format::Json),
        Some("journal") => return Ok(Format::Journal),
        Some(other) => {
            return Err(format!(
                "{FORMAT_ENV}={other:?}: unknown log format (text, json, journal or auto)"
            ));
        }
    }
    let on_journal = journal_stream
        .and_then(parse_journal_stream)
        .is_some_and(|named| Some(named) == stderr_id);
    Ok(if on_journal {
        Format::Journal
    } else {
        Format::Text
    })
}

/// stderr's device and inode, as `JOURNAL_STREAM` spells them.
fn stderr_id() -> Option<(u64, u64)> {
    use std::os::{fd::AsFd, unix::fs::MetadataExt};
    let fd = std::io::stderr().as_fd().try_clone_to_owned().ok()?;
    let meta = std::fs::File::from(fd).metadata().ok()?;
    Some((meta.dev(), meta.ino()))
}

/// Sets the global subscriber; `Err` is a bad `SUPERVISOR_LOG_FORMAT`.
pub fn init() -> Result<(), String> {
    let chosen = choose(
        std::env::var(FORMAT_ENV).ok().as_deref(),
        std::env::var("JOURNAL_STREAM").ok().as_deref(),
        stderr_id(),
    )?;
    let filter = || EnvFilter::try_from_env(FILTER_ENV).unwrap_or_else(|_| EnvFilter::new("info"));
    let text_fields = format::debug_fn(|w, field, value| match field.name() {
        // The message comes first in every event (tracing's macros put it there).
        "message" => write!(w, "{value:?}"),
        name if IN_MESSAGE.contains(&name) => Ok(()),
        name => write!(w, " {name}={value:?}"),
    });
    match chosen {
        Format::Json => tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_writer(std::io::stderr)
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_target(false)
            .init(),
        Format::Journal => match tracing_journald::layer() {
            Ok(layer) => tracing_subscriber::registry()
                .with(filter())
                .with(
                    layer
                        .with_syslog_identifier("supervisor".into())
                        .with_field_prefix(Some("SUPERVISOR".into()))
                        // The crate maps INFO to notice (5) and DEBUG to info (6);
                        // syslog's meaning, as the `<N>` fallback below and
                        // `journalctl -p` expect: INFO is info (6), DEBUG debug (7).
                        .with_priority_mappings(tracing_journald::PriorityMappings {
                            info: tracing_journald::Priority::Informational,
                            debug: tracing_journald::Priority::Debug,
                            ..tracing_journald::PriorityMappings::new()
                        }),
                )
                .init(),
            // stderr is the journal: priorities as sd-daemon(3) prefixes, no time
            // (journald stamps each line).
            Err(_) => tracing_subscriber::fmt()
                .with_env_filter(filter())
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .fmt_fields(text_fields)
                .event_format(Prefixed(
                    format::Format::default().without_time().with_target(false),
                ))
                .init(),
        },
        Format::Text => tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_writer(std::io::stderr)
            .with_target(false)
            .fmt_fields(text_fields)
            .init(),
    }
    Ok(())
}

/// sd-daemon(3): `<3>` (SD_ERR) to `<7>` (SD_DEBUG) before each line.
fn priority_prefix(level: &tracing::Level) -> &'static str {
    match *level {
        tracing::Level::ERROR => "<3>",
        tracing::Level::WARN => "<4>",
        tracing::Level::INFO => "<6>",
        _ => "<7>",
    }
}

struct Prefixed<F>(F);

impl<S, N, F> FormatEvent<S, N> for Prefixed<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: format::Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        writer.write_str(priority_prefix(event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_is_device_colon_inode() {
        assert_eq!(parse_journal_stream("8:12345"), Some((8, 12345)));
        assert_eq!(parse_journal_stream("8:12345\n"), Some((8, 12345)));
        assert_eq!(parse_journal_stream("8"), None);
        assert_eq!(parse_journal_stream("8:x"), None);
        assert_eq!(parse_journal_stream(":1"), None);
        assert_eq!(parse_journal_stream(""), None);
    }

    #[test]
    fn the_journal_only_when_stderr_is_the_named_stream() {
        let stderr = Some((8, 12345));
        assert_eq!(choose(None, Some("8:12345"), stderr), Ok(Format::Journal));
        // Inherited by a process whose stderr goes elsewhere.
        assert_eq!(
            choose(None, Some("8:12345"), Some((8, 999))),
            Ok(Format::Text)
        );
        assert_eq!(choose(None, Some("garbage"), stderr), Ok(Format::Text));
        assert_eq!(choose(None, None, stderr), Ok(Format::Text));
        assert_eq!(choose(None, Some("8:12345"), None), Ok(Format::Text));
        assert_eq!(
            choose(Some("auto"), Some("8:12345"), stderr),
            Ok(Format::Journal)
        );
    }

    #[test]
    fn the_format_variable_overrides_detection() {
        let stderr = Some((8, 12345));
        assert_eq!(
            choose(Some("json"), Some("8:12345"), stderr),
            Ok(Format::Json)
        );
        assert_eq!(
            choose(Some("text"), Some("8:12345"), stderr),
            Ok(Format::Text)
        );
        assert_eq!(choose(Some("journal"), None, None), Ok(Format::Journal));
        let err = choose(Some("xml"), None, None).unwrap_err();
        assert!(err.contains(FORMAT_ENV) && err.contains("xml"), "{err}");
    }

    #[test]
    fn priorities_are_sd_daemon_prefixes() {
        assert_eq!(priority_prefix(&tracing::Level::ERROR), "<3>");
        assert_eq!(priority_prefix(&tracing::Level::WARN), "<4>");
        assert_eq!(priority_prefix(&tracing::Level::INFO), "<6>");
        assert_eq!(priority_prefix(&tracing::Level::DEBUG), "<7>");
    }
}
