//! What one target does next: pure, driven by the caller's clock.
//!
//! Every target has a machine of its own, so a slow or failing target never holds back
//! another. The engine tells it what happened (changes marked, a flush started, a flush
//! finished and how rsync ended, the engine draining for exit or reloading) and gets back
//! decisions: flush a batch now, wait until an instant, put the batch back and retry at an
//! instant, give the target up. Every retry rule the README states lives here and is tested
//! below as a script of steps, like [`crate::flush`]; the engine only carries the decisions
//! out (spawning rsync, journaling, logging).
//!
//! The rules, in the README's words:
//! - rsync codes 0 and 24 (vanished files, normal under churn) are success;
//! - 23 (partial transfer, usually a path that changed shape mid-copy) is retried soon a
//!   few times, then with backoff;
//! - code 2 with "invalid path from sender" (a source race) is retried after 250 ms with the
//!   batch widened around its files, and after three such aborts in a row the next run is a
//!   whole-tree one, which that race cannot abort;
//! - 1, 2, 4 otherwise (usage, protocol, unsupported option) stop the target when they
//!   repeat three times in a row;
//! - everything else (connection, I/O, timeouts, a signal) keeps the paths dirty and retries
//!   with exponential backoff, 250 ms doubling to 30 s; a run killed by a signal comes back
//!   widened, so the temporary files it left are deleted;
//! - while draining for exit, waits are skipped and a failure other than a race gives the
//!   target up (the exit then reports changes not synced);
//! - while reloading, nothing new starts: the next engine takes the backlog over;
//! - a partial transfer whose failing paths rsync all named runs again at once without
//!   them (they are set aside and retried on their own, see [`crate::failing`]); it is no
//!   failure of the target;
//! - a verify pass runs when it is due and nothing else is pending, never while draining.

use std::time::{Duration, Instant};

use crate::flush::{Decision, FlushConfig, FlushPolicy};
use crate::rsync::ExitClass;
use crate::status::TargetState as Phase;

/// First wait after a failure; also the wait after a source race and a partial transfer.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// Longest wait between retries of a failing target.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Partial transfers (rsync code 23) retried after [`FIRST_BACKOFF`] before backing off.
pub const PARTIAL_RETRIES: u32 = 5;
/// Consecutive usage or protocol errors after which a target is given up.
pub const FATAL_AFTER: u32 = 3;
/// Consecutive runs lost to a source race (a listed directory vanished mid-run) after
/// which the next run is a whole-tree one, which such a race cannot abort.
pub const RACES_BEFORE_WHOLE_TREE: u32 = 3;

/// The wait before retry number `failures` of a failing target.
pub fn backoff(failures: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1u32 << failures.min(16))
        .min(MAX_BACKOFF)
}

/// What a flush is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushKind {
    /// Dirty paths (or the whole root, for the initial sync and rescans).
    Changes,
    /// A scheduled whole-tree pass that counts what it had to repair.
    Verify,
}

/// What the engine as a whole is doing; every target's machine hears of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Syncing changes as they come.
    Running,
    /// Exiting: flush what is dirty at once, start no verify pass.
    Draining,
    /// A new configuration waits for the flushes in flight: start nothing new.
    Reloading,
}

/// What the engine should do for this target now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing to do until something happens.
    Idle,
    /// Start a flush of this kind now (for [`FlushKind::Changes`], the whole backlog).
    Flush(FlushKind),
    /// Ask again at this instant (or sooner, when something happens).
    WaitUntil(Instant),
}

/// How a flush ended, as the engine saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    pub kind: FlushKind,
    pub class: ExitClass,
    /// rsync's exit code (None: killed by a signal, or not started).
    pub code: Option<i32>,
    /// A run was killed by a signal: it may have left temporary files behind.
    pub killed: bool,
    /// The batch covered the whole root (an initial sync, a rescan).
    pub covers_root: bool,
    /// A partial transfer whose failing paths were all named and newly set aside
    /// ([`crate::failing`]): the batch runs again without them.
    pub set_aside: bool,
}

