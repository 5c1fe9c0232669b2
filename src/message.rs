//! Messages as pgrelay stores and delivers them, and the targets they are
//! addressed to.

use std::borrow::Cow;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::auth::validate_user_id;

reason_error!(
    /// Why a `to` object names no valid recipients.
    BadTarget
);

/// Most users one message may name (`{"users":[…]}`).
pub const MAX_USERS_PER_MESSAGE: usize = 1000;
/// Longest `destination`, in bytes.
pub const MAX_DESTINATION_BYTES: usize = 1024;

/// Who a message is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    User(String),
    Users(Vec<String>),
    Connection(Uuid),
    Topic(String),
    /// A queue: the message goes to one of its consumers (trusted STOMP
    /// sessions only).
    Queue(String),
    Broadcast,
}

impl Target {
    /// Reads the contract's `to` object: exactly one of `user`, `users`,
    /// `connection`, `topic` or `broadcast: true`.
    pub fn from_json(to: &Value) -> Result<Self, BadTarget> {
        let Some(object) = to.as_object() else {
            return Err("`to` must be an object such as {\"user\":\"alice\"}".into());
        };
        if object.len() != 1 {
            return Err(
                "`to` must have exactly one of user, users, connection, topic, queue, broadcast"
                    .into(),
            );
        }
        let (key, value) = object.iter().next().expect("one entry");
        match key.as_str() {
            "user" => {
                let user = value.as_str().ok_or("`to.user` must be a string")?;
                validate_user_id(user).map_err(|e| format!("`to.user`: {e}"))?;
                Ok(Target::User(user.to_owned()))
            }
            "users" => {
                let list = value
                    .as_array()
                    .ok_or("`to.users` must be an array of strings")?;
                if list.is_empty() {
                    return Err("`to.users` must not be empty".into());
                }
                if list.len() > MAX_USERS_PER_MESSAGE {
                    return Err(format!(
                        "`to.users` names more than {MAX_USERS_PER_MESSAGE} users"
                    )
                    .into());
                }
                let mut users = Vec::with_capacity(list.len());
                for user in list {
                    let user = user
                        .as_str()
                        .ok_or("`to.users` must be an array of strings")?;
                    validate_user_id(user).map_err(|e| format!("`to.users`: {e}"))?;
                    users.push(user.to_owned());
                }
                Ok(Target::Users(users))
            }
            "connection" => {
                let id = value.as_str().ok_or("`to.connection` must be a string")?;
                let id = Uuid::parse_str(id)
                    .map_err(|_| format!("`to.connection`: {id:?} is not a connection id"))?;
                Ok(Target::Connection(id))
            }
            "topic" => {
                let topic = value.as_str().ok_or("`to.topic` must be a string")?;
                crate::topic::validate(topic).map_err(|e| format!("`to.topic`: {e}"))?;
                Ok(Target::Topic(topic.to_owned()))
            }
            "queue" => {
                let queue = value.as_str().ok_or("`to.queue` must be a string")?;
                crate::topic::validate(queue).map_err(|e| format!("`to.queue`: {e}"))?;
                Ok(Target::Queue(queue.to_owned()))
            }
            "broadcast" => match value {
                Value::Bool(true) => Ok(Target::Broadcast),
                _ => Err("`to.broadcast` must be true".into()),
            },
            other => Err(format!(
                "unknown target {other:?}: use one of user, users, connection, topic, queue, broadcast"
            )
            .into()),
        }
    }

    pub fn to_json(&self) -> Value {
        match self {
            Target::User(user) => json!({ "user": user }),
            Target::Users(users) => json!({ "users": users }),
            Target::Connection(id) => json!({ "connection": id.to_string() }),
            Target::Topic(topic) => json!({ "topic": topic }),
            Target::Queue(queue) => json!({ "queue": queue }),
            Target::Broadcast => json!({ "broadcast": true }),
        }
    }
}

/// The deepest nesting that message data may have. Recipients parse data
/// with whatever their platform offers, and recursive parsers stop around
/// 128 levels (serde_json does); the frame around the data adds two.
pub const MAX_JSON_DEPTH: usize = 100;

/// Whether JSON is nested no deeper than [`MAX_JSON_DEPTH`]. `raw` is
/// already known to be valid JSON, so brackets outside strings are all that
/// count.
pub fn within_json_depth(raw: &RawValue) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for byte in raw.get().bytes() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_JSON_DEPTH {
                    return false;
                }
            }
            b']' | b'}' => depth -= 1,
            _ => {}
        }
    }
    true
}

/// What a message carries.
#[derive(Clone, Debug)]
pub enum Payload {
    /// JSON data (HTTP API, SQL, the JSON protocol): stored as jsonb.
    Json(Arc<RawValue>),
    /// A STOMP SEND body, kept byte for byte with its content type.
    Raw {
        bytes: Bytes,
        content_type: Option<String>,
    },
}

