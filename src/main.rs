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

/// `RUST_LOG` takes `LEVEL` or `target=LEVEL,...` directives (no regex
/// filters: the regex engine would cost a device build about a quarter of
/// its size). A malformed value falls back to the default level.
fn init_logging(default: &str) {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    let fallback = || default.parse::<Targets>().unwrap_or_default();
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse::<Targets>().ok())
        .unwrap_or_else(fallback);
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(
                    cfg!(feature = "color") && std::io::IsTerminal::is_terminal(&std::io::stderr()),
                )
                .with_target(false),
        )
        .with(filter)
        .init();
}
