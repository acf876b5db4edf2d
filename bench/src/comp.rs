//! The competitors: how each is started on a source and replica, when it is ready, what
//! CPU it used, and the exact command line that reproduces it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;

use crate::proc::{self, Cgroup, Guard, LogTail, Wait};
use crate::report;

/// The inotify events both inotifywait scripts listen to.
pub const INOTIFY_EVENTS: &str = "create,delete,moved_to,close_write";
/// How long a competitor may take to be ready.
const READY_TIMEOUT: Duration = Duration::from_secs(900);

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Comp {
    /// `watcher sync --backend fanotify`.
    Fanotify,
    /// `watcher sync --backend inotify`.
    Inotify,
    /// `watcher sync --backend ebpf` (a binary built with the `ebpf` feature).
    Ebpf,
    /// `watcher sync --backend ebpf --ebpf-kernel-filter off`: every change of every
    /// process goes to user space (`kernel` scenario only, with `ebpf`).
    #[value(skip)]
    EbpfUnfiltered,
    /// No watcher at all: what the writes cost alone (`kernel` scenario only).
    #[value(skip)]
    Baseline,
    /// inotifywait piped into one rsync of the changed path per event.
    PerEvent,
    /// inotifywait piped into one `rsync -a --delete` of the whole tree per event.
    FullTree,
    /// lsyncd with `default.rsync`.
    Lsyncd,
    /// lsyncd with `default.rsyncssh`: moves replayed with `mv` over ssh (`rename`
    /// scenario only, ssh targets only).
    #[value(skip)]
    LsyncdSsh,
    /// One plain `rsync -a --delete` of the whole tree (the cost of a rescan).
    Rsync,
}

impl Comp {
    pub const ALL: [Comp; 7] = [
        Comp::Fanotify,
        Comp::Inotify,
        Comp::Ebpf,
        Comp::PerEvent,
        Comp::FullTree,
        Comp::Lsyncd,
        Comp::Rsync,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Comp::Fanotify => "watcher (fanotify)",
            Comp::Inotify => "watcher (inotify)",
            Comp::Ebpf => "watcher (ebpf)",
            Comp::EbpfUnfiltered => "watcher (ebpf, kernel filter off)",
            Comp::Baseline => "no watcher",
            Comp::PerEvent => "per-event script",
            Comp::FullTree => "full-tree script",
            Comp::Lsyncd => "lsyncd",
            Comp::LsyncdSsh => "lsyncd (rsyncssh)",
            Comp::Rsync => "rsync -a --delete",
        }
    }

    pub fn key(self) -> &'static str {
        match self {
            Comp::Fanotify => "fanotify",
            Comp::Inotify => "inotify",
            Comp::Ebpf => "ebpf",
            Comp::EbpfUnfiltered => "ebpf-unfiltered",
            Comp::Baseline => "none",
            Comp::PerEvent => "per-event",
            Comp::FullTree => "full-tree",
            Comp::Lsyncd => "lsyncd",
            Comp::LsyncdSsh => "lsyncd-ssh",
            Comp::Rsync => "rsync",
        }
    }

    /// Whether it keeps running and follows changes (all but plain rsync and no watcher).
    pub fn is_live(self) -> bool {
        !matches!(self, Comp::Rsync | Comp::Baseline)
    }

    /// Whether it is the watcher daemon (one of its backends).
    pub fn is_watcher(self) -> bool {
        matches!(
            self,
            Comp::Fanotify | Comp::Inotify | Comp::Ebpf | Comp::EbpfUnfiltered
        )
    }

    /// The program it needs on PATH besides rsync.
    pub fn needs(self) -> Option<&'static str> {
        match self {
            Comp::PerEvent | Comp::FullTree => Some("inotifywait"),
            Comp::Lsyncd | Comp::LsyncdSsh => Some("lsyncd"),
            _ => None,
        }
    }
}

/// Where a competitor writes the replica, as rsync is told it.
#[derive(Clone, Debug)]
pub struct Dest {
    /// rsync's destination without a trailing slash: a directory, `rsync://...` or
    /// `host:dir`.
    pub rsync: String,
    /// Options rsync needs to reach it (`--password-file=`, `--rsh=`); for the daemon
    /// as `--rsync-arg`, for the scripts on their rsync command line, for lsyncd in
    /// `rsync._extra`.
    pub rsync_opts: Vec<String>,
    /// For an ssh target: what lsyncd's `default.rsyncssh` needs.
    pub ssh: Option<SshDest>,
}

