//! An rsync daemon on 127.0.0.1 for the `rename` scenario: its own config, secrets and
//! password file, one writable module with password authentication, as root, no chroot.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;

use crate::comp::Dest;
use crate::proc::{self, Guard};

pub const MODULE: &str = "replica";
const USER: &str = "bench";
const PASSWORD: &str = "bench-secret-pw";

pub struct Rsyncd {
    guard: Guard,
    pub port: u16,
    /// Client-side password file, for `--password-file`.
    password_file: PathBuf,
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 600 {}", path.display()))
}

impl Rsyncd {
    /// `rsync --daemon` serving `module_path` as [`MODULE`] on a free loopback port; its
    /// files in `dir`. Up once it greets.
    pub fn start(dir: &Path, module_path: &Path) -> Result<Rsyncd> {
        std::fs::create_dir_all(dir)?;
        let conf = dir.join("rsyncd.conf");
        let secrets = dir.join("rsyncd.secrets");
        let password_file = dir.join("rsync.password");
        let log_file = dir.join("rsyncd.log");
        write_private(&secrets, &format!("{USER}:{PASSWORD}\n"))?;
        write_private(&password_file, &format!("{PASSWORD}\n"))?;
        // `use chroot = no` turns `munge symlinks` on by default, which would rewrite
        // every symlink target.
        let config = format!(
            "use chroot = no\nmunge symlinks = no\nreverse lookup = no\nlog file = {log}\n\n\
             [{MODULE}]\n\tpath = {path}\n\tread only = false\n\tuid = root\n\tgid = root\n\
             \tauth users = {USER}\n\tsecrets file = {secrets}\n\tstrict modes = true\n",
            log = log_file.display(),
            path = module_path.display(),
            secrets = secrets.display(),
        );
        std::fs::write(&conf, config)?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let stderr = std::fs::File::create(dir.join("rsyncd.stderr"))?;
        let mut guard = Guard::spawn(
            "rsync --daemon",
            Command::new("rsync")
                .arg("--daemon")
                .arg("--no-detach")
                .arg(format!("--config={}", conf.display()))
                .arg(format!("--port={port}"))
                .arg("--address=127.0.0.1")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr),
        )?;
        let started = Instant::now();
        loop {
            proc::check_interrupted()?;
            if let Some(st) = guard.try_wait()? {
                bail!(
                    "rsync --daemon exited ({st}): {}",
                    std::fs::read_to_string(dir.join("rsyncd.stderr")).unwrap_or_default()
                );
            }
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                let mut buf = [0u8; 8];
                if s.read_exact(&mut buf).is_ok() && &buf == b"@RSYNCD:" {
                    // Leave politely: ask for the module list.
                    let _ = s.write_all(b"@RSYNCD: 32.0\n#list\n");
                    let _ = s.read_to_end(&mut Vec::new());
                    break;
                }
            }
            if started.elapsed() > Duration::from_secs(20) {
                bail!("rsync --daemon did not answer on 127.0.0.1:{port}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Rsyncd {
            guard,
            port,
            password_file,
        })
    }

    /// The module, for rsync: `rsync://USER@127.0.0.1:PORT/MODULE` and the password file.
    pub fn dest(&self) -> Dest {
        Dest {
            rsync: format!("rsync://{USER}@127.0.0.1:{}/{MODULE}", self.port),
            rsync_opts: vec![format!("--password-file={}", self.password_file.display())],
            ssh: None,
        }
    }

    pub fn stop(mut self) -> Result<()> {
        self.guard.stop(Signal::SIGTERM, Duration::from_secs(5))?;
        Ok(())
    }
}
