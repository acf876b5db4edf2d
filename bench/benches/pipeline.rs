//! Throughput of the daemon's per-event work on one core: the filter lookup (which root,
//! excluded or not) and marking the dirty set, on the paths of a generated tree.
//!
//! `cargo bench -p watcher-bench --bench pipeline`; `watcher-bench scale` runs it too and
//! reports events per second per core.

use std::hint::black_box;
use std::path::{Path, PathBuf};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use watcher::dirty::{DirtySet, Scope};
use watcher::filter::{Filter, FilterBuilder};

/// Events per iteration.
const EVENTS: usize = 100_000;

/// Absolute paths of a tree like the harness's: `dNNNN/dNN/fN`, with one in ten paths
/// excluded (`*.tmp`) and a second, unrelated root that no event falls under.
fn paths() -> Vec<PathBuf> {
    (0..EVENTS)
        .map(|i| {
            let ext = if i % 10 == 0 { "tmp" } else { "txt" };
            PathBuf::from(format!(
                "/srv/source/d{:04}/d{:02}/f{}.{ext}",
                i / 1000,
                (i / 10) % 100,
                i % 10
            ))
        })
        .collect()
}

fn filter() -> Filter {
    let mut b = FilterBuilder::new();
    let excludes = [
        "*.tmp".to_owned(),
        "node_modules".to_owned(),
        ".cache/".to_owned(),
    ];
    b.add_root(Path::new("/srv/source"), &excludes)
        .expect("adding the source root");
    b.add_root(Path::new("/srv/other"), &[])
        .expect("adding a second root");
    b.build().expect("building the filter")
}

fn pipeline(c: &mut Criterion) {
    let paths = paths();
    let filter = filter();
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(EVENTS as u64));
    g.bench_function("filter_lookup", |b| {
        b.iter(|| {
            let mut kept = 0usize;
            for p in &paths {
                kept += usize::from(filter.lookup(black_box(p), false).is_some());
            }
            kept
        });
    });
    let rel: Vec<PathBuf> = paths
        .iter()
        .filter_map(|p| filter.lookup(p, false).map(|(_, r)| r.to_owned()))
        .collect();
    g.bench_function("dirty_mark_take", |b| {
        b.iter(|| {
            let mut set = DirtySet::new();
            for r in &rel {
                set.mark(black_box(r), Scope::Entry);
            }
            let n = set.len();
            black_box(set.take());
            n
        });
    });
    g.bench_function("filter_and_mark", |b| {
        b.iter(|| {
            let mut set = DirtySet::new();
            for p in &paths {
                if let Some((_, r)) = filter.lookup(black_box(p), false) {
                    set.mark(r, Scope::Entry);
                }
            }
            black_box(set.take());
        });
    });
    g.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
