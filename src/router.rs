//! The write side: store messages and route them to the nodes that hold their
//! recipients, in one transaction. The routing itself lives in the SQL
//! function `relay.enqueue` (see the migrations), so that the HTTP API and
//! `relay.send_to_user()` share one implementation of the ordering protocol.
//!
//! Every submission has a deadline, and its answer is honest about it (G8):
//! "not stored" ([`EnqueueError::is_not_stored`]) is said only when the
//! message can never commit, and a lost answer is
//! [`EnqueueError::OutcomeUnknown`] (the message may be stored; retrying with
//! the same `Idempotency-Key` is safe).
//!
//! A submission first goes in one autocommit statement that waits for no
//! stream lock ([`store_at_once`]): one round trip. An error from the server
//! means it rolled back; no answer in time means unknown. Only when a stream
//! is held by another transaction (an application's, in SQL) does it try
//! again in a transaction that waits for it ([`Submission`]): until COMMIT
//! is sent, giving up rolls it back (the server also stops its statements at
//! the deadline), and a lost answer to COMMIT is unknown. Such waits are
//! bounded in number (a semaphore), so that a held stream cannot take every
//! pooled connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use sqlx::{PgConnection, PgPool};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use crate::db::{self, Bounds, CommitError};
use crate::message::{NewMessage, Payload, Target};
use crate::metrics as m;

/// Where a message was submitted, recorded in `relay.messages.source`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

/// How long a submission may take, from its start, before it gives up: the
/// contract answers within 5 s.
pub const SUBMIT_TIMEOUT: Duration = Duration::from_millis(4500);

/// Time kept for COMMIT itself: work before it must be done this long
/// before the deadline.
const COMMIT_MARGIN: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, thiserror::Error)]
pub enum EnqueueError {
    #[error("{0}")]
    ConnectionNotFound(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Invalid(String),
    /// Not stored: a stream was held by another transaction for longer than
    /// the submission could wait (or too many submissions wait already).
    #[error("a stream is held by another transaction; nothing was stored")]
    Busy,
    /// Not stored: the database is unavailable, or did not answer before the
    /// deadline (the transaction was rolled back before COMMIT).
    #[error("the database is unavailable; nothing was stored ({0})")]
    Unavailable(String),
    /// Not stored: the transaction lost a race with another (a
    /// serialization failure, a deadlock); trying again may succeed.
    #[error("the transaction conflicted with another; nothing was stored ({0})")]
    Conflict(String),
    /// Stored or not: COMMIT was sent and its answer was lost.
    #[error("the outcome is unknown: the answer to COMMIT was lost ({0})")]
    OutcomeUnknown(String),
    /// Not stored: an unexpected database error.
    #[error("database error: {0}")]
    Database(String),
}

impl EnqueueError {
    /// Whether the message can never be stored (everything but an unknown
    /// outcome).
    pub fn is_not_stored(&self) -> bool {
        !matches!(self, EnqueueError::OutcomeUnknown(_))
    }

    /// The metric label for a failure: `not_stored` or `unknown`.
    pub fn outcome(&self) -> &'static str {
        if self.is_not_stored() {
            "not_stored"
        } else {
            "unknown"
        }
    }

    fn timed_out() -> Self {
        EnqueueError::Unavailable("the database did not answer in time".into())
    }
}

/// Statement errors, before COMMIT: the transaction is rolled back, so
/// nothing is stored whatever the error.
impl From<sqlx::Error> for EnqueueError {
    fn from(error: sqlx::Error) -> Self {
        if let Some(db) = error.as_database_error() {
            let message = db.message().to_owned();
            match db.code().as_deref() {
                Some("P0002") => return EnqueueError::ConnectionNotFound(message),
                Some("0A000") => return EnqueueError::Unsupported(message),
                Some("22023") | Some("54000") => return EnqueueError::Invalid(message),
                Some("55P03") => return EnqueueError::Busy,
                // The server stopped the statement at the submission's
                // deadline (statement_timeout) or ended an idle transaction:
                // rolled back, nothing stored.
                Some("57014") | Some("25P03") => return EnqueueError::timed_out(),
                Some("40001") | Some("40P01") => return EnqueueError::Conflict(message),
                _ => {}
            }
        }
        if db::is_unavailable(&error) {
            EnqueueError::Unavailable(error.to_string())
        } else {
            EnqueueError::Database(error.to_string())
        }
    }
}

