//! Which source root (group) an absolute path belongs to, and whether it is excluded.
//!
//! Roots live in a trie of path components so that an event anywhere on the filesystem costs
//! one walk down the trie and no allocation. Excludes follow rsync's `--exclude` semantics,
//! because the same strings are handed to rsync: when our reading of a pattern could differ from
//! rsync's, we exclude less (rsync then skips the path itself), never more (that would lose data).
//!
//! The file holds one concept, where a path falls: the root trie and the exclude matcher are
//! the two halves of the one lookup, [`Filter::classify`].

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use hashbrown::{HashMap, HashSet};

/// Index of a source root, in the order roots were added to the [`FilterBuilder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupId(pub usize);

/// Why a set of roots and excludes was rejected.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// The root does not start with `/`.
    #[error("source root {} is not an absolute path", .root.display())]
    NotAbsolute {
        /// The root as given.
        root: PathBuf,
    },
    /// The root has a `.` or `..` component.
    #[error("source root {} is not normalized (it has a `.` or `..` component)", .root.display())]
    NotNormalized {
        /// The root as given.
        root: PathBuf,
    },
    /// The same root was added twice.
    #[error("source root {} is given twice", .root.display())]
    DuplicateRoot {
        /// The repeated root.
        root: PathBuf,
    },
    /// One root lies inside another.
    #[error("source root {} is nested inside source root {}", .inner.display(), .outer.display())]
    NestedRoot {
        /// The root that lies inside `outer`.
        inner: PathBuf,
        /// The root that contains `inner`.
        outer: PathBuf,
    },
    /// An exclude pattern could not be compiled.
    #[error("invalid exclude pattern {pattern:?} for source root {}: {reason}", .root.display())]
    InvalidExclude {
        /// The root the pattern belongs to.
        root: PathBuf,
        /// The pattern as given.
        pattern: String,
        /// What is wrong with it.
        reason: String,
    },
}

#[derive(Debug, Default)]
struct Node {
    children: HashMap<Box<[u8]>, Node>,
    group: Option<GroupId>,
}

#[derive(Debug)]
struct Group {
    root: PathBuf,
    excludes: Excludes,
}

/// Collects source roots and their excludes, then freezes them into a [`Filter`].
#[derive(Debug, Default)]
pub struct FilterBuilder {
    trie: Node,
    groups: Vec<Group>,
}

impl FilterBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a source root (absolute, without `.`/`..`) with its rsync `--exclude` patterns.
    pub fn add_root(&mut self, root: &Path, excludes: &[String]) -> Result<GroupId, FilterError> {
        let compiled = Excludes::compile(excludes).map_err(|e| FilterError::InvalidExclude {
            root: root.to_path_buf(),
            pattern: e.pattern,
            reason: e.reason,
        })?;
        self.add_group(root, compiled)
    }

    /// Adds a source root (absolute, without `.`/`..`) with excludes compiled beforehand
    /// (by the configuration, when it was checked).
    pub fn add_group(&mut self, root: &Path, excludes: Excludes) -> Result<GroupId, FilterError> {
        let bytes = root.as_os_str().as_bytes();
        if !bytes.starts_with(b"/") {
            return Err(FilterError::NotAbsolute {
                root: root.to_path_buf(),
            });
        }
        let segments: Vec<&[u8]> = bytes
            .split(|&b| b == b'/')
            .filter(|s| !s.is_empty())
            .collect();
        // Checked on bytes: `Path::components` silently drops interior `.`.
        if segments.iter().any(|s| *s == b"." || *s == b"..") {
            return Err(FilterError::NotNormalized {
                root: root.to_path_buf(),
            });
        }
        let mut clean = b"/".to_vec();
        clean.extend_from_slice(&segments.join(&b'/'));
        let clean = PathBuf::from(OsStr::from_bytes(&clean));

        self.check_overlap(&clean, &segments)?;

        let id = GroupId(self.groups.len());
        let mut node = &mut self.trie;
        for seg in &segments {
            node = node.children.entry(Box::<[u8]>::from(*seg)).or_default();
        }
        node.group = Some(id);
        self.groups.push(Group {
            root: clean,
            excludes,
        });
        Ok(id)
    }

    fn check_overlap(&self, clean: &Path, segments: &[&[u8]]) -> Result<(), FilterError> {
        let mut node = &self.trie;
        for seg in segments {
            if let Some(g) = node.group {
                return Err(FilterError::NestedRoot {
                    inner: clean.to_path_buf(),
                    outer: self.groups[g.0].root.clone(),
                });
            }
            match node.children.get(*seg) {
                Some(child) => node = child,
                None => return Ok(()),
            }
        }
        if node.group.is_some() {
            return Err(FilterError::DuplicateRoot {
                root: clean.to_path_buf(),
            });
        }
        if let Some(g) = subtree_groups(node).into_iter().next() {
            return Err(FilterError::NestedRoot {
                inner: self.groups[g.0].root.clone(),
                outer: clean.to_path_buf(),
            });
        }
        Ok(())
    }

    /// Freezes the roots into an immutable [`Filter`].
    pub fn build(self) -> Result<Filter, FilterError> {
        Ok(Filter {
            trie: self.trie,
            groups: self.groups,
        })
    }
}

