//! `watcher status --wait-in-step`: asks the daemon until every target is in step, one
//! has failed for good, or the time is up.
//!
//! A script calls it right after changing the source, so "in step" only counts in a
//! snapshot taken [`SETTLE`] after the wait began: by then the daemon has read the changes
//! made before the call and shows their targets as syncing. The verdict on one snapshot
//! ([`in_step`]) is pure and tested on its own; [`wait_in_step`] only repeats the query.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use super::StatusError;
use super::snapshot::{StatusSnapshot, TargetState};
use super::socket::query;

/// How long after the wait began a snapshot must be taken for its "in step" to count.
pub const SETTLE: Duration = Duration::from_millis(500);
/// Pause between two queries.
const POLL: Duration = Duration::from_millis(200);
/// How long one query may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the targets of one snapshot stand as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InStep {
    /// Every target is in step (or there is none).
    All,
    /// These targets (`group/target: state`) are not in step yet.
    Waiting(Vec<String>),
    /// These targets stopped on a fatal error: they will not get in step without someone
    /// fixing them.
    Failed(Vec<String>),
    /// The snapshot is older than the wait (or the daemon has not published one yet): it
    /// may not show changes made just before.
    Stale,
}

/// The verdict on `s` for a wait that began at `since_unix_ms`.
pub fn in_step(s: &StatusSnapshot, since_unix_ms: u64) -> InStep {
    let targets = s
        .groups
        .iter()
        .flat_map(|g| g.targets.iter().map(move |t| (g, t)));
    let failed: Vec<String> = targets
        .clone()
        .filter(|(_, t)| t.state == TargetState::Failed)
        .map(|(g, t)| format!("{}/{}", g.name, t.name))
        .collect();
    if !failed.is_empty() {
        return InStep::Failed(failed);
    }
    if s.taken_unix_ms < since_unix_ms + SETTLE.as_millis() as u64 {
        return InStep::Stale;
    }
    let waiting: Vec<String> = targets
        .filter(|(_, t)| t.state != TargetState::InStep)
        .map(|(g, t)| {
            let mut text = format!("{}/{}: {}", g.name, t.name, t.state.human());
            if t.dirty_paths + t.in_flight_paths > 0 {
                let waiting = t.dirty_paths + t.in_flight_paths;
                let waiting = crate::words::counted(waiting, "path", "paths");
                text.push_str(&format!(", {waiting} waiting"));
            }
            text
        })
        .collect();
    if waiting.is_empty() {
        InStep::All
    } else {
        InStep::Waiting(waiting)
    }
}

/// Queries the daemon on `socket` until [`in_step`] says all targets are in step or one
/// has failed, or `timeout` (if any) has passed. Returns the last snapshot and its verdict;
/// an error when the daemon does not answer.
pub fn wait_in_step(
    socket: &Path,
    timeout: Option<Duration>,
) -> Result<(StatusSnapshot, InStep), StatusError> {
    let start = Instant::now();
    let unix_ms = || {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    };
    let since = unix_ms();
    loop {
        let mut snapshot = query(socket, QUERY_TIMEOUT)?;
        if snapshot.taken_unix_ms == 0 && snapshot.pid != 0 {
            // A daemon from before snapshots carried their time: it refreshes them every
            // 200 ms, so this one is at most that old.
            snapshot.taken_unix_ms = unix_ms().saturating_sub(200);
        }
        let verdict = in_step(&snapshot, since);
        if matches!(verdict, InStep::All | InStep::Failed(_)) {
            return Ok((snapshot, verdict));
        }
        let pause = match timeout {
            Some(t) => {
                let left = t.saturating_sub(start.elapsed());
                if left.is_zero() {
                    return Ok((snapshot, verdict));
                }
                left.min(POLL)
            }
            None => POLL,
        };
        std::thread::sleep(pause);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::snapshot::{GroupStatus, TargetStatus};

    fn snapshot(taken_unix_ms: u64, targets: &[(&str, TargetState, u64)]) -> StatusSnapshot {
        StatusSnapshot {
            pid: 1,
            taken_unix_ms,
            groups: vec![GroupStatus {
                name: "data".into(),
                source: "/srv/data".into(),
                targets: targets
                    .iter()
                    .map(|&(name, state, dirty)| TargetStatus {
                        name: name.into(),
                        state,
                        dirty_paths: dirty,
                        ..TargetStatus::default()
                    })
                    .collect(),
            }],
            ..StatusSnapshot::default()
        }
    }

    #[test]
    fn verdicts() {
        use TargetState as T;
        const SINCE: u64 = 1_000_000;
        const FRESH: u64 = SINCE + 500;
        let waiting = |v: &[&str]| InStep::Waiting(v.iter().map(|s| s.to_string()).collect());
        // (snapshot taken, targets as (name, state, dirty paths), verdict)
        type Targets<'a> = &'a [(&'a str, TargetState, u64)];
        let table: &[(u64, Targets, InStep)] = &[
            (
                FRESH,
                &[("a", T::InStep, 0), ("b", T::InStep, 0)],
                InStep::All,
            ),
            (FRESH, &[], InStep::All),
            // Taken too soon after the wait began: changes just made may not show yet.
            (FRESH - 1, &[("a", T::InStep, 0)], InStep::Stale),
            (SINCE - 10_000, &[("a", T::InStep, 0)], InStep::Stale),
            // The daemon's placeholder before its first snapshot.
            (0, &[], InStep::Stale),
            (
                FRESH,
                &[
                    ("a", T::InStep, 0),
                    ("b", T::Syncing, 12),
                    ("c", T::InitialSync, 0),
                ],
                waiting(&["data/b: syncing, 12 paths waiting", "data/c: initial sync"]),
            ),
            (
                FRESH,
                &[("a", T::Retrying, 3)],
                waiting(&["data/a: retrying, 3 paths waiting"]),
            ),
            // A failed target ends the wait, even in a stale snapshot: it will not recover.
            (
                FRESH,
                &[("a", T::Syncing, 1), ("b", T::Failed, 0)],
                InStep::Failed(vec!["data/b".into()]),
            ),
            (
                0,
                &[("b", T::Failed, 0)],
                InStep::Failed(vec!["data/b".into()]),
            ),
        ];
        for (taken, targets, want) in table {
            assert_eq!(
                &in_step(&snapshot(*taken, targets), SINCE),
                want,
                "{taken} {targets:?}"
            );
        }
    }
}
