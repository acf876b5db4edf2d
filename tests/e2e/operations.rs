//! Which events each backend reports for each file operation, as one table run against
//! the backend `WATCHER_E2E_BACKEND` names (`WATCHER_E2E_EBPF_PROBES` picks the ebpf
//! probe set), started through the library as `watcher watch` starts it.
//!
//! A row is an operation on a tree prepared before the backend starts, and the events
//! that must follow it, in that order (others may come between and after: a created file
//! is also written, say). A backend that documents it cannot see something has an
//! exception in the row, with the reason. Each row works in a directory of its own, so
//! a late event of one row never satisfies another.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use watcher::backend::ebpf::{EbpfOptions, ProbeChoice};
use watcher::backend::{self, BackendKind, BackendOptions};
use watcher::event::{ChangeKind, Event};

use crate::harness::{self, Scratch};

/// How long the events of one operation may take to arrive.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

/// The backends as the table tells them apart: the two ebpf probe sets see different
/// things.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Fanotify,
    Inotify,
    EbpfSyscalls,
    EbpfVfs,
}

impl Variant {
    fn of(variant: &str) -> Variant {
        match variant {
            "fanotify" => Variant::Fanotify,
            "inotify" => Variant::Inotify,
            "ebpf/syscalls" => Variant::EbpfSyscalls,
            "ebpf/vfs" => Variant::EbpfVfs,
            other => panic!("a backend this table does not know: {other}"),
        }
    }
}