/// Where a path falls: in a root, in a root but excluded, or outside every root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Match<'p> {
    Inside(GroupId, &'p Path),
    Excluded(GroupId, &'p Path),
    Outside,
}

/// Immutable map from absolute paths to source roots; cheap to query.
#[derive(Debug)]
pub struct Filter {
    trie: Node,
    groups: Vec<Group>,
}

impl Filter {
    /// One walk down the trie: which group `path` (absolute) belongs to and its path relative to that root ("" for the root itself), or None when outside every root or excluded.
    pub fn lookup<'p>(&self, path: &'p Path, is_dir: bool) -> Option<(GroupId, &'p Path)> {
        match self.classify(path, is_dir) {
            Match::Inside(g, rel) => Some((g, rel)),
            Match::Excluded(..) | Match::Outside => None,
        }
    }

    /// Like [`lookup`](Self::lookup), but tells an excluded path inside a root (whose parent
    /// directory still changes when it comes and goes) from a path outside every root.
    pub fn classify<'p>(&self, path: &'p Path, is_dir: bool) -> Match<'p> {
        let mut comps = path.components();
        if comps.next() != Some(Component::RootDir) {
            return Match::Outside;
        }
        let mut node = &self.trie;
        loop {
            if let Some(g) = node.group {
                let rel = comps.as_path();
                let accepted = self.groups[g.0]
                    .excludes
                    .accepts(rel.as_os_str().as_bytes(), is_dir);
                return if accepted {
                    Match::Inside(g, rel)
                } else {
                    Match::Excluded(g, rel)
                };
            }
            let child = match comps.next() {
                Some(Component::Normal(name)) => node.children.get(name.as_bytes()),
                // `..` could climb out of the root; `.` never appears mid-path here.
                _ => None,
            };
            match child {
                Some(child) => node = child,
                None => return Match::Outside,
            }
        }
    }

    /// The normalized root of group `g` (panics on an id this filter did not hand out).
    pub fn root(&self, g: GroupId) -> &Path {
        &self.groups[g.0].root
    }

    /// All groups, in the order their roots were added.
    pub fn groups(&self) -> impl Iterator<Item = GroupId> {
        (0..self.groups.len()).map(GroupId)
    }

    /// Groups whose root lies at or below `path` (used when a whole subtree must be rescanned).
    pub fn groups_at_or_below(&self, path: &Path) -> Vec<GroupId> {
        let mut comps = path.components();
        if comps.next() != Some(Component::RootDir) {
            return Vec::new();
        }
        let mut node = &self.trie;
        for comp in comps {
            match comp {
                Component::Normal(name) => {
                    // A root strictly above `path` is not at or below it.
                    if node.group.is_some() {
                        return Vec::new();
                    }
                    match node.children.get(name.as_bytes()) {
                        Some(child) => node = child,
                        None => return Vec::new(),
                    }
                }
                Component::CurDir => {}
                _ => return Vec::new(),
            }
        }
        let mut found = subtree_groups(node);
        found.sort_unstable();
        found
    }

    /// The exclude patterns of group `g` as given, to pass to rsync as `--exclude`.
    pub fn excludes(&self, g: GroupId) -> &[String] {
        self.groups[g.0].excludes.patterns()
    }
}

fn subtree_groups(node: &Node) -> Vec<GroupId> {
    let mut found = Vec::new();
    let mut stack = vec![node];
    while let Some(n) = stack.pop() {
        found.extend(n.group);
        stack.extend(n.children.values());
    }
    found
}

/// The exclude patterns of one root, as given and compiled: checked once (when the
/// configuration is), then cheap to clone into a [`FilterBuilder`].
#[derive(Debug, Clone)]
pub struct Excludes {
    /// The patterns as given, for rsync's `--exclude`.
    patterns: Vec<String>,
    /// Literal patterns without `/`: matched against each component's name.
    names: HashSet<Box<[u8]>>,
    dir_names: HashSet<Box<[u8]>>,
    /// Wildcard patterns without `/` or `**`: matched against each component's name.
    name_globs: GlobSet,
    dir_name_globs: GlobSet,
    /// Everything else: matched against each component prefix of the relative path.
    path_globs: GlobSet,
    dir_path_globs: GlobSet,
    /// Nothing to match: every path is accepted without a lookup.
    no_rules: bool,
    /// Include rules (`+ PAT`) given before every exclude: a component one of them matches
    /// is not excluded, as rsync's first matching rule decides.
    includes: Option<Box<Excludes>>,
}

/// One parsed `--exclude` argument.
enum Parsed {
    /// Nothing to match (empty pattern, or one we cannot mirror exactly).
    Nothing,
    /// rsync's `!`: forget all earlier rules.
    Clear,
    /// rsync's old-style `+ PAT` include prefix.
    Include,
    Name {
        literal: bool,
        pat: String,
        dir_only: bool,
    },
    Path {
        glob: String,
        dir_only: bool,
    },
}

/// An exclude pattern that cannot be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid exclude pattern {pattern:?}: {reason}")]
pub struct ExcludeError {
    /// Its position among the patterns; `None` when the set as a whole failed.
    pub index: Option<usize>,
    /// The pattern (all of them, joined by spaces, when `index` is `None`).
    pub pattern: String,
    /// What is wrong with it.
    pub reason: String,
}

