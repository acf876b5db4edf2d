//! Runs one batch for one target: plans its rsync runs, runs them one after the other, and
//! reports how the batch ended.
//!
//! A batch is at most two runs (subtrees, then entries); the first run that does not
//! succeed ends the batch, and the whole batch goes back to the target's state machine,
//! which decides what happens to it. Planning reads the source (which paths are directories
//! now), so it runs on a blocking thread.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::backend::OwnPids;
use crate::dirty::Batch;
use crate::failing::{self, Failure};
use crate::link_walk::Links as HardLinks;
use crate::rsync::{self, ExitClass, RsyncOptions, TransferStats};
use crate::ssh;
use crate::sync_machine::{Finished, FlushKind};
use crate::target::Target;

/// How often a long whole-tree run reports progress in the log.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// What one target's batch needs to run.
#[derive(Debug, Clone)]
pub struct Job {
    /// Which target (its index in the engine), reported back.
    pub target: usize,
    pub kind: FlushKind,
    /// When the engine took in the oldest change of the batch (None: a retry, a verify).
    pub first_change: Option<Instant>,
    pub batch: Batch,
    pub root: PathBuf,
    pub dest: Target,
    pub opts: RsyncOptions,
    /// Exclude patterns for paths set aside (see [`crate::failing`]), on top of the
    /// target's own.
    pub set_aside: Vec<PathBuf>,
    /// When this turns true, the rsync run in flight is stopped (SIGTERM) and the batch
    /// ends as stopped: set for verify passes, which an exit does not wait for.
    pub stop: Option<watch::Receiver<bool>>,
    /// Renames (old, new, root-relative) since the last batch, in order: replayed on a
    /// local replica before rsync runs, so rsync finds the data in place.
    pub renames: Vec<(PathBuf, PathBuf)>,
    /// The shared connection of an ssh target.
    pub link: Option<Arc<ssh::Link>>,
    /// The group's hard-link index: every name of a multi-link file goes in one run.
    pub hard_links: Arc<HardLinks>,
    /// The target's rsync started ahead of its next lone change (None: not for this
    /// batch, a verify pass or a dry run).
    pub standby: Option<Arc<rsync::Standby>>,
}

/// How a batch ended.
pub struct Done {
    pub target: usize,
    pub kind: FlushKind,
    pub batch: Batch,
    pub class: ExitClass,
    pub code: Option<i32>,
    /// An rsync run was killed by a signal.
    pub killed: bool,
    /// The batch was stopped through [`Job::stop`].
    pub stopped: bool,
    /// What went wrong, for the log (empty on success).
    pub detail: String,
    pub runs: u64,
    /// Paths rsync itemized (verify passes count repairs this way).
    pub itemized: u64,
    /// The first itemized lines of the runs (`>f..t...... path`), for the log.
    pub itemized_lines: Vec<String>,
    /// The bytes the runs moved, summed.
    pub transfer: TransferStats,
    /// How long each rsync process ran, in order (one per run that started).
    pub run_times: Vec<Duration>,
    pub elapsed: Duration,
    /// A partial transfer (23) that named each path it failed on.
    pub failures: Option<Vec<Failure>>,
}

impl Done {
    /// What the target's state machine needs to know.
    pub fn finished(&self) -> Finished {
        Finished {
            kind: self.kind,
            class: self.class,
            code: self.code,
            killed: self.killed,
            covers_root: self.batch.covers_root(),
            set_aside: false,
        }
    }
}

/// Whether `path` is a directory now (not following a symlink).
pub fn is_dir(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir())
}

