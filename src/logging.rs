//! Log output: every `tracing` event at or above its target's level, one
//! line on stderr, `TIME LEVEL message key=value ...` (the journal adds the
//! rest). beamup logs events only, no spans, so this small subscriber does
//! what tracing-subscriber's fmt layer did here at a fraction of its size.
//!
//! `RUST_LOG` takes `LEVEL` and `target=LEVEL` directives, comma-separated
//! (`warn,beamup::device::agent=debug`); the most specific target wins, and a target
//! that no directive names logs at the bare `LEVEL` (or not at all). No
//! regular expressions or span filters: a malformed value is ignored in
//! favour of the default.

use std::fmt::{self, Write as _};
use std::io::Write as _;

use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// Which events are logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Filter {
    /// For events of no named target.
    default: LevelFilter,
    /// `(target prefix, level)`, longest prefix first.
    targets: Vec<(String, LevelFilter)>,
}

impl Filter {
    /// Parses `RUST_LOG`-style directives; `None` if any is malformed.
    pub(crate) fn parse(s: &str) -> Option<Filter> {
        let mut f = Filter {
            default: LevelFilter::OFF,
            targets: Vec::new(),
        };
        for d in s.split(',').map(str::trim).filter(|d| !d.is_empty()) {
            match d.split_once('=') {
                Some((target, level)) if !target.is_empty() => {
                    f.targets.push((target.to_string(), level.parse().ok()?));
                }
                Some(_) => return None,
                // A bare word is a level, or else a target at every level.
                None => match d.parse() {
                    Ok(level) => f.default = level,
                    Err(_) if d.chars().all(|c| c.is_alphanumeric() || "_:-.".contains(c)) => {
                        f.targets.push((d.to_string(), LevelFilter::TRACE));
                    }
                    Err(_) => return None,
                },
            }
        }
        f.targets.sort_by_key(|(t, _)| std::cmp::Reverse(t.len()));
        Some(f)
    }

    pub(crate) fn enabled(&self, target: &str, level: &Level) -> bool {
        let max = self
            .targets
            .iter()
            .find(|(t, _)| target.starts_with(t.as_str()))
            .map_or(self.default, |(_, l)| *l);
        *level <= max
    }

    fn max(&self) -> LevelFilter {
        self.targets
            .iter()
            .map(|(_, l)| *l)
            .fold(self.default, LevelFilter::max)
    }
}

/// Installs the subscriber for the whole process: `RUST_LOG` if it parses,
/// else `default` (a level). `color`: ANSI colours for a terminal.
pub fn init(default: &str, color: bool) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| Filter::parse(&v))
        .or_else(|| Filter::parse(default))
        .unwrap_or(Filter {
            default: LevelFilter::WARN,
            targets: Vec::new(),
        });
    let _ = tracing::subscriber::set_global_default(Logger { filter, color });
}

struct Logger {
    filter: Filter,
    color: bool,
}

