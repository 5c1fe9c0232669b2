//! The wire protocols clients speak over `GET /v1/ws`, chosen by the
//! WebSocket subprotocol.

pub mod json;

/// The protocol of one session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// `pgrelay.v1`, or no subprotocol: one JSON object per text frame.
    Json,
}

impl Protocol {
    /// The name stored in `relay.connections.protocol`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Json => "pgrelay.v1",
        }
    }
}