/// An ssh target as lsyncd's `default.rsyncssh` takes it.
#[derive(Clone, Debug)]
pub struct SshDest {
    /// `user@host`.
    pub host: String,
    /// The directory on the host.
    pub dir: String,
    /// The Lua table of its `ssh` setting (`{ port = ..., identityFile = ..., ... }`).
    pub lua_ssh: String,
}

impl Dest {
    /// A local directory.
    pub fn local(dir: &Path) -> Result<Self> {
        Ok(Self {
            rsync: path_str(dir)?.to_owned(),
            rsync_opts: Vec::new(),
            ssh: None,
        })
    }
}

/// What starting a competitor needs to know.
pub struct Env<'a> {
    pub watcher: &'a Path,
    pub watcher_args: &'a [String],
    pub workdir: &'a Path,
    pub echo: bool,
    pub cgroups: bool,
}

/// A live competitor that is ready: every directory watched.
pub struct Running {
    pub comp: Comp,
    pub guard: Guard,
    pub log: LogTail,
    cg: Option<Cgroup>,
    /// From spawn to ready.
    pub ready_after: Duration,
    ready_line: usize,
}

impl Running {
    pub fn pid(&self) -> i32 {
        self.guard.pid()
    }

    /// CPU time of the competitor and everything it started, so far.
    pub fn cpu(&self) -> Duration {
        match &self.cg {
            Some(cg) => cg.usage(),
            None => proc::tree_cpu(self.pid()),
        }
    }

    /// Exact rsync runs since ready, from the log: the daemon's `rsync finished` lines,
    /// lsyncd's `Calling rsync` lines; None for the scripts.
    pub fn rsync_runs(&self) -> Option<usize> {
        match self.comp {
            c if c.is_watcher() => Some(
                self.log
                    .count(self.ready_line, |l| l.contains("rsync finished")),
            ),
            Comp::Lsyncd | Comp::LsyncdSsh => Some(
                self.log
                    .count(self.ready_line, |l| l.contains("Calling rsync")),
            ),
            _ => None,
        }
    }

    /// Counts the rsync processes it starts from now on (see [`RsyncCounter`]).
    pub fn count_rsyncs(&self) -> RsyncCounter {
        RsyncCounter::start(self.cg.as_ref().map(|c| c.path_for_counter()), self.pid())
    }

    /// CPU time of the competitor's main process alone (all its threads; for the daemon:
    /// without the rsync processes it starts), from `/proc/PID/stat` utime + stime.
    pub fn own_cpu(&self) -> Duration {
        proc::own_cpu(self.pid())
    }

    /// Stops it: SIGTERM for the daemon, which then logs its `stopped` summary (returned);
    /// SIGKILL for the others.
    pub fn stop(self) -> Result<Option<String>> {
        Ok(self.stop_summary()?.daemon)
    }

    /// Stops it like [`Running::stop`], and returns the daemon's `stopped` summary and
    /// the ebpf backend's `ebpf backend stopped` line (logged before it).
    pub fn stop_summary(mut self) -> Result<Summary> {
        let mut out = Summary::default();
        if self.comp.is_watcher() {
            self.guard.stop(Signal::SIGTERM, Duration::from_secs(60))?;
            let found = self
                .log
                .wait_for(self.ready_line, Duration::from_secs(5), is_summary)?;
            if let Wait::Found(..) = found {
                out.daemon = self.log.last_matching(is_summary);
                out.backend = self
                    .log
                    .last_matching(|l| l.contains("ebpf backend stopped"));
            }
            return Ok(out);
        }
        self.guard.stop(Signal::SIGKILL, Duration::from_secs(5))?;
        Ok(out)
    }
}

/// The daemon's `stopped` line (the ebpf backend's own `... stopped` line comes first).
fn is_summary(l: &str) -> bool {
    proc::has_word(l, "stopped") && l.contains("rsync_runs=")
}

/// Summary lines a stopped daemon logged.
#[derive(Default, Debug, Clone)]
pub struct Summary {
    /// `stopped events=N ... rsync_runs=N`.
    pub daemon: Option<String>,
    /// `ebpf backend stopped records=N ...` (the ebpf backend only).
    pub backend: Option<String>,
}

