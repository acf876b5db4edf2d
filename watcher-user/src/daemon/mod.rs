//! Wiring: backend thread -> filter -> backlog per target -> state machine -> rsync runner.
//! Owns the event loop, its lifecycle, signals and reloads; the decisions (when to flush,
//! what a failed run means) are each target's [`SyncMachine`]'s.
//!
//! The types live here; their steps are split by concern: `targets` (one target's steps
//! and routing events to targets), `prepare` (building an engine from a configuration
//! without touching the running one), `report` (status snapshot, housekeeping, systemd
//! STATUS), `stats` (counters that survive reloads).

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::backend::{self, Backend, OwnPids};
use crate::backlog::Backlog;
use crate::config::Config;
use crate::dirty::{Batch, Scope};
use crate::event::{ChangeKind, Event};
use crate::failing::{self, FailingPaths};
use crate::filter::{Filter, FilterBuilder, GroupId, Match};
use crate::hardlinks::FileKey;
use crate::journal::{Journal, Recovered};
use crate::link_walk::Links as HardLinks;
use crate::notify::{Standing, StatusLine, notify, status_text};
use crate::post_sync;
use crate::rsync::{self, RsyncOptions};
use crate::runner::{self, Job, is_dir};
use crate::ssh::{self, Links};
use crate::status::{self, Failures, Histogram, LastSync, LastVerify, StatusSnapshot};
use crate::sync_machine::{
    Action, FIRST_BACKOFF, FlushKind, GiveUpCause, Mode, RACES_BEFORE_WHOLE_TREE, RetryCause,
    SyncMachine, Verdict,
};
use crate::target::Target;

mod prepare;
mod report;
mod stats;
mod targets;

use stats::unix_ms;
use targets::route;

/// How the daemon runs, beyond what the configuration says.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Re-read on SIGHUP (a config file given with `watcher run`).
    pub config_path: Option<PathBuf>,
    /// Journal dirty paths under the configured state directory.
    pub journal: bool,
    /// Serve `watcher status` on the configured socket (and metrics, if configured).
    pub status: bool,
    /// rsync --dry-run --itemize-changes; nothing on any target changes.
    pub dry_run: bool,
}

/// How often journals are made durable and the status snapshot is refreshed.
const HOUSEKEEPING: Duration = Duration::from_millis(200);

/// How often an idle ssh target's connection is looked at, for status.
const LINK_CHECK: Duration = Duration::from_secs(2);

/// Batches of events in flight from the reader thread; when full, the reader stops reading
/// and the kernel queue absorbs the burst (or overflows, which triggers a rescan).
const EVENT_CHANNEL_BATCHES: usize = 256;

/// What a target is: where it syncs from and to, and how rsync is invoked. Fixed for the
/// life of an engine.
struct Settings {
    group: GroupId,
    group_name: String,
    name: String,
    dest: Target,
    root: PathBuf,
    /// What the root was when the engine started: a root replaced, moved or mounted over
    /// stops its group rather than being followed.
    root_id: FileId,
    rsync: RsyncOptions,
    /// The group's hard-link index, shared by its targets.
    hard_links: Arc<HardLinks>,
    /// The shared connection of an ssh target.
    link: Option<Arc<ssh::Link>>,
    /// The target's `post_sync` command, when it has one (not in a dry run).
    post_sync: Option<Arc<post_sync::Hook>>,
    /// The target's rsync started ahead of its next lone change (not in a dry run).
    standby: Option<Arc<rsync::Standby>>,
}

/// A file's identity: its device and inode, read without following a symlink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

/// What a target has done, for status and the summary. Kept across reloads (in [`Stats`]),
/// so counters only ever grow.
#[derive(Debug)]
struct TargetStats {
    runs: u64,
    /// Batches put back to be retried after a failed run.
    retries: u64,
    failures: Failures,
    run_seconds: Histogram,
    transfer: rsync::TransferStats,
    last_sync: Option<LastSync>,
    last_success_unix_ms: Option<u64>,
    last_verify: Option<LastVerify>,
    /// Runs and failures of its `post_sync` command.
    post_sync: Arc<post_sync::Counters>,
}

/// One target: its own backlog and decisions, so a slow or unreachable target never holds
/// back another.
struct TargetState {
    settings: Settings,
    backlog: Backlog,
    machine: SyncMachine,
    /// Paths rsync keeps failing on, set aside so the rest keeps syncing.
    failing: FailingPaths,
}