/// Why a batch is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryCause {
    /// Connection, I/O, timeout, partial transfer, or a usage error not yet repeated.
    Failure,
    /// A listed directory changed while rsync read it.
    SourceRace,
    /// rsync failed on paths it named, now set aside: the rest runs again without them.
    PathsSetAside,
}

/// Why a target is given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUpCause {
    /// A usage, protocol or unsupported-option error, [`FATAL_AFTER`] times in a row.
    Fatal,
    /// The last flush before exit failed.
    Draining,
}

/// What the engine does with a finished flush's batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The batch is on the target: confirm it in the journal. `initial_sync_done` when this
    /// was the first whole-tree sync since start.
    Synced { initial_sync_done: bool },
    /// A verify pass ended (its result is only counted).
    Verified,
    /// Put the batch back (widened around its non-directory entries when `widen`), also mark
    /// the whole root when `whole_tree`, and flush again at `at` (None: as soon as the flush
    /// policy allows).
    Retry {
        cause: RetryCause,
        widen: bool,
        whole_tree: bool,
        at: Option<Instant>,
    },
    /// Put the batch back (widened when `widen`) and sync this target no more.
    GiveUp { cause: GiveUpCause, widen: bool },
}

/// Failure tracking of one target.
#[derive(Debug, Clone, Default)]
struct Health {
    /// Failed flushes since the last success (races excluded).
    failures: u32,
    /// Retries since start, races included.
    retries_total: u64,
    /// Consecutive runs that ended in a usage or protocol error.
    fatal_streak: u32,
    /// Consecutive runs aborted by a source race.
    race_streak: u32,
    /// No flush before this instant.
    retry_at: Option<Instant>,
    /// The target is no longer synced.
    given_up: bool,
}

/// The decisions of one target: when to flush, what a finished flush means.
#[derive(Debug, Clone)]
pub struct SyncMachine {
    policy: FlushPolicy,
    health: Health,
    in_flight: Option<FlushKind>,
    /// A whole-tree sync has completed since start (or none was needed).
    in_step: bool,
    verify_interval: Option<Duration>,
    verify_due: Option<Instant>,
}

impl SyncMachine {
    /// A machine for a target that is in step, with verify passes every `verify_interval`.
    pub fn new(flush: FlushConfig, verify_interval: Option<Duration>, now: Instant) -> Self {
        Self {
            policy: FlushPolicy::new(flush),
            health: Health::default(),
            in_flight: None,
            in_step: true,
            verify_interval,
            verify_due: verify_interval.map(|i| after(now, i)),
        }
    }

    /// The target needs a whole-tree sync (first start, or after a crash) before it is in step.
    pub fn needs_initial_sync(&mut self) {
        self.in_step = false;
    }

    /// Records that changes were marked dirty.
    pub fn changed(&mut self, now: Instant, settled: bool) {
        self.policy.on_change(now, settled);
    }

    /// What to do now, with `pending` dirty paths, while the engine is in `mode`.
    pub fn decide(&mut self, now: Instant, pending: usize, mode: Mode) -> Action {
        if self.in_flight.is_some() || self.health.given_up || mode == Mode::Reloading {
            return Action::Idle;
        }
        if let Some(at) = self.health.retry_at {
            if now < at && mode != Mode::Draining {
                return Action::WaitUntil(at);
            }
            self.health.retry_at = None;
        }
        if pending == 0 {
            return match (self.verify_due, mode) {
                (Some(due), Mode::Running) if now >= due => Action::Flush(FlushKind::Verify),
                (Some(due), Mode::Running) => Action::WaitUntil(due),
                _ => Action::Idle,
            };
        }
        if mode == Mode::Draining {
            return Action::Flush(FlushKind::Changes);
        }
        match self.policy.decide(now, pending, false) {
            Decision::FlushNow => Action::Flush(FlushKind::Changes),
            Decision::WaitUntil(at) => Action::WaitUntil(at),
            Decision::Idle | Decision::Busy => Action::Idle,
        }
    }

