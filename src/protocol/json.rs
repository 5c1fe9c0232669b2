//! The JSON protocol (`pgrelay.v1`): one JSON object per text frame, with an
//! `op` field. Frames are decoded once into [`ClientFrame`]; what the server
//! sends is encoded here and nowhere else.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::message::{Presentation, StoredMessage, StreamKey};

reason_error!(
    /// Why a client frame is not a frame of the protocol.
    BadFrame
);

/// Everything a client may send.
#[derive(Debug)]
pub enum ClientFrame {
    Subscribe {
        topic: String,
        since: Option<MessageId>,
    },
    Unsubscribe {
        topic: String,
    },
    Ack {
        id: MessageId,
    },
    Publish {
        topic: String,
        data: Box<RawValue>,
    },
    /// Answered `pong`: a browser cannot see the server's WebSocket pings,
    /// so a client that wants to notice a dead connection asks.
    Ping,
}

/// The union of all frames' fields. Decoded flat rather than as a tagged
/// enum, because serde buffers tagged enums and a buffered value cannot be
/// kept as raw JSON (`data` is relayed byte for byte).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFrame {
    op: String,
    #[serde(default)]
    topic: Option<String>,
    #[serde(default)]
    since: Option<MessageId>,
    #[serde(default)]
    id: Option<MessageId>,
    #[serde(default)]
    data: Option<Box<RawValue>>,
}

/// A message id as clients write it: a decimal string (a bare number is
/// accepted too).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MessageId(pub i64);

impl<'de> Deserialize<'de> for MessageId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Number(i64),
        }
        let id = match Raw::deserialize(deserializer)? {
            Raw::Text(text) => text.parse::<i64>().map_err(|_| {
                serde::de::Error::custom(format!("message id {text:?} is not a decimal id"))
            })?,
            Raw::Number(n) => n,
        };
        if id < 0 {
            return Err(serde::de::Error::custom("message ids are not negative"));
        }
        Ok(MessageId(id))
    }
}

impl ClientFrame {
    /// # Errors
    /// A description of what is wrong with the frame, for an `error` frame.
    pub fn decode(text: &str) -> Result<Self, BadFrame> {
        let raw: RawFrame = serde_json::from_str(text).map_err(|e| {
            let e = e.to_string();
            if e.contains("missing field `op`") {
                "frame has no `op`".to_owned()
            } else {
                e
            }
        })?;
        let allowed: &[&str] = match raw.op.as_str() {
            "subscribe" => &["topic", "since"],
            "unsubscribe" => &["topic"],
            "ack" => &["id"],
            "publish" => &["topic", "data"],
            "ping" => &[],
            other => {
                return Err(format!(
                    "unknown op {other:?}: expected subscribe, unsubscribe, ack, publish or ping"
                )
                .into());
            }
        };
        let present = [
            ("topic", raw.topic.is_some()),
            ("since", raw.since.is_some()),
            ("id", raw.id.is_some()),
            ("data", raw.data.is_some()),
        ];
        if let Some((field, _)) = present.iter().find(|(f, p)| *p && !allowed.contains(f)) {
            return Err(format!("`{field}` is not a field of {:?}", raw.op).into());
        }
        let missing = |field: &str| format!("{:?} needs `{field}`", raw.op);
        Ok(match raw.op.as_str() {
            "subscribe" => ClientFrame::Subscribe {
                topic: raw.topic.ok_or_else(|| missing("topic"))?,
                since: raw.since,
            },
            "unsubscribe" => ClientFrame::Unsubscribe {
                topic: raw.topic.ok_or_else(|| missing("topic"))?,
            },
            "ack" => ClientFrame::Ack {
                id: raw.id.ok_or_else(|| missing("id"))?,
            },
            "ping" => ClientFrame::Ping,
            _ => ClientFrame::Publish {
                topic: raw.topic.ok_or_else(|| missing("topic"))?,
                data: raw.data.ok_or_else(|| missing("data"))?,
            },
        })
    }
}

