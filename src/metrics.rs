//! Prometheus metrics, served at `/metrics`. The names are declared here,
//! in one place, with their help texts; the code that counts uses these
//! constants through the `metrics` macros.
//!
//! The recorder is process-wide: nodes started in one process (tests,
//! `pgrelay dev`) share it, which sums their counts.

use std::sync::OnceLock;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const CONNECTIONS: &str = "pgrelay_connections";
pub const CONNECTIONS_OPENED: &str = "pgrelay_connections_opened_total";
pub const CONNECTIONS_CLOSED: &str = "pgrelay_connections_closed_total";
pub const MESSAGES_ACCEPTED: &str = "pgrelay_messages_accepted_total";
pub const MESSAGES_DELIVERED: &str = "pgrelay_messages_delivered_total";
pub const MESSAGES_ACKED: &str = "pgrelay_messages_acked_total";
pub const MESSAGES_EXPIRED: &str = "pgrelay_messages_expired_total";
pub const DELIVERY_LATENCY: &str = "pgrelay_delivery_latency_seconds";
pub const OUTBOX_BACKLOG: &str = "pgrelay_outbox_backlog";
pub const OUTBOX_OLDEST: &str = "pgrelay_outbox_oldest_age_seconds";
pub const PARKED_BACKLOG: &str = "pgrelay_parked_backlog";
pub const CLAIM_BATCH: &str = "pgrelay_claim_batch_size";
pub const WAKEUPS: &str = "pgrelay_outbox_wakeups_total";
pub const POLL_ONLY: &str = "pgrelay_poll_only";
pub const SWEEPER_RUNS: &str = "pgrelay_sweeper_runs_total";
pub const SWEEPER_REAPED: &str = "pgrelay_sweeper_reaped_rows_total";
pub const DB_POOL_CONNECTIONS: &str = "pgrelay_db_pool_connections";
pub const DB_ERRORS: &str = "pgrelay_db_errors_total";
pub const SUBMIT_LATENCY: &str = "pgrelay_submit_duration_seconds";
pub const NODE_HEALED: &str = "pgrelay_node_reregistrations_total";
pub const REAPS_DEFERRED: &str = "pgrelay_sweeper_reaps_deferred_total";
pub const SUBMIT_OUTCOMES: &str = "pgrelay_submissions_total";
pub const STAGE: &str = "pgrelay_stage_seconds";
pub const THROTTLED: &str = "pgrelay_inbound_throttled_total";

/// The stages of a message's path through a node, timed for
/// [`STAGE`]: on the submitting node, then on the delivering node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Queued in the group commit, until its batch was taken.
    SubmitQueue,
    /// Its batch's `relay.enqueue` statement and commit (one round trip).
    Commit,
    /// From its transaction's start to its claim, by the database's clock:
    /// the commit, the NOTIFY, the wake-up and the claim's own wait.
    StoredToClaimed,
    /// From the wake-up (NOTIFY) received to the claim starting.
    ClaimWait,
    /// The claim's statement (one round trip).
    Claim,
    /// In the session's mailbox, from the claim's hand-over.
    Mailbox,
    /// Written and flushed to the socket.
    Write,
}

impl Stage {
    pub const ALL: [Stage; 7] = [
        Stage::SubmitQueue,
        Stage::Commit,
        Stage::StoredToClaimed,
        Stage::ClaimWait,
        Stage::Claim,
        Stage::Mailbox,
        Stage::Write,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::SubmitQueue => "submit_queue",
            Stage::Commit => "commit",
            Stage::StoredToClaimed => "stored_to_claimed",
            Stage::ClaimWait => "claim_wait",
            Stage::Claim => "claim",
            Stage::Mailbox => "mailbox",
            Stage::Write => "write",
        }
    }
}

/// Records that `messages` spent `took` in `stage` (once per message, so
/// that each stage's distribution is over messages).
pub fn stage(stage: Stage, took: std::time::Duration, messages: usize) {
    let histogram = metrics::histogram!(STAGE, "stage" => stage.as_str());
    let seconds = took.as_secs_f64();
    for _ in 0..messages {
        histogram.record(seconds);
    }
}

