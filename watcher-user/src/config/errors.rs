//! How a configuration error is reported: the file, the 1-based line (and column for
//! syntax errors) and the dotted key (`sync[0].target[1].dest`), found from the byte span
//! the TOML parser recorded for the offending key or value.
//!
//! The parsed document is read into the schema by [`read`], a serde deserializer over the
//! parser's spanned tree: it knows the span and key of every value it hands out, and serde
//! tells it what went wrong through typed calls (an unknown field and the known ones, a
//! missing field, a wrong type), so no error is recovered by reading the text of a
//! message, which a toml or serde upgrade may reword.

use std::fmt::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Visitor};
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
    /// The file, or the directory it is in, belongs to a user other than root or the
    /// daemon's own, or the directory is writable by others: they could rewrite it.
    #[error(
        "config file {}: {reason}: whoever can change it controls what the daemon runs, copies and deletes",
        .path.display()
    )]
    Untrusted {
        /// The config file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// A command-line value that fails the check of the configuration key it stands for.
    #[error("{option}: {message}")]
    CommandLine {
        /// The option (`--max-batch`) or argument (`SOURCE`) that gave the value.
        option: String,
        /// What is wrong, as the same value in the file would be told.
        message: String,
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
    /// Several independent errors (in different tables or keys), one per line, so that
    /// one `config check` shows them all.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Several(Vec<ConfigError>),
}

impl ConfigError {
    /// The one error of `errors`, [`ConfigError::Several`] when there are more, None for
    /// none. A [`ConfigError::Several`] among them is spread out, so the list is flat:
    /// one error per line, the first one a single error.
    pub fn all(errors: Vec<ConfigError>) -> Option<ConfigError> {
        let mut errors: Vec<ConfigError> = errors
            .into_iter()
            .flat_map(|e| match e {
                ConfigError::Several(inner) => inner,
                e => vec![e],
            })
            .collect();
        match errors.len() {
            0 => None,
            1 => errors.pop(),
            _ => Some(ConfigError::Several(errors)),
        }
    }
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

/// The dotted key a syntax error at `span` is about. A key the table already holds,
/// written again (the parser's duplicate key, which is not in the tree), is named under
/// that table; otherwise the most specific key, value or array element covering `span`.
pub(super) fn syntax_error_key(
    table: &DeTable<'_>,
    text: &str,
    span: &Range<usize>,
) -> Option<String> {
    let written = text
        .get(span.clone())
        .map(|w| w.trim().trim_matches(|c| c == '"' || c == '\''))
        .filter(|w| !w.is_empty());
    let mut walk = Walk::new(span.start, written);
    walk.table(table, "", 0);
    if let (Some(written), Some((_, prefix, true))) = (written, &walk.before) {
        return Some(join_key(prefix, written));
    }
    walk.best.map(|b| b.path)
}

/// Collects, for one offset, the most specific node covering it and the table of the last
/// key before it (its start, its dotted path, and whether it holds a key named `written`).
struct Walk<'w> {
    offset: usize,
    written: Option<&'w str>,
    best: Option<Best>,
    before: Option<(usize, String, bool)>,
}

struct Best {
    len: usize,
    depth: usize,
    path: String,
}

impl<'w> Walk<'w> {
    fn new(offset: usize, written: Option<&'w str>) -> Self {
        Walk {
            offset,
            written,
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
                let holds = self
                    .written
                    .is_some_and(|w| table.keys().any(|k| k.get_ref() == w));
                self.before = Some((start, prefix.to_owned(), holds));
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

/// What went wrong reading the document into the schema, in serde's terms.
#[derive(Debug)]
pub(super) enum Problem {
    /// A key the table does not have; `known` lists the keys it has, in schema order.
    UnknownKey {
        key: String,
        known: &'static [&'static str],
    },
    /// A required key is absent (the location names the key, the span its table).
    MissingKey(&'static str),
    /// A value of another TOML type than the key holds.
    WrongType { expected: &'static str, got: String },
    /// Anything else serde reports (a range, a custom check): shown as it is.
    Other(String),
}

/// A [`Problem`] and where it is: the span and dotted key of the innermost part of the
/// document that saw it.
#[derive(Debug)]
pub(super) struct Misfit {
    pub(super) problem: Problem,
    pub(super) at: Option<(Range<usize>, String)>,
}

impl Misfit {
    fn new(problem: Problem) -> Self {
        Misfit { problem, at: None }
    }

    /// Places the misfit at `span` and `key` unless something deeper already did.
    fn at(mut self, span: &Range<usize>, key: &str) -> Self {
        if self.at.is_none() {
            let key = match &self.problem {
                Problem::MissingKey(field) => join_key(key, field),
                _ => key.to_owned(),
            };
            self.at = Some((span.clone(), key));
        }
        self
    }

    /// What is wrong, in the file's terms.
    pub(super) fn message(&self) -> String {
        match &self.problem {
            Problem::UnknownKey { key, known } => match closest(key, known) {
                Some(close) => format!("unknown key `{key}`; did you mean `{close}`?"),
                None if known.is_empty() => format!("unknown key `{key}`"),
                None => format!("unknown key `{key}`; known keys: {}", known.join(", ")),
            },
            Problem::MissingKey(_) => "required key is missing".to_owned(),
            Problem::WrongType { expected, got } => format!("expected {expected}, got {got}"),
            Problem::Other(message) => message.clone(),
        }
    }
}

impl std::fmt::Display for Misfit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message())
    }
}

impl std::error::Error for Misfit {}

impl de::Error for Misfit {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        Misfit::new(Problem::Other(msg.to_string()))
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        Misfit::new(Problem::UnknownKey {
            key: field.to_owned(),
            known: expected,
        })
    }

    fn missing_field(field: &'static str) -> Self {
        Misfit::new(Problem::MissingKey(field))
    }
}

/// Reads the document (the root table and its span) into `T`.
pub(super) fn read<T: de::DeserializeOwned>(
    document: &DeValue<'_>,
    span: Range<usize>,
) -> Result<T, Misfit> {
    T::deserialize(Node {
        value: document,
        span,
        key: String::new(),
    })
}

/// Reads the document into `T` as [`read`] does, but past misfits that do not stop the
/// others from being found: an unknown key or a value that cannot be read (wrong type,
/// bad duration...) is noted and taken out of the document, and the reading starts again, so one `config check` names all of
/// them. A key taken out for its type is not reported missing as well. At most
/// `MAX_MISFITS` are collected. Ok holds what could be read without the keys taken out
/// (for the value checks to run on) and the misfits.
pub(super) fn read_all<T: de::DeserializeOwned>(
    document: &mut DeValue<'_>,
    span: Range<usize>,
) -> Result<(T, Vec<Misfit>), Vec<Misfit>> {
    const MAX_MISFITS: usize = 100;
    let mut misfits: Vec<Misfit> = Vec::new();
    let mut taken_out: Vec<String> = Vec::new();
    loop {
        let misfit = match read::<T>(document, span.clone()) {
            Ok(value) => return Ok((value, misfits)),
            Err(misfit) => misfit,
        };
        let missing_after_removal = matches!(misfit.problem, Problem::MissingKey(_))
            && misfit
                .at
                .as_ref()
                .is_some_and(|(_, key)| taken_out.contains(key));
        // A missing key cannot be taken out; anything else is one key's own problem.
        let removable = !matches!(misfit.problem, Problem::MissingKey(_));
        let at = misfit.at.clone();
        if !missing_after_removal {
            misfits.push(misfit);
        }
        let removed = removable
            && misfits.len() < MAX_MISFITS
            && at.as_ref().is_some_and(|(span, key)| {
                taken_out.push(key.clone());
                remove_at(document, span)
            });
        if !removed {
            return Err(misfits);
        }
    }
}

/// Removes from `value` the table entry whose key or value is at `span`, or the array
/// element there; whether one was found.
fn remove_at(value: &mut DeValue<'_>, span: &Range<usize>) -> bool {
    match value {
        DeValue::Table(table) => {
            let found = table
                .iter()
                .find(|(k, v)| k.span() == *span || v.span() == *span)
                .map(|(k, _)| k.clone());
            if let Some(key) = found {
                table.remove(&key);
                return true;
            }
            table.iter_mut().any(|(_, v)| remove_at(v.get_mut(), span))
        }
        DeValue::Array(items) => {
            if let Some(i) = items.iter().position(|v| v.span() == *span) {
                // No remove on a parsed array: the others go into a new one.
                let mut rest = toml::de::DeArray::new();
                for (j, item) in items.iter().enumerate() {
                    if j != i {
                        rest.push(item.clone());
                    }
                }
                *items = rest;
                return true;
            }
            items.iter_mut().any(|v| remove_at(v.get_mut(), span))
        }
        _ => false,
    }
}

/// One value of the document, where it is, and its dotted key.
struct Node<'a, 'i> {
    value: &'a DeValue<'i>,
    span: Range<usize>,
    key: String,
}

impl Node<'_, '_> {
    /// The value in the words of serde's `Unexpected`: `string "x"`, `table`...
    fn got(&self) -> String {
        match self.value {
            DeValue::String(s) => format!("string {:?}", s.as_ref()),
            DeValue::Integer(i) => format!("integer `{i}`"),
            DeValue::Float(f) => format!("floating point `{}`", f.as_str()),
            DeValue::Boolean(b) => format!("boolean `{b}`"),
            DeValue::Datetime(d) => format!("datetime `{d}`"),
            DeValue::Array(_) => "array".to_owned(),
            DeValue::Table(_) => "table".to_owned(),
        }
    }

    /// Goes on with `visitor` when the value is of the kind the schema wants here.
    fn expect<'de, V: Visitor<'de>>(
        self,
        fits: bool,
        expected: &'static str,
        visitor: V,
    ) -> Result<V::Value, Misfit> {
        if fits {
            de::Deserializer::deserialize_any(self, visitor)
        } else {
            let got = self.got();
            Err(Misfit::new(Problem::WrongType { expected, got }).at(&self.span, &self.key))
        }
    }

    fn is_integer(&self) -> bool {
        matches!(self.value, DeValue::Integer(_))
    }

    fn is_string(&self) -> bool {
        matches!(self.value, DeValue::String(_))
    }
}

const INTEGER: &str = "a non-negative integer";

macro_rules! expect_kind {
    ($($method:ident: $fits:ident, $expected:expr;)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Misfit> {
            let fits = self.$fits();
            self.expect(fits, $expected, visitor)
        }
    )*};
}

