//! The one tracing subscriber, installed by the binary, and where its lines go.
//!
//! Three destinations, chosen once at start:
//!
//! - **journald, natively**, when systemd started us with stderr connected to the journal
//!   (`JOURNAL_STREAM` names the device and inode of our stderr, as `systemd.exec(5)`
//!   documents) and the journal's socket takes datagrams. One entry per event: `PRIORITY`
//!   (3 error, 4 warning, 6 info, 7 debug and trace), `MESSAGE` (the message followed by
//!   its fields as `key=value`, as on a terminal, so `journalctl -u watcher` reads the
//!   same), `SYSLOG_IDENTIFIER=watcher`, `CODE_FILE`/`CODE_LINE`, and every field again as
//!   `WATCHER_<NAME>` for matching (`journalctl WATCHER_TARGET=backup:/srv WATCHER_CODE=23`).
//!   A multi-line message (rsync's stderr) stays one entry.
//! - **stderr with syslog priority prefixes**, under systemd when the socket does not
//!   answer: `<3>` error, `<4>` warning, `<6>` info, `<7>` debug and trace, no timestamp
//!   (the journal adds its own). journald splits a stream at newlines, so the line
//!   breaks inside a message are written as the two characters `\n`: one message is still
//!   one entry, with one priority.
//! - **stderr as tracing formats it** otherwise (a terminal, a pipe, a test): timestamp,
//!   level, message, fields; colours only on a terminal and without `NO_COLOR`.

use std::fmt::{self, Write as _};
use std::io::{IsTerminal, Write as _};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

/// journald's socket for the native protocol.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// The prefix of the journal fields that carry an event's fields (`WATCHER_TARGET`).
const FIELD_PREFIX: &str = "WATCHER_";

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    /// journald's native protocol.
    Journal,
    /// stderr, connected to the journal: `<N>` prefixes, no timestamps.
    PrefixedStderr,
    /// stderr as tracing formats it.
    Stderr,
}

/// Installs the subscriber. `RUST_LOG` wins when set; otherwise `-v` raises the level from
/// info (one: debug, two: trace) and `-q` lowers it to warnings. Returns where lines go.
pub fn init(verbose: u8, quiet: bool) -> Sink {
    let default = match (quiet, verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let journal = stderr_is_journal().then(|| JournalLayer::connect(Path::new(JOURNAL_SOCKET)));
    match journal {
        Some(Ok(layer)) => {
            let _ = tracing_subscriber::registry()
                .with(filter)
                .with(layer)
                .try_init();
            Sink::Journal
        }
        Some(Err(_)) => {
            let _ = tracing_subscriber::registry()
                .with(filter)
                .with(PrefixedLayer)
                .try_init();
            Sink::PrefixedStderr
        }
        None => {
            let ansi = std::io::stderr().is_terminal() && !no_color(std::env::var_os("NO_COLOR"));
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .with_ansi(ansi)
                .with_target(false)
                .try_init();
            Sink::Stderr
        }
    }
}

/// Whether stderr is the stream systemd connected to the journal: `JOURNAL_STREAM` is
/// `DEVICE:INODE` of that stream, and only when they match stderr's is it still ours (a
/// child of a service that redirected stderr elsewhere inherits the variable too).
pub fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stat) = nix::sys::stat::fstat(std::io::stderr()) else {
        return false;
    };
    value
        .to_str()
        .and_then(parse_journal_stream)
        .is_some_and(|(dev, ino)| dev == stat.st_dev && ino == stat.st_ino)
}

