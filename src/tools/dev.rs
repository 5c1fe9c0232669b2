//! `pgrelay dev`: the zero-setup demo. Two nodes on one throwaway PostgreSQL
//! (or on `DATABASE_URL`), authentication off, the demo page on both.

use std::net::{IpAddr, SocketAddr};

use anyhow::Context;

use crate::config::{NodeId, Settings};
use crate::process::wait_for_signal;
use crate::tools::pgtemp::{self, TempPostgres};
use crate::{db, node};

#[derive(clap::Args, Debug, Clone)]
pub struct DevArgs {
    /// Use this database instead of starting a throwaway one.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Address to serve on; the nodes take `--port` and the port after it.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,

    #[arg(long, default_value_t = 8080)]
    pub port: u16,

    /// Only start the throwaway database (migrated), print its URL and wait:
    /// for `cargo sqlx prepare` and similar.
    #[arg(long)]
    pub db_only: bool,
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let (database_url, postgres) = match args.database_url.filter(|u| !u.is_empty()) {
        Some(url) => (url, None),
        None => {
            eprintln!("starting a throwaway PostgreSQL from this machine's binaries…");
            let postgres =
                tokio::task::spawn_blocking(|| TempPostgres::start(pgtemp::Options::default()))
                    .await?
                    .map_err(anyhow::Error::msg)?;
            (postgres.url("postgres"), Some(postgres))
        }
    };

    if args.db_only {
        let pool = db::connect(&Settings::new(&database_url)).await?;
        db::migrate(&pool)
            .await
            .context("database migrations failed")?;
        pool.close().await;
        println!("DATABASE_URL={database_url}");
        wait_for_signal().await;
        drop(postgres);
        return Ok(());
    }

    let mut nodes = Vec::new();
    for (index, name) in ["dev-a", "dev-b"].into_iter().enumerate() {
        let mut settings = Settings::new(&database_url);
        settings.node_id = NodeId::parse(name).map_err(anyhow::Error::msg)?;
        settings.listen = SocketAddr::new(args.host, args.port + index as u16);
        settings.exposure.demo = true;
        nodes.push(node::start(settings).await?);
    }
    println!("pgrelay dev: two nodes on one database, authentication off");
    for node in &nodes {
        println!("  {}  http://{}/", node.node_id(), node.addr);
    }
    println!("  database  {database_url}");
    println!(
        "Open http://{}/ : the demo page puts a client on each node. Ctrl-C stops.",
        nodes[0].addr
    );
    wait_for_signal().await;
    for node in nodes {
        if let Err(error) = node.stop().await {
            eprintln!("pgrelay: {error:#}");
        }
    }
    // Stops the throwaway server and removes its files.
    drop(postgres);
    Ok(())
}
