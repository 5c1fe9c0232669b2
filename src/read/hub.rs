//! The node's local sessions: where the claimer hands a message to the
//! sockets it was routed to. Every session has a bounded mailbox; a session
//! whose mailbox is full is marked *lagging* instead of blocking the claimer,
//! and later catches up from its stream in the database, so one slow client
//! never slows the others and loses nothing.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::{Notify, mpsc};
use uuid::Uuid;

use crate::message::{StoredMessage, StreamKey};

/// A message routed to sessions.
#[derive(Debug)]
pub struct Envelope {
    pub message: Arc<StoredMessage>,
    /// The stream it came through: a user's, a topic's, or the broadcast.
    pub stream: StreamKey,
    /// When the claim handed it over (the `mailbox` stage starts).
    pub offered_at: std::time::Instant,
    /// The JSON protocol's frame, the same for every JSON session: encoded
    /// by the first session that writes it and shared by the others (a
    /// topic message's, for a thousand subscribers). The hub does not encode
    /// it: the JSON half of a session does (`session::json`).
    pub json_frame: OnceLock<Utf8Bytes>,
    /// Set for a queue's message: the one consumer it was claimed for.
    pub queue: Option<QueueClaim>,
}

/// A queue message's consumer, as the claim chose it.
#[derive(Debug, Clone)]
pub struct QueueClaim {
    /// The STOMP subscription id it goes to.
    pub subscription: Arc<str>,
    /// Settled once written (ack `auto`), rather than by an ACK.
    pub auto: bool,
    /// It was handed to a consumer before (a NACK, a consumer that left).
    pub redelivered: bool,
}

/// How many of a queue consumer's messages may be outstanding (claimed,
/// and not yet written for `auto`, or not yet acked), and how many are.
#[derive(Debug)]
pub struct Credit {
    prefetch: usize,
    outstanding: AtomicUsize,
    /// The hub's: wakes the claimer when room is given back.
    room: Arc<Notify>,
}

impl Credit {
    /// Messages it may take now.
    pub fn free(&self) -> usize {
        self.prefetch
            .saturating_sub(self.outstanding.load(Ordering::Acquire))
    }

    fn take(&self, n: usize) {
        self.outstanding.fetch_add(n, Ordering::AcqRel);
    }

    /// `n` of its messages were settled: the claimer may claim for it.
    pub fn give_back(&self, n: usize) {
        let _ = self
            .outstanding
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |o| {
                Some(o.saturating_sub(n))
            });
        self.room.notify_one();
    }
}

/// One local consumer of a queue.
#[derive(Clone)]
struct QueueConsumer {
    connection: Uuid,
    subscription: Arc<str>,
    key: Arc<str>,
    auto: bool,
    credit: Arc<Credit>,
}

/// Room for one queue message in a consumer's mailbox (see
/// [`Hub::reserve_queue`]).
pub struct QueueSlot {
    permit: mpsc::OwnedPermit<Arc<Envelope>>,
    credit: Arc<Credit>,
}

impl QueueSlot {
    /// Hands the message over: it counts against the consumer's credit
    /// until settled.
    pub fn send(self, envelope: Arc<Envelope>) {
        self.credit.take(1);
        self.permit.send(envelope);
    }
}

/// A consumer that can take messages now, and how many.
#[derive(Debug, Clone)]
pub struct Demand {
    pub connection: Uuid,
    /// The STOMP subscription id (its MESSAGE frames name it).
    pub subscription: Arc<str>,
    /// The consumer's row key (`relay.queue_consumers.subscription`).
    pub key: Arc<str>,
    pub auto: bool,
    pub free: usize,
}

impl Envelope {
    pub fn new(message: Arc<StoredMessage>, stream: StreamKey) -> Self {
        Self {
            message,
            stream,
            offered_at: std::time::Instant::now(),
            json_frame: OnceLock::new(),
            queue: None,
        }
    }
}

/// Instructions to a session from outside its task.
#[derive(Debug, Clone)]
pub enum Control {
    /// Close the socket with this code and reason.
    Close { code: u16, reason: String },
}

/// What became of a message offered to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// In the mailbox.
    Queued,
    /// The mailbox is full: the session will catch up from the database.
    Lagging,
    /// No such session on this node (it has closed).
    Gone,
}

