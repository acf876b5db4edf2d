//! The status for people: what `watcher status` prints.
//!
//! A header (version, pid, backend, uptime, event counters: those under the roots and all the
//! backend read), then per group a table with one row per target and notes (the last error,
//! verification results) below it. Names and messages come from the configuration and from
//! rsync, so control characters are escaped before they reach the terminal.
//!
//! Pure text from a snapshot and the current time (passed in), so the layout is tested
//! without a daemon or a clock.

use std::fmt::Write as _;

use super::snapshot::{LastSync, StatusSnapshot, TargetState};

/// A duration in milliseconds, short: `250ms`, `1.2s`, `42s`, `3m`, `3m05s`, `2h07m`, `3d04h`.
pub fn format_age(ms: u64) -> String {
    const MINUTE: u64 = 60;
    const HOUR: u64 = 60 * MINUTE;
    const DAY: u64 = 24 * HOUR;
    if ms < 1000 {
        return format!("{ms}ms");
    }
    if ms < 10_000 {
        return format!("{}.{}s", ms / 1000, ms % 1000 / 100);
    }
    let s = ms / 1000;
    let two = |big: u64, big_unit: &str, small: u64, small_unit: &str| {
        if small == 0 {
            format!("{big}{big_unit}")
        } else {
            format!("{big}{big_unit}{small:02}{small_unit}")
        }
    };
    if s < MINUTE {
        format!("{s}s")
    } else if s < HOUR {
        two(s / MINUTE, "m", s % MINUTE, "s")
    } else if s < DAY {
        two(s / HOUR, "h", s % HOUR / MINUTE, "m")
    } else {
        two(s / DAY, "d", s % DAY / HOUR, "h")
    }
}

fn ago(now_unix_ms: u64, then_unix_ms: u64) -> String {
    format!(
        "{} ago",
        format_age(now_unix_ms.saturating_sub(then_unix_ms))
    )
}

fn last_sync_text(last: &LastSync, now_unix_ms: u64) -> String {
    let result = match (last.ok, last.code) {
        (true, _) => "ok".to_owned(),
        (false, Some(code)) => format!("failed, exit {code}"),
        (false, None) => "failed".to_owned(),
    };
    format!(
        "{}: {result} ({}, {})",
        ago(now_unix_ms, last.finished_unix_ms),
        crate::words::counted(last.paths, "path", "paths"),
        format_age(last.elapsed_ms)
    )
}