impl Payload {
    pub fn len(&self) -> usize {
        match self {
            Payload::Json(raw) => raw.get().len(),
            Payload::Raw { bytes, .. } => bytes.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The body as STOMP carries it, and its content type.
    pub fn body(&self) -> (Bytes, Option<&str>) {
        match self {
            Payload::Json(raw) => (
                Bytes::copy_from_slice(raw.get().as_bytes()),
                Some("application/json"),
            ),
            Payload::Raw {
                bytes,
                content_type,
            } => (bytes.clone(), content_type.as_deref()),
        }
    }

    /// The payload as the JSON protocol and the HTTP API show it: JSON as it
    /// is, a JSON body as its JSON, a text body as a string, and anything
    /// else as base64 (`body_base64`, with `data` null).
    pub fn presentation(&self) -> Presentation<'_> {
        match self {
            Payload::Json(raw) => Presentation::Data(Cow::Borrowed(raw.as_ref())),
            Payload::Raw {
                bytes,
                content_type,
            } => {
                let json_type = content_type
                    .as_deref()
                    .map(|t| {
                        t.split(';')
                            .next()
                            .unwrap_or("")
                            .trim()
                            .to_ascii_lowercase()
                    })
                    .is_some_and(|t| t == "application/json" || t.ends_with("+json"));
                if json_type
                    && let Ok(text) = std::str::from_utf8(bytes)
                    && let Ok(raw) = serde_json::from_str::<&RawValue>(text)
                {
                    return Presentation::Data(Cow::Owned(raw.to_owned()));
                }
                match std::str::from_utf8(bytes) {
                    Ok(text) => Presentation::Text(text),
                    Err(_) => Presentation::Base64(
                        base64::engine::general_purpose::STANDARD.encode(bytes),
                    ),
                }
            }
        }
    }

    pub fn content_type(&self) -> Option<&str> {
        match self {
            Payload::Json(_) => None,
            Payload::Raw { content_type, .. } => content_type.as_deref(),
        }
    }
}

/// See [`Payload::presentation`].
pub enum Presentation<'a> {
    Data(Cow<'a, RawValue>),
    Text(&'a str),
    Base64(String),
}

/// A message to store: what the HTTP API (or a client) submitted, validated.
#[derive(Clone, Debug)]
pub struct NewMessage {
    pub target: Target,
    pub destination: Option<String>,
    pub payload: Payload,
    /// None: the configured default TTL.
    pub ttl_secs: Option<u64>,
    /// Application headers (a STOMP SEND's, but for the STOMP-defined
    /// ones), delivered on every MESSAGE frame.
    pub headers: Headers,
}

/// Application headers, in order (a name may repeat).
pub type Headers = Vec<(String, String)>;

/// Headers as `relay.messages.headers` keeps them: a JSON array of
/// `[name, value]` pairs, or NULL for none.
pub fn headers_to_json(headers: &[(String, String)]) -> Option<String> {
    if headers.is_empty() {
        return None;
    }
    let pairs: Vec<[&str; 2]> = headers
        .iter()
        .map(|(n, v)| [n.as_str(), v.as_str()])
        .collect();
    Some(serde_json::to_string(&pairs).expect("strings serialize"))
}

/// The reverse of [`headers_to_json`]; anything else reads as no headers.
pub fn headers_from_json(text: Option<&str>) -> Headers {
    text.and_then(|t| serde_json::from_str::<Vec<(String, String)>>(t).ok())
        .unwrap_or_default()
}

/// The stream a delivered message came through, as a session tracks it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum StreamKey {
    User(Arc<str>),
    Topic(Arc<str>),
    /// A queue's message, handed to one consumer.
    Queue(Arc<str>),
    Broadcast,
}

impl StreamKey {
    /// The key in `relay.streams` and `relay.messages.stream`.
    pub fn key(&self) -> String {
        match self {
            StreamKey::User(user) => format!("user:{user}"),
            StreamKey::Topic(topic) => format!("topic:{topic}"),
            StreamKey::Queue(queue) => format!("queue:{queue}"),
            StreamKey::Broadcast => "broadcast".to_owned(),
        }
    }

