//! The snapshot the daemon publishes: what it is doing, per group and per target, as of one
//! moment, and the one-line JSON form it travels in.
//!
//! These are plain data types with no I/O, kept apart from the servers and the renderers so
//! that the daemon fills them in without depending on how they are served or shown. Every
//! struct takes `#[serde(default)]`, so a client and a daemon of different versions still
//! understand each other: unknown fields are ignored and missing ones take their defaults.

use std::io;

use serde::{Deserialize, Serialize};

use super::histogram::Histogram;

/// What the daemon is doing, as of one moment.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct StatusSnapshot {
    pub pid: u32,
    pub version: String,
    pub started_unix_ms: u64,
    /// When this snapshot was taken (0: the placeholder before the first one).
    pub taken_unix_ms: u64,
    /// `fanotify` or `inotify`.
    pub backend: String,
    /// Changes under the source roots that marked a path for syncing.
    pub events_total: u64,
    /// Everything the backend read, including changes outside every root (fanotify and
    /// ebpf watch whole filesystems).
    pub backend_events_total: u64,
    /// Recent rate of `events_total`.
    pub events_per_sec: f64,
    pub overflows: u64,
    pub rescans: u64,
    pub groups: Vec<GroupStatus>,
}

/// One source root and the targets it is replicated to.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct GroupStatus {
    pub name: String,
    /// The source directory, for display (non-UTF-8 bytes replaced).
    pub source: String,
    pub targets: Vec<TargetStatus>,
}

/// Where one target stands.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct TargetStatus {
    pub name: String,
    /// The destination as given (local path, `host::module`, `rsync://...`, `host:/path`).
    pub dest: String,
    pub state: TargetState,
    /// Paths marked dirty and not yet handed to rsync.
    pub dirty_paths: u64,
    /// How long the oldest change not yet synced has been waiting, if any is.
    pub oldest_unsynced_ms: Option<u64>,
    /// Paths in the rsync run under way.
    pub in_flight_paths: u64,
    pub last_sync: Option<LastSync>,
    /// When the last successful sync (not a verify pass) finished.
    pub last_success_unix_ms: Option<u64>,
    pub consecutive_failures: u32,
    pub rsync_runs: u64,
    pub retries_total: u64,
    /// Failed batches by the class of rsync's exit.
    pub failures: Failures,
    /// How long rsync runs took, in seconds.
    pub run_seconds: Histogram,
    /// Bytes rsync sent, as its `--stats` counts them (file data, checksums, file lists).
    pub sent_bytes: u64,
    /// Bytes rsync received.
    pub received_bytes: u64,
    /// File data sent as it is (the part the delta algorithm did not find on the target).
    pub literal_bytes: u64,
    pub verify: Option<LastVerify>,
    /// The connection of an ssh target (None for other targets).
    pub ssh: Option<SshConnection>,
    /// Paths rsync keeps failing on, set aside while the rest syncs (the first
    /// [`MAX_FAILING_SHOWN`]; `failing_paths_total` counts them all).
    pub failing_paths: Vec<FailingPath>,
    pub failing_paths_total: u64,
    /// Runs of the target's `post_sync` command, and those that failed.
    pub post_sync_runs: u64,
    pub post_sync_failures: u64,
}

/// How many failing paths a snapshot lists per target.
pub const MAX_FAILING_SHOWN: usize = 100;

/// A path rsync keeps failing on.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct FailingPath {
    /// Relative to the source root (non-UTF-8 bytes replaced).
    pub path: String,
    /// What rsync said, e.g. `Permission denied (13)`.
    pub error: String,
    /// When it first failed, milliseconds since the Unix epoch.
    pub since_unix_ms: u64,
    /// Failed tries in a row.
    pub failures: u32,
}

