//! A real OpenSSH server on 127.0.0.1 for the ssh target tests: its own config file,
//! port, pid file and host key, a client key of its own, key authentication only, and a
//! known_hosts file written here (the daemon never accepts an unknown host key).
//!
//! sshd logs at `LogLevel VERBOSE` to a file, so a test counts authentications
//! ("Accepted publickey") to see that every run rode one connection.

use std::io::Read;
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::harness::die_with_parent;
use crate::rsyncd::free_port;

/// Where Debian installs the server (`cargo xtask setup` installs openssh-server).
const SSHD: &str = "/usr/sbin/sshd";
/// sshd refuses to start without its privilege-separation directory.
const PRIVSEP_DIR: &str = "/run/sshd";

pub struct Sshd {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    /// The client's private key.
    pub identity: PathBuf,
    /// The client's known_hosts, holding the server's key.
    pub known_hosts: PathBuf,
    pub log_file: PathBuf,
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (is openssh installed? cargo xtask setup)"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn keygen(path: &Path) {
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "watcher-e2e", "-f"])
        .arg(path));
}

/// Every process below `pid` (sshd forks one process per connection, which starts its
/// own session: a signal to sshd's process group does not reach them).
fn descendants(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.filter_map(Result::ok) {
            let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
                continue;
            };
            // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
                continue;
            };
            if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|s| s.parse().ok()) {
                parents.push((p, ppid));
            }
        }
    }
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    found.remove(0);
    found
}

impl Sshd {
    /// Generates keys and a config in `dir` and starts sshd on a free port.
    pub fn start(dir: &Path) -> Sshd {
        std::fs::create_dir_all(PRIVSEP_DIR).expect("create the sshd privsep dir");
        std::fs::create_dir_all(dir).expect("create the sshd dir");
        let host_key = dir.join("ssh_host_ed25519_key");
        let identity = dir.join("id_ed25519");
        keygen(&host_key);
        keygen(&identity);
        std::fs::copy(dir.join("id_ed25519.pub"), dir.join("authorized_keys"))
            .expect("authorized_keys");
        let mut d = Sshd {
            child: None,
            port: 0,
            dir: dir.to_path_buf(),
            identity,
            known_hosts: dir.join("known_hosts"),
            log_file: dir.join("sshd.log"),
        };
        let mut last = String::new();
        for _ in 0..5 {
            d.port = free_port();
            d.write_config();
            d.write_known_hosts(&host_key);
            match d.spawn() {
                Ok(()) => return d,
                Err(e) => last = e,
            }
        }
        panic!("could not start sshd: {last}");
    }

    fn write_config(&self) {
        // StrictModes off: the key files live under the world-writable temp directory.
        // SHLVL=1: bash (Debian's build) reads ~/.bashrc in sessions run by sshd unless it
        // is a nested shell; the account's start-up files are not what is measured here,
        // and one killed mid-way (an outage) can leave locks the next sessions wait on.
        let config = format!(
            "Port {port}\n\
             ListenAddress 127.0.0.1\n\
             HostKey {dir}/ssh_host_ed25519_key\n\
             PidFile {dir}/sshd.pid\n\
             AuthorizedKeysFile {dir}/authorized_keys\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\n\
             StrictModes no\n\
             UsePAM no\n\
             LogLevel VERBOSE\n\
             MaxStartups 100\n\
             MaxSessions 100\n\
             SetEnv SHLVL=1\n",
            port = self.port,
            dir = self.dir.display()
        );
        std::fs::write(self.dir.join("sshd_config"), config).expect("write sshd_config");
    }

    fn write_known_hosts(&self, host_key: &Path) {
        let public =
            std::fs::read_to_string(host_key.with_extension("pub")).expect("host public key");
        let mut fields = public.split_whitespace();
        let (kind, key) = (fields.next().expect("type"), fields.next().expect("key"));
        std::fs::write(
            &self.known_hosts,
            format!("[127.0.0.1]:{} {kind} {key}\n", self.port),
        )
        .expect("write known_hosts");
    }

    /// Starts sshd with the files already in place and waits for its banner.
    fn spawn(&mut self) -> Result<(), String> {
        let stderr = std::fs::File::create(self.dir.join("sshd.stderr")).expect("stderr file");
        let mut cmd = Command::new(SSHD);
        cmd.arg("-D")
            .arg("-f")
            .arg(self.dir.join("sshd_config"))
            .arg("-E")
            .arg(&self.log_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .process_group(0);
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(|e| format!("spawn {SSHD}: {e} (cargo xtask setup installs it)"))?;
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!(
                    "sshd exited: {status}; {}; {}",
                    std::fs::read_to_string(self.dir.join("sshd.stderr")).unwrap_or_default(),
                    std::fs::read_to_string(&self.log_file).unwrap_or_default()
                ));
            }
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                s.set_read_timeout(Some(Duration::from_secs(5))).ok();
                let mut buf = [0u8; 4];
                if s.read_exact(&mut buf).is_ok() && &buf == b"SSH-" {
                    eprintln!("sshd on 127.0.0.1:{}", self.port);
                    return Ok(());
                }
            }
            if start.elapsed() > Duration::from_secs(20) {
                return Err(format!("no ssh banner on port {} within 20 s", self.port));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `root@127.0.0.1:PATH`.
    pub fn dest(&self, path: &Path) -> String {
        format!("root@127.0.0.1:{}", path.display())
    }

    /// The ssh command a client uses: this server's port, the client key, the known_hosts
    /// file written for it (and no other).
    pub fn ssh_command(&self) -> Vec<String> {
        vec![
            "ssh".into(),
            "-p".into(),
            self.port.to_string(),
            "-i".into(),
            self.identity.display().to_string(),
            "-o".into(),
            "IdentitiesOnly=yes".into(),
            "-o".into(),
            format!("UserKnownHostsFile={}", self.known_hosts.display()),
            "-o".into(),
            "GlobalKnownHostsFile=/dev/null".into(),
        ]
    }

    /// The same as one `--rsync-arg=--rsh=...` for `watcher sync`.
    pub fn rsh_arg(&self) -> String {
        format!("--rsync-arg=--rsh={}", self.ssh_command().join(" "))
    }

    /// Authentications the server accepted so far.
    pub fn accepted(&self) -> usize {
        std::fs::read_to_string(&self.log_file)
            .unwrap_or_default()
            .matches("Accepted publickey")
            .count()
    }

    /// An outage: sshd and every connection it serves are killed.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let below = descendants(child.id());
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
        for pid in below {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        let _ = child.wait();
        eprintln!("sshd on port {} stopped", self.port);
    }

    /// Starts sshd again on the same port, with the same keys.
    pub fn start_again(&mut self) {
        let start = Instant::now();
        loop {
            match self.spawn() {
                Ok(()) => return,
                // The port may linger for a moment after the kill.
                Err(e) if start.elapsed() > Duration::from_secs(30) => {
                    panic!("sshd did not come back on port {}: {e}", self.port)
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log_file).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "sshd log ({}), last lines:\n{}",
                self.log_file.display(),
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
        self.stop();
    }
}

/// Whether sshd is installed. Under CI (`CI=true`) a missing sshd is a failure, never a skip.
pub fn available_or_skip(test: &str) -> bool {
    if Path::new(SSHD).is_file() {
        return true;
    }
    let reason = format!("{test}: needs {SSHD} (openssh-server; cargo xtask setup installs it)");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{reason}");
    }
    eprintln!("skipping {reason}");
    false
}
