//! The JSON protocol's decoder must never panic, whatever a client sends.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgrelay::protocol::json::ClientFrame;

fuzz_target!(|input: &[u8]| {
    if let Ok(text) = std::str::from_utf8(input) {
        let _ = ClientFrame::decode(text);
    }
});
