//! Paths rsync keeps failing on (exit 23: an unreadable directory, EIO, a name the target
//! cannot hold), set aside so everything else keeps syncing: pure, the clock passed in.
//!
//! A partial transfer that rsync explains path by path is not a failure of the target.
//! Every error line of the run must name a path under the root (or the replica): then
//! those paths are set aside, excluded from the target's runs (rsync keeps the replica's
//! copy of an excluded path and, without the I/O error, carries out deletions again),
//! and the batch is run once more without them. A path set aside is tried again after a
//! backoff (1 s doubling to [`MAX_BACKOFF`]); when a batch carrying it succeeds, it is
//! back in step. A run whose errors cannot all be tied to a path is an ordinary failure,
//! so nothing is ever skipped that rsync did not name.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

/// First wait before a path set aside is tried again: longer than the batch's own quick
/// re-run, which must go without it.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait between two tries of a path set aside.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// One path rsync failed on, and why, as it said it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Relative to the source root.
    pub path: PathBuf,
    /// rsync's words after the path, e.g. `Permission denied (13)`.
    pub error: String,
}

/// The paths an exit-23 run failed on, from rsync's stderr; None when some error line
/// names no path this target can place (then nothing may be set aside).
///
/// `root` is the source root; `dest` the local replica directory, if the target is local
/// (receiver-side messages name replica paths; a remote receiver names them relative to
/// the transfer root).
pub fn parse(stderr: &str, root: &Path, dest: Option<&Path>) -> Option<Vec<Failure>> {
    let mut out: Vec<Failure> = Vec::new();
    for line in stderr.lines() {
        let line = line.trim_start();
        let Some(rest) = line.strip_prefix("rsync: ") else {
            continue;
        };
        // "[sender] ", "[receiver] ", "[generator] " (rsync 3.2+).
        let rest = match rest.strip_prefix('[').and_then(|r| r.split_once("] ")) {
            Some((_, tail)) => tail,
            None => rest,
        };
        let (raw, after) = quoted(rest).or_else(|| parenthesized(rest))?;
        let temp = rest.contains("mkstemp") || rest.contains("rename ");
        let path = place(&unescape(raw), root, dest, temp)?;
        let error = match after.rfind("failed: ") {
            Some(i) => &after[i + "failed: ".len()..],
            None => after.trim_start_matches([':', ' ']),
        };
        if !out.iter().any(|f| f.path == path) {
            out.push(Failure {
                path,
                error: error.trim().to_string(),
            });
        }
    }
    (!out.is_empty()).then_some(out)
}

/// The first `"..."` of a message and what follows it.
fn quoted(text: &str) -> Option<(&str, &str)> {
    let start = text.find('"')? + 1;
    let len = text[start..].find('"')?;
    Some((&text[start..start + len], &text[start + len + 1..]))
}

/// `unlink(PATH)` / `rmdir(PATH)` of rsync's deletion messages.
fn parenthesized(text: &str) -> Option<(&str, &str)> {
    let start = ["unlink(", "rmdir("]
        .iter()
        .find_map(|op| text.find(op).map(|i| i + op.len()))?;
    let len = text[start..].rfind(") ")?;
    Some((&text[start..start + len], &text[start + len + 1..]))
}

/// rsync prints unprintable bytes as `\#ooo` (octal).
fn unescape(raw: &str) -> Vec<u8> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && bytes.get(i + 1) == Some(&b'#')
            && let Some(octal) = bytes.get(i + 2..i + 5)
            && octal.iter().all(|b| (b'0'..=b'7').contains(b))
        {
            out.push(
                octal
                    .iter()
                    .fold(0u8, |n, b| n.wrapping_mul(8) + (b - b'0')),
            );
            i += 5;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// The root-relative path a message names: a source path, a replica path, or one relative
/// to the transfer root; a receiver's temporary file `.NAME.XXXXXX` stands for `NAME`.
fn place(raw: &[u8], root: &Path, dest: Option<&Path>, temp: bool) -> Option<PathBuf> {
    let named = Path::new(OsStr::from_bytes(raw));
    let rel = if named.is_absolute() {
        let clean: PathBuf = named
            .components()
            .filter(|c| *c != Component::CurDir)
            .collect();
        match clean.strip_prefix(root) {
            Ok(rel) => rel.to_path_buf(),
            Err(_) => clean.strip_prefix(dest?).ok()?.to_path_buf(),
        }
    } else {
        named
            .components()
            .filter(|c| *c != Component::CurDir)
            .collect()
    };
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return None;
    }
    let rel = if temp { real_name(&rel) } else { rel };
    // The root itself cannot be set aside.
    (!rel.as_os_str().is_empty()).then_some(rel)
}

