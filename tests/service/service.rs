//! Running `watcher run --config FILE` as a child process: the configuration file, the
//! process, its log, other invocations of the binary (`status`, `config check`), and a
//! restartable rsync daemon.

use std::ffi::OsStr;
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::harness::{Daemon, LogLines, WATCHER, die_with_parent};

// ---------------------------------------------------------------------------------------
// The configuration file

/// A `[[sync.target]]` table.
#[derive(Clone, Debug)]
pub struct TargetSpec {
    pub name: String,
    pub dest: String,
    pub password_file: Option<PathBuf>,
    /// `post_sync`: the command, program first (empty: none).
    pub post_sync: Vec<String>,
}

impl TargetSpec {
    pub fn local(name: &str, dir: &Path) -> TargetSpec {
        TargetSpec {
            name: name.into(),
            dest: dir.to_str().expect("UTF-8 temp path").into(),
            password_file: None,
            post_sync: Vec::new(),
        }
    }
}

/// A `[[sync]]` table.
#[derive(Clone, Debug)]
pub struct GroupSpec {
    pub name: String,
    pub source: PathBuf,
    pub targets: Vec<TargetSpec>,
    /// `verify_interval`, e.g. `"2s"`.
    pub verify_interval: Option<String>,
}

impl GroupSpec {
    pub fn new(name: &str, source: &Path, targets: Vec<TargetSpec>) -> GroupSpec {
        GroupSpec {
            name: name.into(),
            source: source.to_path_buf(),
            targets,
            verify_interval: None,
        }
    }
}

/// A whole configuration file.
#[derive(Clone, Debug)]
pub struct ConfigSpec {
    pub state_dir: PathBuf,
    pub status_socket: PathBuf,
    pub metrics: Option<SocketAddr>,
    pub groups: Vec<GroupSpec>,
}

/// The backend under test: `WATCHER_E2E_BACKEND` (`fanotify`, `inotify`), as in the
/// end-to-end suite, or the daemon's own choice (`auto`) when unset.
pub fn backend() -> String {
    std::env::var("WATCHER_E2E_BACKEND")
        .ok()
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| "auto".into())
}

/// A TOML basic string.
pub fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn toml_path(p: &Path) -> String {
    toml_str(p.to_str().expect("UTF-8 temp path"))
}

impl ConfigSpec {
    /// A configuration with its state and socket in `dir` and no groups yet.
    pub fn in_dir(dir: &Path) -> ConfigSpec {
        ConfigSpec {
            state_dir: dir.join("state"),
            status_socket: dir.join("status.sock"),
            metrics: None,
            groups: Vec::new(),
        }
    }

    pub fn render(&self) -> String {
        let mut s = format!("[daemon]\nbackend = {}\n", toml_str(&backend()));
        s.push_str(&format!("state_dir = {}\n", toml_path(&self.state_dir)));
        s.push_str(&format!(
            "status_socket = {}\n",
            toml_path(&self.status_socket)
        ));
        if let Some(m) = self.metrics {
            s.push_str(&format!("metrics = {}\n", toml_str(&m.to_string())));
        }
        for g in &self.groups {
            s.push_str("\n[[sync]]\n");
            s.push_str(&format!("name = {}\n", toml_str(&g.name)));
            s.push_str(&format!("source = {}\n", toml_path(&g.source)));
            s.push_str("delay_ms = 100\nmax_delay_ms = 1000\n");
            if let Some(v) = &g.verify_interval {
                s.push_str(&format!("verify_interval = {}\n", toml_str(v)));
            }
            for t in &g.targets {
                s.push_str("\n[[sync.target]]\n");
                s.push_str(&format!("name = {}\n", toml_str(&t.name)));
                s.push_str(&format!("dest = {}\n", toml_str(&t.dest)));
                if let Some(p) = &t.password_file {
                    s.push_str(&format!("password_file = {}\n", toml_path(p)));
                }
                if !t.post_sync.is_empty() {
                    let words: Vec<String> = t.post_sync.iter().map(|w| toml_str(w)).collect();
                    s.push_str(&format!("post_sync = [{}]\n", words.join(", ")));
                }
            }
        }
        s
    }

    /// Writes the file with mode 0600 (replacing it in one rename, so a daemon reading it
    /// on SIGHUP never sees half of it).
    pub fn write(&self, path: &Path) {
        write_config_text(path, &self.render());
    }
}

/// Writes `text` to `path` with mode 0600, through a temporary file and a rename.
pub fn write_config_text(path: &Path, text: &str) {
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("chmod 600 {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path)
        .unwrap_or_else(|e| panic!("rename {} -> {}: {e}", tmp.display(), path.display()));
}

pub use crate::rsyncd::free_port;

// ---------------------------------------------------------------------------------------
// The daemon process

/// The part of the `ready` line (`INFO ready targets=N`) that no other line has.
pub const READY: &str = "ready targets=";

/// Lines a child printed (the e2e harness's type).
pub type Log = LogLines;

/// A running `watcher run --config FILE`: the e2e harness's daemon process.
pub type Service = Daemon;

impl Daemon {
    /// Spawns `watcher run --config CONFIG` with `RUST_LOG=info`; returns at once.
    pub fn spawn_run(config: &Path) -> Service {
        Daemon::spawn_with(&["run".into(), "--config".into(), config.into()])
    }

    /// Spawns `watcher run --config CONFIG` and waits for `ready`.
    pub fn start_run(config: &Path, ready_timeout: Duration) -> Service {
        let mut s = Daemon::spawn_run(config);
        s.wait_for_line(READY, ready_timeout);
        s
    }
}

// ---------------------------------------------------------------------------------------
// Other invocations of the binary

/// What a finished command printed.
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `watcher ARGS...` to completion, killing it after `timeout`.
pub fn run_watcher(args: &[&OsStr], timeout: Duration) -> Output {
    let mut cmd = Command::new(WATCHER);
    cmd.args(args)
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    die_with_parent(&mut cmd);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {WATCHER}: {e}"));
    let collect = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            String::from_utf8_lossy(&v).into_owned()
        })
    };
    let out = collect(Box::new(child.stdout.take().expect("stdout piped")));
    let err = collect(Box::new(child.stderr.take().expect("stderr piped")));
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if start.elapsed() >= timeout {
            let _ = kill(Pid::from_raw(-(child.id() as i32)), Signal::SIGKILL);
            let _ = child.wait();
            panic!("watcher {args:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

/// `GET /metrics` over a plain TcpStream; returns the whole response.
pub fn http_get_metrics(addr: SocketAddr) -> String {
    use std::io::Write;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to metrics endpoint {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.set_write_timeout(Some(Duration::from_secs(5))).ok();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .unwrap_or_else(|e| panic!("send request to {addr}: {e}"));
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .unwrap_or_else(|e| panic!("read response from {addr}: {e}"));
    String::from_utf8_lossy(&buf).into_owned()
}
