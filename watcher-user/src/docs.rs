//! Shell completions and man pages, generated from the clap definitions in [`crate::cli`],
//! so they never disagree with `--help`.
//!
//! `watcher completions bash|zsh|fish` prints a completion script; `watcher man` prints
//! watcher(1), and `watcher man --dir DIR` writes it and one page per subcommand
//! (`watcher-sync.1`, `watcher-config-check.1`, ...). `cargo xtask install` puts both where
//! the shells and man(1) look.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::Cli;

/// Writes the completion script for `shell` to `out`.
pub fn completions(shell: Shell, out: &mut dyn Write) -> std::io::Result<()> {
    // Generated in memory first: clap_complete panics on a failed write (`| head`).
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "watcher", &mut script);
    out.write_all(&script)
}

/// What watcher(1) says beyond the options: files, signals, environment, exit status.
const EXTRA_SECTIONS: &str = r#".SH FILES
.TP
\fI/etc/watcher/watcher.toml\fR
The configuration of \fBwatcher run\fR (see \fBwatcher config check\fR).
.TP
\fI/var/lib/watcher/\fR
The journals of changes not yet synced, one per target (the \fBstate_dir\fR setting).
.TP
\fI/run/watcher/status.sock\fR
The socket \fBwatcher status\fR asks (the \fBstatus_socket\fR setting).
.SH SIGNALS
.TP
\fBSIGTERM\fR, \fBSIGINT\fR
Stop reading changes, sync what is pending, exit 0. A verify pass under way is stopped at
once; it runs again one interval after the next start. A second signal exits at once.
.TP
\fBSIGHUP\fR
Re-read the configuration without losing pending changes.
.SH ENVIRONMENT
.TP
\fBRUST_LOG\fR
Log filter (\fBdebug\fR, \fBwatcher=trace\fR, ...); overrides \fB-v\fR and \fB-q\fR.
.TP
\fBNO_COLOR\fR
No colours in the log, even on a terminal.
.TP
\fBJOURNAL_STREAM\fR
Set by systemd: when it names the daemon's stderr, the log goes to journald natively
(priorities, and every field as \fBWATCHER_\fR\fINAME\fR), or as lines with syslog
priority prefixes without timestamps.
.TP
\fBNOTIFY_SOCKET\fR
Set by systemd for \fBType=notify\fR: \fBREADY=1\fR once change capture is armed, then
\fBSTATUS=\fR lines on the initial sync and on targets in step or retrying.
.SH EXIT STATUS
0 on a clean stop; 1 when the daemon could not start, its change capture failed, or a
target was given up.
"#;

/// Writes watcher(1): the generated sections, then [`EXTRA_SECTIONS`].
pub fn man_page(out: &mut dyn Write) -> std::io::Result<()> {
    let man = clap_mangen::Man::new(Cli::command());
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    man.render_options_section(out)?;
    man.render_subcommands_section(out)?;
    out.write_all(EXTRA_SECTIONS.as_bytes())?;
    man.render_version_section(out)
}

/// Writes watcher.1 and a page per subcommand into `dir`; returns the files written.
pub fn write_man_pages(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    // Every page but the top one as clap_mangen writes it.
    clap_mangen::generate_to(Cli::command(), dir)?;
    let top = dir.join("watcher.1");
    let mut file = std::fs::File::create(&top)?;
    man_page(&mut file)?;
    file.flush()?;
    let mut written: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("watcher") && n.ends_with(".1"))
        })
        .collect();
    written.sort();
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names of the subcommands, `config check` as `config`.
    fn subcommands() -> Vec<String> {
        Cli::command()
            .get_subcommands()
            .map(|c| c.get_name().to_string())
            .collect()
    }

    #[test]
    fn completions_know_every_subcommand() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut out = Vec::new();
            completions(shell, &mut out).expect("in memory");
            let script = String::from_utf8(out).expect("UTF-8 script");
            for sub in subcommands() {
                assert!(script.contains(&sub), "{shell}: no `{sub}` in\n{script}");
            }
            // An option of a subcommand, and a value of a ValueEnum.
            assert!(script.contains("verify-interval"), "{shell}");
            assert!(script.contains("fanotify"), "{shell}");
        }
    }

    #[test]
    fn man_pages_cover_every_subcommand() {
        let dir = tempfile::tempdir().expect("temp dir");
        let written = write_man_pages(dir.path()).expect("man pages");
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for sub in subcommands() {
            if sub == "help" {
                continue;
            }
            assert!(
                names.contains(&format!("watcher-{sub}.1")),
                "no page for {sub}: {names:?}"
            );
        }
        assert!(names.contains(&"watcher-config-check.1".to_string()));
        let top = std::fs::read_to_string(dir.path().join("watcher.1")).expect("watcher.1");
        assert!(
            top.starts_with(".ie") || top.contains(".TH watcher 1"),
            "{top}"
        );
        for sub in subcommands() {
            assert!(top.contains(&sub), "watcher.1 does not mention {sub}");
        }
        for section in ["FILES", "SIGNALS", "ENVIRONMENT", "EXIT STATUS"] {
            assert!(top.contains(&format!(".SH {section}")), "no {section}");
        }
        let sync = std::fs::read_to_string(dir.path().join("watcher-sync.1")).expect("sync page");
        assert!(sync.contains("verify\\-interval"), "{sync}");
    }
}
