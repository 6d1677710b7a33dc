//! What sits between a socket and hyper: a record of the connection's activity (for the idle
//! and dormancy timers) and a way to hand bytes that were already read back to the next reader.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// A client's byte stream: plain TCP or TLS over TCP.
pub(super) trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Ready when the client has sent something (or closed): the socket is readable.
    fn poll_client_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl Transport for TcpStream {
    fn poll_client_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_read_ready(cx)
    }
}

impl Transport for TlsStream<TcpStream> {
    fn poll_client_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Nothing decrypted waits inside: a connection only rests after the reader has drained
        // everything the socket had.
        self.get_ref().0.poll_read_ready(cx)
    }
}

/// When a connection last moved bytes, how many of its requests still wait for a response
/// head, and how many request and response bodies are still moving; and from that, whether
/// hyper is between messages.
pub(super) struct Activity {
    epoch: Instant,
    last_millis: AtomicU64,
    awaiting_head: AtomicUsize,
    open_bodies: AtomicUsize,
    open_request_bodies: AtomicUsize,
    /// A request body was dropped before its end: hyper may still be reading (draining) it.
    draining: AtomicBool,
    /// Bytes were read that no request has been made of yet (a head in pieces), or that belong
    /// to a request body not yet finished.
    reading_message: AtomicBool,
    /// When the first byte of the message being read arrived (`last_millis`' clock).
    message_started_millis: AtomicU64,
    /// Bytes were written and not flushed yet.
    unflushed: AtomicBool,
    /// hyper asked for the next request's bytes while nothing else was in flight, and none
    /// were there: it is idle between messages.
    between_messages: AtomicBool,
    /// hyper's last read found nothing (it waits for the client's next bytes), whatever was in
    /// flight then. It does not read again after the response it was waiting to send: once
    /// that is out, this is the sign that it is idle.
    read_waiting: AtomicBool,
    /// Requests started and body frames moved, either way: what HTTP/2 counts as use, where
    /// bytes alone (PINGs, a HEADERS frame sent a byte at a time) are not.
    progress: AtomicU64,
}

impl Activity {
    pub(super) fn new() -> Self {
        Activity {
            epoch: Instant::now(),
            last_millis: AtomicU64::new(0),
            awaiting_head: AtomicUsize::new(0),
            open_bodies: AtomicUsize::new(0),
            open_request_bodies: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            reading_message: AtomicBool::new(false),
            message_started_millis: AtomicU64::new(0),
            unflushed: AtomicBool::new(false),
            between_messages: AtomicBool::new(false),
            read_waiting: AtomicBool::new(false),
            progress: AtomicU64::new(0),
        }
    }

    /// A request started, or a body frame moved.
    pub(super) fn progressed(&self) {
        self.progress.fetch_add(1, Ordering::Relaxed);
    }

    /// Changes whenever [`Activity::progressed`] is called.
    pub(super) fn progress(&self) -> u64 {
        self.progress.load(Ordering::Relaxed)
    }

    /// A request waits for its response head (the upstream is working on it).
    pub(super) fn awaiting_head(&self) -> bool {
        self.awaiting_head.load(Ordering::Relaxed) != 0
    }

    /// Nothing in flight in either direction and everything written has been flushed: a read
    /// that finds nothing now can only be hyper waiting for the next request head.
    fn quiescent(&self) -> bool {
        self.awaiting_head.load(Ordering::Relaxed) == 0
            && self.open_bodies.load(Ordering::Relaxed) == 0
            && self.open_request_bodies.load(Ordering::Relaxed) == 0
            && !self.draining.load(Ordering::Relaxed)
            && !self.reading_message.load(Ordering::Relaxed)
            && !self.unflushed.load(Ordering::Relaxed)
    }

    /// hyper went idle between messages and nothing was read since (see [`Tracked`]'s reads):
    /// a read found nothing while nothing was in flight, or one found nothing earlier and
    /// everything in flight then has finished.
    pub(super) fn between_messages(&self) -> bool {
        self.between_messages.load(Ordering::Relaxed)
            || (self.read_waiting.load(Ordering::Relaxed) && self.quiescent())
    }

