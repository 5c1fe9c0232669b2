//! STOMP destinations: what a SUBSCRIBE listens to, and where a SEND goes.
//! Queues (`/queue/<name>`) are for trusted backend sessions only: an end
//! user reads their own messages as `/user/queue/<name>`.

use std::sync::Arc;

use super::StompError;
use crate::message::{MAX_DESTINATION_BYTES, Target};
use crate::topic;

/// What a subscription listens to.
#[derive(Clone, Debug)]
pub(super) enum Listens {
    Topic(Arc<str>),
    /// This user's messages with this destination (`/queue/x`).
    User(String),
    /// A queue, as one of its competing consumers.
    Queue(Arc<str>),
}

/// `/queue/<name>`'s name, checked as topic names are.
fn queue_name(destination: &str) -> Option<Result<&str, StompError>> {
    let name = destination.strip_prefix("/queue/")?;
    Some(
        topic::validate(name)
            .map(|()| name)
            .map_err(|e| StompError::protocol(format!("queue name: {}", e.0))),
    )
}

/// A SUBSCRIBE destination; `backend`: the session is a trusted backend's.
pub(super) fn parse_subscription(destination: &str, backend: bool) -> Result<Listens, StompError> {
    if let Some(name) = queue_name(destination) {
        if !backend {
            return Err(StompError::forbidden(
                "queues are for backend sessions (an API key as passcode); read your own messages as /user/queue/<name>",
            ));
        }
        return Ok(Listens::Queue(name?.into()));
    }
    if let Some(topic) = destination.strip_prefix("/topic/") {
        topic::validate(topic).map_err(|e| StompError::protocol(e.0))?;
        return Ok(Listens::Topic(topic.into()));
    }
    for kind in ["/user/queue/", "/user/topic/"] {
        if let Some(name) = destination.strip_prefix(kind)
            && !name.is_empty()
        {
            // The destination its messages carry, under the rule every
            // message's destination follows (`write::parse`).
            let carried = &destination["/user".len()..];
            if carried.len() > MAX_DESTINATION_BYTES {
                return Err(StompError::protocol(format!(
                    "the destination after /user must be at most {MAX_DESTINATION_BYTES} bytes"
                )));
            }
            return Ok(Listens::User(carried.to_owned()));
        }
    }
    if destination.starts_with("/user/") {
        return Err(StompError::forbidden(
            "subscribe to your own messages as /user/queue/<name>; other users' destinations are not yours",
        ));
    }
    Err(StompError::protocol(format!(
        "unsupported destination {destination:?}: use /topic/<name>, /user/queue/<name> or (backends) /queue/<name>"
    )))
}

/// A SEND destination: the target, and the destination the message carries.
pub(super) fn parse_send(
    destination: &str,
    me: &str,
    backend: bool,
) -> Result<(Target, Option<String>), StompError> {
    if let Some(name) = queue_name(destination) {
        if !backend {
            return Err(StompError::forbidden(
                "queues are for backend sessions (an API key as passcode)",
            ));
        }
        return Ok((
            Target::Queue(name?.to_owned()),
            Some(destination.to_owned()),
        ));
    }
    if let Some(topic) = destination.strip_prefix("/topic/") {
        topic::validate(topic).map_err(|e| StompError::protocol(e.0))?;
        return Ok((
            Target::Topic(topic.to_owned()),
            Some(destination.to_owned()),
        ));
    }
    if let Some(rest) = destination.strip_prefix("/user/") {
        // /user/<name>/queue/<x>, /user/<name>/topic/<x>; /user/queue/<x> is oneself.
        let (user, path) = match rest.split_once('/') {
            Some(("queue" | "topic", _)) => (me, &destination["/user".len()..]),
            Some((user, _)) => (user, &rest[user.len()..]),
            None => ("", ""),
        };
        let valid_path = (path.starts_with("/queue/") || path.starts_with("/topic/"))
            && path.len() > "/queue/".len();
        if user.is_empty() || !valid_path {
            return Err(StompError::protocol(format!(
                "unsupported destination {destination:?}: use /user/<name>/queue/<name>"
            )));
        }
        crate::auth::validate_user_id(user).map_err(|e| StompError::protocol(e.0))?;
        return Ok((Target::User(user.to_owned()), Some(path.to_owned())));
    }
    Err(StompError::protocol(format!(
        "unsupported destination {destination:?}: use /topic/<name>, /user/<name>/queue/<name> or (backends) /queue/<name>"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscription_destinations() {
        assert!(
            matches!(parse_subscription("/topic/chat.a", false), Ok(Listens::Topic(t)) if &*t == "chat.a")
        );
        assert!(
            matches!(parse_subscription("/user/queue/x", false), Ok(Listens::User(d)) if d == "/queue/x")
        );
        assert!(
            matches!(parse_subscription("/user/topic/x", false), Ok(Listens::User(d)) if d == "/topic/x")
        );
        // Never another user's messages, whatever the string.
        for other in [
            "/user/bob/queue/x",
            "/user/queue/",
            "/user/../bob/queue/x",
            "/user//queue/x",
        ] {
            assert!(parse_subscription(other, false).is_err(), "{other}");
        }
        assert!(parse_subscription("/queue/x", false).is_err());
        assert!(
            matches!(parse_subscription("/queue/x-user1a2b", true), Ok(Listens::Queue(q)) if &*q == "x-user1a2b")
        );
        assert!(parse_subscription("/queue/a..b", true).is_err());
        let longest = format!("/user/queue/{}", "x".repeat(MAX_DESTINATION_BYTES - 7));
        assert!(parse_subscription(&longest, false).is_ok());
        assert!(parse_subscription(&format!("{longest}x"), false).is_err());
        assert!(parse_subscription("/topic/a..b", false).is_err());
    }

    #[test]
    fn send_destinations() {
        let (target, destination) = parse_send("/topic/chat.a", "alice", false).unwrap();
        assert_eq!(target, Target::Topic("chat.a".into()));
        assert_eq!(destination.as_deref(), Some("/topic/chat.a"));
        let (target, destination) = parse_send("/user/bob/queue/inbox", "alice", false).unwrap();
        assert_eq!(target, Target::User("bob".into()));
        assert_eq!(destination.as_deref(), Some("/queue/inbox"));
        let (target, destination) = parse_send("/user/queue/notes", "alice", false).unwrap();
        assert_eq!(target, Target::User("alice".into()));
        assert_eq!(destination.as_deref(), Some("/queue/notes"));
        for bad in [
            "/user/bob",
            "/user/bob/queue/",
            "/user//queue/x",
            "/queue/x",
            "/topic/",
        ] {
            assert!(parse_send(bad, "alice", false).is_err(), "{bad}");
        }
        let (target, destination) = parse_send("/queue/jobs", "spring", true).unwrap();
        assert_eq!(target, Target::Queue("jobs".into()));
        assert_eq!(destination.as_deref(), Some("/queue/jobs"));
    }
}