/// A submission's transaction: it commits by its deadline, or says why
/// not, honestly (see the module's documentation). Run each statement in it
/// through [`in_time`] with [`Submission::until`].
pub struct Submission {
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    until: Instant,
    deadline: Instant,
}

impl Submission {
    /// Begins, under limits the server enforces too: its statements stop at
    /// the deadline, lock waits after `lock` (None: only the deadline bounds
    /// them).
    pub async fn begin(
        pool: &PgPool,
        deadline: Instant,
        lock: Option<Duration>,
    ) -> Result<Self, EnqueueError> {
        let Some(until) = deadline.checked_sub(COMMIT_MARGIN) else {
            return Err(EnqueueError::timed_out());
        };
        let budget = until.saturating_duration_since(Instant::now());
        if budget.is_zero() {
            return Err(EnqueueError::timed_out());
        }
        let bounds = Bounds {
            statement: budget,
            idle: budget,
            lock: lock.map(|lock| lock.min(budget)),
        };
        let tx = in_time(until, db::begin_bounded(pool, bounds)).await?;
        Ok(Self {
            tx,
            until,
            deadline,
        })
    }

    /// When the work before COMMIT must be done.
    pub fn until(&self) -> Instant {
        self.until
    }

    pub fn connection(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    /// Commits, and says what a failure means: rolled back (not stored), or
    /// unknown.
    pub async fn commit(self) -> Result<(), EnqueueError> {
        let left = self
            .deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        match db::commit_within(self.tx, left).await {
            Ok(()) => Ok(()),
            Err(CommitError::RolledBack(error)) => Err(error.into()),
            Err(CommitError::Unknown(why)) => Err(EnqueueError::OutcomeUnknown(why)),
        }
    }
}

/// How much longer than the server the client waits for a statement of a
/// submission. The server stops it at the deadline (statement_timeout) and
/// says so; the client gives up only when no answer comes at all (a network
/// cut): cancelling a statement in flight would leave its connection with a
/// half-read answer.
const CLIENT_GRACE: Duration = Duration::from_millis(300);

/// Runs a statement of a [`Submission`], giving up shortly after `until`
/// (when the server stops it): the transaction is then dropped before
/// COMMIT, and rolls back.
pub async fn in_time<T, E: Into<EnqueueError>>(
    until: Instant,
    statement: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, EnqueueError> {
    match tokio::time::timeout_at(until + CLIENT_GRACE, statement).await {
        Ok(result) => result.map_err(Into::into),
        Err(_) => Err(EnqueueError::timed_out()),
    }
}

/// A permit to wait for a held stream, by `deadline`.
pub async fn slow_permit(
    slow: &Semaphore,
    deadline: Instant,
) -> Result<tokio::sync::SemaphorePermit<'_>, EnqueueError> {
    match tokio::time::timeout_at(deadline, slow.acquire()).await {
        Ok(Ok(permit)) => Ok(permit),
        _ => Err(EnqueueError::Busy),
    }
}

/// Stores and routes `messages` atomically by `deadline` and returns their
/// ids, in order, once committed: first at once (see [`store_at_once`]); if
/// a stream is held by another transaction, once more in a transaction that
/// waits for it, under a permit of `slow`.
pub async fn store(
    pool: &PgPool,
    slow: &Semaphore,
    messages: &[NewMessage],
    source: Source,
    deadline: Instant,
) -> Result<Vec<i64>, EnqueueError> {
    match store_at_once(pool, messages, source, deadline).await {
        Err(EnqueueError::Busy) => {}
        done => return done,
    }
    let _permit = slow_permit(slow, deadline).await?;
    store_once(pool, messages, source, deadline, false).await
}

/// The fast way in: one autocommit statement, one round trip, that waits
/// for no lock (NOWAIT; a held stream fails it at once with
/// [`EnqueueError::Busy`], nothing stored). Its answer is honest too: an
/// error from the server means it rolled back; no answer (a broken
/// connection, the deadline passing while the database stalls) means the
/// statement may still commit, and says so.
pub async fn store_at_once(
    pool: &PgPool,
    messages: &[NewMessage],
    source: Source,
    deadline: Instant,
) -> Result<Vec<i64>, EnqueueError> {
    // Not sent yet: a failure here stores nothing.
    let mut connection = match tokio::time::timeout_at(deadline, pool.acquire()).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(error)) => return Err(error.into()),
        Err(_) => return Err(EnqueueError::timed_out()),
    };
    let sent = tokio::time::timeout_at(
        deadline,
        enqueue_raw(&mut *connection, messages, source, true),
    )
    .await;
    match sent {
        Ok(Ok(ids)) => Ok(ids),
        Ok(Err(error))
            if error.as_database_error().is_some() && !db::is_connection_loss(&error) =>
        {
            Err(error.into())
        }
        Ok(Err(error)) => Err(EnqueueError::OutcomeUnknown(error.to_string())),
        Err(_) => {
            // Still running in the server, perhaps: this connection is not
            // reused with an answer half read.
            connection.close_on_drop();
            Err(EnqueueError::OutcomeUnknown(
                "the database did not answer in time".into(),
            ))
        }
    }
}

