//! Crash-safety journal: the dirty paths of one target that rsync has not confirmed yet, on disk.
//!
//! One append-only file per target in a state directory ([`DEFAULT_DIR`]), named after a
//! stable key chosen by the caller ([`file_name`]). After a crash or `kill -9`, [`Journal::open`]
//! replays it and hands back every mark that was made durable ([`Journal::sync`]) and not
//! confirmed, and whether the previous run shut down cleanly with nothing pending.
//!
//! The file holds one concept, the journal: its record format, replay, pending-mark state and
//! compaction each only make sense with the others, so they stay together.
//!
//! # Sequence numbers
//!
//! Marks belong to an epoch. [`Journal::batch_taken`] closes the current epoch and returns its
//! number `seq`; marks recorded afterwards belong to later epochs. [`Journal::confirmed`]`(seq)`
//! retires every mark of epoch `<= seq` (unless the same path and scope was marked again in a
//! later epoch). A batch that fails is never confirmed; because the caller merges it back into
//! its dirty set, the next batch contains its paths, and confirming that batch (a larger `seq`)
//! retires them too.
//!
//! # File format
//!
//! A sequence of records, all integers little-endian:
//!
//! ```text
//! [len u32][crc32 u32][type u8][payload; len - 1 bytes]
//! ```
//!
//! `len` counts the type byte and the payload; the CRC-32 covers the four `len` bytes, the type
//! and the payload. Types:
//!
//! | type | record    | payload                                                        |
//! |------|-----------|----------------------------------------------------------------|
//! | 1    | Begin     | `"WJNL"`, version u8 (1), first epoch u64, key bytes           |
//! | 2    | Mark      | scope u8 (0 entry, 1 subtree), relative path bytes ("" = root) |
//! | 3    | Taken     | seq u64: the epoch `seq` is closed, later marks are in `seq+1` |
//! | 4    | Confirmed | seq u64: marks of epochs `<= seq` are done                     |
//! | 5    | Clean     | none: clean shutdown, nothing pending                          |
//!
//! Every file starts with Begin. Replay stops at the first record that is torn (short), fails
//! its CRC or makes no sense (a crash in the middle of a write, or damage), and truncates the
//! file there. A Clean record counts only as the very last record; opening the journal removes
//! it, so a crash of the new run is never taken for a clean shutdown.
//!
//! # Memory
//!
//! The pending state in memory knows paths by a keyed hash only ([`PathKey`]): the dirty
//! set holds the names already, and a target down for a day holds millions. What needs the
//! names (recovery at open, compaction) reads them back from the journal's own records:
//! the part of the file made durable, plus the records written since the last fdatasync
//! (kept in memory until it succeeds, so a failed one loses nothing) and those not written.
//!
//! # Compaction
//!
//! When the file grows past `max(1 MiB, 4 x the encoded size of the pending marks)`, it is
//! rewritten with only the pending marks (grouped by epoch, so sequence numbers keep their
//! meaning) to a temporary file in the same directory, which is fsync'd, renamed over the
//! journal, and the directory fsync'd.

use std::borrow::Cow;
use std::ffi::OsStr;
use std::fmt;
use std::fs::{DirBuilder, File, OpenOptions};
use std::hash::{BuildHasher, RandomState};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::dirty::Scope;

/// Where the daemon keeps its journals unless told otherwise.
pub const DEFAULT_DIR: &str = crate::config::defaults::STATE_DIR;

const MAGIC: &[u8; 4] = b"WJNL";
const VERSION: u8 = 1;
/// `len` and `crc` fields.
const HEADER: usize = 8;
/// Largest `len` accepted; anything bigger is damage.
const MAX_RECORD: usize = 1 << 20;
/// Largest relative path a Mark can carry.
const MAX_PATH: usize = MAX_RECORD - 2;
/// Files smaller than this are never compacted.
const COMPACT_MIN: u64 = 1 << 20;
/// Buffered records beyond this are written out (without fsync) by `record`.
const FLUSH_AT: usize = 4 << 20;

const T_BEGIN: u8 = 1;
const T_MARK: u8 = 2;
const T_TAKEN: u8 = 3;
const T_CONFIRMED: u8 = 4;
const T_CLEAN: u8 = 5;

const SCOPE_ENTRY: u8 = 0;
const SCOPE_SUBTREE: u8 = 1;

/// Errors of the journal. I/O errors name the file and the operation.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {}: {op}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("journal {} is in use by another process", path.display())]
    Locked { path: PathBuf },
    #[error("journal {} belongs to another target (key {:?})", path.display(), found.escape_ascii().to_string())]
    KeyMismatch { path: PathBuf, found: Vec<u8> },
    #[error("journal {} has unsupported format version {version}", path.display())]
    UnsupportedVersion { path: PathBuf, version: u8 },
    #[error("sequence number {seq} was not returned by batch_taken (last is {last})")]
    UnknownSeq { seq: u64, last: u64 },
    #[error("clean shutdown refused: {pending} marks are not confirmed")]
    Pending { pending: usize },
    #[error("relative path of {len} bytes is too long for the journal")]
    PathTooLong { len: usize },
    #[error("state directory {}: {reason}", path.display())]
    UnsafeDir { path: PathBuf, reason: String },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> JournalError {
    move |source| JournalError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// What [`Journal::open`] found from the previous run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Marks made durable and never confirmed, one per path (the widest scope pending for it),
    /// sorted by path bytes.
    pub marks: Vec<(PathBuf, Scope)>,
    /// The previous run shut down cleanly with nothing pending (its Clean record was the last
    /// record, and nothing after it was torn).
    pub clean: bool,
    /// A journal file for this key existed.
    pub existed: bool,
}

/// File name of the journal for `key`: a readable prefix of the key (characters other than
/// ASCII letters, digits, `-`, `_` and `.` become `_`) and the FNV-1a 64-bit hash of the whole
/// key in hex, so distinct keys get distinct names whatever they contain.
pub fn file_name(key: &str) -> String {
    let prefix: String = key
        .chars()
        .take(40)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let prefix = prefix.trim_start_matches('.');
    let prefix = if prefix.is_empty() { "target" } else { prefix };
    format!("{prefix}-{:016x}.journal", fnv1a(key.as_bytes()))
}

/// The journal key of `target` in sync group `group`. Names may not contain `/`, so no two
/// (group, target) pairs share a key.
pub fn target_key(group: &str, target: &str) -> String {
    format!("{group}/{target}")
}

/// The key earlier versions used, which `a-b` + `c` and `a` + `b-c` shared.
fn legacy_target_key(group: &str, target: &str) -> String {
    format!("{group}-{target}")
}

