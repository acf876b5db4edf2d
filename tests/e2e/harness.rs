//! Running `watcher sync` as a child process and watching its log.

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The binary under test.
pub const WATCHER: &str = env!("CARGO_BIN_EXE_watcher");

/// How long a daemon may take to print `ready` on a small tree.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a daemon may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// Held for reading by every test while its daemon starts (until `ready`), and for
/// writing by the test that lowers `fs.fanotify.max_queued_events`: a fanotify group
/// reads that limit when it is created, so no other daemon may start meanwhile.
pub static QUEUE_LIMIT_LOCK: RwLock<()> = RwLock::new(());

/// These tests need root: filesystem-wide fanotify marks need CAP_SYS_ADMIN.
/// Returns whether the test may run; under CI (`CI=true`) a missing root is a failure.
pub fn root_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    let reason = format!(
        "{test}: needs root (filesystem-wide fanotify marks need CAP_SYS_ADMIN), \
         running as uid {}",
        nix::unistd::geteuid()
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{reason}");
    }
    eprintln!("skipping {reason}");
    false
}

/// The backend under test: `WATCHER_E2E_BACKEND` (fanotify, inotify) or the daemon's own
/// choice when unset. `cargo xtask test` runs the suite once per backend.
pub fn backend() -> Option<String> {
    std::env::var("WATCHER_E2E_BACKEND")
        .ok()
        .filter(|b| !b.is_empty())
}

/// Prints how long a test took when dropped (seen with `--nocapture` or on failure).
pub struct TestTimer {
    test: &'static str,
    start: Instant,
}

impl Drop for TestTimer {
    fn drop(&mut self) {
        eprintln!("{}: {:.1?}", self.test, self.start.elapsed());
    }
}

/// The root gate and a timer: `None` when the test is to be skipped.
pub fn begin(test: &'static str) -> Option<TestTimer> {
    root_or_skip(test).then(|| TestTimer {
        test,
        start: Instant::now(),
    })
}

/// The seed of a test's random churn: `WATCHER_E2E_SEED` when set, else a fresh one.
/// It is printed, and every failure message of a seeded test repeats it.
pub fn seed(test: &str) -> u64 {
    let seed = match std::env::var("WATCHER_E2E_SEED") {
        Ok(s) => s.trim().parse().expect("WATCHER_E2E_SEED must be a u64"),
        Err(_) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock before 1970");
            now.as_nanos() as u64 ^ (u64::from(std::process::id()) << 32)
        }
    };
    eprintln!("{test}: seed {seed} (replay with WATCHER_E2E_SEED={seed})");
    seed
}

/// A test's own directories: `src` (the watched tree) and `dst` (the replica), side by
/// side in a fresh directory under the system temp dir, removed on drop.
pub struct Scratch {
    pub dir: tempfile::TempDir,
    pub src: PathBuf,
    pub dst: PathBuf,
}

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix(&format!("watcher-e2e-{name}-"))
            .tempdir_in(std::env::temp_dir())
            .expect("create temp dir");
        let src = dir.path().join("src");
        let dst = dir.path().join("dst");
        std::fs::create_dir(&src).expect("create src");
        std::fs::create_dir(&dst).expect("create dst");
        Scratch { dir, src, dst }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // WATCHER_E2E_KEEP=1 keeps the trees of a failed test for a look.
        if std::thread::panicking() && std::env::var_os("WATCHER_E2E_KEEP").is_some() {
            self.dir.disable_cleanup(true);
            eprintln!("kept {}", self.dir.path().display());
        }
    }
}

/// Lines printed by a child (stderr and stdout), shared with the reader threads.
#[derive(Clone, Default)]
pub struct LogLines(Arc<Mutex<Vec<String>>>);

impl LogLines {
    fn push(&self, line: String) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(line);
    }

    /// Every line so far (a copy).
    #[allow(dead_code)] // used by the service tests, which share this harness
    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn count(&self, needle: &str) -> usize {
        let lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        lines.iter().filter(|l| l.contains(needle)).count()
    }

    pub fn contains(&self, needle: &str) -> bool {
        self.count(needle) > 0
    }

    /// The last `n` lines, for failure messages.
    pub fn tail(&self, n: usize) -> String {
        let lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let start = lines.len().saturating_sub(n);
        lines[start..].join("\n")
    }
}

/// Reads `from` line by line (bytes, not UTF-8: paths in logs may be anything), stores
/// each line and forwards it to the test's stderr (shown when the test fails).
pub fn spawn_reader(
    from: impl Read + Send + 'static,
    tag: String,
    lines: LogLines,
) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(format!("log {tag}"))
        .spawn(move || {
            let mut reader = BufReader::new(from);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                            buf.pop();
                        }
                        let line = String::from_utf8_lossy(&buf).into_owned();
                        eprintln!("[{tag}] {line}");
                        lines.push(line);
                    }
                }
            }
        })
        .expect("spawn log reader thread")
}

