//! Where a lone change's latency goes, from the watcher's own `batch timing` lines (one per
//! batch, at debug for `watcher::runner`, times on CLOCK_MONOTONIC like the harness's):
//!
//! - delivery: the write in the harness to the daemon's engine taking the event in (kernel
//!   queue, the backend's read and translation, the hop to the engine);
//! - queued: from there to the batch starting (the flush decision: the settle when the
//!   write had not ended yet, the task start);
//! - planning: replaying renames and turning the batch into rsync runs;
//! - rsync: the rsync processes, spawn to exit, summed;
//! - other: the rest of the batch (between and after the runs);
//! - seen: from the batch's end to the harness reading the new contents (its 0.5 ms poll).

use std::time::Duration;

use crate::comp;

/// The CLOCK_MONOTONIC clock now, in microseconds.
pub fn monotonic_us() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |ts| {
        ts.tv_sec() as u64 * 1_000_000 + ts.tv_nsec() as u64 / 1000
    })
}

/// The parts of one sample, in order.
pub const PARTS: [&str; 6] = ["delivery", "queued", "planning", "rsync", "other", "seen"];

/// One sample's parts (see [`PARTS`]) and the rsync runs of its batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Breakdown {
    pub parts: [Duration; 6],
    pub runs: u64,
}

/// The breakdown of the change written at `wrote_us` and seen on the replica at `seen_us`,
/// from the first `batch timing` line in `lines` whose batch took the change in between.
pub fn find<'a>(
    lines: impl IntoIterator<Item = &'a str>,
    wrote_us: u64,
    seen_us: u64,
) -> Option<Breakdown> {
    lines.into_iter().find_map(|line| {
        if !line.contains("batch timing") {
            return None;
        }
        let get = |key: &str| comp::field(line, key).map(|v| v as u64);
        let taken_in = get("seen_mono_us")?;
        if taken_in < wrote_us || taken_in > seen_us {
            return None;
        }
        let (queued, plan, rsync, total) = (
            get("queued_us")?,
            get("plan_us")?,
            get("rsync_us")?,
            get("total_us")?,
        );
        let us = Duration::from_micros;
        Some(Breakdown {
            parts: [
                us(taken_in - wrote_us),
                us(queued),
                us(plan),
                us(rsync),
                us(total.saturating_sub(queued + plan + rsync)),
                us(seen_us.saturating_sub(taken_in + total)),
            ],
            runs: get("runs")?,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_line_is_split_into_parts() {
        let lines = [
            "2026-12-02T13:00:00Z DEBUG batch timing target=/d seen_mono_us=900 queued_us=1 plan_us=1 rsync_us=1 runs=1 total_us=5",
            "2026-12-02T13:00:00Z DEBUG batch timing target=/d seen_mono_us=1200 queued_us=300 plan_us=400 rsync_us=6000 runs=1 total_us=7000",
            "2026-12-02T13:00:00Z INFO rsync finished target=/d paths=2 code=0",
        ];
        let b = find(lines, 1000, 9000).expect("the second line");
        let ms = |v: u64| Duration::from_micros(v);
        assert_eq!(
            b.parts,
            [ms(200), ms(300), ms(400), ms(6000), ms(300), ms(800)]
        );
        assert_eq!(b.runs, 1);
        // A batch that took the change in before the write is not it.
        assert_eq!(find(lines[..1].iter().copied(), 1000, 9000), None);
    }
}