/// Refuses a state directory that someone other than this process's user could tamper
/// with: a symlink, not a directory, owned by another user, or writable by group or others.
/// A journal there decides what gets re-synced and a planted lock file could point anywhere.
fn check_state_dir(dir: &Path) -> Result<(), JournalError> {
    use std::os::unix::fs::MetadataExt;
    let unsafe_dir = |reason: String| JournalError::UnsafeDir {
        path: dir.to_path_buf(),
        reason,
    };
    let meta = std::fs::symlink_metadata(dir).map_err(io_err("stat", dir))?;
    if meta.file_type().is_symlink() {
        return Err(unsafe_dir("is a symbolic link".into()));
    }
    if !meta.is_dir() {
        return Err(unsafe_dir("is not a directory".into()));
    }
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid {
        return Err(unsafe_dir(format!(
            "is owned by uid {}, not by this process (uid {euid})",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(unsafe_dir(format!(
            "is writable by {} (mode {:04o}); make it 0700",
            if meta.mode() & 0o002 != 0 {
                "others"
            } else {
                "its group"
            },
            meta.mode() & 0o7777
        )));
    }
    Ok(())
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `rel` with empty and `.` components dropped, the way `DirtySet` reads it.
fn normalize(raw: &[u8]) -> Cow<'_, [u8]> {
    let tidy = raw.is_empty()
        || raw
            .split(|&b| b == b'/')
            .all(|c| !c.is_empty() && c != b".");
    if tidy {
        return Cow::Borrowed(raw);
    }
    let mut out = Vec::with_capacity(raw.len());
    for comp in raw
        .split(|&b| b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
    {
        if !out.is_empty() {
            out.push(b'/');
        }
        out.extend_from_slice(comp);
    }
    Cow::Owned(out)
}

fn scope_byte(scope: Scope) -> u8 {
    match scope {
        Scope::Entry => SCOPE_ENTRY,
        Scope::Subtree => SCOPE_SUBTREE,
    }
}

/// Encoded size of a Mark record for a path of `path_len` bytes.
fn mark_size(path_len: usize) -> u64 {
    (HEADER + 2 + path_len) as u64
}

/// Appends one record to `out`. The caller keeps the payload within `MAX_RECORD`.
fn encode(out: &mut Vec<u8>, kind: u8, parts: &[&[u8]]) {
    let len = 1 + parts.iter().map(|p| p.len()).sum::<usize>();
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    let start = out.len();
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.push(kind);
    for part in parts {
        out.extend_from_slice(part);
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&out[start..start + 4]);
    crc.update(&out[start + HEADER..]);
    out[start + 4..start + HEADER].copy_from_slice(&crc.finalize().to_le_bytes());
}

fn encode_mark(out: &mut Vec<u8>, path: &[u8], scope: Scope) {
    encode(out, T_MARK, &[&[scope_byte(scope)], path]);
}

fn encode_seq(out: &mut Vec<u8>, kind: u8, seq: u64) {
    encode(out, kind, &[&seq.to_le_bytes()]);
}

fn encode_begin(out: &mut Vec<u8>, epoch: u64, key: &[u8]) {
    encode(
        out,
        T_BEGIN,
        &[MAGIC, &[VERSION], &epoch.to_le_bytes(), key],
    );
}

#[derive(Debug, Clone, Copy)]
enum Record<'a> {
    Begin {
        version: u8,
        epoch: u64,
        key: &'a [u8],
    },
    Mark {
        scope: Scope,
        path: &'a [u8],
    },
    Taken(u64),
    Confirmed(u64),
    Clean,
}

/// Parses the type byte and payload of a record whose CRC matched.
fn parse(body: &[u8]) -> Option<Record<'_>> {
    let (&kind, payload) = body.split_first()?;
    let seq = |p: &[u8]| -> Option<u64> { Some(u64::from_le_bytes(p.try_into().ok()?)) };
    match kind {
        T_BEGIN => {
            let rest = payload.strip_prefix(MAGIC)?;
            let (&version, rest) = rest.split_first()?;
            if rest.len() < 8 {
                return None;
            }
            let (epoch, key) = rest.split_at(8);
            Some(Record::Begin {
                version,
                epoch: seq(epoch)?,
                key,
            })
        }
        T_MARK => {
            let (&scope, path) = payload.split_first()?;
            let scope = match scope {
                SCOPE_ENTRY => Scope::Entry,
                SCOPE_SUBTREE => Scope::Subtree,
                _ => return None,
            };
            Some(Record::Mark { scope, path })
        }
        T_TAKEN => Some(Record::Taken(seq(payload)?)),
        T_CONFIRMED => Some(Record::Confirmed(seq(payload)?)),
        T_CLEAN if payload.is_empty() => Some(Record::Clean),
        _ => None,
    }
}

/// Epochs of the pending marks of one path (0: none; epochs start at 1).
#[derive(Debug, Default, Clone, Copy)]
struct Slots {
    entry: u64,
    subtree: u64,
}

impl Slots {
    fn slot(&self, scope: Scope) -> Option<u64> {
        let epoch = match scope {
            Scope::Entry => self.entry,
            Scope::Subtree => self.subtree,
        };
        (epoch != 0).then_some(epoch)
    }

    fn get(&mut self, scope: Scope) -> &mut u64 {
        match scope {
            Scope::Entry => &mut self.entry,
            Scope::Subtree => &mut self.subtree,
        }
    }

    fn is_empty(&self) -> bool {
        self.entry == 0 && self.subtree == 0
    }
}

/// A path as the pending state knows it: a keyed 96-bit hash of its bytes and its length
/// (for the encoded size). No path bytes are kept in memory: a million dirty paths must not
/// cost their names twice (the dirty set holds them), and the file holds them anyway. The
/// key is drawn per journal, so names cannot be chosen to collide; by chance, two of 10^7
/// paths share a hash with odds of about 10^-15.
type PathKey = u128;

fn path_len_of(key: PathKey) -> usize {
    (key & 0xffff_ffff) as usize
}

/// Hashes the already hashed [`PathKey`]s of the pending map: their top 64 bits.
#[derive(Default)]
struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0 = bytes.iter().fold(self.0, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
    }

    fn write_u128(&mut self, key: u128) {
        self.0 = (key >> 64) as u64;
    }
}

/// Pending marks by path. Replay and the live journal go through the same methods, so a
/// replayed file always rebuilds the state that wrote it.
struct State {
    /// Epoch of marks recorded now.
    epoch: u64,
    /// Highest confirmed sequence number (0: none since the file began).
    confirmed: u64,
    /// No list by epoch beside it: a confirmation (one per batch that landed) walks the
    /// map, milliseconds for a million paths, which a list would cost 16 bytes a path.
    paths: hashbrown::HashMap<PathKey, Slots, std::hash::BuildHasherDefault<KeyHasher>>,
    /// Number of pending (path, scope) slots.
    count: usize,
    /// Encoded size of the pending marks.
    bytes: u64,
    /// The hash keys of this journal's paths.
    keys: (RandomState, RandomState),
}

impl fmt::Debug for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("State")
            .field("epoch", &self.epoch)
            .field("confirmed", &self.confirmed)
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

impl State {
    fn new(epoch: u64) -> Self {
        State {
            epoch,
            confirmed: 0,
            paths: Default::default(),
            count: 0,
            bytes: 0,
            keys: (RandomState::new(), RandomState::new()),
        }
    }

    fn key(&self, path: &[u8]) -> PathKey {
        let high = self.keys.0.hash_one(path);
        let low = self.keys.1.hash_one(path) >> 32;
        (u128::from(high) << 64) | (u128::from(low) << 32) | path.len() as u128
    }

    /// Marks `path` in the current epoch. Returns false when that changes nothing because the
    /// same mark (or a subtree mark of the path) is already pending in this epoch.
    fn mark(&mut self, path: &[u8], scope: Scope) -> bool {
        let epoch = self.epoch;
        let key = self.key(path);
        let size = mark_size(path.len());
        let slots = self.paths.entry(key).or_default();
        let covered = slots.subtree == epoch || (scope == Scope::Entry && slots.entry == epoch);
        if covered {
            return false;
        }
        if scope == Scope::Subtree && std::mem::take(&mut slots.entry) != 0 {
            // The subtree mark is as recent, so it covers the entry mark.
            self.count -= 1;
            self.bytes -= size;
        }
        let slot = slots.get(scope);
        if *slot == 0 {
            self.count += 1;
            self.bytes += size;
        }
        *slot = epoch;
        true
    }

    /// The epoch of the pending mark of `path` at `scope`, if any.
    fn pending(&self, path: &[u8], scope: Scope) -> Option<u64> {
        self.paths.get(&self.key(path))?.slot(scope)
    }

    /// Retires the marks of every epoch `<= seq`.
    fn confirm(&mut self, seq: u64) {
        if seq <= self.confirmed {
            return;
        }
        let (mut count, mut bytes) = (0, 0);
        self.paths.retain(|key, slots| {
            for slot in [&mut slots.entry, &mut slots.subtree] {
                if *slot != 0 && *slot <= seq {
                    *slot = 0;
                    count += 1;
                    bytes += mark_size(path_len_of(*key));
                }
            }
            !slots.is_empty()
        });
        self.count -= count;
        self.bytes -= bytes;
        self.confirmed = seq;
    }

    /// The oldest epoch with a pending mark (the current one when none is pending).
    fn first_pending_epoch(&self) -> u64 {
        self.paths
            .values()
            .flat_map(|s| [s.entry, s.subtree])
            .filter(|&e| e != 0)
            .min()
            .unwrap_or(self.epoch)
    }
}

/// Outcome of reading a journal file.
struct Replay {
    /// None when the file does not start with a valid Begin record.
    state: Option<State>,
    /// End of the last valid record.
    valid_len: u64,
    /// Offset of the last valid record when it is Clean.
    clean_at: Option<u64>,
    /// Bytes after `valid_len` were torn or damaged.
    damaged: bool,
}

/// Reads as much of `buf` as the file holds; returns the number of bytes read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match reader.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// What a visitor of records says after each.
enum Visit {
    Next,
    /// The record makes no sense here: the records end before it, as if damaged.
    Damaged,
}

/// Calls `visit` with each valid record of `reader` and the offset it starts at, until the
/// end, a torn or damaged record, or a visitor's [`Visit::Damaged`]. Returns the end of
/// the last record visited and whether the records stopped short of the end.
fn read_records(
    reader: impl Read,
    path: &Path,
    mut visit: impl FnMut(Record<'_>, u64) -> Result<Visit, JournalError>,
) -> Result<(u64, bool), JournalError> {
    let mut reader = BufReader::with_capacity(1 << 16, reader);
    let mut offset = 0u64;
    let mut body = Vec::new();
    let damaged = loop {
        let mut head = [0u8; HEADER];
        let n = read_full(&mut reader, &mut head).map_err(io_err("read", path))?;
        if n == 0 {
            break false;
        }
        if n < HEADER {
            break true;
        }
        let len_bytes = [head[0], head[1], head[2], head[3]];
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        let len = u32::from_le_bytes(len_bytes) as usize;
        if len == 0 || len > MAX_RECORD {
            break true;
        }
        body.resize(len, 0);
        if read_full(&mut reader, &mut body).map_err(io_err("read", path))? < len {
            break true;
        }
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&len_bytes);
        hasher.update(&body);
        if hasher.finalize() != crc {
            break true;
        }
        let Some(record) = parse(&body) else {
            break true;
        };
        if let Visit::Damaged = visit(record, offset)? {
            break true;
        }
        offset += (HEADER + len) as u64;
    };
    Ok((offset, damaged))
}

fn replay(file: &File, path: &Path, key: &str) -> Result<Replay, JournalError> {
    let mut state: Option<State> = None;
    let mut clean_at = None;
    let (valid_len, damaged) = read_records(file, path, |record, offset| {
        match (&mut state, record) {
            (
                None,
                Record::Begin {
                    version,
                    epoch,
                    key: found,
                },
            ) => {
                if version != VERSION {
                    return Err(JournalError::UnsupportedVersion {
                        path: path.to_path_buf(),
                        version,
                    });
                }
                if found != key.as_bytes() {
                    return Err(JournalError::KeyMismatch {
                        path: path.to_path_buf(),
                        found: found.to_vec(),
                    });
                }
                if epoch == 0 || epoch == u64::MAX {
                    return Ok(Visit::Damaged);
                }
                state = Some(State::new(epoch));
            }
            (None, _) | (Some(_), Record::Begin { .. }) => return Ok(Visit::Damaged),
            (Some(s), Record::Mark { scope, path: rel }) => {
                if rel.len() > MAX_PATH || normalize(rel).len() != rel.len() {
                    return Ok(Visit::Damaged);
                }
                s.mark(rel, scope);
            }
            (Some(s), Record::Taken(seq)) => {
                if seq < s.epoch || seq >= u64::MAX - 1 {
                    return Ok(Visit::Damaged);
                }
                s.epoch = seq + 1;
            }
            (Some(s), Record::Confirmed(seq)) => {
                if seq >= s.epoch {
                    return Ok(Visit::Damaged);
                }
                s.confirm(seq);
            }
            (Some(_), Record::Clean) => {}
        }
        clean_at = matches!(record, Record::Clean).then_some(offset);
        Ok(Visit::Next)
    })?;
    Ok(Replay {
        state,
        valid_len,
        clean_at,
        damaged,
    })
}

/// Calls `found` with each pending mark of `state` (epoch, path, scope), in the order of
/// the records of `history`: the journal's records from its Begin on, which `state` was
/// built from. The paths live only there (see [`PathKey`]).
fn pending_marks(
    history: impl Read,
    path: &Path,
    state: &State,
    mut found: impl FnMut(u64, &[u8], Scope) -> io::Result<()>,
) -> Result<(), JournalError> {
    let mut at = 0;
    read_records(history, path, |record, _| {
        match record {
            Record::Begin { epoch, .. } => at = epoch,
            Record::Taken(seq) => at = seq + 1,
            Record::Mark { scope, path: rel } if state.pending(rel, scope) == Some(at) => {
                found(at, rel, scope).map_err(io_err("write", path))?;
            }
            _ => {}
        }
        Ok(Visit::Next)
    })?;
    Ok(())
}

/// Reads `len` bytes of `file` from its start, whatever its offset (which stays put).
struct ReadAt<'a> {
    file: &'a File,
    pos: u64,
    len: u64,
}