    /// Reads a non-user stream key (user streams come with their user).
    pub fn parse(key: &str) -> Option<Self> {
        if key == "broadcast" {
            Some(StreamKey::Broadcast)
        } else if let Some(topic) = key.strip_prefix("topic:") {
            Some(StreamKey::Topic(topic.into()))
        } else if let Some(queue) = key.strip_prefix("queue:") {
            Some(StreamKey::Queue(queue.into()))
        } else {
            key.strip_prefix("user:")
                .map(|user| StreamKey::User(user.into()))
        }
    }
}

/// A stored message on its way to sockets.
#[derive(Debug)]
pub struct StoredMessage {
    pub id: i64,
    pub destination: Option<String>,
    pub payload: Payload,
    pub created_at: DateTime<Utc>,
    /// Set when the message is for one connection only.
    pub target_connection: Option<Uuid>,
    pub headers: Headers,
}

/// A message's columns as queries read them, where `data` is the jsonb
/// column as text (NULL for a raw body) and `headers` the headers column
/// as text.
pub struct MessageRow {
    pub id: i64,
    pub destination: Option<String>,
    pub data: Option<String>,
    pub body: Option<Vec<u8>>,
    pub content_type: Option<String>,
    pub created_at: DateTime<Utc>,
    pub target_connection: Option<Uuid>,
    pub headers: Option<String>,
}

impl StoredMessage {
    /// Builds a message from a row.
    pub fn from_row(row: MessageRow) -> Arc<Self> {
        let payload = match (row.data, row.body) {
            // PostgreSQL wrote this text from a jsonb value: it is JSON.
            (Some(data), _) => Payload::Json(
                RawValue::from_string(data)
                    .map(Arc::from)
                    .unwrap_or_else(|_| {
                        Arc::from(RawValue::from_string("null".to_owned()).expect("JSON"))
                    }),
            ),
            (None, body) => Payload::Raw {
                bytes: Bytes::from(body.unwrap_or_default()),
                content_type: row.content_type,
            },
        };
        Arc::new(Self {
            id: row.id,
            destination: row.destination,
            payload,
            created_at: row.created_at,
            target_connection: row.target_connection,
            headers: headers_from_json(row.headers.as_deref()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_from_the_contract_forms() {
        assert_eq!(
            Target::from_json(&json!({"user": "alice"})).unwrap(),
            Target::User("alice".into())
        );
        assert_eq!(
            Target::from_json(&json!({"users": ["a", "b"]})).unwrap(),
            Target::Users(vec!["a".into(), "b".into()])
        );
        let id = Uuid::now_v7();
        assert_eq!(
            Target::from_json(&json!({"connection": id.to_string()})).unwrap(),
            Target::Connection(id)
        );
        assert_eq!(
            Target::from_json(&json!({"topic": "t"})).unwrap(),
            Target::Topic("t".into())
        );
        assert_eq!(
            Target::from_json(&json!({"broadcast": true})).unwrap(),
            Target::Broadcast
        );
    }

    #[test]
    fn bad_targets_say_what_is_wrong() {
        for bad in [
            json!("alice"),
            json!({}),
            json!({"user": "a", "topic": "t"}),
            json!({"user": 5}),
            json!({"user": ""}),
            json!({"users": []}),
            json!({"users": [1]}),
            json!({"connection": "nope"}),
            json!({"broadcast": false}),
            json!({"group": "x"}),
        ] {
            let err = Target::from_json(&bad).unwrap_err();
            assert!(!err.0.is_empty(), "{bad}");
        }
        let too_many: Vec<String> = (0..=MAX_USERS_PER_MESSAGE)
            .map(|i| format!("u{i}"))
            .collect();
        assert!(Target::from_json(&json!({ "users": too_many })).is_err());
    }
}

#[cfg(test)]
mod payload_tests {
    use super::*;

    fn raw(bytes: &[u8], content_type: Option<&str>) -> Payload {
        Payload::Raw {
            bytes: Bytes::copy_from_slice(bytes),
            content_type: content_type.map(str::to_owned),
        }
    }

    #[test]
    fn payloads_are_presented_without_losing_bytes() {
        let json_body = raw(
            br#"{"b": 1,  "a": 2}"#,
            Some("application/json;charset=utf-8"),
        );
        match json_body.presentation() {
            Presentation::Data(raw) => assert_eq!(raw.get(), r#"{"b": 1,  "a": 2}"#),
            _ => panic!("a JSON body is JSON"),
        }
        assert!(matches!(
            raw(b"hello", Some("text/plain")).presentation(),
            Presentation::Text("hello")
        ));
        assert!(matches!(
            raw(b"{not json", Some("application/json")).presentation(),
            Presentation::Text(_)
        ));
        match raw(&[0, 159, 146, 150], None).presentation() {
            Presentation::Base64(b) => assert_eq!(b, "AJ+Slg=="),
            _ => panic!("binary is base64"),
        }
        let binary = raw(&[0, 1, 2], Some("application/octet-stream"));
        let (bytes, content_type) = binary.body();
        assert_eq!(&bytes[..], &[0, 1, 2]);
        assert_eq!(content_type, Some("application/octet-stream"));
    }

    #[test]
    fn stream_keys_round_trip() {
        for key in [
            StreamKey::User("a:b".into()),
            StreamKey::Topic("chat.x".into()),
            StreamKey::Queue("jobs".into()),
            StreamKey::Broadcast,
        ] {
            assert_eq!(StreamKey::parse(&key.key()), Some(key));
        }
    }
}

#[cfg(test)]
mod depth_tests {
    use super::*;

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_owned()).unwrap()
    }

    #[test]
    fn nesting_is_counted_outside_strings_only() {
        let deep = format!(
            "{}{}",
            "[".repeat(MAX_JSON_DEPTH),
            "]".repeat(MAX_JSON_DEPTH)
        );
        assert!(within_json_depth(&raw(&deep)));
        let deeper = format!("[{deep}]");
        assert!(!within_json_depth(&raw(&deeper)));
        let brackets_in_a_string = format!("{{\"a\":\"{}\\\"\"}}", "[".repeat(500));
        assert!(within_json_depth(&raw(&brackets_in_a_string)));
    }
}
