//! The wire protocols clients speak over `GET /v1/ws`, chosen by the
//! WebSocket subprotocol: their frames, decoded and encoded. Pure functions
//! of bytes and messages: sessions use them, and they know no session.

pub mod json;
pub mod stomp;

/// The protocol of one session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// `pgrelay.v1`, or no subprotocol: one JSON object per text frame.
    Json,
    /// `v12.stomp`, `v11.stomp` or `v10.stomp`.
    Stomp,
}

impl Protocol {
    /// The name stored in `relay.connections.protocol`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Json => "pgrelay.v1",
            Protocol::Stomp => "stomp",
        }
    }

    /// Chooses by the subprotocols the client offers, STOMP first (a STOMP
    /// client offers only STOMP names); returns the name to confirm.
    pub fn select<'a>(
        offered: impl IntoIterator<Item = &'a str>,
    ) -> (Protocol, Option<&'static str>) {
        let offered: Vec<&str> = offered.into_iter().map(str::trim).collect();
        for name in ["v12.stomp", "v11.stomp", "v10.stomp"] {
            if offered.contains(&name) {
                return (Protocol::Stomp, Some(name));
            }
        }
        if offered.contains(&"pgrelay.v1") {
            (Protocol::Json, Some("pgrelay.v1"))
        } else {
            (Protocol::Json, None)
        }
    }
}
