//! A STOMP session's subscriptions and the acks it waits for: which
//! MESSAGE frames a message becomes, and what an ACK or NACK settles.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use axum::extract::ws::Message;

use super::destinations::Listens;
use super::to_message;
use crate::message::StreamKey;
use crate::protocol::stomp::{self, Frame, Version};
use crate::read::hub::{Credit, Envelope};

/// Outstanding acks remembered per connection; the oldest are forgotten.
const MAX_PENDING_ACKS: usize = 10_000;
/// The destination of user messages sent without one.
pub(super) const DEFAULT_USER_DESTINATION: &str = "/queue/messages";
const DEFAULT_BROADCAST_DESTINATION: &str = "/topic/broadcast";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum AckMode {
    Auto,
    Client,
    ClientIndividual,
}

impl AckMode {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            AckMode::Auto => "auto",
            AckMode::Client => "client",
            AckMode::ClientIndividual => "client-individual",
        }
    }
}

pub(super) struct Subscription {
    pub destination: String,
    pub listens: Listens,
    pub ack: AckMode,
    /// Set for a queue's consumer.
    pub consumer: Option<Consumer>,
}

/// A queue consumer, as its subscription knows it.
pub(super) struct Consumer {
    /// Its row's key in `relay.queue_consumers.subscription`: the STOMP id
    /// and a suffix of its own, so that a reused id is another consumer.
    pub key: Arc<str>,
    /// Its room for messages.
    pub credit: Arc<Credit>,
}

struct PendingAck {
    subscription: String,
    message_id: i64,
    /// A queue's message, and its consumer's credit.
    queue: Option<(Arc<str>, Arc<Credit>)>,
}

/// A message an ACK or NACK settled.
pub(super) struct Settled {
    pub message_id: i64,
    /// The queue it came from, if it did.
    pub queue: Option<Arc<str>>,
}

/// The subscriptions by id, and the acks they wait for.
#[derive(Default)]
pub(super) struct Subscriptions {
    pub by_id: HashMap<String, Subscription>,
    /// Ack id → what it acknowledges, in ack id order.
    pending: HashMap<u64, PendingAck>,
    pending_order: VecDeque<u64>,
    next_ack: u64,
}

impl Subscriptions {
    /// The MESSAGE frames for a message, one per matching subscription (a
    /// queue's: one, for the subscription it was claimed for), and whether
    /// one of them waits for an ack.
    pub fn frames_for(&mut self, envelope: &Envelope, version: Version) -> (Vec<Message>, bool) {
        let (message, stream) = (&envelope.message, &envelope.stream);
        let wanted: Vec<(String, String, AckMode)> = self
            .by_id
            .iter()
            .filter(|(id, sub)| match (&sub.listens, stream) {
                (Listens::Queue(q), StreamKey::Queue(queue)) => {
                    q == queue
                        && envelope
                            .queue
                            .as_ref()
                            .is_some_and(|claim| *claim.subscription == ***id)
                }
                (Listens::Topic(t), StreamKey::Topic(topic)) => t == topic,
                (Listens::User(destination), StreamKey::User(_)) => {
                    destination
                        == message
                            .destination
                            .as_deref()
                            .unwrap_or(DEFAULT_USER_DESTINATION)
                }
                (_, StreamKey::Broadcast) => {
                    sub.destination
                        == message
                            .destination
                            .as_deref()
                            .unwrap_or(DEFAULT_BROADCAST_DESTINATION)
                }
                _ => false,
            })
            .map(|(id, sub)| (id.clone(), sub.destination.clone(), sub.ack))
            .collect();
        let (body, content_type) = message.payload.body();
        let message_id = message.id.to_string();
        let redelivered = envelope.queue.as_ref().is_some_and(|c| c.redelivered);
        let mut frames = Vec::with_capacity(wanted.len());
        let acked = wanted.iter().any(|(_, _, ack)| *ack != AckMode::Auto);
        for (subscription, destination, ack) in wanted {
            let consumer = self.by_id[&subscription].consumer.as_ref();
            let queue = match (&envelope.stream, consumer.map(|c| &c.credit)) {
                (StreamKey::Queue(queue), Some(credit)) => {
                    if ack == AckMode::Auto {
                        // Settled once written: room for the next one.
                        credit.give_back(1);
                        None
                    } else {
                        Some((queue.clone(), credit.clone()))
                    }
                }
                _ => None,
            };
            let ack_id =
                (ack != AckMode::Auto).then(|| self.remember_ack(&subscription, message.id, queue));
            let ack_text = ack_id.map(|id| id.to_string());
            // A queue message's destination is its queue's; any other's is
            // the subscription's (a user message's says which of the user's
            // destinations it was sent to only through the subscription).
            let mut headers = vec![
                ("subscription", subscription.as_str()),
                ("message-id", message_id.as_str()),
                ("destination", destination.as_str()),
            ];
            if let Some(content_type) = content_type {
                headers.push(("content-type", content_type));
            }
            if let Some(ack) = &ack_text
                && version == Version::V1_2
            {
                headers.push(("ack", ack));
            }
            if redelivered {
                headers.push(("redelivered", "true"));
            }
            // Application headers travel, after the STOMP-defined ones (a
            // receiver takes the first of a repeated name: ours win).
            for (name, value) in &message.headers {
                headers.push((name, value));
            }
            frames.push(to_message(stomp::encode(
                "MESSAGE", &headers, &body, version,
            )));
        }
        (frames, acked)
    }

