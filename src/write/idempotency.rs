//! Submissions under an `Idempotency-Key`: the first request with a key
//! stores its messages and the key in one transaction; a later one with the
//! same key and the same request is answered with the same ids and stores
//! nothing; the same key with another request is a conflict. Answers are
//! as honest as every submission's (see [`super::enqueue`]).

use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tokio::sync::Semaphore;

use super::enqueue::{
    EnqueueError, SUBMIT_TIMEOUT, Source, Submission, enqueue_with, in_time, slow_permit,
};
use crate::db;
use crate::message::NewMessage;

/// A submission under an `Idempotency-Key`.
pub struct Keyed<'a> {
    /// What the key is scoped to (the API key's scope).
    pub scope: &'a str,
    pub key: &'a str,
    /// The request's [`request_hash`].
    pub hash: &'a [u8; 32],
}

/// What a keyed submission came to.
pub enum KeyedOutcome {
    Stored(Vec<i64>),
    /// An earlier request with this key and body stored these.
    Replay(Vec<i64>),
    /// An earlier request with this key had another body.
    Conflict,
}

impl Keyed<'_> {
    /// One attempt: None when the key was already claimed.
    async fn store_once(
        &self,
        pool: &PgPool,
        messages: &[NewMessage],
        deadline: tokio::time::Instant,
        nowait: bool,
    ) -> Result<Option<Vec<i64>>, EnqueueError> {
        let mut submission = Submission::begin(pool, deadline, Some(SUBMIT_TIMEOUT)).await?;
        let until = submission.until();
        let claimed = in_time(
            until,
            sqlx::query_scalar!(
                r#"
                INSERT INTO relay.idempotency_keys (scope, key, request_hash, message_ids)
                VALUES ($1, $2, $3, '{}')
                ON CONFLICT (scope, key) DO NOTHING
                RETURNING true AS "claimed!"
                "#,
                self.scope,
                self.key,
                &self.hash[..],
            )
            .fetch_optional(submission.connection()),
        )
        .await
        .map_err(|error| match error {
            // Waiting for another request with this key (an earlier attempt
            // whose answer was lost, say) and giving up: that one may still
            // commit the message. Not "not stored".
            EnqueueError::Busy | EnqueueError::Unavailable(_) => EnqueueError::OutcomeUnknown(
                "another request with this Idempotency-Key is still in progress".into(),
            ),
            other => other,
        })?;
        if claimed.is_none() {
            // Dropped: rolled back, nothing was written.
            return Ok(None);
        }
        let ids = in_time(
            until,
            enqueue_with(submission.connection(), messages, Source::Http, nowait),
        )
        .await?;
        in_time(
            until,
            sqlx::query!(
                "UPDATE relay.idempotency_keys SET message_ids = $3 WHERE scope = $1 AND key = $2",
                self.scope,
                self.key,
                &ids
            )
            .execute(submission.connection()),
        )
        .await?;
        submission.commit().await?;
        Ok(Some(ids))
    }

    /// Claims the key and stores the messages in one transaction; a
    /// concurrent request with the same key waits for this one to end. A
    /// retry after "outcome unknown" finds the key if the first commit
    /// happened, and stores otherwise.
    pub async fn store(
        &self,
        pool: &PgPool,
        slow: &Semaphore,
        messages: &[NewMessage],
        deadline: tokio::time::Instant,
    ) -> Result<KeyedOutcome, EnqueueError> {
        // Twice at most: a key found taken, then gone (past retention), is
        // free again.
        for _ in 0..2 {
            let stored = match self.store_once(pool, messages, deadline, true).await {
                Err(EnqueueError::Busy) => {
                    let _permit = slow_permit(slow, deadline).await?;
                    self.store_once(pool, messages, deadline, false).await
                }
                done => done,
            }?;
            if let Some(ids) = stored {
                return Ok(KeyedOutcome::Stored(ids));
            }
            // The key was taken by a request that committed: whatever happens
            // now, that one's messages are stored.
            let earlier = in_time(
                deadline,
                async {
                    let mut scope = db::scope(pool).await?;
                    let earlier = sqlx::query!(
                        "SELECT request_hash, message_ids FROM relay.idempotency_keys WHERE scope = $1 AND key = $2",
                        self.scope,
                        self.key
                    )
                    .fetch_optional(&mut *scope)
                    .await?;
                    scope.end().await?;
                    Ok::<_, sqlx::Error>(earlier)
                },
            )
            .await
            .map_err(|error| {
                EnqueueError::OutcomeUnknown(format!(
                    "the earlier request with this Idempotency-Key could not be read ({error})"
                ))
            })?;
            match earlier {
                Some(earlier) if earlier.request_hash == self.hash[..] => {
                    return Ok(KeyedOutcome::Replay(earlier.message_ids));
                }
                Some(_) => return Ok(KeyedOutcome::Conflict),
                None => continue,
            }
        }
        Err(EnqueueError::OutcomeUnknown(
            "the Idempotency-Key was taken and released while this request ran".into(),
        ))
    }
}

/// What "the same request" means: the same endpoint and the same JSON,
/// whatever its key order and whitespace.
pub fn request_hash(kind: &str, body: &[u8]) -> [u8; 32] {
    let canonical = serde_json::from_slice::<Value>(body)
        .map(|value| value.to_string())
        .unwrap_or_default();
    let mut hasher = Sha256::new();
    hasher.update(kind.as_bytes());
    hasher.update([0]);
    hasher.update(canonical.as_bytes());
    hasher.finalize().into()
}
