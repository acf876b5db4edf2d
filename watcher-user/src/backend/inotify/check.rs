//! `watcher check` for inotify: whether this kernel gives an inotify instance, and per
//! path whether its directories fit in the watches this user has left (counted by a
//! walk that adds no watch).

use std::io;
use std::path::PathBuf;

use super::init;
use super::limits::{WatchLimits, kernel_memory};
use super::walk::{Job, Walk};
use crate::backend::Support;

/// Rows for `watcher check`: whether inotify works, and per path whether its directories
/// fit in the watches left.
pub fn check(paths: &[PathBuf]) -> Vec<Support> {
    let mut rows = Vec::new();
    let inotify = init();
    let limits = WatchLimits::read();
    let kernel = match (&inotify, &limits) {
        (Ok(_), Ok(l)) => Ok(format!(
            "inotify_init1 works; fs.inotify.max_user_watches={}, {} in use by this user, {} free",
            l.max,
            l.in_use,
            l.available()
        )),
        (Err(e), _) | (_, Err(e)) => Err(crate::backend::error_chain(e)),
    };
    rows.push(Support {
        backend: "inotify",
        path: None,
        ok: kernel.is_ok(),
        detail: kernel.unwrap_or_else(|e| e),
    });
    let (Ok(_), Ok(limits)) = (inotify, limits) else {
        return rows;
    };
    for path in paths {
        if !path.is_dir() {
            rows.push(Support {
                backend: "inotify",
                path: Some(path.clone()),
                ok: false,
                detail: "not a directory".into(),
            });
            continue;
        }
        let outcome = Walk::new(None, "check").run(vec![Job {
            path: path.clone(),
            parent: None,
            name: path.clone().into_os_string(),
        }]);
        // Network and FUSE filesystems only notify of changes made through this machine.
        let fstype = crate::backend::filesystem_type(path);
        let remote = matches!(
            fstype.as_str(),
            "nfs" | "nfs4" | "cifs" | "smb3" | "9p" | "ceph" | "glusterfs" | "afs"
        ) || fstype.starts_with("fuse");
        let caveat = if remote {
            format!("; {fstype}: only changes made on this machine are seen")
        } else {
            String::new()
        };
        let row = if let Some(f) = outcome.failures.first() {
            Support {
                backend: "inotify",
                path: Some(path.clone()),
                ok: false,
                detail: format!(
                    "{} on {}: {}",
                    f.call,
                    f.path.display(),
                    io::Error::from(f.errno)
                ),
            }
        } else {
            let fits = outcome.dirs <= limits.available();
            Support {
                backend: "inotify",
                path: Some(path.clone()),
                ok: fits,
                detail: format!(
                    "{}: as many watches, pinning {}; {} free \
                     (fs.inotify.max_user_watches {} - {} in use){}",
                    crate::words::counted(outcome.dirs as u64, "directory", "directories"),
                    kernel_memory(&outcome.dirs),
                    limits.available(),
                    limits.max,
                    limits.in_use,
                    if fits {
                        ""
                    } else {
                        "; does not fit: raise fs.inotify.max_user_watches"
                    },
                ) + &caveat,
            }
        };
        rows.push(row);
    }
    rows
}
