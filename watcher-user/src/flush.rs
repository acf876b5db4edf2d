//! When to flush a target's dirty set: pure, driven by the caller's clock.
//!
//! A lone change goes out at once for low latency; a stream of changes is batched until it
//! pauses for `delay`, but never held longer than `max_delay`, so a busy tree still syncs.
//! A lone change waits [`LONE_SETTLE`] for the rest of its write, unless its latest event
//! already ends one (a file closed after writing, a file moved into place): then it goes
//! out with no wait, as a per-event script's rsync would.

use std::time::{Duration, Instant};

use crate::config::defaults;

/// How long a lone change waits for the rest of its burst (a write is create, modify, close).
pub const LONE_SETTLE: Duration = Duration::from_millis(3);

/// Timing knobs of the flush policy.
#[derive(Debug, Clone, Copy)]
pub struct FlushConfig {
    /// Quiet period that ends a burst of changes.
    pub delay: Duration,
    /// Longest a change waits once batching, however busy the tree.
    pub max_delay: Duration,
    /// Pending paths that trigger a flush at once.
    pub max_batch: usize,
}

impl Default for FlushConfig {
    /// The configuration's defaults: 100 ms quiet period, 1 s maximum wait, 10 000 paths
    /// per batch.
    fn default() -> Self {
        Self {
            delay: Duration::from_millis(defaults::DELAY_MS),
            max_delay: Duration::from_millis(defaults::MAX_DELAY_MS),
            max_batch: defaults::MAX_BATCH,
        }
    }
}

/// What the caller should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Nothing pending.
    Idle,
    /// Start a flush now.
    FlushNow,
    /// Decide again at this instant (or on the next change).
    WaitUntil(Instant),
    /// A batch is in flight; decide again when it finishes.
    Busy,
}

/// Flush timing state of one target.
#[derive(Debug, Clone)]
pub struct FlushPolicy {
    cfg: FlushConfig,
    /// First change not yet handed to a flush.
    first_pending: Option<Instant>,
    last_change: Option<Instant>,
    /// Latest change, flush start or flush finish: what breaks a quiet period.
    last_activity: Option<Instant>,
    /// The first pending change came after a quiet period.
    lone: bool,
    /// The latest change ends a write: a lone change need not settle.
    settled: bool,
    flushing: bool,
}

impl FlushPolicy {
    /// A policy with nothing pending.
    pub fn new(cfg: FlushConfig) -> Self {
        Self {
            cfg,
            first_pending: None,
            last_change: None,
            last_activity: None,
            lone: false,
            settled: false,
            flushing: false,
        }
    }

    /// Records a group of changes just marked dirty; `settled` when the latest of them
    /// ends a write (a close after writing, a file moved into place).
    pub fn on_change(&mut self, now: Instant, settled: bool) {
        self.settled = settled;
        if self.first_pending.is_none() {
            let quiet = self
                .last_activity
                .is_none_or(|t| now.saturating_duration_since(t) >= self.cfg.delay);
            self.first_pending = Some(now);
            // Changes that arrive during a flush batch up for the next one.
            self.lone = quiet && !self.flushing;
        }
        self.last_change = Some(now);
        self.last_activity = Some(now);
    }

    /// When the first change not yet handed to a flush was recorded.
    pub fn first_pending(&self) -> Option<Instant> {
        self.first_pending
    }

    /// Records that every pending change was handed to a flush.
    pub fn on_flush_started(&mut self, now: Instant) {
        self.first_pending = None;
        self.lone = false;
        self.flushing = true;
        self.last_activity = Some(now);
    }

    /// Records that the in-flight flush ended (successfully or not).
    pub fn on_flush_finished(&mut self, now: Instant) {
        self.flushing = false;
        self.last_activity = Some(now);
    }

