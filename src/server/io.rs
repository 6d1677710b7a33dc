//! What a connection's socket is, the record of an HTTP/2 connection's activity (for its idle
//! check), and a way to hand bytes that were already read back to the next reader.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::Body;

/// A client's byte stream: plain TCP or TLS over TCP.
pub(super) trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Ready when the client has sent something (or closed): the socket is readable.
    fn poll_client_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// Makes dropping the socket reset the connection rather than close it.
    fn reset_on_drop(&self);
}

impl Transport for TcpStream {
    fn poll_client_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_read_ready(cx)
    }

    fn reset_on_drop(&self) {
        let _ = self.set_zero_linger();
    }
}

impl Transport for TlsStream<TcpStream> {
    fn poll_client_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Nothing decrypted waits inside: a connection only rests after the reader has drained
        // everything the socket had.
        self.get_ref().0.poll_read_ready(cx)
    }

    fn reset_on_drop(&self) {
        let _ = self.get_ref().0.set_zero_linger();
    }
}

/// What an HTTP/2 connection's idle check reads: how many of its requests wait for a response
/// head with their body all arrived (the upstream is working on them), and a count of requests
/// started and body frames moved (what HTTP/2 counts as use, where bytes alone, such as PINGs or
/// a HEADERS frame sent a byte at a time, are not).
pub(super) struct Activity {
    awaiting_head: AtomicUsize,
    progress: AtomicU64,
    /// Requests the client reset before their response head, as a leaky bucket: the level
    /// and when it was last raised.
    early_resets: Mutex<(f64, Instant)>,
    /// Told once the level reaches [`EARLY_RESET_BURST`].
    reset_too_often: tokio::sync::Notify,
    /// The connection's response bodies under way, each with when it was last seen polled.
    responses: Mutex<Responses>,
}

/// The response bodies under a connection's stall check, by id: each leaves it when it ends,
/// so the table holds the streams under way, however many came and went.
#[derive(Default)]
struct Responses {
    next_id: u64,
    flows: std::collections::HashMap<u64, (Weak<ResponseFlow>, Instant)>,
}

/// An HTTP/2 response body as its connection's stall check sees it. hyper takes the body's next
/// frame only once the client's window for the stream has let the last one through: a client
/// that never opens it holds the body, and the upstream connection under it, for as long as
/// its connection stays busy with other streams. So a body handed a frame out and not polled
/// again for `idle_timeout` is taken away ([`Activity::end_stalled_responses`]).
pub(super) struct ResponseFlow {
    /// The body and what is left of its last data frame; `None` once taken away.
    body: Mutex<Option<(Body, Bytes)>>,
    /// Polled since the stall check last looked.
    polled: AtomicBool,
    /// The last poll handed a frame out: the next is up to the client.
    handed_out: AtomicBool,
}

impl ResponseFlow {
    pub(super) fn new(body: Body) -> Self {
        ResponseFlow {
            body: Mutex::new(Some((body, Bytes::new()))),
            polled: AtomicBool::new(false),
            handed_out: AtomicBool::new(false),
        }
    }

    /// The body and what is left of its last data frame; `None` once taken away.
    pub(super) fn body(&self) -> MutexGuard<'_, Option<(Body, Bytes)>> {
        self.body.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a poll and whether it handed a frame out (rather than waiting for the upstream).
    pub(super) fn polled(&self, handed_out: bool) {
        self.polled.store(true, Ordering::Relaxed);
        self.handed_out.store(handed_out, Ordering::Relaxed);
    }
}

/// How many requests a client may reset before their response head at once; beyond that,
/// [`EARLY_RESETS_PER_SECOND`]. Each such request was still handed to the upstream, which goes
/// on working on it: a client that resets them faster is flooding the backend through
/// portcullis with work it never reads (CVE-2023-44487 on the far side of the proxy), and its
/// connection is closed. Counted against time, not against the requests it lets finish: cheap
/// requests answered by portcullis itself would otherwise buy room for any number of resets.
pub(super) const EARLY_RESET_BURST: f64 = 100.0;
pub(super) const EARLY_RESETS_PER_SECOND: f64 = 10.0;