async fn store_once(
    pool: &PgPool,
    messages: &[NewMessage],
    source: Source,
    deadline: Instant,
    nowait: bool,
) -> Result<Vec<i64>, EnqueueError> {
    let lock = (!nowait).then_some(SUBMIT_TIMEOUT);
    let mut submission = Submission::begin(pool, deadline, lock).await?;
    let until = submission.until();
    let ids = in_time(
        until,
        enqueue_with(submission.connection(), messages, source, nowait),
    )
    .await?;
    submission.commit().await?;
    Ok(ids)
}

/// Stores and routes `messages` on `executor` (e.g. inside a caller's
/// transaction) and returns their ids. With `nowait`, a stream held by
/// another transaction fails the call at once ([`EnqueueError::Busy`])
/// instead of waiting for it.
pub async fn enqueue_with<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    messages: &[NewMessage],
    source: Source,
    nowait: bool,
) -> Result<Vec<i64>, EnqueueError> {
    Ok(enqueue_raw(executor, messages, source, nowait).await?)
}

async fn enqueue_raw<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    messages: &[NewMessage],
    source: Source,
    nowait: bool,
) -> Result<Vec<i64>, sqlx::Error> {
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

/// Group commit: concurrent submissions share transactions, whatever way
/// they came in (HTTP, single or batch; JSON `publish`; STOMP `SEND`;
/// `pgrelay send`).
///
/// Submissions are spread over `shards` by their first stream (a user's or a
/// topic's), so that two batches in flight never wait for each other's
/// stream locks, and one stream's submissions keep their order. Each shard
/// stores whatever has queued (up to `max_batch` messages) with one
/// `relay.enqueue` call per source, and while it commits, new submissions
/// queue up and form its next batch. Nothing waits on a timer: at low load a
/// batch is one submission and costs no latency; under load batches grow,
/// and PostgreSQL's per-transaction costs (the commit's flush, the NOTIFY
/// serialization) are paid once per batch. A submission of several messages
/// (an HTTP batch) stays atomic: it is stored whole or not at all. Every
/// caller is answered only after its batch has committed; a caller whose
/// deadline passes while its submission still waits in the queue withdraws
/// it (it is then never stored).
#[derive(Clone)]
pub struct GroupCommit {
    shards: Arc<[mpsc::Sender<Job>]>,
}

/// A job's state, shared by its caller and its shard: the caller may
/// withdraw a job only while it is queued.
const QUEUED: u8 = 0;
const TAKEN: u8 = 1;
const WITHDRAWN: u8 = 2;

struct Job {
    messages: Vec<NewMessage>,
    source: Source,
    queued_at: Instant,
    deadline: Instant,
    state: Arc<AtomicU8>,
    reply: oneshot::Sender<Result<Vec<i64>, EnqueueError>>,
}

impl Job {
    /// Takes the job for a batch, unless its caller has withdrawn it.
    fn take(&self) -> bool {
        self.state
            .compare_exchange(QUEUED, TAKEN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// A submission in its shard's queue: [`Pending::answer`] waits for its
/// batch. Queued in the order [`GroupCommit::enqueue`] was called, so that a
/// connection can have several in flight and still store them in order.
pub struct Pending {
    state: Arc<AtomicU8>,
    answer: oneshot::Receiver<Result<Vec<i64>, EnqueueError>>,
    deadline: Instant,
}

impl Pending {
    /// The ids, once committed; or why not (honestly: see the module).
    /// Cancel-safe: awaited again, it goes on waiting for the same answer.
    pub async fn answer(&mut self) -> Result<Vec<i64>, EnqueueError> {
        if let Ok(answer) = tokio::time::timeout_at(self.deadline, &mut self.answer).await {
            return answer.unwrap_or_else(|_| Err(lost(&self.state)));
        }
        // The deadline has passed. Still queued: withdrawn, never stored.
        if self
            .state
            .compare_exchange(QUEUED, WITHDRAWN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            return Err(EnqueueError::timed_out());
        }
        // In a batch: its transaction answers shortly (it is bounded by the
        // same deadline), and says what became of it.
        let last_chance = self.deadline + COMMIT_MARGIN * 2;
        match tokio::time::timeout_at(last_chance, &mut self.answer).await {
            Ok(answer) => answer.unwrap_or_else(|_| Err(lost(&self.state))),
            Err(_) => Err(EnqueueError::OutcomeUnknown(
                "the batch's transaction did not answer in time".into(),
            )),
        }
    }
}

impl GroupCommit {
    /// Starts the shards; each ends when every `GroupCommit` handle is
    /// dropped and its queue is empty (a panic in a batch does not end it).
    /// `slow` bounds the submissions that wait for a held stream.
    pub fn start(pool: PgPool, max_batch: usize, shards: usize, slow: Arc<Semaphore>) -> Self {
        let max_batch = max_batch.max(1);
        let shards: Vec<_> = (0..shards.max(1))
            .map(|_| {
                let (jobs, queue) = mpsc::channel(max_batch * 4);
                tokio::spawn(run_shard(pool.clone(), queue, max_batch, slow.clone()));
                jobs
            })
            .collect();
        Self {
            shards: shards.into(),
        }
    }

    /// Stores and routes one message by `deadline`; returns its id once
    /// committed.
    pub async fn submit(
        &self,
        message: NewMessage,
        source: Source,
        deadline: Instant,
    ) -> Result<i64, EnqueueError> {
        let ids = self
            .enqueue(vec![message], source, deadline)
            .await?
            .answer()
            .await?;
        Ok(ids[0])
    }

    /// Stores and routes `messages` atomically by `deadline`; returns their
    /// ids, in order, once committed.
    pub async fn submit_all(
        &self,
        messages: Vec<NewMessage>,
        source: Source,
        deadline: Instant,
    ) -> Result<Vec<i64>, EnqueueError> {
        self.enqueue(messages, source, deadline)
            .await?
            .answer()
            .await
    }

    /// Queues a submission (waiting, by `deadline`, while its shard's queue
    /// is full: that is the backpressure) and returns it pending.
    pub async fn enqueue(
        &self,
        messages: Vec<NewMessage>,
        source: Source,
        deadline: Instant,
    ) -> Result<Pending, EnqueueError> {
        let Some(first) = messages.first() else {
            return Err(EnqueueError::Invalid("nothing to store".into()));
        };
        let shard = &self.shards[shard_of(&first.target, self.shards.len())];
        let state = Arc::new(AtomicU8::new(QUEUED));
        let (reply, answer) = oneshot::channel();
        let job = Job {
            messages,
            source,
            queued_at: Instant::now(),
            deadline,
            state: state.clone(),
            reply,
        };
        match tokio::time::timeout_at(deadline, shard.send(job)).await {
            Ok(Ok(())) => Ok(Pending {
                state,
                answer,
                deadline,
            }),
            Ok(Err(_)) => Err(EnqueueError::Unavailable("the node is stopping".into())),
            Err(_) => Err(EnqueueError::timed_out()),
        }
    }
}

/// What a job whose shard went away (a panic) became.
fn lost(state: &AtomicU8) -> EnqueueError {
    if state.load(Ordering::Acquire) == TAKEN {
        EnqueueError::OutcomeUnknown("the node's group commit stopped".into())
    } else {
        EnqueueError::Unavailable("the node's group commit stopped".into())
    }
}

/// The shard of a message's first stream.
fn shard_of(target: &Target, shards: usize) -> usize {
    (stream_hash(target) % shards as u64) as usize
}

fn stream_hash(target: &Target) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    match target {
        Target::User(user) => user.hash(&mut hasher),
        Target::Users(users) => users.iter().min().hash(&mut hasher),
        Target::Topic(topic) => topic.hash(&mut hasher),
        Target::Connection(id) => id.hash(&mut hasher),
        Target::Broadcast => 0.hash(&mut hasher),
    }
    hasher.finish()
}

async fn run_shard(
    pool: PgPool,
    mut queue: mpsc::Receiver<Job>,
    max_batch: usize,
    slow: Arc<Semaphore>,
) {
    // Held over from a batch that was full: it starts the next one.
    let mut next: Option<Job> = None;
    loop {
        let first = match next.take() {
            Some(job) => job,
            None => match queue.recv().await {
                Some(job) => job,
                None => return,
            },
        };
        // What queued while the previous batch ran, and no more: nothing
        // waits for more to come.
        let mut size = first.messages.len();
        let mut jobs = vec![first];
        while size < max_batch {
            match queue.try_recv() {
                Ok(job) => {
                    size += job.messages.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        if size > max_batch && jobs.len() > 1 {
            next = jobs.pop();
        }
        let taken_at = Instant::now();
        let jobs: Vec<Job> = jobs
            .into_iter()
            .filter(|job| job.take())
            .inspect(|job| {
                m::stage(
                    m::Stage::SubmitQueue,
                    taken_at - job.queued_at,
                    job.messages.len(),
                );
            })
            .collect();
        if jobs.is_empty() {
            continue;
        }
        // A panic (a bug) must not end the shard: its batch's callers learn
        // that the outcome is unknown (their replies are dropped), and the
        // next batch goes on.
        let stored = std::panic::AssertUnwindSafe(store_batch(&pool, jobs, &slow))
            .catch_unwind()
            .await;
        if stored.is_err() {
            tracing::error!("a group-commit batch panicked");
        }
    }
}

/// Stores a batch: one statement per source (a message records where it came
/// from), in the order the jobs queued.
async fn store_batch(pool: &PgPool, mut jobs: Vec<Job>, slow: &Arc<Semaphore>) {
    while !jobs.is_empty() {
        let source = jobs[0].source;
        let split = jobs
            .iter()
            .position(|job| job.source != source)
            .unwrap_or(jobs.len());
        let rest = jobs.split_off(split);
        store_jobs(pool, jobs, source, slow).await;
        jobs = rest;
    }
}

async fn store_jobs(pool: &PgPool, jobs: Vec<Job>, source: Source, slow: &Arc<Semaphore>) {
    let deadline = jobs
        .iter()
        .map(|job| job.deadline)
        .min()
        .expect("a batch has jobs");
    let messages: Vec<NewMessage> = jobs
        .iter()
        .flat_map(|job| job.messages.iter().cloned())
        .collect();
    let started = Instant::now();
    let mut result = store_at_once(pool, &messages, source, deadline).await;
    // A conflict between concurrent batches (a deadlock, a serialization
    // failure) is retried once as a whole: it stored nothing.
    if let Err(EnqueueError::Conflict(_)) = &result
        && Instant::now() + COMMIT_MARGIN * 2 < deadline
    {
        result = store_at_once(pool, &messages, source, deadline).await;
    }
    match result {
        Ok(ids) => {
            m::stage(m::Stage::Commit, started.elapsed(), ids.len());
            let mut ids = ids.into_iter();
            for job in jobs {
                let mine: Vec<i64> = ids.by_ref().take(job.messages.len()).collect();
                let _ = job.reply.send(Ok(mine));
            }
        }
        // A stream is held (an application transaction, a connect), or one
        // bad submission (an unknown connection) failed the transaction:
        // each submission is stored on its own, so that each caller gets its
        // own answer and only the held stream's submissions wait, while this
        // shard moves on. Those of one stream go one after another, in order.
        Err(
            EnqueueError::Busy
            | EnqueueError::ConnectionNotFound(_)
            | EnqueueError::Invalid(_)
            | EnqueueError::Unsupported(_),
        ) if jobs.len() > 1 || matches!(result, Err(EnqueueError::Busy)) => {
            let mut by_stream: std::collections::HashMap<u64, Vec<Job>> =
                std::collections::HashMap::new();
            for job in jobs {
                by_stream
                    .entry(stream_hash(&job.messages[0].target))
                    .or_default()
                    .push(job);
            }
            for (_, jobs) in by_stream {
                let (pool, slow) = (pool.clone(), slow.clone());
                tokio::spawn(async move {
                    for job in jobs {
                        let stored = store(&pool, &slow, &job.messages, source, job.deadline).await;
                        let _ = job.reply.send(stored);
                    }
                });
            }
        }
        Err(error) => {
            for job in jobs {
                let _ = job.reply.send(Err(error.clone()));
            }
        }
    }
}
