//! What a session writes: live messages past their stream's cursor,
//! backfills read from the database, and the catching up after a full
//! mailbox; each write is flushed, then recorded in the delivery log.

use std::sync::Arc;
use std::time::Instant;

use futures_util::SinkExt;

use super::{Backfill, Exit, Half, Item, Origin, Ready, Session, WsSink};
use crate::db;
use crate::message::StreamKey;
use crate::metrics as m;
use crate::read::delivery_log::Record;
use crate::read::hub::{Envelope, Inbox};
use crate::read::stream;

impl<P: Half, S: WsSink> Session<P, S> {
    /// Runs the backfills of the user's stream planned at connect.
    pub(super) async fn run_pending_backfills(&mut self) -> Result<(), Exit> {
        for backfill in std::mem::take(&mut self.pending_backfill) {
            self.backfill(self.user_stream.clone(), backfill).await?;
        }
        Ok(())
    }

    /// Writes a stream, or the user's parked messages, from `from` up to
    /// `head`, page by page; then the stream's cursor stands at `head`.
    pub(super) async fn backfill(
        &mut self,
        stream: StreamKey,
        backfill: Backfill,
    ) -> Result<(), Exit> {
        let mut after = backfill.from;
        loop {
            let pool = &self.ctx.db.pool;
            let page = if backfill.origin == Origin::Parked {
                db::bounded(stream::parked_page(pool, &self.user, after, backfill.head)).await
            } else {
                db::bounded(stream::page(
                    pool,
                    &stream.key(),
                    after,
                    backfill.head,
                    self.id,
                ))
                .await
            };
            let page = page.map_err(|error| {
                tracing::warn!(%error, "reading the backfill failed");
                Exit::unavailable()
            })?;
            let Some(last) = page.last() else { break };
            after = last.id;
            let full = page.len() as i64 == stream::PAGE;
            let items = page
                .into_iter()
                .map(|message| Item {
                    envelope: Arc::new(Envelope::new(message, stream.clone())),
                    origin: backfill.origin,
                })
                .collect();
            self.deliver(items).await?;
            if !full {
                break;
            }
        }
        if let Some(cursor) = self.cursor(&stream) {
            *cursor = (*cursor).max(backfill.head);
        }
        Ok(())
    }

    /// Recovers from a full mailbox: what is queued precedes the gap, and the
    /// streams read after it cover every message that was dropped.
    pub(super) async fn catch_up(&mut self, inbox: &mut Inbox) -> Result<(), Exit> {
        let mut queued = Vec::new();
        while let Ok(envelope) = inbox.messages.try_recv() {
            queued.push(envelope);
        }
        self.deliver_live(queued).await?;
        inbox.clear_lagging();
        let mut streams = vec![
            (self.user_stream.clone(), self.user_cursor),
            (StreamKey::Broadcast, self.broadcast_cursor),
        ];
        streams.extend(
            self.topics
                .iter()
                .map(|(t, c)| (StreamKey::Topic(t.clone()), *c)),
        );
        for (stream, cursor) in streams {
            let head = db::bounded(stream::head(&self.ctx.db.pool, &stream.key()))
                .await
                .map_err(|error| {
                    tracing::warn!(%error, "reading a stream head failed");
                    Exit::unavailable()
                })?;
            if head > cursor {
                tracing::debug!(stream = %stream.key(), from = cursor, head, "catching up after a full mailbox");
                let backfill = Backfill {
                    origin: Origin::Stream,
                    from: cursor,
                    head,
                };
                self.backfill(stream, backfill).await?;
            }
        }
        Ok(())
    }

    fn cursor(&mut self, stream: &StreamKey) -> Option<&mut i64> {
        match stream {
            StreamKey::User(_) => Some(&mut self.user_cursor),
            StreamKey::Broadcast => Some(&mut self.broadcast_cursor),
            StreamKey::Topic(topic) => self.topics.get_mut(topic),
            StreamKey::Queue(_) => None,
        }
    }

    /// Live messages: each is taken only if it is past its stream's cursor.
    pub(super) async fn deliver_live(&mut self, batch: Vec<Arc<Envelope>>) -> Result<(), Exit> {
        let mut items = Vec::with_capacity(batch.len());
        let now = Instant::now();
        for envelope in batch {
            m::stage(
                m::Stage::Mailbox,
                now.saturating_duration_since(envelope.offered_at),
                1,
            );
            if envelope.queue.is_some() {
                // Claimed for this connection alone: no stream to dedupe by
                // (a redelivery comes with an older id).
                items.push(Item {
                    envelope,
                    origin: Origin::Live,
                });
                continue;
            }
            let Some(cursor) = self.cursor(&envelope.stream) else {
                continue; // a topic unsubscribed since
            };
            if envelope.message.id <= *cursor {
                continue;
            }
            *cursor = envelope.message.id;
            items.push(Item {
                envelope,
                origin: Origin::Live,
            });
        }
        self.deliver(items).await
    }

    /// Turns items into frames (or lets the protocol hold them) and writes
    /// them.
    pub(super) async fn deliver(&mut self, items: Vec<Item>) -> Result<(), Exit> {
        let hold_at_most = self.ctx.settings.send_queue;
        let ready: Vec<Ready> = items
            .into_iter()
            .filter_map(|item| self.proto.frames(item, hold_at_most))
            .collect();
        self.write(ready).await
    }

    /// Writes and flushes a batch, then records the deliveries.
    async fn write(&mut self, batch: Vec<Ready>) -> Result<(), Exit> {
        if batch.is_empty() {
            return Ok(());
        }
        let sink = &mut self.sink;
        let started = Instant::now();
        let written = tokio::time::timeout(self.ctx.settings.limits.slow_consumer_timeout, async {
            for ready in &batch {
                for frame in &ready.frames {
                    sink.feed(frame.clone()).await?;
                }
            }
            sink.flush().await
        })
        .await;
        let failure = match written {
            Ok(Ok(())) => None,
            Ok(Err(error)) => {
                tracing::debug!(%error, "write failed");
                Some(Exit::Gone)
            }
            Err(_) => Some(Exit::close(
                1008,
                "slow consumer: not reading; reconnect with since",
            )),
        };
        if let Some(exit) = failure {
            // Not recorded as written: these stay routed to this connection
            // in the outbox, and are parked for the user when it departs.
            return Err(exit);
        }
        m::stage(m::Stage::Write, started.elapsed(), batch.len());
        let at = chrono::Utc::now();
        let protocol = self.protocol_name();
        metrics::counter!(m::MESSAGES_DELIVERED, "protocol" => protocol)
            .increment(batch.len() as u64);
        for ready in &batch {
            if ready.item.origin == Origin::Live {
                let created = ready.item.envelope.message.created_at;
                let latency = (at - created).to_std().unwrap_or_default();
                metrics::histogram!(m::DELIVERY_LATENCY).record(latency.as_secs_f64());
            }
        }
        for ready in batch {
            let envelope = &ready.item.envelope;
            self.proto.written(envelope.message.id);
            self.ctx
                .delivery
                .log
                .record(Record::Delivered {
                    message_id: envelope.message.id,
                    connection_id: self.id,
                    user_id: self.user.clone(),
                    at,
                    user_stream: matches!(envelope.stream, StreamKey::User(_)),
                    ack_required: ready.ack_required,
                    settles: match (&envelope.stream, &envelope.queue) {
                        (StreamKey::Queue(queue), Some(claim)) if claim.auto => Some(queue.clone()),
                        _ => None,
                    },
                })
                .await;
        }
        Ok(())
    }
}
