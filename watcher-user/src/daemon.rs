//! Wiring: backend thread -> filter -> dirty set per target -> flush policy -> rsync.
//! Owns the event loop, signals and the summary at exit.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::backend::{self, Backend, BackendKind, OwnPids};
use crate::dirty::{Batch, DirtySet, Scope};
use crate::event::{ChangeKind, Event};
use crate::filter::{Filter, FilterBuilder, GroupId};
use crate::flush::{Decision, FlushConfig, FlushPolicy};
use crate::rsync::{self, ExitClass, RsyncOptions};
use crate::target::Target;

/// Everything `watcher sync` needs, validated.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// Canonical source directory.
    pub source: PathBuf,
    pub targets: Vec<Target>,
    pub excludes: Vec<String>,
    pub flush: FlushConfig,
    pub backend: BackendKind,
    pub initial_sync: bool,
    pub rsync: RsyncOptions,
}

/// Longest wait between retries of a failing target.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const FIRST_BACKOFF: Duration = Duration::from_millis(250);

/// Batches of events in flight from the reader thread; when full, the reader stops reading
/// and the kernel queue absorbs the burst (or overflows, which triggers a rescan).
const EVENT_CHANNEL_BATCHES: usize = 256;

/// Per-target state: its own backlog, so a slow target never holds back another.
struct TargetState {
    target: Target,
    group: GroupId,
    dirty: DirtySet,
    policy: FlushPolicy,
    in_flight: bool,
    retry_at: Option<Instant>,
    failures: u32,
    /// Set after a fatal rsync error: the target is no longer synced.
    fatal: Option<String>,
    /// The first full sync (or none, if disabled) has completed.
    in_step: bool,
    runs: u64,
}

/// What a flush task reports back.
struct FlushDone {
    target: usize,
    batch: Batch,
    class: ExitClass,
    detail: String,
    runs: u64,
}

fn backoff(failures: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1u32 << failures.min(16))
        .min(MAX_BACKOFF)
}

/// Marks what `event` dirtied in every target of its group. Returns whether anything was marked.
fn route(filter: &Filter, targets: &mut [TargetState], event: &Event) -> bool {
    let mut mark = |group: GroupId, rel: &Path, scope: Scope| {
        let mut any = false;
        for t in targets.iter_mut().filter(|t| t.group == group) {
            t.dirty.mark(rel, scope);
            any = true;
        }
        any
    };
    match event {
        Event::Change {
            kind, path, is_dir, ..
        } => {
            let Some((group, rel)) = filter.lookup(path, *is_dir) else {
                return false;
            };
            // A directory that appears may already hold files nobody reported to us.
            let scope = if *is_dir && matches!(kind, ChangeKind::Created | ChangeKind::MovedTo) {
                Scope::Subtree
            } else {
                Scope::Entry
            };
            let marked = mark(group, rel, scope);
            // Adding or removing a name changes the parent's mtime, and rsync does not carry
            // the times of directories it only implies from a listed path.
            if !matches!(kind, ChangeKind::Modified | ChangeKind::Attrib)
                && let Some(parent) = rel.parent()
            {
                mark(group, parent, Scope::Entry);
            }
            marked
        }
        Event::Rescan { path } => {
            let mut any = false;
            if let Some((group, rel)) = filter.lookup(path, true) {
                any |= mark(group, rel, Scope::Subtree);
            }
            for group in filter.groups_at_or_below(path) {
                any |= mark(group, Path::new(""), Scope::Subtree);
            }
            any
        }
        Event::Overflow => {
            let mut any = false;
            for group in filter.groups() {
                any |= mark(group, Path::new(""), Scope::Subtree);
            }
            any
        }
    }
}

