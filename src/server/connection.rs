//! One client connection on a worker: TLS handshake (ALPN picks h2 or http/1.1) or plain-text
//! protocol detection (HTTP/2 prior knowledge or HTTP/1.1), then hyper serving the app's tower
//! stack. Every stage before the request head is bounded by `server.header_read_timeout`; idle
//! connections are closed after `server.idle_timeout`.
//!
//! An HTTP/1.1 connection at rest gives its hyper state back: after [`REST_AFTER`] with
//! nothing in flight, hyper stops at the message boundary and returns the socket, which then
//! waits for the client's next byte holding no buffers. A new hyper connection takes over when
//! it comes. Ten thousand idle game clients so cost their sockets and a small task each, not ten
//! thousand sets of read and write buffers. The same hand-back is how upgrades work: hyper
//! writes the 101 and returns the socket, and the tunnel runs on it in this task.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Request, Response};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::error::Elapsed;
use tokio_rustls::TlsAcceptor;
use tower::Service;

use super::io::{Activity, AwaitingHead, OpenBody, OpenRequestBody, Rewind, Tracked, Transport};
use super::{
    ConnCounts, ConnLimits, RestingGuard, IDLE_CLOSE_GRACE, MAX_HEADERS, REST_AFTER, REST_FALLBACK,
};
use crate::app::AppService;
use crate::facts::RequestFacts;
use crate::forward::{wants_upgrade, UpgradeHandoff};
use crate::peer::ConnInfo;
use crate::Body;

pub(super) struct Connection {
    /// The connection's own copy of the stack (see [`ConnService`]).
    pub(super) app: Arc<std::sync::Mutex<AppService>>,
    pub(super) tls: Option<TlsAcceptor>,
    /// Shared by the worker's connections.
    pub(super) limits: Arc<ConnLimits>,
    pub(super) peer: SocketAddr,
    pub(super) stop: watch::Receiver<bool>,
    pub(super) counts: Arc<ConnCounts>,
}

enum Protocol {
    Http1,
    Http2,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Longest wait for a client to take our FIN or TLS close_notify.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

impl Connection {
    /// Serves the connection to its end.
    ///
    /// The task lives as long as its client does, idle ones included, so its size is memory
    /// per connection: the stages that come once and are large (the TLS handshake and TLS
    /// state, protocol detection, HTTP/2) are boxed, leaving inline what a resting HTTP/1.1
    /// connection needs.
    pub(super) async fn run(mut self, stream: TcpStream) {
        match self.tls.clone() {
            Some(acceptor) => Box::pin(self.serve_tls(acceptor, stream)).await,
            None => {
                let Some(protocol) = Box::pin(self.detect_protocol(&stream)).await else {
                    return;
                };
                self.serve(stream, protocol, false).await;
            }
        }
    }

    async fn serve_tls(&mut self, acceptor: TlsAcceptor, stream: TcpStream) {
        let deadline = self.limits.header_read_timeout;
        // A client that has not finished its handshake when the server stops has sent no
        // request: it is closed, not waited for.
        let tls = match unless_stopped(&self.stop, deadline, acceptor.accept(stream)).await {
            None => return,
            Some(Ok(Ok(tls))) => tls,
            Some(Ok(Err(e))) => {
                tracing::debug!(peer = %self.peer, error = %e, "TLS handshake failed");
                return;
            }
            Some(Err(_)) => {
                tracing::debug!(peer = %self.peer, "TLS handshake timed out");
                return;
            }
        };
        let protocol = match tls.get_ref().1.alpn_protocol() {
            Some(b"h2") => Protocol::Http2,
            _ => Protocol::Http1,
        };
        self.serve(tls, protocol, true).await;
    }

    /// The protocol a plain-text client speaks, or `None` when the connection should close: it
    /// closed or sent nothing in time, or the server stops (a client that has sent nothing yet
    /// is not waited for).
    async fn detect_protocol(&self, stream: &TcpStream) -> Option<Protocol> {
        let deadline = self.limits.header_read_timeout;
        match unless_stopped(&self.stop, deadline, detect(stream)).await {
            Some(Ok(Ok(protocol))) => protocol,
            _ => None,
        }
    }