impl Activity {
    pub(super) fn new() -> Self {
        Activity {
            awaiting_head: AtomicUsize::new(0),
            progress: AtomicU64::new(0),
            early_resets: Mutex::new((0.0, Instant::now())),
            reset_too_often: tokio::sync::Notify::new(),
            responses: Mutex::new(Responses::default()),
        }
    }

    /// One more request reset before its answer, at `now`.
    fn note_early_reset(&self, now: Instant) {
        let mut bucket = self
            .early_resets
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (level, since) = &mut *bucket;
        let leaked = now.saturating_duration_since(*since).as_secs_f64() * EARLY_RESETS_PER_SECOND;
        *level = (*level - leaked).max(0.0) + 1.0;
        *since = now;
        if *level >= EARLY_RESET_BURST {
            self.reset_too_often.notify_one();
        }
    }

    fn responses(&self) -> MutexGuard<'_, Responses> {
        self.responses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Puts a response body under the stall check until [`Activity::unwatch_response`] with
    /// the id returned.
    pub(super) fn watch_response(&self, flow: &Arc<ResponseFlow>) -> u64 {
        let mut responses = self.responses();
        let id = responses.next_id;
        responses.next_id += 1;
        responses
            .flows
            .insert(id, (Arc::downgrade(flow), Instant::now()));
        id
    }

    /// The response body ended or was dropped.
    pub(super) fn unwatch_response(&self, id: u64) {
        let mut responses = self.responses();
        responses.flows.remove(&id);
    }

    #[cfg(test)]
    pub(super) fn watched_responses(&self) -> usize {
        self.responses().flows.len()
    }

    /// Takes away each response body that handed a frame out and has not been polled for
    /// `limit`; forgets those that ended. How many were taken away.
    pub(super) fn end_stalled_responses(&self, limit: Duration) -> usize {
        let mut stalled = Vec::new();
        let now = Instant::now();
        {
            let mut responses = self.responses();
            responses.flows.retain(|_, (flow, seen)| {
                let Some(flow) = flow.upgrade() else {
                    return false;
                };
                if flow.polled.swap(false, Ordering::Relaxed) {
                    *seen = now;
                    true
                } else if flow.handed_out.load(Ordering::Relaxed) && now - *seen >= limit {
                    stalled.push(flow);
                    false
                } else {
                    true
                }
            });
        }
        // Dropped outside the lock: each closes an upstream connection.
        for flow in &stalled {
            let body = flow.body().take();
            drop(body);
        }
        stalled.len()
    }

    /// Ready once the client has reset too many requests before their answers (see
    /// [`EARLY_RESET_BURST`]).
    pub(super) async fn reset_too_often(&self) {
        self.reset_too_often.notified().await;
    }

    /// A request started, or a body frame moved.
    pub(super) fn progressed(&self) {
        self.progress.fetch_add(1, Ordering::Relaxed);
    }

    /// Changes whenever [`Activity::progressed`] is called.
    pub(super) fn progress(&self) -> u64 {
        self.progress.load(Ordering::Relaxed)
    }

    /// A request has all arrived and waits for its response head: the upstream is working on
    /// it, under `upstream.request_timeout`. A request whose body is still arriving is not
    /// counted: its body frames are its progress, so an upload that stalls leaves the
    /// connection idle.
    pub(super) fn awaiting_head(&self) -> bool {
        self.awaiting_head.load(Ordering::Relaxed) != 0
    }
}

/// One request's place in [`Activity::awaiting_head`]: counted from when its body has all
/// arrived (or been let go) until its response head is ready (or the response is dropped),
/// whichever order the two come in. Shared by the request's body and its response.
pub(super) struct Exchange {
    activity: Arc<Activity>,
    state: AtomicU8,
}

const BODY_IN: u8 = 1;
const HEAD_OUT: u8 = 2;

impl Exchange {
    /// A request started; `body_in` when it has no body to wait for.
    pub(super) fn start(activity: Arc<Activity>, body_in: bool) -> Self {
        activity.progressed();
        let exchange = Exchange {
            activity,
            state: AtomicU8::new(0),
        };
        if body_in {
            exchange.body_in();
        }
        exchange
    }

