//! The `leaktrace` binary: parse the command line, run the daemon, map the outcome
//! to an exit code. Errors are one line on stderr, never a panic or a backtrace.

use std::{io::Write as _, process::ExitCode};

use clap::Parser as _;
use leaktrace::{
    cli::Args,
    config::{Config, Mode},
    kernel, user,
};

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        2 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    env_logger::Builder::new()
        .filter_level(level)
        .parse_env("LEAKTRACE_LOG")
        .format(|f, record| {
            writeln!(
                f,
                "leaktrace: {}: {}",
                record.level().as_str().to_lowercase(),
                record.args()
            )
        })
        .init();
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.verbose);
    let config = match Config::from_args(args) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("leaktrace: error: {err}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("leaktrace")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("leaktrace: error: cannot start the async runtime: {err}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async move {
        match config.mode {
            Mode::Kernel => kernel::run(config).await,
            _ => user::run(config).await,
        }
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(err) => {
            eprintln!("leaktrace: error: {}", one_line(&err));
            ExitCode::from(1)
        }
    }
}

/// The error and its causes on one line, each cause once: a message that already
/// quotes its cause (`cannot start X: Permission denied (os error 13)`) is not
/// followed by the same cause again.
fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string().replace('\n', " ");
        if line.contains(text.trim()) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(text.trim());
    }
    line
}
