//! Seeded random changes to a small source tree.
//!
//! The tree is modelled in memory (relative path -> node) so every operation is chosen
//! among entries that exist: with the same seed the same operations run in the same
//! order, and a failure can be replayed. Ordered maps only, so nothing depends on hash
//! order.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::stat::{UtimensatFlags, utimensat};
use nix::sys::time::TimeSpec;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Node {
    File,
    Dir,
    Link,
}

/// Whether to pause now and then between operations (so the daemon sees the changes
/// spread over several batches), or to go as fast as possible (a burst).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pace {
    Spread,
    Burst,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    CreateFile,
    Overwrite,
    Append,
    Truncate,
    Chmod,
    SetMtime,
    Chown,
    MkdirNested,
    RenameFileSameDir,
    RenameFileOtherDir,
    RenameOverFile,
    RenameDir,
    DeleteFile,
    RmRf,
    SymlinkRelative,
    SymlinkDangling,
    DirToSymlink,
    FileToDir,
    LinkToFile,
    HardLink,
    WriteLinked,
    UnlinkLinked,
    RewriteKeepMtime,
}

/// Operation mix (weights).
const OPS: &[(Op, u32)] = &[
    (Op::CreateFile, 14),
    (Op::Overwrite, 8),
    (Op::Append, 6),
    (Op::Truncate, 4),
    (Op::Chmod, 6),
    (Op::SetMtime, 6),
    (Op::Chown, 3),
    (Op::MkdirNested, 6),
    (Op::RenameFileSameDir, 5),
    (Op::RenameFileOtherDir, 5),
    (Op::RenameOverFile, 3),
    (Op::RenameDir, 3),
    (Op::DeleteFile, 7),
    (Op::RmRf, 2),
    (Op::SymlinkRelative, 3),
    (Op::SymlinkDangling, 2),
    (Op::DirToSymlink, 1),
    (Op::FileToDir, 2),
    (Op::LinkToFile, 1),
];

/// Added to the mix when [`Churn::hard_links`] is set (the mix without them is unchanged,
/// so earlier seeds replay the same operations).
const HARD_LINK_OPS: &[(Op, u32)] = &[
    (Op::HardLink, 5),
    (Op::WriteLinked, 5),
    (Op::UnlinkLinked, 2),
    (Op::RewriteKeepMtime, 3),
];

const FILE_MODES: &[u32] = &[0o644, 0o600, 0o755, 0o640, 0o444, 0o664];
const DIR_MODES: &[u32] = &[0o755, 0o700, 0o750, 0o775, 0o2775];
/// Owners (uid, gid); the ones without a name on most systems make rsync send numbers.
const OWNERS: &[(u32, u32)] = &[(0, 0), (1000, 1000), (12345, 54321)];
/// Above this many entries, half of the operations delete.
const MAX_ENTRIES: usize = 300;
/// No new directory goes deeper than this (renames may still nest a little deeper).
const MAX_DEPTH: usize = 6;
/// No churn runs longer than this, whatever its count.
const MAX_CHURN_TIME: Duration = Duration::from_secs(60);

pub struct Churn {
    root: PathBuf,
    seed: u64,
    rng: StdRng,
    nodes: BTreeMap<PathBuf, Node>,
    counter: u64,
    /// Give some new names the excluded forms `*.swp` (files) and `.cache` (dirs).
    pub excluded_names: bool,
    /// Keep every symlink's target inside the tree: directories and symlinks only move
    /// to a parent of the same depth, so a relative `../` target never climbs out. An
    /// rsync daemon without chroot sanitizes targets that leave the module, so against
    /// one the replica could not hold such a link as it is.
    pub contained_links: bool,
    /// Hard links too: make them, write through them, unlink them; and rewrites that keep
    /// size and mtime.
    pub hard_links: bool,
    /// How many times each operation ran.
    pub stats: BTreeMap<String, usize>,
}

