//! The ebpf backend: a raw tracepoint on `sys_exit` (watcher-ebpf) reports every successful
//! path-changing syscall of every process as a record (syscall, pid, dirfd, the caller's
//! path string); this side resolves the paths and turns records into [`Event`]s.
//!
//! Path resolution is done here, not in the kernel (no kernel struct offsets needed):
//! an absolute path is taken as is, a relative one is joined to the caller's directory.
//! For `AT_FDCWD` that is the working directory this side followed since the process was
//! forked (forks and chdir/fchdir are reported), else `/proc/TID/cwd`; for a directory fd,
//! the path this side saw it opened with (directory opens are reported), else
//! `/proc/TGID/fd/N`. So short-lived processes (an rsync receiver, `mkdir`, `mv`) resolve
//! after they exited. Nothing is canonicalised, so a symlink in the last component is never
//! followed. A path that cannot be resolved (a process started before the backend that
//! has exited since) makes every root rescanned, and is counted. chroot is not followed:
//! the paths of a chrooted writer are taken as relative to `/`.
//!
//! fds opened for writing are remembered per (tgid, fd) with their path: the open reports
//! the file Modified (Created with O_CREAT), and so does its close, which covers the data
//! written in between. `write` itself is not traced: a long-running writer's data is
//! seen at its close (or the next open, truncate or metadata change of the file).
//!
//! The kernel side drops the syscalls of the daemon and its descendants (a map of ignored
//! tgids: the daemon's own, plus every process an ignored process forks). Records lost to
//! a full ring buffer are counted per CPU in the kernel; any increase is an
//! [`Event::Overflow`].

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use hashbrown::HashMap;
use watcher_ebpf_common::{PATH_LEN, Record, TRACK_WRITE, op};

use crate::event::{ChangeKind, Event};

use watcher_ebpf_common::abi::{
    AT_EMPTY_PATH, AT_FDCWD, AT_REMOVEDIR, O_CREAT, O_RDWR, O_TMPFILE_ONLY, O_TRUNC, O_WRONLY,
    RENAME_EXCHANGE,
};

/// Default ring buffer size (a power of two, a multiple of the page size).
pub const DEFAULT_RINGBUF_BYTES: u32 = 16 << 20;

/// Whether this binary holds the eBPF probes (built with the `ebpf` feature).
pub const BUILT: bool = cfg!(feature = "ebpf");

/// Counts kept by the translator, logged when the backend stops.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub records: u64,
    /// Paths that could not be resolved (every root was rescanned instead).
    pub unresolved: u64,
    /// Paths longer than the probe copies (every root was rescanned instead).
    pub truncated: u64,
    /// Records from the daemon or its children that got past the kernel filter.
    pub own_past_filter: u64,
    /// Records of processes whose root is not this one's (another mount namespace or a
    /// chroot this side cannot see into): their paths do not name files here.
    pub foreign: u64,
}

/// How a record's path resolves.
enum Resolution {
    Path(PathBuf),
    /// The record carries no path (NULL): the call was on its fd.
    NoPath,
    /// Cannot be resolved: rescan.
    Lost,
    /// A process under another root: ignore.
    Foreign,
}

/// Turns records into events. Its only system calls are readlink of `/proc` entries and
/// lstat of changed paths (for `is_dir` of renames and attribute changes).
pub struct Translator {
    roots: Vec<PathBuf>,
    /// Paths of fds opened for writing or on a directory, per tgid and fd.
    fds: HashMap<u32, HashMap<i32, PathBuf>>,
    /// Working directories of processes forked or changing directory since the start.
    cwds: HashMap<u32, PathBuf>,
    pub stats: Stats,
}

/// `path` with `.` and `..` removed lexically (paths here are never canonicalised).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::RootDir => out.push("/"),
            Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
        }
    }
    out
}

/// The target of a `/proc` magic link, unless it is gone or names a deleted directory.
fn proc_link(link: &str) -> Option<PathBuf> {
    let target = std::fs::read_link(link).ok()?;
    let bytes = target.as_os_str().as_bytes();
    if !bytes.starts_with(b"/") || bytes.ends_with(b" (deleted)") {
        return None;
    }
    Some(target)
}

fn lstat_is_dir(path: &Path) -> Option<bool> {
    std::fs::symlink_metadata(path).ok().map(|m| m.is_dir())
}

impl Translator {
    pub fn new(roots: &[PathBuf]) -> Self {
        Translator {
            roots: roots.to_vec(),
            fds: HashMap::new(),
            cwds: HashMap::new(),
            stats: Stats::default(),
        }
    }

    /// Forgets every remembered fd (after lost records, some of them are stale).
    pub fn clear(&mut self) {
        self.fds.clear();
        self.cwds.clear();
    }

    fn fd_get(&self, tgid: u32, fd: i32) -> Option<&PathBuf> {
        self.fds.get(&tgid).and_then(|m| m.get(&fd))
    }

    fn fd_remove(&mut self, tgid: u32, fd: i32) -> Option<PathBuf> {
        let m = self.fds.get_mut(&tgid)?;
        let p = m.remove(&fd);
        if m.is_empty() {
            self.fds.remove(&tgid);
        }
        p
    }

    fn fd_insert(&mut self, tgid: u32, fd: i32, path: PathBuf) {
        self.fds.entry(tgid).or_default().insert(fd, path);
    }

    /// The working directory of `pid` (a thread of `tgid`).
    fn cwd(&self, tgid: u32, pid: u32) -> Option<PathBuf> {
        if let Some(p) = self.cwds.get(&tgid) {
            return Some(p.clone());
        }
        proc_link(&format!("/proc/{pid}/cwd")).or_else(|| proc_link(&format!("/proc/{tgid}/cwd")))
    }

    /// Forgets processes that no longer exist once the maps grow large (pids of
    /// processes forked later are overwritten by their fork record anyway).
    fn prune(&mut self) {
        const MAX: usize = 1 << 16;
        if self.cwds.len() + self.fds.len() < MAX {
            return;
        }
        let alive = |tgid: &u32| Path::new(&format!("/proc/{tgid}")).exists();
        self.cwds.retain(|t, _| alive(t));
        self.fds.retain(|t, _| alive(t));
    }

    fn under_roots(&self, path: &Path) -> bool {
        self.roots.iter().any(|r| path.starts_with(r))
    }

    fn rescan_all(&self, out: &mut Vec<Event>, rec: &Record, why: &str) {
        tracing::debug!(
            op = rec.op,
            tgid = rec.tgid,
            fd1 = rec.fd1,
            path1 = %String::from_utf8_lossy(&rec.path1[..rec.len1.clamp(1, PATH_LEN as i32) as usize - 1]),
            why,
            "ebpf: rescanning every root"
        );
        out.extend(self.roots.iter().map(|r| Event::Rescan { path: r.clone() }));
    }

