//! fanotify and inotify in one daemon: `auto` marks every filesystem it can and watches
//! the places fanotify refuses (an overlay root, an overlay mounted below a root) with
//! inotify, so one such place does not bring inotify's start-up walk and watch limit back
//! for every root. Each backend reads in a thread of its own; their events reach the
//! consumer as one stream, in the order the batches arrive.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use super::{Backend, BackendError};
use crate::event::Event;

/// How often the consumer's stop flag is looked at while no events arrive.
const STOP_POLL: Duration = Duration::from_millis(50);

/// Several backends, each over its own places, read as one.
pub struct Hybrid {
    parts: Vec<Box<dyn Backend>>,
    name: &'static str,
}

impl Hybrid {
    /// `parts` run side by side; `name` is what logs and status call the whole.
    pub fn new(parts: Vec<Box<dyn Backend>>, name: &'static str) -> Hybrid {
        Hybrid { parts, name }
    }
}

/// What a part's thread hands over.
enum Message {
    Events(Vec<Event>),
    Ended(Result<(), BackendError>),
}

impl Backend for Hybrid {
    fn name(&self) -> &'static str {
        self.name
    }

    /// Runs every part until `stop` is set (each drains what its kernel queue holds), the
    /// consumer is gone, or one part fails: then the others are stopped too, and the first
    /// failure is returned.
    fn run(
        self: Box<Self>,
        sink: &mut dyn FnMut(Vec<Event>) -> bool,
        stop: &AtomicBool,
    ) -> Result<(), BackendError> {
        let parts_stop = AtomicBool::new(false);
        let (tx, rx) = mpsc::channel::<Message>();
        std::thread::scope(|scope| {
            let mut running = 0;
            for part in self.parts {
                let (tx, parts_stop) = (tx.clone(), &parts_stop);
                running += 1;
                scope.spawn(move || {
                    let ended = part.run(
                        &mut |events| tx.send(Message::Events(events)).is_ok(),
                        parts_stop,
                    );
                    let _ = tx.send(Message::Ended(ended));
                });
            }
            drop(tx);
            let mut result = Ok(());
            let mut consumer_gone = false;
            while running > 0 {
                match rx.recv_timeout(STOP_POLL) {
                    Ok(Message::Events(events)) => {
                        if !consumer_gone && !sink(events) {
                            consumer_gone = true;
                            parts_stop.store(true, Ordering::SeqCst);
                        }
                    }
                    Ok(Message::Ended(ended)) => {
                        running -= 1;
                        if let Err(e) = ended {
                            if result.is_ok() {
                                result = Err(e);
                            }
                            parts_stop.store(true, Ordering::SeqCst);
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
                if stop.load(Ordering::SeqCst) {
                    parts_stop.store(true, Ordering::SeqCst);
                }
            }
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A part that delivers its events in `batches`, then waits for its stop flag (or
    /// fails at once).
    struct Scripted {
        batches: Vec<Vec<Event>>,
        fail: bool,
    }

    impl Backend for Scripted {
        fn name(&self) -> &'static str {
            "scripted"
        }

        fn run(
            self: Box<Self>,
            sink: &mut dyn FnMut(Vec<Event>) -> bool,
            stop: &AtomicBool,
        ) -> Result<(), BackendError> {
            for batch in self.batches {
                if !sink(batch) {
                    return Ok(());
                }
            }
            if self.fail {
                return Err(BackendError::Read(std::io::Error::other("lost")));
            }
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            // Drained after the stop, as the real backends do.
            sink(vec![Event::Overflow]);
            Ok(())
        }
    }

    fn rescan(path: &str) -> Event {
        Event::Rescan {
            path: PathBuf::from(path),
        }
    }

    fn part(batches: Vec<Vec<Event>>, fail: bool) -> Box<dyn Backend> {
        Box::new(Scripted { batches, fail })
    }

    #[test]
    fn every_part_reaches_the_consumer_until_stopped() {
        let hybrid = Box::new(Hybrid::new(
            vec![
                part(vec![vec![rescan("/a/1")], vec![rescan("/a/2")]], false),
                part(vec![vec![rescan("/b/1")]], false),
            ],
            "two",
        ));
        let stop = AtomicBool::new(false);
        let mut seen = Vec::new();
        let mut sink = |events: Vec<Event>| {
            seen.extend(events);
            if seen
                .iter()
                .filter(|e| matches!(e, Event::Rescan { .. }))
                .count()
                == 3
            {
                stop.store(true, Ordering::SeqCst);
            }
            true
        };
        hybrid.run(&mut sink, &stop).expect("runs");
        // One part's batches stay in order; both parts drained after the stop.
        let a: Vec<&Event> = seen
            .iter()
            .filter(|e| matches!(e, Event::Rescan { path } if path.starts_with("/a")))
            .collect();
        assert_eq!(a, vec![&rescan("/a/1"), &rescan("/a/2")]);
        assert!(seen.contains(&rescan("/b/1")));
        assert_eq!(seen.iter().filter(|e| **e == Event::Overflow).count(), 2);
    }

    #[test]
    fn a_failing_part_stops_the_others_and_is_reported() {
        let hybrid = Box::new(Hybrid::new(
            vec![part(vec![], false), part(vec![vec![rescan("/b")]], true)],
            "two",
        ));
        let stop = AtomicBool::new(false);
        let mut seen = Vec::new();
        let result = hybrid.run(
            &mut |events| {
                seen.extend(events);
                true
            },
            &stop,
        );
        assert!(matches!(result, Err(BackendError::Read(_))));
        assert!(seen.contains(&rescan("/b")));
    }

    #[test]
    fn a_consumer_that_left_stops_every_part() {
        let hybrid = Box::new(Hybrid::new(
            vec![part(vec![vec![rescan("/a")]], false), part(vec![], false)],
            "two",
        ));
        let stop = AtomicBool::new(false);
        let mut calls = 0;
        hybrid
            .run(
                &mut |_| {
                    calls += 1;
                    false
                },
                &stop,
            )
            .expect("runs");
        assert_eq!(calls, 1, "nothing is delivered after the consumer left");
    }
}