    async fn serve<I: Transport>(&mut self, io: I, protocol: Protocol, tls: bool) {
        let activity = Arc::new(Activity::new());
        let io = Tracked {
            inner: io,
            activity: activity.clone(),
        };
        let service = ConnService {
            app: self.app.clone(),
            conn: ConnInfo {
                peer: self.peer,
                tls,
            },
            activity,
            upgrades: UpgradeHandoff::default(),
        };
        match protocol {
            Protocol::Http1 => self.serve_http1(io, &service).await,
            Protocol::Http2 => {
                let activity = service.activity.clone();
                let conn = http2_builder(&self.limits).serve_connection(TokioIo::new(io), service);
                let drive = drive_http2(
                    conn,
                    |c| c.graceful_shutdown(),
                    activity,
                    &self.limits,
                    self.stop.clone(),
                );
                Box::pin(drive).await;
            }
        }
    }

    /// Serves HTTP/1.1 requests, resting between them when the client goes quiet, until the
    /// connection closes or upgrades.
    async fn serve_http1<I: Transport>(&mut self, io: Tracked<I>, service: &ConnService) {
        let activity = &service.activity;
        let mut io = Rewind::new(Bytes::new(), io);
        loop {
            activity.new_parser(io.has_unread());
            // Boxed, so that a resting connection's task holds only a pointer's worth of it.
            let conn = Box::new(
                http1_builder(&self.limits).serve_connection(TokioIo::new(io), service.clone()),
            );
            // The driving future, timers included, lives only while hyper does.
            let drive = drive_http1(conn, activity, &self.limits, &self.stop);
            let (conn, end) = Box::pin(drive).await;
            let rest = match end {
                Http1End::Failed(e) => {
                    tracing::debug!(error = %e, "connection ended with an error");
                    return;
                }
                Http1End::HeadTimedOut => {
                    tracing::debug!("request head not complete within header_read_timeout");
                    return;
                }
                Http1End::IdleTimedOut => {
                    tracing::debug!("idle connection did not finish its exchange; dropped");
                    return;
                }
                Http1End::Closed => false,
                Http1End::Resting => true,
            };
            let (unread, mut tracked) = take_socket(*conn);
            if let Some(tunnel) = service.upgrades.take() {
                let client = Rewind::new(unread, tracked);
                Box::pin(tunnel.run(client, stopped(self.stop.clone()))).await;
                return;
            }
            if !rest || (unread.is_empty() && !self.wait_for_client(&tracked, activity).await) {
                close(&mut tracked).await;
                return;
            }
            io = Rewind::new(unread, tracked);
        }
    }

    /// A resting connection waits here for its client's next byte. False when it should close
    /// instead: quiet past the keep-alive limit, shutting down, or a broken socket.
    async fn wait_for_client<I: Transport>(
        &mut self,
        io: &Tracked<I>,
        activity: &Activity,
    ) -> bool {
        // hyper closes a kept-alive connection whose next request head does not arrive within
        // header_read_timeout; a resting one keeps the same limit (and idle_timeout).
        let limit = self
            .limits
            .header_read_timeout
            .min(self.limits.idle_timeout);
        if *self.stop.borrow() {
            return false;
        }
        let _resting = RestingGuard::new(&self.counts);
        tokio::select! {
            ready = std::future::poll_fn(|cx| io.inner.poll_client_ready(cx)) => ready.is_ok(),
            _ = tokio::time::sleep(activity.until_quiet(limit)) => false,
            _ = self.stop.changed() => false,
        }
    }
}

/// A new HTTP/1.1 parser's settings. Built for each parser rather than kept, so that a resting
/// connection does not hold them.
fn http1_builder(limits: &ConnLimits) -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        // No timer: the connection's own check enforces header_read_timeout (see
        // `drive_http1`), as hyper's would cost an allocation and a timer entry per request.
        .header_read_timeout(None::<Duration>)
        .max_buf_size(limits.hard_header_cap())
        .max_headers(MAX_HEADERS)
        // One buffer per write: a small response goes out in one `write` instead of a
        // `writev` of head and body, which measured 2% fewer instructions per proxied request
        // and less kernel time (bench/HISTORY.md). A body is copied into the buffer, which
        // takes chunks while it holds less than `max_buf_size`, about what the queue of
        // chunks would otherwise hold by reference.
        .writev(false);
    builder
}