    /// The path an fd of `tgid` refers to: the one seen at its open, else /proc.
    fn fd_path(&self, tgid: u32, fd: i32) -> Option<PathBuf> {
        if let Some(p) = self.fd_get(tgid, fd) {
            return Some(p.clone());
        }
        proc_link(&format!("/proc/{tgid}/fd/{fd}"))
    }

    /// A path of `rec` could not be had: a rescan, unless the process lives under another
    /// root (its paths are not ours to sync; it is still there, so /proc says so).
    fn lost(&mut self, rec: &Record) -> Resolution {
        match std::fs::read_link(format!("/proc/{}/root", rec.tgid)) {
            Ok(root) if root != Path::new("/") => {
                self.stats.foreign += 1;
                Resolution::Foreign
            }
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                self.stats.foreign += 1;
                Resolution::Foreign
            }
            _ => {
                self.stats.unresolved += 1;
                Resolution::Lost
            }
        }
    }

    /// A path cut at the probe's limit: lost if it may lie under a root, else ignored.
    fn truncated(&mut self, prefix: &Path) -> Resolution {
        self.stats.truncated += 1;
        let p = prefix.as_os_str().as_bytes();
        let may_be_ours = self.roots.iter().any(|r| {
            let r = r.as_os_str().as_bytes();
            p.starts_with(r) || r.starts_with(p)
        });
        if may_be_ours {
            Resolution::Lost
        } else {
            Resolution::Foreign
        }
    }

    fn resolve(&mut self, rec: &Record, dirfd: i32, bytes: &[u8], len: i32) -> Resolution {
        if len == 0 {
            return Resolution::NoPath;
        }
        if len < 0 {
            tracing::debug!(op = rec.op, tgid = rec.tgid, len, "ebpf: path not readable");
            return self.lost(rec);
        }
        let truncated = len as usize >= PATH_LEN;
        let name = &bytes[..(len as usize - 1).min(bytes.len())];
        if name.first() == Some(&b'/') {
            let path = normalize(Path::new(OsStr::from_bytes(name)));
            return if truncated {
                self.truncated(&path)
            } else {
                Resolution::Path(path)
            };
        }
        let base = if dirfd == AT_FDCWD {
            self.cwd(rec.tgid, rec.pid)
        } else {
            self.fd_path(rec.tgid, dirfd)
        };
        match base {
            Some(base) if base.as_os_str().is_empty() => Resolution::Foreign,
            Some(base) if name.is_empty() => Resolution::Path(base),
            Some(base) => {
                let path = normalize(&base.join(OsStr::from_bytes(name)));
                if truncated {
                    self.truncated(&path)
                } else {
                    Resolution::Path(path)
                }
            }
            None if name.is_empty() => Resolution::NoPath,
            None => {
                tracing::debug!(
                    op = rec.op,
                    tgid = rec.tgid,
                    dirfd,
                    name = %String::from_utf8_lossy(name),
                    comm = %std::fs::read_to_string(format!("/proc/{}/comm", rec.tgid)).unwrap_or_default().trim(),
                    "ebpf: unresolved relative path"
                );
                self.lost(rec)
            }
        }
    }

    /// The first path of `rec` (`fd1`/`path1`), or `fd1` itself for a call without a
    /// path (or with AT_EMPTY_PATH and ""). None after a rescan was queued.
    fn first(&mut self, rec: &Record, out: &mut Vec<Event>) -> Option<PathBuf> {
        match self.resolve(rec, rec.fd1, &rec.path1, rec.len1) {
            Resolution::Path(p) => Some(p),
            Resolution::NoPath => self.fd_or_rescan(rec, rec.fd1, out),
            Resolution::Lost => {
                self.rescan_all(out, rec, "first");
                None
            }
            Resolution::Foreign => None,
        }
    }

    fn second(&mut self, rec: &Record, out: &mut Vec<Event>) -> Option<PathBuf> {
        match self.resolve(rec, rec.fd2, &rec.path2, rec.len2) {
            Resolution::Path(p) => Some(p),
            Resolution::Foreign => None,
            Resolution::NoPath | Resolution::Lost => {
                self.stats.unresolved += 1;
                self.rescan_all(out, rec, "second");
                None
            }
        }
    }

    fn fd_or_rescan(&mut self, rec: &Record, fd: i32, out: &mut Vec<Event>) -> Option<PathBuf> {
        let p = self.fd_path(rec.tgid, fd);
        if p.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            return None;
        }
        if p.is_none() && matches!(self.lost(rec), Resolution::Lost) {
            self.rescan_all(out, rec, "fd");
        }
        p
    }

    fn push(&self, out: &mut Vec<Event>, kind: ChangeKind, path: PathBuf, is_dir: bool, pid: u32) {
        if self.under_roots(&path) {
            out.push(Event::Change {
                kind,
                path,
                is_dir,
                pid: pid as i32,
            });
        }
    }

    /// Appends what `rec` means to `out`.
    pub fn translate(&mut self, rec: &Record, out: &mut Vec<Event>) {
        self.stats.records += 1;
        let pid = rec.tgid;
        match rec.op {
            op::OPEN => {
                let fd = rec.ret as i32;
                let path = match self.resolve(rec, rec.fd1, &rec.path1, rec.len1) {
                    Resolution::Path(p) => p,
                    // Not ours: remembered as such, so its close is no rescan either.
                    Resolution::Foreign => {
                        self.fd_insert(rec.tgid, fd, PathBuf::new());
                        return;
                    }
                    Resolution::NoPath | Resolution::Lost => {
                        self.rescan_all(out, rec, "open");
                        self.fd_remove(rec.tgid, fd);
                        return;
                    }
                };
                let writes = rec.flags & (O_WRONLY | O_RDWR | O_CREAT | O_TRUNC) != 0;
                if writes && rec.flags & O_TMPFILE_ONLY == 0 {
                    let kind = if rec.flags & O_CREAT != 0 {
                        ChangeKind::Created
                    } else {
                        ChangeKind::Modified
                    };
                    self.push(out, kind, path.clone(), false, pid);
                }
                self.fd_insert(rec.tgid, fd, path);
            }
            op::CLOSE => {
                let path = self.fd_remove(rec.tgid, rec.fd1);
                if rec.flags == TRACK_WRITE {
                    match path {
                        Some(path) if path.as_os_str().is_empty() => {}
                        Some(path) => self.push(out, ChangeKind::Modified, path, false, pid),
                        None => {
                            self.stats.unresolved += 1;
                            self.rescan_all(out, rec, "close");
                        }
                    }
                }
            }
            op::FD_MODIFY | op::FD_ATTRIB => {
                if let Some(path) = self.fd_or_rescan(rec, rec.fd1, out) {
                    let (kind, is_dir) = if rec.op == op::FD_MODIFY {
                        (ChangeKind::Modified, false)
                    } else {
                        (ChangeKind::Attrib, lstat_is_dir(&path).unwrap_or(false))
                    };
                    self.push(out, kind, path, is_dir, pid);
                }
            }
            op::PATH_MODIFY => {
                if let Some(path) = self.first(rec, out) {
                    self.push(out, ChangeKind::Modified, path, false, pid);
                }
            }
            op::PATH_ATTRIB => {
                let empty = rec.len1 == 1 && rec.flags & AT_EMPTY_PATH != 0;
                let path = if empty {
                    self.fd_or_rescan(rec, rec.fd1, out)
                } else {
                    self.first(rec, out)
                };
                if let Some(path) = path {
                    let is_dir = lstat_is_dir(&path).unwrap_or(false);
                    self.push(out, ChangeKind::Attrib, path, is_dir, pid);
                }
            }
            op::UNLINK => {
                if let Some(path) = self.first(rec, out) {
                    let is_dir = rec.flags & AT_REMOVEDIR != 0;
                    self.push(out, ChangeKind::Deleted, path, is_dir, pid);
                }
            }
            op::MKDIR | op::MKNOD | op::SYMLINK => {
                if let Some(path) = self.first(rec, out) {
                    self.push(out, ChangeKind::Created, path, rec.op == op::MKDIR, pid);
                }
            }
            op::RENAME => {
                let old = self.first(rec, out);
                let new = self.second(rec, out);
                // Gone again already: take it for a directory, which syncs more, never less.
                let is_dir = new
                    .as_deref()
                    .map(|n| lstat_is_dir(n).unwrap_or(true))
                    .unwrap_or(true);
                if is_dir && let (Some(o), Some(n)) = (&old, &new) {
                    self.directory_moved(o, n);
                }
                let exchange = rec.flags & RENAME_EXCHANGE != 0;
                if let Some(o) = old {
                    let kind = if exchange {
                        ChangeKind::MovedTo
                    } else {
                        ChangeKind::MovedFrom
                    };
                    let old_is_dir = if exchange {
                        lstat_is_dir(&o).unwrap_or(true)
                    } else {
                        is_dir
                    };
                    self.push(out, kind, o, old_is_dir, pid);
                }
                if let Some(n) = new {
                    self.push(out, ChangeKind::MovedTo, n, is_dir, pid);
                }
            }
            op::LINK => {
                let empty = rec.len1 == 1 && rec.flags & AT_EMPTY_PATH != 0;
                let old = if empty {
                    self.fd_get(rec.tgid, rec.fd1).cloned()
                } else {
                    match self.resolve(rec, rec.fd1, &rec.path1, rec.len1) {
                        Resolution::Path(p) => Some(p),
                        _ => None,
                    }
                };
                if let Some(new) = self.second(rec, out) {
                    self.push(out, ChangeKind::Created, new, false, pid);
                }
                // The old name's link count changed.
                if let Some(old) = old {
                    self.push(out, ChangeKind::Attrib, old, false, pid);
                }
            }
            op::DUP => {
                if let Some(path) = self.fd_get(rec.tgid, rec.fd1).cloned() {
                    self.fd_insert(rec.tgid, rec.ret as i32, path);
                } else {
                    self.fd_remove(rec.tgid, rec.ret as i32);
                }
            }
            op::FORK => {
                let (child, parent) = (rec.tgid, rec.ret as u32);
                self.prune();
                // The child inherits the working directory and the fds.
                match self.cwd(parent, parent) {
                    Some(cwd) => self.cwds.insert(child, cwd),
                    None => self.cwds.remove(&child),
                };
                match self.fds.get(&parent).cloned() {
                    Some(fds) => self.fds.insert(child, fds),
                    None => self.fds.remove(&child),
                };
            }
            op::CHDIR => {
                let dir = match self.resolve(rec, rec.fd1, &rec.path1, rec.len1) {
                    Resolution::Path(p) => Some(p),
                    Resolution::NoPath => self.fd_path(rec.tgid, rec.fd1),
                    // Outside every root: what it does relative to it is not ours.
                    Resolution::Foreign => Some(PathBuf::new()),
                    Resolution::Lost => None,
                };
                match dir {
                    Some(dir) => self.cwds.insert(rec.tgid, dir),
                    // Unknown from here on: /proc while the process lives.
                    None => self.cwds.remove(&rec.tgid),
                };
            }
            _ => {}
        }
    }

    /// Remembered fds below a moved directory now live under its new name.
    fn directory_moved(&mut self, old: &Path, new: &Path) {
        let fds = self.fds.values_mut().flat_map(|m| m.values_mut());
        for path in fds.chain(self.cwds.values_mut()) {
            if let Ok(rest) = path.strip_prefix(old) {
                *path = if rest.as_os_str().is_empty() {
                    new.to_path_buf()
                } else {
                    new.join(rest)
                };
            }
        }
    }
}