impl Excludes {
    /// Parses and compiles rsync `--exclude` patterns the way the filter applies them.
    pub fn compile(patterns: &[String]) -> Result<Self, ExcludeError> {
        let mut parsed = Vec::new();
        // rsync stops at the first matching rule, so an include may rescue a path from any
        // later exclude. Includes that come before every exclude (the `include` key's) are
        // matched first, as rsync does; after an include that follows an exclude, later
        // rules are dropped (until a clear), which only ever excludes less than rsync does.
        let mut after_include = false;
        let mut leading_includes: Vec<(usize, String)> = Vec::new();
        for (index, pat) in patterns.iter().enumerate() {
            let rule = parse_rule(pat).map_err(|reason| ExcludeError {
                index: Some(index),
                pattern: pat.clone(),
                reason,
            })?;
            match rule {
                Parsed::Clear => {
                    parsed.clear();
                    leading_includes.clear();
                    after_include = false;
                }
                Parsed::Include if parsed.is_empty() && !after_include => {
                    let body = pat.strip_prefix("+ ").unwrap_or(pat);
                    leading_includes.push((index, body.to_owned()));
                }
                Parsed::Include => after_include = true,
                Parsed::Nothing => {}
                rule if !after_include => parsed.push((index, pat, rule)),
                _ => {}
            }
        }
        let includes = if leading_includes.is_empty() {
            None
        } else {
            let bodies: Vec<String> = leading_includes.iter().map(|(_, b)| b.clone()).collect();
            let compiled = Excludes::compile(&bodies).map_err(|e| ExcludeError {
                index: e.index.map(|i| leading_includes[i].0),
                ..e
            })?;
            Some(Box::new(compiled))
        };

        let mut names = HashSet::new();
        let mut dir_names = HashSet::new();
        let mut name_globs = GlobSetBuilder::new();
        let mut dir_name_globs = GlobSetBuilder::new();
        let mut path_globs = GlobSetBuilder::new();
        let mut dir_path_globs = GlobSetBuilder::new();
        let no_rules = parsed.is_empty();
        for (index, raw, rule) in parsed {
            let glob_err = |e: globset::Error| ExcludeError {
                index: Some(index),
                pattern: raw.clone(),
                reason: e.kind().to_string(),
            };
            match rule {
                Parsed::Name {
                    literal: true,
                    pat,
                    dir_only,
                } => {
                    let set = if dir_only { &mut dir_names } else { &mut names };
                    set.insert(Box::<[u8]>::from(pat.as_bytes()));
                }
                Parsed::Name {
                    literal: false,
                    pat,
                    dir_only,
                } => {
                    let set = if dir_only {
                        &mut dir_name_globs
                    } else {
                        &mut name_globs
                    };
                    set.add(glob(&pat).map_err(glob_err)?);
                }
                Parsed::Path {
                    glob: pat,
                    dir_only,
                } => {
                    let set = if dir_only {
                        &mut dir_path_globs
                    } else {
                        &mut path_globs
                    };
                    set.add(glob(&pat).map_err(glob_err)?);
                }
                Parsed::Nothing | Parsed::Clear | Parsed::Include => {}
            }
        }
        let build = |b: GlobSetBuilder| {
            b.build().map_err(|e| ExcludeError {
                index: None,
                pattern: patterns.join(" "),
                reason: e.to_string(),
            })
        };
        Ok(Self {
            patterns: patterns.to_vec(),
            names,
            dir_names,
            name_globs: build(name_globs)?,
            dir_name_globs: build(dir_name_globs)?,
            path_globs: build(path_globs)?,
            dir_path_globs: build(dir_path_globs)?,
            no_rules,
            includes,
        })
    }

    /// The patterns as given.
    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    /// True when there are no patterns.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// False when `rel` is excluded or could climb out of the root with `..`.
    fn accepts(&self, rel: &[u8], is_dir: bool) -> bool {
        let end = rel.iter().rposition(|&b| b != b'/').map_or(0, |i| i + 1);
        let rel = &rel[..end];
        let mut start = 0;
        while start < rel.len() {
            let stop = rel[start..]
                .iter()
                .position(|&b| b == b'/')
                .map_or(rel.len(), |i| start + i);
            let name = &rel[start..stop];
            if name == b".." {
                return false;
            }
            // rsync visits every directory on the way down and never enters an excluded one;
            // every component but the last is a directory.
            if !name.is_empty() && !self.no_rules {
                let dir = is_dir || stop < rel.len();
                let included = self
                    .includes
                    .as_ref()
                    .is_some_and(|i| i.matches(name, &rel[..stop], dir));
                if !included && self.matches(name, &rel[..stop], dir) {
                    return false;
                }
            }
            start = stop + 1;
        }
        true
    }

    fn matches(&self, name: &[u8], prefix: &[u8], dir: bool) -> bool {
        let name_path = Path::new(OsStr::from_bytes(name));
        let prefix_path = Path::new(OsStr::from_bytes(prefix));
        self.names.contains(name)
            || (dir && self.dir_names.contains(name))
            || (!self.name_globs.is_empty() && self.name_globs.is_match(name_path))
            || (dir && !self.dir_name_globs.is_empty() && self.dir_name_globs.is_match(name_path))
            || (!self.path_globs.is_empty() && self.path_globs.is_match(prefix_path))
            || (dir && !self.dir_path_globs.is_empty() && self.dir_path_globs.is_match(prefix_path))
    }
}

fn glob(pat: &str) -> Result<globset::Glob, globset::Error> {
    GlobBuilder::new(pat)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
}