    /// When the oldest change not yet in a flush was recorded.
    pub fn first_pending(&self) -> Option<Instant> {
        self.policy.first_pending()
    }

    /// Records that a flush of `kind` started.
    pub fn started(&mut self, now: Instant, kind: FlushKind) {
        self.in_flight = Some(kind);
        self.policy.on_flush_started(now);
    }

    /// Takes the flush in flight into account and says what to do with its batch.
    pub fn finished(&mut self, now: Instant, done: Finished, mode: Mode) -> Verdict {
        self.in_flight = None;
        self.policy.on_flush_finished(now);
        if done.kind == FlushKind::Verify {
            self.verify_due = self.verify_interval.map(|i| after(now, i));
            return Verdict::Verified;
        }
        let health = &mut self.health;
        let mut class = done.class;
        if class == ExitClass::Fatal {
            // rsync also reports a source path that changed shape mid-transfer as a protocol
            // error: only a repeated one is final.
            health.fatal_streak += 1;
            if health.fatal_streak < FATAL_AFTER {
                class = ExitClass::Transient;
            }
        } else {
            health.fatal_streak = 0;
        }
        if class == ExitClass::SourceRace {
            health.race_streak += 1;
        } else {
            health.race_streak = 0;
        }
        if class == ExitClass::Transient && done.set_aside {
            // Not a failure of the target: the next run, without those paths, can succeed.
            health.retries_total += 1;
            let at = (mode != Mode::Draining).then(|| after(now, FIRST_BACKOFF));
            health.retry_at = at;
            return Verdict::Retry {
                cause: RetryCause::PathsSetAside,
                widen: false,
                whole_tree: false,
                at,
            };
        }
        match class {
            ExitClass::Success => {
                health.failures = 0;
                let initial_sync_done = done.covers_root && !self.in_step;
                self.in_step |= done.covers_root;
                Verdict::Synced { initial_sync_done }
            }
            ExitClass::Transient if mode == Mode::Draining => {
                health.given_up = true;
                Verdict::GiveUp {
                    cause: GiveUpCause::Draining,
                    widen: done.killed,
                }
            }
            ExitClass::Transient => {
                health.failures += 1;
                health.retries_total += 1;
                // A partial transfer under churn is usually a path that changed shape while
                // rsync read it: retry soon, and back off only if it persists.
                let wait = match done.code {
                    Some(23) if health.failures <= PARTIAL_RETRIES => FIRST_BACKOFF,
                    Some(23) => backoff(health.failures - PARTIAL_RETRIES),
                    _ => backoff(health.failures),
                };
                let at = after(now, wait);
                health.retry_at = Some(at);
                Verdict::Retry {
                    cause: RetryCause::Failure,
                    widen: done.killed,
                    whole_tree: false,
                    at: Some(at),
                }
            }
            ExitClass::SourceRace => {
                health.retries_total += 1;
                // Listed runs that keep losing to the churn: a recursive run of the whole
                // root has no list for a vanished directory to break.
                let whole_tree = health.race_streak >= RACES_BEFORE_WHOLE_TREE;
                if whole_tree {
                    health.race_streak = 0;
                }
                // A race is no reason to hold back the last flush before exit.
                let at = (mode != Mode::Draining).then(|| after(now, FIRST_BACKOFF));
                health.retry_at = at;
                Verdict::Retry {
                    cause: RetryCause::SourceRace,
                    widen: true,
                    whole_tree,
                    at,
                }
            }
            ExitClass::Fatal => {
                health.given_up = true;
                Verdict::GiveUp {
                    cause: GiveUpCause::Fatal,
                    widen: false,
                }
            }
        }
    }

    /// Gives the target up from outside (its source root is no longer what it was).
    pub fn give_up(&mut self) {
        self.health.given_up = true;
    }

    /// A flush is in flight.
    pub fn in_flight(&self) -> Option<FlushKind> {
        self.in_flight
    }

    /// The target is no longer synced.
    pub fn given_up(&self) -> bool {
        self.health.given_up
    }

