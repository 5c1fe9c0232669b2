//! The write side: store messages and route them to the nodes that hold their
//! recipients, in one transaction. The routing itself lives in the SQL
//! function `relay.enqueue` (see the migrations), so that the HTTP API and
//! `relay.send_to_user()` share one implementation of the ordering protocol.

use std::sync::Arc;

use sqlx::{PgExecutor, PgPool};
use tokio::sync::{mpsc, oneshot};

use crate::message::{NewMessage, Payload, Target};

/// Where a message was submitted, recorded in `relay.messages.source`.
#[derive(Clone, Copy, Debug)]
pub enum Source {
    Http,
    WebSocket,
    /// `pgrelay send`, straight into the database.
    Cli,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Http => "http",
            Source::WebSocket => "ws",
            Source::Cli => "cli",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    #[error("{0}")]
    ConnectionNotFound(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Invalid(String),
    #[error("a stream is held by another transaction")]
    Busy,
    #[error("the database is unavailable: {0}")]
    Unavailable(sqlx::Error),
    #[error("database error: {0}")]
    Database(sqlx::Error),
}

impl EnqueueError {
    /// The same error for another caller of a failed batch.
    fn replicate(&self) -> Self {
        let text = |e: &sqlx::Error| sqlx::Error::Protocol(e.to_string());
        match self {
            EnqueueError::ConnectionNotFound(m) => EnqueueError::ConnectionNotFound(m.clone()),
            EnqueueError::Unsupported(m) => EnqueueError::Unsupported(m.clone()),
            EnqueueError::Invalid(m) => EnqueueError::Invalid(m.clone()),
            EnqueueError::Busy => EnqueueError::Busy,
            EnqueueError::Unavailable(e) => EnqueueError::Unavailable(text(e)),
            EnqueueError::Database(e) => EnqueueError::Database(text(e)),
        }
    }
}

impl From<sqlx::Error> for EnqueueError {
    fn from(error: sqlx::Error) -> Self {
        if let Some(db) = error.as_database_error() {
            let message = db.message().to_owned();
            match db.code().as_deref() {
                Some("P0002") => return EnqueueError::ConnectionNotFound(message),
                Some("0A000") => return EnqueueError::Unsupported(message),
                Some("22023") | Some("54000") => return EnqueueError::Invalid(message),
                Some("55P03") => return EnqueueError::Busy,
                _ => {}
            }
        }
        if crate::db::is_unavailable(&error) {
            EnqueueError::Unavailable(error)
        } else {
            EnqueueError::Database(error)
        }
    }
}

/// Stores and routes `messages` atomically and returns their ids, in order.
/// The ids are durable when this returns: the transaction has committed.
pub async fn enqueue(
    pool: &PgPool,
    messages: &[NewMessage],
    source: Source,
) -> Result<Vec<i64>, EnqueueError> {
    enqueue_with(pool, messages, source, false).await
}

/// [`enqueue`] on any executor, e.g. inside a caller's transaction. With
/// `nowait`, a stream held by another transaction fails the call at once
/// ([`EnqueueError::Busy`]) instead of waiting for it.
pub async fn enqueue_with<'e>(
    executor: impl PgExecutor<'e>,
    messages: &[NewMessage],
    source: Source,
    nowait: bool,
) -> Result<Vec<i64>, EnqueueError> {
    let mut targets = Vec::with_capacity(messages.len());
    let mut destinations = Vec::with_capacity(messages.len());
    let mut data = Vec::with_capacity(messages.len());
    let mut bodies = Vec::with_capacity(messages.len());
    let mut content_types = Vec::with_capacity(messages.len());
    let mut ttls = Vec::with_capacity(messages.len());
    for message in messages {
        targets.push(message.target.to_json().to_string());
        destinations.push(message.destination.clone());
        match &message.payload {
            Payload::Json(raw) => {
                data.push(Some(raw.get().to_owned()));
                bodies.push(None);
                content_types.push(None);
            }
            Payload::Raw {
                bytes,
                content_type,
            } => {
                data.push(None);
                bodies.push(Some(bytes.to_vec()));
                content_types.push(content_type.clone());
            }
        }
        // 0 stands for "the configured default" (arrays of NULLs are awkward to bind).
        ttls.push(message.ttl_secs.map_or(0, |s| s as i64));
    }
    let ids = sqlx::query_scalar!(
        r#"
        SELECT relay.enqueue(
            $1::text[]::jsonb[],
            $2::text[],
            $3::text[]::jsonb[],
            ARRAY(SELECT make_interval(secs => NULLIF(t.s, 0))
                    FROM unnest($4::bigint[]) WITH ORDINALITY AS t(s, i)
                   ORDER BY t.i),
            $5,
            $6::bytea[],
            $7::text[],
            $8) AS "ids!"
        "#,
        &targets,
        &destinations as &[Option<String>],
        &data as &[Option<String>],
        &ttls,
        source.as_str(),
        &bodies as &[Option<Vec<u8>>],
        &content_types as &[Option<String>],
        nowait,
    )
    .fetch_one(executor)
    .await?;
    Ok(ids)
}