/// The status for people: a header, then a table of targets per group, then notes (errors,
/// verification results) below each table.
pub fn render(s: &StatusSnapshot, now_unix_ms: u64) -> String {
    let mut out = String::new();
    let uptime = if s.started_unix_ms == 0 {
        "-".to_owned()
    } else {
        format_age(now_unix_ms.saturating_sub(s.started_unix_ms))
    };
    let _ = writeln!(
        out,
        "watcher {}  pid {}  backend {}  up {}",
        if s.version.is_empty() {
            "?"
        } else {
            &s.version
        },
        s.pid,
        if s.backend.is_empty() {
            "?"
        } else {
            &s.backend
        },
        uptime
    );
    let _ = writeln!(
        out,
        "events {} under the roots, {:.1}/s ({} read by the backend)  overflows {}  rescans {}",
        s.events_total, s.events_per_sec, s.backend_events_total, s.overflows, s.rescans
    );
    if s.groups.is_empty() {
        out.push_str("\nno source groups\n");
    }
    const HEADER: [&str; 10] = [
        "TARGET",
        "STATE",
        "DIRTY",
        "OLDEST",
        "IN FLIGHT",
        "LAST SYNC",
        "RUNS",
        "RETRIES",
        "FAILS",
        "DEST",
    ];
    // Numeric columns are right-aligned.
    const RIGHT: [bool; 10] = [
        false, false, true, true, true, false, true, true, true, false,
    ];
    for group in &s.groups {
        out.push('\n');
        if group.name.is_empty() || group.name == group.source {
            let _ = writeln!(out, "{}", printable(&group.source));
        } else {
            let _ = writeln!(
                out,
                "{}: {}",
                printable(&group.name),
                printable(&group.source)
            );
        }
        if group.targets.is_empty() {
            out.push_str("  (no targets)\n");
            continue;
        }
        let mut rows: Vec<[String; 10]> = vec![HEADER.map(str::to_owned)];
        let mut notes = Vec::new();
        for t in &group.targets {
            let name = printable(&t.name);
            rows.push([
                name.clone(),
                t.state.human().to_owned(),
                t.dirty_paths.to_string(),
                t.oldest_unsynced_ms
                    .map_or_else(|| "-".to_owned(), format_age),
                t.in_flight_paths.to_string(),
                t.last_sync
                    .as_ref()
                    .map_or_else(|| "never".to_owned(), |l| last_sync_text(l, now_unix_ms)),
                t.rsync_runs.to_string(),
                t.retries_total.to_string(),
                t.consecutive_failures.to_string(),
                printable(&t.dest),
            ]);
            if let Some(last) = &t.last_sync
                && !last.detail.is_empty()
                && (!last.ok || t.state == TargetState::Failed)
            {
                notes.push(format!("{name}: {}", one_line(&last.detail)));
            }
            if t.failing_paths_total > 0 {
                notes.push(format!(
                    "{name}: {} {} set aside (rsync fails on {}; retried with backoff):",
                    t.failing_paths_total,
                    if t.failing_paths_total == 1 {
                        "path"
                    } else {
                        "paths"
                    },
                    if t.failing_paths_total == 1 {
                        "it"
                    } else {
                        "them"
                    },
                ));
                for f in &t.failing_paths {
                    notes.push(format!(
                        "  {}: {} (since {}, {} {})",
                        printable(&f.path),
                        one_line(&f.error),
                        ago(now_unix_ms, f.since_unix_ms),
                        f.failures,
                        if f.failures == 1 { "try" } else { "tries" }
                    ));
                }
                let hidden = t
                    .failing_paths_total
                    .saturating_sub(t.failing_paths.len() as u64);
                if hidden > 0 {
                    notes.push(format!("  ... and {hidden} more"));
                }
            }
            if let Some(c) = &t.ssh {
                notes.push(format!(
                    "{name}: ssh connection {}{}, {} reconnects",
                    if c.up { "up" } else { "down" },
                    c.since_unix_ms
                        .map_or_else(String::new, |at| format!(" since {}", ago(now_unix_ms, at))),
                    c.reconnects
                ));
            }
            if let Some(v) = &t.verify {
                notes.push(format!(
                    "{name}: verified {}: {}, {} fixed",
                    ago(now_unix_ms, v.finished_unix_ms),
                    if v.ok { "ok" } else { "failed" },
                    crate::words::counted(v.fixed_paths, "path", "paths")
                ));
            }
        }
        let mut widths = [0usize; 10];
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        for row in &rows {
            let mut line = String::from(" ");
            for (i, cell) in row.iter().enumerate() {
                line.push(' ');
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else if RIGHT[i] {
                    let _ = write!(line, "{cell:>w$} ", w = widths[i]);
                } else {
                    let _ = write!(line, "{cell:<w$} ", w = widths[i]);
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        for note in notes {
            let _ = writeln!(out, "  {note}");
        }
    }
    out
}

/// Multi-line text (rsync's stderr, say) folded onto one line.
fn one_line(text: &str) -> String {
    let joined = text
        .split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ");
    printable(&joined)
}

/// `text` with control characters escaped, so a name cannot break the layout or send
/// escape sequences to the terminal.
fn printable(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_owned();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::snapshot::{FailingPath, NOW, sample};

    #[test]
    fn ages() {
        for (ms, want) in [
            (0, "0ms"),
            (999, "999ms"),
            (1_000, "1.0s"),
            (1_250, "1.2s"),
            (9_999, "9.9s"),
            (10_000, "10s"),
            (59_999, "59s"),
            (60_000, "1m"),
            (180_000, "3m"),
            (185_000, "3m05s"),
            (3_600_000, "1h"),
            (7_620_000, "2h07m"),
            (86_400_000, "1d"),
            (273_600_000, "3d04h"),
        ] {
            assert_eq!(format_age(ms), want, "{ms} ms");
        }
    }

    #[test]
    fn render_sample() {
        let text = render(&sample(), NOW);
        for want in [
            "watcher 0.1.0",
            "pid 4242",
            "backend fanotify",
            "up 1h",
            "events 123456 under the roots, 78.2/s (9876543 read by the backend)",
            "overflows 2",
            "rescans 3",
            "data: /srv/data",
            "TARGET",
            "LAST SYNC",
            "in step",
            "1.2s ago: ok (17 paths, 35ms)",
            "/backup/data",
            "retrying",
            "3m05s",
            "5.0s ago: failed, exit 10 (40 paths, 2.5s)",
            "backup::data",
            "remote \"eu\": rsync: failed to connect | connection refused",
            "local: verified 3m ago: ok, 0 paths fixed",
            "remote \"eu\": ssh connection down since 1m05s ago, 3 reconnects",
            "(no targets)",
            "we\\ird\\nname: /srv/other",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        // Table columns line up: the DIRTY values end where the header does.
        let lines: Vec<&str> = text.lines().collect();
        let header = lines.iter().find(|l| l.contains("TARGET")).unwrap();
        let retrying = lines.iter().find(|l| l.contains("retrying")).unwrap();
        let end = header.find("DIRTY").unwrap() + "DIRTY".len();
        assert_eq!(&retrying[end - 3..end], "120", "{header}\n{retrying}");
        assert!(text.lines().all(|l| l == l.trim_end()));
    }

    #[test]
    fn failing_paths_are_listed_under_their_target() {
        let mut s = sample();
        let t = &mut s.groups[0].targets[0];
        t.failing_paths = vec![FailingPath {
            path: "private/db".into(),
            error: "Permission denied (13)".into(),
            since_unix_ms: NOW - 120_000,
            failures: 3,
        }];
        t.failing_paths_total = 2;
        let text = render(&s, NOW);
        assert!(
            text.contains("local: 2 paths set aside (rsync fails on them; retried with backoff):"),
            "{text}"
        );
        assert!(
            text.contains("  private/db: Permission denied (13) (since 2m ago, 3 tries)"),
            "{text}"
        );
        assert!(text.contains("  ... and 1 more"), "{text}");
    }

    #[test]
    fn render_empty() {
        let text = render(&StatusSnapshot::default(), NOW);
        assert!(text.contains("up -"), "{text}");
        assert!(text.contains("no source groups"), "{text}");
    }
}