/// A record from the bytes of a ring buffer entry.
pub fn parse_record(bytes: &[u8]) -> Option<Record> {
    if bytes.len() < std::mem::size_of::<Record>() {
        return None;
    }
    // SAFETY: the length is checked; Record is plain old data, read unaligned.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Record>()) })
}

/// The kernel's internal `dev_t` (what `super_block.s_dev` holds) for a device number.
pub(crate) fn kernel_dev(major: u32, minor: u32) -> u32 {
    (major << 20) | (minor & 0xf_ffff)
}

/// What the in-kernel filter needs to know of the roots: every directory a root is (or a
/// mount under a root starts at) as [`ROOT`](watcher_ebpf_common::ROOT), the directories
/// above the roots as ancestors, and the devices of their filesystems. Devices come both
/// from `stat` and from the mount table (they differ on btrfs subvolumes); an extra entry
/// only lets more through. `stat` gives (device major, minor, inode).
pub fn root_filter(
    roots: &[PathBuf],
    mounts: &[super::mountinfo::Mount],
    stat: impl Fn(&Path) -> Option<(u32, u32, u64)>,
) -> (Vec<(watcher_ebpf_common::RootKey, u32)>, Vec<u32>) {
    use watcher_ebpf_common::{ROOT, ROOT_ANCESTOR, RootKey};
    let mut keys: HashMap<RootKey, u32> = HashMap::new();
    let mut devices: Vec<u32> = Vec::new();
    let mut add = |dir: &Path, kind: u32, keys: &mut HashMap<RootKey, u32>| {
        let Some((major, minor, ino)) = stat(dir) else {
            return;
        };
        let mut devs = vec![kernel_dev(major, minor)];
        if let Some(m) = super::mountinfo::containing(mounts, dir) {
            devs.push(kernel_dev(m.major, m.minor));
        }
        for dev in devs {
            let key = RootKey { dev, pad: 0, ino };
            let k = keys.entry(key).or_insert(kind);
            *k = (*k).min(kind);
            if kind == ROOT && !devices.contains(&dev) {
                devices.push(dev);
            }
        }
    };
    for root in roots {
        add(root, ROOT, &mut keys);
        for ancestor in root.ancestors().skip(1) {
            add(ancestor, ROOT_ANCESTOR, &mut keys);
        }
        for m in mounts {
            if m.mount_point != *root && m.mount_point.starts_with(root) {
                add(&m.mount_point, ROOT, &mut keys);
            }
        }
    }
    let mut keys: Vec<_> = keys.into_iter().collect();
    keys.sort_by_key(|(k, _)| (k.dev, k.ino));
    (keys, devices)
}

