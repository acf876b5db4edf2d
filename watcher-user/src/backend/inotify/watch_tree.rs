//! Where every watched directory is: a map from watch descriptor to (parent watch, name),
//! so a path is the names up to a root and renaming a directory relinks one node: every
//! watch below it follows without being touched.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::path::{Component, Path, PathBuf};

#[derive(Debug)]
struct Node {
    parent: Option<i32>,
    /// The entry name in the parent; a root's full path.
    name: OsString,
    children: HashMap<OsString, i32>,
}

/// Where every watched directory is: watch descriptor -> (parent watch, name). A path is
/// the names up to a root, so renaming a directory relinks one node and every watch below
/// it follows.
#[derive(Debug, Default)]
pub(crate) struct WatchTree {
    nodes: HashMap<i32, Node>,
    roots: HashMap<OsString, i32>,
}

impl WatchTree {
    pub(crate) fn len(&self) -> usize {
        self.nodes.len()
    }

    pub(crate) fn contains(&self, wd: i32) -> bool {
        self.nodes.contains_key(&wd)
    }

    pub(crate) fn is_root(&self, wd: i32) -> bool {
        self.nodes.get(&wd).is_some_and(|n| n.parent.is_none())
    }

    pub(crate) fn wds(&self) -> impl Iterator<Item = i32> + '_ {
        self.nodes.keys().copied()
    }

    pub(crate) fn child(&self, parent: i32, name: &OsStr) -> Option<i32> {
        self.nodes.get(&parent)?.children.get(name).copied()
    }

    /// Where `wd` hangs: its parent's watch (None for a root) and its name there.
    pub(crate) fn link(&self, wd: i32) -> Option<(Option<i32>, &OsStr)> {
        self.nodes.get(&wd).map(|n| (n.parent, n.name.as_os_str()))
    }

    /// The absolute path of `wd`'s directory.
    pub(crate) fn path(&self, wd: i32) -> Option<PathBuf> {
        let mut names = Vec::new();
        let mut cur = self.nodes.get(&wd)?;
        loop {
            names.push(&cur.name);
            match cur.parent {
                Some(p) => cur = self.nodes.get(&p)?,
                None => break,
            }
        }
        let mut path = PathBuf::with_capacity(names.iter().map(|n| n.len() + 1).sum());
        for name in names.iter().rev() {
            path.push(name);
        }
        Some(path)
    }

    /// Whether `wd` is `ancestor` or lies below it.
    fn is_within(&self, mut wd: i32, ancestor: i32) -> bool {
        loop {
            if wd == ancestor {
                return true;
            }
            match self.nodes.get(&wd).and_then(|n| n.parent) {
                Some(p) => wd = p,
                None => return false,
            }
        }
    }

    /// Puts `wd` at `name` in `parent` (a root when `parent` is None, `name` its path),
    /// moving it and its subtree if it is elsewhere. A different watch found at that spot
    /// is stale (its directory was replaced) and is dropped with its subtree; those
    /// watches are returned for removal. Returns None, changing nothing, when `parent` is
    /// unknown or lies within `wd` (a bind mount looping back).
    pub(crate) fn place(
        &mut self,
        wd: i32,
        parent: Option<i32>,
        name: OsString,
    ) -> Option<Vec<i32>> {
        if let Some(p) = parent
            && (!self.nodes.contains_key(&p) || self.is_within(p, wd))
        {
            return None;
        }
        if let Some(node) = self.nodes.get(&wd)
            && node.parent == parent
            && node.name == name
        {
            return Some(Vec::new());
        }
        let occupant = match parent {
            Some(p) => self.child(p, &name),
            None => self.roots.get(&name).copied(),
        };
        let displaced = match occupant {
            Some(other) if other != wd => self.remove_subtree(other),
            _ => Vec::new(),
        };
        match self.nodes.get_mut(&wd) {
            Some(node) => {
                let (old_parent, old_name) = (node.parent, std::mem::take(&mut node.name));
                node.parent = parent;
                node.name = name.clone();
                self.unlink(wd, old_parent, &old_name);
            }
            None => {
                self.nodes.insert(
                    wd,
                    Node {
                        parent,
                        name: name.clone(),
                        children: HashMap::new(),
                    },
                );
            }
        }
        match parent.and_then(|p| self.nodes.get_mut(&p)) {
            Some(p) => {
                p.children.insert(name, wd);
            }
            None => {
                self.roots.insert(name, wd);
            }
        }
        Some(displaced)
    }

    /// Removes the link from `parent`/`name` to `wd`, if it is still there.
    fn unlink(&mut self, wd: i32, parent: Option<i32>, name: &OsStr) {
        let links = match parent {
            Some(p) => match self.nodes.get_mut(&p) {
                Some(node) => &mut node.children,
                None => return,
            },
            None => &mut self.roots,
        };
        if links.get(name) == Some(&wd) {
            links.remove(name);
        }
    }

    /// Drops `wd` and everything below it; returns the dropped watches.
    pub(crate) fn remove_subtree(&mut self, wd: i32) -> Vec<i32> {
        let Some(node) = self.nodes.remove(&wd) else {
            return Vec::new();
        };
        self.unlink(wd, node.parent, &node.name);
        let mut removed = vec![wd];
        let mut stack: Vec<i32> = node.children.into_values().collect();
        while let Some(w) = stack.pop() {
            if let Some(n) = self.nodes.remove(&w) {
                removed.push(w);
                stack.extend(n.children.into_values());
            }
        }
        removed
    }

    /// The watch of the root `path` lies in, and the watch of the deepest watched
    /// directory on the way to `path` with the components still missing below it.
    pub(super) fn deepest<'p>(&self, path: &'p Path) -> Option<(i32, Vec<&'p OsStr>)> {
        let (root, rest) = self.roots.iter().find_map(|(name, wd)| {
            let rest = path.strip_prefix(Path::new(name)).ok()?;
            Some((*wd, rest))
        })?;
        let mut cur = root;
        let mut names = rest.components().filter_map(|c| match c {
            Component::Normal(n) => Some(n),
            _ => None,
        });
        for name in names.by_ref() {
            match self.child(cur, name) {
                Some(w) => cur = w,
                None => {
                    let mut missing = vec![name];
                    missing.extend(names);
                    return Some((cur, missing));
                }
            }
        }
        Some((cur, Vec::new()))
    }

    /// The watch of `path`, if it has one.
    #[cfg(test)]
    pub(crate) fn lookup(&self, path: &Path) -> Option<i32> {
        match self.deepest(path)? {
            (wd, missing) if missing.is_empty() => Some(wd),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::ffi::OsStrExt;

    use super::*;

    fn os(s: &str) -> OsString {
        OsString::from(s)
    }

    /// /srv (1) with a (2) holding b (3) holding c (4), and x (5).
    fn sample() -> WatchTree {
        let mut t = WatchTree::default();
        assert_eq!(t.place(1, None, os("/srv")), Some(vec![]));
        assert_eq!(t.place(2, Some(1), os("a")), Some(vec![]));
        assert_eq!(t.place(3, Some(2), os("b")), Some(vec![]));
        assert_eq!(t.place(4, Some(3), os("c")), Some(vec![]));
        assert_eq!(t.place(5, Some(1), os("x")), Some(vec![]));
        t
    }

    fn path(t: &WatchTree, wd: i32) -> Option<String> {
        t.path(wd).map(|p| p.display().to_string())
    }

    #[test]
    fn tree_gives_paths_and_looks_them_up() {
        let t = sample();
        assert_eq!(path(&t, 4).as_deref(), Some("/srv/a/b/c"));
        assert_eq!(path(&t, 1).as_deref(), Some("/srv"));
        assert_eq!(t.lookup(Path::new("/srv/a/b")), Some(3));
        assert_eq!(t.lookup(Path::new("/srv")), Some(1));
        assert_eq!(t.lookup(Path::new("/srv/a/nope")), None);
        assert_eq!(t.lookup(Path::new("/elsewhere")), None);
        let (wd, missing) = t.deepest(Path::new("/srv/a/b/q/r")).unwrap();
        assert_eq!((wd, missing), (3, vec![OsStr::new("q"), OsStr::new("r")]));
        assert!(t.is_root(1) && !t.is_root(2));
    }

    #[test]
    fn renaming_a_subtree_relinks_one_node() {
        let mut t = sample();
        // mv /srv/a /srv/x/z
        assert_eq!(t.place(2, Some(5), os("z")), Some(vec![]));
        assert_eq!(path(&t, 4).as_deref(), Some("/srv/x/z/b/c"));
        assert_eq!(t.child(1, OsStr::new("a")), None);
        assert_eq!(t.lookup(Path::new("/srv/x/z/b")), Some(3));
        assert_eq!(t.len(), 5);
    }

    #[test]
    fn renaming_over_a_directory_displaces_it() {
        let mut t = sample();
        // mv /srv/x /srv/a/b: the old b (with c) is replaced.
        let mut displaced = t.place(5, Some(2), os("b")).unwrap();
        displaced.sort();
        assert_eq!(displaced, [3, 4]);
        assert_eq!(path(&t, 5).as_deref(), Some("/srv/a/b"));
        assert!(!t.contains(3) && !t.contains(4));
    }

    #[test]
    fn a_directory_cannot_go_inside_itself() {
        let mut t = sample();
        assert_eq!(t.place(2, Some(4), os("loop")), None);
        assert_eq!(t.place(9, Some(99), os("orphan")), None);
        assert_eq!(path(&t, 2).as_deref(), Some("/srv/a"));
    }

    #[test]
    fn removing_a_subtree_returns_every_watch_in_it() {
        let mut t = sample();
        let mut removed = t.remove_subtree(2);
        removed.sort();
        assert_eq!(removed, [2, 3, 4]);
        assert_eq!(t.len(), 2);
        assert_eq!(t.child(1, OsStr::new("a")), None);
        assert_eq!(t.remove_subtree(2), Vec::<i32>::new());
        // A removed root leaves nothing behind.
        let mut removed = t.remove_subtree(1);
        removed.sort();
        assert_eq!(removed, [1, 5]);
        assert_eq!(t.lookup(Path::new("/srv")), None);
    }

    #[test]
    fn non_utf8_names_survive() {
        let mut t = sample();
        let name = OsStr::from_bytes(b"caf\xe9\n");
        t.place(7, Some(3), name.to_os_string()).unwrap();
        assert_eq!(
            t.path(7).unwrap().as_os_str().as_bytes(),
            b"/srv/a/b/caf\xe9\n"
        );
    }
}