/// Runs the rsync processes for one batch; stops at the first run that does not succeed.
async fn flush(
    index: usize,
    batch: Batch,
    root: PathBuf,
    target: Target,
    opts: RsyncOptions,
    own_pids: Arc<OwnPids>,
) -> FlushDone {
    let planned = {
        let batch = batch.clone();
        let (root, target, opts) = (root.clone(), target.clone(), opts.clone());
        tokio::task::spawn_blocking(move || {
            rsync::plan(&batch, &root, &target, &opts, |p| {
                std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir())
            })
        })
        .await
    };
    let runs = match planned {
        Ok(runs) => runs,
        Err(e) => {
            return FlushDone {
                target: index,
                batch,
                class: ExitClass::Transient,
                detail: format!("planning the batch failed: {e}"),
                runs: 0,
            };
        }
    };
    let mut done = 0;
    for run in &runs {
        let result = rsync::execute(&opts.binary, run, &own_pids, opts.dry_run).await;
        done += 1;
        match result {
            Ok(r) => {
                tracing::info!(
                    target = %target,
                    paths = run.paths,
                    code = r.code,
                    elapsed_ms = r.elapsed.as_millis() as u64,
                    "rsync finished"
                );
                for line in r.stdout.lines() {
                    tracing::info!(target = %target, "dry run: {line}");
                }
                if r.class != ExitClass::Success {
                    let detail = format!(
                        "rsync exited with {:?} ({}): {}\n  command: {}",
                        r.code,
                        rsync::describe(r.code),
                        r.stderr,
                        rsync::display_args(&opts.binary, &run.args)
                    );
                    return FlushDone {
                        target: index,
                        batch,
                        class: r.class,
                        detail,
                        runs: done,
                    };
                }
                if !r.stderr.is_empty() {
                    tracing::debug!(target = %target, stderr = %r.stderr, "rsync warnings");
                }
            }
            Err(e) => {
                return FlushDone {
                    target: index,
                    batch,
                    class: ExitClass::Transient,
                    detail: format!("cannot run {}: {e}", opts.binary.display()),
                    runs: done,
                };
            }
        }
    }
    FlushDone {
        target: index,
        batch,
        class: ExitClass::Success,
        detail: String::new(),
        runs: done,
    }
}

/// Counters for the summary at exit.
#[derive(Debug, Default)]
struct Stats {
    event_batches: u64,
    events: u64,
    overflows: u64,
    rescans: u64,
}