impl Subscriber for Logger {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        self.filter.enabled(m.target(), m.level())
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(self.filter.max())
    }

    fn event(&self, event: &Event<'_>) {
        let line = format_line(
            &humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
            event.metadata().level(),
            |v| event.record(v),
            self.color,
        );
        // One write per line, so that concurrent lines do not interleave.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    // No spans are used; these keep the trait's contract.
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

/// `TIME LEVEL message key=value ...\n`, as tracing-subscriber's default
/// format writes it (levels padded to five, string fields quoted).
fn format_line(time: &str, level: &Level, record: impl FnOnce(&mut Fields), color: bool) -> String {
    let mut fields = Fields::default();
    record(&mut fields);
    let (on, off) = match (color, *level) {
        (false, _) => ("", ""),
        (true, Level::ERROR) => ("\x1b[31m", "\x1b[0m"),
        (true, Level::WARN) => ("\x1b[33m", "\x1b[0m"),
        (true, Level::INFO) => ("\x1b[32m", "\x1b[0m"),
        (true, Level::DEBUG) => ("\x1b[34m", "\x1b[0m"),
        (true, _) => ("\x1b[35m", "\x1b[0m"),
    };
    let mut line = format!("{time} {on}{:>5}{off} ", level.as_str());
    escape_controls(&fields.message, &mut line);
    if !fields.rest.is_empty() {
        if !fields.message.is_empty() {
            line.push(' ');
        }
        escape_controls(&fields.rest, &mut line);
    }
    line.push('\n');
    line
}

/// Appends `text` with its control characters escaped (`\n`, `\u{1b}`),
/// tabs kept: a message that carries bytes from the network cannot start
/// a log line of its own or drive the terminal.
fn escape_controls(text: &str, out: &mut String) {
    for c in text.chars() {
        if c.is_control() && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
}

/// Untrusted text (from the network, a bundle, a node) fit for a log line
/// or a report field: control characters escaped, at most `max`
/// characters, the rest only counted.
pub(crate) fn untrusted(text: &str, max: usize) -> String {
    let mut out = String::new();
    for (n, (i, c)) in text.char_indices().enumerate() {
        if n == max {
            let _ = write!(out, "... ({} more bytes)", text.len() - i);
            break;
        }
        escape_controls(c.encode_utf8(&mut [0; 4]), &mut out);
    }
    out
}

#[derive(Default)]
struct Fields {
    message: String,
    rest: String,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let sep = if self.rest.is_empty() { "" } else { " " };
            let name = field.name().trim_start_matches("r#");
            let _ = write!(self.rest, "{sep}{name}={value:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_one_line_whatever_it_carries() {
        let line = format_line(
            "T",
            &Level::WARN,
            |f| {
                f.message = "gone\nERROR forged\r\x1b[2J\tend".into();
                f.rest = "peer=\"a\nb\"".into();
            },
            false,
        );
        assert_eq!(
            line,
            "T  WARN gone\\nERROR forged\\r\\u{1b}[2J\tend peer=\"a\\nb\"\n"
        );
        assert_eq!(untrusted("ab\ncd", 10), "ab\\ncd");
        assert_eq!(untrusted("héllo world", 5), "héllo... (6 more bytes)");
    }

    #[test]
    fn directives() {
        let f =
            Filter::parse("warn,beamup::device::agent=debug,beamup::device::agent::x=off").unwrap();
        assert!(f.enabled("beamup::engine::install", &Level::WARN));
        assert!(!f.enabled("beamup::engine::install", &Level::INFO));
        assert!(f.enabled("beamup::device::agent", &Level::DEBUG));
        assert!(!f.enabled("beamup::device::agent", &Level::TRACE));
        assert!(!f.enabled("beamup::device::agent::x", &Level::ERROR));
        assert_eq!(f.max(), LevelFilter::DEBUG);

        let f = Filter::parse("INFO").unwrap();
        assert!(f.enabled("anything", &Level::INFO));
        assert!(!f.enabled("anything", &Level::DEBUG));

        // A bare target logs everything of it, nothing else.
        let f = Filter::parse("rumqttc").unwrap();
        assert!(f.enabled("rumqttc::state", &Level::TRACE));
        assert!(!f.enabled("beamup", &Level::ERROR));

        for bad in ["=debug", "beamup=loud", "a b", "warn,x=1=2"] {
            assert_eq!(Filter::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn lines() {
        let line = format_line(
            "2026-11-22T08:00:00.000001Z",
            &Level::INFO,
            |f| {
                let fields = tracing::field::FieldSet::new(
                    &["message", "peer", "n"],
                    tracing::callsite::Identifier(&CALLSITE),
                );
                let mut it = fields.iter();
                let (m, p, n) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
                f.record_debug(&m, &format_args!("connection up"));
                f.record_str(&p, "gw-1");
                f.record_debug(&n, &3);
            },
            false,
        );
        assert_eq!(
            line,
            "2026-11-22T08:00:00.000001Z  INFO connection up peer=\"gw-1\" n=3\n"
        );
        let line = format_line("T", &Level::WARN, |_| {}, true);
        assert_eq!(line, "T \x1b[33m WARN\x1b[0m \n");
    }

    struct Callsite;
    static CALLSITE: Callsite = Callsite;
    impl tracing::callsite::Callsite for Callsite {
        fn set_interest(&self, _: tracing::subscriber::Interest) {}
        fn metadata(&self) -> &Metadata<'_> {
            unimplemented!()
        }
    }
}