impl Churn {
    /// A churn over the (empty or not) tree at `root`: the model starts from what is on disk.
    pub fn new(root: &Path, seed: u64) -> Churn {
        let mut nodes = BTreeMap::new();
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            for d in std::fs::read_dir(root.join(&rel)).expect("read_dir") {
                let d = d.expect("dir entry");
                let r = rel.join(d.file_name());
                let ft = d.file_type().expect("file type");
                let node = if ft.is_symlink() {
                    Node::Link
                } else if ft.is_dir() {
                    stack.push(r.clone());
                    Node::Dir
                } else {
                    Node::File
                };
                nodes.insert(r, node);
            }
        }
        Churn {
            root: root.to_path_buf(),
            seed,
            rng: StdRng::seed_from_u64(seed),
            nodes,
            counter: 0,
            excluded_names: false,
            contained_links: false,
            hard_links: false,
            stats: BTreeMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    fn abs(&self, rel: &Path) -> PathBuf {
        self.root.join(rel)
    }

    fn fail(&self, what: &str, path: &Path, e: impl std::fmt::Display) -> ! {
        panic!("churn (seed {}): {what} {:?}: {e}", self.seed, path)
    }

    fn fresh(&mut self, prefix: &str) -> String {
        self.counter += 1;
        // Now and then a name with a space, to keep the daemon honest about quoting.
        if self.rng.random_ratio(1, 8) {
            format!("{prefix}{} x", self.counter)
        } else {
            format!("{prefix}{}", self.counter)
        }
    }

    fn fresh_file_name(&mut self) -> String {
        let name = self.fresh("f");
        if self.excluded_names && self.rng.random_ratio(1, 6) {
            format!("{name}.swp")
        } else {
            name
        }
    }

    fn fresh_dir_name(&mut self, parent: &Path) -> String {
        if self.excluded_names
            && self.rng.random_ratio(1, 8)
            && !self.nodes.contains_key(&parent.join(".cache"))
        {
            return ".cache".into();
        }
        self.fresh("d")
    }

    fn pick(&mut self, want: impl Fn(&Path, Node) -> bool) -> Option<PathBuf> {
        let c: Vec<&PathBuf> = self
            .nodes
            .iter()
            .filter(|(p, n)| want(p, **n))
            .map(|(p, _)| p)
            .collect();
        if c.is_empty() {
            return None;
        }
        let i = self.rng.random_range(0..c.len());
        Some(c[i].clone())
    }

    fn pick_kind(&mut self, kind: Node) -> Option<PathBuf> {
        self.pick(|_, n| n == kind)
    }

    /// A directory to put something in: the root or any directory.
    fn pick_parent(&mut self) -> PathBuf {
        let dirs = self.nodes.values().filter(|n| **n == Node::Dir).count();
        if dirs == 0 || self.rng.random_ratio(1, (dirs as u32 + 1).min(6)) {
            return PathBuf::new();
        }
        self.pick_kind(Node::Dir).unwrap_or_default()
    }

    /// A directory (or the root, for depth 0) exactly `depth` levels below the root.
    fn pick_parent_at_depth(&mut self, depth: usize) -> PathBuf {
        if depth == 0 {
            return PathBuf::new();
        }
        self.pick(|p, n| n == Node::Dir && p.components().count() == depth)
            .expect("the link's own parent is at that depth")
    }

    fn content(&mut self) -> Vec<u8> {
        let len = match self.rng.random_range(0..100) {
            0..70 => self.rng.random_range(0..512),
            70..95 => self.rng.random_range(512..8192),
            _ => self.rng.random_range(8192..65536),
        };
        let mut v = vec![0u8; len];
        self.rng.fill_bytes(&mut v);
        v
    }

    fn remove_subtree(&mut self, rel: &Path) {
        let gone: Vec<PathBuf> = self
            .nodes
            .keys()
            .filter(|p| p.starts_with(rel))
            .cloned()
            .collect();
        for p in gone {
            self.nodes.remove(&p);
        }
    }

    fn move_subtree(&mut self, from: &Path, to: &Path) {
        let moved: Vec<(PathBuf, Node)> = self
            .nodes
            .iter()
            .filter(|(p, _)| p.starts_with(from))
            .map(|(p, n)| (p.clone(), *n))
            .collect();
        for (p, n) in moved {
            self.nodes.remove(&p);
            let rest = p.strip_prefix(from).expect("prefix");
            let np = if rest.as_os_str().is_empty() {
                to.to_path_buf()
            } else {
                to.join(rest)
            };
            self.nodes.insert(np, n);
        }
    }

    fn write_new_file(&mut self, rel: &Path) {
        let data = self.content();
        let abs = self.abs(rel);
        std::fs::write(&abs, &data).unwrap_or_else(|e| self.fail("create", rel, e));
        self.nodes.insert(rel.to_path_buf(), Node::File);
    }

    /// A symlink target relative to the link's directory, pointing at `target`.
    fn relative_target(link: &Path, target: &Path) -> PathBuf {
        let depth = link.parent().map_or(0, |p| p.components().count());
        let mut t = PathBuf::new();
        for _ in 0..depth {
            t.push("..");
        }
        t.push(target);
        t
    }

    /// Runs `count` operations; with `Pace::Spread` it pauses a few ms now and then.
    pub fn run(&mut self, count: usize, pace: Pace) {
        let start = Instant::now();
        let ops: Vec<(Op, u32)> = if self.hard_links {
            OPS.iter().chain(HARD_LINK_OPS).copied().collect()
        } else {
            OPS.to_vec()
        };
        let total: u32 = ops.iter().map(|(_, w)| w).sum();
        for i in 0..count {
            if start.elapsed() > MAX_CHURN_TIME {
                panic!(
                    "churn (seed {}): {i} of {count} operations took over {MAX_CHURN_TIME:?}",
                    self.seed
                );
            }
            let op = if self.nodes.len() > MAX_ENTRIES && self.rng.random_ratio(1, 2) {
                if self.rng.random_ratio(1, 4) {
                    Op::RmRf
                } else {
                    Op::DeleteFile
                }
            } else {
                let mut x = self.rng.random_range(0..total);
                let mut chosen = Op::CreateFile;
                for (op, w) in &ops {
                    if x < *w {
                        chosen = *op;
                        break;
                    }
                    x -= w;
                }
                chosen
            };
            let done = self.apply(op);
            *self.stats.entry(format!("{done:?}")).or_default() += 1;
            if pace == Pace::Spread && self.rng.random_ratio(1, 10) {
                let ms = self.rng.random_range(0..8);
                std::thread::sleep(Duration::from_millis(ms));
            }
        }
    }

    /// Creates an initial tree of about `n` entries (files, nested dirs, symlinks).
    pub fn populate(&mut self, n: usize) {
        for _ in 0..n {
            let op = match self.rng.random_range(0..10) {
                0..6 => Op::CreateFile,
                6..9 => Op::MkdirNested,
                _ => Op::SymlinkRelative,
            };
            self.apply(op);
        }
    }

    /// Applies `op`, or creates a file when `op` has nothing to work on. Returns what ran.
    fn apply(&mut self, op: Op) -> Op {
        match op {
            Op::CreateFile => {
                let parent = self.pick_parent();
                let name = self.fresh_file_name();
                self.write_new_file(&parent.join(name));
            }
            Op::Overwrite | Op::Append | Op::Truncate => {
                let Some(f) = self.pick_kind(Node::File) else {
                    return self.apply(Op::CreateFile);
                };
                let abs = self.abs(&f);
                let r = match op {
                    Op::Overwrite => {
                        let data = self.content();
                        std::fs::write(&abs, data)
                    }
                    Op::Append => {
                        let data = self.content();
                        OpenOptions::new()
                            .append(true)
                            .open(&abs)
                            .and_then(|mut h| h.write_all(&data))
                    }
                    _ => {
                        let len = self.rng.random_range(0..16384u64);
                        OpenOptions::new()
                            .write(true)
                            .open(&abs)
                            .and_then(|h| h.set_len(len))
                    }
                };
                r.unwrap_or_else(|e| self.fail(&format!("{op:?}"), &f, e));
            }
            Op::Chmod => {
                let Some(p) = self.pick(|_, n| n != Node::Link) else {
                    return self.apply(Op::CreateFile);
                };
                let modes = if self.nodes[&p] == Node::Dir {
                    DIR_MODES
                } else {
                    FILE_MODES
                };
                let mode = modes[self.rng.random_range(0..modes.len())];
                std::fs::set_permissions(self.abs(&p), std::fs::Permissions::from_mode(mode))
                    .unwrap_or_else(|e| self.fail("chmod", &p, e));
            }
            Op::SetMtime => {
                // The root too, now and then.
                let p = if self.rng.random_ratio(1, 20) {
                    Some(PathBuf::new())
                } else {
                    self.pick(|_, _| true)
                };
                let Some(p) = p else {
                    return self.apply(Op::CreateFile);
                };
                let secs = self.rng.random_range(100_000_000..4_000_000_000i64);
                let nsec = self.rng.random_range(0..1_000_000_000i64);
                utimensat(
                    nix::fcntl::AT_FDCWD,
                    &self.abs(&p),
                    &TimeSpec::UTIME_OMIT,
                    &TimeSpec::new(secs, nsec),
                    UtimensatFlags::NoFollowSymlink,
                )
                .unwrap_or_else(|e| self.fail("set mtime", &p, e));
            }
            Op::Chown => {
                let Some(p) = self.pick(|_, _| true) else {
                    return self.apply(Op::CreateFile);
                };
                let (u, g) = OWNERS[self.rng.random_range(0..OWNERS.len())];
                std::os::unix::fs::lchown(self.abs(&p), Some(u), Some(g))
                    .unwrap_or_else(|e| self.fail("chown", &p, e));
            }
            Op::MkdirNested => {
                let mut parent = self.pick_parent();
                if parent.components().count() >= MAX_DEPTH {
                    parent = PathBuf::new();
                }
                let levels = self.rng.random_range(1..=3);
                let mut p = parent;
                let mut created = Vec::new();
                for _ in 0..levels {
                    let name = self.fresh_dir_name(&p);
                    p = p.join(name);
                    created.push(p.clone());
                }
                std::fs::create_dir_all(self.abs(&p))
                    .unwrap_or_else(|e| self.fail("mkdir -p", &p, e));
                for d in created {
                    self.nodes.insert(d, Node::Dir);
                }
                if self.rng.random_ratio(1, 2) {
                    let name = self.fresh_file_name();
                    self.write_new_file(&p.join(name));
                }
            }
            Op::RenameFileSameDir | Op::RenameFileOtherDir => {
                let Some(f) = self.pick(|_, n| n != Node::Dir) else {
                    return self.apply(Op::CreateFile);
                };
                let here = f.parent().map(Path::to_path_buf).unwrap_or_default();
                let parent = if op == Op::RenameFileSameDir {
                    here
                } else if self.contained_links && self.nodes[&f] == Node::Link {
                    self.pick_parent_at_depth(here.components().count())
                } else {
                    self.pick_parent()
                };
                let to = parent.join(self.fresh_file_name());
                std::fs::rename(self.abs(&f), self.abs(&to))
                    .unwrap_or_else(|e| self.fail("rename", &f, e));
                self.move_subtree(&f, &to);
            }
            Op::RenameOverFile => {
                // The editor's save: write a new file, rename it over the old one.
                let Some(f) = self.pick_kind(Node::File) else {
                    return self.apply(Op::CreateFile);
                };
                let Some(g) = self.pick(|p, n| n == Node::File && p != f) else {
                    return self.apply(Op::CreateFile);
                };
                std::fs::rename(self.abs(&g), self.abs(&f))
                    .unwrap_or_else(|e| self.fail("rename over", &g, e));
                self.nodes.remove(&g);
            }
            Op::RenameDir => {
                let Some(d) = self.pick_kind(Node::Dir) else {
                    return self.apply(Op::MkdirNested);
                };
                let depth = d.components().count() - 1;
                let contained = self.contained_links;
                let parents: Vec<PathBuf> = std::iter::once(PathBuf::new())
                    .chain(
                        self.nodes
                            .iter()
                            .filter(|(p, n)| **n == Node::Dir && !p.starts_with(&d))
                            .map(|(p, _)| p.clone()),
                    )
                    .filter(|p| !contained || p.components().count() == depth)
                    .collect();
                let parent = parents[self.rng.random_range(0..parents.len())].clone();
                let to = parent.join(self.fresh_dir_name(&parent));
                std::fs::rename(self.abs(&d), self.abs(&to))
                    .unwrap_or_else(|e| self.fail("rename dir", &d, e));
                self.move_subtree(&d, &to);
            }
            Op::DeleteFile => {
                let Some(f) = self.pick(|_, n| n != Node::Dir) else {
                    return self.apply(Op::CreateFile);
                };
                std::fs::remove_file(self.abs(&f)).unwrap_or_else(|e| self.fail("unlink", &f, e));
                self.nodes.remove(&f);
            }
            Op::RmRf => {
                let Some(d) = self.pick_kind(Node::Dir) else {
                    return self.apply(Op::CreateFile);
                };
                std::fs::remove_dir_all(self.abs(&d))
                    .unwrap_or_else(|e| self.fail("rm -rf", &d, e));
                self.remove_subtree(&d);
            }
            Op::SymlinkRelative | Op::SymlinkDangling => {
                let parent = self.pick_parent();
                let link = parent.join(self.fresh("l"));
                let target = match (op, self.pick(|_, n| n != Node::Link)) {
                    (Op::SymlinkRelative, Some(t)) => Self::relative_target(&link, &t),
                    _ => PathBuf::from(format!("missing-{}/nowhere", self.counter)),
                };
                std::os::unix::fs::symlink(&target, self.abs(&link))
                    .unwrap_or_else(|e| self.fail("symlink", &link, e));
                self.nodes.insert(link, Node::Link);
            }
            Op::DirToSymlink => {
                let Some(d) = self.pick_kind(Node::Dir) else {
                    return self.apply(Op::MkdirNested);
                };
                if d.file_name().is_some_and(|n| n == ".cache") {
                    // `.cache/` excludes directories only: keep out of what a symlink
                    // named `.cache` should do.
                    return self.apply(Op::RmRf);
                }
                std::fs::remove_dir_all(self.abs(&d))
                    .unwrap_or_else(|e| self.fail("rm -rf", &d, e));
                self.remove_subtree(&d);
                let target = match self.pick(|_, n| n == Node::Dir) {
                    Some(t) => Self::relative_target(&d, &t),
                    None => PathBuf::from("missing-dir"),
                };
                std::os::unix::fs::symlink(&target, self.abs(&d))
                    .unwrap_or_else(|e| self.fail("symlink over dir", &d, e));
                self.nodes.insert(d, Node::Link);
            }
            Op::FileToDir => {
                let Some(f) = self.pick_kind(Node::File) else {
                    return self.apply(Op::CreateFile);
                };
                std::fs::remove_file(self.abs(&f)).unwrap_or_else(|e| self.fail("unlink", &f, e));
                std::fs::create_dir(self.abs(&f))
                    .unwrap_or_else(|e| self.fail("mkdir over file", &f, e));
                self.nodes.insert(f.clone(), Node::Dir);
                if self.rng.random_ratio(1, 2) {
                    let name = self.fresh_file_name();
                    self.write_new_file(&f.join(name));
                }
            }
            Op::HardLink => {
                let Some(f) = self.pick_kind(Node::File) else {
                    return self.apply(Op::CreateFile);
                };
                let parent = self.pick_parent();
                let to = parent.join(self.fresh_file_name());
                std::fs::hard_link(self.abs(&f), self.abs(&to))
                    .unwrap_or_else(|e| self.fail("ln", &to, e));
                self.nodes.insert(to, Node::File);
            }
            Op::WriteLinked | Op::UnlinkLinked => {
                let root = self.root.clone();
                let Some(f) = self.pick(|p, n| {
                    n == Node::File
                        && std::fs::symlink_metadata(root.join(p))
                            .is_ok_and(|m| std::os::unix::fs::MetadataExt::nlink(&m) > 1)
                }) else {
                    return self.apply(Op::HardLink);
                };
                if op == Op::UnlinkLinked {
                    std::fs::remove_file(self.abs(&f))
                        .unwrap_or_else(|e| self.fail("unlink", &f, e));
                    self.nodes.remove(&f);
                } else {
                    // In place: every name of the inode sees the new content.
                    let data = self.content();
                    OpenOptions::new()
                        .write(true)
                        .truncate(true)
                        .open(self.abs(&f))
                        .and_then(|mut h| h.write_all(&data))
                        .unwrap_or_else(|e| self.fail("write through a link", &f, e));
                }
            }
            Op::RewriteKeepMtime => {
                // `cp -p`, `tar x`, `touch -r`: new bytes, same size, same mtime.
                let Some(f) = self.pick_kind(Node::File) else {
                    return self.apply(Op::CreateFile);
                };
                let abs = self.abs(&f);
                let meta =
                    std::fs::symlink_metadata(&abs).unwrap_or_else(|e| self.fail("stat", &f, e));
                let mut data = vec![0u8; meta.len() as usize];
                self.rng.fill_bytes(&mut data);
                OpenOptions::new()
                    .write(true)
                    .open(&abs)
                    .and_then(|mut h| h.write_all(&data))
                    .unwrap_or_else(|e| self.fail("rewrite", &f, e));
                use std::os::unix::fs::MetadataExt;
                utimensat(
                    nix::fcntl::AT_FDCWD,
                    &abs,
                    &TimeSpec::UTIME_OMIT,
                    &TimeSpec::new(meta.mtime(), meta.mtime_nsec()),
                    UtimensatFlags::NoFollowSymlink,
                )
                .unwrap_or_else(|e| self.fail("restore mtime", &f, e));
            }
            Op::LinkToFile => {
                let Some(l) = self.pick_kind(Node::Link) else {
                    return self.apply(Op::SymlinkDangling);
                };
                std::fs::remove_file(self.abs(&l)).unwrap_or_else(|e| self.fail("unlink", &l, e));
                self.write_new_file(&l);
            }
        }
        op
    }
}
