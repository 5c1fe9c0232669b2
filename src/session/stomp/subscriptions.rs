//! A STOMP session's subscriptions and the acks it waits for: which
//! MESSAGE frames a message becomes, and what an ACK or NACK settles.

use std::collections::{HashMap, VecDeque};

use axum::extract::ws::Message;

use super::destinations::Listens;
use super::to_message;
use crate::message::{StoredMessage, StreamKey};
use crate::protocol::stomp::{self, Frame, Version};

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

pub(super) struct Subscription {
    pub destination: String,
    pub listens: Listens,
    pub ack: AckMode,
}

struct PendingAck {
    subscription: String,
    message_id: i64,
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
    /// The MESSAGE frames for a message, one per matching subscription.
    pub fn frames_for(
        &mut self,
        message: &StoredMessage,
        stream: &StreamKey,
        version: Version,
    ) -> Vec<Message> {
        let wanted: Vec<(String, String, AckMode)> = self
            .by_id
            .iter()
            .filter(|(_, sub)| match (&sub.listens, stream) {
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
        let mut frames = Vec::with_capacity(wanted.len());
        for (subscription, destination, ack) in wanted {
            let ack_id =
                (ack != AckMode::Auto).then(|| self.remember_ack(&subscription, message.id));
            let ack_text = ack_id.map(|id| id.to_string());
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
            frames.push(to_message(stomp::encode(
                "MESSAGE", &headers, &body, version,
            )));
        }
        frames
    }

    fn remember_ack(&mut self, subscription: &str, message_id: i64) -> u64 {
        self.next_ack += 1;
        let id = self.next_ack;
        self.pending.insert(
            id,
            PendingAck {
                subscription: subscription.to_owned(),
                message_id,
            },
        );
        self.pending_order.push_back(id);
        while self.pending_order.len() > MAX_PENDING_ACKS {
            if let Some(old) = self.pending_order.pop_front() {
                self.pending.remove(&old);
            }
        }
        id
    }

    /// The pending acks an ACK or NACK frame settles: one (client-individual)
    /// or every earlier one of the subscription too (client). Empty when the
    /// frame names nothing pending.
    pub fn settle(&mut self, frame: &Frame, version: Version) -> Vec<i64> {
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
                messages.push(pending.message_id);
            }
        }
        self.pending_order
            .retain(|id| self.pending.contains_key(id));
        messages
    }
}