/// Parses one `--exclude` argument the way rsync does (`XFLG_OLD_PREFIXES`, see exclude.c).
fn parse_rule(raw: &str) -> Result<Parsed, String> {
    let pat = if let Some(rest) = raw.strip_prefix("- ") {
        rest
    } else if raw.starts_with("+ ") {
        return Ok(Parsed::Include);
    } else if raw.starts_with('!') {
        // rsync clears the list on a lone `!`; treating any `!...` as a clear excludes less.
        return Ok(Parsed::Clear);
    } else {
        raw
    };
    if pat.is_empty() {
        return Ok(Parsed::Nothing);
    }
    let (pat, mut dir_only) = match pat.strip_suffix('/') {
        Some(p) if !p.is_empty() => (p, true),
        _ => (pat, false),
    };
    let wild = pat.contains(['*', '[', '?']);
    let double = pat.contains("**");
    let anchored = pat.starts_with('/');
    let body = if anchored { &pat[1..] } else { pat };
    if body.is_empty() {
        return Ok(Parsed::Nothing);
    }

    if !pat.contains('/') && !double {
        // Matched against the name of the last component only.
        if !wild {
            return Ok(Parsed::Name {
                literal: true,
                pat: body.to_owned(),
                dir_only,
            });
        }
        return Ok(match translate(body, false)? {
            Some(g) => Parsed::Name {
                literal: false,
                pat: g,
                dir_only,
            },
            None => Parsed::Nothing,
        });
    }

    let mut body = body;
    // `dir/***` matches the directory itself and everything in it.
    if wild && body.len() > 4 && body.ends_with("/***") {
        body = &body[..body.len() - 4];
        dir_only = true;
    }
    let translated = if wild {
        translate(body, anchored)?
    } else {
        Some(escape_literal(body))
    };
    let Some(g) = translated else {
        return Ok(Parsed::Nothing);
    };
    // Unanchored patterns match against the end of the path, i.e. any trailing run of
    // components; a leading `**` already matches from the start (rsync prepends a `/`).
    let glob = if anchored || (wild && body.starts_with("**")) {
        g
    } else {
        format!("**/{g}")
    };
    Ok(Parsed::Path { glob, dir_only })
}

fn push_literal(out: &mut String, c: char) {
    if matches!(c, '*' | '?' | '[' | ']' | '{' | '}' | '\\') {
        out.push('\\');
    }
    out.push(c);
}

fn escape_literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    s.chars().for_each(|c| push_literal(&mut out, c));
    out
}

/// Rewrites an rsync wildcard pattern as a globset glob with the same matches, or with fewer.
/// `None`: the pattern uses syntax we cannot mirror, so it never matches here (rsync still
/// applies it). `Err`: the pattern is malformed.
fn translate(body: &str, anchored: bool) -> Result<Option<String>, String> {
    let chars: Vec<char> = body.chars().collect();
    let mut out = String::with_capacity(body.len() + 8);
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '\\' => {
                // A trailing backslash makes rsync's pattern unmatchable.
                let Some(&c) = chars.get(i + 1) else {
                    return Ok(None);
                };
                push_literal(&mut out, c);
                i += 2;
            }
            '?' => {
                out.push('?');
                i += 1;
            }
            '*' => {
                let start = i;
                while chars.get(i) == Some(&'*') {
                    i += 1;
                }
                if i - start == 1 {
                    out.push('*');
                    continue;
                }
                let prev_slash = if start == 0 {
                    anchored
                } else {
                    chars[start - 1] == '/'
                };
                let bounded_before = start == 0 || chars[start - 1] == '/';
                let next_slash = chars.get(i) == Some(&'/');
                if !(bounded_before && (next_slash || i == chars.len())) {
                    // rsync's `**` inside a name crosses `/`; globset's `*` does not: fewer matches.
                    out.push('*');
                } else if prev_slash && next_slash {
                    // rsync's `/**/` needs at least one component; globset's matches zero.
                    out.push_str("*/**");
                } else {
                    out.push_str("**");
                }
            }
            '[' => match translate_class(&chars, i)? {
                (Some(class), next) => {
                    out.push_str(&class);
                    i = next;
                }
                (None, _) => return Ok(None),
            },
            c => {
                push_literal(&mut out, c);
                i += 1;
            }
        }
    }
    Ok(Some(out))
}