impl Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let room = (self.len - self.pos).min(buf.len() as u64) as usize;
        if room == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..room], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

/// Names of this journal's files next to the journal itself.
struct Names {
    journal: PathBuf,
    lock: PathBuf,
    /// Prefix of its temporary files.
    temp_prefix: String,
}

impl Names {
    fn new(dir: &Path, key: &str) -> Self {
        let name = file_name(key);
        Names {
            journal: dir.join(&name),
            lock: dir.join(format!("{name}.lock")),
            temp_prefix: format!(".{name}."),
        }
    }
}

/// Writes a fresh journal holding only the pending marks of `state`, found in `history`
/// (see [`pending_marks`]), and renames it over the journal. Returns the new file,
/// positioned at its end, and its length.
fn write_snapshot(
    dir: &Path,
    names: &Names,
    key: &str,
    state: &mut State,
    history: impl Read,
) -> Result<(File, u64), JournalError> {
    let mut temp = tempfile::Builder::new()
        .prefix(&names.temp_prefix)
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(io_err("create temporary file", dir))?;
    let temp_path = temp.path().to_path_buf();
    let write_err = io_err("write temporary file", &temp_path);
    let first = state.first_pending_epoch();
    let mut len = 0u64;
    let mut out = BufWriter::with_capacity(1 << 16, temp.as_file_mut());
    let mut rec = Vec::with_capacity(4096);
    encode_begin(&mut rec, first, key.as_bytes());
    let mut at = first;
    pending_marks(history, &names.journal, state, |epoch, path, scope| {
        if epoch > at {
            encode_seq(&mut rec, T_TAKEN, epoch - 1);
            at = epoch;
        }
        encode_mark(&mut rec, path, scope);
        if rec.len() >= 1 << 16 {
            out.write_all(&rec)?;
            len += rec.len() as u64;
            rec.clear();
        }
        Ok(())
    })
    .map_err(|e| match e {
        JournalError::Io {
            op: "write",
            source,
            ..
        } => write_err(source),
        other => other,
    })?;
    if state.epoch > at {
        encode_seq(&mut rec, T_TAKEN, state.epoch - 1);
    }
    let write_err = || io_err("write temporary file", &temp_path);
    out.write_all(&rec).map_err(write_err())?;
    len += rec.len() as u64;
    out.flush().map_err(write_err())?;
    drop(out);
    temp.as_file().sync_all().map_err(write_err())?;
    let mut file = temp.persist(&names.journal).map_err(|e| JournalError::Io {
        op: "rename temporary file",
        path: names.journal.clone(),
        source: e.error,
    })?;
    sync_dir(dir)?;
    file.seek(SeekFrom::Start(len))
        .map_err(io_err("seek", &names.journal))?;
    Ok((file, len))
}

