//! How many inotify watches this user may still add: `fs.inotify.max_user_watches`
//! against the watches held already, and what a number of watches costs the kernel. The
//! backend refuses to start on a tree that does not fit, and `watcher check` says so.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;

use crate::backend::BackendError;

const MAX_USER_WATCHES: &str = "/proc/sys/fs/inotify/max_user_watches";

/// Kernel memory one watch pins: the mark plus the inode and dentry it keeps in memory.
const WATCH_COST_LOW: u64 = 1024;
const WATCH_COST_HIGH: u64 = 2048;

/// Kernel memory `watches` would pin, as a range for messages.
pub(crate) fn kernel_memory(watches: &u64) -> String {
    let (low, high) = (
        watches.saturating_mul(WATCH_COST_LOW),
        watches.saturating_mul(WATCH_COST_HIGH),
    );
    let (unit, shift) = if high >= 10 << 20 {
        ("MiB", 20)
    } else {
        ("KiB", 10)
    };
    format!(
        "about {}-{} {unit} of kernel memory",
        low >> shift,
        high.div_ceil(1 << shift)
    )
}

/// `fs.inotify.max_user_watches` and how many watches this user holds already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchLimits {
    pub max: u64,
    pub in_use: u64,
}

impl WatchLimits {
    /// Reads the sysctl and counts the watches in use (see [`watches_in_use`]).
    pub fn read() -> Result<Self, BackendError> {
        let text =
            std::fs::read_to_string(MAX_USER_WATCHES).map_err(|source| BackendError::Syscall {
                call: "read",
                path: MAX_USER_WATCHES.into(),
                source,
            })?;
        let max = text.trim().parse().map_err(|_| BackendError::Syscall {
            call: "parse",
            path: MAX_USER_WATCHES.into(),
            source: io::Error::new(io::ErrorKind::InvalidData, text.trim().to_string()),
        })?;
        Ok(WatchLimits {
            max,
            in_use: watches_in_use(nix::unistd::geteuid().as_raw()),
        })
    }

    /// Watches that can still be added.
    pub fn available(&self) -> u64 {
        self.max.saturating_sub(self.in_use)
    }
}

/// Watches held by the processes of `uid`: the `inotify wd:` lines of every inotify
/// descriptor in /proc/*/fdinfo. The kernel charges watches to the effective uid that
/// created the instance; a process's current uid stands in for it, and an instance shared
/// by several descriptors or processes is counted for each, so this errs on the high side.
pub fn watches_in_use(uid: u32) -> u64 {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut total = 0;
    for proc in procs.flatten() {
        let name = proc.file_name();
        if !name.as_bytes().iter().all(u8::is_ascii_digit) {
            continue;
        }
        let dir = proc.path();
        if std::fs::metadata(&dir).map_or(true, |m| m.uid() != uid) {
            continue;
        }
        // Processes come and go: whatever cannot be read is skipped.
        let Ok(fds) = std::fs::read_dir(dir.join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let is_inotify = std::fs::read_link(fd.path())
                .is_ok_and(|target| target.as_os_str() == "anon_inode:inotify");
            if !is_inotify {
                continue;
            }
            if let Ok(info) = std::fs::read(dir.join("fdinfo").join(fd.file_name())) {
                total += info
                    .split(|&b| b == b'\n')
                    .filter(|line| line.starts_with(b"inotify wd:"))
                    .count() as u64;
            }
        }
    }
    total
}