#[cfg(feature = "ebpf")]
pub use loaded::{EbpfBackend, check};

#[cfg(not(feature = "ebpf"))]
pub fn check() -> Vec<super::Support> {
    vec![super::Support {
        backend: "ebpf",
        path: None,
        ok: false,
        detail: "not built into this binary (build watcher-user with --features ebpf; \
                 `cargo xtask test` installs the toolchain and does)"
            .into(),
    }]
}

#[cfg(feature = "ebpf")]
mod loaded {
    use std::os::fd::{AsFd, BorrowedFd};
    use std::path::PathBuf;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    use std::time::{Duration, Instant};

    use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
    use aya::programs::{FEntry, FExit, RawTracePoint};
    use aya::{Ebpf, EbpfLoader};
    use watcher_ebpf_common as common;

    #[derive(Clone, Copy)]
    #[repr(transparent)]
    struct Offsets(common::KernelOffsets);
    // SAFETY: plain old data (u32 fields), no padding.
    unsafe impl aya::Pod for Offsets {}

    #[derive(Clone, Copy)]
    #[repr(transparent)]
    struct Key(common::RootKey);
    // SAFETY: plain old data with its padding spelled out as a field.
    unsafe impl aya::Pod for Key {}

    use super::{EbpfOptions, ProbeChoice, Translator, parse_record};
    use crate::backend::read_loop::{self, EventSource, OwnFilter, POLL_INTERVAL};
    use crate::backend::vfs_records::VfsTranslator;
    use crate::backend::{Backend, BackendError, OwnPids, Support};
    use crate::event::Event;

    static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/watcher-ebpf"));

