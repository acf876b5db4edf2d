//! What the engine says about itself: the status snapshot `watcher status` and the metrics
//! read, the periodic housekeeping that refreshes it, and systemd's `STATUS=` line.

use super::*;

impl Engine {
    pub(super) fn snapshot(&self, stats: &Stats, started: SystemTime) -> StatusSnapshot {
        let now = Instant::now();
        let no_runs = TargetStats::default();
        let mut groups: Vec<status::GroupStatus> = Vec::new();
        for g in &self.config.groups {
            let targets = self
                .targets
                .iter()
                .filter(|t| t.settings.group_name == g.name)
                .map(|t| (t, stats.target(&t.settings).unwrap_or(&no_runs)))
                .map(|(t, ts)| status::TargetStatus {
                    name: t.settings.name.clone(),
                    dest: t.settings.dest.to_string(),
                    state: t.machine.phase(t.backlog.len()),
                    dirty_paths: t.backlog.len() as u64,
                    oldest_unsynced_ms: t
                        .backlog
                        .oldest_unsynced()
                        .map(|o| now.saturating_duration_since(o).as_millis() as u64),
                    in_flight_paths: t.backlog.in_flight_paths() as u64,
                    last_sync: ts.last_sync.clone(),
                    last_success_unix_ms: ts.last_success_unix_ms,
                    consecutive_failures: t.machine.failures(),
                    rsync_runs: ts.runs,
                    retries_total: ts.retries,
                    failures: ts.failures.clone(),
                    run_seconds: ts.run_seconds.clone(),
                    sent_bytes: ts.transfer.sent,
                    received_bytes: ts.transfer.received,
                    literal_bytes: ts.transfer.literal,
                    verify: ts.last_verify.clone(),
                    failing_paths: t
                        .failing
                        .iter()
                        .take(status::MAX_FAILING_SHOWN)
                        .map(|(path, f)| status::FailingPath {
                            path: path.to_string_lossy().into_owned(),
                            error: f.error.clone(),
                            since_unix_ms: f.since_unix_ms,
                            failures: f.failures,
                        })
                        .collect(),
                    failing_paths_total: t.failing.len() as u64,
                    post_sync_runs: ts.post_sync.runs.load(Ordering::Relaxed),
                    post_sync_failures: ts.post_sync.failures.load(Ordering::Relaxed),
                    ssh: t.settings.link.as_ref().map(|l| {
                        let c = l.status();
                        status::SshConnection {
                            up: c.up,
                            since_unix_ms: c.since_unix_ms,
                            reconnects: c.reconnects,
                        }
                    }),
                })
                .collect();
            groups.push(status::GroupStatus {
                name: g.name.clone(),
                source: g.source.display().to_string(),
                targets,
            });
        }
        StatusSnapshot {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_unix_ms: unix_ms(started),
            taken_unix_ms: unix_ms(SystemTime::now()),
            backend: self.backend_name.to_string(),
            events_total: stats.events,
            backend_events_total: stats.backend_events,
            events_per_sec: stats.events_per_sec,
            overflows: stats.overflows,
            rescans: stats.rescans,
            groups,
        }
    }

    /// Housekeeping: journals made durable, the event rate, a fresh status snapshot.
    pub(super) fn housekeeping(
        &mut self,
        stats: &mut Stats,
        status_tx: &watch::Sender<StatusSnapshot>,
        started: SystemTime,
    ) {
        for t in &mut self.targets {
            t.backlog.sync_journal(&t.settings.dest);
            t.root_still_there();
            if let Some(link) = &t.settings.link {
                link.observe_every(LINK_CHECK);
            }
        }
        let now = Instant::now();
        if let Some((at, count)) = stats.rate_mark {
            let secs = now.saturating_duration_since(at).as_secs_f64();
            if secs >= 1.0 {
                stats.events_per_sec = (stats.events - count) as f64 / secs;
                stats.rate_mark = Some((now, stats.events));
            }
        } else {
            stats.rate_mark = Some((now, stats.events));
        }
        status_tx.send_replace(self.snapshot(stats, started));
    }

    /// The `STATUS=` line for systemd: initial sync progress, in step, retrying targets.
    pub(super) fn status_text(&self) -> String {
        let several_groups = self.config.groups.len() > 1;
        let standings: Vec<Standing> = self
            .targets
            .iter()
            .map(|t| Standing {
                label: if several_groups {
                    format!("{}/{}", t.settings.group_name, t.settings.name)
                } else {
                    t.settings.name.clone()
                },
                in_step: t.machine.in_step(),
                retrying: t.machine.failures() > 0,
                failed: t.machine.given_up(),
            })
            .collect();
        status_text(&standings)
    }
}
