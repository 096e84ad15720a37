use std::process::ExitCode;

use clap::Parser;
use removebgd::commands;
use removebgd::config::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    removebgd::telemetry::init(cli.global.log_format);
    let result = match cli.command {
        Command::Cut(args) => commands::cut::run(args).map(|s| s.failed.is_empty()),
        Command::Models(cmd) => commands::models::run(cmd).map(|()| true),
        Command::Bench(args) => commands::bench::run(args).map(|()| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