/// The journal of one target. See the module documentation.
pub struct Journal {
    dir: PathBuf,
    key: String,
    names: Names,
    file: File,
    /// Held for the lifetime of the journal; released on drop.
    _lock: Flock<File>,
    /// Bytes of `file` that hold whole records.
    file_len: u64,
    /// Bytes of `file` made durable by the last fdatasync (or the last rewrite).
    synced_len: u64,
    /// The records written to `file` after `synced_len`: after a failed fdatasync the file
    /// cannot be read back for them, and compaction needs every record (see [`PathKey`]).
    tail: Vec<u8>,
    /// Records not written to `file` yet.
    buf: Vec<u8>,
    /// Written since the last fdatasync.
    unsynced: bool,
    /// A write or fdatasync failed: the file content is not trusted until it is rewritten.
    needs_rewrite: bool,
    state: State,
    compact_min: u64,
    /// Makes the next fdatasync fail, as a disk error would.
    #[cfg(test)]
    fail_next_sync: bool,
}

impl fmt::Debug for Journal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.names.journal)
            .field("epoch", &self.state.epoch)
            .field("pending", &self.state.count)
            .field("bytes", &self.bytes())
            .finish_non_exhaustive()
    }
}

impl Journal {
    /// Opens (creating the directory 0700 and the file 0600 as needed) and replays the journal
    /// for `key`. Fails with [`JournalError::Locked`] when another process has it open.
    pub fn open(dir: &Path, key: &str) -> Result<(Journal, Recovered), JournalError> {
        Self::open_with(dir, key, COMPACT_MIN)
    }

    /// Opens the journal of `target` in sync group `group` (see [`target_key`]). A journal
    /// an earlier version kept under the ambiguous `GROUP-TARGET` key is taken over: its
    /// pending marks move into this one, whether it shut down cleanly still counts, and
    /// its files are removed.
    pub fn open_target(
        dir: &Path,
        group: &str,
        target: &str,
    ) -> Result<(Journal, Recovered), JournalError> {
        let (mut journal, mut recovered) = Self::open(dir, &target_key(group, target))?;
        if recovered.existed {
            return Ok((journal, recovered));
        }
        let legacy_key = legacy_target_key(group, target);
        let legacy = Names::new(dir, &legacy_key);
        if !std::fs::symlink_metadata(&legacy.journal).is_ok_and(|m| m.is_file()) {
            return Ok((journal, recovered));
        }
        let (old, found) = Self::open(dir, &legacy_key)?;
        for (rel, scope) in &found.marks {
            journal.record(rel, *scope)?;
        }
        journal.sync()?;
        tracing::info!(from = %legacy.journal.display(), to = %journal.names.journal.display(),
            paths = found.marks.len(), "journal taken over from its earlier name");
        recovered = found;
        drop(old);
        for stale in [&legacy.journal, &legacy.lock] {
            if let Err(e) = std::fs::remove_file(stale) {
                tracing::warn!(path = %stale.display(), error = %e, "removing an old journal file failed");
            }
        }
        Ok((journal, recovered))
    }

