//! The `beamup` binary: parses the command line, sets up logging, and maps
//! the library's errors to one line on stderr and a distinct exit code.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = beamup::cli::Cli::parse();
    init_logging(cli.default_log_level());
    match beamup::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("beamup: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}
