//! Turning the syscall probes' records (watcher-ebpf's probes.rs) into [`Event`]s. A
//! record is one successful path-changing syscall: its number, the caller's pid, its
//! dirfd and the path string as the caller gave it; the path is resolved here, not in
//! the kernel, so no kernel struct offsets are needed for it.
//!
//! An absolute path is taken as is, a relative one is joined to the caller's directory.
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

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use hashbrown::HashMap;
use watcher_ebpf_common::abi::{
    AT_EMPTY_PATH, AT_FDCWD, AT_REMOVEDIR, O_CREAT, O_RDWR, O_TMPFILE_ONLY, O_TRUNC, O_WRONLY,
    RENAME_EXCHANGE,
};
use watcher_ebpf_common::{
    PATH_LEN, RECORD_HEADER, Record, TRACK_WRITE, op, packed_len, path_bytes,
};

use crate::event::{ChangeKind, Event};

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
    /// Cannot be resolved: rescan the directory that surely holds it (None: every root).
    Lost(Option<PathBuf>),
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
        self.rescan(out, rec, why, None);
    }

    /// Rescans `scope`, the directory known to hold what `rec` changed, else every root.
    fn rescan(&self, out: &mut Vec<Event>, rec: &Record, why: &str, scope: Option<&Path>) {
        if let Some(dir) = scope {
            tracing::debug!(op = rec.op, tgid = rec.tgid, dir = %dir.display(), why, "ebpf: rescanning a directory");
            out.push(Event::Rescan {
                path: dir.to_path_buf(),
            });
            return;
        }
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
                Resolution::Lost(None)
            }
        }
    }

    /// A path cut at the probe's limit: lost if it may lie under a root (what is left to
    /// rescan is the deepest directory of the prefix that exists, below its root), else
    /// ignored.
    fn truncated(&mut self, prefix: &Path) -> Resolution {
        self.stats.truncated += 1;
        if let Some(root) = self.roots.iter().find(|r| prefix.starts_with(r)) {
            // The last name may be cut anywhere: it is not a directory to trust.
            let dir = prefix
                .ancestors()
                .skip(1)
                .take_while(|d| d.starts_with(root))
                .find(|d| std::fs::symlink_metadata(d).is_ok_and(|m| m.is_dir()))
                .unwrap_or(root);
            return Resolution::Lost(Some(dir.to_path_buf()));
        }
        let p = prefix.as_os_str().as_bytes();
        if self
            .roots
            .iter()
            .any(|r| r.as_os_str().as_bytes().starts_with(p))
        {
            Resolution::Lost(None)
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
            Resolution::Lost(scope) => {
                self.rescan(out, rec, "first", scope.as_deref());
                None
            }
            Resolution::Foreign => None,
        }
    }

    fn second(&mut self, rec: &Record, out: &mut Vec<Event>) -> Option<PathBuf> {
        match self.resolve(rec, rec.fd2, &rec.path2, rec.len2) {
            Resolution::Path(p) => Some(p),
            Resolution::Foreign => None,
            Resolution::NoPath => {
                self.stats.unresolved += 1;
                self.rescan_all(out, rec, "second");
                None
            }
            Resolution::Lost(scope) => {
                self.stats.unresolved += 1;
                self.rescan(out, rec, "second", scope.as_deref());
                None
            }
        }
    }

    fn fd_or_rescan(&mut self, rec: &Record, fd: i32, out: &mut Vec<Event>) -> Option<PathBuf> {
        let p = self.fd_path(rec.tgid, fd);
        if p.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            return None;
        }
        if p.is_none() && matches!(self.lost(rec), Resolution::Lost(_)) {
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
                    Resolution::NoPath => {
                        self.rescan_all(out, rec, "open");
                        self.fd_remove(rec.tgid, fd);
                        return;
                    }
                    Resolution::Lost(scope) => {
                        self.rescan(out, rec, "open", scope.as_deref());
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
                let old_name = old.clone();
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
                if let Some(n) = &new {
                    self.push(out, ChangeKind::MovedTo, n.clone(), is_dir, pid);
                }
                // Both names known: the rename whole, so a target can replay it (an
                // exchange is two moves at once, which no replay does; rsync copies).
                if !exchange
                    && let (Some(from), Some(to)) = (old_name, new)
                    && (self.under_roots(&from) || self.under_roots(&to))
                {
                    out.push(Event::Renamed { from, to, is_dir });
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
                    Resolution::Lost(_) => None,
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

/// A record from the bytes of a ring buffer entry: sized to its paths, or whole (see
/// [`Record`]). Anything else is None.
pub fn parse_record(bytes: &[u8]) -> Option<Record> {
    let whole = std::mem::size_of::<Record>();
    if bytes.len() == whole {
        // SAFETY: the length is checked; Record is plain old data, read unaligned.
        return Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Record>()) });
    }
    if bytes.len() < RECORD_HEADER {
        return None;
    }
    let mut head = [0u8; std::mem::size_of::<Record>()];
    head[..RECORD_HEADER].copy_from_slice(&bytes[..RECORD_HEADER]);
    // SAFETY: the buffer is a Record's size, zeroed past the header; Record is plain old
    // data, read unaligned.
    let mut rec = unsafe { std::ptr::read_unaligned(head.as_ptr().cast::<Record>()) };
    let (l1, l2) = (path_bytes(rec.len1), path_bytes(rec.len2));
    if bytes.len() != RECORD_HEADER + l1 + l2 || packed_len(rec.len1, rec.len2) != bytes.len() {
        return None;
    }
    let paths = &bytes[RECORD_HEADER..];
    rec.path1[..l1].copy_from_slice(&paths[..l1]);
    rec.path2[..l2].copy_from_slice(&paths[l1..]);
    Some(rec)
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

    fn with_second(mut rec: Record, path2: &[u8]) -> Record {
        rec.path2[..path2.len()].copy_from_slice(path2);
        rec.path2[path2.len()] = 0;
        rec.len2 = path2.len() as i32 + 1;
        rec
    }

    /// The bytes the probes put in the ring buffer for `rec` (probes.rs `submit`).
    fn ring_entry(rec: &Record) -> Vec<u8> {
        // SAFETY: Record is plain old data.
        let whole = unsafe {
            std::slice::from_raw_parts((rec as *const Record).cast::<u8>(), size_of::<Record>())
        };
        let size = packed_len(rec.len1, rec.len2);
        if size == whole.len() {
            return whole.to_vec();
        }
        let (l1, l2) = (path_bytes(rec.len1), path_bytes(rec.len2));
        let mut out = whole[..RECORD_HEADER + l1].to_vec();
        out.extend_from_slice(&rec.path2[..l2]);
        out
    }

    fn same(a: &Record, b: &Record) -> bool {
        let fields = |r: &Record| {
            (
                r.tgid, r.pid, r.op, r.flags, r.ret, r.fd1, r.fd2, r.len1, r.len2,
            )
        };
        let (l1, l2) = (path_bytes(a.len1), path_bytes(a.len2));
        fields(a) == fields(b) && a.path1[..l1] == b.path1[..l1] && a.path2[..l2] == b.path2[..l2]
    }

    #[test]
    fn records_come_sized_to_their_paths_and_whole_when_they_do_not_fit() {
        let mut unlink = record(op::UNLINK, 7, AT_FDCWD, "/data/src/a file");
        unlink.ret = 0;
        let rename = with_second(
            record(op::RENAME, 7, 3, "old\nname"),
            "new $(name)".as_bytes(),
        );
        let long = "d/".repeat(200);
        let long_rename = with_second(record(op::RENAME, 7, 3, &long), long.as_bytes());
        let mut fault = record(op::UNLINK, 7, AT_FDCWD, "");
        fault.len1 = -14;
        let no_path = record(op::FD_MODIFY, 7, 4, "");
        let mut cut = record(op::UNLINK, 7, AT_FDCWD, &"x".repeat(PATH_LEN - 1));
        cut.len1 = PATH_LEN as i32;
        for (rec, size) in [
            (&unlink, RECORD_HEADER + 17),
            (&rename, RECORD_HEADER + 9 + 12),
            (&long_rename, size_of::<Record>()),
            (&fault, RECORD_HEADER),
            (&no_path, RECORD_HEADER),
            (&cut, RECORD_HEADER + PATH_LEN),
        ] {
            let bytes = ring_entry(rec);
            assert_eq!(bytes.len(), size);
            let back = parse_record(&bytes).expect("parses");
            assert!(
                same(rec, &back),
                "{:?}",
                String::from_utf8_lossy(&rec.path1[..8])
            );
        }
        // A torn or foreign entry is refused, not misread.
        let bytes = ring_entry(&rename);
        assert!(parse_record(&bytes[..bytes.len() - 1]).is_none());
        assert!(parse_record(&bytes[..RECORD_HEADER - 1]).is_none());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(parse_record(&longer).is_none());
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
    fn a_truncated_path_rescans_its_deepest_directory_that_exists() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("root");
        std::fs::create_dir_all(root.join("a/b")).expect("mkdir");
        let mut t = Translator::new(std::slice::from_ref(&root));
        let mut out = Vec::new();
        for (cut, scope) in [
            ("a/b/very-long-name-cut-her", root.join("a/b")),
            ("a/b/gone/deeper/name", root.join("a/b")),
            ("a/b", root.join("a")),
            ("missing/x", root.clone()),
        ] {
            let mut rec = record(op::MKDIR, 7, AT_FDCWD, &root.join(cut).to_string_lossy());
            rec.len1 = PATH_LEN as i32;
            out.clear();
            t.translate(&rec, &mut out);
            assert_eq!(out, vec![Event::Rescan { path: scope }], "{cut}");
        }
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
                Event::Renamed {
                    from: "/nonexistent-root/d".into(),
                    to: "/nonexistent-root/n".into(),
                    is_dir: true
                },
                change(ChangeKind::Created, "/nonexistent-root/n/e/x", true),
            ]
        );
    }
}
