//! What a long whole-tree run (initial sync, rescan, verify) says of its progress, from
//! rsync's `--info=progress2` lines: on a terminal one live line per target (several
//! targets syncing at once no longer share one `\r` line), in the log a line every so often.
//!
//! rsync's own percentage counts bytes against the files it knows so far; while its file
//! list is still growing (`ir-chk`, incremental recursion) that says nothing of the whole
//! (93% with a quarter of the tree still to list). So the line says files checked, and a
//! percentage only once the list is complete (`to-chk`), of files. A run shorter than the
//! reporting period prints nothing.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// What one progress2 line says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Bytes transferred so far, as rsync prints them (`1,234,567`, or `1.23G` with -h).
    pub bytes: String,
    /// The transfer rate, as rsync prints it.
    pub rate: String,
    /// Files checked so far, of `total` known.
    pub checked: u64,
    pub total: u64,
    /// The file list is complete (`to-chk`): `total` is every file of the run.
    pub complete: bool,
}

/// Parses `  1,234,567  45%  12.34MB/s  0:00:12 (xfr#12, to-chk=100/2000)`. None for a line
/// that does not look like one.
pub fn parse(line: &str) -> Option<Snapshot> {
    let mut words = line.split_whitespace();
    let bytes = words.next()?.to_string();
    let _percent = words.next().filter(|w| w.ends_with('%'))?;
    let rate = words.next().filter(|w| w.ends_with("/s"))?.to_string();
    let (complete, counts) = match line.split_once("to-chk=") {
        Some((_, rest)) => (true, rest),
        None => (false, line.split_once("ir-chk=")?.1),
    };
    let counts = counts.trim_end_matches(|c: char| c == ')' || c.is_whitespace());
    let (left, total) = counts.split_once('/')?;
    let (left, total): (u64, u64) = (left.parse().ok()?, total.parse().ok()?);
    Some(Snapshot {
        bytes,
        rate,
        checked: total.saturating_sub(left),
        total,
        complete,
    })
}

impl Snapshot {
    /// `12,345 of 20,000 files (61%), 1,234,567 bytes, 12.34MB/s`, or while the list grows
    /// `12,345 files checked, more being listed, ...`.
    pub fn describe(&self) -> String {
        let files = if self.complete {
            let percent = (self.checked * 100).checked_div(self.total).unwrap_or(100);
            format!(
                "{} of {} files ({percent}%)",
                grouped(self.checked),
                grouped(self.total)
            )
        } else {
            format!("{} files checked, more being listed", grouped(self.checked))
        };
        format!("{files}, {} bytes, {}", self.bytes, self.rate)
    }
}

/// `12345678` as `12,345,678`.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The bars of every run going at once, drawn together on stderr.
fn bars() -> &'static MultiProgress {
    static BARS: OnceLock<MultiProgress> = OnceLock::new();
    BARS.get_or_init(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))
}

/// How far a terminal's live line waits before it shows: runs shorter need none.
const TERMINAL_AFTER: Duration = Duration::from_secs(1);

/// Reports one run's progress (see the module docs).
pub struct Progress {
    label: &'static str,
    target: String,
    every: Duration,
    started: Instant,
    last: Option<Instant>,
    terminal: bool,
    bar: Option<ProgressBar>,
}

impl Progress {
    /// Progress of `label` ("full sync", "verify") towards `target`, logged every `every`
    /// (and drawn live when stderr is a terminal).
    pub fn new(label: &'static str, target: String, every: Duration) -> Self {
        use std::io::IsTerminal;
        Progress {
            label,
            target,
            every,
            started: Instant::now(),
            last: None,
            terminal: std::io::stderr().is_terminal(),
            bar: None,
        }
    }

    /// Takes in one progress2 line.
    pub fn update(&mut self, line: &str) {
        let now = Instant::now();
        let Some(snapshot) = parse(line) else {
            return;
        };
        if self.terminal {
            if now.duration_since(self.started) < TERMINAL_AFTER {
                return;
            }
            let bar = self.bar.get_or_insert_with(|| {
                let bar = bars().add(ProgressBar::new(0));
                bar.set_style(
                    ProgressStyle::with_template("{prefix}: {wide_msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                bar.set_prefix(format!("{} {}", self.label, self.target));
                bar
            });
            bar.set_message(snapshot.describe());
            return;
        }
        let due = self.last.unwrap_or(self.started) + self.every;
        if now < due {
            return;
        }
        self.last = Some(now);
        tracing::info!(target = %self.target, "{} progress: {}", self.label, snapshot.describe());
    }

    /// The run ended: its live line goes.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
            bars().remove(bar);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress2_lines_become_file_counts() {
        let table = [
            (
                "     32,768  50%   31.25MB/s    0:00:00 (xfr#1, to-chk=1/3)",
                Some(("32,768", "31.25MB/s", 2, 3, true)),
            ),
            // Incremental recursion: the list is still growing, no total to speak of.
            (
                "  1,234,567  93%   12.34MB/s    0:00:12 (xfr#15007, ir-chk=1000/16007)",
                Some(("1,234,567", "12.34MB/s", 15007, 16007, false)),
            ),
            (
                "      1.23G  45%  100.00MB/s    0:00:12 (xfr#9, to-chk=0/9)",
                Some(("1.23G", "100.00MB/s", 9, 9, true)),
            ),
            // Before the first file: no counts yet.
            ("          0   0%    0.00kB/s    0:00:00", None),
            ("sent 1 bytes  received 2 bytes", None),
        ];
        for (line, want) in table {
            let got = parse(line).map(|s| {
                (
                    s.bytes.clone(),
                    s.rate.clone(),
                    s.checked,
                    s.total,
                    s.complete,
                )
            });
            let want = want.map(|(b, r, c, t, k)| (b.to_string(), r.to_string(), c, t, k));
            assert_eq!(got, want, "{line}");
        }
    }

    #[test]
    fn the_percentage_is_of_files_and_only_once_the_list_is_complete() {
        let s = parse("  1,234,567  93%   12.34MB/s    0:00:12 (xfr#15007, to-chk=4993/20000)")
            .unwrap();
        assert_eq!(
            s.describe(),
            "15,007 of 20,000 files (75%), 1,234,567 bytes, 12.34MB/s"
        );
        let s = parse("  1,234,567  93%   12.34MB/s    0:00:12 (xfr#15007, ir-chk=1000/16007)")
            .unwrap();
        assert_eq!(
            s.describe(),
            "15,007 files checked, more being listed, 1,234,567 bytes, 12.34MB/s"
        );
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1000), "1,000");
        assert_eq!(grouped(1234567), "1,234,567");
    }

    #[test]
    fn a_short_run_logs_nothing() {
        let mut p = Progress::new("full sync", "/dst".into(), Duration::from_secs(10));
        p.terminal = false;
        p.update("     32,768  50%   31.25MB/s    0:00:00 (xfr#1, to-chk=1/3)");
        assert!(p.last.is_none(), "logged before a period had passed");
        p.started -= Duration::from_secs(11);
        p.update("     32,768  50%   31.25MB/s    0:00:00 (xfr#1, to-chk=1/3)");
        assert!(p.last.is_some());
    }
}