/// One expected event: kind, path relative to the row's directory, is_dir.
type Ev = (ChangeKind, &'static str, bool);

use ChangeKind::{Attrib, CloseWrite, Created, Deleted, Modified, MovedFrom, MovedTo};

/// A row of the table.
struct Row {
    op: &'static str,
    /// Prepares the row's directory (before the backend starts).
    setup: fn(&Path),
    /// The operation, in the row's directory; the second path is a directory outside the
    /// watched tree, on the same filesystem.
    run: fn(&Path, &Path),
    expect: &'static [Ev],
    /// Backends that see something else: what they report instead, and why.
    except: &'static [(Variant, &'static [Ev], &'static str)],
}

fn nothing(_: &Path) {}

fn file_f(d: &Path) {
    std::fs::write(d.join("f"), "old").expect("write f");
}

fn dir_sub(d: &Path) {
    std::fs::create_dir(d.join("sub")).expect("mkdir sub");
    std::fs::write(d.join("sub/inner"), "x").expect("write sub/inner");
}

fn table() -> Vec<Row> {
    vec![
        Row {
            op: "create a file (open O_CREAT, close)",
            setup: nothing,
            run: |d, _| drop(File::create(d.join("f")).expect("create")),
            expect: &[(Created, "f", false)],
            except: &[],
        },
        Row {
            op: "write to a file (open, write, close)",
            setup: file_f,
            run: |d, _| {
                let mut f = OpenOptions::new()
                    .write(true)
                    .open(d.join("f"))
                    .expect("open");
                f.write_all(b"new").expect("write");
            },
            // fanotify may merge the write into the close; inotify reports both.
            expect: &[(CloseWrite, "f", false)],
            except: &[(
                Variant::EbpfSyscalls,
                &[(Modified, "f", false)],
                "the syscall probes report writes and closes alike as modifications",
            )],
        },
        Row {
            op: "close a file opened for writing, nothing written",
            setup: file_f,
            run: |d, _| {
                drop(
                    OpenOptions::new()
                        .write(true)
                        .open(d.join("f"))
                        .expect("open"),
                )
            },
            expect: &[(CloseWrite, "f", false)],
            except: &[
                (
                    Variant::EbpfVfs,
                    &[],
                    "the VFS probes report a close only after a write: nothing changed",
                ),
                (
                    Variant::EbpfSyscalls,
                    &[(Modified, "f", false)],
                    "the syscall probes report writes and closes alike as modifications",
                ),
            ],
        },
        Row {
            op: "truncate a file by path",
            setup: file_f,
            run: |d, _| nix::unistd::truncate(&d.join("f"), 1).expect("truncate"),
            expect: &[(Modified, "f", false)],
            except: &[(
                Variant::EbpfVfs,
                &[(Attrib, "f", false)],
                "the VFS probes see a truncate as the attribute change it is to the \
                 kernel (notify_change with a new size); both sync the file",
            )],
        },
        Row {
            op: "chmod a file",
            setup: file_f,
            run: |d, _| {
                std::fs::set_permissions(d.join("f"), std::fs::Permissions::from_mode(0o600))
                    .expect("chmod")
            },
            expect: &[(Attrib, "f", false)],
            except: &[],
        },
        Row {
            op: "chown a file",
            setup: file_f,
            run: |d, _| std::os::unix::fs::chown(d.join("f"), Some(1), Some(1)).expect("chown"),
            expect: &[(Attrib, "f", false)],
            except: &[],
        },
        Row {
            op: "set a file's times (utimensat)",
            setup: file_f,
            run: |d, _| {
                let t = nix::sys::time::TimeSpec::new(1_500_000_000, 0);
                nix::sys::stat::utimensat(
                    nix::fcntl::AT_FDCWD,
                    &d.join("f"),
                    &t,
                    &t,
                    nix::sys::stat::UtimensatFlags::NoFollowSymlink,
                )
                .expect("utimensat")
            },
            expect: &[(Attrib, "f", false)],
            except: &[],
        },
        Row {
            op: "chmod a directory",
            setup: dir_sub,
            run: |d, _| {
                std::fs::set_permissions(d.join("sub"), std::fs::Permissions::from_mode(0o700))
                    .expect("chmod")
            },
            expect: &[(Attrib, "sub", true)],
            except: &[],
        },
        Row {
            op: "mkdir",
            setup: nothing,
            run: |d, _| std::fs::create_dir(d.join("sub")).expect("mkdir"),
            expect: &[(Created, "sub", true)],
            except: &[],
        },
        Row {
            op: "rmdir",
            setup: |d| std::fs::create_dir(d.join("sub")).expect("mkdir"),
            run: |d, _| std::fs::remove_dir(d.join("sub")).expect("rmdir"),
            expect: &[(Deleted, "sub", true)],
            except: &[],
        },
        Row {
            op: "unlink a file",
            setup: file_f,
            run: |d, _| std::fs::remove_file(d.join("f")).expect("unlink"),
            expect: &[(Deleted, "f", false)],
            except: &[],
        },
        Row {
            op: "rename a file",
            setup: file_f,
            run: |d, _| std::fs::rename(d.join("f"), d.join("g")).expect("rename"),
            expect: &[(MovedFrom, "f", false), (MovedTo, "g", false)],
            except: &[],
        },
        Row {
            op: "rename a file over another",
            setup: |d| {
                file_f(d);
                std::fs::write(d.join("g"), "other").expect("write g");
            },
            run: |d, _| std::fs::rename(d.join("f"), d.join("g")).expect("rename"),
            expect: &[(MovedFrom, "f", false), (MovedTo, "g", false)],
            except: &[],
        },
        Row {
            op: "rename a directory",
            setup: dir_sub,
            run: |d, _| std::fs::rename(d.join("sub"), d.join("moved")).expect("rename"),
            expect: &[(MovedFrom, "sub", true), (MovedTo, "moved", true)],
            except: &[],
        },
        Row {
            op: "move a directory out of the tree",
            setup: dir_sub,
            run: |d, outside| std::fs::rename(d.join("sub"), outside.join("out")).expect("mv"),
            expect: &[(MovedFrom, "sub", true)],
            except: &[],
        },
        Row {
            op: "move a directory into the tree",
            setup: nothing,
            run: |d, outside| {
                let from = outside.join("in");
                std::fs::create_dir(&from).expect("mkdir outside");
                std::fs::write(from.join("inner"), "x").expect("write outside");
                std::fs::rename(&from, d.join("in")).expect("mv");
            },
            expect: &[(MovedTo, "in", true)],
            except: &[],
        },
        Row {
            op: "hard link",
            setup: file_f,
            run: |d, _| std::fs::hard_link(d.join("f"), d.join("link")).expect("link"),
            expect: &[(Created, "link", false)],
            except: &[],
        },
        Row {
            op: "symlink",
            setup: nothing,
            run: |d, _| std::os::unix::fs::symlink("target", d.join("sym")).expect("symlink"),
            expect: &[(Created, "sym", false)],
            except: &[],
        },
        Row {
            op: "remove a tree (rm -r)",
            setup: dir_sub,
            run: |d, _| std::fs::remove_dir_all(d.join("sub")).expect("rm -r"),
            expect: &[(Deleted, "sub/inner", false), (Deleted, "sub", true)],
            except: &[(
                Variant::Fanotify,
                &[(Deleted, "sub", true)],
                "an event names its directory by handle, resolved when it is read: once the \
                 directory is gone the events inside it are dropped, and its own deletion \
                 (rsync deletes the whole subtree) covers them",
            )],
        },
        Row {
            op: "unlink and chmod through a directory opened without O_DIRECTORY, its fd number \
                 then taken by another directory (as shutil.rmtree and find -delete open them)",
            setup: dir_sub,
            run: |d, _| {
                let dir = File::open(d.join("sub")).expect("open sub read-only");
                nix::sys::stat::fchmodat(
                    &dir,
                    "inner",
                    nix::sys::stat::Mode::from_bits_truncate(0o600),
                    nix::sys::stat::FchmodatFlags::FollowSymlink,
                )
                .expect("fchmodat");
                nix::unistd::unlinkat(&dir, "inner", nix::unistd::UnlinkatFlags::NoRemoveDir)
                    .expect("unlinkat");
                drop(dir);
                // Usually the lowest free fd, so the one just closed: were the path read
                // from /proc when the record is read, it would name this directory.
                let other = File::open(d).expect("open the row's directory");
                std::thread::sleep(Duration::from_millis(300));
                drop(other);
            },
            expect: &[(Attrib, "sub/inner", false), (Deleted, "sub/inner", false)],
            except: &[],
        },
    ]
}

/// The options `WATCHER_E2E_BACKEND` and `WATCHER_E2E_EBPF_PROBES` ask for.
fn options() -> BackendOptions {
    let kind = match harness::backend().as_deref() {
        None => BackendKind::Auto,
        Some("fanotify") => BackendKind::Fanotify,
        Some("inotify") => BackendKind::Inotify,
        Some("ebpf") => BackendKind::Ebpf,
        Some(other) => panic!("WATCHER_E2E_BACKEND={other}: not a backend"),
    };
    let probes = match std::env::var("WATCHER_E2E_EBPF_PROBES").as_deref() {
        Ok("vfs") => ProbeChoice::Vfs,
        Ok("syscalls") => ProbeChoice::Syscalls,
        _ => ProbeChoice::Auto,
    };
    BackendOptions {
        kind,
        ebpf: EbpfOptions {
            probes,
            ..EbpfOptions::default()
        },
        ..BackendOptions::default()
    }
}

fn describe(e: &Event) -> String {
    match e {
        Event::Change {
            kind, path, is_dir, ..
        } => format!(
            "{kind:?} {}{}",
            path.display(),
            if *is_dir { "/" } else { "" }
        ),
        other => format!("{other:?}"),
    }
}

#[test]
fn every_backend_reports_each_file_operation() {
    let Some(_timer) = harness::begin("every_backend_reports_each_file_operation") else {
        return;
    };
    let scratch = Scratch::new("operations");
    let root = scratch.src.canonicalize().expect("canonical root");
    let outside = scratch.dst.canonicalize().expect("canonical outside");
    let rows = table();
    let dir_of = |i: usize| root.join(format!("row{i:02}"));
    for (i, row) in rows.iter().enumerate() {
        std::fs::create_dir(dir_of(i)).expect("row directory");
        (row.setup)(&dir_of(i));
    }

    // No process is the test's own: its operations are what is watched.
    let started = backend::start(&options(), std::slice::from_ref(&root), Arc::default())
        .expect("backend starts");
    let variant = Variant::of(started.variant());
    eprintln!("operations table against {}", started.variant());
    let (tx, events) = mpsc::channel::<Vec<Event>>();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        std::thread::spawn(move || started.run(&mut |batch| tx.send(batch).is_ok(), &stop))
    };

    let mut failures = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let dir = dir_of(i);
        let (expect, why) = match row.except.iter().find(|(v, _, _)| *v == variant) {
            Some((_, instead, why)) => (*instead, Some(*why)),
            None => (row.expect, None),
        };
        let want: Vec<(ChangeKind, PathBuf, bool)> = expect
            .iter()
            .map(|(kind, rel, is_dir)| (*kind, dir.join(rel), *is_dir))
            .collect();
        (row.run)(&dir, &outside);

        // Wait for the expected events in order; others may come between.
        let deadline = Instant::now() + EVENT_TIMEOUT;
        let mut seen: Vec<Event> = Vec::new();
        let mut next = 0;
        while next < want.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(batch) = events.recv_timeout(left) else {
                break;
            };
            for e in batch {
                let inside = match &e {
                    Event::Change { path, .. }
                    | Event::Rescan { path }
                    | Event::OtherNamesChanged { path, .. } => path.starts_with(&dir),
                    Event::Renamed { from, .. } => from.starts_with(&dir),
                    Event::Overflow => true,
                };
                if !inside {
                    continue;
                }
                if let (
                    Some((kind, path, is_dir)),
                    Event::Change {
                        kind: k,
                        path: p,
                        is_dir: d,
                        ..
                    },
                ) = (want.get(next), &e)
                    && k == kind
                    && p == path
                    && d == is_dir
                {
                    next += 1;
                }
                seen.push(e);
            }
        }
        let seen: Vec<String> = seen.iter().map(describe).collect();
        eprintln!("{:?} {}: {seen:?}", variant, row.op);
        if next < want.len() {
            failures.push(format!(
                "{:?}, {}: missing {:?}{}; saw {seen:?}",
                variant,
                row.op,
                &expect[next..],
                why.map(|w| format!(" (exception: {w})"))
                    .unwrap_or_default(),
            ));
        }
    }
    stop.store(true, Ordering::Relaxed);
    reader
        .join()
        .expect("reader thread")
        .expect("backend ran without error");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