#[derive(Clone)]
struct SessionHandle {
    mailbox: mpsc::Sender<Arc<Envelope>>,
    shared: Arc<Shared>,
}

/// What a session shares with those who hand it work. Kept small and in one
/// allocation: a node holds tens of thousands of these.
#[derive(Default)]
struct Shared {
    lagging: AtomicBool,
    /// A pending instruction (only the first counts: it closes the session).
    control: Mutex<Option<Control>>,
    wake: Notify,
}

/// The receiving side of a session's mailbox, owned by the session task.
pub struct Inbox {
    pub messages: mpsc::Receiver<Arc<Envelope>>,
    shared: Arc<Shared>,
}

impl Inbox {
    /// Whether messages were dropped because the mailbox was full.
    pub fn is_lagging(&self) -> bool {
        self.shared.lagging.load(Ordering::Acquire)
    }

    /// Accepts messages again. Call only after the queued messages were taken
    /// (they all precede the gap) and before reading the stream head to catch
    /// up (which then covers every dropped message).
    pub fn clear_lagging(&self) {
        self.shared.lagging.store(false, Ordering::Release);
    }

    /// Where control instructions arrive (apart from the mailbox, so that
    /// both can be awaited at once).
    pub fn controls(&self) -> Controls {
        Controls(self.shared.clone())
    }
}

/// See [`Inbox::controls`].
pub struct Controls(Arc<Shared>);

impl Controls {
    /// The next control instruction.
    pub async fn next(&self) -> Control {
        loop {
            if let Some(control) = self.0.control.lock().expect("hub lock").take() {
                return control;
            }
            // notify_one keeps a permit when no one waits: nothing is missed.
            self.0.wake.notified().await;
        }
    }
}

#[derive(Default)]
pub struct Hub {
    /// Never held across an await: every operation is a map lookup.
    sessions: Mutex<HashMap<Uuid, SessionHandle>>,
    /// Topic → its subscribed sessions here, so that one outbox row per topic
    /// message fans out to every local subscriber.
    topics: Mutex<HashMap<Arc<str>, HashMap<Uuid, SessionHandle>>>,
    /// Sessions that showed signs of life since the last heartbeat write.
    seen: Mutex<HashSet<Uuid>>,
    /// Queue → its consumers here, in subscription order.
    queues: Mutex<HashMap<Arc<str>, Vec<QueueConsumer>>>,
    /// Woken when a queue consumer may take more (it subscribed, or settled
    /// messages): the claimer then claims for it.
    queue_credit: Arc<Notify>,
}

impl Hub {
    /// Registers a session and returns its inbox. Sessions are registered here
    /// *before* their database row commits, so that a message routed to them
    /// the moment the row is visible finds them.
    pub fn register(&self, id: Uuid, mailbox_size: usize) -> Inbox {
        let (mailbox, messages) = mpsc::channel(mailbox_size);
        let shared = Arc::new(Shared::default());
        let handle = SessionHandle {
            mailbox,
            shared: shared.clone(),
        };
        self.lock().insert(id, handle);
        Inbox { messages, shared }
    }

    /// Removes a session, its subscriptions to `topics` and its queue
    /// consumers.
    pub fn remove(&self, id: Uuid, topics: &[Arc<str>]) {
        self.lock().remove(&id);
        for topic in topics {
            self.unsubscribe(id, topic);
        }
        self.remove_consumers(id, None);
        self.seen.lock().expect("hub lock").remove(&id);
    }

    /// Adds a consumer of `queue` (subscription `subscription` of session
    /// `id`, registered under `key`) that may hold `prefetch` messages at
    /// once; None if the session is not here.
    pub fn add_consumer(
        &self,
        id: Uuid,
        queue: &Arc<str>,
        (subscription, key): (&Arc<str>, &Arc<str>),
        auto: bool,
        prefetch: usize,
    ) -> Option<Arc<Credit>> {
        if !self.lock().contains_key(&id) {
            return None;
        }
        let credit = Arc::new(Credit {
            prefetch: prefetch.max(1),
            outstanding: AtomicUsize::new(0),
            room: self.queue_credit.clone(),
        });
        self.queues
            .lock()
            .expect("hub lock")
            .entry(queue.clone())
            .or_default()
            .push(QueueConsumer {
                connection: id,
                subscription: subscription.clone(),
                key: key.clone(),
                auto,
                credit: credit.clone(),
            });
        Some(credit)
    }