    fn open_with(
        dir: &Path,
        key: &str,
        compact_min: u64,
    ) -> Result<(Journal, Recovered), JournalError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err("create directory", dir))?;
        check_state_dir(dir)?;
        let names = Names::new(dir, key);
        // Never follow a symlink planted at our paths: root would create or write whatever
        // file it names.
        let lock_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&names.lock)
            .map_err(io_err("open lock file", &names.lock))?;
        let lock = match Flock::lock(lock_file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, Errno::EWOULDBLOCK)) => {
                return Err(JournalError::Locked {
                    path: names.journal.clone(),
                });
            }
            Err((_, errno)) => {
                return Err(JournalError::Io {
                    op: "lock",
                    path: names.lock.clone(),
                    source: errno.into(),
                });
            }
        };
        remove_stale_temps(dir, &names.temp_prefix);

        let existing = match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&names.journal)
        {
            Ok(file) => Some(file),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err("open", &names.journal)(e)),
        };
        let existed = existing.is_some();

        let (file, file_len, state, clean, rewrite) = match existing {
            None => (None, 0, State::new(1), false, true),
            Some(mut file) => {
                let replay = replay(&file, &names.journal, key)?;
                let actual_len = file
                    .metadata()
                    .map_err(io_err("stat", &names.journal))?
                    .len();
                match replay.state {
                    None => {
                        tracing::warn!(
                            path = %names.journal.display(),
                            "journal has no valid header; starting it afresh"
                        );
                        (None, 0, State::new(1), false, true)
                    }
                    Some(state) => {
                        if replay.damaged {
                            tracing::warn!(
                                path = %names.journal.display(),
                                offset = replay.valid_len,
                                len = actual_len,
                                "journal ends in a torn or damaged record; truncating it there"
                            );
                        }
                        let clean =
                            replay.clean_at.is_some() && !replay.damaged && state.count == 0;
                        // The Clean record describes the previous run only: remove it.
                        let keep = replay.clean_at.unwrap_or(replay.valid_len);
                        if keep < actual_len {
                            file.set_len(keep)
                                .and_then(|()| file.sync_data())
                                .map_err(io_err("truncate", &names.journal))?;
                        }
                        file.seek(SeekFrom::Start(keep))
                            .map_err(io_err("seek", &names.journal))?;
                        (Some(file), keep, state, clean, false)
                    }
                }
            }
        };

        let mut journal = match file {
            Some(file) => Journal {
                dir: dir.to_path_buf(),
                key: key.to_owned(),
                names,
                file,
                _lock: lock,
                file_len,
                synced_len: file_len,
                tail: Vec::new(),
                buf: Vec::new(),
                unsynced: false,
                needs_rewrite: false,
                state,
                compact_min,
                #[cfg(test)]
                fail_next_sync: false,
            },
            None => {
                let mut state = state;
                let (file, file_len) = write_snapshot(dir, &names, key, &mut state, io::empty())?;
                Journal {
                    dir: dir.to_path_buf(),
                    key: key.to_owned(),
                    names,
                    file,
                    _lock: lock,
                    file_len,
                    synced_len: file_len,
                    tail: Vec::new(),
                    buf: Vec::new(),
                    unsynced: false,
                    needs_rewrite: false,
                    state,
                    compact_min,
                    #[cfg(test)]
                    fail_next_sync: false,
                }
            }
        };
        if !rewrite && journal.should_compact() {
            journal.compact()?;
        }
        let recovered = Recovered {
            marks: journal.recovered_marks()?,
            clean,
            existed,
        };
        tracing::debug!(
            path = %journal.names.journal.display(),
            pending = journal.state.count,
            clean,
            existed,
            "journal opened"
        );
        Ok((journal, recovered))
    }

    /// Appends a mark (buffered; not durable until [`sync`](Self::sync)). Marking a path again
    /// before the next [`batch_taken`](Self::batch_taken) costs no space. `rel` is relative to
    /// the root ("" is the root); empty and `.` components are ignored. The mark is kept in
    /// memory even when writing out a full buffer fails; the next `sync` retries.
    pub fn record(&mut self, rel: &Path, scope: Scope) -> Result<(), JournalError> {
        let path = normalize(rel.as_os_str().as_bytes());
        if path.len() > MAX_PATH {
            return Err(JournalError::PathTooLong { len: path.len() });
        }
        if self.state.mark(&path, scope) {
            encode_mark(&mut self.buf, &path, scope);
            if self.buf.len() >= FLUSH_AT {
                self.write_buf()?;
            }
        }
        Ok(())
    }

    /// The caller took a batch from its dirty set: returns a sequence number covering every
    /// mark recorded so far, and none recorded later. Sequence numbers are meaningful within
    /// one run only (after a crash, numbers never synced may be handed out again).
    pub fn batch_taken(&mut self) -> Result<u64, JournalError> {
        let seq = self.state.epoch;
        encode_seq(&mut self.buf, T_TAKEN, seq);
        self.state.epoch += 1;
        Ok(seq)
    }

    /// rsync confirmed the batch taken at `seq`: every mark recorded before that
    /// [`batch_taken`](Self::batch_taken) is done, unless marked again since. Confirming an
    /// older sequence number than one already confirmed changes nothing.
    pub fn confirmed(&mut self, seq: u64) -> Result<(), JournalError> {
        let last = self.state.epoch - 1;
        if seq == 0 || seq > last {
            return Err(JournalError::UnknownSeq { seq, last });
        }
        if seq <= self.state.confirmed {
            return Ok(());
        }
        encode_seq(&mut self.buf, T_CONFIRMED, seq);
        self.state.confirm(seq);
        Ok(())
    }

    /// Makes everything recorded so far durable (write + fdatasync), and compacts the file when
    /// it has grown too large. Cheap when nothing is new.
    pub fn sync(&mut self) -> Result<(), JournalError> {
        if self.needs_rewrite {
            return self.compact();
        }
        self.write_buf()?;
        if self.unsynced {
            #[cfg(test)]
            let synced = if std::mem::take(&mut self.fail_next_sync) {
                Err(io::Error::from_raw_os_error(libc::EIO))
            } else {
                self.file.sync_data()
            };
            #[cfg(not(test))]
            let synced = self.file.sync_data();
            if let Err(e) = synced {
                // After a failed fsync the kernel may have dropped the dirty pages: write
                // everything again into a new file.
                self.needs_rewrite = true;
                return Err(io_err("fdatasync", &self.names.journal)(e));
            }
            self.unsynced = false;
            self.synced_len = self.file_len;
            self.tail = Vec::new();
        }
        if self.should_compact() {
            self.compact()?;
        }
        Ok(())
    }

    /// Clean shutdown: when nothing is pending, appends the Clean record and syncs. With marks
    /// pending it syncs them and fails with [`JournalError::Pending`]; the next run then sees
    /// an unclean shutdown and gets the marks back.
    pub fn close_clean(mut self) -> Result<(), JournalError> {
        self.sync()?;
        if self.state.count > 0 {
            return Err(JournalError::Pending {
                pending: self.state.count,
            });
        }
        encode(&mut self.buf, T_CLEAN, &[]);
        self.write_buf()?;
        self.file
            .sync_data()
            .map_err(io_err("fdatasync", &self.names.journal))?;
        self.unsynced = false;
        Ok(())
    }

    /// Number of pending marks (path and scope pairs not confirmed).
    pub fn pending_marks(&self) -> usize {
        self.state.count
    }

    /// Size of the journal: the file plus records not written yet.
    pub fn bytes(&self) -> u64 {
        self.file_len + self.buf.len() as u64
    }

    /// Path of the journal file.
    pub fn path(&self) -> &Path {
        &self.names.journal
    }

    /// The journal's records from its Begin on: the durable part of the file, the records
    /// written since, and those not written yet.
    fn history(&self) -> impl Read + '_ {
        ReadAt {
            file: &self.file,
            pos: 0,
            len: self.synced_len,
        }
        .chain(&self.tail[..])
        .chain(&self.buf[..])
    }

    /// One mark per pending path, the widest scope, sorted by bytes.
    fn recovered_marks(&self) -> Result<Vec<(PathBuf, Scope)>, JournalError> {
        let mut marks: Vec<(PathBuf, Scope)> = Vec::with_capacity(self.state.count);
        pending_marks(
            self.history(),
            &self.names.journal,
            &self.state,
            |_, path, scope| {
                marks.push((PathBuf::from(OsStr::from_bytes(path)), scope));
                Ok(())
            },
        )?;
        // A path pending at both scopes: the subtree, which covers the entry.
        marks.sort_unstable_by(|a, b| {
            a.0.as_os_str()
                .as_bytes()
                .cmp(b.0.as_os_str().as_bytes())
                .then((b.1 == Scope::Subtree).cmp(&(a.1 == Scope::Subtree)))
        });
        marks.dedup_by(|later, first| later.0 == first.0);
        Ok(marks)
    }

    fn should_compact(&self) -> bool {
        self.file_len > self.compact_min.max(self.state.bytes.saturating_mul(4))
    }

    /// Rewrites the file with only the pending marks; the buffer is covered by the state.
    fn compact(&mut self) -> Result<(), JournalError> {
        let before = self.bytes();
        let history = ReadAt {
            file: &self.file,
            pos: 0,
            len: self.synced_len,
        }
        .chain(&self.tail[..])
        .chain(&self.buf[..]);
        let (file, len) =
            write_snapshot(&self.dir, &self.names, &self.key, &mut self.state, history)?;
        self.file = file;
        self.file_len = len;
        self.synced_len = len;
        self.tail = Vec::new();
        self.buf.clear();
        self.unsynced = false;
        self.needs_rewrite = false;
        tracing::debug!(
            path = %self.names.journal.display(),
            before,
            after = len,
            pending = self.state.count,
            "journal compacted"
        );
        Ok(())
    }

    /// Writes the buffered records (no fsync). On failure the file is cut back to its last
    /// whole record, so later appends stay readable, and the records stay buffered.
    fn write_buf(&mut self) -> Result<(), JournalError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.file.write_all(&self.buf) {
            let restored = self
                .file
                .set_len(self.file_len)
                .and_then(|()| self.file.seek(SeekFrom::Start(self.file_len)));
            if restored.is_err() {
                self.needs_rewrite = true;
            }
            return Err(io_err("write", &self.names.journal)(e));
        }
        self.file_len += self.buf.len() as u64;
        self.tail.append(&mut self.buf);
        self.unsynced = true;
        Ok(())
    }
}

impl Drop for Journal {
    /// Writes what is buffered, without fsync: a process that exits without
    /// [`close_clean`](Journal::close_clean) keeps its marks unless the machine goes down too.
    fn drop(&mut self) {
        if !self.needs_rewrite
            && let Err(e) = self.write_buf()
        {
            tracing::warn!(error = %e, "could not write the journal on drop");
        }
    }
}

