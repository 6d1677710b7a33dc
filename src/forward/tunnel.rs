//! A WebSocket tunnel: the bytes of an upgrade the upstream accepted, relayed both ways until
//! a side closes, the session it was admitted on ends, or portcullis shuts down.
//!
//! In the last two cases portcullis is the one ending the conversation, and it says why with
//! a WebSocket close frame to each side: 1008 "session ended" or 1001 "going away". A bare TCP
//! close reaches a browser's game client as 1006, which reads as a network fault and invites
//! a reconnect loop; a close code lets it tell being signed out from being cut off. A frame
//! may be half relayed when the end comes, so each direction follows the frames it carries
//! and finishes the one in flight before the close frame goes out (or gives up, and closes
//! without one, when that takes longer than the tunnel's close allowance).

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::Upgraded;
use crate::session::tunnels::TunnelLease;

/// Live WebSocket tunnels, shared with whoever wants to count them.
#[derive(Debug, Default)]
pub struct TunnelCount(AtomicUsize);

impl TunnelCount {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

struct TunnelGuard(Arc<TunnelCount>);

impl TunnelGuard {
    fn new(count: Arc<TunnelCount>) -> Self {
        count.0.fetch_add(1, Ordering::Relaxed);
        TunnelGuard(count)
    }
}

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where an upgrade (WebSocket, Socket.IO) changes hands. The client connection puts one in
/// each HTTP/1.1 request that asks to upgrade; when the upstream answers 101, the forwarder
/// leaves the upstream's side here. Once the 101 is written and the client's socket let go
/// of, the client connection takes the [`Tunnel`] and runs it on that socket.
#[derive(Clone, Default)]
pub struct UpgradeHandoff(Arc<Mutex<Option<Tunnel>>>);

impl UpgradeHandoff {
    pub(super) fn give(&self, tunnel: Tunnel) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(tunnel);
        }
    }

    /// The tunnel the last request's 101 opened, if any.
    pub fn take(&self) -> Option<Tunnel> {
        self.0.lock().ok().and_then(|mut slot| slot.take())
    }
}

/// Longest a tunnel's ending may take: the frames in flight finished, the close frames
/// written and both sides closed.
const TUNNEL_CLOSE: Duration = Duration::from_secs(1);

/// Bytes read from one side before they are written to the other.
const RELAY_BUFFER: usize = 8 * 1024;

/// The upstream's side of an accepted upgrade, counted as an open tunnel while it lives.
pub struct Tunnel {
    upstream: Upgraded,
    _guard: TunnelGuard,
    /// The session it was admitted on, if its route needs one: the tunnel ends with it.
    lease: Option<TunnelLease>,
}

/// Why portcullis ends a tunnel itself, as the close frame says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    SessionEnded,
    ShuttingDown,
}

impl Ending {
    fn code(self) -> u16 {
        match self {
            // Policy Violation: the generic refusal, for a session that no longer admits.
            Ending::SessionEnded => 1008,
            Ending::ShuttingDown => 1001,
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Ending::SessionEnded => "session ended",
            Ending::ShuttingDown => "going away",
        }
    }
}

impl Tunnel {
    pub(super) fn new(
        upstream: Upgraded,
        count: &Arc<TunnelCount>,
        lease: Option<TunnelLease>,
    ) -> Self {
        Tunnel {
            upstream,
            _guard: TunnelGuard::new(count.clone()),
            lease,
        }
    }

    /// Relays bytes both ways between `client` and the upstream until either side closes (then
    /// both are closed, so a peer that vanished never leaves the other hanging), its session
    /// ends, or `stop` resolves (then each side is told why with a close frame).
    pub async fn run<C>(self, mut client: C, stop: impl Future<Output = ()>)
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        let mut upstream = self.upstream;
        let (mut client_read, mut client_write) = tokio::io::split(&mut client);
        let (mut upstream_read, mut upstream_write) = tokio::io::split(&mut upstream);
        // What each direction has read and not yet written lives here, outside the futures
        // that move it, so that ending the relay loses none of it.
        let mut to_upstream = Relay::new();
        let mut to_client = Relay::new();
        let session_ended = async {
            match &self.lease {
                Some(lease) => lease.ended().await,
                None => std::future::pending().await,
            }
        };
        let ending = tokio::select! {
            r = poll_fn(|cx| to_upstream.poll_relay(cx, &mut client_read, &mut upstream_write, false)) => {
                log_relay_error(r);
                None
            }
            r = poll_fn(|cx| to_client.poll_relay(cx, &mut upstream_read, &mut client_write, false)) => {
                log_relay_error(r);
                None
            }
            _ = session_ended => Some(Ending::SessionEnded),
            _ = stop => Some(Ending::ShuttingDown),
        };
        // Both sides at once, and bounded: a client that stops reading would otherwise hold a
        // TLS close (its close_notify cannot be written) and the upstream's close behind it.
        let closing = async {
            tokio::join!(
                to_client.close(
                    &mut upstream_read,
                    &mut client_write,
                    ending.map(|e| close_frame(e, None))
                ),
                to_upstream.close(
                    &mut client_read,
                    &mut upstream_write,
                    ending.map(|e| close_frame(e, Some(mask_key())))
                ),
            )
        };
        let _ = tokio::time::timeout(TUNNEL_CLOSE, closing).await;
    }
}

