//! `watcher watch`: print resolved events under some paths, like `inotifywait -mr`.
//!
//! What is printed is what the backend reports, after the paths are resolved:
//!
//! - `close_write` is its own event; when the kernel merged a write and the close after it
//!   into one event (fanotify does while neither was read yet) it is printed as
//!   `close_write` alone.
//! - A rename is printed as `moved_from` and `moved_to`; in JSON, when the rename was seen
//!   whole (fanotify on Linux 5.17 and later, inotify's halves paired by their cookie), a
//!   `renamed` object with `from` and `to` follows them.
//! - A deleted directory: `rm -rf` deletes the files inside first, and each deletion is
//!   printed with the name the kernel reports, also inside a directory renamed just before.
//!   A deletion whose directory can no longer be named (it was gone before the event was
//!   read and no earlier event named it) cannot be printed: the directory's own `delete`
//!   still is.
//! - fanotify merges the unread events of one name into one: a file created and deleted
//!   again before its events were read (a busy machine) is printed once, as created, the
//!   most far-reaching change, because one event is printed with one kind.
//! - inotify (`--backend inotify`) watches a new directory once its creation is read, so
//!   files made in it before that are not printed, as with `inotifywait -mr` (the daemon
//!   syncs such a directory whole, so nothing is lost there).
//! - `delete_self`: a watched path itself was deleted or moved away.
//! - `rescan` (a subtree changed in ways the backend cannot list) and `overflow` (events
//!   were lost) are always printed, whatever `-e` selects.

use std::collections::HashSet;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::Context;

use crate::backend::{self, BackendOptions, OwnPids};
use crate::cli::WatchEvent;
use crate::event::{ChangeKind, Event};
use crate::filter::{Filter, FilterBuilder};

/// How each event is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// `KIND PATH` per line (PATH ends with / for directories).
    Text,
    /// One JSON object per line, with a `time`.
    Json,
    /// inotifywait's `--format`: `%w` the directory (ending with /), `%f` the name, `%e`
    /// the event names (`CLOSE_WRITE`, `CREATE,ISDIR`), `%T` the time as `--timefmt`
    /// says, `%%` a percent sign.
    Printf(String),
}

impl Output {
    /// `text`, `json`, or a format string.
    pub fn parse(format: &str) -> Output {
        match format {
            "text" => Output::Text,
            "json" => Output::Json,
            other => Output::Printf(other.to_string()),
        }
    }
}

/// Everything `watcher watch` was asked for, beside the paths and the backend.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    pub output: Output,
    /// strftime-like, in UTC: `%Y %m %d %H %M %S %s %F %T %z %Z %%`.
    pub timefmt: String,
    /// The events to print; empty means all.
    pub events: Vec<WatchEvent>,
    /// rsync-style patterns of paths to leave out.
    pub excludes: Vec<String>,
    /// Exit after the first event printed.
    pub oneshot: bool,
    /// Exit after this long.
    pub timeout: Option<Duration>,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            output: Output::Text,
            timefmt: "%F %T".into(),
            events: Vec::new(),
            excludes: Vec::new(),
            oneshot: false,
            timeout: None,
        }
    }
}

/// What a printed event is, in the words of `-e`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Change(ChangeKind),
    DeleteSelf,
    Renamed,
    Rescan,
    Overflow,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Change(ChangeKind::Created) => "created",
            Kind::Change(ChangeKind::Modified) => "modified",
            Kind::Change(ChangeKind::CloseWrite) => "close_write",
            Kind::Change(ChangeKind::Attrib) => "attrib",
            Kind::Change(ChangeKind::Deleted) => "deleted",
            Kind::Change(ChangeKind::MovedFrom) => "moved_from",
            Kind::Change(ChangeKind::MovedTo) => "moved_to",
            Kind::DeleteSelf => "delete_self",
            Kind::Renamed => "renamed",
            Kind::Rescan => "rescan",
            Kind::Overflow => "overflow",
        }
    }

    /// inotifywait's name for `%e`.
    fn inotify_name(self) -> &'static str {
        match self {
            Kind::Change(ChangeKind::Created) => "CREATE",
            Kind::Change(ChangeKind::Modified) => "MODIFY",
            Kind::Change(ChangeKind::CloseWrite) => "CLOSE_WRITE",
            Kind::Change(ChangeKind::Attrib) => "ATTRIB",
            Kind::Change(ChangeKind::Deleted) => "DELETE",
            Kind::Change(ChangeKind::MovedFrom) => "MOVED_FROM",
            Kind::Change(ChangeKind::MovedTo) => "MOVED_TO",
            Kind::DeleteSelf => "DELETE_SELF",
            Kind::Renamed => "MOVE",
            Kind::Rescan => "RESCAN",
            Kind::Overflow => "Q_OVERFLOW",
        }
    }

    fn selected_by(self, events: &[WatchEvent]) -> bool {
        use WatchEvent as W;
        if events.is_empty() {
            return true;
        }
        let wanted: &[WatchEvent] = match self {
            Kind::Change(ChangeKind::Created) => &[W::Create],
            Kind::Change(ChangeKind::Modified) => &[W::Modify],
            Kind::Change(ChangeKind::CloseWrite) => &[W::CloseWrite],
            Kind::Change(ChangeKind::Attrib) => &[W::Attrib],
            Kind::Change(ChangeKind::Deleted) => &[W::Delete],
            Kind::Change(ChangeKind::MovedFrom) => &[W::MovedFrom, W::Move],
            Kind::Change(ChangeKind::MovedTo) => &[W::MovedTo, W::Move],
            Kind::Renamed => &[W::MovedFrom, W::MovedTo, W::Move],
            Kind::DeleteSelf => &[W::DeleteSelf],
            Kind::Rescan | Kind::Overflow => return true,
        };
        wanted.iter().any(|w| events.contains(w))
    }
}