/// `dir/.NAME.XXXXXX` (rsync's temporary file) -> `dir/NAME`.
fn real_name(rel: &Path) -> PathBuf {
    let Some(name) = rel.file_name().map(OsStr::as_bytes) else {
        return rel.to_path_buf();
    };
    let stripped = name.strip_prefix(b".").and_then(|n| {
        let dot = n.iter().rposition(|&b| b == b'.')?;
        let suffix = &n[dot + 1..];
        (dot > 0 && suffix.len() == 6 && suffix.iter().all(u8::is_ascii_alphanumeric))
            .then(|| &n[..dot])
    });
    match stripped {
        Some(real) => rel.with_file_name(OsStr::from_bytes(real)),
        None => rel.to_path_buf(),
    }
}

/// An rsync exclude pattern matching exactly `rel` (anchored at the transfer root).
/// Wildcard characters are escaped; rsync reads backslashes as escapes only in patterns
/// that hold a wildcard, so plain names stay as they are. None for a name that is not
/// UTF-8 (the patterns travel as strings).
pub fn exclude_pattern(rel: &Path) -> Option<String> {
    let text = rel.to_str()?;
    let escaped = if text.contains(['*', '?', '[']) {
        let mut s = String::with_capacity(text.len() + 4);
        for c in text.chars() {
            if matches!(c, '*' | '?' | '[' | '\\') {
                s.push('\\');
            }
            s.push(c);
        }
        s
    } else {
        text.to_string()
    };
    Some(format!("/{escaped}"))
}

/// One path set aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetAside {
    pub error: String,
    /// When it first failed (unix milliseconds, for status).
    pub since_unix_ms: u64,
    /// Failed tries in a row.
    pub failures: u32,
    /// Tried again from this instant on.
    retry_at: Instant,
    /// Being tried again: no longer excluded, and carried by the next batch.
    on_trial: bool,
}

/// What changed in the set, for logs that say each change once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A path that synced fails now: set aside.
    SetAside(PathBuf, String),
    /// A path set aside failed again when tried.
    StillFailing(PathBuf, String),
    /// A path set aside synced when tried.
    Recovered(PathBuf),
}

/// The paths one target sets aside.
#[derive(Debug, Clone, Default)]
pub struct FailingPaths {
    paths: BTreeMap<PathBuf, SetAside>,
    /// Paths on trial that the batch in flight carries.
    in_flight: Vec<PathBuf>,
}

impl FailingPaths {
    /// Takes in the failures of a partial run. Returns whether the batch should simply run
    /// again without them (some path was newly set aside, so that run can do better), and
    /// the changes to log.
    pub fn failed(
        &mut self,
        now: Instant,
        now_unix_ms: u64,
        failures: &[Failure],
    ) -> (bool, Vec<Change>) {
        let mut changes = Vec::new();
        let mut newly = false;
        for f in failures {
            match self.paths.get_mut(&f.path) {
                Some(entry) if entry.on_trial => {
                    entry.on_trial = false;
                    entry.failures += 1;
                    entry.error = f.error.clone();
                    entry.retry_at = after(now, wait_after(&f.error, entry.failures));
                    newly = true;
                    changes.push(Change::StillFailing(f.path.clone(), f.error.clone()));
                }
                // Already excluded: rsync cannot have failed on it in this run.
                Some(_) => {}
                None => {
                    self.paths.insert(
                        f.path.clone(),
                        SetAside {
                            error: f.error.clone(),
                            since_unix_ms: now_unix_ms,
                            failures: 1,
                            retry_at: after(now, wait_after(&f.error, 1)),
                            on_trial: false,
                        },
                    );
                    newly = true;
                    changes.push(Change::SetAside(f.path.clone(), f.error.clone()));
                }
            }
        }
        // Paths on trial in this batch that rsync did not name synced.
        for path in std::mem::take(&mut self.in_flight) {
            if self.paths.get(&path).is_some_and(|e| e.on_trial) {
                self.paths.remove(&path);
                changes.push(Change::Recovered(path));
            }
        }
        (newly, changes)
    }

    /// A batch synced: the paths on trial it carried are in step again.
    pub fn synced(&mut self) -> Vec<Change> {
        let mut changes = Vec::new();
        for path in std::mem::take(&mut self.in_flight) {
            if self.paths.get(&path).is_some_and(|e| e.on_trial) {
                self.paths.remove(&path);
                changes.push(Change::Recovered(path));
            }
        }
        changes
    }

    /// A batch did not sync for another reason: what it carried stays on trial.
    pub fn not_synced(&mut self) {
        self.in_flight.clear();
    }

