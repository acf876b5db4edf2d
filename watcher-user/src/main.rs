use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use watcher::cli::{Cli, Command, ConfigCommand, SyncArgs};
use watcher::config::{self, Config, DaemonConfig};
use watcher::daemon::{self, RunOptions};
use watcher::words::counted;

fn main() -> ExitCode {
    let cli = Cli::parse();
    watcher::logging::init(cli.verbose, cli.quiet);
    match run(cli.command) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::from(1)
        }
    }
}

/// `watcher sync SRC DST ...` is a one-group configuration built from the command line,
/// checked by the same rules as the configuration file.
fn sync_config(args: SyncArgs) -> anyhow::Result<(Config, RunOptions)> {
    let config = args.config()?;
    let opts = RunOptions {
        config_path: None,
        // A dry run changes nothing, its journal included: marking it clean after a dry
        // recovery pass would make the next real start skip the re-sync.
        journal: args.state_dir.is_some() && !args.dry_run,
        status: args.status_socket.is_some(),
        dry_run: args.dry_run,
    };
    Ok((config, opts))
}

/// `watcher status --wait-in-step`: the last snapshot and the exit code (0 in step, 3 timed
/// out, 4 a target failed), with the targets that are not in step on stderr.
fn wait_in_step(
    socket: &std::path::Path,
    timeout: Option<Duration>,
) -> anyhow::Result<(watcher::status::StatusSnapshot, i32)> {
    use watcher::status::InStep;
    let (snapshot, verdict) = watcher::status::wait_in_step(socket, timeout)?;
    let code = match verdict {
        InStep::All => 0,
        InStep::Waiting(targets) => {
            let waited = humantime::format_duration(timeout.unwrap_or_default());
            eprintln!("watcher: not in step after {waited}:");
            for t in targets {
                eprintln!("  {t}");
            }
            3
        }
        InStep::Stale => {
            let waited = humantime::format_duration(timeout.unwrap_or_default());
            eprintln!("watcher: the daemon published no status within {waited}");
            3
        }
        InStep::Failed(targets) => {
            eprintln!("watcher: stopped on a fatal error, will not get in step:");
            for t in targets {
                eprintln!("  {t}");
            }
            4
        }
    };
    Ok((snapshot, code))
}

fn run(command: Command) -> anyhow::Result<i32> {
    match command {
        Command::Sync(args) => {
            let (config, opts) = sync_config(args)?;
            daemon::run(config, opts)
        }
        Command::Run(args) => {
            let config = config::load(&args.config)?;
            let opts = RunOptions {
                config_path: Some(args.config),
                journal: !args.dry_run,
                status: true,
                dry_run: args.dry_run,
            };
            daemon::run(config, opts)
        }
        Command::Config(ConfigCommand::Check { config }) => {
            let cfg = match config::load(&config) {
                Ok(cfg) => cfg,
                Err(e) => {
                    // One error per line, each naming its file and line, then the count.
                    let text = e.to_string();
                    for line in text.lines() {
                        eprintln!("{line}");
                    }
                    let errors = counted(text.lines().count() as u64, "error", "errors");
                    eprintln!("{}: {errors}", config.display());
                    return Ok(1);
                }
            };
            println!("{}: ok", cfg.path.display());
            for g in &cfg.groups {
                println!(
                    "  sync {}: {} -> {}, {}",
                    g.name,
                    g.source.display(),
                    counted(g.targets.len() as u64, "target", "targets"),
                    counted(g.excludes.patterns().len() as u64, "exclude", "excludes")
                );
                for t in &g.targets {
                    println!("    target {}: {}", t.name, t.dest);
                }
            }
            Ok(0)
        }
        Command::Status(args) => {
            let socket = match (args.socket, args.config) {
                (Some(socket), _) => socket,
                (None, Some(config)) => {
                    config::load(&config)
                        .with_context(|| {
                            format!("finding the status socket in {}", config.display())
                        })?
                        .daemon
                        .status_socket
                }
                (None, None) => DaemonConfig::default().status_socket,
            };
            let (snapshot, code) = if args.wait_in_step {
                wait_in_step(&socket, args.timeout)?
            } else {
                (watcher::status::query(&socket, Duration::from_secs(5))?, 0)
            };
            if args.json {
                println!("{}", serde_json::to_string_pretty(&snapshot)?);
            } else {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                print!("{}", watcher::status::render(&snapshot, now));
            }
            Ok(code)
        }
        Command::Watch(args) => {
            watcher::watch::run_watch(&args.paths, args.options(), &args.backend_options())
        }
        Command::Check(args) => {
            let paths = if args.paths.is_empty() {
                vec![std::env::current_dir()?]
            } else {
                args.paths
            };
            let rows = watcher::backend::check(&paths);
            println!("{:<9} {:<4} {:<30} detail", "backend", "ok", "path");
            for row in &rows {
                let path = row
                    .path
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "(kernel)".into());
                println!(
                    "{:<9} {:<4} {:<30} {}",
                    row.backend,
                    if row.ok { "yes" } else { "no" },
                    path,
                    row.detail
                );
            }
            println!("\neffective capabilities of this process:");
            for line in watcher::caps::report(watcher::caps::effective()) {
                println!("  {line}");
            }
            let lost = watcher::check::unwatchable(&rows, &paths, |p| {
                std::fs::metadata(p).is_ok_and(|m| m.is_dir())
            });
            for path in &lost {
                eprintln!("watcher check: no backend can watch {}", path.display());
            }
            Ok(if lost.is_empty() { 0 } else { 1 })
        }
        Command::Completions(args) => {
            watcher::docs::completions(args.shell, &mut std::io::stdout())?;
            Ok(0)
        }
        Command::Man(args) => {
            match args.dir {
                Some(dir) => {
                    for page in watcher::docs::write_man_pages(&dir)
                        .with_context(|| format!("writing man pages to {}", dir.display()))?
                    {
                        println!("{}", page.display());
                    }
                }
                None => watcher::docs::man_page(&mut std::io::stdout())?,
            }
            Ok(0)
        }
    }
}
