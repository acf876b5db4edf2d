use std::process::ExitCode;

use clap::Parser;
use watcher::cli::{Cli, Command};
use watcher::daemon::{SyncConfig, run_sync};
use watcher::flush::FlushConfig;
use watcher::rsync::RsyncOptions;
use watcher::target::Target;

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

fn run(command: Command) -> anyhow::Result<i32> {
    match command {
        Command::Sync(args) => {
            let source = args
                .source
                .canonicalize()
                .map_err(|e| anyhow::anyhow!("source {}: {e}", args.source.display()))?;
            if !source.is_dir() {
                anyhow::bail!("source {} is not a directory", source.display());
            }
            let target = Target::parse(&args.target)?;
            let cfg = SyncConfig {
                source,
                targets: vec![target],
                excludes: args.excludes,
                flush: FlushConfig {
                    delay: std::time::Duration::from_millis(args.delay),
                    max_delay: std::time::Duration::from_millis(args.max_delay.max(args.delay)),
                    max_batch: args.max_batch.max(1),
                },
                backend: args.backend,
                initial_sync: !args.no_initial_sync,
                rsync: RsyncOptions {
                    binary: args.rsync,
                    hardlinks: args.hard_links,
                    excludes: Vec::new(),
                    extra_args: args.rsync_args,
                    dry_run: args.dry_run,
                },
            };
            run_sync(cfg)
        }
        Command::Watch(args) => watcher::watch::run_watch(&args.paths, args.format, args.backend),
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
            Ok(if rows.iter().any(|r| r.ok) { 0 } else { 1 })
        }
    }
}