/// Counters for status and the summary at exit. They belong to the daemon, not to one
/// configuration: a reload keeps them.
#[derive(Debug, Default)]
struct Stats {
    event_batches: u64,
    /// Changes under a source root that marked a path for some target.
    events: u64,
    /// Everything the backend read, including changes elsewhere on a watched filesystem.
    backend_events: u64,
    overflows: u64,
    rescans: u64,
    /// For events/s in status: (when, events) at the last refresh.
    rate_mark: Option<(Instant, u64)>,
    events_per_sec: f64,
    /// Per group and target name.
    targets: HashMap<String, HashMap<String, TargetStats>>,
}

/// `watcher sync` / `watcher run`: returns the process exit code.
pub fn run(config: Config, opts: RunOptions) -> anyhow::Result<i32> {
    let version = rsync::probe(&config.daemon.rsync)?;
    tracing::debug!(version, "rsync self-test passed");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(supervise(config, opts))
}

/// Where an engine's event loop stands.
enum Lifecycle {
    /// Syncing changes as they come; `ready` once every target finished start-up.
    Running { ready: bool },
    /// Flushing what is dirty, then exiting.
    Draining(DrainCause),
    /// Waiting for the flushes in flight, then handing over to a new configuration.
    Reloading(Box<Config>),
}

/// Why an engine drains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DrainCause {
    /// SIGTERM or SIGINT.
    Signal,
    /// The event reader stopped on its own: exit non-zero.
    ReaderStopped,
}

impl Lifecycle {
    fn mode(&self) -> Mode {
        match self {
            Lifecycle::Running { .. } => Mode::Running,
            Lifecycle::Draining(_) => Mode::Draining,
            Lifecycle::Reloading(_) => Mode::Reloading,
        }
    }
}

/// Everything built from one configuration.
struct Engine {
    config: Config,
    filter: Filter,
    targets: Vec<TargetState>,
    backend_name: &'static str,
    /// Event batches from the reader thread; None once it closed the channel.
    events: Option<mpsc::Receiver<Vec<Event>>>,
    reader: Option<std::thread::JoinHandle<Result<(), backend::BackendError>>>,
    stop: Arc<AtomicBool>,
    /// Set on SIGTERM/SIGINT: a verify pass in flight stops at once (it is only a check
    /// and runs again on its schedule), so the exit never waits for a whole-tree compare.
    stop_verify: watch::Sender<bool>,
    /// The connections of the ssh targets.
    links: Links,
    /// Where the next round of flush decisions starts (`max_processes` takes turns).
    next_turn: usize,
}

/// A configuration that passed every check, with its backend started (so no change is
/// missed), not yet running.
struct Prepared {
    config: Config,
    filter: Filter,
    targets: Vec<TargetState>,
    backend: Box<dyn Backend>,
    /// The connections of the ssh targets, checked.
    links: Links,
}

/// What ended one engine's event loop.
enum Outcome {
    Exit(i32),
    Reload(Box<Config>),
}

async fn supervise(config: Config, opts: RunOptions) -> anyhow::Result<i32> {
    let own_pids = Arc::new(OwnPids::new());
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    let signals = Signals {
        term: &mut sigterm,
        int: &mut sigint,
        hup: &mut sighup,
    };

    let (status_tx, status_rx) = watch::channel(StatusSnapshot::default());
    let mut servers = JoinSet::new();
    if opts.status {
        let socket = status::StatusSocket::bind(&config.daemon.status_socket)
            .context("opening the status socket")?;
        let rx = status_rx.clone();
        servers.spawn(async move {
            if let Err(e) = socket.serve(rx).await {
                tracing::error!(error = %e, "status socket stopped");
            }
        });
        if let Some(addr) = config.daemon.metrics {
            let listener = status::MetricsListener::bind(addr, config.daemon.metrics_allow_remote)
                .context("opening the metrics endpoint")?;
            let rx = status_rx.clone();
            servers.spawn(async move {
                if let Err(e) = listener.serve(rx).await {
                    tracing::error!(error = %e, "metrics endpoint stopped");
                }
            });
        }
    }

    let started = SystemTime::now();
    let mut stats = Stats::default();
    let prepared = Engine::prepare(config, &opts, &own_pids, None)?;
    let mut engine = prepared.into_engine(&opts, Vec::new());
    // The marks are set: every change from now on is seen, so the service is up. The
    // initial sync goes on behind it and is reported in STATUS= lines.
    notify(&[sd_notify::NotifyState::Ready]);
    let mut signals = signals;
    let code = loop {
        match engine
            .run(
                &opts,
                &own_pids,
                &status_tx,
                started,
                &mut stats,
                &mut signals,
            )
            .await?
        {
            Outcome::Exit(code) => break code,
            Outcome::Reload(new_config) => {
                match Engine::prepare(*new_config, &opts, &own_pids, Some(&engine)) {
                    Ok(prepared) => {
                        // The new marks are set and every new part is ready: stop the old reader,
                        // take in its last events, and carry every dirty path and journal over.
                        let (carried, links) = engine.stop_and_hand_over().await;
                        links.close_except(&prepared.links);
                        engine = prepared.into_engine(&opts, carried);
                        tracing::info!("configuration reloaded");
                        notify(&[sd_notify::NotifyState::Ready]);
                    }
                    Err(e) => {
                        tracing::error!("reload failed, keeping the running configuration: {e:#}");
                        notify(&[sd_notify::NotifyState::Ready]);
                    }
                }
            }
        }
    };
    engine.links.close_except(&Links::default());
    servers.abort_all();
    Ok(code)
}

