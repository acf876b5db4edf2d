//! The results table and the command lines behind it.

use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

/// One line of the results table.
pub struct Row {
    pub metric: String,
    pub watcher: String,
    pub script: String,
    pub goal: String,
    pub ratio: String,
}

/// A table of its own, after the main one, for comparisons with other columns.
pub struct Table {
    pub title: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

#[derive(Default)]
pub struct Report {
    pub rows: Vec<Row>,
    pub tables: Vec<Table>,
    pub notes: Vec<String>,
    /// (what, exact command line), in the order they were first run.
    pub commands: Vec<(String, String)>,
}

impl Report {
    pub fn row(
        &mut self,
        metric: impl Into<String>,
        watcher: impl Into<String>,
        script: impl Into<String>,
        goal: impl Into<String>,
        ratio: impl Into<String>,
    ) {
        self.rows.push(Row {
            metric: metric.into(),
            watcher: watcher.into(),
            script: script.into(),
            goal: goal.into(),
            ratio: ratio.into(),
        });
    }

    pub fn table(&mut self, table: Table) {
        self.tables.push(table);
    }

    pub fn note(&mut self, s: impl Into<String>) {
        let s = s.into();
        eprintln!("note: {s}");
        self.notes.push(s);
    }

    /// Records a command line once per `what`.
    pub fn command(&mut self, what: &str, line: String) {
        if !self.commands.iter().any(|(w, l)| w == what && *l == line) {
            self.commands.push((what.to_owned(), line));
        }
    }

    pub fn render(&self, header: &[String]) -> String {
        let mut out = String::from("# watcher benchmark\n\n");
        for h in header {
            out.push_str(&format!("- {h}\n"));
        }
        out.push('\n');
        out.push_str(
            "| metric | watcher | inotifywait script | goal | ratio (script / watcher) |\n",
        );
        out.push_str("| --- | --- | --- | --- | --- |\n");
        for r in &self.rows {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                cell(&r.metric),
                cell(&r.watcher),
                cell(&r.script),
                cell(&r.goal),
                cell(&r.ratio)
            ));
        }
        for t in &self.tables {
            out.push_str(&format!("\n{}:\n\n", t.title));
            let line = |cells: &[String]| {
                let cells: Vec<String> = cells.iter().map(|c| cell(c)).collect();
                format!("| {} |\n", cells.join(" | "))
            };
            out.push_str(&line(&t.columns));
            out.push_str(&line(&vec!["---".to_owned(); t.columns.len()]));
            for r in &t.rows {
                out.push_str(&line(r));
            }
        }
        if !self.notes.is_empty() {
            out.push_str("\nNotes:\n\n");
            for n in &self.notes {
                out.push_str(&format!("- {n}\n"));
            }
        }
        if !self.commands.is_empty() {
            out.push_str("\nCommands (`$WORKDIR` is the benchmark's scratch directory):\n\n");
            for (what, line) in &self.commands {
                out.push_str(&format!("- {what}:\n\n  ```sh\n  {line}\n  ```\n"));
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

/// How many times slower the competitor is.
pub fn ratio(script: Duration, watcher: Duration) -> String {
    if watcher.is_zero() {
        return String::new();
    }
    format!("{:.1}x", script.as_secs_f64() / watcher.as_secs_f64())
}

/// How many times larger `a` is than `b`, for sizes; empty when `b` is too small for
/// the quotient to mean anything (slab readings are noisy below a MiB).
pub fn size_ratio(a: i64, b: i64) -> String {
    if b < 1024 || a < 0 {
        return String::new();
    }
    format!("{:.1}x", a as f64 / b as f64)
}

/// A KiB quantity (possibly negative), as KiB below 10 MiB and as MiB above.
pub fn mib(kib: i64) -> String {
    if kib.abs() < 10 * 1024 {
        format!("{kib:+} KiB")
    } else {
        format!("{:+.1} MiB", kib as f64 / 1024.0)
    }
}

/// An unsigned KiB quantity as MiB.
pub fn mib_abs(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// The goal text, marked met or missed.
pub fn goal(text: &str, met: bool) -> String {
    if met {
        format!("{text} (met)")
    } else {
        format!("{text} (**missed**)")
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