/// Runs the rsync processes for one batch; stops at the first run that fails, except for a
/// partial transfer (23): the later runs still go, because a path that keeps failing in one
/// run (a file turned into a directory under churn) must not hold back the others, such as
/// the run of lone changes after a subtree run. The batch then ends as that partial
/// transfer, with the failing paths of every run.
pub async fn run(job: Job, own_pids: Arc<OwnPids>) -> Done {
    let started = Instant::now();
    let Job {
        target,
        kind,
        first_change,
        batch,
        root,
        dest,
        mut opts,
        set_aside,
        stop,
        renames,
        link,
        hard_links,
        standby,
    } = job;
    opts.excludes
        .extend(set_aside.iter().filter_map(|p| failing::exclude_pattern(p)));
    // A master that died (its socket left behind) is cleaned up, so this run's ssh makes
    // a new one.
    if let Some(link) = &link {
        link.observe();
    }
    let mut done = Done {
        target,
        kind,
        batch,
        class: ExitClass::Success,
        code: Some(0),
        killed: false,
        stopped: false,
        detail: String::new(),
        runs: 0,
        itemized: 0,
        itemized_lines: Vec::new(),
        transfer: TransferStats::default(),
        run_times: Vec::new(),
        elapsed: Duration::ZERO,
        failures: None,
    };
    if !renames.is_empty() && !opts.dry_run {
        let count = renames.len();
        // A local replica is renamed here, an ssh one over its connection; an rsync daemon
        // gets runs that find the data in place.
        let replay: Option<Box<dyn FnOnce() -> usize + Send>> = match (&dest, &link) {
            (Target::Local(replica), _) => {
                let replica = replica.clone();
                Some(Box::new(move || crate::replay::local(&replica, &renames)))
            }
            (Target::Remote(_), Some(link)) => {
                let link = link.clone();
                Some(Box::new(move || crate::replay::ssh(&link, &renames)))
            }
            (Target::Remote(_), None) if dest.kind() == crate::target::TargetKind::Daemon => {
                let runs = {
                    let (root, dest, opts) = (root.clone(), dest.rsync_arg(), opts.clone());
                    tokio::task::spawn_blocking(move || {
                        crate::replay::daemon::plan(&root, &dest, &opts, &renames, found)
                    })
                    .await
                    .unwrap_or_default()
                };
                let replayed = daemon_replay(runs, &dest, &opts, &own_pids, &stop, &mut done).await;
                Some(Box::new(move || replayed))
            }
            (Target::Remote(_), None) => None,
        };
        if let Some(replay) = replay {
            let replayed = tokio::task::spawn_blocking(replay).await.unwrap_or(0);
            if replayed > 0 {
                tracing::info!(target = %dest, renames = count, replayed, "renames replayed on the replica");
            }
        }
    }
    let planned = {
        let batch = done.batch.clone();
        let (root, dest, opts) = (root.clone(), dest.clone(), opts.clone());
        tokio::task::spawn_blocking(move || {
            // Excluded, a path below one set aside would still bring it into the run as
            // that path's implied parent directory, failing the same way again.
            let batch = hard_links.expand(&batch).without_below(&set_aside);
            rsync::plan(&batch, &root, &dest, &opts, is_dir)
        })
        .await
    };
    let planned_at = Instant::now();
    let mut runs = match planned {
        Ok(runs) => runs,
        Err(e) => {
            done.class = ExitClass::Transient;
            done.detail = format!("planning the batch failed: {e}");
            return done;
        }
    };
    let whole_tree = done.batch.covers_root();
    let verify = kind == FlushKind::Verify;
    rsync::report(&mut runs, verify, whole_tree, &opts);
    let label = match kind {
        FlushKind::Verify => "verify",
        FlushKind::Changes if whole_tree => "full sync",
        FlushKind::Changes => "batch",
    };
    // Set by a partial transfer: the failing paths of the runs so far (None when one of
    // them did not name its paths).
    let mut partial: Option<Option<Vec<Failure>>> = None;
    // Runs that found their rsync started ahead (see `rsync::Standby`).
    let mut started_ahead = 0u64;
    for run in &runs {
        let progress =
            whole_tree.then(|| rsync::Progress::new(label, dest.to_string(), PROGRESS_EVERY));
        // A local run only waits on itself; a remote one may wait on a slow peer.
        let stall_after =
            (opts.hardlinks && matches!(dest, Target::Local(_))).then_some(rsync::STALL_AFTER);
        // -v: what runs, on how many paths, as it could be typed again.
        tracing::debug!(target = %dest, run = label, paths = run.paths, command = %rsync::display_args(&opts.binary, &run.args), "running rsync");
        let waiting = standby.as_ref().and_then(|s| s.take(&run.args));
        started_ahead += u64::from(waiting.is_some());
        let spawned = match waiting {
            Some(spawned) => Ok(spawned),
            None => rsync::spawn(&opts.binary, &run.args, !run.stdin.is_empty(), &own_pids),
        };
        let result = match spawned {
            Ok(spawned) => {
                let (keep, stop) = (verify || opts.dry_run, stop.clone());
                rsync::drive(spawned, run, &own_pids, keep, progress, stop, stall_after).await
            }
            Err(e) => Err(e),
        };
        done.runs += 1;
        if stop.as_ref().is_some_and(|s| *s.borrow()) {
            done.stopped = true;
            done.class = ExitClass::Transient;
            done.code = result.as_ref().ok().and_then(|r| r.code);
            done.detail = "stopped".into();
            break;
        }
        match result {
            Ok(r) => {
                tracing::info!(
                    target = %dest,
                    paths = run.paths,
                    code = r.code,
                    elapsed_ms = r.elapsed.as_millis() as u64,
                    sent_bytes = r.transfer.sent,
                    "rsync finished"
                );
                done.itemized += r.itemized;
                let room = rsync::ITEMIZED_KEPT.saturating_sub(done.itemized_lines.len());
                done.itemized_lines
                    .extend(r.itemized_lines.into_iter().take(room));
                done.transfer.add(r.transfer);
                done.run_times.push(r.elapsed);
                if opts.dry_run {
                    for line in r.stdout.lines() {
                        tracing::info!(target = %dest, "dry run: {line}");
                    }
                }
                // A later run that succeeds does not hide an earlier partial transfer.
                if partial.is_none() || r.class != ExitClass::Success {
                    done.code = r.code;
                }
                done.killed = r.code.is_none();
                if r.class != ExitClass::Success {
                    let is_partial = r.code == Some(23);
                    if is_partial {
                        let local = match &dest {
                            Target::Local(dir) => Some(dir.as_path()),
                            Target::Remote(_) => None,
                        };
                        let found = failing::parse(&r.stderr, &root, local);
                        partial = Some(match (partial.take(), found) {
                            // Every run so far named its failing paths.
                            (None, Some(found)) => Some(found),
                            (Some(Some(mut all)), Some(found)) => {
                                all.extend(found);
                                Some(all)
                            }
                            _ => None,
                        });
                    }
                    done.class = r.class;
                    // ssh's own words ("Connection refused", "Permission denied") name the
                    // cause better than rsync's exit code.
                    let cause = link
                        .as_ref()
                        .and_then(|l| ssh::diagnose(l.label(), &r.stderr))
                        .map(|e| format!("{e}; "))
                        .unwrap_or_default();
                    done.detail = cause
                        + &failure_detail(
                            r.code,
                            &r.stderr,
                            &rsync::display_args(&opts.binary, &run.args),
                        );
                    if is_partial {
                        continue;
                    }
                    // A failure of another kind decides how the batch ended.
                    partial = None;
                    break;
                }
                if !r.stderr.is_empty() {
                    tracing::debug!(target = %dest, stderr = %r.stderr, "rsync warnings");
                }
            }
            Err(e) => {
                done.class = ExitClass::Transient;
                done.code = None;
                done.detail = format!("cannot run {}: {e}", opts.binary.display());
                partial = None;
                break;
            }
        }
    }
    if let Some(failures) = partial
        && !done.stopped
    {
        // The batch ends as its partial transfer, whatever the later runs did.
        done.code = Some(23);
        done.class = rsync::classify(Some(23));
        done.failures = failures;
    }
    if let Some(link) = &link {
        link.observe();
    }
    // The next lone change finds its rsync started, unless this batch failed (a target
    // that is down would only make it fail again).
    if let Some(standby) = &standby
        && done.class == ExitClass::Success
        && !done.stopped
    {
        let args = rsync::lone_change_args(&root, &dest, &opts);
        standby.prepare(&opts.binary, args, &own_pids);
    }
    done.elapsed = started.elapsed();
    // Where a batch's latency goes, for `cargo xtask bench latency` (at debug: one line
    // per batch). Times are CLOCK_MONOTONIC microseconds, comparable across processes.
    if let Some(first) = first_change {
        let us = |d: Duration| d.as_micros() as u64;
        tracing::debug!(
            target = %dest,
            seen_mono_us = monotonic_us(first),
            queued_us = us(started.saturating_duration_since(first)),
            plan_us = us(planned_at.saturating_duration_since(started)),
            rsync_us = us(done.run_times.iter().sum()),
            runs = done.runs,
            started_ahead,
            total_us = us(first.elapsed()),
            "batch timing"
        );
    }
    done
}