/// Makes the kernel kill the child when the thread that spawned it dies, so a test
/// binary that is killed leaves no daemons behind. Every daemon is stopped (or killed
/// on drop) before its test's thread ends.
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Polls `cond` every `every` until it holds or `timeout` passes; returns whether it held.
pub fn poll_until(timeout: Duration, every: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(every);
    }
}

/// A running `watcher sync`. Killed (SIGKILL) on drop unless stopped with [`Daemon::stop`].
pub struct Daemon {
    child: Child,
    pub log: LogLines,
    readers: Vec<JoinHandle<()>>,
    pub name: String,
    exited: Option<ExitStatus>,
}

impl Daemon {
    /// Spawns `watcher sync SRC DST ARGS...` with `RUST_LOG=info` and returns at once.
    pub fn spawn(src: &Path, dst: impl AsRef<OsStr>, args: &[OsString]) -> Daemon {
        let mut all: Vec<OsString> = vec!["sync".into(), src.into(), dst.as_ref().into()];
        all.extend(args.iter().cloned());
        if let Some(backend) = backend().filter(|_| !args.iter().any(|a| a == "--backend")) {
            if backend == "ebpf"
                && let Ok(probes) = std::env::var("WATCHER_E2E_EBPF_PROBES")
            {
                // `vfs` where the kernel takes fentry programs (a VM's distribution kernel).
                all.extend(["--ebpf-probes".into(), probes.into()]);
            }
            all.extend(["--backend".into(), backend.into()]);
        }
        Daemon::spawn_with(&all)
    }

