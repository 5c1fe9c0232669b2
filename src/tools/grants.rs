//! `pgrelay grants`: the least-privilege roles around the relay's own.
//!
//! - The relay's role owns the `relay` schema (it runs the migrations and
//!   the nodes); it needs no superuser, only CREATE on the database (or a
//!   `relay` schema created for it).
//! - The application role may call `relay.send_to_user()` and
//!   `relay.publish()` (SECURITY DEFINER, pinned search_path) and nothing
//!   else: it cannot read messages or write any table.
//! - The auditor role may read the audit surface and write nothing.
//!
//! The roles are group roles (NOLOGIN): grant them to the login roles that
//! need them. Creating them needs CREATEROLE; granting on `relay` needs its
//! owner. The statements are printed, or run with `--apply`.

use anyhow::Context;

/// What the auditor may read: the audit views and the tables they explain
/// (never `relay.api_keys` or `relay.idempotency_keys`).
pub const AUDITED: [&str; 15] = [
    "relay.messages",
    "relay.message_states",
    "relay.deliveries",
    "relay.outbox",
    "relay.connections",
    "relay.nodes",
    "relay.subscriptions",
    "relay.streams",
    "relay.message_streams",
    "relay.stream_messages",
    "relay.sweeper",
    "relay.config",
    "relay.queues",
    "relay.queue_entries",
    "relay.queue_consumers",
];

/// The functions the application role may call.
pub const ENTRY_POINTS: [&str; 2] = [
    "relay.send_to_user(text, jsonb, text, interval)",
    "relay.publish(text, jsonb, interval)",
];

#[derive(clap::Args, Debug)]
pub struct GrantsArgs {
    /// The application role: may call relay.send_to_user() and relay.publish().
    #[arg(long, default_value = "pgrelay_app")]
    pub app_role: String,
    /// The read-only auditor role.
    #[arg(long, default_value = "pgrelay_auditor")]
    pub auditor_role: String,
    /// Run the statements on DATABASE_URL (as the relay's role, which owns
    /// the schema) instead of printing them. Roles that do not exist yet are
    /// created, which needs CREATEROLE.
    #[arg(long)]
    pub apply: bool,
    /// PostgreSQL connection string (with --apply).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
}

/// `name` as an SQL identifier.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `name` as an SQL string literal.
fn literal(name: &str) -> String {
    format!("'{}'", name.replace('\'', "''"))
}

/// The statements, in order, each complete.
pub fn statements(app_role: &str, auditor_role: &str) -> Vec<String> {
    let (app, auditor) = (ident(app_role), ident(auditor_role));
    let mut sql = Vec::new();
    for (role, name) in [(&app, app_role), (&auditor, auditor_role)] {
        sql.push(format!(
            "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {}) THEN \
             CREATE ROLE {role} NOLOGIN; END IF; END $$",
            literal(name)
        ));
    }
    sql.push(format!("GRANT USAGE ON SCHEMA relay TO {app}, {auditor}"));
    sql.push(format!(
        "GRANT EXECUTE ON FUNCTION {} TO {app}",
        ENTRY_POINTS.join(", ")
    ));
    sql.push(format!(
        "GRANT SELECT ON {} TO {auditor}",
        AUDITED.join(", ")
    ));
    sql
}

pub async fn run(args: GrantsArgs) -> anyhow::Result<()> {
    for role in [&args.app_role, &args.auditor_role] {
        anyhow::ensure!(
            !role.is_empty() && role.len() <= 63,
            "role names are 1 to 63 bytes: {role:?}"
        );
        // Quoted as an identifier and a literal everywhere, but also inside a
        // dollar-quoted DO block, which a `$` could end.
        anyhow::ensure!(
            !role.contains('$') && !role.chars().any(char::is_control),
            "role names may not contain `$` or control characters: {role:?}"
        );
    }
    let statements = statements(&args.app_role, &args.auditor_role);
    if !args.apply {
        println!("-- pgrelay grants: run as the role that owns the relay schema");
        println!("-- (creating the roles needs CREATEROLE; they are skipped where they exist).");
        for statement in statements {
            println!("{statement};");
        }
        return Ok(());
    }
    let url = args
        .database_url
        .filter(|url| !url.trim().is_empty())
        .context("DATABASE_URL is not set: pass --database-url or set DATABASE_URL")?;
    let pool = crate::db::connect_any(&url)
        .await
        .context("cannot connect to the database (DATABASE_URL)")?;
    let mut tx = crate::db::begin(&pool).await?;
    for statement in &statements {
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement.clone()))
            .execute(&mut *tx)
            .await
            .with_context(|| format!("{statement} failed"))?;
    }
    tx.commit().await?;
    pool.close().await;
    println!(
        "granted: {} may call {}; {} may read {}",
        args.app_role,
        ENTRY_POINTS.join(" and "),
        args.auditor_role,
        AUDITED.join(", ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_names_are_quoted_as_identifiers_and_literals() {
        let sql = statements("app\"; DROP TABLE x; --", "o'brien").join(";\n");
        assert!(sql.contains("CREATE ROLE \"app\"\"; DROP TABLE x; --\" NOLOGIN"));
        assert!(sql.contains("rolname = 'o''brien'"));
        assert!(sql.contains("TO \"o'brien\""));
    }
}