    /// What to do given `pending` dirty paths and whether a batch is in flight.
    pub fn decide(&self, now: Instant, pending: usize, in_flight: bool) -> Decision {
        if pending == 0 {
            return Decision::Idle;
        }
        if in_flight {
            return Decision::Busy;
        }
        if pending >= self.cfg.max_batch {
            return Decision::FlushNow;
        }
        if let (true, Some(first)) = (self.lone, self.first_pending) {
            // A lone change goes out almost at once; the short settle lets the events of one
            // write (create, modify, close) travel in one batch instead of two, unless the
            // write has ended already.
            if self.settled {
                return Decision::FlushNow;
            }
            let at = after(first, LONE_SETTLE.min(self.cfg.delay));
            return if now >= at {
                Decision::FlushNow
            } else {
                Decision::WaitUntil(at)
            };
        }
        // Pending paths with no recorded change are a failed batch put back: retry after a
        // quiet period from when that flush finished.
        let first = self.first_pending.or(self.last_activity).unwrap_or(now);
        let last = self.last_change.map_or(first, |t| t.max(first));
        let deadline = after(last, self.cfg.delay).min(after(first, self.cfg.max_delay));
        if now >= deadline {
            Decision::FlushNow
        } else {
            Decision::WaitUntil(deadline)
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

    #[derive(Debug, Clone, Copy)]
    enum Want {
        Idle,
        Now,
        Busy,
        Until(u64),
    }

    #[derive(Debug, Clone, Copy)]
    enum Step {
        Change(u64),
        /// A change whose latest event ends a write.
        Settled(u64),
        Started(u64),
        Finished(u64),
        /// At ms, with pending paths and in-flight flag, expect a decision.
        Decide(u64, usize, bool, Want),
    }

    use Step::{Change, Decide, Finished, Settled, Started};
    use Want::{Busy, Idle, Now, Until};

    fn ms(t0: Instant, at: u64) -> Instant {
        t0 + Duration::from_millis(at)
    }

    #[test]
    fn scenarios() {
        let table: &[(&str, &[Step])] = &[
            (
                "nothing pending",
                &[Decide(0, 0, false, Idle), Decide(5_000, 0, true, Idle)],
            ),
            (
                "lone change goes out at once, after the short settle",
                &[
                    Change(0),
                    Decide(0, 1, false, Until(3)),
                    Change(1),
                    Decide(2, 2, false, Until(3)),
                    Decide(3, 2, false, Now),
                ],
            ),
            (
                "a lone write that ended goes out with no settle",
                &[
                    Change(0),
                    Decide(0, 1, false, Until(3)),
                    Settled(1),
                    Decide(1, 1, false, Now),
                ],
            ),
            (
                "a settled change in a burst still waits for quiet",
                &[
                    Change(0),
                    Started(0),
                    Settled(10),
                    Finished(20),
                    Decide(20, 1, false, Until(110)),
                ],
            ),
            (
                "an unsettled change after a settled one settles again",
                &[Settled(0), Change(0), Decide(0, 2, false, Until(3))],
            ),
            (
                "lone change long after a flush",
                &[
                    Change(0),
                    Started(0),
                    Finished(20),
                    Change(500),
                    Decide(503, 1, false, Now),
                ],
            ),
            (
                "change soon after a flush waits for quiet",
                &[
                    Change(0),
                    Started(0),
                    Finished(20),
                    Change(50),
                    Decide(50, 1, false, Until(150)),
                    Decide(149, 1, false, Until(150)),
                    Decide(150, 1, false, Now),
                ],
            ),
            (
                "lone change not yet flushed stays urgent",
                &[Change(0), Change(40), Decide(40, 2, false, Now)],
            ),
            (
                "change during flight joins the next batch",
                &[
                    Change(0),
                    Decide(3, 1, false, Now),
                    Started(3),
                    Change(10),
                    Decide(10, 1, true, Busy),
                    Change(30),
                    Decide(30, 2, true, Busy),
                    Finished(40),
                    Decide(40, 2, false, Until(130)),
                    Decide(130, 2, false, Now),
                ],
            ),
            (
                "changes during a long flight wait no longer than max_delay after the first",
                &[
                    Started(0),
                    Change(10),
                    Change(500),
                    Change(950),
                    Finished(960),
                    Change(980),
                    Decide(980, 4, false, Until(1_010)),
                    Decide(1_010, 4, false, Now),
                ],
            ),
            (
                "change during a long flight is not lone",
                &[
                    Started(0),
                    Change(500),
                    Decide(500, 1, true, Busy),
                    Finished(510),
                    Decide(510, 1, false, Until(600)),
                    Decide(600, 1, false, Now),
                ],
            ),
            (
                "change during a long flight goes out once quiet",
                &[
                    Started(0),
                    Change(500),
                    Finished(600),
                    Decide(600, 1, false, Now),
                ],
            ),
            (
                "max_batch triggers at once",
                &[
                    Started(0),
                    Finished(5),
                    Change(10),
                    Decide(10, 9_999, false, Until(110)),
                    Decide(10, 10_000, false, Now),
                    Decide(10, 10_000, true, Busy),
                ],
            ),
            (
                "quiet after a burst",
                &[
                    Started(0),
                    Finished(5),
                    Change(10),
                    Change(100),
                    Change(200),
                    Change(300),
                    Decide(300, 4, false, Until(400)),
                    Decide(399, 4, false, Until(400)),
                    Decide(400, 4, false, Now),
                ],
            ),
            (
                "failed batch put back retries after a quiet period",
                &[
                    Change(0),
                    Started(0),
                    Finished(50),
                    Decide(50, 3, false, Until(150)),
                    Decide(150, 3, false, Now),
                ],
            ),
        ];
        let t0 = Instant::now();
        for (name, steps) in table {
            let mut policy = FlushPolicy::new(FlushConfig::default());
            for (i, step) in steps.iter().enumerate() {
                match *step {
                    Change(at) => policy.on_change(ms(t0, at), false),
                    Settled(at) => policy.on_change(ms(t0, at), true),
                    Started(at) => policy.on_flush_started(ms(t0, at)),
                    Finished(at) => policy.on_flush_finished(ms(t0, at)),
                    Decide(at, pending, in_flight, want) => {
                        let want = match want {
                            Idle => Decision::Idle,
                            Now => Decision::FlushNow,
                            Busy => Decision::Busy,
                            Until(t) => Decision::WaitUntil(ms(t0, t)),
                        };
                        let got = policy.decide(ms(t0, at), pending, in_flight);
                        // Report times relative to t0 on failure.
                        let rel = |d: Decision| match d {
                            Decision::WaitUntil(t) => format!("WaitUntil({:?})", t - t0),
                            other => format!("{other:?}"),
                        };
                        assert_eq!(rel(got), rel(want), "{name}: step {i} {step:?}");
                    }
                }
            }
        }
    }

    /// Drives the policy like the daemon would, one millisecond at a time.
    struct Sim {
        t0: Instant,
        policy: FlushPolicy,
        pending: Vec<u64>,
        in_flight: Option<(u64, Vec<u64>)>,
        flush_ms: u64,
        /// (flush start, arrival times it carried)
        flushes: Vec<(u64, Vec<u64>)>,
    }

    impl Sim {
        fn new(flush_ms: u64) -> Self {
            let t0 = Instant::now();
            let policy = FlushPolicy::new(FlushConfig::default());
            Self {
                t0,
                policy,
                pending: Vec::new(),
                in_flight: None,
                flush_ms,
                flushes: Vec::new(),
            }
        }

        fn tick(&mut self, at: u64, change: bool) {
            let now = ms(self.t0, at);
            if let Some((end, _)) = &self.in_flight
                && *end <= at
            {
                self.in_flight = None;
                self.policy.on_flush_finished(now);
            }
            if change {
                self.pending.push(at);
                self.policy.on_change(now, false);
            }
            match self
                .policy
                .decide(now, self.pending.len(), self.in_flight.is_some())
            {
                Decision::FlushNow => {
                    let batch = std::mem::take(&mut self.pending);
                    self.policy.on_flush_started(now);
                    self.flushes.push((at, batch.clone()));
                    self.in_flight = Some((at + self.flush_ms, batch));
                }
                Decision::WaitUntil(t) => {
                    assert!(t > now, "deadline {:?} not in the future", t - self.t0)
                }
                Decision::Idle => assert!(self.pending.is_empty()),
                Decision::Busy => assert!(self.in_flight.is_some()),
            }
        }
    }

    #[test]
    fn burst_flushes_at_least_every_max_delay() {
        let mut sim = Sim::new(30);
        for at in 0..5_000 {
            sim.tick(at, at < 3_000 && at % 10 == 0);
        }
        assert!(sim.pending.is_empty(), "everything flushed eventually");
        let max_delay = FlushConfig::default().max_delay.as_millis() as u64;
        // The first change of the burst goes out alone, at once.
        assert_eq!(sim.flushes[0], (3, vec![0]));
        for (start, batch) in &sim.flushes {
            for arrived in batch {
                assert!(
                    start - arrived <= max_delay,
                    "change at {arrived} waited until {start}"
                );
            }
        }
        for pair in sim.flushes.windows(2) {
            assert!(
                pair[1].0 - pair[0].0 <= max_delay + 10,
                "gap {:?}",
                (pair[0].0, pair[1].0)
            );
        }
        // Batching: a handful of flushes, not one per change.
        assert!(sim.flushes.len() <= 6, "{} flushes", sim.flushes.len());
        // The tail of the burst goes out once it has been quiet for `delay`.
        let last = sim.flushes.last().map(|f| f.0);
        assert!(
            last.is_some_and(|t| (2_990..=3_090).contains(&t)),
            "last flush at {last:?}"
        );
    }

    #[test]
    fn sparse_changes_each_go_out_at_once() {
        let mut sim = Sim::new(30);
        for at in 0..3_000 {
            sim.tick(at, at % 500 == 0);
        }
        let starts: Vec<u64> = sim.flushes.iter().map(|f| f.0).collect();
        assert_eq!(starts, vec![3, 503, 1_003, 1_503, 2_003, 2_503]);
    }
}
