//! The read loop every backend shares. A backend supplies an [`EventSource`]: its kernel
//! descriptor and "read what is queued into events"; this loop does the rest the same way
//! for all of them: wait for the descriptor with a timeout (so `stop` and timers are looked
//! at), retry interrupted calls, read until the queue is empty once `stop` is set (every
//! change made before the stop is delivered), and refresh the set of the daemon's own
//! processes once per read. A source that follows the mount table hands over a second
//! descriptor ([`EventSource::mounts_fd`]), polled beside the first, so mount changes are
//! seen in the same loop and their events join the same stream.

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::{BackendError, OwnPids};
use crate::event::Event;

/// Longest wait for events before `stop` and the timers are looked at again.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// What a backend reads events from.
pub(crate) trait EventSource {
    /// The descriptor that polls readable while events are queued.
    fn fd(&self) -> BorrowedFd<'_>;

    /// Reads what is queued now (one buffer's worth) and appends what it means to `out`,
    /// dropping the records `own` holds the process of (where a record names its process).
    /// Returns how much was read: 0 or an error of kind `WouldBlock` when nothing was
    /// queued; an `Interrupted` error is retried.
    fn read(&mut self, own: &mut OwnFilter<'_>, out: &mut Vec<Event>) -> io::Result<usize>;

    /// /proc/self/mountinfo, when the source follows mounts below its roots: polled for
    /// POLLPRI beside [`EventSource::fd`].
    fn mounts_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    /// The mount table changed (never called while draining after `stop`).
    fn mounts_changed(&mut self, _out: &mut Vec<Event>) {}

    /// Work that is due by the clock, done before each wait (never while draining after
    /// `stop`); returns how long the wait may last.
    fn tick(&mut self, _now: Instant, _out: &mut Vec<Event>) -> Duration {
        POLL_INTERVAL
    }
}

/// The daemon's own processes, as of one read. The set is copied on first use, so a
/// backend whose records carry no process id costs nothing here.
pub(crate) struct OwnFilter<'a> {
    pids: &'a OwnPids,
    snapshot: Option<hashbrown::HashSet<i32>>,
}

impl<'a> OwnFilter<'a> {
    pub(crate) fn new(pids: &'a OwnPids) -> Self {
        OwnFilter {
            pids,
            snapshot: None,
        }
    }

    /// Whether `pid` is the daemon or one of the rsync runs it spawned.
    pub(crate) fn contains(&mut self, pid: i32) -> bool {
        self.snapshot
            .get_or_insert_with(|| self.pids.snapshot())
            .contains(&pid)
    }
}

/// Reads `source` until `stop` is set, handing each read's events to `sink`; then reads
/// what is still queued and returns. Returns early, with Ok, when `sink` says the consumer
/// is gone.
pub(crate) fn run(
    source: &mut impl EventSource,
    own_pids: &OwnPids,
    sink: &mut dyn FnMut(Vec<Event>) -> bool,
    stop: &AtomicBool,
) -> Result<(), BackendError> {
    let deliver =
        |sink: &mut dyn FnMut(Vec<Event>) -> bool, out: Vec<Event>| out.is_empty() || sink(out);
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        if !stopping {
            let mut out = Vec::new();
            let wait = source.tick(Instant::now(), &mut out);
            if !deliver(sink, out) {
                return Ok(());
            }
            let ready =
                wait_readable(source.fd(), source.mounts_fd(), wait).map_err(BackendError::Read)?;
            if ready.mounts {
                let mut out = Vec::new();
                source.mounts_changed(&mut out);
                if !deliver(sink, out) {
                    return Ok(());
                }
            }
            if !ready.events {
                continue;
            }
        }
        // A fresh copy per read: rsync children come and go between reads.
        let mut own = OwnFilter::new(own_pids);
        let mut out = Vec::new();
        let read = source.read(&mut own, &mut out);
        if !deliver(sink, out) {
            return Ok(());
        }
        match read {
            Ok(0) => {}
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(BackendError::Read(e)),
        }
        // The queue is empty: after a stop, everything before it was delivered.
        if stopping {
            return Ok(());
        }
    }
}

/// Which descriptors a wait found ready.
#[derive(Debug, Default)]
struct Ready {
    events: bool,
    mounts: bool,
}