fn log_relay_error(result: io::Result<()>) {
    if let Err(e) = result {
        tracing::debug!(error = %e, "tunnel closed with an error");
    }
}

/// One direction of a tunnel: a buffer of bytes read from one side and not yet all written to
/// the other, and where the frames those bytes belong to begin and end.
struct Relay {
    buf: Box<[u8]>,
    /// `buf[written..filled]` is still to be written.
    written: usize,
    filled: usize,
    /// The reading side has ended.
    eof: bool,
    /// The frames read so far.
    frames: FrameCursor,
}

impl Relay {
    fn new() -> Self {
        Relay {
            buf: vec![0; RELAY_BUFFER].into_boxed_slice(),
            written: 0,
            filled: 0,
            eof: false,
            frames: FrameCursor::default(),
        }
    }

    /// Moves bytes from `from` to `to` until `from` ends. With `finishing`, reads no further
    /// than the end of the frame in flight, and is done once that frame is written.
    fn poll_relay<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut R,
        to: &mut W,
        finishing: bool,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            while self.written < self.filled {
                let n = ready!(
                    Pin::new(&mut *to).poll_write(cx, &self.buf[self.written..self.filled])
                )?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.written += n;
            }
            self.written = 0;
            self.filled = 0;
            let room = match (self.eof, finishing) {
                (true, _) => return Pin::new(&mut *to).poll_flush(cx),
                (false, false) => self.buf.len(),
                (false, true) => match self.frames.to_boundary() {
                    0 => return Pin::new(&mut *to).poll_flush(cx),
                    owed => usize::try_from(owed).map_or(self.buf.len(), |o| o.min(self.buf.len())),
                },
            };
            let mut read = ReadBuf::new(&mut self.buf[..room]);
            match Pin::new(&mut *from).poll_read(cx, &mut read) {
                Poll::Pending => {
                    // Nothing more to send for now: what the writer holds goes out.
                    ready!(Pin::new(&mut *to).poll_flush(cx))?;
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let n = read.filled().len();
                    if n == 0 {
                        self.eof = true;
                    } else {
                        self.frames.advance(&self.buf[..n]);
                        self.filled = n;
                    }
                }
            }
        }
    }

    /// Ends this direction: with a close frame, finishes the frame in flight and sends it
    /// (unless a close frame already went this way, or the reading side is gone), then closes
    /// the writer, and reads what the reading side still sends until it closes too.
    async fn close<R, W>(&mut self, from: &mut R, to: &mut W, frame: Option<Vec<u8>>)
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if let Some(frame) = frame {
            let finished = poll_fn(|cx| self.poll_relay(cx, from, to, true)).await;
            if finished.is_ok() && !self.eof && !self.frames.close_seen {
                let _ = to.write_all(&frame).await;
            }
        }
        let _ = to.shutdown().await;
        // A socket closed with bytes unread sends a reset, which can throw away what is still
        // on its way to that peer: the close frame above, say. What it sends now is no longer
        // wanted, so it is read and let go until it closes (or the close allowance ends).
        while !self.eof {
            match tokio::io::AsyncReadExt::read(from, &mut self.buf).await {
                Ok(0) | Err(_) => self.eof = true,
                Ok(_) => {}
            }
        }
    }
}

/// A close frame with `ending`'s code and reason; masked with `mask` when it goes to the
/// upstream, to which portcullis speaks as a client (RFC 6455 5.3).
fn close_frame(ending: Ending, mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut payload = ending.code().to_be_bytes().to_vec();
    payload.extend_from_slice(ending.reason().as_bytes());
    // FIN and opcode 8; a control frame's payload is under 126 bytes, so its length fits.
    let mut frame = vec![0x88, payload.len() as u8];
    if let Some(mask) = mask {
        frame[1] |= 0x80;
        frame.extend_from_slice(&mask);
        for (i, byte) in payload.iter_mut().enumerate() {
            *byte ^= mask[i % 4];
        }
    }
    frame.extend_from_slice(&payload);
    frame
}

/// A masking key no one can predict, as a client's must be.
fn mask_key() -> [u8; 4] {
    let random = uuid::Uuid::new_v4();
    let b = random.as_bytes();
    [b[0], b[1], b[2], b[3]]
}

/// Where a stream of WebSocket frames stands: in a frame's header, in its payload, or between
/// frames. Follows only the framing (RFC 6455 5.2), never the payload.
#[derive(Debug, Default)]
struct FrameCursor {
    /// The header of the frame being read, as far as it has come.
    head: [u8; 14],
    head_len: usize,
    /// Payload bytes of the current frame still to come.
    payload_owed: u64,
    /// A close frame has gone by.
    close_seen: bool,
}