/// Failed batches of a target, by the class of the exit of the run that failed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Failures {
    /// Retried with backoff: connection, I/O, timeout, partial transfer, killed.
    pub transient: u64,
    /// Usage, protocol or unsupported-option errors.
    pub fatal: u64,
    /// A listed directory changed while rsync read it.
    pub source_race: u64,
}

impl Failures {
    /// Each class with its name (as in metric labels) and count.
    pub fn by_class(&self) -> [(&'static str, u64); 3] {
        [
            ("transient", self.transient),
            ("fatal", self.fatal),
            ("source_race", self.source_race),
        ]
    }
}

/// The connection an ssh target's runs share.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct SshConnection {
    /// A master connection answers on the control socket.
    pub up: bool,
    /// Since when it has been up (or down); None before the daemon first looked.
    pub since_unix_ms: Option<u64>,
    /// Connections made after the first one (each lost one made again).
    pub reconnects: u64,
}

/// The state of a target.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TargetState {
    /// The first full pass has not finished yet.
    #[default]
    InitialSync,
    /// Nothing dirty and nothing in flight.
    InStep,
    /// Changes are waiting or an rsync run is under way.
    Syncing,
    /// The last run failed with a retryable error; the next one waits for the backoff.
    Retrying,
    /// A fatal rsync error stopped this target.
    Failed,
}

impl TargetState {
    /// The name used in JSON and in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            TargetState::InitialSync => "initial_sync",
            TargetState::InStep => "in_step",
            TargetState::Syncing => "syncing",
            TargetState::Retrying => "retrying",
            TargetState::Failed => "failed",
        }
    }

    /// The name shown to people.
    pub fn human(self) -> &'static str {
        match self {
            TargetState::InitialSync => "initial sync",
            TargetState::InStep => "in step",
            TargetState::Syncing => "syncing",
            TargetState::Retrying => "retrying",
            TargetState::Failed => "FAILED",
        }
    }

    /// Whether the target is being kept in step: not stopped, not failing.
    pub fn is_up(self) -> bool {
        !matches!(self, TargetState::Retrying | TargetState::Failed)
    }
}

/// The outcome of the last rsync run of a target.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct LastSync {
    pub finished_unix_ms: u64,
    pub ok: bool,
    /// rsync's exit code; `None` when it did not exit normally (signal, failed to start).
    pub code: Option<i32>,
    pub paths: u64,
    pub elapsed_ms: u64,
    /// The error (or a summary) for people; empty when there is nothing to say.
    pub detail: String,
}

/// The outcome of the last verification pass of a target.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct LastVerify {
    pub finished_unix_ms: u64,
    /// Paths that differed and were synced again.
    pub fixed_paths: u64,
    pub ok: bool,
}

/// The JSON line for a snapshot. JSON has no NaN or infinity, so a rate that is not finite
/// goes out as 0.
pub(super) fn encode_snapshot(snapshot: &StatusSnapshot) -> io::Result<String> {
    let mut line = if snapshot.events_per_sec.is_finite() {
        serde_json::to_string(snapshot)
    } else {
        serde_json::to_string(&StatusSnapshot {
            events_per_sec: 0.0,
            ..snapshot.clone()
        })
    }
    .map_err(io::Error::other)?;
    line.push('\n');
    Ok(line)
}

