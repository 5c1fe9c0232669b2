//! Group commit: the way in for every submission (HTTP, single or batch;
//! JSON `publish`; STOMP `SEND`; `pgrelay send`), but those under an
//! `Idempotency-Key`, which need a transaction of their own (see
//! `super::idempotency`). Concurrent
//! submissions share transactions; see [`GroupCommit`].

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use futures_util::FutureExt;
use sqlx::PgPool;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use super::enqueue::{COMMIT_MARGIN, EnqueueError, Source, store, store_at_once};
use crate::message::{NewMessage, Target};
use crate::metrics as m;
use crate::supervisor::{self, spawn_worker};

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

    /// The stream its order is kept in: its first message's.
    fn stream(&self) -> u64 {
        stream_hash(&self.messages[0].target)
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
    /// Withdraws the submission if it is still queued (it is then never
    /// stored); false once a batch has taken it.
    pub fn withdraw(&self) -> bool {
        self.state
            .compare_exchange(QUEUED, WITHDRAWN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The ids, once committed; or why not (honestly: see the module).
    /// Cancel-safe: awaited again, it goes on waiting for the same answer.
    pub async fn answer(&mut self) -> Result<Vec<i64>, EnqueueError> {
        if let Ok(answer) = tokio::time::timeout_at(self.deadline, &mut self.answer).await {
            return answer.unwrap_or_else(|_| Err(lost(&self.state)));
        }
        // The deadline has passed. Still queued: withdrawn, never stored.
        if self.withdraw() {
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
    /// Starts the shards, supervised; each ends when every `GroupCommit`
    /// handle is dropped and its queue is empty (a panic does not end it).
    /// `slow` bounds the submissions that wait for a held stream.
    pub fn start(pool: PgPool, max_batch: usize, shards: usize, slow: Arc<Semaphore>) -> Self {
        let max_batch = max_batch.max(1);
        let shards: Vec<_> = (0..shards.max(1))
            .map(|_| {
                let (jobs, queue) = mpsc::channel(max_batch * 4);
                let shard = Shard {
                    queue,
                    next: None,
                    chains: HashMap::new(),
                };
                let (pool, slow, shard) = (pool.clone(), slow.clone(), supervisor::queue(shard));
                spawn_worker("group-commit shard", move || {
                    let (pool, slow, shard) = (pool.clone(), slow.clone(), shard.clone());
                    async move {
                        let mut shard = shard.lock().await;
                        run_shard(pool, &mut shard, max_batch, slow).await;
                    }
                });
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
        Target::Topic(topic) | Target::Queue(topic) => topic.hash(&mut hasher),
        Target::Connection(id) => id.hash(&mut hasher),
        Target::Broadcast => 0.hash(&mut hasher),
    }
    hasher.finish()
}

/// Submissions of one stream that failed their batch (a held stream, a bad
/// message), stored one after another by a task of their own; later
/// submissions of that stream join the chain instead of a batch until it
/// has nothing left, so that one stream's order is kept.
struct Chain {
    jobs: mpsc::UnboundedSender<Job>,
    /// Jobs sent and not yet answered.
    pending: Arc<AtomicUsize>,
}

/// A shard's queue and what it keeps between batches: kept by its
/// supervisor across a restart, so that a shard started again after a panic
/// still starts with the job held over and still sends a held stream's
/// submissions to its chain (its order is kept).
struct Shard {
    queue: mpsc::Receiver<Job>,
    /// Held over from a batch that was full: it starts the next one.
    next: Option<Job>,
    chains: HashMap<u64, Chain>,
}

async fn run_shard(pool: PgPool, shard: &mut Shard, max_batch: usize, slow: Arc<Semaphore>) {
    let Shard {
        queue,
        next,
        chains,
    } = shard;
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
            *next = jobs.pop();
        }
        chains.retain(|_, chain| chain.pending.load(Ordering::Acquire) > 0);
        let taken_at = Instant::now();
        let mut batch = Vec::with_capacity(jobs.len());
        for job in jobs {
            // Too late to commit by its deadline: never sent, not stored
            // (sent, a statement past its deadline could only end "unknown").
            if job.deadline <= taken_at + COMMIT_MARGIN {
                if job
                    .state
                    .compare_exchange(QUEUED, WITHDRAWN, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    let _ = job.reply.send(Err(EnqueueError::timed_out()));
                }
                continue;
            }
            if let Some(chain) = chains.get(&job.stream()) {
                chain.pending.fetch_add(1, Ordering::AcqRel);
                let _ = chain.jobs.send(job);
                continue;
            }
            if job.take() {
                m::stage(
                    m::Stage::SubmitQueue,
                    taken_at - job.queued_at,
                    job.messages.len(),
                );
                batch.push(job);
            }
        }
        if batch.is_empty() {
            continue;
        }
        // A panic (a bug) must not end the shard: its batch's callers learn
        // that the outcome is unknown (their replies are dropped), and the
        // next batch goes on.
        let stored = std::panic::AssertUnwindSafe(store_batch(&pool, batch))
            .catch_unwind()
            .await;
        match stored {
            Ok(failed) => {
                for job in failed {
                    let chain = chains.entry(job.stream()).or_insert_with(|| {
                        let (jobs, queue) = mpsc::unbounded_channel();
                        let pending = Arc::new(AtomicUsize::new(0));
                        let queue = supervisor::queue(queue);
                        spawn_worker("group-commit chain", {
                            let (pool, slow, pending) =
                                (pool.clone(), slow.clone(), pending.clone());
                            move || {
                                let (pool, slow, pending, queue) =
                                    (pool.clone(), slow.clone(), pending.clone(), queue.clone());
                                async move {
                                    let mut queue = queue.lock().await;
                                    run_chain(pool, slow, &mut queue, pending).await;
                                }
                            }
                        });
                        Chain { jobs, pending }
                    });
                    chain.pending.fetch_add(1, Ordering::AcqRel);
                    let _ = chain.jobs.send(job);
                }
            }
            Err(_) => tracing::error!("a group-commit batch panicked"),
        }
    }
}

/// Stores a chain's submissions one by one, in order, each in its own
/// transaction (waiting for a held stream, under a permit of `slow`). Ends
/// when its shard drops the chain (it has nothing pending).
async fn run_chain(
    pool: PgPool,
    slow: Arc<Semaphore>,
    jobs: &mut mpsc::UnboundedReceiver<Job>,
    pending: Arc<AtomicUsize>,
) {
    while let Some(job) = jobs.recv().await {
        // Taken already (it failed a batch), or queued behind such a one.
        if job.take() || job.state.load(Ordering::Acquire) == TAKEN {
            let stored = std::panic::AssertUnwindSafe(store(
                &pool,
                &slow,
                &job.messages,
                job.source,
                job.deadline,
            ))
            .catch_unwind()
            .await
            .unwrap_or_else(|_| {
                tracing::error!("storing a submission panicked");
                Err(EnqueueError::OutcomeUnknown(
                    "the node's group commit failed".into(),
                ))
            });
            let _ = job.reply.send(stored);
        }
        pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Stores a batch: one statement per source (a message records where it came
/// from), in the order the jobs queued. Returns the jobs to store one by one.
async fn store_batch(pool: &PgPool, mut jobs: Vec<Job>) -> Vec<Job> {
    let mut failed = Vec::new();
    while !jobs.is_empty() {
        let source = jobs[0].source;
        let split = jobs
            .iter()
            .position(|job| job.source != source)
            .unwrap_or(jobs.len());
        let rest = jobs.split_off(split);
        failed.extend(store_jobs(pool, jobs, source).await);
        jobs = rest;
    }
    failed
}

async fn store_jobs(pool: &PgPool, jobs: Vec<Job>, source: Source) -> Vec<Job> {
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
        Ok(ids) if ids.len() == messages.len() => {
            m::stage(m::Stage::Commit, started.elapsed(), ids.len());
            let mut ids = ids.into_iter();
            for job in jobs {
                let mine: Vec<i64> = ids.by_ref().take(job.messages.len()).collect();
                let _ = job.reply.send(Ok(mine));
            }
            Vec::new()
        }
        Ok(ids) => {
            // Committed, but not what was asked: nobody can be told which id
            // is theirs.
            let why = format!(
                "the database returned {} ids for {} messages",
                ids.len(),
                messages.len()
            );
            tracing::error!("{why}");
            for job in jobs {
                let _ = job
                    .reply
                    .send(Err(EnqueueError::OutcomeUnknown(why.clone())));
            }
            Vec::new()
        }
        // A stream is held (an application transaction, a connect), or one
        // bad submission (an unknown connection) failed the transaction: it
        // rolled back, and each submission is stored on its own, so that
        // each caller gets its own answer and only the held stream's
        // submissions wait, while this shard moves on.
        Err(
            EnqueueError::Busy
            | EnqueueError::ConnectionNotFound(_)
            | EnqueueError::Invalid(_)
            | EnqueueError::Unsupported(_)
            | EnqueueError::Database(_),
        ) if jobs.len() > 1 || matches!(result, Err(EnqueueError::Busy)) => jobs,
        Err(error) => {
            for job in jobs {
                let _ = job.reply.send(Err(error.clone()));
            }
            Vec::new()
        }
    }
}
