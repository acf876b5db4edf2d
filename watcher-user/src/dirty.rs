//! Coalescing set of paths that changed since the last flush, one per target.
//!
//! A trie of path components: marking the same path again is free, and a dirty subtree swallows
//! every mark below it, so memory stays proportional to the number of distinct dirty paths no
//! matter how many events arrive.
//!
//! A path marked on its own that a subtree covers is still remembered as *folded*: the
//! recursive run of the subtree compares files by size and mtime, and would skip a rewrite
//! that kept both (`cp -p`, `tar x`, `touch -r`), though the kernel reported it. Folded
//! paths are bounded too: past [`FOLDED_MAX`] the batch asks for its subtrees to be compared
//! by content instead.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use hashbrown::HashMap;

/// How much of a path needs syncing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The path itself only (a file, a symlink, a missing path, or a directory's own attributes).
    Entry,
    /// The path and everything under it.
    Subtree,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Mark {
    #[default]
    Clean,
    Entry,
    Subtree,
}

#[derive(Debug, Default)]
struct Node {
    mark: Mark,
    /// Always empty under a `Subtree` mark.
    children: Children,
}

/// A node's children by name. Most nodes are files, without children: an empty map is one
/// null pointer, so a node is 16 bytes, and a name of up to 16 bytes is kept inline: a
/// child's slot is 40 bytes with its name, which keeps a target down for a day on a busy
/// tree within memory (see the `memory` benchmark).
#[derive(Debug, Default)]
struct Children(Option<Box<HashMap<Name, Node>>>);

/// One path component; most file names fit inline.
type Name = smallvec::SmallVec<[u8; 16]>;

impl Children {
    /// The child `name`, created clean when new (the name is only allocated then).
    fn entry(&mut self, name: &[u8]) -> &mut Node {
        match self.0.get_or_insert_with(Default::default).entry_ref(name) {
            hashbrown::hash_map::EntryRef::Occupied(entry) => entry.into_mut(),
            hashbrown::hash_map::EntryRef::Vacant(entry) => {
                entry.insert_with_key(Name::from_slice(name), Node::default())
            }
        }
    }

    fn get(&self, name: &[u8]) -> Option<&Node> {
        self.0.as_ref().and_then(|map| map.get(name))
    }

    fn iter(&self) -> impl Iterator<Item = (&[u8], &Node)> {
        self.0
            .iter()
            .flat_map(|map| map.iter().map(|(name, node)| (&**name, node)))
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = (&[u8], &mut Node)> {
        self.0
            .iter_mut()
            .flat_map(|map| map.iter_mut().map(|(name, node)| (&**name, node)))
    }

    fn values(&self) -> impl Iterator<Item = &Node> {
        self.iter().map(|(_, node)| node)
    }

    fn into_iter(self) -> impl Iterator<Item = (Name, Node)> {
        self.0.into_iter().flat_map(|map| map.into_iter())
    }
}

/// Dirty paths, relative to a group's root ("" is the root itself).
#[derive(Debug, Default)]
pub struct DirtySet {
    root: Node,
    /// Number of marked nodes, so `len` is O(1).
    len: usize,
    /// Paths marked on their own below a subtree mark (normalized, as bytes).
    folded: hashbrown::HashSet<Vec<u8>>,
    /// More than [`FOLDED_MAX`] paths were folded: some were not kept.
    folded_overflow: bool,
}

/// Most folded paths remembered per batch; past it, the batch's subtrees are compared by
/// content (`--checksum`), which needs no list.
pub const FOLDED_MAX: usize = 200_000;

/// The paths of one flush, each list sorted by bytes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Paths to sync on their own.
    pub entries: Vec<PathBuf>,
    /// Paths to sync with everything under them; none lies under another.
    pub subtrees: Vec<PathBuf>,
    /// Paths marked on their own that lie under one of `subtrees`: each reached the
    /// replica through its subtree's run, whose quick check may have skipped a rewrite that
    /// kept size and mtime, so each is compared again by content.
    pub folded: Vec<PathBuf>,
    /// Some folded paths were not kept ([`FOLDED_MAX`]): compare the subtrees by content.
    pub compare_subtrees: bool,
}

