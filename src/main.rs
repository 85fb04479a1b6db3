//! The `tokengate` binary: parse the CLI, set up operational logging, run the command.
//!
//! Owns: argument parsing, tracing set-up and the runtime choice. Everything else is in the
//! library.

use std::process::ExitCode;

use clap::Parser;
use tokengate::cli::{self, Cli, Command, LogFormat};

/// mimalloc instead of glibc malloc: a request allocates many small buffers on the runtime's
/// worker and frees some of them on the audit writer thread; mimalloc's per-thread free lists
/// and cheap cross-thread frees measured faster under load (docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                _ => cli::EXIT_USAGE,
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    init_tracing(cli.log_format);
    let result = match &cli.command {
        Command::Serve | Command::Demo(_) => {
            let rt = match runtime_builder().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    return cli::exit(Err(cli::CliError::failure(format!(
                        "cannot start the runtime: {e}"
                    ))));
                }
            };
            rt.block_on(async {
                match &cli.command {
                    Command::Serve => tokengate::app::serve(cli.config.as_deref()).await,
                    Command::Demo(args) => tokengate::demo::run(&cli::demo_options(args)).await,
                    _ => unreachable!(),
                }
            })
            .map_err(cli::CliError::from)
        }
        _ => cli::run_local(&cli),
    };
    cli::exit(result)
}

/// One tokio worker per CPU this process may run on (`available_parallelism` honours the
/// affinity mask and cgroup CPU quotas). With a single CPU the multi-thread scheduler's
/// cross-thread machinery buys nothing and cost ~20% more CPU per request in the load benchmark
/// (docs/performance.md), so the current-thread scheduler runs everything on the main thread
/// then; blocking store calls still go to tokio's blocking pool either way.
fn runtime_builder() -> tokio::runtime::Builder {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    }
}

/// Operational logs go to stderr: human-readable on a terminal, JSON otherwise or with
/// `--log-format json`; the level comes from `RUST_LOG` (default `info`).
fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