fn http2_builder(limits: &ConnLimits) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_header_list_size(limits.hard_header_cap().try_into().unwrap_or(u32::MAX))
        .max_concurrent_streams(256);
    builder
}

/// Takes the socket back from a finished hyper connection, with the bytes hyper read from it
/// but did not use. Everything else of hyper's goes, its read buffer included: an empty `Bytes`
/// that still pointed into that buffer would keep all of it alive while the connection rests.
fn take_socket<I: Transport>(conn: Http1Conn<I>) -> (Bytes, Tracked<I>) {
    let hyper::server::conn::http1::Parts { io, read_buf, .. } = conn.into_parts();
    let (prefix, tracked) = io.into_inner().into_parts();
    // hyper read `prefix` (if it read anything) before what it returns as unread.
    let unread = match (read_buf.is_empty(), prefix.is_empty()) {
        (true, true) => Bytes::new(),
        (true, false) => prefix,
        (false, true) => read_buf,
        (false, false) => {
            let mut joined = BytesMut::from(read_buf);
            joined.extend_from_slice(&prefix);
            joined.freeze()
        }
    };
    (unread, tracked)
}

/// How a run of hyper's HTTP/1.1 connection ended.
enum Http1End {
    /// At a message boundary, at our request: the socket can rest and carry on.
    Resting,
    /// hyper is done with the socket (the client closed, `Connection: close`, an upgrade, or we
    /// asked it to stop after the current exchange).
    Closed,
    Failed(hyper::Error),
    /// A request head took longer than `header_read_timeout`: the connection is dropped, as
    /// hyper's own header timer would.
    HeadTimedOut,
    /// Asked to close for idleness, it did not finish within [`IDLE_CLOSE_GRACE`] (a client
    /// that reads no more of its response): the connection is dropped.
    IdleTimedOut,
}

type Http1Conn<I> =
    hyper::server::conn::http1::Connection<TokioIo<Rewind<Tracked<I>>>, ConnService>;

/// Runs hyper on the connection until it is done with the socket, asking it to stop when the
/// server shuts down, when the connection has been idle for `idle_timeout`, or, to let the
/// connection rest, once nothing has been in flight for [`REST_AFTER`]. A request head still
/// incomplete `header_read_timeout` after its first byte ends the connection.
async fn drive_http1<I: Transport>(
    mut conn: Box<Http1Conn<I>>,
    activity: &Activity,
    limits: &ConnLimits,
    stop: &watch::Receiver<bool>,
) -> (Box<Http1Conn<I>>, Http1End) {
    let mut closing = *stop.borrow();
    if closing {
        Pin::new(&mut *conn).graceful_shutdown();
    }
    let mut check = CheckTimer::new(next_check(activity, limits));
    let mut stopping = StopSignal::new(stop);
    // Set when idleness asked hyper to close: past it, the connection is dropped.
    let mut give_up: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            // hyper first. A stop already sent is passed to hyper before each of its polls;
            // the stop branch wakes the task for one sent while hyper waits.
            biased;
            event = std::future::poll_fn(|cx| {
                // A stop that came with this wake-up (the task may be woken for the upstream's
                // answer before it looks at the signal) is passed on before hyper writes the
                // response, so that the response says the connection ends.
                if !closing && !matches!(stop.has_changed(), Ok(false)) {
                    closing = true;
                    Pin::new(&mut *conn).graceful_shutdown();
                }
                if let Poll::Ready(result) = conn.poll_without_shutdown(cx) {
                    return Poll::Ready(Some(result));
                }
                if closing {
                    return Poll::Pending;
                }
                // hyper's reads may just have shown it idle: bring the check forward, so the
                // connection rests REST_AFTER after its last exchange, not a second later.
                let due = next_check(activity, limits);
                if due + Duration::from_millis(1) < check.deadline() {
                    check.reset(due);
                }
                check.poll(cx).map(|()| None)
            }) => {
                let Some(result) = event else {
                    let now = std::time::Instant::now();
                    let head_left = activity.head_time_left(now, limits.header_read_timeout);
                    if head_left == Some(Duration::ZERO) {
                        return (conn, Http1End::HeadTimedOut);
                    }
                    if activity.is_idle(limits.idle_timeout) {
                        closing = true;
                        give_up = Some(tokio::time::Instant::now() + IDLE_CLOSE_GRACE);
                        Pin::new(&mut *conn).graceful_shutdown();
                    } else if activity.is_at_rest(REST_AFTER)
                        && (activity.between_messages() || activity.is_at_rest(REST_FALLBACK))
                    {
                        // Without the reads showing hyper idle (after a request body it had
                        // to drain, say), only after the longer fallback, and it may then close.
                        match rest(&mut conn).await {
                            Some(end) => return (conn, end),
                            None => closing = true,
                        }
                    }
                    check.reset(next_check(activity, limits));
                    continue;
                };
                let end = match result {
                    Ok(()) => Http1End::Closed,
                    Err(e) => Http1End::Failed(e),
                };
                return (conn, end);
            }
            () = std::future::poll_fn(|cx| stopping.poll_stopped(cx)), if !closing => {
                closing = true;
                Pin::new(&mut *conn).graceful_shutdown();
            }
            // hyper's graceful close waits for the response in flight, which a client that
            // reads nothing more never lets finish.
            () = sleep_until_some(give_up) => return (conn, Http1End::IdleTimedOut),
        }
    }
}