impl FrameCursor {
    /// Follows `bytes`, the next ones in the stream.
    fn advance(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.payload_owed > 0 {
                let n =
                    usize::try_from(self.payload_owed).map_or(bytes.len(), |o| o.min(bytes.len()));
                self.payload_owed -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            let n = self.head_owed().min(bytes.len());
            self.head[self.head_len..self.head_len + n].copy_from_slice(&bytes[..n]);
            self.head_len += n;
            bytes = &bytes[n..];
            if self.head_owed() == 0 {
                self.close_seen |= self.head[0] & 0x0f == 0x8;
                self.payload_owed = self.payload_len();
                self.head_len = 0;
            }
        }
    }

    /// Bytes to go before the stream is between frames: 0 when it is.
    fn to_boundary(&self) -> u64 {
        if self.payload_owed > 0 {
            self.payload_owed
        } else if self.head_len > 0 {
            self.head_owed() as u64
        } else {
            0
        }
    }

    /// Bytes still missing from the header being read (the first two say how long it is).
    fn head_owed(&self) -> usize {
        if self.head_len < 2 {
            return 2 - self.head_len;
        }
        let length = match self.head[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if self.head[1] & 0x80 != 0 { 4 } else { 0 };
        2 + length + mask - self.head_len
    }

    /// The payload length a whole header states.
    fn payload_len(&self) -> u64 {
        match self.head[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([self.head[2], self.head[3]])),
            127 => {
                let mut n = [0; 8];
                n.copy_from_slice(&self.head[2..10]);
                u64::from_be_bytes(n)
            }
            n => u64::from(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame of `len` payload bytes, its header in the shortest form, masked or not.
    fn frame(opcode: u8, len: usize, masked: bool) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        let mask_bit = if masked { 0x80 } else { 0 };
        match len {
            0..=125 => f.push(mask_bit | len as u8),
            126..=0xffff => {
                f.push(mask_bit | 126);
                f.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                f.push(mask_bit | 127);
                f.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        if masked {
            f.extend_from_slice(&[1, 2, 3, 4]);
        }
        f.extend(std::iter::repeat_n(b'x', len));
        f
    }

    #[test]
    fn frames_of_every_header_form_are_followed_across_any_split() {
        let mut stream = Vec::new();
        // Each frame's start, header length and end.
        let mut frames = Vec::new();
        for (opcode, len, masked) in [
            (1, 0, false),
            (2, 5, true),
            (1, 125, false),
            (2, 126, true),
            (2, 70_000, false),
            (9, 3, true),
        ] {
            let f = frame(opcode, len, masked);
            frames.push((stream.len(), f.len() - len, stream.len() + f.len()));
            stream.extend(f);
        }
        // What the cursor owes `at` bytes in: the header's first two bytes, then the rest of
        // the header they describe, then the payload; nothing between frames.
        let owed = |at: usize| {
            let Some(&(start, head, end)) = frames.iter().find(|&&(s, _, e)| s < at && at < e)
            else {
                return 0;
            };
            if at < start + 2 {
                start + 2 - at
            } else if at < start + head {
                start + head - at
            } else {
                end - at
            }
        };
        for piece in [1, 2, 3, 7, 13, 4096, stream.len()] {
            let mut cursor = FrameCursor::default();
            let mut at = 0;
            for chunk in stream.chunks(piece) {
                cursor.advance(chunk);
                at += chunk.len();
                assert_eq!(
                    cursor.to_boundary(),
                    owed(at) as u64,
                    "piece {piece}, at {at}"
                );
            }
            assert_eq!(cursor.to_boundary(), 0);
            assert!(!cursor.close_seen);
        }
    }

    #[test]
    fn within_a_header_the_owed_bytes_grow_as_it_says_how_long_it_is() {
        let f = frame(2, 70_000, true);
        let mut cursor = FrameCursor::default();
        cursor.advance(&f[..1]);
        assert_eq!(cursor.to_boundary(), 1, "the second byte");
        cursor.advance(&f[1..2]);
        assert_eq!(cursor.to_boundary(), 12, "8 length bytes and the mask");
        cursor.advance(&f[2..14]);
        assert_eq!(cursor.to_boundary(), 70_000);
    }

    #[test]
    fn a_close_frame_going_by_is_noted() {
        let mut cursor = FrameCursor::default();
        cursor.advance(&frame(1, 4, false));
        assert!(!cursor.close_seen);
        cursor.advance(&frame(8, 2, true));
        assert!(cursor.close_seen);
    }

    #[test]
    fn close_frames_carry_the_code_and_reason_and_are_masked_for_the_upstream() {
        let plain = close_frame(Ending::SessionEnded, None);
        assert_eq!(plain[..4], [0x88, 15, 0x03, 0xf0]);
        assert_eq!(&plain[4..], b"session ended");

        let mask = [0xa1, 0xb2, 0xc3, 0xd4];
        let masked = close_frame(Ending::ShuttingDown, Some(mask));
        assert_eq!(masked[..2], [0x88, 0x80 | 12]);
        assert_eq!(masked[2..6], mask);
        let unmasked: Vec<u8> = masked[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        assert_eq!(unmasked[..2], 1001u16.to_be_bytes());
        assert_eq!(&unmasked[2..], b"going away");

        let mut cursor = FrameCursor::default();
        cursor.advance(&masked);
        assert!(cursor.close_seen && cursor.to_boundary() == 0);
    }
}
