//! The results tables (Markdown) and the command lines behind them.

use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use crate::comp::Comp;

/// How the values of a column are shown.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Unit {
    /// Seconds, shown as ms or s.
    Secs,
    /// A count.
    Count,
    /// KiB (possibly negative), shown as KiB or MiB.
    Kib,
    /// KiB, shown as KiB or MiB without a sign.
    Size,
    /// A plain number with one decimal.
    Num,
}

impl Unit {
    fn show(self, v: f64) -> String {
        match self {
            Unit::Secs => dur(Duration::from_secs_f64(v.max(0.0))),
            Unit::Count => thousands(v.round().max(0.0) as usize),
            Unit::Kib => mib(v.round() as i64),
            Unit::Size => mib(v.round() as i64).trim_start_matches('+').to_owned(),
            Unit::Num => {
                if v.abs() >= 100.0 {
                    thousands(v.round().max(0.0) as usize)
                } else {
                    format!("{v:.2}")
                }
            }
        }
    }
}

/// Values of one cell, one per repeated run (None: the run failed or did not finish).
pub type Vals = Vec<Option<f64>>;

/// One line of a scenario's table: a competitor in a group (tree size, cache state...).
pub struct Line {
    pub group: String,
    pub comp: Comp,
    pub cells: Vec<Vals>,
}

/// One scenario's table.
pub struct Section {
    pub title: String,
    pub intro: Vec<String>,
    /// (name, unit, whether ratios are meaningful)
    pub columns: Vec<(String, Unit, bool)>,
    pub lines: Vec<Line>,
    /// Pairs (a, b) whose ratios a / b are shown under the table.
    pub ratios: Vec<(Comp, Comp)>,
    /// What the ratios mean, shown above them.
    pub ratio_note: String,
}

/// The ratios of most sections: the scripts and lsyncd against each watcher backend.
const RATIOS: [(Comp, Comp); 4] = [
    (Comp::PerEvent, Comp::Fanotify),
    (Comp::Lsyncd, Comp::Fanotify),
    (Comp::PerEvent, Comp::Inotify),
    (Comp::Lsyncd, Comp::Inotify),
];

impl Section {
    pub fn new(title: &str, intro: Vec<String>, columns: &[(&str, Unit, bool)]) -> Self {
        Self {
            title: title.to_owned(),
            intro,
            columns: columns
                .iter()
                .map(|(n, u, r)| ((*n).to_owned(), *u, *r))
                .collect(),
            lines: Vec::new(),
            ratios: RATIOS.to_vec(),
            ratio_note: "Ratios (competitor / watcher, of the medians; per-run range in brackets; above 1 means watcher is lower):".to_owned(),
        }
    }

    /// Shows the ratios of these pairs instead, explained by `note`.
    pub fn with_ratios(mut self, pairs: &[(Comp, Comp)], note: &str) -> Self {
        self.ratios = pairs.to_vec();
        self.ratio_note = note.to_owned();
        self
    }

    /// The line of `comp` in `group`, created empty if missing.
    pub fn line(&mut self, group: &str, comp: Comp) -> &mut Line {
        let n = self.columns.len();
        let i = match self
            .lines
            .iter()
            .position(|l| l.group == group && l.comp == comp)
        {
            Some(i) => i,
            None => {
                self.lines.push(Line {
                    group: group.to_owned(),
                    comp,
                    cells: vec![Vec::new(); n],
                });
                self.lines.len() - 1
            }
        };
        &mut self.lines[i]
    }

    /// Adds the value of one run to a cell.
    pub fn push(&mut self, group: &str, comp: Comp, col: usize, v: Option<f64>) {
        self.line(group, comp).cells[col].push(v);
    }

    fn render(&self, out: &mut String) {
        out.push_str(&format!("\n## {}\n\n", self.title));
        for p in &self.intro {
            out.push_str(p);
            out.push_str("\n\n");
        }
        let groups = self.groups();
        let show_group = groups.len() > 1 || groups.first().is_some_and(|g| !g.is_empty());
        let mut head: Vec<String> = Vec::new();
        if show_group {
            head.push("case".to_owned());
        }
        head.push("competitor".to_owned());
        head.extend(self.columns.iter().map(|c| c.0.clone()));
        out.push_str(&row_line(&head));
        out.push_str(&row_line(&vec!["---".to_owned(); head.len()]));
        for l in &self.lines {
            let mut r = Vec::new();
            if show_group {
                r.push(l.group.clone());
            }
            r.push(l.comp.name().to_owned());
            for (c, vals) in l.cells.iter().enumerate() {
                r.push(show_vals(vals, self.columns[c].1));
            }
            out.push_str(&row_line(&r));
        }
        self.render_ratios(out, show_group);
    }