    /// The two probe sets in the object.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum ProbeSet {
        /// fentry/fexit on VFS functions: every writer, paths built in the kernel.
        Vfs,
        /// Raw tracepoints on syscall entry and exit: ordinary processes' syscalls.
        Syscalls,
    }

    impl ProbeSet {
        fn describe(self) -> &'static str {
            match self {
                ProbeSet::Vfs => "vfs (fentry/fexit on the kernel's VFS functions)",
                ProbeSet::Syscalls => {
                    "syscalls (raw tracepoints sys_enter, sys_exit, sched_process_exit)"
                }
            }
        }
    }

    fn err(what: &str, e: impl std::fmt::Display) -> BackendError {
        BackendError::Ebpf(format!("{what}: {e}"))
    }

    /// The probes, loaded and attached.
    pub struct EbpfBackend {
        /// Owns the programs and their links: dropping it detaches them.
        _ebpf: Ebpf,
        ring: RingBuf<MapData>,
        counters: PerCpuArray<MapData, u64>,
        /// The probes' own log records, when the object has the map for them.
        probe_log: Option<aya_log::EbpfLogger<ProbeLog>>,
        set: ProbeSet,
        translator: Translator,
        vfs: VfsTranslator,
        own_pids: Arc<OwnPids>,
        lost_seen: u64,
        overflows: u64,
    }

    /// Kernel struct offsets from the kernel's BTF (`filter` set when it has every field
    /// the in-kernel filter reads), and the fields the VFS probe set needs that it lacks.
    /// Without BTF: no parent check, no in-kernel filter, no VFS probes; with a filter
    /// field missing, no in-kernel filter (said in the log).
    fn kernel_offsets() -> (common::KernelOffsets, Vec<String>) {
        let Ok(blob) = std::fs::read("/sys/kernel/btf/vmlinux") else {
            tracing::warn!(
                "no kernel BTF: children of the daemon are filtered from their parent's fork \
                 on, and changes outside the roots are filtered in user space only"
            );
            return (common::KernelOffsets::default(), vec!["kernel BTF".into()]);
        };
        let Some(btf) = crate::backend::btf::Btf::parse(&blob) else {
            tracing::warn!("the kernel's BTF does not parse: no in-kernel filtering");
            return (common::KernelOffsets::default(), vec!["kernel BTF".into()]);
        };
        let mut missing = Vec::new();
        let mut field = |name: &str, path: &str| {
            btf.member_offset(name, path).unwrap_or_else(|| {
                missing.push(format!("{name}.{path}"));
                0
            })
        };
        let mut off = common::KernelOffsets {
            real_parent: field("task_struct", "real_parent"),
            tgid: field("task_struct", "tgid"),
            files: field("task_struct", "files"),
            fdt: field("files_struct", "fdt"),
            fdt_max_fds: field("fdtable", "max_fds"),
            fdt_fd: field("fdtable", "fd"),
            f_dentry: field("file", "f_path.dentry"),
            fs: field("task_struct", "fs"),
            pwd_dentry: field("fs_struct", "pwd.dentry"),
            d_parent: field("dentry", "d_parent"),
            d_inode: field("dentry", "d_inode"),
            d_sb: field("dentry", "d_sb"),
            i_ino: field("inode", "i_ino"),
            s_dev: field("super_block", "s_dev"),
            filter: 0,
            d_name: field("dentry", "d_name.name"),
            f_mode: field("file", "f_mode"),
            f_inode: field("file", "f_inode"),
            ki_filp: field("kiocb", "ki_filp"),
            rd_old_dentry: field("renamedata", "old_dentry"),
            rd_new_dentry: field("renamedata", "new_dentry"),
            open_flag: field("open_flags", "open_flag"),
        };
        const VFS_ONLY: [&str; 7] = [
            "open_flags.open_flag",
            "dentry.d_name.name",
            "file.f_mode",
            "file.f_inode",
            "kiocb.ki_filp",
            "renamedata.old_dentry",
            "renamedata.new_dentry",
        ];
        const SHARED: [&str; 4] = [
            "file.f_path.dentry",
            "dentry.d_parent",
            "dentry.d_sb",
            "super_block.s_dev",
        ];
        let vfs_missing: Vec<String> = missing
            .iter()
            .filter(|m| VFS_ONLY.contains(&m.as_str()) || SHARED.contains(&m.as_str()))
            .cloned()
            .collect();
        let filter_missing: Vec<&String> = missing
            .iter()
            .filter(|m| !VFS_ONLY.contains(&m.as_str()))
            .collect();
        if !filter_missing.is_empty() {
            tracing::warn!(
                missing = filter_missing
                    .iter()
                    .map(|m| m.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                "kernel BTF lacks fields the probes read: changes outside the roots are \
                 filtered in user space only"
            );
        } else {
            off.filter = 1;
        }
        (off, vfs_missing)
    }

    fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::maps::Map, BackendError> {
        ebpf.map_mut(name)
            .ok_or_else(|| err("eBPF object", format!("no map {name}")))
    }

    /// Passes the probes' aya-log records on to the daemon's log.
    struct ProbeLog;

    impl log::Log for ProbeLog {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }

        fn log(&self, record: &log::Record<'_>) {
            let message = record.args();
            match record.level() {
                log::Level::Error => {
                    tracing::error!(target: "watcher::ebpf::probes", "ebpf probe: {message}")
                }
                log::Level::Warn => {
                    tracing::warn!(target: "watcher::ebpf::probes", "ebpf probe: {message}")
                }
                log::Level::Info => {
                    tracing::info!(target: "watcher::ebpf::probes", "ebpf probe: {message}")
                }
                log::Level::Debug => {
                    tracing::debug!(target: "watcher::ebpf::probes", "ebpf probe: {message}")
                }
                log::Level::Trace => {
                    tracing::trace!(target: "watcher::ebpf::probes", "ebpf probe: {message}")
                }
            }
        }

        fn flush(&self) {}
    }

    /// The most verbose aya-log level the probes write records for: what the daemon's
    /// log would show, so nothing is formatted in the kernel only to be thrown away.
    fn probe_log_level() -> u8 {
        use tracing::level_filters::LevelFilter;
        let level = match LevelFilter::current() {
            LevelFilter::OFF => return 0,
            LevelFilter::ERROR => aya_log::Level::Error,
            LevelFilter::WARN => aya_log::Level::Warn,
            LevelFilter::INFO => aya_log::Level::Info,
            LevelFilter::DEBUG => aya_log::Level::Debug,
            _ => aya_log::Level::Trace,
        };
        level as u8
    }

    /// What the maps are filled with, worked out once per start (reading and parsing the
    /// kernel's BTF, stat-ing the roots) whichever probe set is then tried.
    struct MapContents {
        offsets: common::KernelOffsets,
        /// Fields the VFS probe set needs that the kernel's BTF lacks.
        vfs_missing: Vec<String>,
        /// Whether the BTF has every field the in-kernel filter reads.
        filter_available: bool,
        roots: Vec<(common::RootKey, u32)>,
        devices: Vec<u32>,
        /// Processes whose syscalls the probes drop, with every process they fork.
        ignored: Vec<u32>,
    }

    /// The maps' contents for `roots`, with the in-kernel filter when `filter` is on and
    /// the kernel's BTF has every field it needs; the processes of `own` are ignored.
    fn map_contents(roots: &[PathBuf], filter: bool, own: &OwnPids) -> MapContents {
        let (mut offsets, vfs_missing) = kernel_offsets();
        let filter_available = offsets.filter != 0;
        let (keys, devices) = if filter_available && filter {
            super::root_filter(roots, &crate::backend::mountinfo::mounts(), |p| {
                use std::os::unix::fs::MetadataExt;
                let md = std::fs::metadata(p).ok()?;
                let dev = md.dev();
                Some((libc::major(dev), libc::minor(dev), md.ino()))
            })
        } else {
            Default::default()
        };
        offsets.filter = u32::from(!devices.is_empty());
        if filter_available && filter {
            tracing::info!(
                directories = keys.len(),
                filesystems = devices.len(),
                on = offsets.filter != 0,
                "ebpf in-kernel filter by root"
            );
        }
        MapContents {
            offsets,
            vfs_missing,
            filter_available,
            roots: keys,
            devices,
            ignored: own.snapshot().into_iter().map(|pid| pid as u32).collect(),
        }
    }

    /// Loads the object, fills its maps from `contents` and attaches probe set `set`; the
    /// ignored processes (the daemon's own tgid) are ignored from the first record on.
    fn load(
        ringbuf_bytes: u32,
        contents: &MapContents,
        set: ProbeSet,
    ) -> Result<Ebpf, BackendError> {
        if set == ProbeSet::Vfs && !contents.vfs_missing.is_empty() {
            return Err(err(
                "vfs probes",
                format!("the kernel's BTF lacks {}", contents.vfs_missing.join(", ")),
            ));
        }
        let level = probe_log_level();
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(common::MAP_EVENTS, ringbuf_bytes)
            .override_global(aya_log::LEVEL, &level, false)
            .load(OBJECT)
            .map_err(|e| err("loading the eBPF object", e))?;
        {
            let mut map: BpfHashMap<&mut MapData, Key, u32> =
                BpfHashMap::try_from(map_mut(&mut ebpf, common::MAP_ROOTS)?)
                    .map_err(|e| err("map ROOTS", e))?;
            for (key, kind) in &contents.roots {
                map.insert(Key(*key), kind, 0)
                    .map_err(|e| err("filling the roots map", e))?;
            }
        }
        {
            let mut map: BpfHashMap<&mut MapData, u32, u32> =
                BpfHashMap::try_from(map_mut(&mut ebpf, common::MAP_DEVICES)?)
                    .map_err(|e| err("map DEVICES", e))?;
            for dev in &contents.devices {
                map.insert(dev, 1, 0)
                    .map_err(|e| err("filling the devices map", e))?;
            }
        }
        {
            let mut config: Array<&mut MapData, Offsets> =
                Array::try_from(map_mut(&mut ebpf, common::MAP_CONFIG)?)
                    .map_err(|e| err("map CONFIG", e))?;
            config
                .set(0, Offsets(contents.offsets), 0)
                .map_err(|e| err("setting kernel struct offsets", e))?;
        }
        {
            let mut ignored: BpfHashMap<&mut MapData, u32, u32> =
                BpfHashMap::try_from(map_mut(&mut ebpf, common::MAP_IGNORED)?)
                    .map_err(|e| err("map IGNORED", e))?;
            for tgid in &contents.ignored {
                ignored
                    .insert(tgid, common::IGNORE_SELF, 0)
                    .map_err(|e| err("ignoring the daemon's own tgid", e))?;
            }
        }
        match set {
            ProbeSet::Vfs => attach_vfs(&mut ebpf)?,
            ProbeSet::Syscalls => attach_syscalls(&mut ebpf)?,
        }
        Ok(ebpf)
    }

    /// Loads and attaches the fentry/fexit programs; the first the kernel refuses ends it.
    fn attach_vfs(ebpf: &mut Ebpf) -> Result<(), BackendError> {
        let btf = aya::Btf::from_sys_fs().map_err(|e| err("reading the kernel's BTF", e))?;
        for &(name, function, exit) in common::VFS_PROGRAMS {
            let prog = ebpf
                .program_mut(name)
                .ok_or_else(|| err("eBPF object", format!("no program {name}")))?;
            if exit {
                let prog: &mut FExit = prog.try_into().map_err(|e| err(name, e))?;
                prog.load(function, &btf)
                    .map_err(|e| err(&format!("loading fexit program on {function}"), e))?;
                prog.attach()
                    .map_err(|e| err(&format!("attaching fexit program to {function}"), e))?;
            } else {
                let prog: &mut FEntry = prog.try_into().map_err(|e| err(name, e))?;
                prog.load(function, &btf)
                    .map_err(|e| err(&format!("loading fentry program on {function}"), e))?;
                prog.attach()
                    .map_err(|e| err(&format!("attaching fentry program to {function}"), e))?;
            }
        }
        Ok(())
    }

    fn attach_syscalls(ebpf: &mut Ebpf) -> Result<(), BackendError> {
        for (name, tracepoint) in [
            (common::PROG_PROCESS_EXIT, "sched_process_exit"),
            (common::PROG_SYS_ENTER, "sys_enter"),
            (common::PROG_SYS_EXIT, "sys_exit"),
        ] {
            let prog: &mut RawTracePoint = ebpf
                .program_mut(name)
                .ok_or_else(|| err("eBPF object", format!("no program {name}")))?
                .try_into()
                .map_err(|e| err(name, e))?;
            prog.load()
                .map_err(|e| err(&format!("loading raw tracepoint program {name}"), e))?;
            prog.attach(tracepoint).map_err(|e| {
                err(
                    &format!("attaching {name} to raw tracepoint {tracepoint}"),
                    e,
                )
            })?;
        }
        Ok(())
    }

    /// Loads the probe set `choice` asks for: with `Auto`, the VFS set where the kernel
    /// takes it, else the syscall set (the reason said in the log).
    fn load_chosen(
        options: &EbpfOptions,
        roots: &[PathBuf],
        own: &OwnPids,
    ) -> Result<(Ebpf, ProbeSet), BackendError> {
        let ringbuf_bytes = options.ringbuf_size();
        let contents = map_contents(roots, options.kernel_filter, own);
        let set = match options.probes {
            ProbeChoice::Vfs => ProbeSet::Vfs,
            ProbeChoice::Syscalls => ProbeSet::Syscalls,
            ProbeChoice::Auto => match load(ringbuf_bytes, &contents, ProbeSet::Vfs) {
                Ok(ebpf) => return Ok((ebpf, ProbeSet::Vfs)),
                Err(e) => {
                    tracing::info!(
                        reason = %crate::backend::error_chain(&e),
                        "ebpf: the vfs probe set does not load here; using the syscall probes"
                    );
                    ProbeSet::Syscalls
                }
            },
        };
        Ok((load(ringbuf_bytes, &contents, set)?, set))
    }

    impl EbpfBackend {
        /// Loads and attaches the probes `options` ask for, watching `roots`; the processes
        /// of `own_pids` (and, in the kernel, every process they fork) are not reported.
        pub fn start(
            options: &EbpfOptions,
            roots: &[PathBuf],
            own_pids: Arc<OwnPids>,
        ) -> Result<Self, BackendError> {
            if !cfg!(target_arch = "x86_64") {
                return Err(BackendError::Ebpf(
                    "the probes know x86_64's syscall numbers only".into(),
                ));
            }
            let ringbuf_bytes = options.ringbuf_size();
            let (mut ebpf, set) = load_chosen(options, roots, &own_pids)?;
            let ring = RingBuf::try_from(
                ebpf.take_map(common::MAP_EVENTS)
                    .ok_or_else(|| err("eBPF object", "no map EVENTS"))?,
            )
            .map_err(|e| err("map EVENTS", e))?;
            let counters = PerCpuArray::try_from(
                ebpf.take_map(common::MAP_COUNTERS)
                    .ok_or_else(|| err("eBPF object", "no map COUNTERS"))?,
            )
            .map_err(|e| err("map COUNTERS", e))?;
            let probe_log = aya_log::EbpfLogger::init_with_logger(&mut ebpf, ProbeLog)
                .map_err(
                    |e| tracing::warn!(error = %e, "the probes' diagnostics are not available"),
                )
                .ok();
            tracing::debug!(ringbuf_bytes, "ebpf probes attached");
            let mut me = EbpfBackend {
                _ebpf: ebpf,
                ring,
                counters,
                probe_log,
                set,
                translator: Translator::new(roots),
                vfs: VfsTranslator::new(roots, Box::new(crate::backend::mountinfo::mounts)),
                own_pids,
                lost_seen: 0,
                overflows: 0,
            };
            me.lost_seen = me.counter(common::counter::LOST);
            Ok(me)
        }

        /// Which probe set is attached, for the log.
        pub fn probes(&self) -> &'static str {
            self.set.describe()
        }

        /// The sum over CPUs of counter `index`.
        fn counter(&self, index: u32) -> u64 {
            self.counters
                .get(&index, 0)
                .map(|v| v.iter().sum())
                .unwrap_or(0)
        }

        /// Reads what the ring buffer holds (at most a batch) into events.
        fn drain(&mut self, own: &mut OwnFilter<'_>, out: &mut Vec<Event>) -> usize {
            let mut n = 0;
            while n < 4096 {
                let Some(item) = self.ring.next() else {
                    break;
                };
                n += 1;
                if item.len() == std::mem::size_of::<common::VfsRecord>() {
                    // SAFETY: the length is checked; VfsRecord is plain old data.
                    let rec = unsafe {
                        std::ptr::read_unaligned(item.as_ptr().cast::<common::VfsRecord>())
                    };
                    drop(item);
                    if own.contains(rec.tgid as i32) {
                        self.translator.stats.own_past_filter += 1;
                        continue;
                    }
                    self.vfs.translate(&rec, out);
                    continue;
                }
                let Some(rec) = parse_record(&item) else {
                    continue;
                };
                drop(item);
                if own.contains(rec.tgid as i32) {
                    tracing::debug!(
                        op = rec.op,
                        tgid = rec.tgid,
                        "ebpf: own record past the kernel filter"
                    );
                    self.translator.stats.own_past_filter += 1;
                    continue;
                }
                self.translator.translate(&rec, out);
            }
            n
        }

        fn check_lost(&mut self, out: &mut Vec<Event>) {
            let lost = self.counter(common::counter::LOST);
            if lost > self.lost_seen {
                tracing::warn!(
                    lost = lost - self.lost_seen,
                    "ebpf ring buffer overflow (records lost): queue overflow, rescanning every root"
                );
                self.lost_seen = lost;
                self.overflows += 1;
                self.translator.clear();
                out.push(Event::Overflow);
            }
        }
    }

    impl EventSource for EbpfBackend {
        fn fd(&self) -> BorrowedFd<'_> {
            self.ring.as_fd()
        }

        fn read(
            &mut self,
            own: &mut OwnFilter<'_>,
            out: &mut Vec<Event>,
        ) -> std::io::Result<usize> {
            let n = self.drain(own, out);
            self.check_lost(out);
            if let Some(log) = self.probe_log.as_mut() {
                log.flush();
            }
            Ok(n)
        }

        /// Lost records show in a counter, not in the ring buffer: it is looked at between
        /// reads too.
        fn tick(&mut self, _now: Instant, out: &mut Vec<Event>) -> Duration {
            if let Some(log) = self.probe_log.as_mut() {
                log.flush();
            }
            self.check_lost(out);
            POLL_INTERVAL
        }
    }

    impl Backend for EbpfBackend {
        fn name(&self) -> &'static str {
            "ebpf"
        }

        fn run(
            mut self: Box<Self>,
            sink: &mut dyn FnMut(Vec<Event>) -> bool,
            stop: &AtomicBool,
        ) -> Result<(), BackendError> {
            let own_pids = self.own_pids.clone();
            let result = read_loop::run(&mut *self, &own_pids, sink, stop);
            let s = self.translator.stats;
            let v = self.vfs.stats;
            tracing::info!(
                probes = match self.set {
                    ProbeSet::Vfs => "vfs",
                    ProbeSet::Syscalls => "syscalls",
                },
                records = s.records + v.records,
                vfs_incomplete_paths = v.incomplete,
                own_dropped_in_kernel = self.counter(common::counter::OWN_DROPPED),
                outside_roots_dropped_in_kernel = self.counter(common::counter::OUTSIDE_DROPPED),
                own_past_kernel_filter = s.own_past_filter,
                foreign = s.foreign,
                unresolved = s.unresolved,
                truncated = s.truncated,
                overflows = self.overflows,
                "ebpf backend stopped"
            );
            result
        }
    }

    /// Rows for `watcher check`: which probe set loads and attaches here, and why not.
    pub fn check() -> Vec<Support> {
        let contents = map_contents(&[], false, &OwnPids::new());
        let vfs = load(4096, &contents, ProbeSet::Vfs).map(drop);
        let syscalls = load(4096, &contents, ProbeSet::Syscalls).map(drop);
        let filter_ok = contents.filter_available;
        let say = |r: &Result<(), BackendError>| match r {
            Ok(()) => "loads and attaches".to_string(),
            Err(e) => format!("refused: {}", crate::backend::error_chain(e)),
        };
        let detail = format!(
            "probe set {}: {}; probe set {}: {}; in-kernel filter by root: {}",
            ProbeSet::Vfs.describe(),
            say(&vfs),
            ProbeSet::Syscalls.describe(),
            say(&syscalls),
            if filter_ok {
                "available"
            } else {
                "unavailable (kernel BTF lacks fields)"
            },
        );
        vec![Support {
            backend: "ebpf",
            path: None,
            ok: vfs.is_ok() || syscalls.is_ok(),
            detail,
        }]
    }
}