impl Summary {
    /// A `key=N` field of the daemon's line, else of the backend's.
    pub fn field(&self, key: &str) -> Option<f64> {
        [&self.daemon, &self.backend]
            .into_iter()
            .flatten()
            .find_map(|l| field(l, key))
    }
}

/// The daemon's log filter: info, and the runner's `batch timing` lines (debug) that the
/// latency breakdown reads.
pub const WATCHER_LOG: &str = "info,watcher::runner=debug";

/// The number of a `key=N` word of a log line.
pub fn field(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// Samples the processes of a competitor every millisecond (its cgroup's `cgroup.procs`,
/// else its process tree every 5 ms) and counts distinct rsync processes whose parent is
/// not an rsync (rsync forks its receiver and generator). A run shorter than the period
/// can be missed, so this is a lower bound, close for runs of a few milliseconds.
pub struct RsyncCounter {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl RsyncCounter {
    fn start(procs: Option<PathBuf>, root: i32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicUsize::new(0));
        let (s, c) = (Arc::clone(&stop), Arc::clone(&count));
        let thread = thread::spawn(move || {
            let mut seen: std::collections::HashSet<i32> = std::collections::HashSet::new();
            let end = Instant::now() + Duration::from_secs(4 * 3600);
            while !s.load(Ordering::Relaxed) && Instant::now() < end {
                let pids: Vec<i32> = match &procs {
                    Some(p) => std::fs::read_to_string(p)
                        .unwrap_or_default()
                        .lines()
                        .filter_map(|l| l.trim().parse().ok())
                        .collect(),
                    None => proc::descendants(root).iter().map(|p| p.pid).collect(),
                };
                for pid in pids {
                    if seen.insert(pid)
                        && let Some((comm, ppid)) = proc::comm_ppid(pid)
                        && comm.starts_with("rsync")
                        && proc::comm_ppid(ppid).is_none_or(|(pc, _)| !pc.starts_with("rsync"))
                    {
                        c.fetch_add(1, Ordering::Relaxed);
                    }
                }
                thread::sleep(Duration::from_millis(if procs.is_some() { 1 } else { 5 }));
            }
        });
        Self {
            stop,
            count,
            thread: Some(thread),
        }
    }

    pub fn finish(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.count.load(Ordering::Relaxed)
    }
}

impl Drop for RsyncCounter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Cgroup {
    fn path_for_counter(&self) -> PathBuf {
        self.dir().join("cgroup.procs")
    }
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("path is not UTF-8: {}", p.display()))
}

/// The bash script of an inotifywait competitor.
fn script(comp: Comp, src: &Path, dst: &Dest) -> Result<String> {
    let s = path_str(src)?;
    let (sq, dq) = (report::sh_quote(s), report::sh_quote(&dst.rsync));
    let opts: String = dst
        .rsync_opts
        .iter()
        .map(|o| format!("{} ", report::sh_quote(o)))
        .collect();
    let body = match comp {
        Comp::PerEvent => format!(
            "rsync -a -r --relative --delete --delete-missing-args --force {opts}\
             \"{s}/./${{f#{s}/}}\" {dq}/"
        ),
        _ => format!("rsync -a --delete {opts}{sq}/ {dq}/"),
    };
    Ok(format!(
        "inotifywait -mrq --format '%w%f' -e {INOTIFY_EVENTS} {sq} \
         | while read f; do {body}; done"
    ))
}

