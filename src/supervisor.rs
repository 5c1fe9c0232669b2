//! Supervision of background tasks: no task dies silently.
//!
//! Two kinds run under it. A *loop* (the claimer, the listener, the
//! heartbeat, the sweeper…) runs for the node's life: if it ends before the
//! node stops, or panics, that is logged and it is started again after a
//! pause. A *worker* serves a queue (a group-commit shard, the delivery
//! log): it ends when its queue closes; a panic is logged and it is started
//! again on the same queue, so that what waits there is still served.
//!
//! This module sits on the lowest floor: it knows tasks, not what they do.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a task that failed waits before it starts again: long enough
/// not to spin on a bug, short enough that the node recovers at once.
const RESTART_PAUSE: Duration = Duration::from_secs(1);

/// Runs `task` on `tasks` until `shutdown`: each run gets the token; a run
/// that ends before shutdown, or panics, is logged and started again after
/// a pause.
pub fn spawn_loop<F, Fut>(
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
    name: &'static str,
    task: F,
) where
    F: Fn(CancellationToken) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let token = shutdown.clone();
    tasks.spawn(async move {
        loop {
            let outcome = std::panic::AssertUnwindSafe(task(token.clone()))
                .catch_unwind()
                .await;
            if token.is_cancelled() {
                return;
            }
            match outcome {
                Ok(()) => tracing::error!(
                    task = name,
                    "background task ended unexpectedly; restarting"
                ),
                Err(_) => tracing::error!(task = name, "background task panicked; restarting"),
            }
            tokio::select! {
                () = tokio::time::sleep(RESTART_PAUSE) => {}
                () = token.cancelled() => return,
            }
        }
    });
}

/// Runs a worker: `run` is called again after a panic (logged), and the
/// worker ends when a run returns. Whatever it serves (its queue) must live
/// outside the run, e.g. behind a [`tokio::sync::Mutex`], so that a restart
/// finds it.
pub fn spawn_worker<F, Fut>(name: &'static str, run: F) -> JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            match std::panic::AssertUnwindSafe(run()).catch_unwind().await {
                Ok(()) => return,
                Err(_) => tracing::error!(task = name, "worker panicked; restarting"),
            }
            tokio::time::sleep(RESTART_PAUSE).await;
        }
    })
}

/// A queue's receiving end, kept across a worker's restarts.
pub type Queue<R> = Arc<tokio::sync::Mutex<R>>;

/// Wraps a receiver for [`spawn_worker`].
pub fn queue<R>(receiver: R) -> Queue<R> {
    Arc::new(tokio::sync::Mutex::new(receiver))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_worker_that_panics_serves_the_rest_of_its_queue() {
        let (sender, receiver) = tokio::sync::mpsc::channel(8);
        let queue = queue(receiver);
        let served = Arc::new(AtomicUsize::new(0));
        let worker = spawn_worker("test", {
            let served = served.clone();
            move || {
                let (queue, served) = (queue.clone(), served.clone());
                async move {
                    let mut queue = queue.lock().await;
                    while let Some(item) = queue.recv().await {
                        if item == 2 {
                            panic!("a bug");
                        }
                        served.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        });
        for item in 1..=4 {
            sender.send(item).await.unwrap();
        }
        drop(sender);
        worker.await.unwrap();
        assert_eq!(served.load(Ordering::SeqCst), 3, "1, 3 and 4 served");
    }

    #[tokio::test(start_paused = true)]
    async fn a_loop_that_ends_early_is_started_again_until_shutdown() {
        let (tasks, shutdown) = (TaskTracker::new(), CancellationToken::new());
        let runs = Arc::new(AtomicUsize::new(0));
        spawn_loop(&tasks, &shutdown, "test", {
            let runs = runs.clone();
            move |_token| {
                let runs = runs.clone();
                async move {
                    if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                        panic!("a bug");
                    }
                }
            }
        });
        tokio::time::sleep(RESTART_PAUSE * 3 + Duration::from_millis(10)).await;
        assert!(
            runs.load(Ordering::SeqCst) >= 3,
            "restarted after a panic and after an end"
        );
        shutdown.cancel();
        tasks.close();
        tasks.wait().await;
    }
}