impl Batch {
    /// Number of paths in the batch.
    pub fn len(&self) -> usize {
        self.entries.len() + self.subtrees.len()
    }

    /// True when the batch has no paths.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.subtrees.is_empty()
    }

    /// True when the whole root is dirty (`subtrees` contains "").
    pub fn covers_root(&self) -> bool {
        self.subtrees.iter().any(|p| p.as_os_str().is_empty())
    }

    /// The batch without the paths strictly below one of `held` (the held paths themselves
    /// stay: an exclude keeps them out of the run).
    pub fn without_below(mut self, held: &[PathBuf]) -> Batch {
        if held.is_empty() {
            return self;
        }
        let kept = |p: &PathBuf| !held.iter().any(|h| p != h && p.starts_with(h));
        self.entries.retain(kept);
        self.subtrees.retain(kept);
        self.folded.retain(kept);
        self
    }
}

/// The non-empty components of a relative path; `.` components are skipped.
fn components(rel: &Path) -> impl Iterator<Item = &[u8]> {
    rel.as_os_str()
        .as_bytes()
        .split(|&b| b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
}

impl DirtySet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `rel` (relative to the root, "" for the root) needs syncing at `scope`.
    pub fn mark(&mut self, rel: &Path, scope: Scope) {
        let mut node = &mut self.root;
        let mut path: Vec<u8> = Vec::new();
        for comp in components(rel) {
            if node.mark == Mark::Subtree {
                if scope == Scope::Entry {
                    remember(&mut self.folded, &mut self.folded_overflow, normalized(rel));
                }
                return;
            }
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(comp);
            node = node.children.entry(comp);
        }
        match (node.mark, scope) {
            (Mark::Subtree, Scope::Entry) => {
                // The subtree's own path, marked on its own: its attributes are in the
                // subtree run, but if it is a file (a renamed file is listed as a subtree so
                // that rsync's quick check finds it in place), a rewrite that kept its size
                // and mtime would be skipped there: compared by content too.
                if !path.is_empty() {
                    remember(&mut self.folded, &mut self.folded_overflow, path.clone());
                }
            }
            (Mark::Subtree, Scope::Subtree) | (Mark::Entry, Scope::Entry) => {}
            (Mark::Clean, Scope::Entry) => {
                node.mark = Mark::Entry;
                self.len += 1;
            }
            (old, Scope::Subtree) => {
                let dropped = usize::from(old == Mark::Entry) + count_marks(&node.children);
                if old == Mark::Entry && !path.is_empty() {
                    // Written before it became a subtree: see above.
                    remember(&mut self.folded, &mut self.folded_overflow, path.clone());
                }
                let children = std::mem::take(&mut node.children);
                node.mark = Mark::Subtree;
                self.len = self.len - dropped + 1;
                // The node's own entry needs nothing more: the subtree run syncs it.
                collect_entries(
                    &children,
                    &path,
                    &mut self.folded,
                    &mut self.folded_overflow,
                );
            }
        }
    }

    /// What was marked on its own at or below `rel` (entries, and paths folded under a
    /// subtree): the writes a rename of `rel` takes to the new name. Found in place there
    /// after the rename is replayed, a file rewritten with its size and mtime kept would pass
    /// rsync's quick check.
    pub fn marked_under(&self, rel: &Path) -> Vec<PathBuf> {
        let want = normalized(rel);
        let mut out = Vec::new();
        // Folded paths can lie at or below `rel` only where a subtree mark is above, at or
        // below it; the folded set is searched only then.
        let mut subtree = false;
        let mut node = Some(&self.root);
        for comp in components(rel) {
            match node {
                Some(n) if n.mark == Mark::Subtree => {
                    subtree = true;
                    node = None;
                }
                Some(n) => node = n.children.get(comp),
                None => break,
            }
        }
        if let Some(n) = node {
            if n.mark == Mark::Subtree {
                subtree = true;
            } else {
                let mut stack = vec![(want.clone(), n)];
                while let Some((path, n)) = stack.pop() {
                    match n.mark {
                        Mark::Entry => out.push(PathBuf::from(OsStr::from_bytes(&path))),
                        Mark::Subtree => subtree = true,
                        Mark::Clean => {}
                    }
                    for (name, child) in n.children.iter() {
                        let mut child_path = path.clone();
                        if !child_path.is_empty() {
                            child_path.push(b'/');
                        }
                        child_path.extend_from_slice(name);
                        stack.push((child_path, child));
                    }
                }
            }
        }
        if subtree {
            out.extend(
                self.folded
                    .iter()
                    .filter(|p| {
                        p.starts_with(&want)
                            && (want.is_empty() || p.len() == want.len() || p[want.len()] == b'/')
                    })
                    .map(|p| PathBuf::from(OsStr::from_bytes(p))),
            );
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Some writes may have been lost track of: the batch compares its subtrees by content.
    pub fn compare_subtrees_by_content(&mut self) {
        self.folded_overflow = true;
    }

    /// Number of dirty paths (entries plus subtrees).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is dirty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Empties the set and returns its paths, sorted.
    pub fn take(&mut self) -> Batch {
        let root = std::mem::take(&mut self.root);
        let mut batch = Batch::default();
        let mut stack = vec![(Vec::new(), root)];
        while let Some((path, node)) = stack.pop() {
            for (name, child) in node.children.into_iter() {
                let mut child_path = Vec::with_capacity(path.len() + 1 + name.len());
                child_path.extend_from_slice(&path);
                if !path.is_empty() {
                    child_path.push(b'/');
                }
                child_path.extend_from_slice(&name);
                stack.push((child_path, child));
            }
            let list = match node.mark {
                Mark::Clean => continue,
                Mark::Entry => &mut batch.entries,
                Mark::Subtree => &mut batch.subtrees,
            };
            list.push(PathBuf::from(OsStr::from_bytes(&path)));
        }
        let by_bytes =
            |a: &PathBuf, b: &PathBuf| a.as_os_str().as_bytes().cmp(b.as_os_str().as_bytes());
        batch.entries.sort_unstable_by(by_bytes);
        batch.subtrees.sort_unstable_by(by_bytes);
        batch.folded = std::mem::take(&mut self.folded)
            .into_iter()
            .map(|p| PathBuf::from(OsStr::from_bytes(&p)))
            .collect();
        batch.folded.sort_unstable_by(by_bytes);
        batch.compare_subtrees = std::mem::take(&mut self.folded_overflow);
        self.len = 0;
        batch
    }

    /// Puts back a batch that failed to sync, coalescing it with what was marked since.
    pub fn merge(&mut self, batch: Batch) {
        // Subtrees first, so entries beneath them are dropped without being inserted.
        for rel in &batch.subtrees {
            self.mark(rel, Scope::Subtree);
        }
        for rel in &batch.entries {
            self.mark(rel, Scope::Entry);
        }
        self.merge_folded(&batch);
    }

    /// Folded paths of a batch put back stay folded (or become entries again, where no
    /// subtree covers them any more).
    fn merge_folded(&mut self, batch: &Batch) {
        for rel in &batch.folded {
            self.mark(rel, Scope::Entry);
        }
        self.folded_overflow |= batch.compare_subtrees;
    }

    /// Puts back a batch whose rsync run was cut short: the directories of its entries
    /// that are not directories themselves (`is_dir`) become subtrees, so the next run
    /// (recursive, with --delete) also removes what the cut left behind there, such as
    /// rsync's temporary `.NAME.XXXXXX` files.
    pub fn merge_widened(&mut self, batch: Batch, is_dir: impl Fn(&Path) -> bool) {
        for rel in &batch.subtrees {
            self.mark(rel, Scope::Subtree);
        }
        for rel in &batch.entries {
            if is_dir(rel) {
                self.mark(rel, Scope::Entry);
            } else {
                self.mark(rel.parent().unwrap_or(Path::new("")), Scope::Subtree);
                // Still a write the kernel reported: folded under that subtree, it is
                // compared by content, or the quick check would pass a rewrite that kept
                // size and mtime.
                self.mark(rel, Scope::Entry);
            }
        }
        self.merge_folded(&batch);
    }
}

/// The path as the trie spells it: components joined by single slashes.
fn normalized(rel: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for comp in components(rel) {
        if !out.is_empty() {
            out.push(b'/');
        }
        out.extend_from_slice(comp);
    }
    out
}

fn remember(folded: &mut hashbrown::HashSet<Vec<u8>>, overflow: &mut bool, path: Vec<u8>) {
    if folded.len() < FOLDED_MAX {
        folded.insert(path);
    } else if !folded.contains(&path) {
        *overflow = true;
    }
}

/// Remembers every path marked on its own (entries; subtrees carry no folded marks, they
/// are synced by the run that covers them) below `children` of the node at `path`.
fn collect_entries(
    children: &Children,
    path: &[u8],
    folded: &mut hashbrown::HashSet<Vec<u8>>,
    overflow: &mut bool,
) {
    for (name, child) in children.iter() {
        let mut child_path = Vec::with_capacity(path.len() + 1 + name.len());
        child_path.extend_from_slice(path);
        if !path.is_empty() {
            child_path.push(b'/');
        }
        child_path.extend_from_slice(name);
        if child.mark == Mark::Entry {
            remember(folded, overflow, child_path.clone());
        }
        collect_entries(&child.children, &child_path, folded, overflow);
    }
}

impl DirtySet {
    /// Bounds memory: while more than `limit` paths are dirty, the deepest marks are folded
    /// into their parent directories as subtrees (syncing more, losing nothing). Returns
    /// how many marks were folded away.
    pub fn collapse(&mut self, limit: usize) -> usize {
        let before = self.len;
        while self.len > limit.max(1) {
            let depth = deepest_mark(&self.root, 0);
            if depth == 0 {
                break;
            }
            fold_at(
                &mut self.root,
                depth - 1,
                &mut Vec::new(),
                &mut self.folded,
                &mut self.folded_overflow,
            );
            self.len =
                usize::from(self.root.mark != Mark::Clean) + count_marks(&self.root.children);
        }
        before - self.len
    }
}

/// Depth (components) of the deepest marked node below `node` at `depth`.
fn deepest_mark(node: &Node, depth: usize) -> usize {
    let own = if node.mark == Mark::Clean { 0 } else { depth };
    node.children
        .values()
        .map(|c| deepest_mark(c, depth + 1))
        .max()
        .unwrap_or(0)
        .max(own)
}

/// Turns every node `levels` below `node` (at `path`) that has marked descendants into a
/// subtree, remembering the entries it swallows as folded.
fn fold_at(
    node: &mut Node,
    levels: usize,
    path: &mut Vec<u8>,
    folded: &mut hashbrown::HashSet<Vec<u8>>,
    overflow: &mut bool,
) {
    if levels == 0 {
        if count_marks(&node.children) > 0 {
            let children = std::mem::take(&mut node.children);
            collect_entries(&children, path, folded, overflow);
            node.mark = Mark::Subtree;
        }
        return;
    }
    for (name, child) in node.children.iter_mut() {
        let len = path.len();
        if !path.is_empty() {
            path.push(b'/');
        }
        path.extend_from_slice(name);
        fold_at(child, levels - 1, path, folded, overflow);
        path.truncate(len);
    }
}

fn count_marks(children: &Children) -> usize {
    let mut count = 0;
    let mut stack: Vec<&Node> = children.values().collect();
    while let Some(node) = stack.pop() {
        count += usize::from(node.mark != Mark::Clean);
        stack.extend(node.children.values());
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use Scope::{Entry as E, Subtree as S};

    fn batch(entries: &[&str], subtrees: &[&str]) -> Batch {
        Batch {
            entries: entries.iter().map(PathBuf::from).collect(),
            subtrees: subtrees.iter().map(PathBuf::from).collect(),
            ..Batch::default()
        }
    }

    fn folded(mut b: Batch, folded: &[&str]) -> Batch {
        b.folded = folded.iter().map(PathBuf::from).collect();
        b
    }

    /// What a rename of a path takes along: its own marks and those below it, folded ones
    /// included, never a neighbour's.
    #[test]
    fn marked_under_table() {
        type Row<'a> = (&'a [(&'a str, Scope)], &'a str, &'a [&'a str]);
        let rows: &[Row] = &[
            (&[], "a", &[]),
            (&[("a", E)], "a", &["a"]),
            (&[("a", E), ("ab", E), ("b/a", E)], "a", &["a"]),
            (
                &[("d/f", E), ("d/e/g", E), ("d", E), ("dd/f", E)],
                "d",
                &["d", "d/e/g", "d/f"],
            ),
            // Under a subtree mark: the folded writes, at or below the path only.
            (&[("n", S), ("n/d/f", E), ("n/dx", E)], "n/d", &["n/d/f"]),
            (&[("n", S), ("n/f", E)], "n/f", &["n/f"]),
            (&[("n", S)], "n/f", &[]),
            // A renamed file is listed as a subtree too, a write before it folded.
            (&[("d/f", E), ("d/f", S)], "d", &["d/f"]),
            (
                &[("d/s", S), ("d/s/f", E), ("d/g", E)],
                "d",
                &["d/g", "d/s/f"],
            ),
            // The root.
            (&[("a", E), ("b", S), ("b/c", E)], "", &["a", "b/c"]),
        ];
        for (i, (marks, rel, want)) in rows.iter().enumerate() {
            let mut set = DirtySet::new();
            for (path, scope) in *marks {
                set.mark(Path::new(path), *scope);
            }
            let want: Vec<PathBuf> = want.iter().map(PathBuf::from).collect();
            assert_eq!(set.marked_under(Path::new(rel)), want, "row {i}");
        }
    }

    #[test]
    fn mark_table() {
        type Row<'a> = (
            &'a [(&'a str, Scope)],
            &'a [&'a str],
            &'a [&'a str],
            &'a [&'a str],
        );
        let rows: &[Row] = &[
            (&[], &[], &[], &[]),
            (&[("a", E)], &["a"], &[], &[]),
            (&[("a", E), ("a", E), ("a", E)], &["a"], &[], &[]),
            (&[("a", S), ("a", S)], &[], &["a"], &[]),
            // The path itself marked on its own and as a subtree: a file listed as a subtree
            // (a renamed one) must not lose a rewrite to the quick check either.
            (&[("a", E), ("a", S)], &[], &["a"], &["a"]),
            (&[("a", S), ("a", E)], &[], &["a"], &["a"]),
            // An entry a subtree covers is remembered as folded, whichever came first.
            (&[("a/b", E), ("a", S)], &[], &["a"], &["a/b"]),
            (&[("a", S), ("a/b", E), ("a/b/c", S)], &[], &["a"], &["a/b"]),
            (
                &[("a/b/c", E), ("a/b/d", S), ("a/x", E), ("a", S)],
                &[],
                &["a"],
                &["a/b/c", "a/x"],
            ),
            (&[("a", E), ("a/b", E)], &["a", "a/b"], &[], &[]),
            (&[("a", E), ("a/b", S)], &["a"], &["a/b"], &[]),
            (
                &[("a/b", S), ("a/c", S), ("ab", E)],
                &["ab"],
                &["a/b", "a/c"],
                &[],
            ),
            (&[("x", E), ("", S), ("y/z", S)], &[], &[""], &["x"]),
            (&[("", S), ("a/./b", E), ("a//b/", E)], &[], &[""], &["a/b"]),
            (&[("", E), ("x", E)], &["", "x"], &[], &[]),
            (&[("", E), ("", S)], &[], &[""], &[]),
            // byte order, not component order: '-' < '/'
            (
                &[("a/b", E), ("a-b", E), ("a", E)],
                &["a", "a-b", "a/b"],
                &[],
                &[],
            ),
            // `.` components and doubled or trailing slashes are the same path
            (
                &[("a/./b", E), ("a//b/", E), ("./a/b", E)],
                &["a/b"],
                &[],
                &[],
            ),
        ];
        for (i, (marks, entries, subtrees, folded_paths)) in rows.iter().enumerate() {
            let mut set = DirtySet::new();
            for (rel, scope) in marks.iter() {
                set.mark(Path::new(rel), *scope);
            }
            let want = folded(batch(entries, subtrees), folded_paths);
            assert_eq!(set.len(), want.len(), "row {i}: len");
            assert_eq!(set.is_empty(), want.is_empty(), "row {i}: is_empty");
            assert_eq!(set.take(), want, "row {i}: {marks:?}");
            assert!(set.is_empty(), "row {i}: take empties the set");
            assert_eq!(set.take(), Batch::default(), "row {i}: second take");
        }
    }

    #[test]
    fn paths_below_one_held_back_leave_the_batch() {
        let b = folded(
            batch(
                &["locked", "locked/new", "lockedx", "o/c"],
                &["locked/d", "s"],
            ),
            &["locked/d/f", "s/g"],
        );
        let held = [PathBuf::from("locked"), PathBuf::from("s/g")];
        assert_eq!(
            b.clone().without_below(&held),
            folded(batch(&["locked", "lockedx", "o/c"], &["s"]), &["s/g"])
        );
        assert_eq!(b.clone().without_below(&[]), b);
    }

    #[test]
    fn a_cut_batch_comes_back_with_its_directories_as_subtrees() {
        let no_dirs = |_: &Path| false;
        let mut set = DirtySet::new();
        set.mark(Path::new("other"), E);
        set.merge_widened(batch(&["a/b/f", "a/g", "top"], &["s/t"]), no_dirs);
        // "top" lies in the root: the whole tree, which covers everything else ("other",
        // marked on its own, is remembered as folded).
        // The files listed on their own stay folded: compared by content.
        assert_eq!(
            set.take(),
            folded(batch(&[], &[""]), &["a/b/f", "a/g", "other", "top"])
        );
        let mut set = DirtySet::new();
        set.merge_widened(batch(&["a/b/f", "a/b/g", "c/d"], &["s/t"]), no_dirs);
        assert_eq!(
            set.take(),
            folded(batch(&[], &["a/b", "c", "s/t"]), &["a/b/f", "a/b/g", "c/d"])
        );
        // Directories listed for their own attributes stay entries.
        let mut set = DirtySet::new();
        let dirs = |p: &Path| p == Path::new("") || p == Path::new("a");
        set.merge_widened(batch(&["", "a", "a/f"], &[]), dirs);
        assert_eq!(set.take(), folded(batch(&[""], &["a"]), &["a", "a/f"]));
    }

    #[test]
    fn non_utf8_and_odd_names() {
        let mut set = DirtySet::new();
        for name in [&b"\xff\xfe"[..], b"a\nb", b" lead", b"-rf"] {
            set.mark(Path::new(OsStr::from_bytes(name)), Scope::Entry);
        }
        let got = set.take();
        let names: Vec<&[u8]> = got
            .entries
            .iter()
            .map(|p| p.as_os_str().as_bytes())
            .collect();
        assert_eq!(names, vec![&b" lead"[..], b"-rf", b"a\nb", b"\xff\xfe"]);
    }

    #[test]
    fn burst_coalesces() {
        let mut set = DirtySet::new();
        for i in 0..1_000_000u32 {
            set.mark(
                Path::new(&format!("d{}/f{}", i % 100, i % 100_000)),
                Scope::Entry,
            );
        }
        assert_eq!(set.len(), 100_000);
        set.mark(Path::new("d7"), Scope::Subtree);
        assert_eq!(set.len(), 100_000 - 1_000 + 1);
        assert_eq!(set.take().len(), 99_001);
    }

    #[test]
    fn merge_coalesces_with_new_marks() {
        let mut set = DirtySet::new();
        set.mark(Path::new("a/b"), Scope::Entry);
        set.mark(Path::new("c"), Scope::Subtree);
        let failed = set.take();
        set.mark(Path::new("a"), Scope::Subtree);
        set.mark(Path::new("c/d"), Scope::Entry);
        set.mark(Path::new("e"), Scope::Entry);
        set.merge(failed);
        assert_eq!(set.len(), 3);
        assert_eq!(
            set.take(),
            folded(batch(&["e"], &["a", "c"]), &["a/b", "c/d"])
        );
        assert!(batch(&[], &["", "x"]).covers_root());
        assert!(!batch(&[""], &["x"]).covers_root());
    }

    fn rel_path() -> impl Strategy<Value = PathBuf> {
        prop::collection::vec(
            prop::sample::select(vec!["a", "b", "c", "a b", "\u{e9}"]),
            0..4,
        )
        .prop_map(|comps| PathBuf::from(comps.join("/")))
    }

    fn scope() -> impl Strategy<Value = Scope> {
        prop_oneof![3 => Just(Scope::Entry), 1 => Just(Scope::Subtree)]
    }

    fn under(path: &Path, subtree: &Path) -> bool {
        subtree.as_os_str().is_empty() || path.starts_with(subtree)
    }

    proptest! {
        #[test]
        fn coalescing_properties(marks in prop::collection::vec((rel_path(), scope()), 0..40)) {
            let mut set = DirtySet::new();
            for (rel, scope) in &marks {
                set.mark(rel, *scope);
            }
            let len = set.len();
            let out = set.take();
            // (d) len matches the batch
            prop_assert_eq!(len, out.len());
            // (a) nothing in the output lies under an output subtree (other than itself)
            for s in &out.subtrees {
                for e in &out.entries {
                    prop_assert!(!under(e, s), "entry {:?} under subtree {:?}", e, s);
                }
                for t in &out.subtrees {
                    prop_assert!(t == s || !under(t, s), "subtree {:?} under {:?}", t, s);
                }
            }
            // (b) every mark is covered, and every output path was marked
            for (rel, scope) in &marks {
                let in_subtree = out.subtrees.iter().any(|s| under(rel, s));
                let covered = match scope {
                    Scope::Entry => in_subtree || out.entries.contains(rel),
                    Scope::Subtree => in_subtree,
                };
                prop_assert!(covered, "{:?} {:?} not covered", rel, scope);
            }
            for e in &out.entries {
                prop_assert!(marks.iter().any(|(r, s)| r == e && *s == Scope::Entry));
            }
            for t in &out.subtrees {
                prop_assert!(marks.iter().any(|(r, s)| r == t && *s == Scope::Subtree));
            }
            // (c) take, merge, take round-trips
            let mut set = DirtySet::new();
            set.merge(out.clone());
            prop_assert_eq!(set.len(), out.len());
            prop_assert_eq!(set.take(), out);
        }
    }

    #[test]
    fn collapse_folds_deepest_marks_into_their_directories() {
        let mut set = DirtySet::new();
        for i in 0..100 {
            set.mark(Path::new(&format!("a/b/f{i}")), E);
        }
        set.mark(Path::new("c"), E);
        set.mark(Path::new("a/x"), E);
        assert_eq!(set.len(), 102);
        assert_eq!(set.collapse(10), 99);
        let out = set.take();
        assert_eq!(
            (out.entries, out.subtrees),
            (
                batch(&["a/x", "c"], &["a/b"]).entries,
                batch(&[], &["a/b"]).subtrees
            )
        );
        assert_eq!(out.folded.len(), 100);
        assert!(out.folded.contains(&PathBuf::from("a/b/f7")));

        // Already under the limit: nothing changes.
        set.mark(Path::new("d/e"), E);
        assert_eq!(set.collapse(10), 0);
        assert_eq!(set.take(), batch(&["d/e"], &[]));
    }

    #[test]
    fn folded_paths_are_bounded() {
        let mut set = DirtySet::new();
        set.mark(Path::new("d"), S);
        for i in 0..FOLDED_MAX + 10 {
            set.mark(Path::new(&format!("d/f{i}")), E);
        }
        assert_eq!(set.len(), 1);
        let out = set.take();
        assert_eq!(out.folded.len(), FOLDED_MAX);
        assert!(out.compare_subtrees);
        // Put back, the flag stays with the batch; taken, it is reset.
        set.merge(out);
        assert!(set.take().compare_subtrees);
        set.mark(Path::new("d"), S);
        assert!(!set.take().compare_subtrees);
    }

    #[test]
    fn collapse_can_reach_the_root() {
        let mut set = DirtySet::new();
        set.mark(Path::new("a"), E);
        set.mark(Path::new("b"), E);
        set.collapse(1);
        assert_eq!(set.take(), folded(batch(&[], &[""]), &["a", "b"]));
    }
}
