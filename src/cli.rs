//! The `pgrelay` command line.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::{LogFormat, ServeArgs, Settings};
use crate::tools::bench::BenchArgs;
use crate::tools::dev::{self, DevArgs};
use crate::tools::operator::{HealthArgs, SendArgs, StatusArgs, TailArgs};
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
    /// Manage the HTTP API keys stored in the database (relay.api_keys).
    Keys(KeysArgs),
    /// Send a message: `pgrelay send --to user:alice '{"hi":1}'`.
    Send(SendArgs),
    /// Nodes, connections, backlogs and the oldest pending work.
    Status(StatusArgs),
    /// Print deliveries as they happen.
    Tail(TailArgs),
    /// Ask a node whether it is ready (exit 0) or not (exit 1): for health checks.
    Health(HealthArgs),
    /// Print (or --apply) the grants of the application and auditor roles.
    Grants(crate::tools::grants::GrantsArgs),
}

#[derive(clap::Args, Debug)]
struct KeysArgs {
    /// PostgreSQL connection string.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    #[command(subcommand)]
    action: KeysAction,
}

#[derive(Subcommand, Debug)]
enum KeysAction {
    /// Create a key; it is printed once (only its digest is stored).
    Create { name: String },
    /// Revoke a key: nodes refuse it within seconds, without a restart.
    Revoke { name: String },
    /// List the keys (names and dates, never the keys).
    List,
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
            crate::process::raise_fd_limit();
            let node = node::start(settings).await?;
            tokio::select! {
                () = crate::process::wait_for_signal() => {}
                () = node.stopping() => {}
            }
            node.stop().await
        }
        Command::Migrate(args) => {
            migrated_pool(args.database_url).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Dev(args) => dev::run(args).await,
        Command::Bench(args) => crate::tools::bench::run(*args).await,
        Command::Keys(args) => keys(args).await,
        Command::Send(args) => crate::tools::operator::send(args).await,
        Command::Status(args) => crate::tools::operator::status(args).await,
        Command::Tail(args) => crate::tools::operator::tail(args).await,
        Command::Health(args) => crate::tools::operator::health(args).await,
        Command::Grants(args) => crate::tools::grants::run(args).await,
    }
}

/// Connects to `DATABASE_URL` and applies the migrations.
async fn migrated_pool(database_url: Option<String>) -> anyhow::Result<sqlx::PgPool> {
    let url = database_url
        .filter(|u| !u.trim().is_empty())
        .context("DATABASE_URL is not set: pass --database-url or set DATABASE_URL")?;
    let pool = db::connect_any(&url)
        .await
        .context("cannot connect to the database (DATABASE_URL)")?;
    db::migrate(&pool)
        .await
        .context("database migrations failed")?;
    Ok(pool)
}

async fn keys(args: KeysArgs) -> anyhow::Result<()> {
    let pool = migrated_pool(args.database_url).await?;
    let mut scope = db::scope(&pool).await?;
    match args.action {
        KeysAction::Create { name } => {
            use base64::Engine;
            let key = format!(
                "pgr_{}",
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
            );
            sqlx::query!(
                "INSERT INTO relay.api_keys (name, key_digest) VALUES ($1, $2)",
                name,
                &crate::auth::digest(&key)[..]
            )
            .execute(&mut *scope)
            .await
            .with_context(|| {
                format!("cannot create key {name:?} (does the name exist already?)")
            })?;
            scope.end().await.with_context(|| {
                format!(
                    "key {name:?} may or may not have been created (its commit went unanswered): \
                     revoke it and create another"
                )
            })?;
            println!("{key}");
            eprintln!("key {name:?} created; this is the only time it is shown");
        }
        KeysAction::Revoke { name } => {
            let revoked = sqlx::query!(
                "UPDATE relay.api_keys SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL",
                name
            )
            .execute(&mut *scope)
            .await?
            .rows_affected();
            anyhow::ensure!(revoked == 1, "no live key named {name:?}");
            scope.end().await?;
            println!("key {name:?} revoked");
        }
        KeysAction::List => {
            let keys = sqlx::query!(
                "SELECT name, created_at, revoked_at FROM relay.api_keys ORDER BY name"
            )
            .fetch_all(&mut *scope)
            .await?;
            scope.end().await?;
            for key in keys {
                let state = key
                    .revoked_at
                    .map_or("live".to_owned(), |at| format!("revoked {at}"));
                println!("{}\tcreated {}\t{state}", key.name, key.created_at);
            }
        }
    }
    Ok(())
}
