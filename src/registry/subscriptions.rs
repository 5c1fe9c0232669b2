//! Subscription rows: a topic subscription is registered (under the topic's
//! stream lock) before it is confirmed, and removed with it.

use sqlx::PgPool;
use uuid::Uuid;

use crate::config::NodeId;

/// Registers `connection`'s subscription to `topic` and returns the topic
/// stream's head: messages up to it were published before the subscription.
pub async fn attach(
    pool: &PgPool,
    connection: Uuid,
    node_id: &NodeId,
    topic: &str,
) -> Result<i64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    // As for connects: a publisher holding the topic in a long transaction
    // must not hang the subscriber forever.
    sqlx::query!("SET LOCAL lock_timeout = '5s'")
        .execute(&mut *tx)
        .await?;
    let head = sqlx::query_scalar!(
        r#"SELECT relay.attach_subscription($1, $2, $3) AS "head!""#,
        connection,
        node_id.as_str(),
        topic
    )
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(head)
}

pub async fn detach(pool: &PgPool, connection: Uuid, topic: &str) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "DELETE FROM relay.subscriptions WHERE connection_id = $1 AND topic = $2",
        connection,
        topic
    )
    .execute(pool)
    .await?;
    Ok(())
}
