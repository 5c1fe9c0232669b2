//! Subscription rows: a topic subscription (or a queue consumer) is
//! registered (a topic's under its stream lock; both fenced by the node's
//! incarnation) before it is confirmed, and removed with it, or with its
//! connection.

use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

use crate::config::NodeId;
use crate::db::{self, Bounds, CommitError};

/// Why a subscription was not registered.
#[derive(Debug, thiserror::Error)]
pub enum SubscribeFailure {
    #[error("the node is registering again")]
    Fenced,
    #[error("the subscription could not be registered: {0}")]
    NotRegistered(String),
    /// The commit's answer was lost: the row may exist (it goes with the
    /// connection's at the latest).
    #[error("the subscription's outcome is unknown: {0}")]
    Unknown(String),
}

/// As for connects: a publisher holding the topic in a long transaction
/// must not hang the subscriber for ever.
const SUBSCRIBE_LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// Registers `connection`'s subscription to `topic` and returns the topic
/// stream's head: messages up to it were published before the subscription.
pub async fn attach(
    pool: &PgPool,
    connection: Uuid,
    node_id: &NodeId,
    incarnation: Uuid,
    topic: &str,
    idle: Duration,
) -> Result<i64, SubscribeFailure> {
    let bounds = Bounds {
        statement: SUBSCRIBE_LOCK_TIMEOUT + Duration::from_secs(1),
        idle,
        lock: Some(SUBSCRIBE_LOCK_TIMEOUT),
        asynchronous_commit: false,
    };
    let work = async {
        let mut tx = db::begin_bounded(pool, bounds).await?;
        let head = sqlx::query_scalar!(
            r#"SELECT relay.attach_subscription($1, $2, $3, $4) AS "head!""#,
            connection,
            node_id.as_str(),
            incarnation,
            topic
        )
        .fetch_one(&mut *tx)
        .await?;
        Ok::<_, sqlx::Error>((tx, head))
    };
    let (tx, head) = match tokio::time::timeout(bounds.statement * 2, work).await {
        Err(_) => return Err(SubscribeFailure::NotRegistered("timed out".into())),
        Ok(Err(error)) if db::is_fenced(&error) => return Err(SubscribeFailure::Fenced),
        Ok(Err(error)) => return Err(SubscribeFailure::NotRegistered(error.to_string())),
        Ok(Ok(begun)) => begun,
    };
    match db::commit_within(tx, db::OP_TIMEOUT).await {
        Ok(()) => Ok(head),
        Err(CommitError::RolledBack(error)) => {
            Err(SubscribeFailure::NotRegistered(error.to_string()))
        }
        Err(CommitError::Unknown(why)) => Err(SubscribeFailure::Unknown(why)),
    }
}

pub async fn detach(pool: &PgPool, connection: Uuid, topic: &str) -> Result<(), sqlx::Error> {
    let mut scope = crate::db::scope(pool).await?;
    sqlx::query!(
        "DELETE FROM relay.subscriptions WHERE connection_id = $1 AND topic = $2",
        connection,
        topic
    )
    .execute(&mut *scope)
    .await?;
    scope.end().await?;
    Ok(())
}

/// Registers subscription `subscription` of `connection` as a consumer of
/// `queue` (fenced by the node's incarnation): from its commit, the queue's
/// messages may be claimed for it, and whoever reaps the node puts back
/// what it held.
pub async fn attach_consumer(
    pool: &PgPool,
    consumer: &QueueConsumer<'_>,
    node_id: &NodeId,
    incarnation: Uuid,
    idle: Duration,
) -> Result<(), SubscribeFailure> {
    let bounds = Bounds {
        statement: db::OP_TIMEOUT,
        idle,
        lock: Some(SUBSCRIBE_LOCK_TIMEOUT),
        asynchronous_commit: false,
    };
    let work = async {
        let mut tx = db::begin_bounded(pool, bounds).await?;
        sqlx::query!(
            "SELECT relay.attach_queue_consumer($1, $2, $3, $4, $5, $6)",
            consumer.connection,
            node_id.as_str(),
            incarnation,
            consumer.subscription,
            consumer.queue,
            consumer.ack_mode,
        )
        .execute(&mut *tx)
        .await?;
        Ok::<_, sqlx::Error>(tx)
    };
    let tx = match tokio::time::timeout(bounds.statement * 2, work).await {
        Err(_) => return Err(SubscribeFailure::NotRegistered("timed out".into())),
        Ok(Err(error)) if db::is_fenced(&error) => return Err(SubscribeFailure::Fenced),
        Ok(Err(error)) => return Err(SubscribeFailure::NotRegistered(error.to_string())),
        Ok(Ok(tx)) => tx,
    };
    match db::commit_within(tx, db::OP_TIMEOUT).await {
        Ok(()) => Ok(()),
        Err(CommitError::RolledBack(error)) => {
            Err(SubscribeFailure::NotRegistered(error.to_string()))
        }
        Err(CommitError::Unknown(why)) => Err(SubscribeFailure::Unknown(why)),
    }
}

/// A queue consumer to register.
pub struct QueueConsumer<'a> {
    pub connection: Uuid,
    pub subscription: &'a str,
    pub queue: &'a str,
    /// `auto`, `client` or `client-individual`.
    pub ack_mode: &'a str,
}