/// Turns events into output lines.
pub struct Printer {
    filter: Filter,
    roots: HashSet<PathBuf>,
    options: WatchOptions,
}

impl Printer {
    /// `roots` must be absolute and canonical.
    pub fn new(roots: &[PathBuf], options: WatchOptions) -> anyhow::Result<Printer> {
        let mut builder = FilterBuilder::new();
        for root in roots {
            builder.add_root(root, &options.excludes)?;
        }
        Ok(Printer {
            filter: builder.build()?,
            roots: roots.iter().cloned().collect(),
            options,
        })
    }

    /// One output line for `event` (with its trailing newline), or None if it is outside
    /// the watched paths, excluded, or not selected.
    pub fn line(&self, event: &Event, now: SystemTime) -> Option<Vec<u8>> {
        let (kind, path, is_dir, pid): (Kind, &Path, bool, i32) = match event {
            Event::Change {
                kind,
                path,
                is_dir,
                pid,
            } => {
                if *kind == ChangeKind::Deleted && *is_dir && self.roots.contains(path) {
                    (Kind::DeleteSelf, path.as_path(), true, *pid)
                } else {
                    self.filter.lookup(path, *is_dir)?;
                    (Kind::Change(*kind), path.as_path(), *is_dir, *pid)
                }
            }
            Event::Renamed { from, to, is_dir } => {
                // Its moved_from and moved_to are printed already; JSON adds the pair.
                if self.options.output != Output::Json
                    || (self.filter.lookup(from, *is_dir).is_none()
                        && self.filter.lookup(to, *is_dir).is_none())
                    || !Kind::Renamed.selected_by(&self.options.events)
                {
                    return None;
                }
                let mut obj = serde_json::json!({
                    "kind": "renamed",
                    "is_dir": is_dir,
                    "time": humantime::format_rfc3339_micros(now).to_string(),
                });
                put_path(&mut obj, "from", from);
                put_path(&mut obj, "to", to);
                let mut line = obj.to_string().into_bytes();
                line.push(b'\n');
                return Some(line);
            }
            // A root that is gone: the backend asks for a rescan, inotifywait says this.
            Event::Rescan { path }
                if self.roots.contains(path) && std::fs::symlink_metadata(path).is_err() =>
            {
                (Kind::DeleteSelf, path.as_path(), true, 0)
            }
            Event::Rescan { path } => (Kind::Rescan, path.as_path(), true, 0),
            // The daemon's business (other names to sync); inotifywait has no such line.
            Event::OtherNamesChanged { .. } => return None,
            Event::Overflow => (Kind::Overflow, Path::new(""), false, 0),
        };
        if !kind.selected_by(&self.options.events) {
            return None;
        }
        let mut line = Vec::new();
        match &self.options.output {
            Output::Text => {
                line.extend_from_slice(kind.name().as_bytes());
                line.push(b' ');
                line.extend_from_slice(path.as_os_str().as_bytes());
                if is_dir && !path.as_os_str().is_empty() {
                    line.push(b'/');
                }
            }
            Output::Json => {
                let mut obj = serde_json::json!({
                    "kind": kind.name(),
                    "is_dir": is_dir,
                    "pid": pid,
                    "time": humantime::format_rfc3339_micros(now).to_string(),
                });
                put_path(&mut obj, "path", path);
                line.extend_from_slice(obj.to_string().as_bytes());
            }
            Output::Printf(format) => {
                self.printf(&mut line, format, kind, path, is_dir, now);
            }
        }
        line.push(b'\n');
        Some(line)
    }