    /// A whole-tree sync completed since start (or none was needed).
    pub fn in_step(&self) -> bool {
        self.in_step
    }

    /// Failed flushes since the last success.
    pub fn failures(&self) -> u32 {
        self.health.failures
    }

    /// Retries since start.
    pub fn retries_total(&self) -> u64 {
        self.health.retries_total
    }

    /// Start-up is over for this target: it is in step, or it failed once and keeps being
    /// retried (an unreachable target must not hold the service in start-up forever).
    pub fn started_up(&self) -> bool {
        self.in_step || self.health.given_up || self.health.failures > 0
    }

    /// The target has nothing left to do before exit: nothing in flight, and nothing
    /// pending that it will still sync.
    pub fn settled(&self, pending: usize) -> bool {
        self.in_flight.is_none() && (pending == 0 || self.health.given_up)
    }

    /// The state `watcher status` shows, given the dirty paths not yet handed to rsync.
    pub fn phase(&self, pending: usize) -> Phase {
        if self.health.given_up {
            Phase::Failed
        } else if !self.in_step {
            Phase::InitialSync
        } else if self.health.failures > 0 {
            Phase::Retrying
        } else if self.in_flight.is_some() || pending > 0 {
            Phase::Syncing
        } else {
            Phase::InStep
        }
    }
}