/// Removes temporary files a compaction left behind when it was interrupted.
fn remove_stale_temps(dir: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.as_bytes();
        if name.starts_with(prefix.as_bytes()) && name.ends_with(b".tmp") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::os::unix::fs::PermissionsExt;

    impl Journal {
        /// A `kill -9` together with a power loss: records not synced are gone.
        fn crash(mut self) {
            self.buf.clear();
        }
    }

    fn p(bytes: &[u8]) -> PathBuf {
        PathBuf::from(OsStr::from_bytes(bytes))
    }

    fn marks(list: &[(&[u8], Scope)]) -> Vec<(PathBuf, Scope)> {
        let mut v: Vec<_> = list.iter().map(|(b, s)| (p(b), *s)).collect();
        v.sort_by(|a, b| a.0.as_os_str().as_bytes().cmp(b.0.as_os_str().as_bytes()));
        v
    }

    /// Type byte, offset and body of each valid record of a file.
    fn records(path: &Path) -> Vec<(u8, u64, Vec<u8>)> {
        let data = std::fs::read(path).unwrap();
        let mut out = Vec::new();
        let mut at = 0usize;
        while at + HEADER <= data.len() {
            let len = u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) as usize;
            let body = data[at + HEADER..at + HEADER + len].to_vec();
            out.push((body[0], at as u64, body));
            at += HEADER + len;
        }
        assert_eq!(at, data.len());
        out
    }

    #[test]
    fn a_state_directory_others_could_tamper_with_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        std::fs::create_dir(&dir).unwrap();
        for (mode, refused) in [(0o700, false), (0o755, false), (0o770, true), (0o777, true)] {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
            let result = Journal::open(&dir, "k");
            assert_eq!(
                matches!(result, Err(JournalError::UnsafeDir { .. })),
                refused,
                "mode {mode:o}: {result:?}"
            );
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        let err = Journal::open(&link, "k").unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        if nix::unistd::geteuid().is_root() {
            let theirs = tmp.path().join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
            let err = Journal::open(&theirs, "k").unwrap_err();
            assert!(err.to_string().contains("owned by uid 65534"), "{err}");
        }
    }

    #[test]
    fn a_symlink_planted_at_the_lock_or_journal_path_is_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        std::fs::create_dir(&dir).unwrap();
        let names = Names::new(&dir, "k");
        let victim = tmp.path().join("victim");
        std::os::unix::fs::symlink(&victim, &names.lock).unwrap();
        assert!(Journal::open(&dir, "k").is_err());
        assert!(!victim.exists(), "the lock path's symlink was followed");
        std::fs::remove_file(&names.lock).unwrap();
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, &names.journal).unwrap();
        assert!(Journal::open(&dir, "k").is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }

    #[test]
    fn targets_never_share_a_journal() {
        assert_ne!(
            file_name(&target_key("a-b", "c")),
            file_name(&target_key("a", "b-c"))
        );
        let tmp = tempfile::tempdir().unwrap();
        let (mut one, _) = Journal::open_target(tmp.path(), "a-b", "c").unwrap();
        let (two, found) = Journal::open_target(tmp.path(), "a", "b-c").unwrap();
        one.record(Path::new("x"), Scope::Entry).unwrap();
        one.sync().unwrap();
        assert!(!found.existed);
        drop((one, two));
    }

    #[test]
    fn a_journal_under_the_earlier_name_is_taken_over() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut old, _) = Journal::open(tmp.path(), "g-t").unwrap();
        old.record(Path::new("d/f"), Scope::Entry).unwrap();
        old.record(Path::new("sub"), Scope::Subtree).unwrap();
        old.sync().unwrap();
        old.crash();
        let (journal, found) = Journal::open_target(tmp.path(), "g", "t").unwrap();
        assert!(found.existed && !found.clean);
        assert_eq!(
            found.marks,
            marks(&[(b"d/f", Scope::Entry), (b"sub", Scope::Subtree)])
        );
        let legacy = Names::new(tmp.path(), "g-t");
        assert!(!legacy.journal.exists() && !legacy.lock.exists());
        // The marks are in the new journal now: they survive another crash.
        journal.crash();
        let (_, again) = Journal::open_target(tmp.path(), "g", "t").unwrap();
        assert_eq!(again.marks, found.marks);
        assert!(again.existed && !again.clean);
    }

    fn open(dir: &Path) -> (Journal, Recovered) {
        Journal::open(dir, "target-1").unwrap()
    }

    #[test]
    fn journal_is_send() {
        fn send<T: Send>() {}
        send::<Journal>();
    }

    #[test]
    fn file_names_are_safe_and_distinct() {
        let a = file_name("/srv/data -> backup::mod");
        assert!(a.starts_with("_srv_data_-__backup__mod-"));
        assert!(a.ends_with(".journal"));
        assert_ne!(file_name("a/b"), file_name("a_b"));
        assert!(file_name("..").starts_with("target-"));
        assert!(!file_name("é\n/").contains(['/', '\n']));
        assert_eq!(file_name("x"), file_name("x"));
    }

    #[test]
    fn fresh_journal_permissions() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state/watcher");
        let (j, rec) = open(&dir);
        assert!(!rec.existed && !rec.clean && rec.marks.is_empty());
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(j.path()), 0o600);
        assert!(j.path().starts_with(&dir));
    }

    #[test]
    fn replay_after_crash_dedups() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut j, _) = open(tmp.path());
        for _ in 0..1000 {
            j.record(Path::new("a/file"), Scope::Entry).unwrap();
        }
        j.record(Path::new("dir"), Scope::Subtree).unwrap();
        j.record(Path::new("./dir//"), Scope::Entry).unwrap();
        j.record(Path::new(""), Scope::Entry).unwrap();
        j.sync().unwrap();
        j.record(Path::new("not-synced"), Scope::Entry).unwrap();
        let small = j.bytes();
        assert!(small < 200, "{small}");
        j.crash();
        let (j, rec) = open(tmp.path());
        assert!(rec.existed);
        assert!(!rec.clean);
        assert_eq!(
            rec.marks,
            marks(&[
                (b"", Scope::Entry),
                (b"a/file", Scope::Entry),
                (b"dir", Scope::Subtree)
            ])
        );
        assert_eq!(j.pending_marks(), 3);
    }

    #[test]
    fn plain_drop_writes_the_buffer() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut j, _) = open(tmp.path());
        j.record(Path::new("x"), Scope::Entry).unwrap();
        drop(j);
        let (_, rec) = open(tmp.path());
        assert_eq!(rec.marks, marks(&[(b"x", Scope::Entry)]));
        assert!(!rec.clean);
    }

    #[test]
    fn torn_tail_is_cut() {
        let tmp = tempfile::tempdir().unwrap();
        let names = ["one", "two", "three"];
        let (mut j, _) = open(tmp.path());
        for n in names {
            j.record(Path::new(n), Scope::Entry).unwrap();
        }
        j.sync().unwrap();
        let path = j.path().to_path_buf();
        j.crash();
        let full = std::fs::read(&path).unwrap();
        let recs = records(&path);
        let last_start = recs.last().unwrap().1 as usize;
        for cut in 1..=(full.len() - last_start) {
            std::fs::write(&path, &full[..full.len() - cut]).unwrap();
            let (j, rec) = open(tmp.path());
            assert_eq!(
                rec.marks,
                marks(&[(b"one", Scope::Entry), (b"two", Scope::Entry)])
            );
            assert!(!rec.clean);
            drop(j);
            assert_eq!(std::fs::metadata(&path).unwrap().len(), last_start as u64);
        }
        // Zeros where the tail should be (a file extended but not written).
        let mut zeros = full.clone();
        zeros.extend_from_slice(&[0; 100]);
        std::fs::write(&path, &zeros).unwrap();
        let (_, rec) = open(tmp.path());
        assert_eq!(rec.marks.len(), 3);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), full.len() as u64);
    }

    #[test]
    fn flipped_byte_stops_replay_and_appends_continue() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut j, _) = open(tmp.path());
        for n in ["r1", "r2", "r3", "r4", "r5"] {
            j.record(Path::new(n), Scope::Subtree).unwrap();
        }
        j.sync().unwrap();
        let path = j.path().to_path_buf();
        j.crash();
        let recs = records(&path);
        // recs[0] is Begin; recs[3] is the mark of r3.
        let third = recs[3].1 as usize;
        let mut data = std::fs::read(&path).unwrap();
        data[third + HEADER + 2] ^= 0x01;
        std::fs::write(&path, &data).unwrap();
        let (mut j, rec) = open(tmp.path());
        assert_eq!(
            rec.marks,
            marks(&[(b"r1", Scope::Subtree), (b"r2", Scope::Subtree)])
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), third as u64);
        j.record(Path::new("r6"), Scope::Entry).unwrap();
        j.sync().unwrap();
        j.crash();
        let (_, rec) = open(tmp.path());
        assert_eq!(
            rec.marks,
            marks(&[
                (b"r1", Scope::Subtree),
                (b"r2", Scope::Subtree),
                (b"r6", Scope::Entry)
            ])
        );
    }

    #[test]
    fn damaged_header_starts_afresh() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut j, _) = open(tmp.path());
        j.record(Path::new("a"), Scope::Entry).unwrap();
        j.sync().unwrap();
        let path = j.path().to_path_buf();
        j.crash();
        let mut data = std::fs::read(&path).unwrap();
        data[HEADER + 1] ^= 0xff;
        std::fs::write(&path, &data).unwrap();
        let (mut j, rec) = open(tmp.path());
        assert!(rec.existed && !rec.clean && rec.marks.is_empty());
        j.record(Path::new("b"), Scope::Entry).unwrap();
        j.sync().unwrap();
        j.crash();
        let (_, rec) = open(tmp.path());
        assert_eq!(rec.marks, marks(&[(b"b", Scope::Entry)]));
    }

    #[test]
    fn failed_batch_is_covered_by_the_next_one() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut j, _) = open(tmp.path());
        j.record(Path::new("a"), Scope::Entry).unwrap();
        j.record(Path::new("b"), Scope::Subtree).unwrap();
        let a = j.batch_taken().unwrap();
        // Batch A fails: not confirmed. More marks arrive.
        j.record(Path::new("c"), Scope::Entry).unwrap();
        j.sync().unwrap();
        assert_eq!(j.pending_marks(), 3);
        let b = j.batch_taken().unwrap();
        assert!(b > a);
        j.record(Path::new("d"), Scope::Entry).unwrap();
        j.confirmed(b).unwrap();
        assert_eq!(j.pending_marks(), 1);
        j.sync().unwrap();
        j.crash();
        let (_, rec) = open(tmp.path());
        assert_eq!(rec.marks, marks(&[(b"d", Scope::Entry)]));
    }

    #[test]
    fn marks_during_flight_survive_its_confirmation() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut j, _) = open(tmp.path());
        j.record(Path::new("a"), Scope::Entry).unwrap();
        j.record(Path::new("dir"), Scope::Subtree).unwrap();
        let a = j.batch_taken().unwrap();
        // While A is in flight: the same path again, a new one, and an entry under a subtree.
        j.record(Path::new("a"), Scope::Entry).unwrap();
        j.record(Path::new("m1"), Scope::Entry).unwrap();
        j.record(Path::new("dir"), Scope::Entry).unwrap();
        j.confirmed(a).unwrap();
        assert_eq!(j.pending_marks(), 3);
        // Confirming again, or an older number, changes nothing.
        j.confirmed(a).unwrap();
        assert_eq!(j.pending_marks(), 3);
        j.sync().unwrap();
        j.crash();
        let (mut j, rec) = open(tmp.path());
        assert_eq!(
            rec.marks,
            marks(&[
                (b"a", Scope::Entry),
                (b"dir", Scope::Entry),
                (b"m1", Scope::Entry)
            ])
        );
        // The recovered marks go into the first batch of the new run.
        let s = j.batch_taken().unwrap();
        assert!(s > a);
        j.confirmed(s).unwrap();
        assert_eq!(j.pending_marks(), 0);
    }

    #[test]
    fn subtree_then_entry_in_later_epoch() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut j, _) = open(tmp.path());
        j.record(Path::new("d"), Scope::Subtree).unwrap();
        let a = j.batch_taken().unwrap();
        j.record(Path::new("d"), Scope::Entry).unwrap();
        j.sync().unwrap();
        j.crash();
        let (mut j, rec) = open(tmp.path());
        assert_eq!(rec.marks, marks(&[(b"d", Scope::Subtree)]));
        j.confirmed(a).unwrap();
        assert_eq!(j.pending_marks(), 1);
        j.sync().unwrap();
        j.crash();
        let (_, rec) = open(tmp.path());
        assert_eq!(rec.marks, marks(&[(b"d", Scope::Entry)]));
    }

    #[test]
    fn unknown_sequence_numbers_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut j, _) = open(tmp.path());
        assert!(matches!(
            j.confirmed(1),
            Err(JournalError::UnknownSeq { seq: 1, .. })
        ));
        let s = j.batch_taken().unwrap();
        assert!(matches!(
            j.confirmed(0),
            Err(JournalError::UnknownSeq { .. })
        ));
        assert!(matches!(
            j.confirmed(s + 1),
            Err(JournalError::UnknownSeq { .. })
        ));
        j.confirmed(s).unwrap();
    }

    #[test]
    fn sequence_numbers_grow_across_runs() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut j, _) = open(tmp.path());
        let a = j.batch_taken().unwrap();
        let b = j.batch_taken().unwrap();
        assert!(b > a);
        j.close_clean().unwrap();
        let (mut j, _) = open(tmp.path());
        assert!(j.batch_taken().unwrap() > b);
    }

    #[test]
    fn clean_marker() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut j, _) = open(tmp.path());
        j.record(Path::new("a"), Scope::Entry).unwrap();
        let s = j.batch_taken().unwrap();
        j.confirmed(s).unwrap();
        j.close_clean().unwrap();
        let (j, rec) = open(tmp.path());
        assert!(rec.clean && rec.existed && rec.marks.is_empty());
        // The marker belongs to the previous run: crashing now is not clean.
        j.crash();
        let (mut j, rec) = open(tmp.path());
        assert!(!rec.clean);
        // Refused with marks pending; they are synced and come back.
        j.record(Path::new("b"), Scope::Entry).unwrap();
        assert!(matches!(
            j.close_clean(),
            Err(JournalError::Pending { pending: 1 })
        ));
        let (j, rec) = open(tmp.path());
        assert!(!rec.clean);
        assert_eq!(rec.marks, marks(&[(b"b", Scope::Entry)]));
        j.crash();
        // A record after a Clean marker makes it not the last one.
        let (mut j, _) = open(tmp.path());
        let s = j.batch_taken().unwrap();
        j.confirmed(s).unwrap();
        let path = j.path().to_path_buf();
        j.close_clean().unwrap();
        let mut data = std::fs::read(&path).unwrap();
        encode_seq(&mut data, T_TAKEN, 1000);
        std::fs::write(&path, &data).unwrap();
        let (_, rec) = open(tmp.path());
        assert!(!rec.clean && rec.marks.is_empty());
    }

    #[test]
    fn a_failed_fdatasync_rewrites_every_pending_mark() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(tmp.path(), "k").unwrap();
        j.record(&p(b"durable"), Scope::Entry).unwrap();
        j.sync().unwrap();
        j.record(&p(b"written/not/synced"), Scope::Subtree).unwrap();
        j.fail_next_sync = true;
        assert!(j.sync().is_err());
        // The file cannot be read back past its durable part: the rewrite takes the
        // records written since from memory.
        std::fs::OpenOptions::new()
            .write(true)
            .open(j.path())
            .unwrap()
            .set_len(j.synced_len)
            .unwrap();
        j.record(&p(b"later"), Scope::Entry).unwrap();
        j.sync().unwrap();
        j.crash();
        let (_, rec) = Journal::open(tmp.path(), "k").unwrap();
        assert_eq!(
            rec.marks,
            marks(&[
                (b"durable", Scope::Entry),
                (b"later", Scope::Entry),
                (b"written/not/synced", Scope::Subtree),
            ])
        );
    }

    #[test]
    fn compaction_keeps_exactly_the_pending_marks() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open_with(tmp.path(), "k", 4096).unwrap();
        for round in 0..50u32 {
            for i in 0..20u32 {
                j.record(Path::new(&format!("done/{round}/{i}")), Scope::Entry)
                    .unwrap();
            }
            let s = j.batch_taken().unwrap();
            j.confirmed(s).unwrap();
        }
        // Pending in two epochs: an in-flight batch and marks after it.
        j.record(Path::new("keep/a"), Scope::Subtree).unwrap();
        j.record(Path::new("keep/b"), Scope::Entry).unwrap();
        let inflight = j.batch_taken().unwrap();
        j.record(Path::new("keep/c"), Scope::Entry).unwrap();
        j.record(Path::new("keep/b"), Scope::Entry).unwrap();
        assert!(j.bytes() > 4096);
        j.sync().unwrap();
        assert!(j.bytes() < 256, "compacted: {}", j.bytes());
        let path = j.path().to_path_buf();
        let recs = records(&path);
        assert_eq!(recs[0].0, T_BEGIN);
        let mut in_file: Vec<(Vec<u8>, u8)> = recs
            .iter()
            .filter(|r| r.0 == T_MARK)
            .map(|r| (r.2[2..].to_vec(), r.2[1]))
            .collect();
        in_file.sort();
        // keep/b was marked in two epochs: only the later mark is pending.
        let want: Vec<(Vec<u8>, u8)> = vec![
            (b"keep/a".to_vec(), SCOPE_SUBTREE),
            (b"keep/b".to_vec(), SCOPE_ENTRY),
            (b"keep/c".to_vec(), SCOPE_ENTRY),
        ];
        assert_eq!(in_file, want);
        assert_eq!(in_file.len(), j.pending_marks());
        // Only the journal and its lock file are left in the directory.
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 2);
        // Epochs survive the rewrite: confirming the in-flight batch keeps the later marks.
        j.confirmed(inflight).unwrap();
        j.sync().unwrap();
        j.crash();
        let (_, rec) = Journal::open_with(tmp.path(), "k", 4096).unwrap();
        assert_eq!(
            rec.marks,
            marks(&[(b"keep/b", Scope::Entry), (b"keep/c", Scope::Entry)])
        );
    }

    #[test]
    fn compaction_preserves_epochs_across_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open_with(tmp.path(), "k", 64).unwrap();
        j.record(Path::new("a"), Scope::Entry).unwrap();
        let a = j.batch_taken().unwrap();
        j.record(Path::new("b"), Scope::Entry).unwrap();
        for _ in 0..10 {
            j.batch_taken().unwrap();
        }
        j.record(Path::new("c"), Scope::Entry).unwrap();
        j.sync().unwrap(); // compacts: file > 64 bytes
        j.crash();
        let (mut j, rec) = Journal::open_with(tmp.path(), "k", 64).unwrap();
        assert_eq!(rec.marks.len(), 3);
        j.confirmed(a).unwrap();
        assert_eq!(j.pending_marks(), 2);
        j.confirmed(a + 1).unwrap();
        assert_eq!(j.pending_marks(), 1);
        let s = j.batch_taken().unwrap();
        j.confirmed(s).unwrap();
        assert_eq!(j.pending_marks(), 0);
    }

    #[test]
    fn odd_names_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let names: [&[u8]; 4] = [
            b"dir/\xff\xfe not utf8",
            b"line\nbreak/x",
            b"tab\there \\ and \"quotes\"",
            b"",
        ];
        let (mut j, _) = open(tmp.path());
        for n in names {
            j.record(&p(n), Scope::Subtree).unwrap();
        }
        j.sync().unwrap();
        j.crash();
        let (_, rec) = open(tmp.path());
        let want: Vec<(&[u8], Scope)> = names.iter().map(|n| (*n, Scope::Subtree)).collect();
        assert_eq!(rec.marks, marks(&want));
    }

    #[test]
    fn second_open_is_refused_and_keys_are_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let (j, _) = open(tmp.path());
        assert!(matches!(
            Journal::open(tmp.path(), "target-1"),
            Err(JournalError::Locked { .. })
        ));
        let (other, _) = Journal::open(tmp.path(), "target-2").unwrap();
        let first = j.path().to_path_buf();
        let second = other.path().to_path_buf();
        drop(other);
        j.close_clean().unwrap();
        std::fs::rename(&first, &second).unwrap();
        assert!(matches!(
            Journal::open(tmp.path(), "target-2"),
            Err(JournalError::KeyMismatch { .. })
        ));
    }

    #[test]
    fn too_long_paths_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut j, _) = open(tmp.path());
        let long = vec![b'x'; MAX_PATH + 1];
        assert!(matches!(
            j.record(&p(&long), Scope::Entry),
            Err(JournalError::PathTooLong { .. })
        ));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Record(usize, bool),
        Take,
        Succeed,
        Fail,
        Sync,
        Crash,
        Close,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..POOL.len(), any::<bool>()).prop_map(|(i, s)| Op::Record(i, s)),
            2 => Just(Op::Take),
            2 => Just(Op::Succeed),
            1 => Just(Op::Fail),
            2 => Just(Op::Sync),
            1 => Just(Op::Crash),
            1 => Just(Op::Close),
        ]
    }

    const POOL: [&[u8]; 7] = [b"", b"a", b"a/b", b"c\nd", b"\xff", b"x/y/z", b"q"];

    /// A mark as the caller made it.
    #[derive(Debug, Clone)]
    struct Made {
        path: Vec<u8>,
        subtree: bool,
        /// Last sequence number returned before it in this run.
        after: Option<u64>,
        durable: bool,
    }

    fn widest(list: &[Made], only_durable: bool) -> BTreeMap<Vec<u8>, Scope> {
        let mut map = BTreeMap::new();
        for m in list.iter().filter(|m| m.durable || !only_durable) {
            let e = map.entry(m.path.clone()).or_insert(Scope::Entry);
            if m.subtree {
                *e = Scope::Subtree;
            }
        }
        map
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn unconfirmed_marks_are_never_lost(
            ops in proptest::collection::vec(op(), 1..80),
            compact_min in prop_oneof![Just(64u64), Just(512), Just(1 << 20)],
        ) {
            let tmp = tempfile::tempdir().unwrap();
            let (mut j, _) = Journal::open_with(tmp.path(), "p", compact_min).unwrap();
            // Marks not confirmed; marks confirmed only by a confirmation not yet durable.
            let mut pending: Vec<Made> = Vec::new();
            let mut maybe: Vec<Made> = Vec::new();
            let mut in_flight: Option<u64> = None;
            let mut last_seq: Option<u64> = None;
            let mut high_seq = 0u64;
            for op in ops {
                match op {
                    Op::Record(i, subtree) => {
                        let scope = if subtree { Scope::Subtree } else { Scope::Entry };
                        j.record(&p(POOL[i]), scope).unwrap();
                        pending.push(Made { path: POOL[i].to_vec(), subtree, after: last_seq, durable: false });
                    }
                    Op::Take => {
                        if in_flight.is_none() {
                            let s = j.batch_taken().unwrap();
                            prop_assert!(s > high_seq);
                            high_seq = s;
                            in_flight = Some(s);
                            last_seq = Some(s);
                        }
                    }
                    Op::Succeed => {
                        if let Some(s) = in_flight.take() {
                            j.confirmed(s).unwrap();
                            let (done, keep): (Vec<Made>, Vec<Made>) = pending
                                .into_iter()
                                .partition(|m| m.after.is_none_or(|a| a < s));
                            pending = keep;
                            maybe.extend(done);
                        }
                    }
                    Op::Fail => in_flight = None,
                    Op::Sync => {
                        j.sync().unwrap();
                        pending.iter_mut().for_each(|m| m.durable = true);
                        maybe.clear();
                    }
                    Op::Crash | Op::Close => {
                        let closing = matches!(op, Op::Close);
                        if closing {
                            let result = j.close_clean();
                            prop_assert_eq!(result.is_ok(), pending.is_empty());
                            pending.iter_mut().for_each(|m| m.durable = true);
                            maybe.clear();
                        } else {
                            j.crash();
                            // Sequence numbers not synced may be handed out again.
                            high_seq = 0;
                        }
                        let (j2, rec) = Journal::open_with(tmp.path(), "p", compact_min).unwrap();
                        j = j2;
                        prop_assert_eq!(rec.clean, closing && pending.is_empty());
                        let got: BTreeMap<Vec<u8>, Scope> = rec
                            .marks
                            .iter()
                            .map(|(path, s)| (path.as_os_str().as_bytes().to_vec(), *s))
                            .collect();
                        prop_assert_eq!(got.len(), rec.marks.len());
                        // Every durable, unconfirmed mark is back, at least as wide.
                        for (path, scope) in widest(&pending, true) {
                            let back = got.get(&path).copied();
                            prop_assert!(
                                back == Some(scope) || back == Some(Scope::Subtree),
                                "lost {:?} {:?}: got {:?}", path, scope, got
                            );
                        }
                        // Nothing comes back that was not marked and possibly pending.
                        let mut possible = pending.clone();
                        possible.extend(maybe.iter().cloned());
                        let possible = widest(&possible, false);
                        for (path, scope) in &got {
                            let allowed = possible.get(path).copied();
                            prop_assert!(
                                allowed == Some(*scope) || allowed == Some(Scope::Subtree),
                                "phantom {:?} {:?}", path, scope
                            );
                        }
                        if maybe.is_empty() && pending.iter().all(|m| m.durable) {
                            prop_assert_eq!(&got, &widest(&pending, true));
                        }
                        pending = got
                            .into_iter()
                            .map(|(path, s)| Made { path, subtree: s == Scope::Subtree, after: None, durable: true })
                            .collect();
                        maybe.clear();
                        in_flight = None;
                        last_seq = None;
                    }
                }
                prop_assert_eq!(j.pending_marks() == 0, pending.is_empty());
            }
        }
    }
}