/// Seconds, from a millisecond to a minute: delivery and commit latencies.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Seconds, from 25 µs: a stage is often a fraction of a millisecond.
pub const STAGE_BUCKETS: &[f64] = &[
    0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005,
    0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the recorder (once per process) and returns its handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(CLAIM_BATCH.into()), BATCH_BUCKETS)
                })
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(STAGE.into()), STAGE_BUCKETS))
                .expect("bucket lists are not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder (an embedding application's) wins; /metrics
            // then shows only what this one saw, which is nothing.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

/// The text exposition of every metric.
pub fn render() -> String {
    let handle = install();
    handle.run_upkeep();
    handle.render()
}

fn describe() {
    describe_gauge!(CONNECTIONS, "Open WebSocket connections, by protocol.");
    describe_counter!(
        CONNECTIONS_OPENED,
        "WebSocket connections accepted, by protocol."
    );
    describe_counter!(
        CONNECTIONS_CLOSED,
        "WebSocket connections ended, by reason (client, gone, slow_consumer, too_big, \
         heartbeat, shutdown, unavailable, policy, refused)."
    );
    describe_counter!(
        MESSAGES_ACCEPTED,
        "Messages stored through this node, by source (http, pgrelay.v1, stomp); relay.send_to_user() calls are not counted here."
    );
    describe_counter!(
        MESSAGES_DELIVERED,
        "Messages written to sockets (one per socket), by protocol."
    );
    describe_counter!(MESSAGES_ACKED, "Acknowledgements received from clients.");
    describe_counter!(
        MESSAGES_EXPIRED,
        "Messages that expired undelivered, one per recipient user: when claimed, or parked (counted by the sweeping node)."
    );
    describe_histogram!(
        DELIVERY_LATENCY,
        Unit::Seconds,
        "From a message's commit to its write to a socket, for live deliveries."
    );
    describe_histogram!(
        SUBMIT_LATENCY,
        Unit::Seconds,
        "HTTP submissions: from request to commit."
    );
    describe_histogram!(
        STAGE,
        Unit::Seconds,
        "Time messages spent in each stage of their path, by stage: submit_queue, commit (on the \
         submitting node); stored_to_claimed, claim_wait, claim, mailbox, write (on the delivering node)."
    );
    describe_counter!(
        THROTTLED,
        "Times a connection's reading was paused: it sent more frames per second than allowed."
    );
    describe_counter!(
        NODE_HEALED,
        "Times this node found it had been declared dead (paused, cut off) and registered again."
    );
    describe_counter!(
        REAPS_DEFERRED,
        "Reaps of a dead node put off to the next sweep: the node was in a transaction that had not ended yet."
    );
    describe_counter!(
        SUBMIT_OUTCOMES,
        "Submissions (HTTP, WebSocket publish, STOMP SEND) that were not stored, by outcome: \
         not_stored (it will never be), unknown (the commit's answer was lost)."
    );
    describe_gauge!(OUTBOX_BACKLOG, "Outbox rows waiting for this node.");
    describe_gauge!(
        OUTBOX_OLDEST,
        "Age of the oldest outbox row waiting for this node (0 when none)."
    );
    describe_gauge!(
        PARKED_BACKLOG,
        "Messages parked for offline users, cluster-wide (exported by the sweeping node)."
    );
    describe_histogram!(CLAIM_BATCH, "Outbox rows taken per claim.");
    describe_counter!(
        WAKEUPS,
        "Claimer wake-ups, by source: notify, poll or rescan (after the listener reconnects)."
    );
    describe_gauge!(
        POLL_ONLY,
        "1 when the node polls the outbox because LISTEN is unavailable (a transaction-mode \
         pooler without PGRELAY_DIRECT_DATABASE_URL), else 0."
    );
    describe_counter!(
        SWEEPER_RUNS,
        "Sweeps run by this node (while it holds the sweeper's lease)."
    );
    describe_counter!(SWEEPER_REAPED, "Rows removed by the sweeper, by kind.");
    describe_gauge!(
        DB_POOL_CONNECTIONS,
        "Database connections, by pool (main, bookkeeping) and state (idle, busy)."
    );
    describe_counter!(DB_ERRORS, "Failed database operations, by operation.");
}

/// The label of why a WebSocket ended, from its close code and reason.
pub fn close_reason(code: u16, reason: &str) -> &'static str {
    match code {
        1009 => "too_big",
        1012 => "shutdown",
        1013 => "unavailable",
        1001 => "heartbeat",
        1008 if reason.starts_with("slow consumer") => "slow_consumer",
        1008 if reason.starts_with("too many connections") => "refused",
        1000 => "client",
        _ => "policy",
    }
}
