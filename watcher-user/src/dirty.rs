//! Coalescing set of paths that changed since the last flush, one per target.
//!
//! A trie of path components: marking the same path again is free, and a dirty subtree swallows
//! every mark below it, so memory stays proportional to the number of distinct dirty paths no
//! matter how many events arrive.

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
    children: HashMap<Vec<u8>, Node>,
}

/// Dirty paths, relative to a group's root ("" is the root itself).
#[derive(Debug, Default)]
pub struct DirtySet {
    root: Node,
    /// Number of marked nodes, so `len` is O(1).
    len: usize,
}

/// The paths of one flush, each list sorted by bytes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Paths to sync on their own.
    pub entries: Vec<PathBuf>,
    /// Paths to sync with everything under them; none lies under another.
    pub subtrees: Vec<PathBuf>,
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
        for comp in components(rel) {
            if node.mark == Mark::Subtree {
                return;
            }
            // `entry_ref` only allocates the key when the component is new.
            node = node.children.entry_ref(comp).or_default();
        }
        match (node.mark, scope) {
            (Mark::Subtree, _) | (Mark::Entry, Scope::Entry) => {}
            (Mark::Clean, Scope::Entry) => {
                node.mark = Mark::Entry;
                self.len += 1;
            }
            (old, Scope::Subtree) => {
                let dropped = usize::from(old == Mark::Entry) + count_marks(&node.children);
                node.children = HashMap::new();
                node.mark = Mark::Subtree;
                self.len = self.len - dropped + 1;
            }
        }
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
            for (name, child) in node.children {
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
            }
        }
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
            fold_at(&mut self.root, depth - 1);
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

/// Turns every node `levels` below `node` that has marked descendants into a subtree.
fn fold_at(node: &mut Node, levels: usize) {
    if levels == 0 {
        if count_marks(&node.children) > 0 {
            node.children = HashMap::new();
            node.mark = Mark::Subtree;
        }
        return;
    }
    for child in node.children.values_mut() {
        fold_at(child, levels - 1);
    }
}

fn count_marks(children: &HashMap<Vec<u8>, Node>) -> usize {
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
        }
    }

    #[test]
    fn mark_table() {
        type Row<'a> = (&'a [(&'a str, Scope)], &'a [&'a str], &'a [&'a str]);
        let rows: &[Row] = &[
            (&[], &[], &[]),
            (&[("a", E)], &["a"], &[]),
            (&[("a", E), ("a", E), ("a", E)], &["a"], &[]),
            (&[("a", S), ("a", S)], &[], &["a"]),
            (&[("a", E), ("a", S)], &[], &["a"]),
            (&[("a", S), ("a", E)], &[], &["a"]),
            (&[("a/b", E), ("a", S)], &[], &["a"]),
            (&[("a", S), ("a/b", E), ("a/b/c", S)], &[], &["a"]),
            (
                &[("a/b/c", E), ("a/b/d", S), ("a/x", E), ("a", S)],
                &[],
                &["a"],
            ),
            (&[("a", E), ("a/b", E)], &["a", "a/b"], &[]),
            (&[("a", E), ("a/b", S)], &["a"], &["a/b"]),
            (
                &[("a/b", S), ("a/c", S), ("ab", E)],
                &["ab"],
                &["a/b", "a/c"],
            ),
            (&[("x", E), ("", S), ("y/z", S)], &[], &[""]),
            (&[("", E), ("x", E)], &["", "x"], &[]),
            (&[("", E), ("", S)], &[], &[""]),
            // byte order, not component order: '-' < '/'
            (
                &[("a/b", E), ("a-b", E), ("a", E)],
                &["a", "a-b", "a/b"],
                &[],
            ),
            // `.` components and doubled or trailing slashes are the same path
            (&[("a/./b", E), ("a//b/", E), ("./a/b", E)], &["a/b"], &[]),
        ];
        for (i, (marks, entries, subtrees)) in rows.iter().enumerate() {
            let mut set = DirtySet::new();
            for (rel, scope) in marks.iter() {
                set.mark(Path::new(rel), *scope);
            }
            let want = batch(entries, subtrees);
            assert_eq!(set.len(), want.len(), "row {i}: len");
            assert_eq!(set.is_empty(), want.is_empty(), "row {i}: is_empty");
            assert_eq!(set.take(), want, "row {i}: {marks:?}");
            assert!(set.is_empty(), "row {i}: take empties the set");
            assert_eq!(set.take(), Batch::default(), "row {i}: second take");
        }
    }

    #[test]
    fn a_cut_batch_comes_back_with_its_directories_as_subtrees() {
        let no_dirs = |_: &Path| false;
        let mut set = DirtySet::new();
        set.mark(Path::new("other"), E);
        set.merge_widened(batch(&["a/b/f", "a/g", "top"], &["s/t"]), no_dirs);
        // "top" lies in the root: the whole tree, which covers everything else.
        assert_eq!(set.take(), batch(&[], &[""]));
        let mut set = DirtySet::new();
        set.merge_widened(batch(&["a/b/f", "a/b/g", "c/d"], &["s/t"]), no_dirs);
        assert_eq!(set.take(), batch(&[], &["a/b", "c", "s/t"]));
        // Directories listed for their own attributes stay entries.
        let mut set = DirtySet::new();
        let dirs = |p: &Path| p == Path::new("") || p == Path::new("a");
        set.merge_widened(batch(&["", "a", "a/f"], &[]), dirs);
        assert_eq!(set.take(), batch(&[""], &["a"]));
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
        assert_eq!(set.take(), batch(&["e"], &["a", "c"]));
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
        let folded = set.collapse(10);
        assert_eq!(folded, 99);
        assert_eq!(set.take(), batch(&["a/x", "c"], &["a/b"]));

        // Already under the limit: nothing changes.
        set.mark(Path::new("d/e"), E);
        assert_eq!(set.collapse(10), 0);
        assert_eq!(set.take(), batch(&["d/e"], &[]));
    }

    #[test]
    fn collapse_can_reach_the_root() {
        let mut set = DirtySet::new();
        set.mark(Path::new("a"), E);
        set.mark(Path::new("b"), E);
        set.collapse(1);
        assert_eq!(set.take(), batch(&[], &[""]));
    }
}