/// A snapshot that fills every field the renderers and the servers show, shared by their
/// tests.
#[cfg(test)]
pub(super) fn sample() -> StatusSnapshot {
    StatusSnapshot {
        pid: 4242,
        version: "0.1.0".into(),
        started_unix_ms: 1_000_000,
        taken_unix_ms: 1_000_000 + 3_600_000,
        backend: "fanotify".into(),
        events_total: 123_456,
        backend_events_total: 9_876_543,
        events_per_sec: 78.25,
        overflows: 2,
        rescans: 3,
        groups: vec![
            GroupStatus {
                name: "data".into(),
                source: "/srv/data".into(),
                targets: vec![
                    TargetStatus {
                        name: "local".into(),
                        dest: "/backup/data".into(),
                        state: TargetState::InStep,
                        last_sync: Some(LastSync {
                            finished_unix_ms: 1_000_000 + 3_600_000 - 1_200,
                            ok: true,
                            code: Some(0),
                            paths: 17,
                            elapsed_ms: 35,
                            detail: String::new(),
                        }),
                        last_success_unix_ms: Some(1_000_000 + 3_600_000 - 1_200),
                        rsync_runs: 12,
                        run_seconds: {
                            let mut h = Histogram::new(&super::histogram::RUN_SECONDS_BOUNDS);
                            for s in [0.02, 0.03, 0.2, 1.5, 1.5, 40.0] {
                                h.observe(s);
                            }
                            h
                        },
                        sent_bytes: 2_500_776,
                        received_bytes: 54,
                        literal_bytes: 2_500_003,
                        verify: Some(LastVerify {
                            finished_unix_ms: 1_000_000 + 3_600_000 - 180_000,
                            fixed_paths: 0,
                            ok: true,
                        }),
                        ..TargetStatus::default()
                    },
                    TargetStatus {
                        name: "remote \"eu\"".into(),
                        dest: "backup::data".into(),
                        state: TargetState::Retrying,
                        dirty_paths: 120,
                        oldest_unsynced_ms: Some(185_000),
                        in_flight_paths: 40,
                        last_sync: Some(LastSync {
                            finished_unix_ms: 1_000_000 + 3_600_000 - 5_000,
                            ok: false,
                            code: Some(10),
                            paths: 40,
                            elapsed_ms: 2_500,
                            detail: "rsync: failed to connect\nconnection refused".into(),
                        }),
                        last_success_unix_ms: None,
                        consecutive_failures: 2,
                        rsync_runs: 30,
                        retries_total: 4,
                        failures: Failures {
                            transient: 3,
                            fatal: 0,
                            source_race: 1,
                        },
                        run_seconds: Histogram::new(&super::histogram::RUN_SECONDS_BOUNDS),
                        sent_bytes: 0,
                        received_bytes: 0,
                        literal_bytes: 0,
                        verify: None,
                        ssh: Some(SshConnection {
                            up: false,
                            since_unix_ms: Some(1_000_000 + 3_600_000 - 65_000),
                            reconnects: 3,
                        }),
                        ..TargetStatus::default()
                    },
                ],
            },
            GroupStatus {
                name: "we\\ird\nname".into(),
                source: "/srv/other".into(),
                targets: vec![],
            },
        ],
    }
}

/// "Now" for [`sample`]: one hour after its start.
#[cfg(test)]
pub(super) const NOW: u64 = 1_000_000 + 3_600_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_json_round_trip() {
        let s = sample();
        let line = encode_snapshot(&s).unwrap();
        assert!(line.ends_with('\n'));
        assert_eq!(line.matches('\n').count(), 1, "one line: {line}");
        assert!(line.contains("\"state\":\"in_step\""), "{line}");
        assert!(line.contains("\"state\":\"retrying\""), "{line}");
        let back: StatusSnapshot = serde_json::from_str(line.trim_end()).unwrap();
        assert_eq!(back, s);
        // Fields a peer does not know about are ignored, missing ones take defaults.
        let partial: StatusSnapshot =
            serde_json::from_str(r#"{"pid":7,"future_field":1,"groups":[{"name":"g"}]}"#).unwrap();
        assert_eq!(partial.pid, 7);
        assert_eq!(partial.groups[0].name, "g");
    }

    #[test]
    fn non_finite_rate_is_sent_as_zero() {
        let s = StatusSnapshot {
            events_per_sec: f64::NAN,
            ..sample()
        };
        let back: StatusSnapshot =
            serde_json::from_str(encode_snapshot(&s).unwrap().trim_end()).unwrap();
        assert_eq!(back.events_per_sec, 0.0);
    }
}
