//! What a client sends (JSON `publish`, STOMP `SEND`): queued in the node's
//! group commit, in flight until committed, and answered in the order it
//! was sent, whatever the protocol.

use std::collections::VecDeque;

use super::{Exit, Half, Session, WsSink};
use crate::message::NewMessage;
use crate::metrics as m;
use crate::read::hub::Control;
use crate::write::enqueue::{self, EnqueueError};
use crate::write::group_commit::Pending;

/// Submissions a connection may have in flight: enough to fill the group
/// commit's batches from one busy producer, few enough to bound its memory.
pub(super) const IN_FLIGHT: usize = 64;

/// A submission of this connection waiting for its commit.
pub(super) struct InFlight<R> {
    pub pending: Pending,
    pub reply: R,
}

impl<P: Half, S: WsSink> Session<P, S> {
    /// Queues a message this client sends in the node's group commit;
    /// `reply` is sent once it has committed (or says why not, honestly:
    /// see `write::enqueue`). Up to [`IN_FLIGHT`] are pending at once; past
    /// that, this waits for the oldest.
    pub(super) async fn submit(
        &mut self,
        message: NewMessage,
        reply: P::Reply,
    ) -> Result<(), Exit> {
        while self.in_flight.len() >= IN_FLIGHT {
            // Bounded by the oldest's deadline; a close or a shutdown is not
            // kept waiting behind it.
            let (reply, answer) = tokio::select! {
                answered = next_answer(&mut self.in_flight) => answered,
                Control::Close { code, reason } = self.controls.next() => {
                    return Err(Exit::Close { code, reason });
                }
                () = self.ctx.lifecycle.shutdown.cancelled() => return Err(Exit::shutting_down()),
            };
            Box::pin(self.on_answered(reply, answer)).await?;
        }
        let queued = self
            .ctx
            .write
            .group_commit
            .enqueue(
                vec![message],
                self.transport.source(),
                enqueue::deadline(self.transport.source()),
            )
            .await;
        match queued {
            Ok(pending) => {
                self.in_flight.push_back(InFlight { pending, reply });
                Ok(())
            }
            Err(error) => {
                // Answered after the submissions before it.
                Box::pin(self.answer_in_flight()).await?;
                Box::pin(self.on_answered(reply, Err(error))).await
            }
        }
    }

    /// Answers every submission in flight, in order: before a frame whose
    /// answer must come after theirs (anything but another submission).
    pub(super) async fn answer_in_flight(&mut self) -> Result<(), Exit> {
        while !self.in_flight.is_empty() {
            let (reply, answer) = next_answer(&mut self.in_flight).await;
            Box::pin(self.on_answered(reply, answer)).await?;
        }
        Ok(())
    }

    /// Withdraws the submissions in flight that no batch has taken yet: they
    /// are never stored (a session ending with an error does this, so that
    /// a client resending from the failed one does not store them after it).
    pub(super) fn withdraw_in_flight(&mut self) {
        for later in &self.in_flight {
            later.pending.withdraw();
        }
    }

    pub(super) async fn on_answered(
        &mut self,
        reply: P::Reply,
        answer: Result<Vec<i64>, EnqueueError>,
    ) -> Result<(), Exit> {
        let protocol = self.protocol_name();
        let answer = answer.map(|ids| ids[0]);
        match &answer {
            Ok(_) => {
                metrics::counter!(m::MESSAGES_ACCEPTED, "source" => protocol).increment(1);
            }
            Err(error) => {
                metrics::counter!(m::SUBMIT_OUTCOMES, "source" => protocol, "outcome" => error.outcome())
                    .increment(1);
            }
        }
        P::answered(self, reply, answer).await
    }
}

/// The oldest submission's answer (cancel-safe: the submission stays at the
/// front until answered).
pub(super) async fn next_answer<R>(
    in_flight: &mut VecDeque<InFlight<R>>,
) -> (R, Result<Vec<i64>, EnqueueError>) {
    let front = in_flight.front_mut().expect("a submission in flight");
    let answer = front.pending.answer().await;
    let done = in_flight.pop_front().expect("a submission in flight");
    (done.reply, answer)
}