/// Translates the class starting at `chars[open]` (a `[`), with rsync's rules: `!` or `^`
/// negates, a `]` right after the opening is literal, a class never matches `/`.
/// Returns the globset class (None if not mirrored) and the index after the class.
fn translate_class(chars: &[char], open: usize) -> Result<(Option<String>, usize), String> {
    const UNCLOSED: &str = "unclosed character class; missing ']'";
    let mut j = open + 1;
    let negated = matches!(chars.get(j), Some('!' | '^'));
    if negated {
        j += 1;
    }
    let mut items: Vec<(char, char)> = Vec::new();
    let mut mirrored = true;
    let mut prev: Option<char> = None;
    let mut first = true;
    loop {
        let Some(&c) = chars.get(j) else {
            return Err(UNCLOSED.to_owned());
        };
        if c == ']' && !first {
            j += 1;
            break;
        }
        first = false;
        if c == '\\' {
            // rsync escapes inside classes; globset does not.
            mirrored = false;
            j += 2;
            prev = None;
        } else if c == '[' && chars.get(j + 1) == Some(&':') {
            let close = chars[j + 2..]
                .iter()
                .position(|&c| c == ']')
                .map(|k| j + 2 + k);
            let Some(close) = close else {
                return Err(UNCLOSED.to_owned());
            };
            if close > j + 2 && chars[close - 1] == ':' {
                // POSIX classes like `[:digit:]` have no globset equivalent.
                mirrored = false;
                j = close + 1;
                prev = None;
            } else {
                items.push(('[', '['));
                prev = Some('[');
                j += 1;
            }
        } else if let (true, Some(lo), Some(&hi)) = (c == '-', prev, chars.get(j + 1))
            && hi != ']'
        {
            if hi == '\\' {
                mirrored = false;
            } else if lo <= hi {
                items.push((lo, hi));
            }
            j += 2;
            prev = None;
        } else {
            items.push((c, c));
            prev = Some(c);
            j += 1;
        }
    }
    if !mirrored
        || items
            .iter()
            .any(|&(lo, hi)| !lo.is_ascii() || !hi.is_ascii())
    {
        return Ok((None, j));
    }
    // rsync classes never match `/`.
    let spans_slash = |&(lo, hi): &(char, char)| lo <= '/' && '/' <= hi;
    if !negated {
        if items.iter().any(|it| spans_slash(it) && it.0 != it.1) {
            return Ok((None, j));
        }
        items.retain(|it| !spans_slash(it));
        if items.is_empty() {
            return Ok((None, j));
        }
    }
    let special = |c: char| matches!(c, ']' | '-' | '!' | '^' | '[' | '\\');
    if items
        .iter()
        .any(|&(lo, hi)| lo != hi && (special(lo) || special(hi)))
    {
        return Ok((None, j));
    }
    // Order so that globset reads every member literally: `]` first, `!`/`^` never first,
    // `-` last.
    let singles = |pred: &dyn Fn(char) -> bool| {
        items
            .iter()
            .filter(|&&(lo, hi)| lo == hi && pred(lo))
            .map(|&(c, _)| c)
            .collect::<Vec<_>>()
    };
    let mut body = String::new();
    body.extend(singles(&|c| c == ']'));
    for &(lo, hi) in &items {
        if lo != hi {
            body.push(lo);
            body.push('-');
            body.push(hi);
        }
    }
    body.extend(singles(&|c| !matches!(c, ']' | '!' | '^' | '-')));
    let bangs = singles(&|c| matches!(c, '!' | '^'));
    if !negated && body.is_empty() && !bangs.is_empty() {
        return Ok((None, j));
    }
    body.extend(bangs);
    if negated {
        body.push('/');
    }
    body.extend(singles(&|c| c == '-'));
    let class = format!("[{}{body}]", if negated { "!" } else { "" });
    Ok((Some(class), j))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(b: &[u8]) -> &Path {
        Path::new(OsStr::from_bytes(b))
    }

    fn filter(roots: &[(&str, &[&str])]) -> Filter {
        let mut b = FilterBuilder::new();
        for (root, ex) in roots {
            let ex: Vec<String> = ex.iter().map(|s| (*s).to_owned()).collect();
            b.add_root(Path::new(root), &ex).expect("valid root");
        }
        b.build().expect("build")
    }

    type Row<'a> = (
        &'a [(&'a str, &'a [&'a str])],
        &'a [u8],
        bool,
        Option<(usize, &'a [u8])>,
    );

    const DATA: &[(&str, &[&str])] = &[("/srv/data", &[]), ("/home/u", &[])];

    #[test]
    fn lookup_table() {
        let rows: &[Row] = &[
            // outside every root
            (DATA, b"/", true, None),
            (DATA, b"/etc/passwd", false, None),
            (DATA, b"/srv", true, None),
            (DATA, b"/srv/data2", true, None),
            (DATA, b"/srv/data2/x", false, None),
            (DATA, b"/srv/dat", false, None),
            (DATA, b"srv/data/x", false, None),
            (DATA, b"", false, None),
            // the roots themselves and below
            (DATA, b"/srv/data", true, Some((0, b""))),
            (DATA, b"/srv/data/", true, Some((0, b""))),
            (DATA, b"/home/u", true, Some((1, b""))),
            (DATA, b"/srv/data/a", false, Some((0, b"a"))),
            (
                DATA,
                b"/srv/data/a/b/c/d/e/f/g",
                false,
                Some((0, b"a/b/c/d/e/f/g")),
            ),
            (DATA, b"/home/u/.bashrc", false, Some((1, b".bashrc"))),
            (DATA, b"/srv/data/../etc", true, None),
            (DATA, b"/srv/data/a/../../etc", true, None),
            // odd bytes in names
            (DATA, b"/srv/data/\xff\xfe", false, Some((0, b"\xff\xfe"))),
            (DATA, b"/srv/data/a\nb", false, Some((0, b"a\nb"))),
            (DATA, b"/srv/data/a b/c d", false, Some((0, b"a b/c d"))),
            (DATA, b"/srv/data/-rf", false, Some((0, b"-rf"))),
            (&[("/", &["/proc"])], b"/etc", true, Some((0, b"etc"))),
            (&[("/", &["/proc"])], b"/proc/1", false, None),
            (&[("/", &["/proc"])], b"/", true, Some((0, b""))),
            (
                &[("/srv/\u{e9}", &[])],
                "/srv/\u{e9}/x".as_bytes(),
                false,
                Some((0, b"x")),
            ),
            // name patterns: any component at any depth
            (&[("/r", &["*.swp"])], b"/r/a.swp", false, None),
            (&[("/r", &["*.swp"])], b"/r/d/e/a.swp", false, None),
            (&[("/r", &["*.swp"])], b"/r/a.swp/inner", false, None),
            (
                &[("/r", &["*.swp"])],
                b"/r/a.swpx",
                false,
                Some((0, b"a.swpx")),
            ),
            (&[("/r", &["*.swp"])], b"/r/\xff.swp", false, None),
            (&[("/r", &["node_modules"])], b"/r/node_modules", true, None),
            (
                &[("/r", &["node_modules"])],
                b"/r/x/node_modules/y/z.js",
                false,
                None,
            ),
            (
                &[("/r", &["node_modules"])],
                b"/r/node_modules_x/y",
                false,
                Some((0, b"node_modules_x/y")),
            ),
            (&[("/r", &["*"])], b"/r", true, Some((0, b""))),
            (&[("/r", &["*"])], b"/r/x", false, None),
            (&[("/r", &["a?c"])], b"/r/abc", false, None),
            (
                &[("/r", &["a?c"])],
                "/r/a\u{e9}c".as_bytes(),
                false,
                Some((0, "a\u{e9}c".as_bytes())),
            ),
            (&[("/r", &["*.[ch]"])], b"/r/x.c", false, None),
            (&[("/r", &["*.[ch]"])], b"/r/x.o", false, Some((0, b"x.o"))),
            (&[("/r", &["[!a]*"])], b"/r/b", false, None),
            (&[("/r", &["[!a]*"])], b"/r/a", false, Some((0, b"a"))),
            (&[("/r", &["{a,b}"])], b"/r/a", false, Some((0, b"a"))),
            (&[("/r", &["{a,b}"])], b"/r/{a,b}", false, None),
            (&[("/r", &["a\\b"])], b"/r/a\\b", false, None),
            (&[("/r", &["a\\*"])], b"/r/a*", false, None),
            (&[("/r", &["a\\*"])], b"/r/ab", false, Some((0, b"ab"))),
            (&[("/r", &["-x"])], b"/r/-x", false, None),
            (&[("/r", &["a b"])], b"/r/a b", false, None),
            (&[("/r", &["a\nb"])], b"/r/d/a\nb", false, None),
            // trailing slash: directories only
            (&[("/r", &[".cache/"])], b"/r/.cache", true, None),
            (
                &[("/r", &[".cache/"])],
                b"/r/.cache",
                false,
                Some((0, b".cache")),
            ),
            (&[("/r", &[".cache/"])], b"/r/.cache/x", false, None),
            (&[("/r", &[".cache/"])], b"/r/a/.cache/x", false, None),
            (&[("/r", &["*.d/"])], b"/r/x.d", false, Some((0, b"x.d"))),
            (&[("/r", &["*.d/"])], b"/r/x.d", true, None),
            // leading slash: anchored at the root
            (&[("/r", &["/build"])], b"/r/build", true, None),
            (&[("/r", &["/build"])], b"/r/build", false, None),
            (&[("/r", &["/build"])], b"/r/build/x/y", false, None),
            (
                &[("/r", &["/build"])],
                b"/r/src/build",
                true,
                Some((0, b"src/build")),
            ),
            (
                &[("/r", &["/build"])],
                b"/r/builds",
                true,
                Some((0, b"builds")),
            ),
            (
                &[("/r", &["/build/"])],
                b"/r/build",
                false,
                Some((0, b"build")),
            ),
            (&[("/r", &["/a/b"])], b"/r/a/b/c", false, None),
            (
                &[("/r", &["/a/b"])],
                b"/r/x/a/b",
                false,
                Some((0, b"x/a/b")),
            ),
            (&[("/r", &["/*.log"])], b"/r/x.log", false, None),
            (
                &[("/r", &["/*.log"])],
                b"/r/d/x.log",
                false,
                Some((0, b"d/x.log")),
            ),
            (&[("/r", &["/"])], b"/r/x", false, Some((0, b"x"))),
            // inner slash: a trailing run of components
            (&[("/r", &["docs/*.tmp"])], b"/r/docs/a.tmp", false, None),
            (&[("/r", &["docs/*.tmp"])], b"/r/x/docs/a.tmp", false, None),
            (
                &[("/r", &["docs/*.tmp"])],
                b"/r/docs/sub/a.tmp",
                false,
                Some((0, b"docs/sub/a.tmp")),
            ),
            (
                &[("/r", &["docs/*.tmp"])],
                b"/r/mydocs/a.tmp",
                false,
                Some((0, b"mydocs/a.tmp")),
            ),
            (&[("/r", &["a/b"])], b"/r/x/a/b/c", false, None),
            (&[("/r", &["a/b"])], b"/r/xa/b", false, Some((0, b"xa/b"))),
            (&[("/r", &["a/b/"])], b"/r/a/b", false, Some((0, b"a/b"))),
            (&[("/r", &["a/b/"])], b"/r/a/b", true, None),
            // `**`
            (&[("/r", &["**/tmp"])], b"/r/tmp", false, None),
            (&[("/r", &["**/tmp"])], b"/r/a/b/tmp", false, None),
            (&[("/r", &["a/**/z"])], b"/r/a/b/c/z", false, None),
            (&[("/r", &["a/**/z"])], b"/r/q/a/b/z", false, None),
            (&[("/r", &["a/**/z"])], b"/r/a/z", false, Some((0, b"a/z"))),
            (&[("/r", &["/**/z"])], b"/r/z", false, Some((0, b"z"))),
            (&[("/r", &["/**/z"])], b"/r/y/z", false, None),
            (&[("/r", &["out/**"])], b"/r/out", true, Some((0, b"out"))),
            (&[("/r", &["out/**"])], b"/r/out/x", false, None),
            (&[("/r", &["out/***"])], b"/r/out", true, None),
            (&[("/r", &["out/***"])], b"/r/out", false, Some((0, b"out"))),
            (&[("/r", &["out/***"])], b"/r/d/out/x", false, None),
            (&[("/r", &["**"])], b"/r", true, Some((0, b""))),
            (&[("/r", &["**"])], b"/r/x", false, None),
            // classes never match `/`
            (&[("/r", &["a[!x]b"])], b"/r/a/b", false, Some((0, b"a/b"))),
            (&[("/r", &["a[!x]b"])], b"/r/ayb", false, None),
            (
                &[("/r", &["d/a[!x]b"])],
                b"/r/d/a/b",
                false,
                Some((0, b"d/a/b")),
            ),
            (&[("/r", &["d/a[!x]b"])], b"/r/d/ayb", false, None),
            (
                &[("/r", &["d/a?b"])],
                b"/r/d/a/b",
                false,
                Some((0, b"d/a/b")),
            ),
            // rsync prefixes and list clearing
            (&[("/r", &["- x"])], b"/r/x", false, None),
            (
                &[("/r", &["+ keep", "*"])],
                b"/r/keep",
                false,
                Some((0, b"keep")),
            ),
            // Leading includes are matched first, as rsync does: the rest is excluded.
            (&[("/r", &["+ keep", "*"])], b"/r/other", false, None),
            (&[("/r", &["a", "+ b", "*"])], b"/r/a", false, None),
            (&[("/r", &["a", "!", "b"])], b"/r/a", false, Some((0, b"a"))),
            (&[("/r", &["a", "!", "b"])], b"/r/b", false, None),
            // unsupported syntax never excludes here
            (&[("/r", &["[[:digit:]]"])], b"/r/1", false, Some((0, b"1"))),
            (&[("/r", &["[\\]]"])], b"/r/]", false, Some((0, b"]"))),
            // excludes of one root do not leak into another
            (
                &[("/r", &["x"]), ("/s", &[])],
                b"/s/x",
                false,
                Some((1, b"x")),
            ),
        ];
        for (i, (roots, path, is_dir, want)) in rows.iter().enumerate() {
            let f = filter(roots);
            let got = f.lookup(p(path), *is_dir);
            let got = got.map(|(g, rel)| (g.0, rel.as_os_str().as_bytes()));
            assert_eq!(
                got,
                *want,
                "row {i}: roots {roots:?} path {:?} is_dir {is_dir}",
                String::from_utf8_lossy(path)
            );
        }
    }

    #[test]
    fn non_utf8_root() {
        let mut fb = FilterBuilder::new();
        let g = fb
            .add_root(p(b"/srv/\xff\n"), &["\u{e9}*".to_owned()])
            .expect("root");
        let f = fb.build().expect("build");
        assert_eq!(f.root(g), p(b"/srv/\xff\n"));
        assert_eq!(
            f.lookup(p(b"/srv/\xff\n/a\xfe"), false),
            Some((g, p(b"a\xfe")))
        );
        assert_eq!(f.lookup(p("/srv/\u{ff}\n/x".as_bytes()), false), None);
        assert_eq!(f.lookup(p(b"/srv/\xff\n/d/\xc3\xa9\xff"), false), None);
        assert_eq!(f.groups_at_or_below(p(b"/srv")), vec![g]);
    }

    #[test]
    fn rel_borrows_from_input() {
        let f = filter(DATA);
        let path = p(b"/srv/data/a/b");
        let (_, rel) = f.lookup(path, false).expect("inside");
        let base = path.as_os_str().as_bytes().as_ptr() as usize;
        let at = rel.as_os_str().as_bytes().as_ptr() as usize;
        assert_eq!(at, base + b"/srv/data/".len());
    }

    #[test]
    fn root_errors() {
        let nested = |a: &str, b: &str| {
            let mut fb = FilterBuilder::new();
            fb.add_root(Path::new(a), &[]).expect("first root");
            fb.add_root(Path::new(b), &[])
                .expect_err("overlap")
                .to_string()
        };
        let msg = nested("/srv/data", "/srv/data/sub");
        assert!(
            msg.contains("/srv/data/sub") && msg.contains("nested inside source root /srv/data"),
            "{msg}"
        );
        let msg = nested("/srv/data/sub", "/srv/data");
        assert!(
            msg.contains("source root /srv/data/sub is nested inside source root /srv/data"),
            "{msg}"
        );
        let msg = nested("/srv/data", "/srv/data/");
        assert!(msg.contains("/srv/data") && msg.contains("twice"), "{msg}");
        let msg = nested("/", "/srv");
        assert!(msg.contains("nested"), "{msg}");
        // siblings and prefixes that are not components are fine
        let f = filter(&[("/srv/data", &[]), ("/srv/data2", &[]), ("/srv/dat", &[])]);
        assert_eq!(f.groups().count(), 3);

        let mut fb = FilterBuilder::new();
        for bad in ["relative/x", "/a/./b", "/a/../b", "/a/.", ""] {
            let err = fb.add_root(Path::new(bad), &[]).expect_err(bad);
            assert!(
                matches!(
                    err,
                    FilterError::NotAbsolute { .. } | FilterError::NotNormalized { .. }
                ),
                "{bad}: {err}"
            );
        }
        assert_eq!(fb.build().expect("build").groups().count(), 0);
    }

    #[test]
    fn invalid_glob_names_pattern() {
        let mut fb = FilterBuilder::new();
        let ex = vec!["ok".to_owned(), "*.[ch".to_owned()];
        let err = fb
            .add_root(Path::new("/r"), &ex)
            .expect_err("unclosed class");
        let msg = err.to_string();
        assert!(msg.contains("\"*.[ch\"") && msg.contains("/r"), "{msg}");
        // a failed root leaves the builder usable
        fb.add_root(Path::new("/r"), &[]).expect("root after error");
    }

    #[test]
    fn compile_errors_name_the_pattern_and_its_index() {
        let ex = vec!["ok".to_owned(), "*.[ch".to_owned()];
        let err = Excludes::compile(&ex).expect_err("unclosed class");
        assert_eq!(err.index, Some(1));
        assert_eq!(err.pattern, "*.[ch");
        let ok = Excludes::compile(&ex[..1]).expect("valid");
        assert_eq!(ok.patterns(), ["ok"]);
        let mut fb = FilterBuilder::new();
        let g = fb.add_group(Path::new("/r"), ok).expect("root");
        let f = fb.build().expect("build");
        assert_eq!(f.excludes(g), ["ok"]);
        assert_eq!(f.lookup(Path::new("/r/a/ok"), false), None);
        assert!(f.lookup(Path::new("/r/a/b"), false).is_some());
    }

    #[test]
    fn accessors() {
        let f = filter(&[
            ("/srv//data/", &["*.swp", "/build"]),
            ("/home/u", &[]),
            ("/home/v", &[]),
        ]);
        let ids: Vec<GroupId> = f.groups().collect();
        assert_eq!(ids, vec![GroupId(0), GroupId(1), GroupId(2)]);
        assert_eq!(f.root(GroupId(0)), Path::new("/srv/data"));
        assert_eq!(
            f.excludes(GroupId(0)),
            ["*.swp".to_owned(), "/build".to_owned()]
        );
        assert!(f.excludes(GroupId(1)).is_empty());
        assert_eq!(f.groups_at_or_below(Path::new("/")), ids);
        assert_eq!(
            f.groups_at_or_below(Path::new("/home")),
            vec![GroupId(1), GroupId(2)]
        );
        assert_eq!(f.groups_at_or_below(Path::new("/home/u")), vec![GroupId(1)]);
        assert_eq!(f.groups_at_or_below(Path::new("/home/u/x")), vec![]);
        assert_eq!(f.groups_at_or_below(Path::new("/hom")), vec![]);
        assert_eq!(f.groups_at_or_below(Path::new("/etc")), vec![]);
        assert_eq!(f.groups_at_or_below(Path::new("home")), vec![]);
    }

    #[test]
    fn includes_before_the_excludes_are_matched_first() {
        let pats = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // rsync's "only .txt files": every directory and every .txt, nothing else.
        let only_txt = Excludes::compile(&pats(&["+ */", "+ *.txt", "*"])).unwrap();
        for (rel, is_dir, kept) in [
            ("a.txt", false, true),
            ("a.bin", false, false),
            ("d", true, true),
            ("d/e/x.txt", false, true),
            ("d/e/x.bin", false, false),
        ] {
            assert_eq!(only_txt.accepts(rel.as_bytes(), is_dir), kept, "{rel}");
        }
        // A directory an include does not rescue stays excluded with all it holds, as
        // rsync never enters it.
        let keep_logs = Excludes::compile(&pats(&["+ *.log", "tmp/"])).unwrap();
        assert!(keep_logs.accepts(b"a.log", false));
        assert!(!keep_logs.accepts(b"tmp/a.log", false));
        assert!(!keep_logs.accepts(b"tmp", true));
        // An include after an exclude: the rules after it are not applied (less is
        // excluded here than by rsync, never more).
        let late = Excludes::compile(&pats(&["*.o", "+ keep.o", "*.tmp"])).unwrap();
        assert!(!late.accepts(b"x.o", false));
        assert!(late.accepts(b"x.tmp", false));
        // A clear forgets the includes too.
        let cleared = Excludes::compile(&pats(&["+ *.txt", "!", "*"])).unwrap();
        assert!(!cleared.accepts(b"a.txt", false));
    }

    #[test]
    fn classify_tells_excluded_from_outside() {
        let mut b = FilterBuilder::new();
        let g = b
            .add_root(Path::new("/srv/data"), &["*.swp".into()])
            .unwrap();
        let f = b.build().unwrap();
        assert_eq!(
            f.classify(Path::new("/srv/data/d/x.swp"), false),
            Match::Excluded(g, Path::new("d/x.swp"))
        );
        assert_eq!(
            f.classify(Path::new("/srv/data/d/x"), false),
            Match::Inside(g, Path::new("d/x"))
        );
        assert_eq!(
            f.classify(Path::new("/srv/other/x.swp"), false),
            Match::Outside
        );
        assert_eq!(f.classify(Path::new("relative"), false), Match::Outside);
    }
}