/// `DEVICE:INODE`, both decimal.
fn parse_journal_stream(value: &str) -> Option<(u64, u64)> {
    let (dev, ino) = value.split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

/// The syslog priority of a level (`sd-daemon(3)`'s `SD_ERR` .. `SD_DEBUG`).
fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// An event's message and fields, as text.
#[derive(Default)]
struct Fields {
    message: String,
    fields: Vec<(&'static str, String)>,
}

impl Fields {
    fn of(event: &Event<'_>) -> Fields {
        let mut f = Fields::default();
        event.record(&mut f);
        f
    }

    /// `message key=value ...`, as tracing's own format writes it.
    fn line(&self) -> String {
        let mut line = self.message.clone();
        for (name, value) in &self.fields {
            if !line.is_empty() {
                line.push(' ');
            }
            let _ = write!(line, "{name}={value}");
        }
        line
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_owned();
        } else {
            // Quoted, as tracing's format does, so a value with spaces stays one value.
            self.fields.push((field.name(), format!("{value:?}")));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() == "message" {
            self.message = text;
        } else {
            self.fields.push((field.name(), text));
        }
    }
}

/// stderr lines `<N>message key=value`, one per event.
struct PrefixedLayer;

/// One event as one prefixed line: line breaks inside become `\n`.
fn prefixed_line(level: &Level, text: &str) -> String {
    let mut line = format!("<{}>", priority(level));
    for (i, part) in text.split('\n').enumerate() {
        if i > 0 {
            line.push_str("\\n");
        }
        line.push_str(part);
    }
    line.push('\n');
    line
}

impl<S: Subscriber> Layer<S> for PrefixedLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let line = prefixed_line(event.metadata().level(), &Fields::of(event).line());
        // One write per event, so that threads never interleave inside a line.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }
}

/// journald's native protocol: one datagram per event.
struct JournalLayer {
    socket: UnixDatagram,
    path: PathBuf,
}

impl JournalLayer {
    /// An unbound socket that reached `path` once (journald drops an empty datagram).
    fn connect(path: &Path) -> std::io::Result<JournalLayer> {
        let socket = UnixDatagram::unbound()?;
        socket.send_to(&[], path)?;
        Ok(JournalLayer {
            socket,
            path: path.to_path_buf(),
        })
    }
}

/// Appends one field in the native protocol's form: `NAME=value\n`, or, when the value
/// holds a newline, `NAME\n`, its length as 64-bit little-endian, the value, `\n`.
fn put_field(buf: &mut Vec<u8>, name: &str, value: &[u8]) {
    buf.extend_from_slice(name.as_bytes());
    if value.contains(&b'\n') {
        buf.push(b'\n');
        buf.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        buf.push(b'=');
    }
    buf.extend_from_slice(value);
    buf.push(b'\n');
}

/// A journal field name for a tracing field: upper case, letters, digits and `_`.
fn journal_field_name(name: &str) -> String {
    let mut out = String::from(FIELD_PREFIX);
    out.extend(
        name.chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .map(|c| c.to_ascii_uppercase()),
    );
    out
}

/// The datagram for one event.
fn journal_entry(level: &Level, file: Option<&str>, line: Option<u32>, f: &Fields) -> Vec<u8> {
    let mut buf = Vec::with_capacity(256);
    put_field(&mut buf, "PRIORITY", priority(level).to_string().as_bytes());
    put_field(&mut buf, "SYSLOG_IDENTIFIER", b"watcher");
    put_field(&mut buf, "MESSAGE", f.line().as_bytes());
    if let Some(file) = file {
        put_field(&mut buf, "CODE_FILE", file.as_bytes());
    }
    if let Some(line) = line {
        put_field(&mut buf, "CODE_LINE", line.to_string().as_bytes());
    }
    for (name, value) in &f.fields {
        // The value as given: a string field without the quotes of the message text.
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .map_or_else(|| value.clone(), unquote);
        put_field(&mut buf, &journal_field_name(name), value.as_bytes());
    }
    buf
}

/// Whether `NO_COLOR` asks for no colours: set and not empty (no-color.org).
fn no_color(value: Option<std::ffi::OsString>) -> bool {
    value.is_some_and(|v| !v.is_empty())
}

/// Undoes the escapes `{:?}` put into a string.
fn unquote(quoted: &str) -> String {
    let mut out = String::with_capacity(quoted.len());
    let mut chars = quoted.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

impl<S: Subscriber> Layer<S> for JournalLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        let fields = Fields::of(event);
        let entry = journal_entry(meta.level(), meta.file(), meta.line(), &fields);
        if self.socket.send_to(&entry, &self.path).is_err() {
            // Too large for a datagram, or journald went away: stderr still reaches the
            // journal, as a prefixed line.
            let line = prefixed_line(meta.level(), &fields.line());
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_color_is_set_and_not_empty() {
        assert!(no_color(Some("1".into())));
        assert!(!no_color(Some("".into())));
        assert!(!no_color(None));
    }

    #[test]
    fn journal_stream_is_device_and_inode() {
        assert_eq!(parse_journal_stream("8:12345"), Some((8, 12345)));
        assert_eq!(parse_journal_stream("8:"), None);
        assert_eq!(parse_journal_stream("x:1"), None);
        assert_eq!(parse_journal_stream("81234"), None);
    }

    #[test]
    fn prefixed_lines_keep_a_message_on_one_line() {
        let table = [
            (Level::ERROR, "a", "<3>a\n"),
            (Level::WARN, "a b=1", "<4>a b=1\n"),
            (Level::INFO, "ready", "<6>ready\n"),
            (Level::DEBUG, "x", "<7>x\n"),
            (Level::TRACE, "x", "<7>x\n"),
            (
                Level::ERROR,
                "rsync: one\nrsync error: two",
                "<3>rsync: one\\nrsync error: two\n",
            ),
        ];
        for (level, text, want) in table {
            assert_eq!(prefixed_line(&level, text), want);
        }
    }

    #[test]
    fn journal_fields_use_the_length_form_for_multi_line_values() {
        let mut buf = Vec::new();
        put_field(&mut buf, "A", b"x");
        put_field(&mut buf, "B", b"1\n2");
        let mut want = b"A=x\nB\n".to_vec();
        want.extend_from_slice(&3u64.to_le_bytes());
        want.extend_from_slice(b"1\n2\n");
        assert_eq!(buf, want);
        assert_eq!(journal_field_name("retry_in_ms"), "WATCHER_RETRY_IN_MS");
        assert_eq!(unquote(r#"a\"b\nc"#), "a\"b\nc");
    }
}
