//! This process's registration as a node: the incarnation its fenced
//! transactions name (see `relay.nodes.incarnation`). On the lowest floor:
//! every part of the node that writes for it reads it, and it knows nothing
//! of them.

use uuid::Uuid;

/// This process's registration: the incarnation its fenced transactions
/// name, which changes when the node registers again after being declared
/// dead. Shared by every task of the node.
pub struct Registration {
    current: std::sync::Mutex<Uuid>,
    /// Every incarnation this process has registered: a row naming another
    /// one belongs to another process.
    used: std::sync::Mutex<Vec<Uuid>>,
    /// Woken when a transaction was refused by the fence, so that the node
    /// heals at once rather than at its next heartbeat; with the incarnation
    /// that was refused (a report about an earlier one is stale).
    fenced: tokio::sync::Notify,
    fenced_incarnation: std::sync::Mutex<Option<Uuid>>,
    /// Set by a registration, until the rows an earlier one claimed have
    /// been adopted.
    adopting: std::sync::atomic::AtomicBool,
}

impl Registration {
    pub fn new(incarnation: Uuid) -> Self {
        Self {
            current: std::sync::Mutex::new(incarnation),
            used: std::sync::Mutex::new(vec![incarnation]),
            fenced: tokio::sync::Notify::new(),
            fenced_incarnation: std::sync::Mutex::new(None),
            adopting: std::sync::atomic::AtomicBool::new(true),
        }
    }

    /// The incarnation to name in a transaction now.
    pub fn current(&self) -> Uuid {
        *self.current.lock().expect("registration lock")
    }

    /// Records `incarnation` as this process's, before it registers it: a
    /// registration whose answer is lost must not read as another process's.
    pub fn expect(&self, incarnation: Uuid) {
        self.used
            .lock()
            .expect("registration lock")
            .push(incarnation);
    }

    /// Switches to `incarnation`, once it is registered.
    pub fn replace(&self, incarnation: Uuid) {
        self.expect(incarnation);
        *self.current.lock().expect("registration lock") = incarnation;
        self.adopting
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether rows claimed by an earlier registration may wait to be
    /// adopted (see `registry::nodes::adopt`).
    pub fn adopting(&self) -> bool {
        self.adopting.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn adopted(&self) {
        self.adopting
            .store(false, std::sync::atomic::Ordering::Release);
    }

    /// Whether `incarnation` is one of this process's.
    pub fn is_ours(&self, incarnation: Uuid) -> bool {
        self.used
            .lock()
            .expect("registration lock")
            .contains(&incarnation)
    }

    /// A transaction under `incarnation` was refused by the fence.
    pub fn report_fenced(&self, incarnation: Uuid) {
        if incarnation == self.current() {
            *self.fenced_incarnation.lock().expect("registration lock") = Some(incarnation);
            self.fenced.notify_one();
        }
    }

    /// Resolves when a transaction under the *current* incarnation was
    /// refused by the fence (reports about an earlier one, which may arrive
    /// after the node has registered again, are ignored).
    pub async fn fenced(&self) {
        loop {
            self.fenced.notified().await;
            let reported = self
                .fenced_incarnation
                .lock()
                .expect("registration lock")
                .take();
            if reported == Some(self.current()) {
                return;
            }
        }
    }
}
