//! How a configuration error is reported: the file, the 1-based line (and column for
//! syntax errors) and the dotted key (`sync[0].target[1].dest`), found from the byte span
//! the TOML parser recorded for the offending key or value.

use std::fmt::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};

/// Why a configuration file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file does not exist.
    #[error("config file {} does not exist", .path.display())]
    NotFound {
        /// The file asked for.
        path: PathBuf,
    },
    /// The file exists but could not be read.
    #[error("cannot read config file {}", .path.display())]
    Read {
        /// The file asked for.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// The file is writable by group or others, who could then make the daemon copy or
    /// delete anything.
    #[error(
        "config file {} is writable by group or others (mode {mode:04o}): whoever can edit it controls what the daemon copies and deletes; fix it with `chmod 600 {}`",
        .path.display(),
        .path.display()
    )]
    Permissions {
        /// The config file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A syntax error, a wrong or unknown key, or a value that fails a check.
    #[error("{}", located(.path, *.line, *.column, .key, .message))]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// 1-based line of the offending key or value.
        line: usize,
        /// 1-based column (in characters), given for syntax errors.
        column: Option<usize>,
        /// Dotted path of the key, e.g. `sync[0].target[1].password_file`; empty when a
        /// syntax error cannot be placed under a key.
        key: String,
        /// What is wrong and, where there is one, how to fix it.
        message: String,
    },
}

fn located(path: &Path, line: usize, column: Option<usize>, key: &str, message: &str) -> String {
    let mut text = format!("{}:{line}", path.display());
    if let Some(column) = column {
        let _ = write!(text, ":{column}");
    }
    text.push_str(": ");
    if !key.is_empty() {
        text.push_str(key);
        text.push_str(": ");
    }
    text.push_str(message);
    text
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub(super) fn position(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// The dotted key path of the most specific key, value or array element covering `span`.
pub(super) fn key_at(table: &DeTable<'_>, span: &Range<usize>) -> Option<String> {
    let mut walk = Walk::new(span.start);
    walk.table(table, "", 0);
    walk.best.map(|b| b.path)
}

/// The dotted key path of a key the parser found twice at `span`: the table of the key
/// written last before it, and the key as written.
pub(super) fn duplicate_key(
    table: &DeTable<'_>,
    text: &str,
    span: &Range<usize>,
) -> Option<String> {
    let mut walk = Walk::new(span.start);
    walk.table(table, "", 0);
    let written = text.get(span.clone())?.trim();
    let written = written.trim_matches(|c| c == '"' || c == '\'');
    let prefix = walk.before.map(|(_, prefix)| prefix).unwrap_or_default();
    Some(join_key(&prefix, written))
}

/// Collects, for one offset, the most specific node covering it and the table of the last
/// key before it.
struct Walk {
    offset: usize,
    best: Option<Best>,
    before: Option<(usize, String)>,
}

struct Best {
    len: usize,
    depth: usize,
    path: String,
}

impl Walk {
    fn new(offset: usize) -> Self {
        Walk {
            offset,
            best: None,
            before: None,
        }
    }

    fn consider(&mut self, span: Range<usize>, path: &str, depth: usize) {
        let offset = self.offset;
        let covers = span.start <= offset
            && (offset < span.end || (span.is_empty() && offset == span.start));
        if !covers {
            return;
        }
        let len = span.len();
        let better = self
            .best
            .as_ref()
            .is_none_or(|b| len < b.len || (len == b.len && depth > b.depth));
        if better {
            self.best = Some(Best {
                len,
                depth,
                path: path.to_owned(),
            });
        }
    }

    fn table(&mut self, table: &DeTable<'_>, prefix: &str, depth: usize) {
        for (key, value) in table {
            let path = join_key(prefix, key.get_ref());
            let start = key.span().start;
            if key.span().end <= self.offset && self.before.as_ref().is_none_or(|b| b.0 < start) {
                self.before = Some((start, prefix.to_owned()));
            }
            self.consider(key.span(), &path, depth);
            self.consider(value.span(), &path, depth);
            self.value(value.get_ref(), &path, depth + 1);
        }
    }

    fn value(&mut self, value: &DeValue<'_>, path: &str, depth: usize) {
        match value {
            DeValue::Table(table) => self.table(table, path, depth),
            DeValue::Array(array) => {
                for (i, element) in array.iter().enumerate() {
                    let path = format!("{path}[{i}]");
                    self.consider(element.span(), &path, depth);
                    self.value(element.get_ref(), &path, depth + 1);
                }
            }
            _ => {}
        }
    }
}

pub(super) fn join_key(prefix: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    let key = if bare {
        key.to_owned()
    } else {
        format!("{key:?}")
    };
    if prefix.is_empty() {
        key
    } else {
        format!("{prefix}.{key}")
    }
}

/// Rewrites a deserializer message in the file's terms; returns the key and the message.
pub(super) fn explain(key: String, message: &str) -> (String, String) {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        // "unknown field `x`, expected one of `a`, `b`" or "..., there are no fields"
        let known: Vec<&str> = rest.split('`').skip(2).step_by(2).collect();
        let unknown = rest.split('`').next().unwrap_or_default();
        let text = match closest(unknown, &known) {
            Some(close) => format!("unknown key `{unknown}`; did you mean `{close}`?"),
            None if known.is_empty() => format!("unknown key `{unknown}`"),
            None => format!("unknown key `{unknown}`; known keys: {}", known.join(", ")),
        };
        return (key, text);
    }
    if let Some(rest) = message.strip_prefix("missing field `") {
        let field = rest.trim_end_matches('`');
        let key = if key.is_empty() {
            field.to_owned()
        } else {
            format!("{key}.{field}")
        };
        return (key, "required key is missing".to_owned());
    }
    if let Some(rest) = message.strip_prefix("invalid type: ")
        && let Some((got, expected)) = rest.split_once(", expected ")
    {
        let expected = match expected {
            "i64" | "u64" | "i32" | "u32" | "usize" => "a non-negative integer",
            "a boolean" => "true or false",
            "a sequence" => "an array",
            s if s.starts_with("struct ") => "a table",
            s => s,
        };
        let got = match got {
            "map" => "table",
            "sequence" => "array",
            got => got,
        };
        return (key, format!("expected {expected}, got {got}"));
    }
    (key, message.to_owned())
}

/// The known key closest to `unknown`, if it is close enough to be a typo.
pub(super) fn closest<'k>(unknown: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (edit_distance(unknown, k), *k))
        .filter(|(d, k)| {
            *d <= 2.max(k.len() / 3)
                || (unknown.len() >= 3 && (k.starts_with(unknown) || unknown.starts_with(k)))
        })
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Levenshtein distance, in characters.
pub(super) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != *cb))
                .min(above + 1)
                .min(row[j] + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}