    /// A new hyper connection starts on the socket; `unread`: the last one left bytes it read
    /// but did not use (the start of a head). Nothing of the last one is draining.
    pub(super) fn new_parser(&self, unread: bool) {
        self.draining.store(false, Ordering::Relaxed);
        self.read_waiting.store(false, Ordering::Relaxed);
        self.reading_message.store(false, Ordering::Relaxed);
        if unread {
            // The head's first bytes came earlier; timing it from now only errs on the long side.
            self.read();
        }
        self.between_messages.store(false, Ordering::Relaxed);
    }

    fn touch(&self) -> u64 {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.last_millis.store(now, Ordering::Relaxed);
        now
    }

    /// Bytes arrived: the first after a complete message starts the next one.
    fn read(&self) {
        self.read_waiting.store(false, Ordering::Relaxed);
        let now = self.touch();
        if !self.reading_message.load(Ordering::Relaxed) {
            self.reading_message.store(true, Ordering::Relaxed);
            self.message_started_millis.store(now, Ordering::Relaxed);
        }
    }

    /// How long the request head being read has left of `limit` at `now`; `None` when no head
    /// is being read. A head is what arrives once no request is waiting for its response head
    /// and no request body is being read (a response body may still be going out: pipelining).
    pub(super) fn head_time_left(&self, now: Instant, limit: Duration) -> Option<Duration> {
        let reading_head = self.reading_message.load(Ordering::Relaxed)
            && self.awaiting_head.load(Ordering::Relaxed) == 0
            && self.open_request_bodies.load(Ordering::Relaxed) == 0;
        if !reading_head {
            return None;
        }
        let started = Duration::from_millis(self.message_started_millis.load(Ordering::Relaxed));
        let reading_for = now
            .saturating_duration_since(self.epoch)
            .saturating_sub(started);
        Some(limit.saturating_sub(reading_for))
    }

    fn wrote(&self) {
        self.touch();
        self.unflushed.store(true, Ordering::Relaxed);
    }

    pub(super) fn quiet_for(&self) -> Duration {
        self.quiet_at(Instant::now())
    }

    /// How long the connection had been quiet at `now`.
    pub(super) fn quiet_at(&self, now: Instant) -> Duration {
        let last = Duration::from_millis(self.last_millis.load(Ordering::Relaxed));
        now.saturating_duration_since(self.epoch)
            .saturating_sub(last)
    }

    /// Something is in flight: a request waiting for its response head, an open body, or a
    /// half-read message.
    pub(super) fn busy(&self) -> bool {
        self.awaiting_head.load(Ordering::Relaxed) != 0
            || self.open_bodies.load(Ordering::Relaxed) != 0
            || self.reading_message.load(Ordering::Relaxed)
    }

    /// No request waits for its response head and no bytes moved for `idle_timeout`. A
    /// response body that stalls that long counts as idle too.
    pub(super) fn is_idle(&self, idle_timeout: Duration) -> bool {
        self.awaiting_head.load(Ordering::Relaxed) == 0 && self.quiet_for() >= idle_timeout
    }

    /// Nothing in flight at all, bodies and half-read heads included, and quiet for `after`.
    pub(super) fn is_at_rest(&self, after: Duration) -> bool {
        !self.busy() && self.quiet_for() >= after
    }

    /// How long until the connection has been quiet for `period`.
    pub(super) fn until_quiet(&self, period: Duration) -> Duration {
        period.saturating_sub(self.quiet_for())
    }
}

/// Counts a request from its arrival until its response head is ready.
pub(super) struct AwaitingHead(Arc<Activity>);

impl AwaitingHead {
    pub(super) fn new(activity: Arc<Activity>) -> Self {
        activity.awaiting_head.fetch_add(1, Ordering::Relaxed);
        activity.progressed();
        // The head is complete; any body reads will mark the message as being read again.
        activity.reading_message.store(false, Ordering::Relaxed);
        AwaitingHead(activity)
    }
}