/// Waits up to `timeout` for `fd` to be readable or the mount table (`mounts`) to change;
/// nothing is ready after a timeout or a signal.
fn wait_readable(
    fd: BorrowedFd<'_>,
    mounts: Option<BorrowedFd<'_>>,
    timeout: Duration,
) -> io::Result<Ready> {
    // At least 1 ms: a timer that is due is not polled for with a zero timeout forever.
    let ms = timeout.as_millis().clamp(1, u128::from(u16::MAX));
    let timeout = PollTimeout::from(u16::try_from(ms).unwrap_or(u16::MAX));
    let mut fds = vec![PollFd::new(fd, PollFlags::POLLIN)];
    if let Some(mounts) = mounts {
        fds.push(PollFd::new(mounts, PollFlags::POLLPRI));
    }
    match poll(&mut fds, timeout) {
        Ok(0) | Err(Errno::EINTR) => Ok(Ready::default()),
        Ok(_) => {
            let fired = |i: usize, flags: PollFlags| {
                fds.get(i)
                    .and_then(|f| f.revents())
                    .is_some_and(|r| r.intersects(flags))
            };
            Ok(Ready {
                events: fired(
                    0,
                    PollFlags::POLLIN | PollFlags::POLLERR | PollFlags::POLLHUP,
                ),
                mounts: fired(1, PollFlags::POLLPRI | PollFlags::POLLERR),
            })
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::os::fd::{AsFd, OwnedFd};

    use super::*;
    use crate::event::ChangeKind;

    /// A source whose descriptor is always readable, reading scripted batches of
    /// (pid, path) records; it sets `stop` itself after `stop_after` reads.
    struct Script {
        fd: OwnedFd,
        reads: VecDeque<io::Result<Vec<(i32, &'static str)>>>,
        stop_after: usize,
        done: usize,
        stop: &'static AtomicBool,
    }

    impl EventSource for Script {
        fn fd(&self) -> BorrowedFd<'_> {
            self.fd.as_fd()
        }

        fn read(&mut self, own: &mut OwnFilter<'_>, out: &mut Vec<Event>) -> io::Result<usize> {
            self.done += 1;
            if self.done == self.stop_after {
                self.stop.store(true, Ordering::Relaxed);
            }
            let batch = self
                .reads
                .pop_front()
                .unwrap_or_else(|| Err(io::ErrorKind::WouldBlock.into()))?;
            let n = batch.len();
            for (pid, path) in batch {
                if !own.contains(pid) {
                    out.push(Event::Change {
                        kind: ChangeKind::Modified,
                        path: path.into(),
                        is_dir: false,
                        pid,
                    });
                }
            }
            Ok(n)
        }
    }

    fn paths(batches: &[Vec<Event>]) -> Vec<Vec<String>> {
        batches
            .iter()
            .map(|b| {
                b.iter()
                    .map(|e| match e {
                        Event::Change { path, .. } => path.display().to_string(),
                        other => format!("{other:?}"),
                    })
                    .collect()
            })
            .collect()
    }

    /// /dev/null polls readable at once.
    fn readable() -> OwnedFd {
        std::fs::File::open("/dev/null")
            .expect("open /dev/null")
            .into()
    }

    #[test]
    fn own_records_are_dropped_and_the_queue_is_drained_after_stop() {
        static STOP: AtomicBool = AtomicBool::new(false);
        let own = OwnPids::default();
        own.insert(1);
        let mut source = Script {
            fd: readable(),
            reads: VecDeque::from([
                Ok(vec![(1, "/own"), (2, "/a")]),
                Err(io::ErrorKind::Interrupted.into()),
                // Set stop here: what is still queued is read before returning.
                Ok(vec![(2, "/b")]),
                Ok(vec![(2, "/c")]),
                Err(io::ErrorKind::WouldBlock.into()),
                Ok(vec![(2, "/never")]),
            ]),
            stop_after: 3,
            done: 0,
            stop: &STOP,
        };
        let mut got = Vec::new();
        run(
            &mut source,
            &own,
            &mut |b| {
                got.push(b);
                true
            },
            &STOP,
        )
        .expect("runs");
        assert_eq!(paths(&got), [vec!["/a"], vec!["/b"], vec!["/c"]]);
        assert_eq!(source.reads.len(), 1);
    }

    #[test]
    fn read_errors_end_the_loop_and_a_gone_consumer_stops_it() {
        static STOP: AtomicBool = AtomicBool::new(false);
        let own = OwnPids::default();
        let mut source = Script {
            fd: readable(),
            reads: VecDeque::from([Err(io::Error::from_raw_os_error(libc::EIO))]),
            stop_after: 0,
            done: 0,
            stop: &STOP,
        };
        let err = run(&mut source, &own, &mut |_| true, &STOP).expect_err("fails");
        assert!(matches!(err, BackendError::Read(_)), "{err:?}");

        let mut source = Script {
            fd: readable(),
            reads: VecDeque::from([Ok(vec![(2, "/a")]), Ok(vec![(2, "/b")])]),
            stop_after: 0,
            done: 0,
            stop: &STOP,
        };
        let mut calls = 0;
        run(
            &mut source,
            &own,
            &mut |_| {
                calls += 1;
                false
            },
            &STOP,
        )
        .expect("runs");
        assert_eq!((calls, source.reads.len()), (1, 1));
    }
}
