//! Messages as pgrelay stores and delivers them, and the targets they are
//! addressed to.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::auth::validate_user_id;

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
    Broadcast,
}

impl Target {
    /// Reads the contract's `to` object: exactly one of `user`, `users`,
    /// `connection`, `topic` or `broadcast: true`.
    pub fn from_json(to: &Value) -> Result<Self, String> {
        let Some(object) = to.as_object() else {
            return Err("`to` must be an object such as {\"user\":\"alice\"}".into());
        };
        if object.len() != 1 {
            return Err(
                "`to` must have exactly one of user, users, connection, topic, broadcast".into(),
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
                    ));
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
                Ok(Target::Topic(topic.to_owned()))
            }
            "broadcast" => match value {
                Value::Bool(true) => Ok(Target::Broadcast),
                _ => Err("`to.broadcast` must be true".into()),
            },
            other => Err(format!(
                "unknown target {other:?}: use one of user, users, connection, topic, broadcast"
            )),
        }
    }

    pub fn to_json(&self) -> Value {
        match self {
            Target::User(user) => json!({ "user": user }),
            Target::Users(users) => json!({ "users": users }),
            Target::Connection(id) => json!({ "connection": id.to_string() }),
            Target::Topic(topic) => json!({ "topic": topic }),
            Target::Broadcast => json!({ "broadcast": true }),
        }
    }
}

/// A message to store: what the HTTP API (or a client) submitted, validated.
#[derive(Debug)]
pub struct NewMessage {
    pub target: Target,
    pub destination: Option<String>,
    pub data: Box<RawValue>,
    /// None: the configured default TTL.
    pub ttl_secs: Option<u64>,
}

/// A stored message on its way to sockets.
#[derive(Debug)]
pub struct StoredMessage {
    pub id: i64,
    pub destination: Option<String>,
    pub data: Box<RawValue>,
    pub created_at: DateTime<Utc>,
    /// Set when the message is for one connection only.
    pub target_connection: Option<Uuid>,
}

impl StoredMessage {
    /// Builds a message from a row, where `data` is the jsonb column as text.
    pub fn from_row(
        id: i64,
        destination: Option<String>,
        data: String,
        created_at: DateTime<Utc>,
        target_connection: Option<Uuid>,
    ) -> Arc<Self> {
        // PostgreSQL wrote this text from a jsonb value: it is JSON.
        let data = RawValue::from_string(data)
            .unwrap_or_else(|_| RawValue::from_string("null".to_owned()).expect("null is JSON"));
        Arc::new(Self {
            id,
            destination,
            data,
            created_at,
            target_connection,
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
            assert!(!err.is_empty(), "{bad}");
        }
        let too_many: Vec<String> = (0..=MAX_USERS_PER_MESSAGE)
            .map(|i| format!("u{i}"))
            .collect();
        assert!(Target::from_json(&json!({ "users": too_many })).is_err());
    }
}