    fn groups(&self) -> Vec<String> {
        let mut g: Vec<String> = Vec::new();
        for l in &self.lines {
            if !g.contains(&l.group) {
                g.push(l.group.clone());
            }
        }
        g
    }

    fn find(&self, group: &str, comp: Comp) -> Option<&Line> {
        self.lines
            .iter()
            .find(|l| l.group == group && l.comp == comp)
    }

    /// Ratios competitor / watcher of the medians, with the range of the per-run ratios.
    fn render_ratios(&self, out: &mut String, show_group: bool) {
        let pairs = &self.ratios;
        let mut rows = Vec::new();
        for g in self.groups() {
            for (c, col) in self.columns.iter().enumerate() {
                if !col.2 {
                    continue;
                }
                let cells: Vec<String> = pairs
                    .iter()
                    .map(|(a, b)| match (self.find(&g, *a), self.find(&g, *b)) {
                        (Some(a), Some(b)) => ratio_cell(&a.cells[c], &b.cells[c]),
                        _ => String::new(),
                    })
                    .collect();
                if cells.iter().all(String::is_empty) {
                    continue;
                }
                let mut r = Vec::new();
                if show_group {
                    r.push(g.clone());
                }
                r.push(col.0.clone());
                r.extend(cells);
                rows.push(r);
            }
        }
        if rows.is_empty() {
            return;
        }
        out.push_str(&format!("\n{}\n\n", self.ratio_note));
        let mut head = Vec::new();
        if show_group {
            head.push("case".to_owned());
        }
        head.push("metric".to_owned());
        head.extend(
            pairs
                .iter()
                .map(|(a, b)| format!("{} / {}", a.name(), b.name())),
        );
        out.push_str(&row_line(&head));
        out.push_str(&row_line(&vec!["---".to_owned(); head.len()]));
        for r in rows {
            out.push_str(&row_line(&r));
        }
    }
}

fn row_line(cells: &[String]) -> String {
    let cells: Vec<String> = cells.iter().map(|c| cell(c)).collect();
    format!("| {} |\n", cells.join(" | "))
}