impl<'de> de::Deserializer<'de> for Node<'_, '_> {
    type Error = Misfit;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Misfit> {
        let (span, key) = (self.span.clone(), self.key.clone());
        let out = match self.value {
            DeValue::String(s) => visitor.visit_str(s),
            DeValue::Integer(i) => match i64::from_str_radix(i.as_str(), i.radix()) {
                Ok(n) => visitor.visit_i64(n),
                Err(_) => match u64::from_str_radix(i.as_str(), i.radix()) {
                    Ok(n) => visitor.visit_u64(n),
                    Err(_) => Err(de::Error::custom(format!("integer `{i}` is out of range"))),
                },
            },
            DeValue::Float(f) => match f.as_str().parse() {
                Ok(x) => visitor.visit_f64(x),
                Err(_) => Err(de::Error::custom(format!(
                    "invalid number `{}`",
                    f.as_str()
                ))),
            },
            DeValue::Boolean(b) => visitor.visit_bool(*b),
            DeValue::Datetime(d) => visitor.visit_string(d.to_string()),
            DeValue::Array(array) => visitor.visit_seq(Elements {
                iter: array.iter().enumerate(),
                key: &self.key,
            }),
            DeValue::Table(table) => visitor.visit_map(Entries {
                iter: table.iter(),
                key: &self.key,
                value: None,
            }),
        };
        out.map_err(|e| e.at(&span, &key))
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Misfit> {
        let fits = matches!(self.value, DeValue::Boolean(_));
        self.expect(fits, "true or false", visitor)
    }

    expect_kind! {
        deserialize_i8: is_integer, INTEGER;
        deserialize_i16: is_integer, INTEGER;
        deserialize_i32: is_integer, INTEGER;
        deserialize_i64: is_integer, INTEGER;
        deserialize_u8: is_integer, INTEGER;
        deserialize_u16: is_integer, INTEGER;
        deserialize_u32: is_integer, INTEGER;
        deserialize_u64: is_integer, INTEGER;
        deserialize_char: is_string, "a string";
        deserialize_str: is_string, "a string";
        deserialize_string: is_string, "a string";
        deserialize_bytes: is_string, "a string";
        deserialize_byte_buf: is_string, "a string";
    }

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Misfit> {
        self.deserialize_f64(visitor)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Misfit> {
        let fits = matches!(self.value, DeValue::Float(_) | DeValue::Integer(_));
        self.expect(fits, "a number", visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Misfit> {
        // A key that is absent never reaches a deserializer: present means `Some`.
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Misfit> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Misfit> {
        let fits = matches!(self.value, DeValue::Array(_));
        self.expect(fits, "an array", visitor)
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Misfit> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Misfit> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Misfit> {
        let fits = matches!(self.value, DeValue::Table(_));
        self.expect(fits, "a table", visitor)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Misfit> {
        if serde_spanned::de::is_spanned(name) {
            let span = self.span.clone();
            return visitor.visit_map(serde_spanned::de::SpannedDeserializer::new(self, span));
        }
        self.deserialize_map(visitor)
    }

    serde::forward_to_deserialize_any! {
        i128 u128 unit unit_struct enum identifier ignored_any
    }
}

impl<'de, 'a, 'i> IntoDeserializer<'de, Misfit> for Node<'a, 'i> {
    type Deserializer = Self;

    fn into_deserializer(self) -> Self {
        self
    }
}

/// The elements of an array, each keyed `KEY[i]`.
struct Elements<'a, I> {
    iter: I,
    key: &'a str,
}

impl<'de, 'a, 'i: 'a, I> SeqAccess<'de> for Elements<'a, I>
where
    I: Iterator<Item = (usize, &'a toml::Spanned<DeValue<'i>>)>,
{
    type Error = Misfit;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Misfit> {
        let Some((i, element)) = self.iter.next() else {
            return Ok(None);
        };
        seed.deserialize(Node {
            value: element.get_ref(),
            span: element.span(),
            key: format!("{}[{i}]", self.key),
        })
        .map(Some)
    }
}

/// The keys and values of a table, each keyed `KEY.name`.
struct Entries<'a, 'i, I> {
    iter: I,
    key: &'a str,
    value: Option<Node<'a, 'i>>,
}

impl<'de, 'a, 'i: 'a, I> MapAccess<'de> for Entries<'a, 'i, I>
where
    I: Iterator<
        Item = (
            &'a toml::Spanned<std::borrow::Cow<'i, str>>,
            &'a toml::Spanned<DeValue<'i>>,
        ),
    >,
{
    type Error = Misfit;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Misfit> {
        let Some((name, value)) = self.iter.next() else {
            return Ok(None);
        };
        let key = join_key(self.key, name.get_ref());
        let out = seed
            .deserialize(de::value::StrDeserializer::<Misfit>::new(name.get_ref()))
            .map_err(|e| e.at(&name.span(), &key))?;
        self.value = Some(Node {
            value: value.get_ref(),
            span: value.span(),
            key,
        });
        Ok(Some(out))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Misfit> {
        match self.value.take() {
            Some(node) => seed.deserialize(node),
            None => Err(de::Error::custom("a value was asked for before its key")),
        }
    }
}
