//! STOMP 1.0, 1.1 and 1.2 frames over WebSocket: the decoder for client
//! frames and the encoder for server frames.
//!
//! A frame is a command line, header lines, a blank line, and a body ended by
//! NUL. With a `content-length` header the body is exactly that many bytes (it
//! may contain NUL), followed by NUL. Header values are escaped in 1.2 (`\r`,
//! `\n`, `\c` for `:`, `\\`) and in 1.1 (the same but `\r`), except in CONNECT
//! and CONNECTED frames. Bare end-of-lines between frames are heart-beats.
//! The decoder never panics and never allocates more than its limits allow,
//! whatever it is given.

use bytes::Bytes;

/// The STOMP version a session speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    V1_0,
    V1_1,
    V1_2,
}

impl Version {
    pub fn as_str(self) -> &'static str {
        match self {
            Version::V1_0 => "1.0",
            Version::V1_1 => "1.1",
            Version::V1_2 => "1.2",
        }
    }

    /// The highest version in an `accept-version` header (1.0 without one).
    pub fn negotiate(accept_version: Option<&str>) -> Option<Version> {
        let Some(accepted) = accept_version else {
            return Some(Version::V1_0);
        };
        accepted
            .split(',')
            .filter_map(|v| match v.trim() {
                "1.0" => Some(Version::V1_0),
                "1.1" => Some(Version::V1_1),
                "1.2" => Some(Version::V1_2),
                _ => None,
            })
            .max()
    }
}

/// Bounds on what one frame may be.
#[derive(Clone, Copy, Debug)]
pub struct FrameLimits {
    /// Largest body.
    pub max_body: usize,
    pub max_headers: usize,
    /// Longest header line (name, colon and value).
    pub max_header_line: usize,
}

impl FrameLimits {
    pub fn new(max_body: usize) -> Self {
        Self {
            max_body,
            max_headers: 64,
            max_header_line: 8 * 1024,
        }
    }
}

/// A decoded client frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub command: String,
    /// In order; where a name repeats, the first one counts (see [`Frame::header`]).
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Frame {
    pub fn new(command: &str) -> Self {
        Self {
            command: command.to_owned(),
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn with_body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Why input is not a valid frame.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("the frame has no command")]
    NoCommand,
    #[error("unknown command {0:?}")]
    UnknownCommand(String),
    #[error("the frame ends before its headers do")]
    UnterminatedHeaders,
    #[error("header line {0:?} has no ':'")]
    HeaderWithoutColon(String),
    #[error("more than {0} headers")]
    TooManyHeaders(usize),
    #[error("a header line is longer than {0} bytes")]
    HeaderTooLong(usize),
    #[error("invalid escape sequence in header {0:?}")]
    BadEscape(String),
    #[error("headers must be UTF-8")]
    NotUtf8,
    #[error("content-length {0:?} is not a number")]
    BadContentLength(String),
    #[error("the body is larger than {0} bytes")]
    BodyTooLarge(usize),
    #[error("the frame is not terminated by NUL")]
    MissingTerminator,
}

const CLIENT_COMMANDS: [&str; 11] = [
    "CONNECT",
    "STOMP",
    "SEND",
    "SUBSCRIBE",
    "UNSUBSCRIBE",
    "ACK",
    "NACK",
    "BEGIN",
    "COMMIT",
    "ABORT",
    "DISCONNECT",
];

/// Decodes every frame in `input` (one WebSocket message), skipping
/// heart-beat end-of-lines. `version` decides header unescaping; it is
/// ignored for CONNECT and STOMP frames, which are never escaped.
pub fn decode(
    input: &[u8],
    version: Version,
    limits: &FrameLimits,
) -> Result<Vec<Frame>, FrameError> {
    let mut frames = Vec::new();
    let mut rest = input;
    loop {
        rest = skip_eols(rest);
        if rest.is_empty() {
            return Ok(frames);
        }
        let (frame, used) = decode_one(rest, version, limits)?;
        frames.push(frame);
        rest = &rest[used..];
    }
}

fn skip_eols(mut input: &[u8]) -> &[u8] {
    loop {
        match input {
            [b'\n', rest @ ..] => input = rest,
            [b'\r', b'\n', rest @ ..] => input = rest,
            _ => return input,
        }
    }
}

/// A line (without its `\n` or `\r\n`) and what follows it.
type Line<'a> = (&'a [u8], &'a [u8]);

/// The first line of `input`; None if it has no end of line yet.
fn line(input: &[u8], max: usize) -> Result<Option<Line<'_>>, FrameError> {
    let Some(end) = input.iter().take(max + 2).position(|b| *b == b'\n') else {
        if input.len() > max + 1 {
            return Err(FrameError::HeaderTooLong(max));
        }
        return Ok(None);
    };
    let text = &input[..end];
    let text = text.strip_suffix(b"\r").unwrap_or(text);
    if text.len() > max {
        return Err(FrameError::HeaderTooLong(max));
    }
    Ok(Some((text, &input[end + 1..])))
}

