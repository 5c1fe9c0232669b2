//! The listener: LISTENs on this node's channel and wakes the claimer.
//! Every way a wake-up can be lost is covered: after every (re)connect it
//! wakes the claimer too (it rescans), and the claimer polls anyway.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::postgres::PgListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::metrics as m;
use crate::state::NodeState;

/// How the listener wakes the claimer, and since when it has been awake
/// without claiming (for the `claim_wait` stage).
#[derive(Default)]
pub struct Wake {
    pub(super) notify: Notify,
    since: Mutex<Option<Instant>>,
}

impl Wake {
    pub fn wake(&self) {
        self.since
            .lock()
            .expect("wake lock")
            .get_or_insert_with(Instant::now);
        self.notify.notify_one();
    }

    /// When the first wake-up not yet followed by a claim came.
    pub(super) fn take_since(&self) -> Option<Instant> {
        self.since.lock().expect("wake lock").take()
    }
}

/// The listener task: LISTENs on this node's channel on a dedicated
/// connection to `url` and wakes the claimer. After every (re)connect it wakes the
/// claimer too, since notifications sent while it was away are lost.
pub async fn run(ctx: Arc<NodeState>, url: String, wake: Arc<Wake>, token: CancellationToken) {
    let channel = ctx.node_id.channel();
    let mut backoff = Duration::from_millis(100);
    loop {
        let connected = async {
            // A real session (the direct URL, or DATABASE_URL when it is
            // one): a LISTEN lives as long as its connection.
            let options =
                crate::db::session_options(&url, &format!("pgrelay {} listener", ctx.node_id))?;
            // A pool of one, of its own: the listener must never wait for (or
            // starve) the request pool.
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .max_lifetime(None)
                .idle_timeout(None)
                .acquire_timeout(crate::db::ACQUIRE_TIMEOUT)
                .connect_with(options)
                .await?;
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.ignore_pool_close_event(true);
            listener.listen(&channel).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = tokio::select! {
            result = connected => match result {
                Ok(listener) => listener,
                Err(error) => {
                    ctx.lifecycle.listener_up.store(false, Ordering::Release);
                    metrics::counter!(m::DB_ERRORS, "operation" => "listen").increment(1);
                    tracing::warn!(%error, "LISTEN connection failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = token.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            },
            () = token.cancelled() => return,
        };
        ctx.lifecycle.listener_up.store(true, Ordering::Release);
        backoff = Duration::from_millis(100);
        tracing::debug!(%channel, "listening");
        metrics::counter!(m::WAKEUPS, "source" => "rescan").increment(1);
        wake.wake();
        loop {
            tokio::select! {
                received = listener.try_recv() => match received {
                    Ok(Some(_)) => {
                        metrics::counter!(m::WAKEUPS, "source" => "notify").increment(1);
                        wake.wake();
                    }
                    Ok(None) => {
                        // Reconnected underneath: anything sent meanwhile is lost.
                        tracing::info!("LISTEN connection re-established; rescanning the outbox");
                        metrics::counter!(m::WAKEUPS, "source" => "rescan").increment(1);
                        wake.wake();
                    }
                    Err(error) => {
                        ctx.lifecycle.listener_up.store(false, Ordering::Release);
                        metrics::counter!(m::DB_ERRORS, "operation" => "listen").increment(1);
                        tracing::warn!(%error, "LISTEN connection lost; reconnecting");
                        break;
                    }
                },
                () = token.cancelled() => return,
            }
        }
    }
}
