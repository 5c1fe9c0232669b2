//! Topic names and the patterns that grant access to them.
//!
//! A topic is 1–256 bytes of `.`-separated segments (`chat.room1`), none
//! empty, without whitespace, control characters, `*` or `>` (the same rule
//! as `relay.valid_topic()` in the migrations). A pattern (JWT claims
//! `topics` and `publish`) is a topic whose segments may be `*` (exactly one
//! segment) and whose last segment may be `>` (one or more segments):
//! `chat.*` matches `chat.room1`; `chat.>` matches `chat.room1` and
//! `chat.room1.thread7`; `>` matches everything.

reason_error!(
    /// Why a topic name is not valid.
    InvalidTopic
);

/// Longest topic name, in bytes.
pub const MAX_TOPIC_BYTES: usize = 256;

/// Checks a topic name; the error says what is wrong with it.
pub fn validate(topic: &str) -> Result<(), InvalidTopic> {
    if topic.is_empty() {
        return Err("topic is empty".into());
    }
    if topic.len() > MAX_TOPIC_BYTES {
        return Err(format!("topic is longer than {MAX_TOPIC_BYTES} bytes").into());
    }
    for segment in topic.split('.') {
        if segment.is_empty() {
            return Err(format!("topic {topic:?} has an empty segment").into());
        }
        if segment
            .chars()
            .any(|c| c == '*' || c == '>' || c.is_whitespace() || c.is_control())
        {
            return Err(format!(
                "topic {topic:?} may not contain whitespace, control characters, '*' or '>'"
            )
            .into());
        }
    }
    Ok(())
}

/// Whether `pattern` grants `topic`.
pub fn matches(pattern: &str, topic: &str) -> bool {
    let mut wanted = pattern.split('.');
    let mut segments = topic.split('.');
    loop {
        match (wanted.next(), segments.next()) {
            (Some(">"), Some(_)) => return wanted.next().is_none(),
            (Some("*"), Some(_)) => {}
            (Some(w), Some(s)) if w == s => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether any of `patterns` grants `topic`.
pub fn allowed(patterns: &[String], topic: &str) -> bool {
    patterns.iter().any(|p| matches(p, topic))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        for good in ["chat", "chat.room1", "a.b.c", "émoji.☃", "x-y_z:1"] {
            assert!(validate(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "a.",
            ".a",
            "a..b",
            "a b",
            "a.*",
            "a.>",
            "a\nb",
            &"x".repeat(257),
        ] {
            assert!(validate(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn pattern_wildcards() {
        assert!(matches("chat.room1", "chat.room1"));
        assert!(!matches("chat.room1", "chat.room2"));
        assert!(matches("chat.*", "chat.room1"));
        assert!(!matches("chat.*", "chat"));
        assert!(!matches("chat.*", "chat.room1.thread"));
        assert!(matches("chat.>", "chat.room1"));
        assert!(matches("chat.>", "chat.room1.thread"));
        assert!(!matches("chat.>", "chat"));
        assert!(matches(">", "anything.at.all"));
        assert!(matches("*.room1", "chat.room1"));
        assert!(!matches("chat", "chat.room1"));
        assert!(!matches("chat.>.x", "chat.a.x"), "> only ends a pattern");
        assert!(allowed(&["news.*".into(), "chat.>".into()], "chat.a.b"));
        assert!(!allowed(&[], "chat"));
    }
}