fn decode_one(
    input: &[u8],
    version: Version,
    limits: &FrameLimits,
) -> Result<(Frame, usize), FrameError> {
    let (command, mut rest) =
        line(input, limits.max_header_line)?.ok_or(FrameError::UnterminatedHeaders)?;
    let command = std::str::from_utf8(command).map_err(|_| FrameError::NotUtf8)?;
    if command.is_empty() {
        return Err(FrameError::NoCommand);
    }
    if !CLIENT_COMMANDS.contains(&command) {
        return Err(FrameError::UnknownCommand(
            command.chars().take(32).collect(),
        ));
    }
    let escaped = !matches!(command, "CONNECT" | "STOMP") && version >= Version::V1_1;
    let mut headers = Vec::new();
    loop {
        let (text, after) =
            line(rest, limits.max_header_line)?.ok_or(FrameError::UnterminatedHeaders)?;
        rest = after;
        if text.is_empty() {
            break;
        }
        if headers.len() == limits.max_headers {
            return Err(FrameError::TooManyHeaders(limits.max_headers));
        }
        let text = std::str::from_utf8(text).map_err(|_| FrameError::NotUtf8)?;
        let (name, value) = text
            .split_once(':')
            .ok_or_else(|| FrameError::HeaderWithoutColon(text.chars().take(64).collect()))?;
        let (name, value) = if escaped {
            (unescape(name, version)?, unescape(value, version)?)
        } else {
            (name.to_owned(), value.to_owned())
        };
        headers.push((name, value));
    }
    let content_length = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map(|(_, v)| {
            v.trim()
                .parse::<usize>()
                .map_err(|_| FrameError::BadContentLength(v.chars().take(32).collect()))
        })
        .transpose()?;
    let body_start = input.len() - rest.len();
    let body_len = match content_length {
        Some(len) => {
            if len > limits.max_body {
                return Err(FrameError::BodyTooLarge(limits.max_body));
            }
            if rest.len() <= len || rest[len] != 0 {
                return Err(FrameError::MissingTerminator);
            }
            len
        }
        None => {
            let len = rest
                .iter()
                .position(|b| *b == 0)
                .ok_or(FrameError::MissingTerminator)?;
            if len > limits.max_body {
                return Err(FrameError::BodyTooLarge(limits.max_body));
            }
            len
        }
    };
    let frame = Frame {
        command: command.to_owned(),
        headers,
        body: Bytes::copy_from_slice(&input[body_start..body_start + body_len]),
    };
    Ok((frame, body_start + body_len + 1))
}

fn unescape(text: &str, version: Version) -> Result<String, FrameError> {
    if !text.contains('\\') {
        return Ok(text.to_owned());
    }
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('c') => out.push(':'),
            Some('\\') => out.push('\\'),
            Some('r') if version == Version::V1_2 => out.push('\r'),
            _ => return Err(FrameError::BadEscape(text.chars().take(64).collect())),
        }
    }
    Ok(out)
}