/// A Lua string literal.
pub fn lua_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The lsyncd configuration: `default.rsync` (`default.rsyncssh` for
/// [`Comp::LsyncdSsh`]), a 1 s delay, and no start-up sync (the replica is seeded
/// beforehand, as for the daemon's `--no-initial-sync`).
fn lsyncd_config(comp: Comp, src: &Path, dst: &Dest) -> Result<String> {
    let source = lua_str(path_str(src)?);
    let extra = if dst.rsync_opts.is_empty() {
        String::new()
    } else {
        let opts: Vec<String> = dst.rsync_opts.iter().map(|o| lua_str(o)).collect();
        format!(", rsync = {{ _extra = {{ {} }} }}", opts.join(", "))
    };
    let sync = if comp == Comp::LsyncdSsh {
        let Some(ssh) = &dst.ssh else {
            bail!("{} needs an ssh target", comp.name());
        };
        format!(
            "default.rsyncssh, source = {source}, host = {}, targetdir = {}, ssh = {}",
            lua_str(&ssh.host),
            lua_str(&ssh.dir),
            ssh.lua_ssh
        )
    } else {
        format!(
            "default.rsync, source = {source}, target = {}{extra}",
            lua_str(&dst.rsync)
        )
    };
    Ok(format!(
        "settings {{ nodaemon = true }}\n\
         sync {{ {sync}, delay = 1, init = false }}\n"
    ))
}

/// Exact command lines of a competitor (several lines for lsyncd: config and command).
pub fn command_lines(env: &Env, comp: Comp, src: &Path, dst: &Path) -> Result<Vec<String>> {
    if comp == Comp::Rsync {
        return Ok(vec![report::command_line(
            "rsync",
            [
                "-a",
                "--delete",
                &format!("{}/", path_str(src)?),
                &format!("{}/", path_str(dst)?),
            ],
            env.workdir,
        )]);
    }
    command_lines_to(env, comp, src, &Dest::local(dst)?)
}

/// Exact command lines of a live competitor writing to `dst`.
pub fn command_lines_to(env: &Env, comp: Comp, src: &Path, dst: &Dest) -> Result<Vec<String>> {
    let w = env.workdir;
    Ok(match comp {
        Comp::Fanotify | Comp::Inotify | Comp::Ebpf | Comp::EbpfUnfiltered => {
            vec![report::command_line(
                &format!("RUST_LOG={WATCHER_LOG} watcher"),
                watcher_args(env, comp, src, dst)?,
                w,
            )]
        }
        Comp::PerEvent | Comp::FullTree => {
            vec![report::bash_c_line(&script(comp, src, dst)?, w)]
        }
        Comp::Lsyncd | Comp::LsyncdSsh => vec![
            report::hide_workdir(
                &format!(
                    "cat > lsyncd.conf.lua <<'EOF'\n{}EOF",
                    lsyncd_config(comp, src, dst)?
                ),
                w,
            ),
            "lsyncd lsyncd.conf.lua".to_owned(),
        ],
        Comp::Baseline | Comp::Rsync => Vec::new(),
    })
}

fn watcher_args(env: &Env, comp: Comp, src: &Path, dst: &Dest) -> Result<Vec<String>> {
    let backend = match comp {
        Comp::Inotify => "inotify",
        Comp::Ebpf | Comp::EbpfUnfiltered => "ebpf",
        _ => "fanotify",
    };
    let mut args: Vec<String> = vec![
        "sync".into(),
        path_str(src)?.into(),
        dst.rsync.clone(),
        "--no-initial-sync".into(),
        "--backend".into(),
        backend.into(),
    ];
    args.extend(dst.rsync_opts.iter().map(|o| format!("--rsync-arg={o}")));
    if comp == Comp::EbpfUnfiltered {
        args.extend(["--ebpf-kernel-filter".into(), "off".into()]);
    }
    args.extend(env.watcher_args.iter().cloned());
    Ok(args)
}

/// Inotify watches held by `root` and its descendants.
fn watches(root: i32) -> usize {
    proc::inotify_watches(root)
        + proc::descendants(root)
            .iter()
            .map(|p| proc::inotify_watches(p.pid))
            .sum::<usize>()
}

/// Starts a live competitor on `src` -> `dst` (a tree of `dirs` directories) and waits
/// until it is ready: the daemon's `ready` line, or one inotify watch per directory.
pub fn start(env: &Env, comp: Comp, src: &Path, dst: &Path, dirs: usize) -> Result<Running> {
    start_to(env, comp, src, &Dest::local(dst)?, dirs)
}

/// [`start`] for a destination that need not be a local directory.
pub fn start_to(env: &Env, comp: Comp, src: &Path, dst: &Dest, dirs: usize) -> Result<Running> {
    let cg = if env.cgroups {
        Cgroup::create(comp.key())
    } else {
        None
    };
    let mut cmd = match comp {
        Comp::Fanotify | Comp::Inotify | Comp::Ebpf | Comp::EbpfUnfiltered => {
            let mut c = Command::new(env.watcher);
            c.args(watcher_args(env, comp, src, dst)?)
                .env("RUST_LOG", WATCHER_LOG)
                .env("NO_COLOR", "1");
            c
        }
        Comp::PerEvent | Comp::FullTree => {
            let mut c = Command::new("bash");
            c.arg("-c").arg(script(comp, src, dst)?);
            c
        }
        Comp::Lsyncd | Comp::LsyncdSsh => {
            let conf = env
                .workdir
                .join(format!("lsyncd-{}.conf.lua", std::process::id()));
            std::fs::write(&conf, lsyncd_config(comp, src, dst)?)
                .with_context(|| format!("writing {}", conf.display()))?;
            let mut c = Command::new("lsyncd");
            c.arg(conf);
            c
        }
        Comp::Rsync | Comp::Baseline => bail!("{} is not a live competitor", comp.name()),
    };
    // Keep the scripts' and lsyncd's children from inheriting a locale that slows them.
    cmd.env("LC_ALL", "C");
    let spawned = Instant::now();
    let (mut guard, log) = proc::spawn_logged(comp.key(), cmd, env.echo, cg.as_ref())?;
    let deadline = spawned + READY_TIMEOUT;
    let (ready_after, ready_line) = if comp.is_watcher() {
        match log.wait_for(0, READY_TIMEOUT, |l| proc::has_word(l, "ready"))? {
            Wait::Found(i, at) => (at - spawned, i),
            Wait::Eof => bail!(
                "{} exited before `ready`; last lines:\n{}",
                comp.name(),
                log.tail(15)
            ),
            Wait::Timeout => bail!("{} not ready within {READY_TIMEOUT:?}", comp.name()),
        }
    } else {
        let bound = READY_TIMEOUT.as_millis() / 5 + 1;
        let mut at = None;
        for _ in 0..bound {
            proc::check_interrupted()?;
            if let Some(st) = guard.try_wait()? {
                bail!(
                    "{} exited ({st}) while setting up watches; last lines:\n{}",
                    comp.name(),
                    log.tail(15)
                );
            }
            if watches(guard.pid()) >= dirs {
                at = Some(spawned.elapsed());
                break;
            }
            if Instant::now() >= deadline {
                break;
            }
            thread::sleep(Duration::from_millis(5));
        }
        let Some(at) = at else {
            bail!(
                "{} watched only {} of {dirs} directories after {READY_TIMEOUT:?}",
                comp.name(),
                watches(guard.pid())
            );
        };
        (at, log.count(0, |_| true))
    };
    Ok(Running {
        comp,
        guard,
        log,
        cg,
        ready_after,
        ready_line,
    })
}

/// One plain `rsync -a --delete SRC/ DST/`: wall time and CPU time.
pub fn rsync_once(env: &Env, src: &Path, dst: &Path) -> Result<(Duration, Duration)> {
    let cg = if env.cgroups {
        Cgroup::create("rsync")
    } else {
        None
    };
    let mut cmd = Command::new("rsync");
    cmd.args(["-a", "--delete"])
        .arg(format!("{}/", path_str(src)?))
        .arg(format!("{}/", path_str(dst)?));
    let start = Instant::now();
    let (mut guard, log) = proc::spawn_logged("rsync", cmd, env.echo, cg.as_ref())?;
    let mut cpu = Duration::ZERO;
    let status = loop {
        proc::check_interrupted()?;
        if cg.is_none() {
            cpu = cpu.max(proc::tree_cpu(guard.pid()));
        }
        if let Some(st) = guard.try_wait()? {
            break st;
        }
        thread::sleep(Duration::from_millis(2));
    };
    let wall = start.elapsed();
    if let Some(cg) = &cg {
        cpu = cg.usage();
    }
    if !status.success() {
        bail!("rsync -a --delete failed ({status}):\n{}", log.tail(10));
    }
    Ok((wall, cpu))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_lines() {
        let backend = r#"2026-11-22T03:38:03.382585Z  INFO ebpf backend stopped probes="syscalls" records=102065 own_dropped_in_kernel=1196 outside_roots_dropped_in_kernel=100014 overflows=0"#;
        let daemon = "2026-11-22T03:38:03.383861Z  INFO stopped events=2 event_batches=1 overflows=0 rescans=0 rsync_runs=1 unsynced=0";
        assert!(!is_summary(backend));
        assert!(is_summary(daemon));
        let s = Summary {
            daemon: Some(daemon.to_owned()),
            backend: Some(backend.to_owned()),
        };
        assert_eq!(s.field("events"), Some(2.0));
        assert_eq!(s.field("records"), Some(102_065.0));
        assert_eq!(s.field("outside_roots_dropped_in_kernel"), Some(100_014.0));
        // The daemon's line first: its overflows, not the backend's.
        assert_eq!(s.field("rsync_runs"), Some(1.0));
        assert_eq!(field(backend, "dropped_in_kernel"), None);
    }
}