    /// Removes session `id`'s consumers (of subscription `only`, or all).
    pub fn remove_consumers(&self, id: Uuid, only: Option<&str>) {
        let mut queues = self.queues.lock().expect("hub lock");
        queues.retain(|_, consumers| {
            consumers.retain(|c| c.connection != id || only.is_some_and(|s| *c.subscription != *s));
            !consumers.is_empty()
        });
    }

    /// Each queue with a local consumer that can take messages now, with
    /// those consumers.
    pub fn queue_demand(&self) -> Vec<(Arc<str>, Vec<Demand>)> {
        let queues = self.queues.lock().expect("hub lock");
        queues
            .iter()
            .filter_map(|(queue, consumers)| {
                let wanting: Vec<Demand> = consumers
                    .iter()
                    .filter(|c| c.credit.free() > 0)
                    .map(|c| Demand {
                        connection: c.connection,
                        subscription: c.subscription.clone(),
                        key: c.key.clone(),
                        auto: c.auto,
                        free: c.credit.free(),
                    })
                    .collect();
                (!wanting.is_empty()).then(|| (queue.clone(), wanting))
            })
            .collect()
    }

    /// Room in the mailbox of queue consumer `subscription` of session
    /// `id`, for up to `n` messages: a claim reserves it before it takes
    /// any entry, so that what it commits can always be handed over. Empty
    /// when the session or consumer is gone, or its mailbox is full.
    pub fn reserve_queue(
        &self,
        id: Uuid,
        queue: &str,
        subscription: &str,
        n: usize,
    ) -> Vec<QueueSlot> {
        let Some(handle) = self.lock().get(&id).cloned() else {
            return Vec::new();
        };
        let credit = {
            let queues = self.queues.lock().expect("hub lock");
            queues.get(queue).and_then(|consumers| {
                consumers
                    .iter()
                    .find(|c| c.connection == id && *c.subscription == *subscription)
                    .map(|c| c.credit.clone())
            })
        };
        let Some(credit) = credit else {
            return Vec::new();
        };
        let mut slots = Vec::new();
        while slots.len() < n {
            match handle.mailbox.clone().try_reserve_owned() {
                Ok(permit) => slots.push(QueueSlot {
                    permit,
                    credit: credit.clone(),
                }),
                Err(_) => break,
            }
        }
        slots
    }

    /// A queue consumer may take more: the claimer claims for it.
    pub fn queue_credit_freed(&self) {
        self.queue_credit.notify_one();
    }

    /// Resolves once a queue consumer may take more.
    pub async fn queue_credit(&self) {
        self.queue_credit.notified().await;
    }

    /// Removes a session whose topics are not known (it ended by a panic):
    /// from every topic's subscribers.
    pub fn remove_everywhere(&self, id: Uuid) {
        self.lock().remove(&id);
        let mut topics = self.topics.lock().expect("hub lock");
        topics.retain(|_, subscribers| {
            subscribers.remove(&id);
            !subscribers.is_empty()
        });
        drop(topics);
        self.remove_consumers(id, None);
        self.seen.lock().expect("hub lock").remove(&id);
    }

    /// Adds a session to a topic's local subscribers. Done *before* the
    /// subscription's row commits, like [`Hub::register`].
    pub fn subscribe(&self, id: Uuid, topic: &Arc<str>) -> bool {
        let Some(handle) = self.lock().get(&id).cloned() else {
            return false;
        };
        let mut topics = self.topics.lock().expect("hub lock");
        topics.entry(topic.clone()).or_default().insert(id, handle);
        true
    }

    pub fn unsubscribe(&self, id: Uuid, topic: &str) {
        let mut topics = self.topics.lock().expect("hub lock");
        if let Some(subscribers) = topics.get_mut(topic) {
            subscribers.remove(&id);
            if subscribers.is_empty() {
                topics.remove(topic);
            }
        }
    }

    pub fn offer(&self, id: Uuid, envelope: &Arc<Envelope>) -> Offer {
        let Some(handle) = self.lock().get(&id).cloned() else {
            return Offer::Gone;
        };
        offer_to(&handle, envelope)
    }