    /// Paths whose wait is over: put on trial (no longer excluded); the caller marks them
    /// dirty so the next batch carries them.
    pub fn due(&mut self, now: Instant) -> Vec<PathBuf> {
        let mut due = Vec::new();
        for (path, entry) in &mut self.paths {
            if !entry.on_trial && entry.retry_at <= now {
                entry.on_trial = true;
                due.push(path.clone());
            }
        }
        due
    }

    /// A batch starts: the paths on trial go with it.
    pub fn batch_started(&mut self) {
        self.in_flight = self
            .paths
            .iter()
            .filter(|(_, e)| e.on_trial)
            .map(|(p, _)| p.clone())
            .collect();
    }

    /// When the next path's wait is over.
    pub fn next_due(&self) -> Option<Instant> {
        self.paths
            .values()
            .filter(|e| !e.on_trial)
            .map(|e| e.retry_at)
            .min()
    }

    /// The paths set aside and not on trial: kept out of the target's runs.
    pub fn held(&self) -> Vec<PathBuf> {
        self.paths
            .iter()
            .filter(|(_, e)| !e.on_trial)
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Every path set aside, in path order.
    pub fn iter(&self) -> impl Iterator<Item = (&PathBuf, &SetAside)> {
        self.paths.iter()
    }

    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }
}

fn backoff(failures: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(MAX_BACKOFF)
}

/// Tries of a type-change race at the first wait before it backs off like any failure.
const RACE_QUICK_TRIES: u32 = 5;

/// The wait before a path that failed `failures` times in a row with `error` is tried
/// again. A path whose type changed under rsync (`Is a directory`, `Not a directory`: a
/// file became a directory or the other way while it ran) raced with the source, and its
/// next try usually syncs: it is tried again at the first wait a few times, so a replica
/// under churn is not left waiting minutes for it, before it backs off like any failure.
fn wait_after(error: &str, failures: u32) -> Duration {
    let race = error.ends_with("(21)") || error.ends_with("(20)");
    match failures.checked_sub(RACE_QUICK_TRIES) {
        _ if !race => backoff(failures),
        None | Some(0) => FIRST_BACKOFF,
        Some(beyond) => backoff(beyond + 1),
    }
}