/// Median of the values that are present.
pub fn median(vals: &Vals) -> Option<f64> {
    let mut v: Vec<f64> = vals.iter().flatten().copied().collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// `median [min–max]` over the runs, and how many runs failed.
fn show_vals(vals: &Vals, unit: Unit) -> String {
    let ok: Vec<f64> = vals.iter().flatten().copied().collect();
    let failed = vals.len() - ok.len();
    let mut s = match median(vals) {
        None if vals.is_empty() => return String::new(),
        None => "failed".to_owned(),
        Some(m) => {
            let lo = ok.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = ok.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            if ok.len() > 1 {
                format!("{} [{}–{}]", unit.show(m), unit.show(lo), unit.show(hi))
            } else {
                unit.show(m)
            }
        }
    };
    if failed > 0 {
        s.push_str(&format!(" ({failed} of {} runs failed)", vals.len()));
    }
    s
}

fn ratio_cell(a: &Vals, b: &Vals) -> String {
    let (Some(ma), Some(mb)) = (median(a), median(b)) else {
        return String::new();
    };
    if mb <= 0.0 {
        return String::new();
    }
    let per_run: Vec<f64> = a
        .iter()
        .zip(b)
        .filter_map(|(x, y)| Some((*x)? / (*y).filter(|y| *y > 0.0)?))
        .collect();
    let r = ma / mb;
    if per_run.len() > 1 {
        let lo = per_run.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = per_run.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{} [{}–{}]", fmt_ratio(r), fmt_ratio(lo), fmt_ratio(hi))
    } else {
        fmt_ratio(r)
    }
}

fn fmt_ratio(r: f64) -> String {
    if r >= 10.0 {
        format!("{r:.0}x")
    } else if r >= 0.1 {
        format!("{r:.2}x")
    } else {
        format!("{r:.3}x")
    }
}

#[derive(Default)]
pub struct Report {
    pub header: Vec<String>,
    pub sections: Vec<Section>,
    pub notes: Vec<String>,
    /// (what, exact command lines), in the order they were first run.
    pub commands: Vec<(String, Vec<String>)>,
    /// Free-form Markdown sections after the scenario tables.
    pub extra: Vec<String>,
    /// Plot files written beside the table: (file name, caption).
    pub plots: Vec<(String, String)>,
}

impl Report {
    pub fn note(&mut self, s: impl Into<String>) {
        let s = s.into();
        eprintln!("note: {s}");
        self.notes.push(s);
    }

    /// Records the command lines of `what` (the first run's; later runs differ only in
    /// the tree's directory names).
    pub fn command(&mut self, what: &str, lines: Vec<String>) {
        if !self.commands.iter().any(|(w, _)| w == what) {
            self.commands.push((what.to_owned(), lines));
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::from("# watcher benchmark results\n\n");
        for h in &self.header {
            out.push_str(&format!("- {h}\n"));
        }
        out.push_str("\nCells: median of the repeated runs, [min–max] when there are several.\n");
        for s in &self.sections {
            s.render(&mut out);
        }
        for e in &self.extra {
            out.push_str(e);
        }
        if !self.plots.is_empty() {
            out.push_str("\n## Plots\n\n");
            for (file, caption) in &self.plots {
                out.push_str(&format!("![{caption}]({file})\n\n"));
            }
        }
        if !self.notes.is_empty() {
            out.push_str("\n## Notes\n\n");
            for n in &self.notes {
                out.push_str(&format!("- {n}\n"));
            }
        }
        if !self.commands.is_empty() {
            out.push_str("\n## Command lines\n\n`$WORKDIR` is the benchmark's scratch directory; `src` is the source tree and `dst` the replica of each scenario.\n\n");
            for (what, lines) in &self.commands {
                out.push_str(&format!("- {what}:\n\n  ```sh\n"));
                for l in lines {
                    for part in l.lines() {
                        out.push_str(&format!("  {part}\n"));
                    }
                }
                out.push_str("  ```\n");
            }
        }
        out
    }
}

fn cell(s: &str) -> String {
    if s.is_empty() {
        "-".to_owned()
    } else {
        s.replace('|', "\\|")
    }
}

/// `12.3 ms` below a second, `1.23 s` above.
pub fn dur(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 1.0 {
        format!("{ms:.2} ms")
    } else if ms < 1000.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{:.2} s", d.as_secs_f64())
    }
}

/// A KiB quantity (possibly negative), as KiB below 10 MiB and as MiB above.
pub fn mib(kib: i64) -> String {
    if kib.abs() < 10 * 1024 {
        format!("{kib:+} KiB")
    } else {
        format!("{:+.1} MiB", kib as f64 / 1024.0)
    }
}

/// Thousands separators: 1000000 -> 1,000,000.
pub fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Quotes one word for a POSIX shell if needed.
pub fn sh_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Renders a command line, with the scratch directory shown as `$WORKDIR` and the
/// program shown as `program_name`.
pub fn command_line<I, S>(program_name: &str, args: I, workdir: &Path) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut words = vec![program_name.to_owned()];
    words.extend(
        args.into_iter()
            .map(|a| sh_quote(&a.as_ref().to_string_lossy())),
    );
    hide_workdir(&words.join(" "), workdir)
}

/// Renders `bash -c SCRIPT`, with the script in double quotes when that is safe (it
/// reads better than nested single quotes), and the scratch directory as `$WORKDIR`.
pub fn bash_c_line(script: &str, workdir: &Path) -> String {
    if script.chars().any(|c| "\"$`\\!".contains(c)) {
        command_line("bash", ["-c", script], workdir)
    } else {
        hide_workdir(&format!("bash -c \"{script}\""), workdir)
    }
}

/// Replaces the scratch directory's path by `$WORKDIR`.
pub fn hide_workdir(s: &str, workdir: &Path) -> String {
    let w = workdir.to_string_lossy();
    if w.is_empty() {
        s.to_owned()
    } else {
        s.replace(w.as_ref(), "$WORKDIR")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting() {
        assert_eq!(thousands(1_000_000), "1,000,000");
        assert_eq!(thousands(999), "999");
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("%w%f"), "%w%f");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(dur(Duration::from_millis(1500)), "1.50 s");
        assert_eq!(dur(Duration::from_micros(12_345)), "12.3 ms");
        assert_eq!(
            command_line("watcher", ["sync", "/w/x/src"], Path::new("/w/x")),
            "watcher sync $WORKDIR/src"
        );
        assert_eq!(
            bash_c_line("a '%w' /w/x/s | b", Path::new("/w/x")),
            "bash -c \"a '%w' $WORKDIR/s | b\""
        );
    }
}
