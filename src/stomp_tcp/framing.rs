//! A TCP connection as a STOMP session's socket: [`TcpFrames`] yields one
//! message per complete frame (a run of heart-beat end-of-lines yields
//! `"\n"`), and [`TcpSink`] writes frames, ignores WebSocket pings, and
//! turns the session's close into what STOMP over TCP has instead: an ERROR
//! frame with the reason (unless one was just sent, or the close is a
//! DISCONNECT's), then the end of the connection. Nothing is written after
//! an ERROR; the connection ends once the session has recorded its
//! departure (as a WebSocket's close follows it: a client that reconnects
//! at once finds what was routed to the old connection parked).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::extract::ws::{Message, Utf8Bytes};
use bytes::{Buf, BytesMut};
use futures_util::{Sink, Stream};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_tungstenite::tungstenite::error::CapacityError;

use crate::protocol::stomp::{self, FrameLimits, Version};

/// Room for the command and headers around a body, as over WebSocket (the
/// largest frame is the largest body plus this).
const FRAME_OVERHEAD: usize = 16 * 1024;
/// Unflushed bytes past which a write waits for the socket.
const WRITE_HIGH_WATER: usize = 64 * 1024;

/// Splits a TCP connection into a session's sink and stream.
pub fn split(stream: TcpStream, limits: FrameLimits) -> (TcpSink, TcpFrames) {
    let (read, write) = stream.into_split();
    (
        TcpSink {
            io: write,
            buffer: BytesMut::new(),
            error_sent: false,
            closing: false,
            shut: false,
        },
        TcpFrames {
            io: read,
            buffer: BytesMut::with_capacity(4096),
            limits,
            eof: false,
            need: 0,
        },
    )
}

/// The reading half: complete frames, one per message.
pub struct TcpFrames {
    io: OwnedReadHalf,
    buffer: BytesMut,
    limits: FrameLimits,
    eof: bool,
    /// The buffer must hold this many bytes before it is cut again: a large
    /// frame arriving in many reads is not scanned again after each one.
    need: usize,
}

/// Where the first complete unit in `buffer` ends.
#[derive(Debug, PartialEq, Eq)]
enum Cut {
    /// Heart-beat end-of-lines, this many bytes.
    Beats(usize),
    /// A frame, this many bytes (to its NUL).
    Frame(usize),
    /// A frame whose `content-length` is over the limit: its headers, this
    /// many bytes, are enough for the decoder to say so.
    Oversized(usize),
    /// Not complete yet: nothing can come of looking again before the
    /// buffer holds this many bytes.
    More(usize),
    /// More than a frame may be, with no end in sight.
    TooLarge,
}

/// The length of the complete frame at the start of `buffer` (through its
/// NUL), if there is one: for clients of a node, such as the benchmark's.
pub fn complete_frame(buffer: &[u8], limits: &FrameLimits) -> Option<usize> {
    match cut(buffer, limits) {
        Cut::Frame(n) => Some(n),
        _ => None,
    }
}

/// Finds the first unit in `buffer`.
fn cut(buffer: &[u8], limits: &FrameLimits) -> Cut {
    let beats = buffer
        .iter()
        .take_while(|b| matches!(b, b'\n' | b'\r'))
        .count();
    // A lone `\r` may be the start of `\r\n`: wait for the `\n`.
    let beats = if buffer.get(beats.saturating_sub(1)) == Some(&b'\r') {
        beats - 1
    } else {
        beats
    };
    if beats > 0 {
        return Cut::Beats(beats);
    }
    if buffer.is_empty() || buffer == b"\r" {
        return Cut::More(buffer.len() + 1);
    }
    let max_frame = limits.max_body + FRAME_OVERHEAD;
    // The headers end at the first empty line.
    let mut at = 0;
    let mut content_length = None;
    let mut first = true;
    let body_start = loop {
        let Some(end) = buffer[at..].iter().position(|b| *b == b'\n') else {
            return if buffer.len() > max_frame {
                Cut::TooLarge
            } else {
                Cut::More(buffer.len() + 1)
            };
        };
        let line = &buffer[at..at + end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        at += end + 1;
        if line.is_empty() && !first {
            break at;
        }
        if !first
            && content_length.is_none()
            && let Some(value) = line.strip_prefix(b"content-length:")
        {
            content_length = Some(
                std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.trim().parse::<usize>().ok()),
            );
        }
        first = false;
    };
    match content_length {
        // Not a number: the decoder says so.
        Some(None) => Cut::Oversized(body_start),
        Some(Some(len)) if len > limits.max_body => Cut::Oversized(body_start),
        Some(Some(len)) => {
            if buffer.len() > body_start + len {
                Cut::Frame(body_start + len + 1)
            } else {
                Cut::More(body_start + len + 1)
            }
        }
        None => match buffer[body_start..].iter().position(|b| *b == 0) {
            Some(nul) => Cut::Frame(body_start + nul + 1),
            None if buffer.len() > max_frame => Cut::TooLarge,
            None => Cut::More(buffer.len() + 1),
        },
    }
}