fn escape(text: &str, version: Version, out: &mut Vec<u8>) {
    for c in text.chars() {
        match c {
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            ':' => out.extend_from_slice(b"\\c"),
            '\r' if version == Version::V1_2 => out.extend_from_slice(b"\\r"),
            c => {
                let mut buf = [0; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
}

/// Encodes a server frame. Header values are escaped as `version` wants
/// (never in CONNECTED); a `content-length` header is added for any body.
/// Without escaping (1.0, CONNECTED), line breaks in values become spaces:
/// they cannot be represented there.
pub fn encode(command: &str, headers: &[(&str, &str)], body: &[u8], version: Version) -> Vec<u8> {
    let escaped = command != "CONNECTED" && version >= Version::V1_1;
    let mut out = Vec::with_capacity(
        64 + body.len()
            + headers
                .iter()
                .map(|(n, v)| n.len() + v.len() + 2)
                .sum::<usize>(),
    );
    out.extend_from_slice(command.as_bytes());
    out.push(b'\n');
    for (name, value) in headers {
        if escaped {
            escape(name, version, &mut out);
            out.push(b':');
            escape(value, version, &mut out);
        } else {
            out.extend(name.bytes().map(flatten_line_break));
            out.push(b':');
            out.extend(value.bytes().map(flatten_line_break));
        }
        out.push(b'\n');
    }
    if !body.is_empty() {
        out.extend_from_slice(format!("content-length:{}\n", body.len()).as_bytes());
    }
    out.push(b'\n');
    out.extend_from_slice(body);
    out.push(0);
    out
}

fn flatten_line_break(b: u8) -> u8 {
    if b == b'\n' || b == b'\r' { b' ' } else { b }
}

/// Reads a `heart-beat` header: (can send every x ms, wants to receive every y ms).
pub fn heart_beat(value: Option<&str>) -> Option<(u64, u64)> {
    let Some(value) = value else {
        return Some((0, 0));
    };
    let (x, y) = value.split_once(',')?;
    Some((x.trim().parse().ok()?, y.trim().parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> FrameLimits {
        FrameLimits::new(1024)
    }

    fn one(input: &[u8], version: Version) -> Result<Frame, FrameError> {
        let mut frames = decode(input, version, &limits())?;
        assert_eq!(frames.len(), 1, "{frames:?}");
        Ok(frames.remove(0))
    }

    #[test]
    fn a_plain_frame() {
        let frame = one(b"SEND\ndestination:/topic/a\n\nhello\0", Version::V1_2).unwrap();
        assert_eq!(frame.command, "SEND");
        assert_eq!(frame.header("destination"), Some("/topic/a"));
        assert_eq!(&frame.body[..], b"hello");
    }

    #[test]
    fn crlf_line_ends_and_heart_beats_between_frames() {
        let frames = decode(
            b"\n\r\nSEND\r\ndestination:/topic/a\r\n\r\nx\0\n\nDISCONNECT\nreceipt:7\n\n\0\n",
            Version::V1_2,
            &limits(),
        )
        .unwrap();
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].header("destination"), Some("/topic/a"));
        assert_eq!(frames[1].command, "DISCONNECT");
        assert_eq!(frames[1].header("receipt"), Some("7"));
        assert!(decode(b"\n", Version::V1_2, &limits()).unwrap().is_empty());
    }

    #[test]
    fn escaped_headers_by_version() {
        let input = b"SEND\ndestination:/topic/a\nx-note:a\\cb\\nc\\\\d\\re\n\n\0";
        let frame = one(input, Version::V1_2).unwrap();
        assert_eq!(frame.header("x-note"), Some("a:b\nc\\d\re"));
        // 1.1 has no \r escape.
        assert_eq!(
            one(input, Version::V1_1),
            Err(FrameError::BadEscape("a\\cb\\nc\\\\d\\re".into()))
        );
        // 1.0 does not escape at all.
        assert_eq!(
            one(input, Version::V1_0).unwrap().header("x-note"),
            Some("a\\cb\\nc\\\\d\\re")
        );
        // CONNECT is never escaped; a value may contain ':'.
        let connect = one(b"CONNECT\npasscode:a\\cb:c\n\n\0", Version::V1_2).unwrap();
        assert_eq!(connect.header("passcode"), Some("a\\cb:c"));
        assert!(matches!(
            one(b"SEND\nx:\\t\n\n\0", Version::V1_2),
            Err(FrameError::BadEscape(_))
        ));
    }

    #[test]
    fn the_first_of_repeated_headers_counts() {
        let frame = one(b"SEND\nfoo:1\nfoo:2\n\n\0", Version::V1_2).unwrap();
        assert_eq!(frame.header("foo"), Some("1"));
        assert_eq!(frame.headers.len(), 2);
    }

    #[test]
    fn a_body_with_nul_bytes_under_content_length() {
        let mut input = b"SEND\ndestination:/topic/a\ncontent-length:5\n\n".to_vec();
        input.extend_from_slice(&[1, 0, 2, 0, 3, 0]);
        let frame = one(&input, Version::V1_2).unwrap();
        assert_eq!(&frame.body[..], &[1, 0, 2, 0, 3]);
        // Without content-length the body ends at the first NUL.
        let frame = one(b"SEND\n\nab\0", Version::V1_2).unwrap();
        assert_eq!(&frame.body[..], b"ab");
    }

    #[test]
    fn missing_terminators_are_errors() {
        assert_eq!(
            one(b"SEND\n\nhello", Version::V1_2),
            Err(FrameError::MissingTerminator)
        );
        assert_eq!(
            one(b"SEND\ncontent-length:3\n\nhello\0", Version::V1_2),
            Err(FrameError::MissingTerminator)
        );
        assert_eq!(
            one(b"SEND\ncontent-length:9\n\nhello\0", Version::V1_2),
            Err(FrameError::MissingTerminator)
        );
        assert_eq!(
            one(b"SEND\ndestination:/a\n", Version::V1_2),
            Err(FrameError::UnterminatedHeaders)
        );
        assert_eq!(
            one(b"SEND", Version::V1_2),
            Err(FrameError::UnterminatedHeaders)
        );
    }

    #[test]
    fn bad_frames_are_errors() {
        assert_eq!(
            one(b"GARBAGE\n\n\0", Version::V1_2),
            Err(FrameError::UnknownCommand("GARBAGE".into()))
        );
        assert!(matches!(
            one(b"SEND\nno colon\n\n\0", Version::V1_2),
            Err(FrameError::HeaderWithoutColon(_))
        ));
        assert!(matches!(
            one(b"SEND\ncontent-length:x\n\n\0", Version::V1_2),
            Err(FrameError::BadContentLength(_))
        ));
        assert_eq!(
            one(b"SEND\nk:\xff\n\n\0", Version::V1_2),
            Err(FrameError::NotUtf8)
        );
    }

    #[test]
    fn oversized_frames_are_refused_before_they_are_read() {
        let limits = FrameLimits::new(8);
        let input = b"SEND\ncontent-length:100000000\n\n";
        assert_eq!(
            decode(input, Version::V1_2, &limits),
            Err(FrameError::BodyTooLarge(8))
        );
        assert_eq!(
            decode(b"SEND\n\n0123456789\0", Version::V1_2, &limits),
            Err(FrameError::BodyTooLarge(8))
        );
        let mut many = b"SEND\n".to_vec();
        for i in 0..65 {
            many.extend_from_slice(format!("h{i}:v\n").as_bytes());
        }
        many.extend_from_slice(b"\n\0");
        assert_eq!(
            decode(&many, Version::V1_2, &FrameLimits::new(8)),
            Err(FrameError::TooManyHeaders(64))
        );
        let mut long = b"SEND\nh:".to_vec();
        long.extend(std::iter::repeat_n(b'x', 9000));
        long.extend_from_slice(b"\n\n\0");
        assert_eq!(
            decode(&long, Version::V1_2, &limits),
            Err(FrameError::HeaderTooLong(8192))
        );
    }

    #[test]
    fn server_frames_escape_and_carry_their_length() {
        let bytes = encode(
            "MESSAGE",
            &[("destination", "/a:b"), ("x", "l1\nl2")],
            b"hi\0there",
            Version::V1_2,
        );
        assert_eq!(
            bytes,
            b"MESSAGE\ndestination:/a\\cb\nx:l1\\nl2\ncontent-length:8\n\nhi\0there\0".to_vec()
        );
        let connected = encode(
            "CONNECTED",
            &[("version", "1.2"), ("server", "a:b")],
            b"",
            Version::V1_2,
        );
        assert_eq!(
            connected,
            b"CONNECTED\nversion:1.2\nserver:a:b\n\n\0".to_vec()
        );
    }

    #[test]
    fn versions_and_heart_beats() {
        assert_eq!(Version::negotiate(Some("1.0,1.1,1.2")), Some(Version::V1_2));
        assert_eq!(Version::negotiate(Some("1.1")), Some(Version::V1_1));
        assert_eq!(Version::negotiate(None), Some(Version::V1_0));
        assert_eq!(Version::negotiate(Some("2.0")), None);
        assert_eq!(heart_beat(Some("10000,5000")), Some((10000, 5000)));
        assert_eq!(heart_beat(None), Some((0, 0)));
        assert_eq!(heart_beat(Some("x")), None);
    }

    /// Found by the fuzzer (fuzz/regressions): frames at the header limit,
    /// with NUL in header values' neighbourhood, decode and round-trip.
    #[test]
    fn fuzz_regression_frames_at_the_header_limit() {
        let input = include_bytes!("../../fuzz/regressions/stomp-64-headers");
        let frames = decode(input, Version::V1_2, &FrameLimits::new(4096)).unwrap();
        assert!(!frames.is_empty());
        for frame in frames {
            let headers: Vec<(&str, &str)> = frame
                .headers
                .iter()
                .filter(|(n, _)| n != "content-length")
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            let again = encode(&frame.command, &headers, &frame.body, Version::V1_2);
            let mut limits = FrameLimits::new(4096);
            limits.max_headers += 1;
            let decoded = decode(&again, Version::V1_2, &limits).unwrap();
            assert_eq!(decoded[0].body, frame.body);
        }
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        fn command() -> impl Strategy<Value = &'static str> {
            prop::sample::select(CLIENT_COMMANDS[2..].to_vec())
        }

        proptest! {
            /// Whatever a 1.2 frame's headers and body hold (colons, line
            /// breaks, backslashes, NUL bytes in the body), encoding then
            /// decoding gives it back.
            #[test]
            fn encode_then_decode_round_trips(
                command in command(),
                headers in prop::collection::vec(("[a-z][a-z:\\\r\n-]{0,12}", "\\PC{0,40}"), 0..8),
                body in prop::collection::vec(any::<u8>(), 0..300),
            ) {
                let pairs: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
                let bytes = encode(command, &pairs, &body, Version::V1_2);
                let frames = decode(&bytes, Version::V1_2, &FrameLimits::new(1024)).unwrap();
                prop_assert_eq!(frames.len(), 1);
                let frame = &frames[0];
                prop_assert_eq!(frame.command.as_str(), command);
                prop_assert_eq!(&frame.body[..], &body[..]);
                let mut expected: Vec<(String, String)> = headers.clone();
                if !body.is_empty() {
                    expected.push(("content-length".into(), body.len().to_string()));
                }
                prop_assert_eq!(&frame.headers, &expected);
            }

            /// Several frames and heart-beats in one message decode in order.
            #[test]
            fn frames_in_a_row(bodies in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..50), 1..5)) {
                let mut bytes = Vec::new();
                for body in &bodies {
                    bytes.extend(encode("SEND", &[("destination", "/topic/x")], body, Version::V1_2));
                    bytes.extend_from_slice(b"\n");
                }
                let frames = decode(&bytes, Version::V1_2, &FrameLimits::new(1024)).unwrap();
                let decoded: Vec<Vec<u8>> = frames.iter().map(|f| f.body.to_vec()).collect();
                prop_assert_eq!(decoded, bodies);
            }

            /// Arbitrary input is an error or frames, never a panic.
            #[test]
            fn arbitrary_input_never_panics(input in prop::collection::vec(any::<u8>(), 0..2000)) {
                for version in [Version::V1_0, Version::V1_1, Version::V1_2] {
                    let _ = decode(&input, version, &FrameLimits::new(256));
                }
            }
        }
    }
}