    /// The request's body has all arrived, or is no longer read. Idempotent.
    pub(super) fn body_in(&self) {
        let before = self.state.fetch_or(BODY_IN, Ordering::Relaxed);
        if before == 0 {
            self.activity.awaiting_head.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The response head is ready, or the response was dropped. Idempotent.
    pub(super) fn head_out(&self) {
        let before = self.state.fetch_or(HEAD_OUT, Ordering::Relaxed);
        if before == BODY_IN {
            self.activity.awaiting_head.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The client reset the request before its response head was ready.
    pub(super) fn reset_early(&self) {
        self.activity.note_early_reset(Instant::now());
    }

    pub(super) fn activity(&self) -> &Arc<Activity> {
        &self.activity
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
    fn a_request_without_a_body_awaits_its_head_until_the_head_is_ready() {
        let activity = Arc::new(Activity::new());
        let before = activity.progress();
        let exchange = Exchange::start(activity.clone(), true);
        assert!(activity.awaiting_head());
        assert_ne!(activity.progress(), before, "a request started is progress");
        exchange.head_out();
        assert!(!activity.awaiting_head());
        exchange.head_out();
        exchange.body_in();
        assert!(!activity.awaiting_head(), "each step counts once");
    }

    #[test]
    fn a_request_with_a_body_awaits_its_head_only_once_the_body_is_in() {
        let activity = Arc::new(Activity::new());
        let uploading = Exchange::start(activity.clone(), false);
        assert!(
            !activity.awaiting_head(),
            "an upload is judged by its frames"
        );
        uploading.body_in();
        assert!(activity.awaiting_head());
        uploading.body_in();
        uploading.head_out();
        assert!(!activity.awaiting_head());

        // An early answer: the head goes out while the body is still arriving.
        let early = Exchange::start(activity.clone(), false);
        early.head_out();
        early.body_in();
        assert!(!activity.awaiting_head());
    }

    /// Whether the client's resets so far would close the connection.
    fn closes(activity: &Activity) -> bool {
        use futures_util::FutureExt;
        activity.reset_too_often().now_or_never().is_some()
    }

    #[test]
    fn a_connection_closes_once_early_resets_outrun_their_allowance() {
        let activity = Activity::new();
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        // 99 at once, and 99 more ten seconds later, when the first are forgotten.
        for _ in 0..99 {
            activity.note_early_reset(at(0));
        }
        for _ in 0..99 {
            activity.note_early_reset(at(10));
        }
        assert!(!closes(&activity));
        // Ten a second, for long: left alone.
        for n in 0..1000 {
            activity.note_early_reset(at(30) + Duration::from_millis(100 * n));
        }
        assert!(!closes(&activity));
        // A hundred at once: closed.
        let activity = Activity::new();
        for _ in 0..100 {
            activity.note_early_reset(at(0));
        }
        assert!(closes(&activity));
    }

    #[test]
    fn only_a_response_waiting_on_its_client_is_ended_when_it_stalls() {
        let activity = Activity::new();
        let body = || Body::new(http_body_util::Empty::<Bytes>::new());
        let waiting_on_client = Arc::new(ResponseFlow::new(body()));
        let waiting_on_upstream = Arc::new(ResponseFlow::new(body()));
        let reading = Arc::new(ResponseFlow::new(body()));
        for flow in [&waiting_on_client, &waiting_on_upstream, &reading] {
            activity.watch_response(flow);
        }
        waiting_on_client.polled(true);
        waiting_on_upstream.polled(false);
        // The first look sees each polled since it was put under watch.
        assert_eq!(activity.end_stalled_responses(Duration::ZERO), 0);
        reading.polled(true);
        assert_eq!(activity.end_stalled_responses(Duration::ZERO), 1);
        assert!(waiting_on_client.body().is_none());
        assert!(waiting_on_upstream.body().is_some());
        assert!(reading.body().is_some());
        // One that ended is forgotten.
        drop(reading);
        activity.end_stalled_responses(Duration::from_secs(60));
        assert_eq!(activity.responses().flows.len(), 1);
    }
}
