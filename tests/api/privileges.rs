//! Least privilege: the relay's own role is no superuser and owns its
//! schema; `pgrelay grants` gives an application role only the two SQL entry
//! points and an auditor role only reads; PUBLIC gets nothing.

use std::time::Duration;

use serde_json::json;
use sqlx::{Connection, PgConnection};

use crate::helpers::*;

/// `url` logging in as `user` with `password`.
fn as_user(url: &str, user: &str, password: &str) -> String {
    let mut parsed = url::Url::parse(url).unwrap();
    parsed.set_username(user).unwrap();
    parsed.set_password(Some(password)).unwrap();
    parsed.to_string()
}

async fn exec(pool: &sqlx::PgPool, sql: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// `sql` fails for want of privilege (SQLSTATE 42501).
async fn refused(connection: &mut PgConnection, who: &str, sql: &str) {
    let error = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&mut *connection)
        .await
        .expect_err(&format!("{who} may not: {sql}"));
    let code = error
        .as_database_error()
        .and_then(|e| e.code())
        .map(|c| c.into_owned());
    assert_eq!(code.as_deref(), Some("42501"), "{who}: {sql}: {error}");
}

#[tokio::test]
async fn the_relay_runs_without_superuser_and_each_role_can_do_only_its_part() {
    let db = TestDb::empty().await;
    let tag = format!("{:08x}", rand::random::<u32>());
    let [owner, app, auditor, app_login, auditor_login, stranger] = [
        "relay",
        "app",
        "auditor",
        "app_login",
        "auditor_login",
        "stranger",
    ]
    .map(|r| format!("lp_{tag}_{r}"));
    let password = "pw-0123456789";
    // What an administrator does once: the relay's role, with CREATE on the
    // database and nothing more; the group roles; the login roles in them.
    exec(
        &db.pool,
        &format!(
            "CREATE ROLE {owner} LOGIN PASSWORD '{password}' NOSUPERUSER NOCREATEDB NOCREATEROLE;
         GRANT CREATE ON DATABASE {name} TO {owner};
         CREATE ROLE {app} NOLOGIN; CREATE ROLE {auditor} NOLOGIN;
         CREATE ROLE {app_login} LOGIN PASSWORD '{password}' IN ROLE {app};
         CREATE ROLE {auditor_login} LOGIN PASSWORD '{password}' IN ROLE {auditor};
         CREATE ROLE {stranger} LOGIN PASSWORD '{password}'",
            name = db.name
        ),
    )
    .await;

    // The relay's role migrates and runs a node.
    let owner_url = as_user(&db.url, &owner, password);
    let node = NodeProcess::start(&owner_url, "least-a", &[]).await;
    let schema_owner: String = sqlx::query_scalar(
        "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'relay'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(schema_owner, owner);

    // The grants, applied by the relay's role (the group roles exist: it
    // needs no CREATEROLE).
    let granted = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgrelay"))
        .args([
            "grants",
            "--apply",
            "--app-role",
            &app,
            "--auditor-role",
            &auditor,
        ])
        .env("DATABASE_URL", &owner_url)
        .output()
        .await
        .unwrap();
    assert!(
        granted.status.success(),
        "{}",
        String::from_utf8_lossy(&granted.stderr)
    );

    // The application sends from SQL, in its own transaction, and the user
    // gets it.
    let mut ann = Client::connect(&node.ws_url("user=ann"), &[])
        .await
        .unwrap();
    let mut application = PgConnection::connect(&as_user(&db.url, &app_login, password))
        .await
        .unwrap();
    let mut tx = application.begin().await.unwrap();
    let sent: i64 = sqlx::query_scalar("SELECT relay.send_to_user('ann', $1)")
        .bind(json!({"from": "sql"}))
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(id_of(&ann.next_message().await), sent);
    let _: i64 = sqlx::query_scalar("SELECT relay.publish('news', '1')")
        .fetch_one(&mut application)
        .await
        .unwrap();
    // And nothing else: no message read, no table written, no internal
    // function called.
    for sql in [
        "SELECT * FROM relay.messages",
        "SELECT * FROM relay.deliveries",
        "SELECT * FROM relay.message_states",
        "SELECT * FROM relay.api_keys",
        "INSERT INTO relay.outbox (node_id, kind) VALUES (NULL, 'disconnect')",
        "UPDATE relay.config SET max_message_bytes = 1",
        "DELETE FROM relay.connections",
        "SELECT relay.enqueue(ARRAY['{\"user\":\"ann\"}'::jsonb], ARRAY[NULL::text], ARRAY['1'::jsonb], ARRAY[NULL::interval], 'sql')",
        "SELECT relay.fence('least-a', gen_random_uuid())",
    ] {
        refused(&mut application, "the application role", sql).await;
    }

    // The auditor reads the audit surface.
    let mut audit = PgConnection::connect(&as_user(&db.url, &auditor_login, password))
        .await
        .unwrap();
    eventually_within(
        Duration::from_secs(10),
        "the SQL message recorded delivered",
        || async {
            let recorded: i64 =
                sqlx::query_scalar("SELECT count(*) FROM relay.deliveries WHERE message_id = $1")
                    .bind(sent)
                    .fetch_one(&db.pool)
                    .await
                    .unwrap();
            (recorded == 1).then_some(())
        },
    )
    .await;
    let state: String = sqlx::query_scalar("SELECT state FROM relay.message_states WHERE id = $1")
        .bind(sent)
        .fetch_one(&mut audit)
        .await
        .unwrap();
    assert_eq!(state, "delivered");
    let delivered_to: String = sqlx::query_scalar(
        "SELECT d.user_id FROM relay.deliveries d JOIN relay.messages m ON m.id = d.message_id WHERE m.id = $1",
    )
    .bind(sent)
    .fetch_one(&mut audit)
    .await
    .unwrap();
    assert_eq!(delivered_to, "ann");
    for sql in [
        "SELECT relay.send_to_user('ann', '1')",
        "DELETE FROM relay.deliveries",
        "UPDATE relay.messages SET data = 'null'",
        "SELECT * FROM relay.api_keys",
        "SELECT * FROM relay.idempotency_keys",
    ] {
        refused(&mut audit, "the auditor role", sql).await;
    }

    // PUBLIC: a role that can see the schema but was granted nothing may
    // call neither the entry points nor the internals.
    let owner_pool = sqlx::PgPool::connect(&owner_url).await.unwrap();
    exec(
        &owner_pool,
        &format!("GRANT USAGE ON SCHEMA relay TO {stranger}"),
    )
    .await;
    owner_pool.close().await;
    let mut outsider = PgConnection::connect(&as_user(&db.url, &stranger, password))
        .await
        .unwrap();
    for sql in [
        "SELECT relay.send_to_user('ann', '1')",
        "SELECT relay.publish('news', '1')",
        "SELECT relay.release_node('least-a')",
        "SELECT * FROM relay.outbox",
    ] {
        refused(&mut outsider, "a role granted nothing", sql).await;
    }

    // A role with the tables but not the functions (EXECUTE is no longer
    // PUBLIC's) is told at start, not at its first claim.
    let worker = format!("lp_{tag}_worker");
    exec(&db.pool, &format!(
        "CREATE ROLE {worker} LOGIN PASSWORD '{password}'; GRANT CREATE ON DATABASE {name} TO {worker}",
        name = db.name
    )).await;
    let owner_pool = sqlx::PgPool::connect(&owner_url).await.unwrap();
    exec(&owner_pool, &format!(
        "GRANT USAGE, CREATE ON SCHEMA relay TO {worker}; GRANT ALL ON ALL TABLES IN SCHEMA relay TO {worker};
         GRANT ALL ON ALL SEQUENCES IN SCHEMA relay TO {worker}"
    )).await;
    owner_pool.close().await;
    let refused_start = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgrelay"))
        .args(["serve", "--auth", "none", "--listen", "127.0.0.1:0"])
        .env("DATABASE_URL", as_user(&db.url, &worker, password))
        .output()
        .await
        .unwrap();
    assert_eq!(refused_start.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused_start.stderr);
    assert!(stderr.contains("may not run pgrelay"), "{stderr}");

    drop((application, audit, outsider));
    ann.close().await;
    assert_eq!(node.terminate().await, Some(0));
    db.drop_database().await;
    // Roles are the cluster's: drop them once their database is gone.
    let cleanup = sqlx::PgPool::connect(&admin_url()).await;
    if let Ok(cleanup) = cleanup {
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP ROLE IF EXISTS {app_login}, {auditor_login}, {stranger}, {worker}, {app}, {auditor}, {owner}"
        )))
        .execute(&cleanup)
        .await;
        cleanup.close().await;
    }
}