struct Signals<'a> {
    term: &'a mut tokio::signal::unix::Signal,
    int: &'a mut tokio::signal::unix::Signal,
    hup: &'a mut tokio::signal::unix::Signal,
}

/// Dirty paths and journals carried across a reload, keyed by group and target name.
type HandOver = Vec<(String, String, Batch, Option<Journal>)>;

impl Engine {
    /// The dirty paths of every target and their journals, after the reader stopped and its
    /// last events were routed.
    async fn stop_and_hand_over(mut self) -> (HandOver, Links) {
        self.stop.store(true, Ordering::Relaxed);
        let now = Instant::now();
        if let Some(events) = self.events.as_mut() {
            while let Some(batch) = events.recv().await {
                for event in &batch {
                    route(&self.filter, &mut self.targets, event, now);
                }
            }
        }
        if let Some(reader) = self.reader.take() {
            let _ = tokio::task::spawn_blocking(move || reader.join()).await;
        }
        let handed = self
            .targets
            .into_iter()
            .map(|t| {
                let (batch, journal) = t.backlog.hand_over();
                (t.settings.group_name, t.settings.name, batch, journal)
            })
            .collect();
        (handed, self.links)
    }

    /// Starts every flush the targets' machines ask for; returns the earliest instant one of
    /// them wants to be asked again.
    fn start_flushes(
        &mut self,
        mode: Mode,
        tasks: &mut JoinSet<runner::Done>,
        own_pids: &Arc<OwnPids>,
    ) -> Option<Instant> {
        let now = Instant::now();
        let mut wake: Option<Instant> = None;
        // `max_processes`: the targets take turns, starting after the last one that got to run.
        let limit = self.config.daemon.max_processes.unwrap_or(usize::MAX);
        let mut running = self
            .targets
            .iter()
            .filter(|t| t.machine.in_flight().is_some())
            .count();
        let count = self.targets.len();
        for k in 0..count {
            let index = (self.next_turn + k) % count;
            let t = &mut self.targets[index];
            if mode == Mode::Running {
                t.retry_set_aside(now);
                if let Some(at) = t.failing.next_due() {
                    wake = Some(wake.map_or(at, |w| w.min(at)));
                }
            }
            if running >= limit {
                // Asked again when a run in flight finishes.
                continue;
            }
            match t.machine.decide(now, t.backlog.len(), mode) {
                Action::Flush(_) if !t.root_still_there() => {}
                Action::Flush(kind) => {
                    let mut job = t.start_flush(index, kind, now);
                    if kind == FlushKind::Verify {
                        job.stop = Some(self.stop_verify.subscribe());
                    }
                    tasks.spawn(runner::run(job, own_pids.clone()));
                    running += 1;
                    self.next_turn = index + 1;
                }
                Action::WaitUntil(at) => wake = Some(wake.map_or(at, |w| w.min(at))),
                Action::Idle => {}
            }
        }
        wake
    }

