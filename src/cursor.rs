//! Opaque cursors of the list endpoints: where a listing is and with which
//! filters, as base64url of JSON. Clients pass back what they were given.

use base64::Engine;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A cursor that does not decode.
#[derive(Debug, thiserror::Error)]
#[error("`cursor` is not a cursor this API returned")]
pub struct BadCursor;

pub fn encode<T: Serialize>(position: &T) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(position).expect("cursors serialize"))
}

pub fn decode<T: DeserializeOwned>(text: &str) -> Result<T, BadCursor> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| BadCursor)?;
    serde_json::from_slice(&bytes).map_err(|_| BadCursor)
}
