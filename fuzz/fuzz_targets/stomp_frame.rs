//! The STOMP decoder must never panic, whatever a client sends; and a frame
//! it accepts must encode and decode again to the same frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgrelay::protocol::stomp::{FrameLimits, Version, decode, encode};

fuzz_target!(|input: &[u8]| {
    for version in [Version::V1_0, Version::V1_1, Version::V1_2] {
        let Ok(frames) = decode(input, version, &FrameLimits::new(4096)) else {
            continue;
        };
        if version != Version::V1_2 {
            continue;
        }
        for frame in frames {
            // encode() writes its own content-length.
            let headers: Vec<(&str, &str)> = frame
                .headers
                .iter()
                .filter(|(n, _)| n != "content-length")
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            let again = encode(&frame.command, &headers, &frame.body, version);
            let mut limits = FrameLimits::new(4096);
            limits.max_headers += 1;
            let decoded = decode(&again, version, &limits).expect("an encoded frame decodes");
            assert_eq!(decoded.len(), 1);
            assert_eq!(decoded[0].command, frame.command);
            assert_eq!(decoded[0].body, frame.body);
        }
    }
});