impl Drop for AwaitingHead {
    fn drop(&mut self) {
        self.0.awaiting_head.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// Counts a response body until hyper has sent all of it (or given up on it).
pub(super) struct OpenBody(pub(super) Arc<Activity>);

impl OpenBody {
    pub(super) fn new(activity: Arc<Activity>) -> Self {
        activity.open_bodies.fetch_add(1, Ordering::Relaxed);
        OpenBody(activity)
    }
}

impl Drop for OpenBody {
    fn drop(&mut self) {
        self.0.open_bodies.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// Counts a request body until it has been read to its end; one dropped before that marks the
/// connection as draining.
pub(super) struct OpenRequestBody {
    pub(super) activity: Arc<Activity>,
    finished: bool,
}

impl OpenRequestBody {
    pub(super) fn new(activity: Arc<Activity>) -> Self {
        activity.open_request_bodies.fetch_add(1, Ordering::Relaxed);
        OpenRequestBody {
            activity,
            finished: false,
        }
    }

    pub(super) fn finish(&mut self) {
        self.finished = true;
        self.activity
            .reading_message
            .store(false, Ordering::Relaxed);
    }
}

impl Drop for OpenRequestBody {
    fn drop(&mut self) {
        if !self.finished {
            self.activity.draining.store(true, Ordering::Relaxed);
        }
        self.activity
            .open_request_bodies
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// An IO that records activity on every read and write, and notices when hyper goes idle
/// between messages.
pub(super) struct Tracked<I> {
    pub(super) inner: I,
    pub(super) activity: Arc<Activity>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Tracked<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.read();
        } else if result.is_pending() {
            let activity = &self.activity;
            activity.read_waiting.store(true, Ordering::Relaxed);
            if activity.quiescent() {
                activity.between_messages.store(true, Ordering::Relaxed);
            }
        }
        result
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Tracked<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &result {
            if *n > 0 {
                self.activity.wrote();
            }
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &result {
            if *n > 0 {
                self.activity.wrote();
            }
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        if let Poll::Ready(Ok(())) = result {
            self.activity.unflushed.store(false, Ordering::Relaxed);
        }
        result
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// An IO whose first reads return `prefix`: bytes a previous reader took off the socket but
/// did not use.
pub(super) struct Rewind<I> {
    prefix: Bytes,
    inner: I,
}

impl<I> Rewind<I> {
    pub(super) fn new(prefix: Bytes, inner: I) -> Self {
        Rewind { prefix, inner }
    }

    pub(super) fn has_unread(&self) -> bool {
        !self.prefix.is_empty()
    }

    /// The IO, and whatever of the prefix was not read yet.
    pub(super) fn into_parts(self) -> (Bytes, I) {
        (self.prefix, self.inner)
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn rewind_reads_the_prefix_before_the_stream() {
        let (mut client, server) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut client, b" world")
            .await
            .unwrap();
        drop(client);
        let mut io = Rewind::new(Bytes::from_static(b"hello"), server);
        let mut small = [0u8; 3];
        io.read_exact(&mut small).await.unwrap();
        assert_eq!(&small, b"hel");
        let mut rest = Vec::new();
        io.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"lo world");
    }

    #[test]
    fn at_rest_needs_no_head_pending_no_body_open_and_quiet() {
        let activity = Arc::new(Activity::new());
        assert!(activity.is_at_rest(Duration::ZERO));
        let head = AwaitingHead::new(activity.clone());
        assert!(!activity.is_at_rest(Duration::ZERO));
        assert!(!activity.is_idle(Duration::ZERO));
        let body = OpenBody::new(activity.clone());
        drop(head);
        // A body still being sent keeps the connection from resting, not from idling out.
        assert!(!activity.is_at_rest(Duration::ZERO));
        assert!(activity.is_idle(Duration::ZERO));
        drop(body);
        assert!(activity.is_at_rest(Duration::ZERO));
        assert!(!activity.is_at_rest(Duration::from_secs(3600)));
    }
}