impl Stream for TcpFrames {
    type Item = Result<Message, axum::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            let unit = if this.buffer.len() >= this.need {
                cut(&this.buffer, &this.limits)
            } else {
                Cut::More(this.need)
            };
            match unit {
                Cut::Beats(n) => {
                    this.need = 0;
                    this.buffer.advance(n);
                    return Poll::Ready(Some(Ok(Message::Text(Utf8Bytes::from_static("\n")))));
                }
                Cut::Frame(n) | Cut::Oversized(n) => {
                    this.need = 0;
                    let frame = this.buffer.split_to(n).freeze();
                    return Poll::Ready(Some(Ok(Message::Binary(frame))));
                }
                Cut::TooLarge => {
                    let max_size = this.limits.max_body + FRAME_OVERHEAD;
                    let size = this.buffer.len();
                    this.buffer.clear();
                    this.eof = true;
                    let error = tokio_tungstenite::tungstenite::Error::Capacity(
                        CapacityError::MessageTooLong { size, max_size },
                    );
                    return Poll::Ready(Some(Err(axum::Error::new(error))));
                }
                Cut::More(need) => this.need = need,
            }
            if this.eof {
                // What is left is a frame cut short: the peer is gone.
                return Poll::Ready(None);
            }
            // Room for what the frame still needs (as far as known), at
            // least a page and never past the largest frame.
            let max_frame = this.limits.max_body + FRAME_OVERHEAD + 1;
            let wanted = this.need.saturating_sub(this.buffer.len()).max(4096);
            this.buffer
                .reserve(wanted.min(max_frame.saturating_sub(this.buffer.len()).max(4096)));
            match ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut this.io),
                cx,
                &mut this.buffer
            )) {
                Ok(0) => this.eof = true,
                Ok(_) => {}
                Err(error) => return Poll::Ready(Some(Err(axum::Error::new(error)))),
            }
        }
    }
}

/// The writing half.
pub struct TcpSink {
    io: OwnedWriteHalf,
    buffer: BytesMut,
    /// An ERROR frame went out: nothing follows it, and the session's close
    /// adds none.
    error_sent: bool,
    /// Shut the connection down once the buffer is written.
    closing: bool,
    shut: bool,
}

impl TcpSink {
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.buffer.is_empty() {
            let written = ready!(Pin::new(&mut self.io).poll_write(cx, &self.buffer))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.buffer.advance(written);
        }
        ready!(Pin::new(&mut self.io).poll_flush(cx))?;
        if self.closing && !self.shut {
            // Our end of the connection: the client sees it at once. Its
            // input is still read (the session drains it briefly), so that
            // closing with unread input does not reset the connection and
            // make the client drop the ERROR it has not read yet.
            let _ = ready!(Pin::new(&mut self.io).poll_shutdown(cx));
            self.shut = true;
        }
        Poll::Ready(Ok(()))
    }
}

impl Sink<Message> for TcpSink {
    type Error = axum::Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let this = self.get_mut();
        if this.buffer.len() >= WRITE_HIGH_WATER {
            ready!(this.poll_write_out(cx)).map_err(axum::Error::new)?;
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(self: Pin<&mut Self>, message: Message) -> Result<(), Self::Error> {
        let this = self.get_mut();
        if this.shut || this.closing {
            return Ok(());
        }
        match message {
            // Nothing follows an ERROR but the end of the connection.
            Message::Text(_) | Message::Binary(_) if this.error_sent => {}
            Message::Text(text) => this.take(text.as_bytes()),
            Message::Binary(bytes) => this.take(&bytes),
            Message::Close(frame) => {
                let failure = frame.filter(|f| f.code != 1000);
                if let Some(frame) = failure
                    && !this.error_sent
                {
                    // The WebSocket close's reason, as STOMP says it.
                    let reason = frame.reason.as_str();
                    let error = stomp::encode(
                        "ERROR",
                        &[("message", reason), ("content-type", "text/plain")],
                        reason.as_bytes(),
                        Version::V1_0,
                    );
                    this.buffer.extend_from_slice(&error);
                }
                this.closing = true;
            }
            // TCP has no pings: STOMP heart-beats stand in for them.
            Message::Ping(_) | Message::Pong(_) => {}
        }
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.get_mut().poll_write_out(cx).map_err(axum::Error::new)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let this = self.get_mut();
        this.closing = true;
        this.poll_write_out(cx).map_err(axum::Error::new)
    }
}

impl TcpSink {
    fn take(&mut self, bytes: &[u8]) {
        if bytes.starts_with(b"ERROR\n") || bytes.starts_with(b"ERROR\r\n") {
            self.error_sent = true;
        }
        self.buffer.extend_from_slice(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> FrameLimits {
        FrameLimits::new(100)
    }

    #[test]
    fn frames_are_cut_where_they_end() {
        assert_eq!(cut(b"\n\r\nSEND", &limits()), Cut::Beats(3));
        assert_eq!(cut(b"\r", &limits()), Cut::More(2));
        assert_eq!(
            cut(b"SEND\ndestination:/topic/a\n\nhi", &limits()),
            Cut::More(30)
        );
        let frame = b"SEND\ndestination:/topic/a\n\nhi\0CONNECT";
        assert_eq!(cut(frame, &limits()), Cut::Frame(30));
        // A body with NUL in it, by content-length.
        let frame = b"SEND\ncontent-length:3\n\na\0b\0SEND";
        assert_eq!(cut(frame, &limits()), Cut::Frame(27));
        assert_eq!(
            cut(b"SEND\ncontent-length:3\n\na\0b", &limits()),
            Cut::More(27)
        );
        // Over the limit: the headers go to the decoder, which says so.
        let frame = b"SEND\ncontent-length:1000\n\n";
        assert_eq!(cut(frame, &limits()), Cut::Oversized(frame.len()));
        let endless = vec![b'x'; 100 + FRAME_OVERHEAD + 1];
        assert_eq!(cut(&endless, &limits()), Cut::TooLarge);
        let mut unterminated = b"SEND\n\n".to_vec();
        unterminated.extend(vec![b'x'; 100 + FRAME_OVERHEAD]);
        assert_eq!(cut(&unterminated, &limits()), Cut::TooLarge);
        // The command line's own text is never a content-length.
        assert_eq!(cut(b"content-length:1\n\nab\0", &limits()), Cut::Frame(21));
    }
}