fn after(t: Instant, d: Duration) -> Instant {
    t.checked_add(d).unwrap_or(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(path: &str, error: &str) -> Failure {
        Failure {
            path: path.into(),
            error: error.into(),
        }
    }

    #[test]
    fn rsync_messages_name_root_relative_paths() {
        let root = Path::new("/srv/src");
        let dest = Path::new("/mnt/replica");
        /// stderr, the replica directory (local targets), what must come out.
        type Case<'a> = (&'a str, Option<&'a Path>, Option<Vec<Failure>>);
        let table: &[Case] = &[
            (
                "rsync: [sender] opendir \"/srv/src/./secret\" failed: Permission denied (13)\n\
                 IO error encountered -- skipping file deletion\n\
                 rsync error: some files/attrs were not transferred (see previous errors) (code 23) at main.c(1338) [sender=3.2.7]",
                Some(dest),
                Some(vec![failure("secret", "Permission denied (13)")]),
            ),
            (
                "rsync: [sender] send_files failed to open \"/srv/src/d/f\": Permission denied (13)\n\
                 rsync: [sender] read errors mapping \"/srv/src/d/g\": Input/output error (5)",
                Some(dest),
                Some(vec![
                    failure("d/f", "Permission denied (13)"),
                    failure("d/g", "Input/output error (5)"),
                ]),
            ),
            // Receiver side: the temporary file stands for the file it would become.
            (
                "rsync: [receiver] mkstemp \"/mnt/replica/d/.long.AbC123\" failed: File name too long (36)",
                Some(dest),
                Some(vec![failure("d/long", "File name too long (36)")]),
            ),
            // A remote receiver names paths relative to the transfer root.
            (
                "rsync: [receiver] mkstemp \"d/.x.q1w2e3\" failed: Invalid argument (22)\n\
                 rsync: [generator] delete_file: unlink(old/f) failed: Permission denied (13)",
                None,
                Some(vec![
                    failure("d/x", "Invalid argument (22)"),
                    failure("old/f", "Permission denied (13)"),
                ]),
            ),
            // Unprintable bytes come escaped.
            (
                "rsync: [sender] opendir \"/srv/src/a\\#012b\" failed: Permission denied (13)",
                Some(dest),
                Some(vec![failure("a\nb", "Permission denied (13)")]),
            ),
            // A line that names no path, or a path elsewhere: nothing may be set aside.
            (
                "rsync: [sender] opendir \"/srv/src/x\" failed: Permission denied (13)\n\
                 rsync: connection unexpectedly closed (0 bytes received so far) [sender]",
                Some(dest),
                None,
            ),
            (
                "rsync: [sender] opendir \"/etc/x\" failed: Permission denied (13)",
                Some(dest),
                None,
            ),
            // The root itself cannot be set aside.
            (
                "rsync: [sender] opendir \"/srv/src/.\" failed: Permission denied (13)",
                Some(dest),
                None,
            ),
            (
                "rsync error: some files could not be transferred (code 23)",
                Some(dest),
                None,
            ),
        ];
        for (stderr, dest, want) in table {
            assert_eq!(&parse(stderr, root, *dest), want, "{stderr}");
        }
    }

    #[test]
    fn exclude_patterns_match_exactly_one_path() {
        let table = [
            ("d/f", "/d/f"),
            ("a b/c", "/a b/c"),
            ("x*y", "/x\\*y"),
            ("q?[z]\\w", "/q\\?\\[z]\\\\w"),
            ("back\\slash", "/back\\slash"),
        ];
        for (rel, want) in table {
            assert_eq!(
                exclude_pattern(Path::new(rel)).as_deref(),
                Some(want),
                "{rel}"
            );
        }
    }

    #[test]
    fn paths_set_aside_are_tried_again_with_backoff_until_they_sync() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut set = FailingPaths::default();
        let (rerun, changes) = set.failed(ms(0), 1_000, &[failure("bad", "EIO")]);
        assert!(
            rerun,
            "a newly failing path makes the batch run again without it"
        );
        assert_eq!(changes, vec![Change::SetAside("bad".into(), "EIO".into())]);
        assert_eq!(set.held(), vec![PathBuf::from("bad")]);
        assert_eq!(set.next_due(), Some(ms(1_000)));
        assert!(set.due(ms(999)).is_empty());
        // Tried again: no longer excluded, carried by the next batch, fails again.
        assert_eq!(set.due(ms(1_000)), vec![PathBuf::from("bad")]);
        assert!(set.held().is_empty());
        set.batch_started();
        let (rerun, changes) = set.failed(ms(1_100), 2_000, &[failure("bad", "EIO again")]);
        assert!(rerun);
        assert_eq!(
            changes,
            vec![Change::StillFailing("bad".into(), "EIO again".into())]
        );
        assert_eq!(set.next_due(), Some(ms(3_100)), "the wait doubles");
        let (_, entry) = set.iter().next().unwrap();
        assert_eq!((entry.failures, entry.since_unix_ms), (2, 1_000));
        // The same failure reported while excluded changes nothing and asks no re-run.
        assert!(!set.failed(ms(1_200), 3_000, &[failure("bad", "x")]).0);
        // Tried again, and the batch succeeds: back in step.
        assert_eq!(set.due(ms(3_100)).len(), 1);
        set.batch_started();
        assert_eq!(set.synced(), vec![Change::Recovered("bad".into())]);
        assert!(set.is_empty() && set.next_due().is_none());
    }

    #[test]
    fn a_trial_survives_a_batch_that_failed_otherwise() {
        let t0 = Instant::now();
        let mut set = FailingPaths::default();
        set.failed(t0, 0, &[failure("bad", "EIO")]);
        set.due(t0 + MAX_BACKOFF);
        set.batch_started();
        set.not_synced();
        assert_eq!(set.len(), 1);
        assert!(set.held().is_empty(), "still on trial");
        // A later partial run that names another path: the trial path synced.
        set.batch_started();
        let (_, changes) = set.failed(t0 + MAX_BACKOFF, 0, &[failure("other", "EACCES")]);
        assert!(changes.contains(&Change::Recovered("bad".into())));
        assert_eq!(set.held(), vec![PathBuf::from("other")]);
    }

    #[test]
    fn backoff_is_capped() {
        assert_eq!(backoff(1), FIRST_BACKOFF);
        assert_eq!(backoff(3), Duration::from_secs(4));
        assert_eq!(backoff(40), MAX_BACKOFF);
    }

    #[test]
    fn a_type_change_race_is_tried_again_soon_before_it_backs_off() {
        let race = "Is a directory (21)";
        let waits: Vec<u64> = (1..=8).map(|n| wait_after(race, n).as_secs()).collect();
        assert_eq!(waits, [1, 1, 1, 1, 1, 2, 4, 8]);
        assert_eq!(wait_after("Not a directory (20)", 3), FIRST_BACKOFF);
        let lasting = "Permission denied (13)";
        let waits: Vec<u64> = (1..=4).map(|n| wait_after(lasting, n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8]);
    }
}
