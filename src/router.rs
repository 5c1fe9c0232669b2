//! The write side: store messages and route them to the nodes that hold their
//! recipients, in one transaction. The routing itself lives in the SQL
//! function `relay.enqueue` (see the migrations), so that the HTTP API and
//! `relay.send_to_user()` share one implementation of the ordering protocol.

use sqlx::{PgExecutor, PgPool};

use crate::message::{NewMessage, Payload};

/// Where a message was submitted, recorded in `relay.messages.source`.
#[derive(Clone, Copy, Debug)]
pub enum Source {
    Http,
    WebSocket,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Http => "http",
            Source::WebSocket => "ws",
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
    #[error("the database is unavailable: {0}")]
    Unavailable(sqlx::Error),
    #[error("database error: {0}")]
    Database(sqlx::Error),
}

impl From<sqlx::Error> for EnqueueError {
    fn from(error: sqlx::Error) -> Self {
        if let Some(db) = error.as_database_error() {
            let message = db.message().to_owned();
            match db.code().as_deref() {
                Some("P0002") => return EnqueueError::ConnectionNotFound(message),
                Some("0A000") => return EnqueueError::Unsupported(message),
                Some("22023") | Some("54000") => return EnqueueError::Invalid(message),
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
    enqueue_with(pool, messages, source).await
}

/// [`enqueue`] on any executor, e.g. inside a caller's transaction.
pub async fn enqueue_with<'e>(
    executor: impl PgExecutor<'e>,
    messages: &[NewMessage],
    source: Source,
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
            $7::text[]) AS "ids!"
        "#,
        &targets,
        &destinations as &[Option<String>],
        &data as &[Option<String>],
        &ttls,
        source.as_str(),
        &bodies as &[Option<Vec<u8>>],
        &content_types as &[Option<String>],
    )
    .fetch_one(executor)
    .await?;
    Ok(ids)
}
