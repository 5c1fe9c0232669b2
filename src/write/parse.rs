//! What a message may be, whichever edge it came in by: one set of rules,
//! checked once, for HTTP, JSON `publish`, STOMP `SEND` and `pgrelay send`.
//!
//! An edge reads its own syntax (the `to` object, a topic name, a STOMP
//! destination) into a [`Draft`]; [`check`] applies the rules that hold for
//! every message and turns it into the [`NewMessage`] the group commit
//! stores. Each edge words a [`Refusal`] in its own protocol (a 400 or 413,
//! an `error` frame, a STOMP ERROR), with this module's text.

use std::time::Duration;

use crate::config::Settings;
use crate::message::{self, Headers, MAX_DESTINATION_BYTES, NewMessage, Payload, Target};

/// The limits a message is checked against.
#[derive(Clone, Copy, Debug)]
pub struct Rules {
    /// The most bytes of data (JSON) or body (STOMP); None leaves the limit
    /// to the database (`relay.config.max_message_bytes`).
    pub max_bytes: Option<usize>,
    /// The longest TTL; None leaves it to the database.
    pub retention: Option<Duration>,
}

impl Rules {
    /// A node's rules.
    pub fn of(settings: &Settings) -> Self {
        Self {
            max_bytes: Some(settings.max_message_bytes),
            retention: Some(settings.retention),
        }
    }

    /// For a sender without the node's settings (`pgrelay send` straight
    /// into the database): `relay.enqueue` applies `relay.config`'s limits.
    pub fn of_database() -> Self {
        Self {
            max_bytes: None,
            retention: None,
        }
    }
}

/// A message as an edge read it, not yet checked.
#[derive(Debug)]
pub struct Draft {
    pub target: Target,
    pub destination: Option<String>,
    pub payload: Payload,
    pub ttl_secs: Option<u64>,
    /// Application headers (STOMP SEND), kept with the message.
    pub headers: Headers,
}

/// The most bytes of application headers one message may carry (names and
/// values): they are stored with it and written on every MESSAGE frame.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Why a message was refused. Nothing was stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("`data` is {size} bytes; the limit is {limit} (PGRELAY_MAX_MESSAGE_BYTES)")]
    TooLarge { size: usize, limit: usize },
    #[error("`data` is nested more than {} levels deep", message::MAX_JSON_DEPTH)]
    TooDeep,
    #[error("`destination` must be 1 to {MAX_DESTINATION_BYTES} bytes")]
    BadDestination,
    #[error("`ttl_s` must be between 1 and the retention ({retention_secs} s)")]
    BadTtl { retention_secs: u64 },
    #[error("the headers are {size} bytes; the limit is {MAX_HEADER_BYTES}")]
    HeadersTooLarge { size: usize },
}

/// Checks a draft against `rules`, in the order a client would fix them:
/// size, nesting, destination, TTL.
pub fn check(draft: Draft, rules: &Rules) -> Result<NewMessage, Refusal> {
    let size = draft.payload.len();
    if let Some(limit) = rules.max_bytes
        && size > limit
    {
        return Err(Refusal::TooLarge { size, limit });
    }
    if let Payload::Json(data) = &draft.payload
        && !message::within_json_depth(data)
    {
        return Err(Refusal::TooDeep);
    }
    if let Some(destination) = &draft.destination
        && (destination.is_empty() || destination.len() > MAX_DESTINATION_BYTES)
    {
        return Err(Refusal::BadDestination);
    }
    if let Some(ttl) = draft.ttl_secs {
        let retention_secs = rules.retention.map_or(u64::MAX, |r| r.as_secs());
        if ttl == 0 || ttl > retention_secs {
            return Err(Refusal::BadTtl { retention_secs });
        }
    }
    let header_bytes: usize = draft.headers.iter().map(|(n, v)| n.len() + v.len()).sum();
    if header_bytes > MAX_HEADER_BYTES {
        return Err(Refusal::HeadersTooLarge { size: header_bytes });
    }
    Ok(NewMessage {
        target: draft.target,
        destination: draft.destination,
        payload: draft.payload,
        ttl_secs: draft.ttl_secs,
        headers: draft.headers,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::value::RawValue;

    use super::*;

    fn json(text: &str) -> Payload {
        Payload::Json(Arc::from(RawValue::from_string(text.to_owned()).unwrap()))
    }

    fn draft(payload: Payload) -> Draft {
        Draft {
            target: Target::User("ann".into()),
            destination: None,
            payload,
            ttl_secs: None,
            headers: Vec::new(),
        }
    }

    fn rules() -> Rules {
        Rules {
            max_bytes: Some(10),
            retention: Some(Duration::from_secs(60)),
        }
    }

    #[test]
    fn every_rule_refuses_what_breaks_it_and_nothing_else() {
        assert!(check(draft(json("[1,2]")), &rules()).is_ok());
        assert_eq!(
            check(draft(json("\"0123456789\"")), &rules()).unwrap_err(),
            Refusal::TooLarge {
                size: 12,
                limit: 10
            }
        );
        let raw = Payload::Raw {
            bytes: vec![0u8; 11].into(),
            content_type: None,
        };
        assert!(matches!(
            check(draft(raw), &rules()),
            Err(Refusal::TooLarge { size: 11, .. })
        ));
        let deep =
            "[".repeat(message::MAX_JSON_DEPTH + 1) + &"]".repeat(message::MAX_JSON_DEPTH + 1);
        let unlimited = Rules::of_database();
        assert_eq!(
            check(draft(json(&deep)), &unlimited).unwrap_err(),
            Refusal::TooDeep
        );
        for destination in [String::new(), "x".repeat(MAX_DESTINATION_BYTES + 1)] {
            let d = Draft {
                destination: Some(destination),
                ..draft(json("1"))
            };
            assert_eq!(check(d, &rules()).unwrap_err(), Refusal::BadDestination);
        }
        for ttl in [0, 61] {
            let d = Draft {
                ttl_secs: Some(ttl),
                ..draft(json("1"))
            };
            assert_eq!(
                check(d, &rules()).unwrap_err(),
                Refusal::BadTtl { retention_secs: 60 }
            );
        }
        let d = Draft {
            ttl_secs: Some(60),
            destination: Some("/queue/x".into()),
            ..draft(json("1"))
        };
        assert!(check(d, &rules()).is_ok());
        // Without the node's settings, the database applies its limits.
        let big = Draft {
            ttl_secs: Some(1 << 40),
            ..draft(json(&format!("\"{}\"", "x".repeat(100))))
        };
        assert!(check(big, &unlimited).is_ok());
    }
}