/// Sleeps until `deadline`; never resolves without one.
async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The waker a future was last polled with. A future polled again with the same waker (the same
/// task) and told of nothing new need not be polled: it will wake the task itself.
#[derive(Default)]
struct LastWaker(Option<std::task::Waker>);

impl LastWaker {
    /// The last poll was by this task.
    fn is_this_task(&self, cx: &Context<'_>) -> bool {
        self.0.as_ref().is_some_and(|w| w.will_wake(cx.waker()))
    }

    /// Polls `future`, remembering the waker it now holds.
    fn poll<F: Future + ?Sized>(
        &mut self,
        future: Pin<&mut F>,
        cx: &mut Context<'_>,
    ) -> Poll<F::Output> {
        self.0 = Some(cx.waker().clone());
        future.poll(cx)
    }

    fn forget(&mut self) {
        self.0 = None;
    }
}

/// The timer of a connection's next check, polled each time the connection's task wakes.
/// Polling tokio's timer registers the waker again every time; this skips the poll while the
/// timer is set, has not fired, and already holds this task's waker.
struct CheckTimer {
    sleep: Pin<Box<tokio::time::Sleep>>,
    /// Since the timer was last set.
    last_waker: LastWaker,
}

impl CheckTimer {
    fn new(deadline: tokio::time::Instant) -> Self {
        CheckTimer {
            sleep: Box::pin(tokio::time::sleep_until(deadline)),
            last_waker: LastWaker::default(),
        }
    }

    fn deadline(&self) -> tokio::time::Instant {
        self.sleep.deadline()
    }

    fn reset(&mut self, deadline: tokio::time::Instant) {
        self.sleep.as_mut().reset(deadline);
        // A timer that had fired gave its waker away: the next poll must register one.
        self.last_waker.forget();
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.last_waker.is_this_task(cx) && !self.sleep.is_elapsed() {
            return Poll::Pending;
        }
        self.last_waker.poll(self.sleep.as_mut(), cx)
    }
}

/// The server's stop signal, looked at each time a connection's task wakes. Polling tokio's
/// watch takes a lock to register the waker again every time; this registers it only when the
/// task's waker changed, and otherwise reads the signal's version.
struct StopSignal {
    probe: watch::Receiver<bool>,
    stopped: Pin<Box<dyn Future<Output = ()> + Send>>,
    last_waker: LastWaker,
}

impl StopSignal {
    fn new(stop: &watch::Receiver<bool>) -> Self {
        StopSignal {
            probe: stop.clone(),
            stopped: Box::pin(stopped(stop.clone())),
            last_waker: LastWaker::default(),
        }
    }

    /// Ready once the server stops (or its signal is gone); keeps being ready after.
    fn poll_stopped(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let unchanged = matches!(self.probe.has_changed(), Ok(false));
        if unchanged && self.last_waker.is_this_task(cx) {
            // The waker `stopped` holds is this task's: a stop will wake it.
            return Poll::Pending;
        }
        self.probe.mark_unchanged();
        self.last_waker.poll(self.stopped.as_mut(), cx)
    }
}

/// When a connection should next be looked at: to rest, to close for idleness, or when the
/// request head being read runs out of time. With something in flight, in a second: a
/// long-poll request must not wake its connection every few milliseconds.
///
/// Called on every poll that leaves hyper waiting, so it reads the clock once.
fn next_check(activity: &Activity, limits: &ConnLimits) -> tokio::time::Instant {
    let now = std::time::Instant::now();
    let quiet = activity.quiet_at(now);
    let rest_in = if activity.busy() {
        Duration::from_secs(1)
    } else if activity.between_messages() {
        REST_AFTER.saturating_sub(quiet)
    } else {
        REST_FALLBACK.saturating_sub(quiet)
    };
    let head_left = activity
        .head_time_left(now, limits.header_read_timeout)
        .unwrap_or(Duration::MAX);
    let wait = rest_in
        .min(limits.idle_timeout.saturating_sub(quiet))
        .min(head_left)
        .max(Duration::from_millis(10));
    tokio::time::Instant::from_std(now + wait)
}

/// Asks hyper to stop at the message boundary it is at. Idle, it closes its side at once and is
/// done on the next poll. If it is still reading or writing something (a request body it
/// drains, say), it finishes that and then closes, and so do we: `None`.
async fn rest<I: Transport>(conn: &mut Http1Conn<I>) -> Option<Http1End> {
    Pin::new(&mut *conn).graceful_shutdown();
    match std::future::poll_fn(|cx| Poll::Ready(conn.poll_without_shutdown(cx))).await {
        Poll::Ready(Ok(())) => Some(Http1End::Resting),
        Poll::Ready(Err(e)) => Some(Http1End::Failed(e)),
        Poll::Pending => None,
    }
}

/// Runs an HTTP/2 connection to completion, starting a graceful shutdown of it when the server
/// stops or when it has been idle for `idle_timeout` (`header_read_timeout` before its first
/// request), and dropping it [`IDLE_CLOSE_GRACE`] after an idle shutdown that did not finish.
///
/// Idle is judged by streams, not bytes: PINGs, or a HEADERS frame sent a byte at a time, move
/// bytes without making any request, and would otherwise hold a connection (and its slot under
/// `server.max_connections`) for ever. A request waiting for its response head is not idle;
/// a response (or request) body that moves no frame for `idle_timeout` is.
async fn drive_http2<C>(
    conn: C,
    graceful_shutdown: impl Fn(Pin<&mut C>),
    activity: Arc<Activity>,
    limits: &ConnLimits,
    mut stop: watch::Receiver<bool>,
) where
    C: Future<Output = Result<(), hyper::Error>>,
{
    use tokio::time::Instant;
    tokio::pin!(conn);
    let mut closing = *stop.borrow();
    if closing {
        graceful_shutdown(conn.as_mut());
    }
    let mut seen = activity.progress();
    // When a look last found progress: the idle time is known to within the look interval, a
    // quarter of the limit (reading the clock on every request would cost every request).
    let mut quiet_since = Instant::now();
    let mut limit = limits.header_read_timeout;
    let mut give_up: Option<Instant> = None;
    loop {
        let look = (limit / 4).max(Duration::from_millis(10));
        let check = give_up.unwrap_or_else(|| (Instant::now() + look).min(quiet_since + limit));
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            changed = stop.changed(), if !closing => {
                if changed.is_err() || *stop.borrow() {
                    closing = true;
                    graceful_shutdown(conn.as_mut());
                }
            }
            _ = tokio::time::sleep_until(check) => {
                if give_up.is_some() {
                    tracing::debug!("idle HTTP/2 connection did not finish its streams; dropped");
                    return;
                }
                let progress = activity.progress();
                if progress != seen || activity.awaiting_head() {
                    seen = progress;
                    quiet_since = Instant::now();
                    limit = limits.idle_timeout;
                } else if quiet_since.elapsed() < limit {
                    // Looked early: not idle long enough yet.
                } else if !closing {
                    closing = true;
                    graceful_shutdown(conn.as_mut());
                    give_up = Some(Instant::now() + IDLE_CLOSE_GRACE);
                } else {
                    // Closing for the server's stop: its grace bounds what is left.
                    quiet_since = Instant::now();
                }
            }
        }
    }
}

