//! An OpenSSH server on 127.0.0.1 for the `ssh` and `rename` scenarios: its own config,
//! port, pid file, host key and client key, key authentication only, a known_hosts file
//! written here, `LogLevel VERBOSE` to a file whose "Accepted publickey" lines count
//! authentications.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;

use crate::comp::{Dest, SshDest, lua_str};
use crate::proc::Guard;

/// Where Debian installs the server (`cargo xtask setup` installs openssh-server).
pub const SSHD: &str = "/usr/sbin/sshd";

pub struct Sshd {
    guard: Guard,
    pub port: u16,
    identity: PathBuf,
    known_hosts: PathBuf,
    log_file: PathBuf,
}

fn keygen(path: &Path) -> Result<()> {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .output()
        .context("running ssh-keygen")?;
    if !out.status.success() {
        bail!("ssh-keygen: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

impl Sshd {
    /// Keys and config in `dir`, sshd on a free loopback port, up once it greets.
    pub fn start(dir: &Path) -> Result<Sshd> {
        std::fs::create_dir_all("/run/sshd").context("creating /run/sshd")?;
        std::fs::create_dir_all(dir)?;
        let host_key = dir.join("host_ed25519");
        let identity = dir.join("id_ed25519");
        keygen(&host_key)?;
        keygen(&identity)?;
        std::fs::copy(dir.join("id_ed25519.pub"), dir.join("authorized_keys"))?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        // SHLVL=1: bash reads ~/.bashrc in sessions run by sshd unless nested; the
        // account's start-up files are not what is measured.
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_ed25519\n\
             PidFile {d}/sshd.pid\nAuthorizedKeysFile {d}/authorized_keys\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n\
             LogLevel VERBOSE\nSetEnv SHLVL=1\n",
            d = dir.display()
        );
        std::fs::write(dir.join("sshd_config"), config)?;
        let public = std::fs::read_to_string(host_key.with_extension("pub"))?;
        let key: Vec<&str> = public.split_whitespace().take(2).collect();
        let known_hosts = dir.join("known_hosts");
        std::fs::write(
            &known_hosts,
            format!("[127.0.0.1]:{port} {}\n", key.join(" ")),
        )?;
        let log_file = dir.join("sshd.log");
        let guard = Guard::spawn(
            "sshd",
            Command::new(SSHD)
                .arg("-D")
                .arg("-f")
                .arg(dir.join("sshd_config"))
                .arg("-E")
                .arg(&log_file)
                .stdin(Stdio::null())
                .stdout(Stdio::null()),
        )?;
        let started = Instant::now();
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                let mut banner = [0u8; 4];
                if s.read_exact(&mut banner).is_ok() && &banner == b"SSH-" {
                    break;
                }
            }
            if started.elapsed() > Duration::from_secs(20) {
                bail!(
                    "sshd did not answer on 127.0.0.1:{port}: {}",
                    std::fs::read_to_string(&log_file).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Sshd {
            guard,
            port,
            identity,
            known_hosts,
            log_file,
        })
    }

    /// `--rsync-arg=--rsh=...` for `watcher sync`: this port, the client key, this
    /// known_hosts file only.
    pub fn rsh_arg(&self) -> String {
        format!("--rsync-arg={}", self.rsh())
    }

    /// rsync's `--rsh=...` option for this server (see [`Sshd::rsh_arg`]).
    pub fn rsh(&self) -> String {
        format!(
            "--rsh=ssh -p {} -i {} -o IdentitiesOnly=yes -o UserKnownHostsFile={} -o GlobalKnownHostsFile=/dev/null",
            self.port,
            self.identity.display(),
            self.known_hosts.display()
        )
    }

    /// `dir` as root on this server, for rsync (with [`Sshd::rsh`]) and for lsyncd's
    /// `default.rsyncssh` (the same ssh options as a Lua `ssh` table).
    pub fn dest(&self, dir: &Path) -> Dest {
        let lua_ssh = format!(
            "{{ port = {}, identityFile = {}, options = {{ IdentitiesOnly = \"yes\", UserKnownHostsFile = {}, GlobalKnownHostsFile = \"/dev/null\" }} }}",
            self.port,
            lua_str(&self.identity.to_string_lossy()),
            lua_str(&self.known_hosts.to_string_lossy())
        );
        Dest {
            rsync: format!("root@127.0.0.1:{}", dir.display()),
            rsync_opts: vec![self.rsh()],
            ssh: Some(SshDest {
                host: "root@127.0.0.1".to_owned(),
                dir: dir.to_string_lossy().into_owned(),
                lua_ssh,
            }),
        }
    }

    /// Authentications the server accepted so far.
    pub fn accepted(&self) -> usize {
        std::fs::read_to_string(&self.log_file)
            .unwrap_or_default()
            .matches("Accepted publickey")
            .count()
    }

    pub fn stop(mut self) -> Result<()> {
        self.guard.stop(Signal::SIGTERM, Duration::from_secs(5))?;
        Ok(())
    }
}