/// `at` on the CLOCK_MONOTONIC clock, in microseconds (what `Instant` reads on Linux).
fn monotonic_us(at: Instant) -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |ts| {
        ts.tv_sec() as u64 * 1_000_000 + ts.tv_nsec() as u64 / 1000
    });
    now.saturating_sub(at.elapsed().as_micros() as u64)
}

/// What a renamed source path is now, for [`crate::replay::daemon::plan`].
fn found(path: &Path) -> Option<crate::replay::daemon::Found> {
    use crate::replay::daemon::Found;
    let meta = std::fs::symlink_metadata(path).ok()?;
    Some(if meta.is_dir() {
        Found::Dir
    } else if meta.is_file() {
        Found::File { bytes: meta.len() }
    } else {
        Found::Other
    })
}

/// Runs the replays of an rsync-daemon target (see [`crate::replay::daemon`]); returns how
/// many succeeded. A failed one is only logged: the batch's runs copy instead.
async fn daemon_replay(
    mut runs: Vec<rsync::Run>,
    dest: &Target,
    opts: &RsyncOptions,
    own_pids: &Arc<OwnPids>,
    stop: &Option<watch::Receiver<bool>>,
    done: &mut Done,
) -> usize {
    rsync::report(&mut runs, false, false, opts);
    let mut replayed = 0;
    for run in &runs {
        let command = rsync::display_args(&opts.binary, &run.args);
        match rsync::execute(&opts.binary, run, own_pids, false, None, stop.clone(), None).await {
            Ok(r) => {
                done.runs += 1;
                done.transfer.add(r.transfer);
                done.run_times.push(r.elapsed);
                if r.class == ExitClass::Success {
                    replayed += 1;
                } else {
                    tracing::debug!(target = %dest, code = r.code, stderr = %r.stderr.trim_end(), %command,
                        "rename not replayed; rsync copies instead");
                }
            }
            Err(e) => tracing::debug!(target = %dest, error = %e, "rename not replayed"),
        }
        if stop.as_ref().is_some_and(|s| *s.borrow()) {
            break;
        }
    }
    replayed
}

/// What a failed rsync run is reported as: `rsync failed with exit 10 (error in socket
/// I/O): STDERR` and the command line.
fn failure_detail(code: Option<i32>, stderr: &str, command: &str) -> String {
    let how = match code {
        Some(code) => format!("with exit {code} ({})", rsync::describe(Some(code))),
        None => format!("({})", rsync::describe(None)),
    };
    format!("rsync failed {how}: {stderr}\n  command: {command}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_read_as_words() {
        assert_eq!(
            failure_detail(Some(10), "connection refused", "rsync -a x y"),
            "rsync failed with exit 10 (error in socket I/O): connection refused\n  command: rsync -a x y"
        );
        assert_eq!(
            failure_detail(None, "", "rsync"),
            "rsync failed (killed by a signal): \n  command: rsync"
        );
    }
}