/// `work`'s output within `limit`, or `None` if the server stops first.
async fn unless_stopped<F: Future>(
    stop: &watch::Receiver<bool>,
    limit: Duration,
    work: F,
) -> Option<Result<F::Output, Elapsed>> {
    tokio::select! {
        output = tokio::time::timeout(limit, work) => Some(output),
        () = stopped(stop.clone()) => None,
    }
}

/// Resolves once the server stops.
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopping| *stopping).await;
}

/// Closes our side of the connection cleanly (TCP FIN, or TLS close_notify then FIN), giving a
/// client that does not read at most [`CLOSE_TIMEOUT`].
async fn close<I: tokio::io::AsyncWrite + Unpin>(io: &mut I) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, io.shutdown()).await;
}

/// Adapts the app's tower stack to one hyper connection: marks each request with its
/// connection's facts, counts it as in flight until its response head is ready and its body
/// until sent, and gives upgrade requests the connection's [`UpgradeHandoff`].
#[derive(Clone)]
struct ConnService {
    /// The connection's copy of the stack, called in place: cloning the whole stack for each
    /// request cost more than this lock, which is only ever held for the synchronous `call`.
    app: Arc<std::sync::Mutex<AppService>>,
    conn: ConnInfo,
    activity: Arc<Activity>,
    upgrades: UpgradeHandoff,
}

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<ConnBody>;
    type Error = Infallible;
    type Future = Respond;

    fn call(&self, req: Request<Incoming>) -> Respond {
        let awaiting = AwaitingHead::new(self.activity.clone());
        let open = OpenBody::new(self.activity.clone());
        let upgrade = wants_upgrade(&req);
        let (mut parts, body) = req.into_parts();
        parts.extensions.insert(RequestFacts {
            conn: Some(self.conn),
            ..RequestFacts::default()
        });
        if upgrade {
            parts.extensions.insert(self.upgrades.clone());
        }
        let body = if hyper::body::Body::is_end_stream(&body) {
            // Nothing to read (a GET, say): an empty body is boxed without an allocation.
            Body::new(http_body_util::Empty::new())
        } else {
            Body::new(RequestBody {
                body,
                open: OpenRequestBody::new(self.activity.clone()),
            })
        };
        // Every layer of the stack is always ready (none applies backpressure through
        // poll_ready), so the stack is called directly rather than through `oneshot`.
        let response = self
            .app
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .call(Request::from_parts(parts, body));
        Respond {
            response,
            awaiting: Some(awaiting),
            open: Some(open),
        }
    }
}