/// Whom a delivered message was addressed to, as the client sees it.
#[derive(Serialize)]
#[serde(rename_all = "lowercase")]
pub enum To<'a> {
    User(&'a str),
    Topic(&'a str),
    Queue(&'a str),
    Broadcast(bool),
}

impl<'a> To<'a> {
    pub fn of(stream: &'a StreamKey) -> Self {
        match stream {
            StreamKey::User(user) => To::User(user),
            StreamKey::Topic(topic) => To::Topic(topic),
            StreamKey::Queue(queue) => To::Queue(queue),
            StreamKey::Broadcast => To::Broadcast(true),
        }
    }
}

#[derive(Serialize)]
struct Welcome<'a> {
    op: &'static str,
    connection_id: &'a str,
    node_id: &'a str,
    heartbeat_ms: u64,
    user_head: String,
}

/// The first frame. `user_head` is the head of the user's stream when the
/// connection was registered: a client that keeps it as its cursor resumes
/// exactly (`since`), even if no message came before it dropped.
pub fn welcome(connection_id: &str, node_id: &str, heartbeat_ms: u64, user_head: i64) -> String {
    serde_json::to_string(&Welcome {
        op: "welcome",
        connection_id,
        node_id,
        heartbeat_ms,
        user_head: user_head.to_string(),
    })
    .expect("serializable")
}

/// The answer to `ping`.
pub fn pong() -> String {
    r#"{"op":"pong"}"#.to_owned()
}

#[derive(Serialize)]
struct Message<'a> {
    op: &'static str,
    id: String,
    to: To<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    destination: Option<&'a str>,
    data: DataField<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body_base64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_type: Option<&'a str>,
    created_at: String,
}

#[derive(Serialize)]
#[serde(untagged)]
enum DataField<'a> {
    Raw(&'a RawValue),
    Text(&'a str),
    Null(Option<()>),
}

pub fn message(msg: &StoredMessage, to: To<'_>) -> String {
    let presentation = msg.payload.presentation();
    let (data, body_base64) = match &presentation {
        Presentation::Data(raw) => (DataField::Raw(raw), None),
        Presentation::Text(text) => (DataField::Text(text), None),
        Presentation::Base64(encoded) => (DataField::Null(None), Some(encoded.clone())),
    };
    serde_json::to_string(&Message {
        op: "message",
        id: msg.id.to_string(),
        to,
        destination: msg.destination.as_deref(),
        data,
        body_base64,
        content_type: msg.payload.content_type(),
        created_at: msg
            .created_at
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
    })
    .expect("serializable")
}

#[derive(Serialize)]
struct TopicFrame<'a> {
    op: &'static str,
    topic: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    head: Option<String>,
}

/// `unsubscribed`, and `published` (with the new message's id).
pub fn topic_frame(op: &'static str, topic: &str, id: Option<i64>) -> String {
    serde_json::to_string(&TopicFrame {
        op,
        topic,
        id: id.map(|id| id.to_string()),
        head: None,
    })
    .expect("serializable")
}

/// `subscribed`, with the topic's head: later messages arrive live, and a
/// client that keeps it as its cursor resubscribes exactly (`since`).
pub fn subscribed(topic: &str, head: i64) -> String {
    serde_json::to_string(&TopicFrame {
        op: "subscribed",
        topic,
        id: None,
        head: Some(head.to_string()),
    })
    .expect("serializable")
}

#[derive(Serialize)]
struct ErrorFrame<'a> {
    op: &'static str,
    code: &'a str,
    message: &'a str,
}