    /// Routes a batch of events from the reader and tells each touched target's machine.
    fn take_in(&mut self, batch: &[Event], stats: &mut Stats) {
        let now = Instant::now();
        stats.event_batches += 1;
        stats.backend_events += batch.len() as u64;
        // Whether the batch's latest change ends a write: a lone change then needs no
        // settle (see `flush`).
        let settled = batch
            .iter()
            .rev()
            .find_map(|e| match e {
                Event::Change { kind, is_dir, .. } => Some(kind.ends_a_write(*is_dir)),
                _ => None,
            })
            .unwrap_or(false);
        for event in batch {
            let marked = route(&self.filter, &mut self.targets, event, now);
            match event {
                Event::Overflow => stats.overflows += 1,
                Event::OtherNamesChanged { .. } => {}
                Event::Rescan { .. } => stats.rescans += 1,
                Event::Change { .. } => stats.events += u64::from(marked),
                Event::Renamed { .. } => {}
            }
        }
        for t in &mut self.targets {
            if t.backlog.take_touched() {
                t.machine.changed(now, settled);
            }
        }
    }

    async fn run(
        &mut self,
        opts: &RunOptions,
        own_pids: &Arc<OwnPids>,
        status_tx: &watch::Sender<StatusSnapshot>,
        started: SystemTime,
        stats: &mut Stats,
        signals: &mut Signals<'_>,
    ) -> anyhow::Result<Outcome> {
        let mut tasks: JoinSet<runner::Done> = JoinSet::new();
        let mut lifecycle = Lifecycle::Running { ready: false };
        let mut status_line = StatusLine::default();
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut watchdog =
            sd_notify::watchdog_enabled().map(|period| tokio::time::interval(period / 2));
        if self.targets.iter().any(|t| !t.machine.in_step()) {
            tracing::info!("initial sync started");
        }

        loop {
            let wake = self.start_flushes(lifecycle.mode(), &mut tasks, own_pids);
            // An unreachable target must not hold the service in start-up forever: its
            // initial sync keeps being retried after `ready`, and status shows it.
            if let Lifecycle::Running { ready } = &mut lifecycle
                && !*ready
                && self.targets.iter().all(|t| t.machine.started_up())
            {
                *ready = true;
                tracing::info!(targets = self.targets.len(), "ready");
            }
            status_line.update(self.status_text());
            if self.targets.iter().all(|t| t.machine.given_up()) {
                break;
            }
            let in_flight = self.targets.iter().any(|t| t.machine.in_flight().is_some());
            match &lifecycle {
                Lifecycle::Reloading(_) if !in_flight => break,
                Lifecycle::Draining(_)
                    if self.events.is_none()
                        && self
                            .targets
                            .iter()
                            .all(|t| t.machine.settled(t.backlog.len())) =>
                {
                    break;
                }
                _ => {}
            }

            let sleep = tokio::time::sleep_until(
                wake.map(tokio::time::Instant::from_std)
                    .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600)),
            );
            tokio::select! {
                msg = async { match self.events.as_mut() { Some(rx) => rx.recv().await, None => std::future::pending().await } } => match msg {
                    Some(batch) => self.take_in(&batch, stats),
                    None => {
                        self.events = None;
                        if let Lifecycle::Running { .. } = lifecycle {
                            tracing::error!("the event reader stopped; flushing and exiting");
                            lifecycle = Lifecycle::Draining(DrainCause::ReaderStopped);
                        }
                    }
                },
                Some(joined) = tasks.join_next() => {
                    let done = joined.context("a flush task panicked")?;
                    self.finish(done, lifecycle.mode(), stats);
                },
                _ = housekeeping.tick() => self.housekeeping(stats, status_tx, started),
                _ = async { match watchdog.as_mut() { Some(w) => { w.tick().await; } None => std::future::pending().await } } => {
                    notify(&[sd_notify::NotifyState::Watchdog]);
                },
                _ = sleep => {},
                _ = signals.term.recv() => begin_shutdown(&mut lifecycle, &self.stop, &self.stop_verify, "SIGTERM")?,
                _ = signals.int.recv() => begin_shutdown(&mut lifecycle, &self.stop, &self.stop_verify, "SIGINT")?,
                _ = signals.hup.recv() => {
                    let path = opts.config_path.as_deref();
                    match (path, &lifecycle) {
                        (Some(path), Lifecycle::Running { .. } | Lifecycle::Reloading(_)) => {
                            notify(&[sd_notify::NotifyState::Reloading]);
                            match crate::config::load(path) {
                                Ok(cfg) => {
                                    tracing::info!(config = %path.display(), "SIGHUP: reloading once in-flight syncs finish");
                                    lifecycle = Lifecycle::Reloading(Box::new(cfg));
                                }
                                Err(e) => {
                                    tracing::error!("SIGHUP: {e}; keeping the running configuration");
                                    notify(&[sd_notify::NotifyState::Ready]);
                                }
                            }
                        }
                        (Some(_), Lifecycle::Draining(_)) => {
                            tracing::info!("SIGHUP ignored: exiting");
                        }
                        (None, _) => tracing::info!("SIGHUP ignored: no configuration file to reload"),
                    }
                },
            }
        }

        if let Lifecycle::Reloading(cfg) = lifecycle {
            status_tx.send_replace(self.snapshot(stats, started));
            return Ok(Outcome::Reload(cfg));
        }
        let mut reader_failed = lifecycle_failed(&lifecycle);
        notify(&[sd_notify::NotifyState::Stopping]);
        self.stop.store(true, Ordering::Relaxed);
        if let Some(events) = self.events.as_mut() {
            events.close();
        }
        if let Some(reader) = self.reader.take() {
            match tokio::task::spawn_blocking(move || reader.join()).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => {
                    tracing::error!("event reader failed: {}", backend::error_chain(&e));
                    reader_failed = true;
                }
                _ => bail!("the event reader thread panicked"),
            }
        }
        let unsynced: usize = self.targets.iter().map(|t| t.backlog.len()).sum();
        for t in &mut self.targets {
            t.backlog.close(&t.settings.dest);
        }
        tracing::info!(
            events = stats.events,
            backend_events = stats.backend_events,
            event_batches = stats.event_batches,
            overflows = stats.overflows,
            rescans = stats.rescans,
            rsync_runs = stats
                .targets
                .values()
                .flat_map(|g| g.values())
                .map(|t| t.runs)
                .sum::<u64>(),
            unsynced,
            "stopped"
        );
        let gave_up = self.targets.iter().any(|t| t.machine.given_up());
        Ok(Outcome::Exit(i32::from(reader_failed || gave_up)))
    }

    /// Takes a finished flush into account: the target's machine decides, this carries
    /// the decision out on the backlog and says it in the log.
    fn finish(&mut self, done: runner::Done, mode: Mode, stats: &mut Stats) {
        let now = Instant::now();
        let t = &mut self.targets[done.target];
        let ts = stats.target_mut(&t.settings);
        ts.count(&done);
        let mut finished = done.finished();
        if finished.kind == FlushKind::Changes
            && let Some(failures) = &done.failures
        {
            let (rerun, changes) = t.failing.failed(now, unix_ms(SystemTime::now()), failures);
            t.log_failing(changes);
            finished.set_aside = rerun;
        }
        let verdict = t.machine.finished(now, finished, mode);
        match verdict {
            Verdict::Synced { .. } => {
                let changes = t.failing.synced();
                t.log_failing(changes);
                if let Some(hook) = &t.settings.post_sync {
                    // What the batch synced: not the paths set aside, which it left out.
                    let held: Vec<PathBuf> = t.failing.iter().map(|(p, _)| p.clone()).collect();
                    let mut synced = done.batch.clone().without_below(&held);
                    synced.entries.retain(|p| !held.contains(p));
                    synced.subtrees.retain(|p| !held.contains(p));
                    hook.synced(&synced, &ts.post_sync);
                }
            }
            Verdict::Retry {
                cause: RetryCause::PathsSetAside,
                ..
            }
            | Verdict::Verified => {}
            Verdict::Retry { .. } | Verdict::GiveUp { .. } => t.failing.not_synced(),
        }
        let record = LastSync {
            finished_unix_ms: unix_ms(SystemTime::now()),
            ok: done.class == rsync::ExitClass::Success,
            code: done.code,
            paths: done.batch.len() as u64,
            elapsed_ms: done.elapsed.as_millis() as u64,
            detail: done.detail.lines().next().unwrap_or("").to_string(),
        };
        let dest = t.settings.dest.clone();
        match verdict {
            Verdict::Verified if done.stopped => {
                t.backlog.verify_done();
                tracing::info!(target = %dest, "verify pass stopped for exit; it runs again on its schedule after the next start");
            }
            Verdict::Verified => {
                t.backlog.verify_done();
                ts.last_verify = Some(LastVerify {
                    finished_unix_ms: record.finished_unix_ms,
                    fixed_paths: done.itemized,
                    ok: record.ok,
                });
                if record.ok {
                    // What drifted, named: a repair is news an admin wants to read.
                    for line in &done.itemized_lines {
                        let (change, path) = line.split_at(line.len().min(12));
                        tracing::info!(target = %dest, change = change.trim_end(), path = %path, "verify repaired");
                    }
                    let unnamed = done
                        .itemized
                        .saturating_sub(done.itemized_lines.len() as u64);
                    if unnamed > 0 {
                        tracing::info!(target = %dest, more = unnamed, "verify repaired more paths than are named");
                    }
                    tracing::info!(target = %dest, repaired = done.itemized, "verify pass done");
                } else {
                    tracing::warn!(target = %dest, "verify pass failed: {}", done.detail);
                }
            }
            Verdict::Synced { initial_sync_done } => {
                ts.last_success_unix_ms = Some(record.finished_unix_ms);
                ts.last_sync = Some(record);
                t.backlog.confirm(&dest);
                if initial_sync_done {
                    tracing::info!(target = %dest, elapsed_ms = done.elapsed.as_millis() as u64, "initial sync done");
                }
            }
            Verdict::Retry {
                cause,
                widen,
                whole_tree,
                at,
            } => {
                ts.retries += 1;
                ts.last_sync = Some(record);
                // A run cut short (a signal, a race) may leave temporary files where a
                // transfer was under way: widening syncs the directories it worked in.
                t.put_back(done.batch, now, widen);
                match cause {
                    RetryCause::Failure => {
                        let wait =
                            at.map_or(Duration::ZERO, |at| at.saturating_duration_since(now));
                        tracing::warn!(target = %dest, retry_in_ms = wait.as_millis() as u64,
                            paths = t.backlog.len(), "{}", done.detail);
                    }
                    RetryCause::SourceRace if whole_tree => {
                        t.mark(Path::new(""), Scope::Subtree, now);
                        tracing::warn!(target = %dest, "rsync lost {RACES_BEFORE_WHOLE_TREE} \
                            runs in a row to directories changing under it; syncing the whole tree");
                    }
                    RetryCause::SourceRace => {
                        tracing::info!(target = %dest, retry_in_ms = FIRST_BACKOFF.as_millis() as u64,
                            "a listed directory changed while rsync read it; retrying");
                        tracing::debug!(target = %dest, "{}", done.detail);
                    }
                    RetryCause::PathsSetAside => {
                        tracing::debug!(target = %dest, "{}", done.detail);
                    }
                }
            }
            Verdict::GiveUp { cause, widen } => {
                ts.last_sync = Some(record);
                t.put_back(done.batch, now, widen);
                match cause {
                    GiveUpCause::Draining => {
                        tracing::error!(target = %dest, paths = t.backlog.len(),
                        "{}; exiting with changes not synced", done.detail)
                    }
                    GiveUpCause::Fatal => tracing::error!(target = %dest, paths = t.backlog.len(),
                        "{}; this target is no longer synced", done.detail),
                }
            }
        }
    }
}