    fn printf(
        &self,
        line: &mut Vec<u8>,
        format: &str,
        kind: Kind,
        path: &Path,
        is_dir: bool,
        now: SystemTime,
    ) {
        // inotifywait names a watched directory itself by %w with an empty %f.
        let (dir, name) = match (path.parent(), path.file_name()) {
            (Some(dir), Some(name)) if kind != Kind::DeleteSelf => (dir, name.as_bytes()),
            _ => (path, &b""[..]),
        };
        let mut chars = format.chars();
        while let Some(c) = chars.next() {
            if c != '%' {
                let mut buf = [0; 4];
                line.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                continue;
            }
            match chars.next() {
                Some('w') => {
                    line.extend_from_slice(dir.as_os_str().as_bytes());
                    if !line.ends_with(b"/") {
                        line.push(b'/');
                    }
                }
                Some('f') => line.extend_from_slice(name),
                Some('e') => {
                    line.extend_from_slice(kind.inotify_name().as_bytes());
                    if is_dir {
                        line.extend_from_slice(b",ISDIR");
                    }
                }
                Some('T') => {
                    line.extend_from_slice(strftime(&self.options.timefmt, now).as_bytes())
                }
                Some('%') => line.push(b'%'),
                Some(other) => {
                    line.push(b'%');
                    line.extend_from_slice(other.to_string().as_bytes());
                }
                None => line.push(b'%'),
            }
        }
    }
}

/// JSON strings are Unicode: a non-UTF-8 name is given as its bytes, under `KEY_bytes`.
fn put_path(obj: &mut serde_json::Value, key: &str, path: &Path) {
    match path.to_str() {
        Some(p) => obj[key] = p.into(),
        None => obj[format!("{key}_bytes")] = path.as_os_str().as_bytes().to_vec().into(),
    }
}