/// Which of the object's probe sets the ebpf backend attaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProbeChoice {
    /// The VFS set where the kernel accepts fentry programs, else the syscall set.
    Auto,
    /// fentry/fexit on VFS functions (sees kernel-internal writers); fail if refused.
    Vfs,
    /// Raw tracepoints on syscalls (ordinary processes only).
    Syscalls,
}

/// The ebpf backend's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EbpfOptions {
    /// Ring buffer size in bytes (see [`EbpfOptions::ringbuf_size`]).
    pub ringbuf_bytes: u32,
    /// Which probe set to attach.
    pub probes: ProbeChoice,
    /// Whether the probes drop changes outside every root in the kernel.
    pub kernel_filter: bool,
}

impl Default for EbpfOptions {
    fn default() -> Self {
        EbpfOptions {
            ringbuf_bytes: DEFAULT_RINGBUF_BYTES,
            probes: ProbeChoice::Auto,
            kernel_filter: true,
        }
    }
}

impl EbpfOptions {
    /// The ring buffer size used: `ringbuf_bytes` rounded up to a power of two of at least
    /// 16 KiB, room for three of the VFS probes' records.
    pub fn ringbuf_size(&self) -> u32 {
        const MIN: u32 = 16 << 10;
        const _: () =
            assert!(3 * std::mem::size_of::<watcher_ebpf_common::VfsRecord>() < MIN as usize);
        self.ringbuf_bytes.max(MIN).next_power_of_two()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(op: u32, tgid: u32, fd1: i32, path1: &str) -> Record {
        let mut rec = Record {
            tgid,
            pid: tgid,
            op,
            flags: 0,
            ret: 0,
            fd1,
            fd2: 0,
            len1: 0,
            len2: 0,
            path1: [0; PATH_LEN],
            path2: [0; PATH_LEN],
        };
        if !path1.is_empty() {
            rec.path1[..path1.len()].copy_from_slice(path1.as_bytes());
            rec.len1 = path1.len() as i32 + 1;
        }
        rec
    }

    fn change(kind: ChangeKind, path: &str, is_dir: bool) -> Event {
        Event::Change {
            kind,
            path: path.into(),
            is_dir,
            pid: 7,
        }
    }

    #[test]
    fn root_filter_knows_roots_their_ancestors_mounts_under_them_and_devices() {
        use super::super::mountinfo::Mount;
        use watcher_ebpf_common::{ROOT, ROOT_ANCESTOR};
        let mounts = vec![
            Mount {
                major: 8,
                minor: 1,
                root: "/".into(),
                mount_point: "/".into(),
                fstype: "ext4".into(),
            },
            Mount {
                major: 0,
                minor: 40,
                root: "/".into(),
                mount_point: "/data/src/scratch".into(),
                fstype: "tmpfs".into(),
            },
            Mount {
                major: 0,
                minor: 41,
                root: "/".into(),
                mount_point: "/elsewhere".into(),
                fstype: "tmpfs".into(),
            },
        ];
        // stat: the root filesystem is 8:1; the mount under the root is a tmpfs (0:40).
        let stat = |p: &Path| -> Option<(u32, u32, u64)> {
            Some(match p.to_str()? {
                "/" => (8, 1, 2),
                "/data" => (8, 1, 100),
                "/data/src" => (8, 1, 200),
                "/data/src/scratch" => (0, 40, 1),
                _ => return None,
            })
        };
        let (keys, devices) = root_filter(&[PathBuf::from("/data/src")], &mounts, stat);
        let d = kernel_dev(8, 1);
        let t = kernel_dev(0, 40);
        assert_eq!(d, 8 << 20 | 1);
        let key = |dev, ino| watcher_ebpf_common::RootKey { dev, pad: 0, ino };
        assert_eq!(
            keys,
            vec![
                (key(t, 1), ROOT),
                (key(d, 2), ROOT_ANCESTOR),
                (key(d, 100), ROOT_ANCESTOR),
                (key(d, 200), ROOT),
            ]
        );
        assert_eq!(devices, vec![d, t]);
    }

    #[test]
    fn open_write_close_is_created_then_modified() {
        let mut t = Translator::new(&["/nonexistent-root".into()]);
        let mut out = Vec::new();
        let mut open = record(op::OPEN, 7, AT_FDCWD, "/nonexistent-root/a/../b");
        open.flags = O_WRONLY | O_CREAT | O_TRUNC;
        open.ret = 5;
        t.translate(&open, &mut out);
        let mut close = record(op::CLOSE, 7, 5, "");
        close.flags = TRACK_WRITE;
        t.translate(&close, &mut out);
        assert_eq!(
            out,
            vec![
                change(ChangeKind::Created, "/nonexistent-root/b", false),
                change(ChangeKind::Modified, "/nonexistent-root/b", false),
            ]
        );
    }

    #[test]
    fn dirfd_relative_paths_use_the_directory_seen_at_open() {
        let mut t = Translator::new(&["/nonexistent-root".into()]);
        let mut out = Vec::new();
        let mut open = record(op::OPEN, 7, AT_FDCWD, "/nonexistent-root/d");
        open.flags = 0o200000;
        open.ret = 9;
        t.translate(&open, &mut out);
        let mut unlink = record(op::UNLINK, 7, 9, "sub");
        unlink.flags = AT_REMOVEDIR;
        t.translate(&unlink, &mut out);
        t.translate(&record(op::UNLINK, 7, 9, "f"), &mut out);
        assert_eq!(
            out,
            vec![
                change(ChangeKind::Deleted, "/nonexistent-root/d/sub", true),
                change(ChangeKind::Deleted, "/nonexistent-root/d/f", false),
            ]
        );
    }

    #[test]
    fn outside_roots_is_dropped_and_lost_paths_rescan() {
        let mut t = Translator::new(&["/nonexistent-root".into()]);
        let mut out = Vec::new();
        t.translate(&record(op::MKDIR, 7, AT_FDCWD, "/elsewhere/x"), &mut out);
        assert!(out.is_empty());
        // A relative path of a process that does not exist.
        let mut rec = record(op::MKDIR, u32::MAX - 1, AT_FDCWD, "x");
        rec.pid = u32::MAX - 1;
        t.translate(&rec, &mut out);
        assert_eq!(
            out,
            vec![Event::Rescan {
                path: "/nonexistent-root".into()
            }]
        );
        assert_eq!(t.stats.unresolved, 1);
        // A truncated path.
        let mut rec = record(op::MKDIR, 7, AT_FDCWD, "/nonexistent-root/x");
        rec.len1 = PATH_LEN as i32;
        out.clear();
        t.translate(&rec, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(t.stats.truncated, 1);
    }

    #[test]
    fn working_directories_follow_forks_and_chdir() {
        let mut t = Translator::new(&["/nonexistent-root".into()]);
        let mut out = Vec::new();
        // Process 7 (no longer running) changed to the root, forked 8, which changed into
        // a subdirectory and made one there.
        t.translate(
            &record(op::CHDIR, u32::MAX - 7, AT_FDCWD, "/nonexistent-root"),
            &mut out,
        );
        let mut fork = record(op::FORK, u32::MAX - 8, 0, "");
        fork.ret = (u32::MAX - 7) as i64;
        t.translate(&fork, &mut out);
        t.translate(&record(op::CHDIR, u32::MAX - 8, AT_FDCWD, "sub"), &mut out);
        let mut mkdir = record(op::MKDIR, u32::MAX - 8, AT_FDCWD, "x");
        mkdir.pid = 7;
        t.translate(&mkdir, &mut out);
        assert_eq!(
            out,
            vec![Event::Change {
                kind: ChangeKind::Created,
                path: "/nonexistent-root/sub/x".into(),
                is_dir: true,
                pid: (u32::MAX - 8) as i32,
            }]
        );
    }

    #[test]
    fn renamed_directory_moves_remembered_fds() {
        let mut t = Translator::new(&["/nonexistent-root".into()]);
        let mut out = Vec::new();
        let mut open = record(op::OPEN, 7, AT_FDCWD, "/nonexistent-root/d/e");
        open.flags = 0o200000;
        open.ret = 4;
        t.translate(&open, &mut out);
        let mut rename = record(op::RENAME, 7, AT_FDCWD, "/nonexistent-root/d");
        let new = "/nonexistent-root/n";
        rename.path2[..new.len()].copy_from_slice(new.as_bytes());
        rename.len2 = new.len() as i32 + 1;
        rename.fd2 = AT_FDCWD;
        t.translate(&rename, &mut out);
        t.translate(&record(op::MKDIR, 7, 4, "x"), &mut out);
        assert_eq!(
            out,
            vec![
                change(ChangeKind::MovedFrom, "/nonexistent-root/d", true),
                change(ChangeKind::MovedTo, "/nonexistent-root/n", true),
                change(ChangeKind::Created, "/nonexistent-root/n/e/x", true),
            ]
        );
    }
}