/// `watcher sync`: returns the process exit code.
pub fn run_sync(cfg: SyncConfig) -> anyhow::Result<i32> {
    let version = rsync::probe(&cfg.rsync.binary)?;
    tracing::debug!(version, "rsync self-test passed");
    for target in &cfg.targets {
        target.check_overlap(&cfg.source)?;
    }
    let mut builder = FilterBuilder::new();
    let group = builder.add_root(&cfg.source, &cfg.excludes)?;
    let filter = builder.build()?;

    let own_pids = Arc::new(OwnPids::new());
    let backend = backend::start(
        cfg.backend,
        std::slice::from_ref(&cfg.source),
        own_pids.clone(),
    )
    .context("starting change capture")?;
    tracing::info!(source = %cfg.source.display(), backend = backend.name(), "watching");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(event_loop(cfg, filter, group, backend, own_pids))
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

async fn event_loop(
    cfg: SyncConfig,
    filter: Filter,
    group: GroupId,
    backend: Box<dyn Backend>,
    own_pids: Arc<OwnPids>,
) -> anyhow::Result<i32> {
    let stop = Arc::new(AtomicBool::new(false));
    let (mut events, reader) = spawn_reader(backend, stop.clone());
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;

    let mut targets: Vec<TargetState> = cfg
        .targets
        .iter()
        .map(|target| {
            let mut dirty = DirtySet::new();
            let mut policy = FlushPolicy::new(cfg.flush);
            if cfg.initial_sync {
                dirty.mark(Path::new(""), Scope::Subtree);
                policy.on_change(Instant::now());
            }
            TargetState {
                target: target.clone(),
                group,
                dirty,
                policy,
                in_flight: false,
                retry_at: None,
                failures: 0,
                fatal: None,
                in_step: !cfg.initial_sync,
                runs: 0,
            }
        })
        .collect();
    if cfg.initial_sync {
        tracing::info!("initial sync started");
    }

    let mut tasks: JoinSet<FlushDone> = JoinSet::new();
    let mut stats = Stats::default();
    let mut ready_logged = false;
    let mut shutting_down = false;
    let mut reader_done = false;
    let mut exit_code = 0;

    loop {
        let now = Instant::now();
        let mut wake: Option<Instant> = None;
        for (index, t) in targets.iter_mut().enumerate() {
            if t.in_flight || t.fatal.is_some() || t.dirty.is_empty() {
                continue;
            }
            if let Some(at) = t.retry_at {
                if now < at && !shutting_down {
                    wake = Some(wake.map_or(at, |w| w.min(at)));
                    continue;
                }
                t.retry_at = None;
            }
            let decision = if shutting_down {
                Decision::FlushNow
            } else {
                t.policy.decide(now, t.dirty.len(), false)
            };
            match decision {
                Decision::FlushNow => {
                    let batch = t.dirty.take();
                    t.in_flight = true;
                    t.policy.on_flush_started(now);
                    tracing::debug!(target = %t.target, paths = batch.len(), "flushing");
                    tasks.spawn(flush(
                        index,
                        batch,
                        filter.root(t.group).to_path_buf(),
                        t.target.clone(),
                        rsync_options(&cfg, &filter, t.group),
                        own_pids.clone(),
                    ));
                }
                Decision::WaitUntil(at) => wake = Some(wake.map_or(at, |w| w.min(at))),
                Decision::Idle | Decision::Busy => {}
            }
        }
        if !ready_logged && targets.iter().all(|t| t.in_step || t.fatal.is_some()) {
            ready_logged = true;
            tracing::info!(targets = targets.len(), "ready");
        }
        if targets.iter().all(|t| t.fatal.is_some()) {
            exit_code = 1;
            stop.store(true, Ordering::Relaxed);
            break;
        }
        if shutting_down
            && reader_done
            && targets
                .iter()
                .all(|t| !t.in_flight && (t.dirty.is_empty() || t.fatal.is_some()))
        {
            break;
        }

        let sleep = tokio::time::sleep_until(
            wake.map(tokio::time::Instant::from_std)
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600)),
        );
        tokio::select! {
            msg = events.recv(), if !reader_done => match msg {
                Some(batch) => {
                    let now = Instant::now();
                    stats.event_batches += 1;
                    stats.events += batch.len() as u64;
                    let mut touched = false;
                    for event in &batch {
                        match event {
                            Event::Overflow => stats.overflows += 1,
                            Event::Rescan { .. } => stats.rescans += 1,
                            Event::Change { .. } => {}
                        }
                        touched |= route(&filter, &mut targets, event);
                    }
                    if touched {
                        for t in targets.iter_mut() {
                            if !t.dirty.is_empty() {
                                t.policy.on_change(now);
                            }
                        }
                    }
                }
                None => {
                    reader_done = true;
                    if !shutting_down {
                        tracing::error!("the event reader stopped; flushing and exiting");
                        shutting_down = true;
                        exit_code = 1;
                    }
                }
            },
            Some(joined) = tasks.join_next() => {
                let done = joined.context("a flush task panicked")?;
                let now = Instant::now();
                let t = &mut targets[done.target];
                t.in_flight = false;
                t.runs += done.runs;
                t.policy.on_flush_finished(now);
                match done.class {
                    ExitClass::Success => {
                        t.failures = 0;
                        if done.batch.covers_root() && !t.in_step {
                            t.in_step = true;
                            tracing::info!(target = %t.target, "initial sync done");
                        }
                    }
                    ExitClass::Transient => {
                        t.dirty.merge(done.batch);
                        if shutting_down {
                            tracing::error!(target = %t.target, paths = t.dirty.len(),
                                "{}; exiting with changes not synced", done.detail);
                            t.fatal = Some(done.detail);
                            exit_code = 1;
                        } else {
                            t.failures += 1;
                            let wait = backoff(t.failures);
                            tracing::warn!(target = %t.target, retry_in_ms = wait.as_millis() as u64,
                                paths = t.dirty.len(), "{}", done.detail);
                            t.retry_at = Some(now + wait);
                        }
                    }
                    ExitClass::Fatal => {
                        t.dirty.merge(done.batch);
                        tracing::error!(target = %t.target, paths = t.dirty.len(),
                            "{}; this target is no longer synced", done.detail);
                        t.fatal = Some(done.detail);
                        exit_code = 1;
                    }
                }
            },
            _ = sleep => {},
            _ = sigterm.recv() => begin_shutdown(&mut shutting_down, &stop, "SIGTERM")?,
            _ = sigint.recv() => begin_shutdown(&mut shutting_down, &stop, "SIGINT")?,
        }
    }

    stop.store(true, Ordering::Relaxed);
    drop(events);
    match reader.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::error!(error = %e, "event reader failed");
            exit_code = 1;
        }
        Err(_) => bail!("the event reader thread panicked"),
    }
    tracing::info!(
        events = stats.events,
        event_batches = stats.event_batches,
        overflows = stats.overflows,
        rescans = stats.rescans,
        rsync_runs = targets.iter().map(|t| t.runs).sum::<u64>(),
        unsynced = targets.iter().map(|t| t.dirty.len()).sum::<usize>(),
        "stopped"
    );
    Ok(exit_code)
}

fn rsync_options(cfg: &SyncConfig, filter: &Filter, group: GroupId) -> RsyncOptions {
    RsyncOptions {
        excludes: filter.excludes(group).to_vec(),
        ..cfg.rsync.clone()
    }
}

/// First signal: stop reading, flush what is dirty, exit. Second: exit now.
fn begin_shutdown(shutting_down: &mut bool, stop: &AtomicBool, signal: &str) -> anyhow::Result<()> {
    if *shutting_down {
        bail!("{signal} again: exiting without flushing");
    }
    tracing::info!(signal, "flushing pending changes, then exiting");
    *shutting_down = true;
    stop.store(true, Ordering::Relaxed);
    Ok(())
}
