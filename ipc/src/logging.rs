//! Logging on `tracing`, in the line format of spec common-http §8:
//! `<S>TIMESTAMP [LVL] - MESSAGE` (DEBUG/TRACE add `[TARGET] `), to stderr. `<S>` is the syslog
//! severity, which journald (JOURNAL_STREAM) reads as the level. Filter from `AZIOT_LOG`
//! (`info`, `debug`, `info,aziot_keyd=trace`, ...), default `info`.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

/// Installs the global subscriber with the filter from `AZIOT_LOG`. Safe to call more than
/// once (later calls do nothing).
pub fn init() {
    init_with(&std::env::var("AZIOT_LOG").unwrap_or_default());
}

/// Installs the global subscriber with the given filter directives (a worker gets its
/// broker's `AZIOT_LOG` through the hand-off, not the environment).
pub fn init_with(directives: &str) {
    let filter = parse_filter(directives);
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .event_format(AziotFormat);
    let _ = tracing_subscriber::registry().with(layer).with(filter).try_init();
}

fn parse_filter(directives: &str) -> Targets {
    let directives = directives.trim();
    let default = Targets::new().with_default(Level::INFO);
    if directives.is_empty() {
        return default;
    }
    match directives.parse::<Targets>() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("<4>{} [WARN] - invalid AZIOT_LOG {directives:?} ({e}); using \"info\"", timestamp_now());
            default
        }
    }
}

struct AziotFormat;

impl<S, N> FormatEvent<S, N> for AziotFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let meta = event.metadata();
        let (severity, label) = match *meta.level() {
            Level::ERROR => (3, "ERR!"),
            Level::WARN => (4, "WARN"),
            Level::INFO => (6, "INFO"),
            Level::DEBUG => (7, "DBUG"),
            Level::TRACE => (7, "TRCE"),
        };
        write!(writer, "<{severity}>{} [{label}] - ", timestamp_now())?;
        if *meta.level() >= Level::DEBUG {
            write!(writer, "[{}] ", meta.target())?;
        }
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// RFC 3339 UTC with whole seconds, e.g. `2023-01-31T05:03:18Z`.
pub fn timestamp_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format_timestamp(secs)
}

fn format_timestamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, (rem % 3600) / 60, rem % 60)
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(format_timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_timestamp(1_675_141_398), "2023-01-31T05:03:18Z");
        assert_eq!(format_timestamp(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn filters() {
        let t = parse_filter("info,aziot_keyd=trace");
        assert!(t.would_enable("aziot_keyd::http", &Level::TRACE));
        assert!(!t.would_enable("aziot_ipc", &Level::DEBUG));
        assert!(parse_filter("").would_enable("x", &Level::INFO));
        assert!(!parse_filter("").would_enable("x", &Level::DEBUG));
        assert!(parse_filter("debug").would_enable("x", &Level::DEBUG));
    }
}