/// The stack's response on its way to hyper: the request counts as awaiting its head until
/// the head is ready, then the body as open until hyper drops it.
struct Respond {
    response: <AppService as Service<Request<Body>>>::Future,
    awaiting: Option<AwaitingHead>,
    open: Option<OpenBody>,
}

impl Future for Respond {
    type Output = Result<Response<ConnBody>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let response = match ready!(self.response.as_mut().poll(cx)) {
            Ok(response) => response,
            Err(never) => match never {},
        };
        self.awaiting = None;
        let open = self.open.take();
        Poll::Ready(Ok(response.map(|body| ConnBody {
            body,
            open,
            rest: Bytes::new(),
        })))
    }
}

/// A request body that counts as open on its connection until read to its end.
struct RequestBody {
    body: Incoming,
    open: OpenRequestBody,
}

impl hyper::body::Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let frame = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(frame, Poll::Ready(Some(Ok(_)))) {
            self.open.activity.progressed();
        }
        if matches!(frame, Poll::Ready(None)) || self.body.is_end_stream() {
            self.open.finish();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A response body that counts as open on its connection until hyper drops it.
///
/// Data comes out in pieces of at most [`BODY_PIECE`]: hyper's HTTP/2 side takes the next piece
/// only once the client's window has let the last one through, and each piece taken counts as
/// progress (`Activity::progressed`). A slow client reading a large upstream chunk then shows
/// progress as it reads, rather than none until the whole chunk is through.
struct ConnBody {
    body: Body,
    open: Option<OpenBody>,
    /// What is left of a data frame larger than a piece.
    rest: Bytes,
}

/// The largest data frame handed to hyper at once.
const BODY_PIECE: usize = 64 * 1024;

impl ConnBody {
    fn piece(&mut self, mut data: Bytes) -> Frame<Bytes> {
        if data.len() > BODY_PIECE {
            self.rest = data.split_off(BODY_PIECE);
        }
        if let Some(open) = &self.open {
            open.0.progressed();
        }
        Frame::data(data)
    }
}

impl hyper::body::Body for ConnBody {
    type Data = Bytes;
    type Error = crate::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if !this.rest.is_empty() {
            let rest = std::mem::take(&mut this.rest);
            return Poll::Ready(Some(Ok(this.piece(rest))));
        }
        match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => Poll::Ready(Some(Ok(this.piece(data)))),
                Err(trailers) => Poll::Ready(Some(Ok(trailers))),
            },
            other => Poll::Ready(other),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let rest = self.rest.len() as u64;
        let body = self.body.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(body.lower().saturating_add(rest));
        if let Some(upper) = body.upper() {
            hint.set_upper(upper.saturating_add(rest));
        }
        hint
    }
}

