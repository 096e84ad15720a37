use std::process::ExitCode;

use clap::Parser;
use removebgd::commands;
use removebgd::config::{Cli, Command, ConfigCommand};

#[global_allocator]
static ALLOCATOR: removebgd::memory::Allocator = removebgd::memory::Allocator;

fn main() -> ExitCode {
    keep_buffers_in_heap();
    let cli = Cli::parse();
    removebgd::telemetry::init(cli.global.log_format);
    let result = match cli.command {
        Command::Cut(args) => commands::cut::run(args).map(|s| s.failed.is_empty()),
        Command::Models(cmd) => commands::models::run(cmd).map(|()| true),
        Command::Bench(args) => commands::bench::run(args).map(|()| true),
        Command::Serve(args) => args.resolve().and_then(removebgd::app::serve).map(|()| true),
        Command::Config(ConfigCommand::Print(args)) => args.resolve().map(|s| {
            print!("{}", s.to_toml());
            true
        }),
        Command::Accounts(cmd) => commands::admin::accounts(cmd).map(|()| true),
        Command::Keys(cmd) => commands::admin::keys(cmd).map(|()| true),
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

/// Small and medium blocks stay in one glibc arena that is never trimmed, so they are reused
/// instead of faulted in again; big blocks (activation tensors) bypass glibc (`memory.rs`).
fn keep_buffers_in_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; called first thing, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
