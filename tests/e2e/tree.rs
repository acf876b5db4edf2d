//! Exact comparison of a source tree and its replica.
//!
//! Everything rsync `-a` carries over is compared, for every entry including the root
//! directory: the set of paths, file type, file content, permission bits (with setuid,
//! setgid and sticky), owner uid and gid, mtime to the nanosecond, and symlink targets.
//! Nothing is followed: symlinks are compared as links.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::Metadata;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What an entry is, with what must be equal for each kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    File(Vec<u8>),
    Dir,
    Symlink(OsString),
    /// Sockets, fifos, devices: the `S_IFMT` bits.
    Other(u32),
}

impl Kind {
    fn name(&self) -> String {
        match self {
            Kind::File(c) => format!("file ({} bytes)", c.len()),
            Kind::Dir => "directory".into(),
            Kind::Symlink(t) => format!("symlink -> {t:?}"),
            Kind::Other(fmt) => format!("special file (mode {fmt:o})"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    /// `st_mode & 0o7777`.
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    /// mtime: seconds and nanoseconds.
    pub mtime: (i64, i64),
}

/// Relative path (the root is the empty path) -> entry.
pub type Snapshot = BTreeMap<PathBuf, Entry>;

/// Decides which source entries the replica must *not* have (excluded paths): it gets
/// the path relative to the root and the entry's metadata. An excluded directory is
/// not descended into.
pub type Skip<'a> = &'a dyn Fn(&Path, &Metadata) -> bool;

pub fn skip_nothing(_: &Path, _: &Metadata) -> bool {
    false
}

fn entry(abs: &Path, md: &Metadata) -> std::io::Result<Entry> {
    let ft = md.file_type();
    let kind = if ft.is_symlink() {
        Kind::Symlink(std::fs::read_link(abs)?.into_os_string())
    } else if ft.is_dir() {
        Kind::Dir
    } else if ft.is_file() {
        Kind::File(std::fs::read(abs)?)
    } else {
        Kind::Other(md.mode() & libc::S_IFMT)
    };
    Ok(Entry {
        kind,
        perm: md.permissions().mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime: (md.mtime(), md.mtime_nsec()),
    })
}

/// Walks `root` without following anything. I/O errors (an entry that vanished while
/// the daemon or rsync is at work) are returned, for the caller to retry.
pub fn snapshot(root: &Path, skip: Skip<'_>) -> std::io::Result<Snapshot> {
    let mut out = Snapshot::new();
    let md = std::fs::symlink_metadata(root)?;
    out.insert(PathBuf::new(), entry(root, &md)?);
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for dent in std::fs::read_dir(root.join(&rel))? {
            let dent = dent?;
            let rel_child = rel.join(dent.file_name());
            let abs = root.join(&rel_child);
            let md = std::fs::symlink_metadata(&abs)?;
            if skip(&rel_child, &md) {
                continue;
            }
            if md.file_type().is_dir() {
                stack.push(rel_child.clone());
            }
            out.insert(rel_child, entry(&abs, &md)?);
        }
    }
    Ok(out)
}

fn show(p: &Path) -> String {
    if p.as_os_str().is_empty() {
        "<root>".into()
    } else {
        format!("{p:?}")
    }
}

fn show_mtime((s, ns): (i64, i64)) -> String {
    format!("{s}.{ns:09}")
}

/// Every difference between the expected tree and the replica, one line each.
pub fn diff(expected: &Snapshot, replica: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    for (path, e) in expected {
        let Some(r) = replica.get(path) else {
            out.push(format!(
                "missing in replica: {} ({})",
                show(path),
                e.kind.name()
            ));
            continue;
        };
        let p = show(path);
        match (&e.kind, &r.kind) {
            (Kind::File(a), Kind::File(b)) => {
                if a != b {
                    let at = a.iter().zip(b.iter()).position(|(x, y)| x != y);
                    let at = at.unwrap_or(a.len().min(b.len()));
                    out.push(format!(
                        "content differs: {p}: source {} bytes, replica {} bytes, first \
                         difference at byte {at}",
                        a.len(),
                        b.len()
                    ));
                }
            }
            (Kind::Symlink(a), Kind::Symlink(b)) => {
                if a != b {
                    out.push(format!(
                        "symlink target differs: {p}: source {a:?}, replica {b:?}"
                    ));
                }
            }
            (a, b) if a == b => {}
            (a, b) => {
                out.push(format!(
                    "type differs: {p}: source {}, replica {}",
                    a.name(),
                    b.name()
                ));
                continue;
            }
        }
        if e.perm != r.perm {
            out.push(format!(
                "permissions differ: {p} ({}): source {:04o}, replica {:04o}",
                e.kind.name(),
                e.perm,
                r.perm
            ));
        }
        if (e.uid, e.gid) != (r.uid, r.gid) {
            out.push(format!(
                "owner differs: {p} ({}): source {}:{}, replica {}:{}",
                e.kind.name(),
                e.uid,
                e.gid,
                r.uid,
                r.gid
            ));
        }
        if e.mtime != r.mtime {
            out.push(format!(
                "mtime differs: {p} ({}): source {}, replica {}",
                e.kind.name(),
                show_mtime(e.mtime),
                show_mtime(r.mtime)
            ));
        }
    }
    for (path, r) in replica {
        if !expected.contains_key(path) {
            out.push(format!(
                "extra in replica: {} ({})",
                show(path),
                r.kind.name()
            ));
        }
    }
    out
}

/// Compares `src` (minus what `skip` excludes) with the replica `dst`.
pub fn compare(src: &Path, dst: &Path, skip: Skip<'_>) -> std::io::Result<Vec<String>> {
    let expected = snapshot(src, skip)?;
    let replica = snapshot(dst, &skip_nothing)?;
    Ok(diff(&expected, &replica))
}

/// `s` cut in the middle to at most about `max` bytes (deep paths are long).
fn shorten(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut head = max / 2;
    while !s.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = s.len() - max / 2;
    while !s.is_char_boundary(tail) {
        tail += 1;
    }
    format!("{} [...] {}", &s[..head], &s[tail..])
}

/// At most `max` lines of a difference list, with a count of the rest.
pub fn summarize(diffs: &[String], max: usize) -> String {
    let mut s = diffs
        .iter()
        .take(max)
        .map(|d| format!("  {}", shorten(d, 400)))
        .collect::<Vec<_>>()
        .join("\n");
    if diffs.len() > max {
        s.push_str(&format!("\n  ... and {} more", diffs.len() - max));
    }
    s
}

/// Polls the comparison until the replica equals the source or `timeout` passes, then
/// fails the test with the differences (and `context`, e.g. the churn seed).
/// Returns how long convergence took.
pub fn wait_converged(
    src: &Path,
    dst: &Path,
    timeout: Duration,
    skip: Skip<'_>,
    context: &str,
) -> Duration {
    let start = Instant::now();
    let mut attempts = 0u32;
    let mut next_report = Duration::from_secs(10);
    loop {
        attempts += 1;
        let last = match compare(src, dst, skip) {
            Ok(d) if d.is_empty() => {
                let took = start.elapsed();
                eprintln!("converged after {took:?} ({attempts} comparisons)");
                return took;
            }
            Ok(d) => d,
            Err(e) => vec![format!("could not walk the trees: {e}")],
        };
        if start.elapsed() >= next_report {
            // What is still missing, for a failure that later goes away by chance.
            eprintln!(
                "not converged after {:?} ({context}); {} difference(s):\n{}",
                start.elapsed(),
                last.len(),
                summarize(&last, 5)
            );
            next_report += Duration::from_secs(10);
        }
        if start.elapsed() >= timeout {
            panic!(
                "replica {} did not converge with source {} within {timeout:?} ({context}); \
                 {} difference(s):\n{}",
                dst.display(),
                src.display(),
                last.len(),
                summarize(&last, 40)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Fails the test unless the replica equals the source right now.
pub fn assert_equal_now(src: &Path, dst: &Path, skip: Skip<'_>, context: &str) {
    let d = compare(src, dst, skip).unwrap_or_else(|e| panic!("walk trees ({context}): {e}"));
    assert!(
        d.is_empty(),
        "replica differs from source ({context}); {} difference(s):\n{}",
        d.len(),
        summarize(&d, 40)
    );
}

/// Regular files of `root` that share an inode with another name inside it: relative
/// path -> every name of that inode inside the root, sorted; and each such name's link
/// count.
fn link_groups(root: &Path) -> std::io::Result<BTreeMap<PathBuf, (Vec<PathBuf>, u64)>> {
    let mut by_inode: BTreeMap<(u64, u64), Vec<(PathBuf, u64)>> = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for dent in std::fs::read_dir(root.join(&rel))? {
            let dent = dent?;
            let rel_child = rel.join(dent.file_name());
            let md = std::fs::symlink_metadata(root.join(&rel_child))?;
            if md.file_type().is_dir() {
                stack.push(rel_child);
            } else if md.file_type().is_file() && md.nlink() > 1 {
                by_inode
                    .entry((md.dev(), md.ino()))
                    .or_default()
                    .push((rel_child, md.nlink()));
            }
        }
    }
    let mut out = BTreeMap::new();
    for names in by_inode.into_values() {
        let mut group: Vec<PathBuf> = names.iter().map(|(n, _)| n.clone()).collect();
        group.sort();
        for (name, nlink) in names {
            out.insert(name, (group.clone(), nlink));
        }
    }
    Ok(out)
}

/// Where the replica's hard links differ from the source's, one line each: names the
/// source links together must be one inode on the replica, linked to nothing else (the
/// replica's link count is the number of those names), and names the source keeps apart
/// must be apart.
pub fn link_diff(src: &Path, dst: &Path) -> std::io::Result<Vec<String>> {
    let expected = link_groups(src)?;
    let replica = link_groups(dst)?;
    let mut out = Vec::new();
    for (name, (group, _)) in &expected {
        let want: Vec<&PathBuf> = group.iter().collect();
        match replica.get(name) {
            None => out.push(format!(
                "not linked in replica: {name:?} (source links {want:?})"
            )),
            Some((got, nlink)) => {
                if got != group {
                    out.push(format!(
                        "links differ: {name:?}: source links {want:?}, replica {got:?}"
                    ));
                } else if *nlink != group.len() as u64 {
                    out.push(format!(
                        "link count differs: {name:?}: replica {nlink}, {} names",
                        group.len()
                    ));
                }
            }
        }
    }
    for (name, (got, _)) in &replica {
        if !expected.contains_key(name) {
            out.push(format!(
                "linked in replica only: {name:?} (replica links {got:?})"
            ));
        }
    }
    Ok(out)
}

/// Like [`wait_converged`], and the hard links must match too (see [`link_diff`]).
pub fn wait_converged_with_links(src: &Path, dst: &Path, timeout: Duration, context: &str) {
    let start = Instant::now();
    let mut next_report = Duration::from_secs(10);
    loop {
        let last = match (compare(src, dst, &skip_nothing), link_diff(src, dst)) {
            (Ok(a), Ok(b)) if a.is_empty() && b.is_empty() => {
                eprintln!("converged with links after {:?}", start.elapsed());
                return;
            }
            (Ok(mut a), Ok(b)) => {
                a.extend(b);
                a
            }
            (Err(e), _) | (_, Err(e)) => vec![format!("could not walk the trees: {e}")],
        };
        if start.elapsed() >= next_report {
            eprintln!(
                "not converged after {:?} ({context}); {} difference(s):\n{}",
                start.elapsed(),
                last.len(),
                summarize(&last, 5)
            );
            next_report += Duration::from_secs(10);
        }
        if start.elapsed() >= timeout {
            panic!(
                "replica {} did not converge with source {} (links included) within \
                 {timeout:?} ({context}); {} difference(s):\n{}",
                dst.display(),
                src.display(),
                last.len(),
                summarize(&last, 40)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
