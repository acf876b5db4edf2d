//! A real rsync daemon on 127.0.0.1, serving one writable module with a password.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::harness::die_with_parent;

pub const MODULE: &str = "replica";
pub const USER: &str = "e2euser";
const PASSWORD: &str = "e2e-secret-pw";

pub struct RsyncDaemon {
    child: Child,
    pub port: u16,
    /// Client-side password file, for `--password-file`.
    pub password_file: PathBuf,
    log_file: PathBuf,
    stopped: bool,
}

fn write_private(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// A loopback port nobody listened on a moment ago.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// `rsync --daemon` with `conf` on 127.0.0.1:`port`, in its own process group (it forks
/// one child per connection), stderr to `stderr`; does not wait for it to listen.
fn spawn(conf: &Path, port: u16, stderr: &Path) -> Child {
    let stderr = std::fs::File::create(stderr).expect("create rsyncd stderr file");
    let mut cmd = Command::new("rsync");
    cmd.arg("--daemon")
        .arg("--no-detach")
        .arg(format!("--config={}", conf.display()))
        .arg(format!("--port={port}"))
        .arg("--address=127.0.0.1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .process_group(0);
    die_with_parent(&mut cmd);
    cmd.spawn()
        .expect("spawn rsync --daemon (is rsync installed?)")
}

impl RsyncDaemon {
    /// Starts `rsync --daemon` serving `module_path` as module [`MODULE`]; files for it
    /// (config, secrets, log) go in `dir`. Retries on another port when the one picked
    /// was taken meanwhile.
    pub fn start(dir: &Path, module_path: &Path) -> RsyncDaemon {
        let conf = dir.join("rsyncd.conf");
        let secrets = dir.join("rsyncd.secrets");
        let password_file = dir.join("rsync.password");
        let log_file = dir.join("rsyncd.log");
        write_private(&secrets, &format!("{USER}:{PASSWORD}\n"));
        write_private(&password_file, &format!("{PASSWORD}\n"));
        // `use chroot = no` turns `munge symlinks` on by default, which would rewrite
        // every symlink target: the replica must hold the targets as they are.
        let config = format!(
            "use chroot = no\n\
             munge symlinks = no\n\
             reverse lookup = no\n\
             log file = {log}\n\
             \n\
             [{MODULE}]\n\
             \tpath = {path}\n\
             \tread only = false\n\
             \tuid = root\n\
             \tgid = root\n\
             \tauth users = {USER}\n\
             \tsecrets file = {secrets}\n\
             \tstrict modes = true\n",
            log = log_file.display(),
            path = module_path.display(),
            secrets = secrets.display(),
        );
        std::fs::write(&conf, config).expect("write rsyncd.conf");

        let mut last_err = String::new();
        for attempt in 1..=5 {
            let port = free_port();
            let child = spawn(&conf, port, &dir.join(format!("rsyncd.stderr.{attempt}")));
            let mut d = RsyncDaemon {
                child,
                port,
                password_file: password_file.clone(),
                log_file: log_file.clone(),
                stopped: false,
            };
            match d.wait_listening(Duration::from_secs(20)) {
                Ok(()) => {
                    eprintln!("rsync daemon {} on 127.0.0.1:{port}", d.child.id());
                    return d;
                }
                Err(e) => {
                    last_err = format!(
                        "{e}; stderr: {}; log: {}",
                        std::fs::read_to_string(dir.join(format!("rsyncd.stderr.{attempt}")))
                            .unwrap_or_default(),
                        std::fs::read_to_string(&log_file).unwrap_or_default()
                    );
                    eprintln!("rsync daemon attempt {attempt} on port {port} failed: {last_err}");
                    // Dropping `d` kills it if it still runs.
                }
            }
        }
        panic!("could not start an rsync daemon: {last_err}");
    }

    /// Starts the daemon again on `port` (after it was stopped), with the files
    /// [`start`](Self::start) wrote in `dir`.
    #[allow(dead_code)] // used by the service tests, which share this fixture
    pub fn start_again(dir: &Path, port: u16) -> RsyncDaemon {
        let conf = dir.join("rsyncd.conf");
        assert!(conf.is_file(), "no rsyncd.conf in {}", dir.display());
        let stderr = dir.join("rsyncd.stderr.again");
        let mut d = RsyncDaemon {
            child: spawn(&conf, port, &stderr),
            port,
            password_file: dir.join("rsync.password"),
            log_file: dir.join("rsyncd.log"),
            stopped: false,
        };
        if let Err(e) = d.wait_listening(Duration::from_secs(20)) {
            panic!(
                "rsync daemon on port {port} did not come back: {e}; stderr: {}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
        }
        eprintln!("rsync daemon {} back on 127.0.0.1:{port}", d.child.id());
        d
    }

    /// Waits until the daemon greets on its port (`@RSYNCD:`), or exits.
    fn wait_listening(&mut self, timeout: Duration) -> Result<(), String> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.stopped = true;
                return Err(format!("rsync --daemon exited: {status}"));
            }
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                s.set_read_timeout(Some(Duration::from_secs(5))).ok();
                let mut buf = [0u8; 8];
                if s.read_exact(&mut buf).is_ok() && &buf == b"@RSYNCD:" {
                    // Leave politely (ask for the module list), so the daemon's log shows
                    // no protocol error for this probe.
                    let _ = s.write_all(b"@RSYNCD: 32.0\n#list\n");
                    let _ = s.read_to_end(&mut Vec::new());
                    return Ok(());
                }
            }
            if start.elapsed() >= timeout {
                return Err(format!(
                    "no rsync greeting on port {} within {timeout:?}",
                    self.port
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The `rsync://` URL of the module, for user [`USER`].
    pub fn url(&self) -> String {
        format!("rsync://{USER}@127.0.0.1:{}/{MODULE}/", self.port)
    }

    /// What clients have sent the daemon so far, from the `received N bytes` its log holds
    /// for every finished connection.
    #[allow(dead_code)] // used by the e2e tests only
    pub fn received_bytes(&self) -> u64 {
        // Not UTF-8 when names are not.
        let log = std::fs::read(&self.log_file).unwrap_or_default();
        let log = String::from_utf8_lossy(&log);
        log.lines()
            .filter_map(|line| {
                let rest = &line[line.find("received ")? + "received ".len()..];
                let figure = rest.split_whitespace().next()?;
                figure.replace(',', "").parse::<u64>().ok()
            })
            .sum()
    }

    /// SIGTERM and wait (bounded) for the exit.
    pub fn stop(mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let start = Instant::now();
        loop {
            if self.child.try_wait().expect("try_wait").is_some() {
                self.stopped = true;
                return;
            }
            if start.elapsed() > Duration::from_secs(20) {
                panic!("rsync daemon did not exit within 20 s after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RsyncDaemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Server-side errors (what made a transfer fail) are only in its log.
            // Not UTF-8 when names are not.
            let log = std::fs::read(&self.log_file).unwrap_or_default();
            let log = String::from_utf8_lossy(&log);
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(60)..].join("\n");
            eprintln!(
                "rsync daemon log ({}), last lines:\n{tail}",
                self.log_file.display()
            );
        }
        if !self.stopped {
            // Its own process group (it forks one child per connection).
            let _ = kill(Pid::from_raw(-(self.child.id() as i32)), Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}