pub fn error(code: &str, message: &str) -> String {
    serde_json::to_string(&ErrorFrame {
        op: "error",
        code,
        message,
    })
    .expect("serializable")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::MessageRow;
    use serde_json::{Value, json};

    #[test]
    fn client_frames_decode() {
        assert!(matches!(
            ClientFrame::decode(r#"{"op":"ack","id":"456"}"#).unwrap(),
            ClientFrame::Ack { id: MessageId(456) }
        ));
        assert!(matches!(
            ClientFrame::decode(r#"{"op":"ack","id":456}"#).unwrap(),
            ClientFrame::Ack { id: MessageId(456) }
        ));
        assert!(matches!(
            ClientFrame::decode(r#"{"op":"subscribe","topic":"chat.room1","since":"123"}"#).unwrap(),
            ClientFrame::Subscribe { topic, since: Some(MessageId(123)) } if topic == "chat.room1"
        ));
        match ClientFrame::decode(r#"{"op":"publish","topic":"t","data":{"a": 1}}"#).unwrap() {
            ClientFrame::Publish { topic, data } => {
                assert_eq!(topic, "t");
                assert_eq!(data.get(), r#"{"a": 1}"#, "data is kept byte for byte");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_frames_are_errors_with_a_reason() {
        for bad in [
            "",
            "not json",
            "[]",
            r#"{"id":"1"}"#,
            r#"{"op":"dance"}"#,
            r#"{"op":"ack"}"#,
            r#"{"op":"ack","id":"abc"}"#,
            r#"{"op":"ack","id":"-1"}"#,
            r#"{"op":"ack","id":"1","extra":true}"#,
            r#"{"op":"ack","id":"1","topic":"t"}"#,
            r#"{"op":"publish","topic":"t"}"#,
        ] {
            assert!(!ClientFrame::decode(bad).unwrap_err().0.is_empty(), "{bad}");
        }
        assert_eq!(
            ClientFrame::decode(r#"{"id":"1"}"#).unwrap_err().0,
            "frame has no `op`"
        );
    }

    #[test]
    fn server_frames_follow_the_contract() {
        let msg = StoredMessage::from_row(MessageRow {
            id: 456,
            destination: Some("/queue/x".into()),
            data: Some(r#"{"hi": 1}"#.into()),
            body: None,
            content_type: None,
            created_at: chrono::DateTime::parse_from_rfc3339("2026-11-27T10:00:00Z")
                .unwrap()
                .into(),
            target_connection: None,
            headers: None,
        });
        let frame: Value = serde_json::from_str(&message(&msg, To::User("alice"))).unwrap();
        assert_eq!(
            frame,
            json!({"op":"message","id":"456","to":{"user":"alice"},"destination":"/queue/x",
                   "data":{"hi":1},"created_at":"2026-11-27T10:00:00.000000Z"})
        );
        let topic: Value = serde_json::from_str(&message(&msg, To::Topic("chat.a"))).unwrap();
        assert_eq!(topic["to"], json!({"topic": "chat.a"}));
        let broadcast: Value = serde_json::from_str(&message(&msg, To::Broadcast(true))).unwrap();
        assert_eq!(broadcast["to"], json!({"broadcast": true}));
        let binary = StoredMessage::from_row(MessageRow {
            id: 7,
            destination: None,
            data: None,
            body: Some(vec![0, 255]),
            content_type: Some("application/octet-stream".into()),
            created_at: chrono::Utc::now(),
            target_connection: None,
            headers: None,
        });
        let frame: Value = serde_json::from_str(&message(&binary, To::User("a"))).unwrap();
        assert_eq!(frame["data"], Value::Null);
        assert_eq!(frame["body_base64"], "AP8=");
        assert_eq!(frame["content_type"], "application/octet-stream");
        let welcome: Value = serde_json::from_str(&welcome("c1", "n1", 5000, 7)).unwrap();
        assert_eq!(
            welcome,
            json!({"op":"welcome","connection_id":"c1","node_id":"n1","heartbeat_ms":5000,"user_head":"7"})
        );
        let subscribed: Value = serde_json::from_str(&subscribed("t", 12)).unwrap();
        assert_eq!(
            subscribed,
            json!({"op":"subscribed","topic":"t","head":"12"})
        );
        assert!(matches!(
            ClientFrame::decode(r#"{"op":"ping"}"#).unwrap(),
            ClientFrame::Ping
        ));
        assert!(ClientFrame::decode(r#"{"op":"ping","id":"1"}"#).is_err());
        let error: Value = serde_json::from_str(&error("bad_frame", "oops")).unwrap();
        assert_eq!(
            error,
            json!({"op":"error","code":"bad_frame","message":"oops"})
        );
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;
        use serde_json::json;

        proptest! {
            /// Frames a client encodes with any JSON library decode to what
            /// was meant, whatever the strings hold.
            #[test]
            fn client_frames_round_trip(topic in "\\PC{1,40}", id in 0i64..i64::MAX, n in any::<i64>()) {
                let ack = json!({"op": "ack", "id": id.to_string()}).to_string();
                let acked = matches!(ClientFrame::decode(&ack), Ok(ClientFrame::Ack { id: MessageId(got) }) if got == id);
                prop_assert!(acked, "ack {}", id);
                let sub = json!({"op": "subscribe", "topic": topic, "since": id.to_string()}).to_string();
                match ClientFrame::decode(&sub) {
                    Ok(ClientFrame::Subscribe { topic: got, since }) => {
                        prop_assert_eq!(got, topic.clone());
                        prop_assert_eq!(since, Some(MessageId(id)));
                    }
                    other => prop_assert!(false, "{other:?}"),
                }
                let data = json!({"n": n, "s": topic});
                let publish = json!({"op": "publish", "topic": topic, "data": data}).to_string();
                match ClientFrame::decode(&publish) {
                    Ok(ClientFrame::Publish { data: got, .. }) => {
                        prop_assert_eq!(serde_json::from_str::<serde_json::Value>(got.get()).unwrap(), data);
                    }
                    other => prop_assert!(false, "{other:?}"),
                }
            }

            /// Arbitrary text is an error or a frame, never a panic.
            #[test]
            fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
                let _ = ClientFrame::decode(&text);
            }
        }
    }
}
