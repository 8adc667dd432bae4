//! The `beamup` binary: parses the command line, sets up logging, and maps
//! the library's errors to one line on stderr and a distinct exit code.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = beamup::cli::Cli::parse();
    beamup::logging::init(
        cli.default_log_level(),
        cfg!(feature = "color") && std::io::IsTerminal::is_terminal(&std::io::stderr()),
    );
    match beamup::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("beamup: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
