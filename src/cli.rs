//! The `pgrelay` command line.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::bench::BenchArgs;
use crate::config::{LogFormat, ServeArgs, Settings};
use crate::dev::{self, DevArgs};
use crate::{db, node, telemetry};

#[derive(Parser, Debug)]
#[command(
    name = "pgrelay",
    version,
    about = "A cluster of WebSocket servers that behaves like one, on PostgreSQL"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a node.
    Serve(Box<ServeArgs>),
    /// Apply the database migrations and exit.
    Migrate(MigrateArgs),
    /// Run a two-node demo cluster (with a throwaway PostgreSQL if DATABASE_URL is unset).
    Dev(DevArgs),
    /// Benchmark a two-node cluster on a throwaway PostgreSQL (see README "Performance").
    Bench(Box<BenchArgs>),
}

#[derive(clap::Args, Debug)]
struct MigrateArgs {
    /// PostgreSQL connection string.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
}

/// Runs the command line; errors end in one line on stderr and exit code 1.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = match &cli.command {
        Command::Serve(args) => args.log_format,
        _ => LogFormat::Text,
    };
    telemetry::init(format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => return fail(&anyhow::Error::from(error)),
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(&error),
    }
}

fn fail(error: &anyhow::Error) -> ExitCode {
    let line = format!("{error:#}").replace('\n', " ");
    eprintln!("pgrelay: error: {line}");
    ExitCode::FAILURE
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => {
            let settings = Settings::from_args(*args).map_err(anyhow::Error::msg)?;
            // Every socket is a file: take what the system allows.
            crate::bench::raise_fd_limit();
            let node = node::start(settings).await?;
            tokio::select! {
                () = dev::wait_for_signal() => {}
                () = node.stopping() => {}
            }
            node.stop().await
        }
        Command::Migrate(args) => {
            let url = args
                .database_url
                .filter(|u| !u.trim().is_empty())
                .context("DATABASE_URL is not set: pass --database-url or set DATABASE_URL")?;
            let pool = db::connect(&Settings::new(url))
                .await
                .context("cannot connect to the database (DATABASE_URL)")?;
            db::migrate(&pool)
                .await
                .context("database migrations failed")?;
            println!("migrations applied");
            Ok(())
        }
        Command::Dev(args) => dev::run(args).await,
        Command::Bench(args) => crate::bench::run(*args).await,
    }
}
