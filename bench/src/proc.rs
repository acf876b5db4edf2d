//! Child processes under guard, their merged output, and what `/proc` tells about them.

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::unistd::Pid;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: nix::libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Turns SIGINT and SIGTERM into a flag that every waiting loop checks, so that the
/// guards' `Drop` runs and no child outlives the harness (children run in process
/// groups of their own and would not see a terminal's Ctrl-C).
pub fn install_interrupt_handler() -> Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { signal::sigaction(sig, &action) }.context("installing a signal handler")?;
    }
    Ok(())
}

/// Fails once the harness has been asked to stop.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps, but fails early when interrupted.
pub fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        check_interrupted()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

/// A child process in a process group of its own; dropping the guard kills the group
/// and every descendant still attached to the child.
pub struct Guard {
    name: String,
    child: Child,
    status: Option<ExitStatus>,
}

impl Guard {
    /// Spawns `cmd` in a new process group.
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Self> {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            status: None,
        })
    }

    pub fn pid(&self) -> i32 {
        // Pids fit in an i32 on Linux.
        self.child.id() as i32
    }

    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("waiting for {}", self.name))?;
        }
        Ok(self.status)
    }

    /// Sends `sig` to the child alone, waits up to `grace` for it to exit, and kills
    /// whatever is left of it. Returns the exit status if it exited within `grace`.
    pub fn stop(&mut self, sig: Signal, grace: Duration) -> Result<Option<ExitStatus>> {
        if self.try_wait()?.is_none() {
            // ESRCH only means that it is gone already.
            let _ = signal::kill(Pid::from_raw(self.pid()), sig);
            let end = Instant::now() + grace;
            while Instant::now() < end && self.try_wait()?.is_none() {
                thread::sleep(Duration::from_millis(5));
            }
        }
        let exited = self.try_wait()?;
        self.kill_all();
        Ok(exited)
    }

    /// SIGKILL to the child, its descendants and its process group, then reaps it.
    fn kill_all(&mut self) {
        let pid = self.pid();
        if self.status.is_none() {
            for p in descendants(pid) {
                let _ = signal::kill(Pid::from_raw(p.pid), Signal::SIGKILL);
            }
        }
        let _ = signal::killpg(Pid::from_raw(pid), Signal::SIGKILL);
        if self.status.is_none() {
            let _ = signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            if let Ok(st) = self.child.wait() {
                self.status = Some(st);
            }
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// Spawns `cmd` with stdout and stderr merged into one pipe read by a [`LogTail`].
/// `cmd` should not be used again: it may hold the write end of the pipe.
pub fn spawn_logged(
    name: &str,
    mut cmd: Command,
    echo: bool,
    cg: Option<&Cgroup>,
) -> Result<(Guard, LogTail)> {
    if let Some(cg) = cg {
        cg.enter_on_exec(&mut cmd);
    }
    let (reader, writer) = std::io::pipe().context("creating a pipe")?;
    let writer2 = writer.try_clone().context("duplicating a pipe")?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(writer))
        .stderr(Stdio::from(writer2));
    let guard = Guard::spawn(name, &mut cmd)?;
    // Drop the parent's copies of the write end, so that the reader sees EOF at exit.
    drop(cmd);
    let log = LogTail::spawn(reader, echo.then(|| name.to_owned()));
    Ok((guard, log))
}

/// Outcome of [`LogTail::wait_for`].
pub enum Wait {
    /// Line index and the instant the line was read.
    Found(usize, Instant),
    /// The stream ended without a match.
    Eof,
    Timeout,
}

struct LogState {
    lines: Vec<(Instant, String)>,
    eof: bool,
}

struct LogShared {
    state: Mutex<LogState>,
    cond: Condvar,
}

/// Lines of a child's output, each stamped with the instant it was read.
pub struct LogTail {
    shared: Arc<LogShared>,
}

impl LogTail {
    /// Reads `src` on a thread of its own until EOF. The thread is detached: a
    /// grandchild holding the pipe open must not block the harness.
    pub fn spawn(src: impl Read + Send + 'static, echo: Option<String>) -> Self {
        let shared = Arc::new(LogShared {
            state: Mutex::new(LogState {
                lines: Vec::new(),
                eof: false,
            }),
            cond: Condvar::new(),
        });
        let s = Arc::clone(&shared);
        thread::spawn(move || {
            let mut r = BufReader::new(src);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let now = Instant::now();
                        let line = strip_ansi(String::from_utf8_lossy(&buf).trim_end());
                        if let Some(prefix) = &echo {
                            eprintln!("  [{prefix}] {line}");
                        }
                        lock(&s.state).lines.push((now, line));
                        s.cond.notify_all();
                    }
                }
            }
            lock(&s.state).eof = true;
            s.cond.notify_all();
        });
        Self { shared }
    }

    /// Waits until a line at index `from` or later satisfies `pred`.
    pub fn wait_for(
        &self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<Wait> {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.shared.state);
        let mut i = from;
        loop {
            while i < st.lines.len() {
                if pred(&st.lines[i].1) {
                    return Ok(Wait::Found(i, st.lines[i].0));
                }
                i += 1;
            }
            if st.eof {
                return Ok(Wait::Eof);
            }
            check_interrupted()?;
            let now = Instant::now();
            if now >= deadline {
                return Ok(Wait::Timeout);
            }
            let step = (deadline - now).min(Duration::from_millis(50));
            st = self
                .shared
                .cond
                .wait_timeout(st, step)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Number of lines from index `from` on that satisfy `pred`.
    pub fn count(&self, from: usize, pred: impl Fn(&str) -> bool) -> usize {
        let st = lock(&self.shared.state);
        st.lines.iter().skip(from).filter(|(_, l)| pred(l)).count()
    }

    /// The last line that satisfies `pred`.
    pub fn last_matching(&self, pred: impl Fn(&str) -> bool) -> Option<String> {
        let st = lock(&self.shared.state);
        st.lines
            .iter()
            .rev()
            .find(|(_, l)| pred(l))
            .map(|(_, l)| l.clone())
    }

    /// How many lines were read so far.
    pub fn len(&self) -> usize {
        lock(&self.shared.state).lines.len()
    }

    /// The lines from index `from` on.
    pub fn lines_from(&self, from: usize) -> Vec<String> {
        let st = lock(&self.shared.state);
        st.lines.iter().skip(from).map(|(_, l)| l.clone()).collect()
    }

    /// The last `n` lines, for error messages.
    pub fn tail(&self, n: usize) -> String {
        let st = lock(&self.shared.state);
        let start = st.lines.len().saturating_sub(n);
        let mut out = String::new();
        for (_, l) in &st.lines[start..] {
            out.push_str("    ");
            out.push_str(l);
            out.push('\n');
        }
        if out.is_empty() {
            out.push_str("    (no output)\n");
        }
        out
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Removes ANSI escape sequences (colours) from a log line.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ params final-byte (0x40..=0x7e).
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('\x40'..='\x7e').contains(&c) {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether `line` contains `word` delimited by non-alphanumeric characters
/// (so `ready` does not match `already`).
pub fn has_word(line: &str, word: &str) -> bool {
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    line.match_indices(word).any(|(i, _)| {
        let before = line[..i].chars().next_back().is_none_or(|c| !is_word(c));
        let after = line[i + word.len()..]
            .chars()
            .next()
            .is_none_or(|c| !is_word(c));
        before && after
    })
}

/// One row of `/proc/PID/stat`.
#[derive(Debug, Clone)]
pub struct ProcInfo {
    pub pid: i32,
    pub ppid: i32,
    pub comm: String,
    /// User and system time, in clock ticks.
    pub cpu_ticks: u64,
}

fn read_stat(pid: i32) -> Option<ProcInfo> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s.get(open + 1..close)?.to_owned();
    // After the name: state, ppid, ... utime and stime are fields 14 and 15.
    let fields: Vec<&str> = s.get(close + 1..)?.split_whitespace().collect();
    let ppid = fields.get(1)?.parse().ok()?;
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Some(ProcInfo {
        pid,
        ppid,
        comm,
        cpu_ticks: tick(11) + tick(12),
    })
}

/// Every process on the system (those that vanish while reading are skipped).
pub fn process_table() -> Vec<ProcInfo> {
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(read_stat)
        .collect()
}

/// All descendants of `root` (not `root` itself).
pub fn descendants(root: i32) -> Vec<ProcInfo> {
    let table = process_table();
    let mut out: Vec<ProcInfo> = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for info in table.iter().filter(|i| i.ppid == p) {
            frontier.push(info.pid);
            out.push(info.clone());
        }
    }
    out
}

/// The rsync processes below a competitor as they are seen over time: it is at work while
/// one starts, ends or uses CPU. An rsync that only waits (watcher starts one ahead of the
/// next change, idle until then) is no work.
pub struct RsyncActivity {
    root: i32,
    last: Vec<(i32, u64)>,
}

impl RsyncActivity {
    pub fn new(root: i32) -> Self {
        let mut a = RsyncActivity {
            root,
            last: Vec::new(),
        };
        a.last = a.sample();
        a
    }

    fn sample(&self) -> Vec<(i32, u64)> {
        let mut now: Vec<(i32, u64)> = descendants(self.root)
            .iter()
            .filter(|p| p.comm.starts_with("rsync"))
            .map(|p| (p.pid, p.cpu_ticks))
            .collect();
        now.sort_unstable();
        now
    }

    /// Whether an rsync started, ended or used CPU since the last call.
    pub fn busy(&mut self) -> bool {
        let now = self.sample();
        let busy = now != self.last;
        self.last = now;
        busy
    }
}

/// Waits until no rsync has worked under `root` for `quiet` (see [`RsyncActivity`]); false
/// on timeout.
pub fn wait_rsync_idle(root: i32, quiet: Duration, timeout: Duration) -> Result<bool> {
    let start = Instant::now();
    let mut activity = RsyncActivity::new(root);
    let mut last_busy = start;
    loop {
        check_interrupted()?;
        let now = Instant::now();
        if activity.busy() {
            last_busy = now;
        } else if now - last_busy >= quiet {
            return Ok(true);
        }
        if now - start >= timeout {
            return Ok(false);
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// A `kB` field of a `/proc` key/value file (`/proc/meminfo`, `/proc/PID/status`).
fn kib_field(path: &Path, key: &str) -> Result<u64> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(key).and_then(|r| r.strip_prefix(':')) {
            let num = rest.trim().trim_end_matches("kB").trim();
            return num
                .parse()
                .with_context(|| format!("parsing {key} in {}", path.display()));
        }
    }
    bail!("no {key} in {}", path.display())
}

/// `Slab` of `/proc/meminfo`, in KiB.
pub fn slab_kib() -> Result<u64> {
    kib_field(Path::new("/proc/meminfo"), "Slab")
}

/// `VmRSS` of a process, in KiB.
pub fn rss_kib(pid: i32) -> Result<u64> {
    kib_field(Path::new(&format!("/proc/{pid}/status")), "VmRSS")
}

/// User + system CPU time of a process and of its reaped children (utime, stime, cutime,
/// cstime of `/proc/PID/stat`); zero for a process that is gone.
fn cpu_with_children(pid: i32) -> Duration {
    stat_cpu(pid, 11..15)
}

/// User + system CPU time of a process alone, every thread of it (utime and stime of
/// `/proc/PID/stat`), without its children; zero for a process that is gone.
pub fn own_cpu(pid: i32) -> Duration {
    stat_cpu(pid, 11..13)
}

/// The sum of some clock-tick fields of `/proc/PID/stat`, counted after the command name
/// (index 0 is the state).
fn stat_cpu(pid: i32, fields: std::ops::Range<usize>) -> Duration {
    let Ok(s) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    let Some(close) = s.rfind(')') else {
        return Duration::ZERO;
    };
    let all: Vec<&str> = s[close + 1..].split_whitespace().collect();
    let ticks: u64 = fields.filter_map(|i| all.get(i)?.parse::<u64>().ok()).sum();
    Duration::from_nanos(ticks * 1_000_000_000 / clock_ticks())
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) };
    u64::try_from(hz).ok().filter(|&h| h > 0).unwrap_or(100)
}

/// CPU time of a process tree as `/proc` shows it: every live process of the tree with
/// the children it reaped. Children reaped by a process that has exited since are lost,
/// so this is a lower bound; a [`Cgroup`] is exact.
pub fn tree_cpu(root: i32) -> Duration {
    let mut total = cpu_with_children(root);
    for p in descendants(root) {
        total += cpu_with_children(p.pid);
    }
    total
}

/// A cgroup v2 of its own for one competitor: `cpu.stat` `usage_usec` counts the CPU
/// time of every process that ever ran in it, and `cgroup.procs` lists them.
pub struct Cgroup {
    path: std::path::PathBuf,
    procs: fs::File,
}

impl Cgroup {
    /// The mount point of the cgroup v2 hierarchy (also in hybrid set-ups), if writable.
    fn mount() -> Option<std::path::PathBuf> {
        let mounts = fs::read_to_string("/proc/self/mounts").ok()?;
        mounts
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                if f.get(2) == Some(&"cgroup2") {
                    f.get(1).map(std::path::PathBuf::from)
                } else {
                    None
                }
            })
            .next()
    }

    /// Creates `watcher-bench-PID-NAME` at the top of the cgroup v2 hierarchy; None when
    /// there is none or it is not writable.
    pub fn create(name: &str) -> Option<Self> {
        let path = Self::mount()?.join(format!("watcher-bench-{}-{name}", std::process::id()));
        fs::create_dir(&path).ok()?;
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(path.join("cgroup.procs"));
        match procs {
            Ok(procs) => Some(Self { path, procs }),
            Err(_) => {
                let _ = fs::remove_dir(&path);
                None
            }
        }
    }

    /// Whether cgroups can be used here (creates and removes one).
    pub fn available() -> bool {
        Self::create("probe").is_some()
    }

    /// Makes the child of `cmd` join this cgroup before it executes, so that everything it
    /// starts is counted.
    fn enter_on_exec(&self, cmd: &mut Command) {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let fd = self.procs.as_raw_fd();
        // SAFETY: the closure only calls write(2), which is async-signal-safe, on a
        // descriptor that stays open as long as `self` (the caller holds it across spawn).
        unsafe {
            cmd.pre_exec(move || {
                let r = nix::libc::write(fd, b"0".as_ptr().cast(), 1);
                if r == 1 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }

    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// CPU time of every process that ran in the cgroup.
    pub fn usage(&self) -> Duration {
        let text = fs::read_to_string(self.path.join("cpu.stat")).unwrap_or_default();
        let usec = text
            .lines()
            .find_map(|l| l.strip_prefix("usage_usec ")?.trim().parse::<u64>().ok())
            .unwrap_or(0);
        Duration::from_micros(usec)
    }

    /// Processes in the cgroup now.
    pub fn pids(&self) -> Vec<i32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..100 {
            for p in self.pids() {
                let _ = signal::kill(Pid::from_raw(p), Signal::SIGKILL);
            }
            if fs::remove_dir(&self.path).is_ok() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        eprintln!("warning: could not remove cgroup {}", self.path.display());
    }
}

/// The `comm` and parent of a process, or None when it is gone.
pub fn comm_ppid(pid: i32) -> Option<(String, i32)> {
    read_stat(pid).map(|p| (p.comm, p.ppid))
}

/// Number of inotify watches held by `pid` (lines `inotify wd:` of its fdinfo).
pub fn inotify_watches(pid: i32) -> usize {
    let Ok(rd) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0;
    };
    rd.filter_map(|e| fs::read_to_string(e.ok()?.path()).ok())
        .map(|t| t.lines().filter(|l| l.starts_with("inotify wd:")).count())
        .sum()
}

/// Processes holding a fanotify group: each one is told of every write on the
/// filesystems it marks, which slows the writes of a benchmark.
pub fn fanotify_holders() -> Vec<ProcInfo> {
    process_table()
        .into_iter()
        .filter(|p| {
            fs::read_dir(format!("/proc/{}/fd", p.pid)).is_ok_and(|rd| {
                rd.filter_map(|e| fs::read_link(e.ok()?.path()).ok())
                    .any(|l| l.as_os_str() == "anon_inode:[fanotify]")
            })
        })
        .collect()
}

/// Whether `prog` is an executable on `PATH`.
pub fn on_path(prog: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| {
            fs::metadata(dir.join(prog))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words() {
        assert!(has_word("INFO watcher: ready in 3 ms", "ready"));
        assert!(has_word("ready", "ready"));
        assert!(has_word("x ready.", "ready"));
        assert!(!has_word("already synced", "ready"));
        assert!(!has_word("readyness", "ready"));
    }

    #[test]
    fn ansi() {
        assert_eq!(strip_ansi("\x1b[32m INFO\x1b[0m ready"), " INFO ready");
    }
}