/// Reads just enough of a plain-text connection to tell HTTP/2 prior knowledge from HTTP/1.1.
async fn detect(stream: &TcpStream) -> io::Result<Option<Protocol>> {
    let mut buf = [0u8; 24];
    let mut seen = 0;
    let mut wait = Duration::ZERO;
    loop {
        stream.readable().await?;
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        if buf[..n] != H2_PREFACE[..n] {
            return Ok(Some(Protocol::Http1));
        }
        if n == H2_PREFACE.len() {
            return Ok(Some(Protocol::Http2));
        }
        // A partial preface: wait for the rest (bounded by the caller's timeout). The socket
        // stays readable with those bytes in it, so waiting is by the clock, longer each time
        // nothing more came: a client that stops part-way costs a few peeks, not a core.
        wait = preface_wait(wait, n > seen);
        seen = n;
        tokio::time::sleep(wait).await;
    }
}

/// The next wait for the rest of a partial HTTP/2 preface: short again when more arrived,
/// else twice the last, up to 200 ms.
fn preface_wait(last: Duration, more_arrived: bool) -> Duration {
    const FIRST: Duration = Duration::from_millis(5);
    const MOST: Duration = Duration::from_millis(200);
    if more_arrived {
        FIRST
    } else {
        (last * 2).clamp(FIRST, MOST)
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn a_large_response_frame_goes_to_hyper_in_pieces() {
        use http_body_util::BodyExt;
        let data = bytes::Bytes::from(vec![7u8; 3 * super::BODY_PIECE + 100]);
        let mut body = super::ConnBody {
            body: crate::Body::new(http_body_util::Full::new(data.clone())),
            open: None,
            rest: bytes::Bytes::new(),
        };
        assert_eq!(
            hyper::body::Body::size_hint(&body).exact(),
            Some(data.len() as u64)
        );
        let mut pieces = Vec::new();
        while let Some(frame) = body.frame().await {
            pieces.push(frame.unwrap().into_data().unwrap());
        }
        let sizes: Vec<usize> = pieces.iter().map(|p| p.len()).collect();
        let piece = super::BODY_PIECE;
        assert_eq!(sizes, [piece, piece, piece, 100]);
        assert_eq!(pieces.concat(), data);
        assert!(hyper::body::Body::is_end_stream(&body));
    }

    #[test]
    fn a_stalled_partial_preface_is_looked_at_less_and_less_often() {
        use super::preface_wait;
        use std::time::Duration;
        let ms = Duration::from_millis;
        let mut wait = preface_wait(Duration::ZERO, true);
        assert_eq!(wait, ms(5));
        let mut waits = Vec::new();
        for _ in 0..8 {
            wait = preface_wait(wait, false);
            waits.push(wait.as_millis());
        }
        assert_eq!(waits, [10, 20, 40, 80, 160, 200, 200, 200]);
        assert_eq!(
            preface_wait(ms(200), true),
            ms(5),
            "more bytes: look again soon"
        );
    }
}