    fn remember_ack(
        &mut self,
        subscription: &str,
        message_id: i64,
        queue: Option<(Arc<str>, Arc<Credit>)>,
    ) -> u64 {
        self.next_ack += 1;
        let id = self.next_ack;
        self.pending.insert(
            id,
            PendingAck {
                subscription: subscription.to_owned(),
                message_id,
                queue,
            },
        );
        self.pending_order.push_back(id);
        // The oldest are forgotten, but never a queue message's: forgotten,
        // it would stay held (and its consumer's credit taken) until the
        // connection leaves; prefetch bounds those already.
        while self.pending_order.len() > MAX_PENDING_ACKS {
            let oldest = self
                .pending_order
                .iter()
                .position(|id| self.pending.get(id).is_some_and(|p| p.queue.is_none()));
            let Some(oldest) = oldest else { break };
            if let Some(old) = self.pending_order.remove(oldest) {
                self.pending.remove(&old);
            }
        }
        id
    }

    /// Forgets the acks subscription `id` waits for (it was unsubscribed:
    /// its queue messages wait in the queue again).
    pub fn forget(&mut self, id: &str) {
        self.pending.retain(|_, p| p.subscription != id);
        self.pending_order
            .retain(|ack| self.pending.contains_key(ack));
    }

    /// The pending acks an ACK or NACK frame settles: one (client-individual)
    /// or every earlier one of the subscription too (client). Empty when the
    /// frame names nothing pending.
    pub fn settle(&mut self, frame: &Frame, version: Version) -> Vec<Settled> {
        let found = match version {
            Version::V1_2 => frame.header("id").and_then(|id| id.parse::<u64>().ok()),
            _ => {
                let subscription = frame.header("subscription");
                let message_id = frame
                    .header("message-id")
                    .and_then(|id| id.parse::<i64>().ok());
                self.pending_order.iter().copied().find(|ack| {
                    self.pending.get(ack).is_some_and(|p| {
                        Some(p.message_id) == message_id
                            && subscription.is_none_or(|s| s == p.subscription)
                    })
                })
            }
        };
        let Some(ack_id) = found else {
            return Vec::new();
        };
        let Some(pending) = self.pending.get(&ack_id) else {
            return Vec::new();
        };
        let subscription = pending.subscription.clone();
        let cumulative = self
            .by_id
            .get(&subscription)
            .is_some_and(|s| s.ack == AckMode::Client);
        let settled: Vec<u64> = if cumulative {
            self.pending_order
                .iter()
                .copied()
                .filter(|id| {
                    *id <= ack_id
                        && self
                            .pending
                            .get(id)
                            .is_some_and(|p| p.subscription == subscription)
                })
                .collect()
        } else {
            vec![ack_id]
        };
        let mut messages = Vec::with_capacity(settled.len());
        for id in settled {
            if let Some(pending) = self.pending.remove(&id) {
                let queue = pending.queue.map(|(queue, credit)| {
                    credit.give_back(1);
                    queue
                });
                messages.push(Settled {
                    message_id: pending.message_id,
                    queue,
                });
            }
        }
        self.pending_order
            .retain(|id| self.pending.contains_key(id));
        messages
    }
}