    /// Spawns `watcher ARGS...` (any long-running subcommand) with `RUST_LOG=info`, in its
    /// own process group, its output collected; returns at once.
    pub fn spawn_with(args: &[OsString]) -> Daemon {
        let mut cmd = Command::new(WATCHER);
        cmd.args(args)
            // WATCHER_E2E_LOG: more of the daemon's log when replaying a seed.
            .env(
                "RUST_LOG",
                std::env::var("WATCHER_E2E_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env_remove("RUST_LOG_STYLE")
            .env("NO_COLOR", "1")
            // Not a systemd service, whatever the test runner's environment says.
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a Ctrl-C at the terminal goes to the test runner,
            // not straight to the daemons.
            .process_group(0);
        die_with_parent(&mut cmd);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {WATCHER}: {e}"));
        let name = format!("watcher {}", child.id());
        eprintln!("[{name}] started: {args:?}");
        let log = LogLines::default();
        let readers = vec![
            spawn_reader(
                child.stderr.take().expect("stderr piped"),
                name.clone(),
                log.clone(),
            ),
            spawn_reader(
                child.stdout.take().expect("stdout piped"),
                format!("{name} stdout"),
                log.clone(),
            ),
        ];
        Daemon {
            child,
            log,
            readers,
            name,
            exited: None,
        }
    }

    /// Spawns the daemon and waits for `ready`, holding [`QUEUE_LIMIT_LOCK`] for reading
    /// meanwhile so it never starts while another test has lowered the queue limit.
    pub fn start(src: &Path, dst: impl AsRef<OsStr>, args: &[OsString]) -> Daemon {
        let _guard = QUEUE_LIMIT_LOCK.read().unwrap_or_else(|e| e.into_inner());
        let mut d = Daemon::spawn(src, dst, args);
        d.wait_for_line("ready", READY_TIMEOUT);
        d
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    pub fn signal(&self, sig: Signal) {
        kill(self.pid(), sig).unwrap_or_else(|e| panic!("kill({}, {sig}): {e}", self.pid()));
    }

    /// Whether the daemon has exited; fails the test when it exited unasked.
    fn check_alive(&mut self, waiting_for: &str) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            self.exited = Some(status);
            // Let the readers take in what it printed last.
            poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
                self.readers.iter().all(|r| r.is_finished())
            });
            panic!(
                "{} exited ({status}) while waiting for {waiting_for:?}; last lines:\n{}",
                self.name,
                self.log.tail(40)
            );
        }
    }

    /// Waits until a line containing `needle` was printed; returns how many there are.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> usize {
        self.wait_for_count(needle, 1, timeout)
    }

    /// Waits until at least `n` lines contain `needle`; returns how many do.
    pub fn wait_for_count(&mut self, needle: &str, n: usize, timeout: Duration) -> usize {
        let start = Instant::now();
        loop {
            let c = self.log.count(needle);
            if c >= n {
                return c;
            }
            self.check_alive(needle);
            if start.elapsed() >= timeout {
                panic!(
                    "{}: {c} line(s) containing {needle:?} within {timeout:?}, expected at \
                     least {n}; last lines:\n{}",
                    self.name,
                    self.log.tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `cond` holds for the log, failing the test after `timeout`.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut(&LogLines) -> bool,
    ) {
        let start = Instant::now();
        loop {
            if cond(&self.log) {
                return;
            }
            self.check_alive(what);
            if start.elapsed() >= timeout {
                panic!(
                    "{}: {what}: not within {timeout:?}; last lines:\n{}",
                    self.name,
                    self.log.tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL to the daemon and every process of its group (its rsync runs): nothing
    /// gets to flush, close a journal or finish a transfer.
    #[allow(dead_code)] // used by the service tests, which share this harness
    pub fn kill9(&mut self) {
        let group = self.child.id() as i32;
        kill(Pid::from_raw(-group), Signal::SIGKILL)
            .unwrap_or_else(|e| panic!("kill -9 -{group}: {e}"));
        let status = self.wait_exit(Duration::from_secs(20));
        eprintln!("[{}] killed: {status}", self.name);
        // Leftover rsync processes of the group die too; wait until none is left, so
        // none writes into the replica behind the next daemon's back.
        let gone = poll_until(Duration::from_secs(20), Duration::from_millis(20), || {
            live_in_group(group) == 0
        });
        assert!(
            gone,
            "{}: processes of its group outlived SIGKILL",
            self.name
        );
    }

    /// How many lines containing `needle` the daemon has printed so far.
    pub fn count(&self, needle: &str) -> usize {
        self.log.count(needle)
    }

    /// Waits until no new `rsync finished` line came for `quiet`, at most `timeout`.
    /// Returns how many rsync runs happened meanwhile; fails when rsync never stops
    /// running (a feedback loop: the daemon reacting to its own writes).
    pub fn wait_rsync_quiet(&mut self, quiet: Duration, timeout: Duration) -> usize {
        let start = Instant::now();
        let first = self.count("rsync finished");
        let mut last = first;
        let mut last_change = Instant::now();
        loop {
            self.check_alive("rsync to go quiet");
            let n = self.count("rsync finished");
            if n != last {
                last = n;
                last_change = Instant::now();
            }
            if last_change.elapsed() >= quiet {
                return last - first;
            }
            if start.elapsed() >= timeout {
                panic!(
                    "{}: rsync kept running with no change in the source: {} runs in {:?} \
                     (feedback loop?); last lines:\n{}",
                    self.name,
                    last - first,
                    timeout,
                    self.log.tail(20)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the exit after a signal was sent; fails the test after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(s) = self.exited {
            return s;
        }
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.exited = Some(status);
                // Take in the last lines (`stopped`): the pipes close at exit, unless a
                // leftover grandchild still holds them, hence the bound.
                poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
                    self.readers.iter().all(|r| r.is_finished())
                });
                return status;
            }
            if start.elapsed() >= timeout {
                panic!(
                    "{} did not exit within {timeout:?}; last lines:\n{}",
                    self.name,
                    self.log.tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then waits for the exit: it must be 0 and the log must say `stopped`.
    pub fn stop(mut self) {
        self.signal(Signal::SIGTERM);
        let status = self.wait_exit(STOP_TIMEOUT);
        assert!(
            status.success(),
            "{} exited with {status} after SIGTERM (expected 0); last lines:\n{}",
            self.name,
            self.log.tail(40)
        );
        assert!(
            self.log.contains("stopped"),
            "{} exited 0 but never logged `stopped`; last lines:\n{}",
            self.name,
            self.log.tail(40)
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.exited.is_none() {
            // A failed test: do not leave the daemon (or its rsync) running. The group is
            // the one this child was put in at spawn; SIGCONT in case it was stopped.
            let pgid = Pid::from_raw(-(self.child.id() as i32));
            let _ = kill(pgid, Signal::SIGKILL);
            let _ = kill(pgid, Signal::SIGCONT);
            let _ = self.child.wait();
        }
    }
}

/// Processes of process group `pgid` that are not zombies (a zombie writes nothing).
fn live_in_group(pgid: i32) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter(|d| {
            d.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|d| std::fs::read_to_string(d.path().join("stat")).ok())
        .filter(|stat| {
            // "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
            let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
                return false;
            };
            let mut fields = rest.split_whitespace();
            let state = fields.next().unwrap_or("Z");
            let pgrp = fields.nth(1).and_then(|f| f.parse::<i32>().ok());
            state != "Z" && pgrp == Some(pgid)
        })
        .count()
}

/// Convenience: `&["--a", "b"]` as owned arguments.
pub fn args(list: &[&str]) -> Vec<OsString> {
    list.iter().map(OsString::from).collect()
}

/// Writes a value to a file under /proc/sys and puts the old value back on drop.
pub struct SysctlGuard {
    path: PathBuf,
    old: String,
}

impl SysctlGuard {
    pub fn set(path: &str, value: &str) -> SysctlGuard {
        let path = PathBuf::from(path);
        let old = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        std::fs::write(&path, value)
            .unwrap_or_else(|e| panic!("write {value} to {}: {e}", path.display()));
        eprintln!("{} = {value} (was {})", path.display(), old.trim());
        SysctlGuard { path, old }
    }
}

impl Drop for SysctlGuard {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(&self.path, self.old.trim()) {
            eprintln!("could not restore {}: {e}", self.path.display());
        } else {
            eprintln!("{} restored to {}", self.path.display(), self.old.trim());
        }
    }
}