/// The engine drains because its reader stopped on its own.
fn lifecycle_failed(lifecycle: &Lifecycle) -> bool {
    matches!(lifecycle, Lifecycle::Draining(DrainCause::ReaderStopped))
}

/// Starts the reader thread: it owns the backend and forwards event batches.
fn spawn_reader(
    backend: Box<dyn Backend>,
    stop: Arc<AtomicBool>,
) -> (
    mpsc::Receiver<Vec<Event>>,
    std::thread::JoinHandle<Result<(), backend::BackendError>>,
) {
    let (tx, rx) = mpsc::channel::<Vec<Event>>(EVENT_CHANNEL_BATCHES);
    let handle = std::thread::Builder::new()
        .name("events".into())
        .spawn(move || backend.run(&mut |events| tx.blocking_send(events).is_ok(), &stop))
        .expect("spawning the event reader thread");
    (rx, handle)
}

/// First signal: stop reading, stop a verify pass, flush what is dirty, exit (a pending
/// reload is dropped). Second: exit now.
fn begin_shutdown(
    lifecycle: &mut Lifecycle,
    stop: &AtomicBool,
    stop_verify: &watch::Sender<bool>,
    signal: &str,
) -> anyhow::Result<()> {
    if let Lifecycle::Draining(_) = lifecycle {
        bail!("{signal} again: exiting without flushing");
    }
    tracing::info!(signal, "flushing pending changes, then exiting");
    notify(&[sd_notify::NotifyState::Stopping]);
    *lifecycle = Lifecycle::Draining(DrainCause::Signal);
    stop.store(true, Ordering::Relaxed);
    stop_verify.send_replace(true);
    Ok(())
}