    /// Offers a topic message to every local subscriber; returns how many
    /// took it (queued or lagging).
    pub fn offer_topic(&self, topic: &str, envelope: &Arc<Envelope>) -> usize {
        let topics = self.topics.lock().expect("hub lock");
        let Some(subscribers) = topics.get(topic) else {
            return 0;
        };
        subscribers
            .values()
            .filter(|h| offer_to(h, envelope) != Offer::Gone)
            .count()
    }

    /// Offers a broadcast to every session here.
    pub fn offer_all(&self, envelope: &Arc<Envelope>) -> usize {
        let sessions = self.lock();
        sessions
            .values()
            .filter(|h| offer_to(h, envelope) != Offer::Gone)
            .count()
    }

    /// Sends a control instruction; false if the session is not here.
    pub fn control(&self, id: Uuid, control: Control) -> bool {
        let Some(handle) = self.lock().get(&id).cloned() else {
            return false;
        };
        handle.instruct(control);
        true
    }

    /// Sends a control instruction to every session.
    pub fn control_all(&self, control: Control) {
        let handles: Vec<_> = self.lock().values().cloned().collect();
        for handle in handles {
            handle.instruct(control.clone());
        }
    }

    /// The ids of every registered session.
    pub fn ids(&self) -> Vec<Uuid> {
        self.lock().keys().copied().collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn mark_seen(&self, id: Uuid) {
        self.seen.lock().expect("hub lock").insert(id);
    }

    pub fn take_seen(&self) -> Vec<Uuid> {
        self.seen.lock().expect("hub lock").drain().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, SessionHandle>> {
        self.sessions.lock().expect("hub lock")
    }
}

impl SessionHandle {
    fn instruct(&self, control: Control) {
        let mut pending = self.shared.control.lock().expect("hub lock");
        // One close is enough: the first one stands.
        if pending.is_none() {
            *pending = Some(control);
            self.shared.wake.notify_one();
        }
    }
}

fn offer_to(handle: &SessionHandle, envelope: &Arc<Envelope>) -> Offer {
    // Once lagging, drop everything until the session has caught up: a
    // message queued after a gap would otherwise be delivered before the
    // messages of the gap.
    if handle.shared.lagging.load(Ordering::Acquire) {
        return Offer::Lagging;
    }
    match handle.mailbox.try_send(envelope.clone()) {
        Ok(()) => Offer::Queued,
        Err(mpsc::error::TrySendError::Full(_)) => {
            handle.shared.lagging.store(true, Ordering::Release);
            Offer::Lagging
        }
        Err(mpsc::error::TrySendError::Closed(_)) => Offer::Gone,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::MessageRow;

    fn envelope(id: i64) -> Arc<Envelope> {
        Arc::new(Envelope::new(
            StoredMessage::from_row(MessageRow {
                id,
                destination: None,
                data: Some("1".into()),
                body: None,
                content_type: None,
                created_at: chrono::Utc::now(),
                target_connection: None,
                headers: None,
            }),
            StreamKey::Broadcast,
        ))
    }

    #[test]
    fn a_full_mailbox_turns_lagging_until_cleared() {
        let hub = Hub::default();
        let id = Uuid::now_v7();
        let mut inbox = hub.register(id, 2);
        assert_eq!(hub.offer(id, &envelope(1)), Offer::Queued);
        assert_eq!(hub.offer(id, &envelope(2)), Offer::Queued);
        assert_eq!(hub.offer(id, &envelope(3)), Offer::Lagging);
        assert!(inbox.is_lagging());
        // Room again, but still lagging: 4 must not overtake 3.
        inbox.messages.try_recv().unwrap();
        assert_eq!(hub.offer(id, &envelope(4)), Offer::Lagging);
        inbox.messages.try_recv().unwrap();
        inbox.clear_lagging();
        assert_eq!(hub.offer(id, &envelope(5)), Offer::Queued);
        assert_eq!(inbox.messages.try_recv().unwrap().message.id, 5);
    }

    #[test]
    fn unknown_or_removed_sessions_are_gone() {
        let hub = Hub::default();
        let id = Uuid::now_v7();
        assert_eq!(hub.offer(id, &envelope(1)), Offer::Gone);
        let _inbox = hub.register(id, 2);
        hub.remove(id, &[]);
        assert_eq!(hub.offer(id, &envelope(1)), Offer::Gone);
        assert!(!hub.control(
            id,
            Control::Close {
                code: 1000,
                reason: String::new()
            }
        ));
    }
}
