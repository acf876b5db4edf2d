//! `watcher watch`: print resolved events under some paths, like `inotifywait -mr`.

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context;

use crate::backend::{self, BackendOptions, OwnPids};
use crate::cli::Format;
use crate::event::Event;
use crate::filter::{Filter, FilterBuilder};

/// One output line for `event` (with its trailing newline), or None if it is outside `filter`.
pub fn format_event(filter: &Filter, event: &Event, format: Format) -> Option<Vec<u8>> {
    let (kind, path, is_dir, pid): (&str, &Path, bool, i32) = match event {
        Event::Change {
            kind,
            path,
            is_dir,
            pid,
        } => {
            filter.lookup(path, *is_dir)?;
            let kind = match kind {
                crate::event::ChangeKind::Created => "created",
                crate::event::ChangeKind::Modified => "modified",
                crate::event::ChangeKind::Attrib => "attrib",
                crate::event::ChangeKind::Deleted => "deleted",
                crate::event::ChangeKind::MovedFrom => "moved_from",
                crate::event::ChangeKind::MovedTo => "moved_to",
            };
            (kind, path.as_path(), *is_dir, *pid)
        }
        // Its MovedFrom and MovedTo were printed already.
        Event::Renamed { .. } => return None,
        Event::Rescan { path } => ("rescan", path.as_path(), true, 0),
        Event::Overflow => ("overflow", Path::new(""), false, 0),
    };
    let mut line = Vec::new();
    match format {
        Format::Text => {
            line.extend_from_slice(kind.as_bytes());
            line.push(b' ');
            line.extend_from_slice(path.as_os_str().as_bytes());
            if is_dir && !path.as_os_str().is_empty() {
                line.push(b'/');
            }
        }
        Format::Json => {
            let mut obj = serde_json::json!({ "kind": kind, "is_dir": is_dir, "pid": pid });
            // JSON strings are Unicode: non-UTF-8 names are given as their bytes instead.
            match path.to_str() {
                Some(p) => obj["path"] = p.into(),
                None => obj["path_bytes"] = path.as_os_str().as_bytes().to_vec().into(),
            }
            line.extend_from_slice(obj.to_string().as_bytes());
        }
    }
    line.push(b'\n');
    Some(line)
}

/// Runs until SIGINT/SIGTERM or until stdout is closed.
pub fn run_watch(
    paths: &[PathBuf],
    format: Format,
    options: &BackendOptions,
) -> anyhow::Result<i32> {
    let mut roots = Vec::new();
    let mut builder = FilterBuilder::new();
    for path in paths {
        let root = path
            .canonicalize()
            .with_context(|| format!("cannot watch {}", path.display()))?;
        builder.add_root(&root, &[])?;
        roots.push(root);
    }
    let filter = builder.build()?;
    let backend = backend::start(options, &roots, Arc::new(OwnPids::new()))?;
    tracing::info!(backend = backend.name(), "watching");

    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone()).context("installing a signal handler")?;
    }
    let stdout = std::io::stdout();
    let mut sink = |events: Vec<Event>| {
        let mut out = stdout.lock();
        for event in &events {
            if let Some(line) = format_event(&filter, event, format)
                && out.write_all(&line).is_err()
            {
                return false;
            }
        }
        out.flush().is_ok()
    };
    backend.run(&mut sink, &stop)?;
    Ok(0)
}