/// Group commit: concurrent single-message submissions share transactions.
///
/// Submissions are spread over `shards` by their first stream (a user's or a
/// topic's), so that two batches in flight never wait for each other's
/// stream locks. Each shard stores whatever has queued (up to `max_batch`)
/// with one `relay.enqueue` call, and while it commits, new submissions queue
/// up and form its next batch. Nothing waits on a timer: at low load a batch
/// is one message and costs no latency; under load batches grow, and
/// PostgreSQL's per-transaction costs (the commit's flush, the NOTIFY
/// serialization) are paid once per batch. Every caller is answered only
/// after its batch has committed.
#[derive(Clone)]
pub struct GroupCommit {
    shards: Arc<[mpsc::Sender<Job>]>,
}

struct Job {
    message: NewMessage,
    reply: oneshot::Sender<Result<i64, EnqueueError>>,
}

impl GroupCommit {
    /// Starts the shards; each ends when every `GroupCommit` handle is
    /// dropped and its queue is empty.
    pub fn start(pool: PgPool, max_batch: usize, shards: usize) -> Self {
        let shards: Vec<_> = (0..shards.max(1))
            .map(|_| {
                let (jobs, queue) = mpsc::channel(max_batch * 4);
                tokio::spawn(run_shard(pool.clone(), queue, max_batch));
                jobs
            })
            .collect();
        Self {
            shards: shards.into(),
        }
    }

    /// Stores and routes one message; returns its id once committed.
    pub async fn submit(&self, message: NewMessage) -> Result<i64, EnqueueError> {
        let shard = &self.shards[shard_of(&message.target, self.shards.len())];
        let (reply, answer) = oneshot::channel();
        let closed = || EnqueueError::Unavailable(sqlx::Error::PoolClosed);
        shard
            .send(Job { message, reply })
            .await
            .map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }
}

/// The shard of a message's first stream.
fn shard_of(target: &Target, shards: usize) -> usize {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    match target {
        Target::User(user) => user.hash(&mut hasher),
        Target::Users(users) => users.iter().min().hash(&mut hasher),
        Target::Topic(topic) => topic.hash(&mut hasher),
        Target::Connection(id) => id.hash(&mut hasher),
        Target::Broadcast => 0.hash(&mut hasher),
    }
    (hasher.finish() % shards as u64) as usize
}

async fn run_shard(pool: PgPool, mut queue: mpsc::Receiver<Job>, max_batch: usize) {
    let mut batch = Vec::with_capacity(max_batch);
    while queue.recv_many(&mut batch, max_batch).await > 0 {
        store_batch(&pool, std::mem::take(&mut batch)).await;
    }
}

async fn store_batch(pool: &PgPool, jobs: Vec<Job>) {
    let (messages, replies): (Vec<NewMessage>, Vec<_>) =
        jobs.into_iter().map(|j| (j.message, j.reply)).unzip();
    let mut result = enqueue_with(pool, &messages, Source::Http, true).await;
    if let Err(EnqueueError::Busy) = result {
        // A stream is held (an application transaction, a connect): its
        // messages wait for it on their own, while this shard moves on.
        for (message, reply) in messages.into_iter().zip(replies) {
            let pool = pool.clone();
            tokio::spawn(async move {
                let stored = enqueue(&pool, std::slice::from_ref(&message), Source::Http).await;
                let _ = reply.send(stored.map(|ids| ids[0]));
            });
        }
        return;
    }
    // A conflict between concurrent batches is retried once as a whole.
    if let Err(EnqueueError::Unavailable(error)) = &result
        && error.as_database_error().is_some()
    {
        result = enqueue(pool, &messages, Source::Http).await;
    }
    match result {
        Ok(ids) => {
            for (reply, id) in replies.into_iter().zip(ids) {
                let _ = reply.send(Ok(id));
            }
        }
        // One bad message (an unknown connection) fails the transaction:
        // store the others one by one, so that each caller gets its own answer.
        Err(
            EnqueueError::ConnectionNotFound(_)
            | EnqueueError::Invalid(_)
            | EnqueueError::Unsupported(_),
        ) if messages.len() > 1 => {
            for (message, reply) in messages.iter().zip(replies) {
                let single = enqueue(pool, std::slice::from_ref(message), Source::Http).await;
                let _ = reply.send(single.map(|ids| ids[0]));
            }
        }
        Err(error) => {
            for reply in replies {
                let _ = reply.send(Err(error.replicate()));
            }
        }
    }
}