/// `t + d`; a duration too large to represent means no wait at all.
fn after(t: Instant, d: Duration) -> Instant {
    t.checked_add(d).unwrap_or(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How a finished run ended, in the table's words.
    #[derive(Debug, Clone, Copy)]
    enum Run {
        /// rsync exited with this code.
        Code(i32),
        /// Code 2 with "invalid path from sender".
        Race,
        /// Killed by a signal.
        Killed,
        /// Code 23 whose failing paths were all named and set aside.
        SetAside,
    }

    #[derive(Debug, Clone, Copy)]
    enum Want {
        Idle,
        Flush,
        Verify,
        Until(u64),
    }

    #[derive(Debug, Clone, Copy)]
    enum Expect {
        Synced,
        InitialSyncDone,
        Verified,
        /// Retry: widened, whole tree, at (ms).
        Retry(bool, bool, Option<u64>),
        /// Race: whole tree, at (ms).
        Race(bool, Option<u64>),
        /// Paths set aside: at (ms).
        Aside(Option<u64>),
        GiveUp(GiveUpCause, bool),
    }

    #[derive(Debug, Clone, Copy)]
    enum Step {
        Change(u64),
        /// At ms, with pending paths, in mode: expect an action.
        Decide(u64, usize, Mode, Want),
        Start(u64, FlushKind),
        /// A changes batch (not the whole root) ended at ms.
        Finish(u64, Run, Mode, Expect),
        /// A whole-root batch ended at ms.
        FinishRoot(u64, Run, Mode, Expect),
        /// Start-up over, failures, phase with this many pending paths.
        Check(bool, u32, Phase, usize),
    }

    use FlushKind::{Changes, Verify};
    use Mode::{Draining, Reloading, Running};
    use Run::{Code, Killed, Race, SetAside};
    use Step::{Change, Check, Decide, Finish, FinishRoot, Start};

    fn ms(t0: Instant, at: u64) -> Instant {
        t0 + Duration::from_millis(at)
    }

    /// One flush of a changes batch that ends 10 ms after it started: at `at` when the
    /// machine says so (the first one after a change at 0 and the short settle).
    fn cycle(at: u64, run: Run, expect: Expect) -> Vec<Step> {
        let mut steps = if at == 0 {
            vec![
                Change(0),
                Decide(3, 1, Running, Want::Flush),
                Start(3, Changes),
            ]
        } else {
            vec![Decide(at, 1, Running, Want::Flush), Start(at, Changes)]
        };
        steps.push(Finish(at + 10, run, Running, expect));
        steps
    }

    fn run_script(name: &str, machine: &mut SyncMachine, t0: Instant, steps: &[Step]) {
        for (i, step) in steps.iter().enumerate() {
            let at_ms = |t: Instant| t.saturating_duration_since(t0).as_millis() as u64;
            match *step {
                Change(at) => machine.changed(ms(t0, at), false),
                Start(at, kind) => machine.started(ms(t0, at), kind),
                Decide(at, pending, mode, want) => {
                    let got = match machine.decide(ms(t0, at), pending, mode) {
                        Action::Idle => "Idle".to_string(),
                        Action::Flush(Changes) => "Flush".to_string(),
                        Action::Flush(Verify) => "Verify".to_string(),
                        Action::WaitUntil(t) => format!("Until({})", at_ms(t)),
                    };
                    let want = match want {
                        Want::Idle => "Idle".to_string(),
                        Want::Flush => "Flush".to_string(),
                        Want::Verify => "Verify".to_string(),
                        Want::Until(t) => format!("Until({t})"),
                    };
                    assert_eq!(got, want, "{name}: step {i} {step:?}");
                }
                Finish(at, run, mode, expect) | FinishRoot(at, run, mode, expect) => {
                    let covers_root = matches!(step, FinishRoot(..));
                    let (class, code, killed) = match run {
                        Code(c) => (crate::rsync::classify(Some(c)), Some(c), false),
                        Race => (ExitClass::SourceRace, Some(2), false),
                        Killed => (crate::rsync::classify(None), None, true),
                        SetAside => (ExitClass::Transient, Some(23), false),
                    };
                    let kind = if matches!(expect, Expect::Verified) {
                        Verify
                    } else {
                        Changes
                    };
                    let done = Finished {
                        kind,
                        class,
                        code,
                        killed,
                        covers_root,
                        set_aside: matches!(run, SetAside),
                    };
                    let got = machine.finished(ms(t0, at), done, mode);
                    let want = match expect {
                        Expect::Synced => Verdict::Synced {
                            initial_sync_done: false,
                        },
                        Expect::InitialSyncDone => Verdict::Synced {
                            initial_sync_done: true,
                        },
                        Expect::Verified => Verdict::Verified,
                        Expect::Retry(widen, whole_tree, retry) => Verdict::Retry {
                            cause: RetryCause::Failure,
                            widen,
                            whole_tree,
                            at: retry.map(|r| ms(t0, r)),
                        },
                        Expect::Race(whole_tree, retry) => Verdict::Retry {
                            cause: RetryCause::SourceRace,
                            widen: true,
                            whole_tree,
                            at: retry.map(|r| ms(t0, r)),
                        },
                        Expect::Aside(retry) => Verdict::Retry {
                            cause: RetryCause::PathsSetAside,
                            widen: false,
                            whole_tree: false,
                            at: retry.map(|r| ms(t0, r)),
                        },
                        Expect::GiveUp(cause, widen) => Verdict::GiveUp { cause, widen },
                    };
                    assert_eq!(got, want, "{name}: step {i} {step:?}");
                }
                Check(started_up, failures, phase, pending) => {
                    assert_eq!(
                        (
                            machine.started_up(),
                            machine.failures(),
                            machine.phase(pending)
                        ),
                        (started_up, failures, phase),
                        "{name}: step {i} {step:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn retry_rules() {
        let partial_retries: Vec<Step> = (0..7u64)
            .flat_map(|n| {
                // Five retries after 250 ms, then 500 ms, 1 s: each starts when due.
                let at = [0, 260, 520, 780, 1_040, 1_300, 1_810][n as usize];
                let retry = [260, 520, 780, 1_040, 1_300, 1_810, 2_820][n as usize];
                cycle(at, Code(23), Expect::Retry(false, false, Some(retry)))
            })
            .collect();
        let transient_backoff: Vec<Step> = (0..9u64)
            .flat_map(|n| {
                // 500 ms, 1 s, 2 s, ... capped at 30 s, each counted from the failure.
                let at: u64 = (0..n)
                    .map(|k| 10 + backoff(k as u32 + 1).as_millis() as u64)
                    .sum();
                let wait = backoff(n as u32 + 1).as_millis() as u64;
                cycle(
                    at,
                    Code(10),
                    Expect::Retry(false, false, Some(at + 10 + wait)),
                )
            })
            .collect();
        let fatal_three_times = [
            cycle(0, Code(1), Expect::Retry(false, false, Some(510))),
            cycle(510, Code(1), Expect::Retry(false, false, Some(1_520))),
            cycle(1_520, Code(1), Expect::GiveUp(GiveUpCause::Fatal, false)),
        ]
        .concat();
        let fatal_streak_broken = [
            cycle(0, Code(2), Expect::Retry(false, false, Some(510))),
            cycle(510, Code(2), Expect::Retry(false, false, Some(1_520))),
            cycle(1_520, Code(23), Expect::Retry(false, false, Some(1_780))),
            cycle(1_780, Code(4), Expect::Retry(false, false, Some(5_790))),
            cycle(5_790, Code(4), Expect::Retry(false, false, Some(13_800))),
            cycle(13_800, Code(4), Expect::GiveUp(GiveUpCause::Fatal, false)),
        ]
        .concat();
        let races = [
            cycle(0, Race, Expect::Race(false, Some(260))),
            cycle(260, Race, Expect::Race(false, Some(520))),
            cycle(520, Race, Expect::Race(true, Some(780))),
            // The count starts again after the whole-tree run is asked for.
            cycle(780, Race, Expect::Race(false, Some(1_040))),
        ]
        .concat();
        let table: Vec<(&str, Vec<Step>)> = vec![
            (
                "0 and 24 are success",
                vec![
                    Change(0),
                    Decide(0, 1, Running, Want::Until(3)),
                    Decide(3, 1, Running, Want::Flush),
                    Start(3, Changes),
                    Decide(4, 1, Running, Want::Idle),
                    Finish(20, Code(0), Running, Expect::Synced),
                    Check(true, 0, Phase::InStep, 0),
                    Change(500),
                    Decide(503, 1, Running, Want::Flush),
                    Start(503, Changes),
                    Finish(520, Code(24), Running, Expect::Synced),
                    Check(true, 0, Phase::InStep, 0),
                ],
            ),
            (
                "23 is retried after 250 ms five times, then backs off",
                partial_retries,
            ),
            (
                "other failures back off from 500 ms, doubling, to 30 s",
                transient_backoff,
            ),
            (
                "usage and protocol errors give up the third time in a row",
                fatal_three_times,
            ),
            (
                "another result in between restarts the count",
                fatal_streak_broken,
            ),
            (
                "a success resets the failures",
                [
                    cycle(0, Code(10), Expect::Retry(false, false, Some(510))),
                    vec![Check(true, 1, Phase::Retrying, 1)],
                    cycle(510, Code(0), Expect::Synced),
                    vec![Check(true, 0, Phase::InStep, 0)],
                    cycle(620, Code(10), Expect::Retry(false, false, Some(1_130))),
                ]
                .concat(),
            ),
            (
                "source races retry after 250 ms, the third in a row as a whole tree",
                races,
            ),
            (
                "a race is not a failure",
                [
                    cycle(0, Race, Expect::Race(false, Some(260))),
                    vec![Check(true, 0, Phase::Syncing, 1)],
                ]
                .concat(),
            ),
            (
                "failing paths set aside: the batch runs again soon, and it is no failure",
                [
                    cycle(0, SetAside, Expect::Aside(Some(260))),
                    vec![Check(true, 0, Phase::Syncing, 1)],
                    cycle(260, Code(0), Expect::Synced),
                    // Nor does it count towards the partial-transfer retries.
                    cycle(400, Code(23), Expect::Retry(false, false, Some(660))),
                    cycle(660, SetAside, Expect::Aside(Some(920))),
                    vec![Check(true, 1, Phase::Retrying, 1)],
                ]
                .concat(),
            ),
            (
                "a run killed by a signal comes back widened",
                cycle(0, Killed, Expect::Retry(true, false, Some(510))),
            ),
            (
                "no flush before the retry time, unless draining",
                vec![
                    Change(0),
                    Decide(3, 1, Running, Want::Flush),
                    Start(3, Changes),
                    Finish(
                        10,
                        Code(10),
                        Running,
                        Expect::Retry(false, false, Some(510)),
                    ),
                    Change(20),
                    Decide(20, 2, Running, Want::Until(510)),
                    Decide(509, 2, Running, Want::Until(510)),
                    Decide(300, 2, Draining, Want::Flush),
                ],
            ),
            (
                "a failure while draining gives up, widened if killed",
                vec![
                    Decide(0, 1, Draining, Want::Flush),
                    Start(0, Changes),
                    Finish(
                        10,
                        Killed,
                        Draining,
                        Expect::GiveUp(GiveUpCause::Draining, true),
                    ),
                    Check(true, 0, Phase::Failed, 1),
                    Decide(20, 1, Draining, Want::Idle),
                ],
            ),
            (
                "a usage error not yet repeated also gives up while draining",
                vec![
                    Decide(0, 1, Draining, Want::Flush),
                    Start(0, Changes),
                    Finish(
                        10,
                        Code(1),
                        Draining,
                        Expect::GiveUp(GiveUpCause::Draining, false),
                    ),
                ],
            ),
            (
                "a race while draining is retried at once",
                vec![
                    Decide(0, 1, Draining, Want::Flush),
                    Start(0, Changes),
                    Finish(10, Race, Draining, Expect::Race(false, None)),
                    Decide(11, 1, Draining, Want::Flush),
                ],
            ),
            (
                "draining flushes at once, without waiting for quiet",
                vec![
                    Change(0),
                    Decide(0, 1, Running, Want::Until(3)),
                    Decide(0, 1, Draining, Want::Flush),
                    Decide(0, 0, Draining, Want::Idle),
                ],
            ),
            (
                "reloading starts nothing new",
                vec![
                    Change(0),
                    Decide(10, 1, Reloading, Want::Idle),
                    Decide(10, 1, Running, Want::Flush),
                    Start(10, Changes),
                    Finish(
                        20,
                        Code(10),
                        Reloading,
                        Expect::Retry(false, false, Some(520)),
                    ),
                ],
            ),
            (
                "one batch in flight at a time",
                vec![
                    Change(0),
                    Decide(3, 1, Running, Want::Flush),
                    Start(3, Changes),
                    Change(5),
                    Decide(5, 1, Running, Want::Idle),
                    Decide(5, 1, Draining, Want::Idle),
                    Finish(30, Code(0), Running, Expect::Synced),
                    Decide(30, 1, Running, Want::Until(105)),
                ],
            ),
            (
                "a given-up target never flushes again",
                [
                    cycle(0, Code(1), Expect::Retry(false, false, Some(510))),
                    cycle(510, Code(1), Expect::Retry(false, false, Some(1_520))),
                    cycle(1_520, Code(1), Expect::GiveUp(GiveUpCause::Fatal, false)).to_vec(),
                    vec![
                        Change(2_000),
                        Decide(5_000, 3, Running, Want::Idle),
                        Decide(5_000, 3, Draining, Want::Idle),
                        Check(true, 2, Phase::Failed, 3),
                    ],
                ]
                .concat(),
            ),
        ];
        let t0 = Instant::now();
        for (name, steps) in &table {
            let mut machine = SyncMachine::new(FlushConfig::default(), None, t0);
            run_script(name, &mut machine, t0, steps);
        }
    }

    #[test]
    fn initial_sync() {
        let table: &[(&str, &[Step])] = &[
            (
                "in step once a whole-tree batch synced",
                &[
                    Change(0),
                    Check(false, 0, Phase::InitialSync, 1),
                    Decide(3, 1, Running, Want::Flush),
                    Start(3, Changes),
                    Check(false, 0, Phase::InitialSync, 0),
                    FinishRoot(900, Code(0), Running, Expect::InitialSyncDone),
                    Check(true, 0, Phase::InStep, 0),
                    Decide(1_000, 1, Running, Want::Flush),
                    Start(1_000, Changes),
                    FinishRoot(1_900, Code(0), Running, Expect::Synced),
                ],
            ),
            (
                "a listed batch does not end the initial sync",
                &[
                    Change(0),
                    Decide(3, 1, Running, Want::Flush),
                    Start(3, Changes),
                    Finish(10, Code(0), Running, Expect::Synced),
                    Check(false, 0, Phase::InitialSync, 0),
                ],
            ),
            (
                "start-up is over after the first failure; the sync keeps being retried",
                &[
                    Change(0),
                    Decide(3, 1, Running, Want::Flush),
                    Start(3, Changes),
                    FinishRoot(
                        10,
                        Code(10),
                        Running,
                        Expect::Retry(false, false, Some(510)),
                    ),
                    Check(true, 1, Phase::InitialSync, 1),
                    Decide(510, 1, Running, Want::Flush),
                    Start(510, Changes),
                    FinishRoot(600, Code(0), Running, Expect::InitialSyncDone),
                    Check(true, 0, Phase::InStep, 0),
                ],
            ),
        ];
        let t0 = Instant::now();
        for (name, steps) in table {
            let mut machine = SyncMachine::new(FlushConfig::default(), None, t0);
            machine.needs_initial_sync();
            run_script(name, &mut machine, t0, steps);
        }
    }

    #[test]
    fn verify_passes() {
        let table: &[(&str, &[Step])] = &[
            (
                "due after its interval, when nothing else is pending",
                &[
                    Decide(0, 0, Running, Want::Until(60_000)),
                    Change(59_990),
                    Decide(60_000, 3, Running, Want::Flush),
                    Start(60_000, Changes),
                    Finish(60_010, Code(0), Running, Expect::Synced),
                    Decide(60_010, 0, Running, Want::Verify),
                    Start(60_010, Verify),
                    Decide(60_020, 0, Running, Want::Idle),
                    Finish(65_000, Code(0), Running, Expect::Verified),
                    Decide(65_000, 0, Running, Want::Until(125_000)),
                ],
            ),
            (
                "a failed pass is rescheduled too, and is no failure of the target",
                &[
                    Decide(60_000, 0, Running, Want::Verify),
                    Start(60_000, Verify),
                    Finish(60_010, Code(10), Running, Expect::Verified),
                    Check(true, 0, Phase::InStep, 0),
                    Decide(60_010, 0, Running, Want::Until(120_010)),
                ],
            ),
            (
                "never while draining or reloading",
                &[
                    Decide(60_000, 0, Draining, Want::Idle),
                    Decide(60_000, 0, Reloading, Want::Idle),
                    Decide(60_000, 0, Running, Want::Verify),
                ],
            ),
        ];
        let t0 = Instant::now();
        for (name, steps) in table {
            let mut machine =
                SyncMachine::new(FlushConfig::default(), Some(Duration::from_secs(60)), t0);
            run_script(name, &mut machine, t0, steps);
        }
    }

    #[test]
    fn backoff_is_capped() {
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert_eq!(backoff(3), Duration::from_secs(2));
        assert_eq!(backoff(40), MAX_BACKOFF);
    }

    #[test]
    fn settled_means_nothing_left_to_do_before_exit() {
        let t0 = Instant::now();
        let mut machine = SyncMachine::new(FlushConfig::default(), None, t0);
        assert!(machine.settled(0));
        assert!(!machine.settled(1));
        machine.started(t0, Changes);
        assert!(!machine.settled(0));
        let fatal = Finished {
            kind: Changes,
            class: ExitClass::Fatal,
            code: Some(1),
            killed: false,
            covers_root: false,
            set_aside: false,
        };
        for _ in 0..FATAL_AFTER {
            machine.started(t0, Changes);
            machine.finished(t0, fatal, Running);
        }
        assert!(machine.given_up());
        assert!(
            machine.settled(5),
            "a given-up target's backlog is not waited for"
        );
    }
}