/// `format` with `%Y %m %d %H %M %S %s %F %T %z %Z %%` replaced by `time`'s, in UTC;
/// any other `%x` is kept as it is.
pub fn strftime(format: &str, time: SystemTime) -> String {
    let secs = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (y, mo, d) = civil_from_days(days as i64);
    let (h, mi, s) = (rest / 3600, rest % 3600 / 60, rest % 60);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out += &format!("{y:04}"),
            Some('m') => out += &format!("{mo:02}"),
            Some('d') => out += &format!("{d:02}"),
            Some('H') => out += &format!("{h:02}"),
            Some('M') => out += &format!("{mi:02}"),
            Some('S') => out += &format!("{s:02}"),
            Some('s') => out += &secs.to_string(),
            Some('F') => out += &format!("{y:04}-{mo:02}-{d:02}"),
            Some('T') => out += &format!("{h:02}:{mi:02}:{s:02}"),
            Some('z') => out += "+0000",
            Some('Z') => out += "UTC",
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Year, month, day of the `days`th day after 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Runs until SIGINT/SIGTERM, until stdout is closed, after the first event with
/// `oneshot`, or when `timeout` runs out. Exits 0, or 2 when a timeout ran out before
/// the one event `oneshot` waited for (inotifywait's convention).
pub fn run_watch(
    paths: &[PathBuf],
    options: WatchOptions,
    backend_options: &BackendOptions,
) -> anyhow::Result<i32> {
    let mut roots = Vec::new();
    for path in paths {
        let root = path
            .canonicalize()
            .with_context(|| format!("cannot watch {}", path.display()))?;
        roots.push(root);
    }
    let oneshot = options.oneshot;
    let timeout = options.timeout;
    let printer = Printer::new(&roots, options)?;
    let backend = backend::start(backend_options, &roots, Arc::new(OwnPids::new()))?;
    tracing::info!(backend = backend.name(), "watching");

    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone()).context("installing a signal handler")?;
    }
    if let Some(timeout) = timeout {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("watch timeout".into())
            .spawn(move || {
                std::thread::sleep(timeout);
                stop.store(true, Ordering::Relaxed);
            })
            .context("starting the timeout thread")?;
    }
    let stdout = std::io::stdout();
    let mut printed = false;
    let mut sink = |events: Vec<Event>| {
        let mut out = stdout.lock();
        let now = SystemTime::now();
        for event in &events {
            if let Some(line) = printer.line(event, now) {
                if out.write_all(&line).is_err() {
                    return false;
                }
                printed = true;
                if oneshot {
                    break;
                }
            }
        }
        out.flush().is_ok() && !(oneshot && printed)
    };
    backend.run(&mut sink, &stop)?;
    Ok(if oneshot && !printed { 2 } else { 0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn printer(options: WatchOptions) -> Printer {
        Printer::new(&[PathBuf::from("/srv/data")], options).unwrap()
    }

    fn change(kind: ChangeKind, path: &str, is_dir: bool) -> Event {
        Event::Change {
            kind,
            path: path.into(),
            is_dir,
            pid: 7,
        }
    }

    fn text(p: &Printer, event: &Event) -> Option<String> {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        p.line(event, t).map(|l| String::from_utf8(l).unwrap())
    }

    #[test]
    fn strftime_in_utc() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(strftime("%F %T", t), "2023-11-14 22:13:20");
        assert_eq!(
            strftime("%d/%m/%Y %H:%M:%S %z %Z %s %% %q", t),
            "14/11/2023 22:13:20 +0000 UTC 1700000000 % %q"
        );
        assert_eq!(strftime("%F", SystemTime::UNIX_EPOCH), "1970-01-01");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(strftime("%F", leap), "2000-02-29");
    }

    #[test]
    fn printf_formats_like_inotifywait() {
        let p = printer(WatchOptions {
            output: Output::parse("%T %w %f %e"),
            timefmt: "%H:%M".into(),
            ..Default::default()
        });
        let table = [
            (
                change(ChangeKind::CloseWrite, "/srv/data/d/f", false),
                "22:13 /srv/data/d/ f CLOSE_WRITE\n",
            ),
            (
                change(ChangeKind::Created, "/srv/data/new", true),
                "22:13 /srv/data/ new CREATE,ISDIR\n",
            ),
            (
                change(ChangeKind::Deleted, "/srv/data", true),
                "22:13 /srv/data/  DELETE_SELF,ISDIR\n",
            ),
        ];
        for (event, want) in table {
            assert_eq!(text(&p, &event).as_deref(), Some(want), "{event:?}");
        }
    }

    #[test]
    fn events_select_what_is_printed() {
        use WatchEvent as W;
        let cases: &[(&[WatchEvent], ChangeKind, bool)] = &[
            (&[W::CloseWrite], ChangeKind::CloseWrite, true),
            (&[W::CloseWrite], ChangeKind::Modified, false),
            (&[W::Modify], ChangeKind::CloseWrite, false),
            (&[W::Move], ChangeKind::MovedFrom, true),
            (&[W::Move], ChangeKind::MovedTo, true),
            (&[W::MovedTo], ChangeKind::MovedFrom, false),
            (&[W::Create, W::Delete], ChangeKind::Deleted, true),
            (&[W::Create, W::Delete], ChangeKind::Attrib, false),
            (&[], ChangeKind::Attrib, true),
        ];
        for &(events, kind, printed) in cases {
            let p = printer(WatchOptions {
                events: events.to_vec(),
                ..Default::default()
            });
            let got = text(&p, &change(kind, "/srv/data/f", false));
            assert_eq!(got.is_some(), printed, "{events:?} {kind:?}");
        }
        let p = printer(WatchOptions {
            events: vec![W::Create],
            ..Default::default()
        });
        assert_eq!(text(&p, &Event::Overflow).as_deref(), Some("overflow \n"));
    }

    #[test]
    fn excludes_leave_paths_out() {
        let p = printer(WatchOptions {
            excludes: vec!["*.swp".into()],
            ..Default::default()
        });
        assert_eq!(
            text(&p, &change(ChangeKind::Modified, "/srv/data/a.swp", false)),
            None
        );
        assert_eq!(
            text(&p, &change(ChangeKind::Modified, "/srv/data/a", false)).as_deref(),
            Some("modified /srv/data/a\n")
        );
    }

    #[test]
    fn json_has_a_time_and_renames_in_one_object() {
        let p = printer(WatchOptions {
            output: Output::Json,
            ..Default::default()
        });
        let line = text(&p, &change(ChangeKind::CloseWrite, "/srv/data/f", false)).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["kind"], "close_write");
        assert_eq!(v["path"], "/srv/data/f");
        assert_eq!(v["time"], "2023-11-14T22:13:20.000000Z");
        let rename = Event::Renamed {
            from: "/srv/data/a".into(),
            to: "/srv/data/b".into(),
            is_dir: false,
        };
        let v: serde_json::Value = serde_json::from_str(&text(&p, &rename).unwrap()).unwrap();
        assert_eq!(
            (&v["kind"], &v["from"], &v["to"]),
            (
                &"renamed".into(),
                &"/srv/data/a".into(),
                &"/srv/data/b".into()
            )
        );
        // Text output has printed the rename's two halves already.
        assert_eq!(text(&printer(WatchOptions::default()), &rename), None);
    }
}
