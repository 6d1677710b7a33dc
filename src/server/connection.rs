//! One client connection on a worker: TLS handshake (ALPN picks h2 or http/1.1) or plain-text
//! protocol detection (HTTP/2 prior knowledge or HTTP/1.1), then the app's tower stack served
//! by portcullis' own HTTP/1.1 engine (`http1.rs`) or by hyper's HTTP/2. Every stage before the
//! request head is bounded by `server.header_read_timeout`; idle connections are closed after
//! `server.idle_timeout`.
//!
//! An HTTP/1.1 connection at rest holds no engine: after [`REST_AFTER`] with nothing in
//! flight, the engine stops at the message boundary and returns the socket, which then waits
//! for the client's next byte holding no buffers. A new engine takes over when it comes. Ten
//! thousand idle game clients so cost their sockets and a small task each, not ten thousand
//! sets of read and write buffers. The same hand-back is how upgrades work: the engine writes
//! the 101 and returns the socket, and the tunnel runs on it in this task.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::error::Elapsed;
use tokio_rustls::TlsAcceptor;
use tower::Service;

use super::http1::{Engine, Outcome};
use super::io::{Activity, Exchange, ResponseFlow, Rewind, Transport};
use super::{ConnCounts, ConnLimits, RestingGuard, IDLE_CLOSE_GRACE};
use crate::app::AppService;
use crate::facts::RequestFacts;
use crate::forward::{wants_upgrade, Tunnel, UpgradeHandoff};
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

/// Longest a closing connection lingers: for its client to take our FIN (or TLS close_notify)
/// and to close in turn...
const LINGER: Duration = Duration::from_secs(1);
/// ...reading and dropping at most this much of what the client still sends.
const LINGER_BYTES: usize = 1024 * 1024;

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
        let service = ConnService {
            app: self.app.clone(),
            conn: ConnInfo {
                peer: self.peer,
                tls,
            },
            upgrades: UpgradeHandoff::default(),
        };
        match protocol {
            Protocol::Http1 => self.serve_http1(io, &service).await,
            Protocol::Http2 => {
                let activity = Arc::new(Activity::new());
                let service = Http2Service {
                    service,
                    activity: activity.clone(),
                    idle_timeout: self.limits.idle_timeout,
                };
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
    async fn serve_http1<I: Transport>(&mut self, mut io: I, service: &ConnService) {
        let mut rested_since = None;
        loop {
            let engine = Engine::new(io, service, &self.limits, &self.stop);
            // Boxed, so that a resting connection's task holds none of it.
            match Box::pin(engine.run(rested_since)).await {
                Outcome::Rest(rested, quiet_since) => {
                    rested_since = Some(quiet_since);
                    if !self.wait_for_client(&rested, quiet_since).await {
                        let mut rested = rested;
                        close(&mut rested).await;
                        return;
                    }
                    io = rested;
                }
                Outcome::Upgrade(upgraded, unread, tunnel) => {
                    let client = Rewind::new(unread, upgraded);
                    Box::pin(tunnel.run(client, stopped(self.stop.clone()))).await;
                    return;
                }
                Outcome::Close(mut closing) => {
                    // Boxed, so that the task a resting connection keeps does not carry it.
                    Box::pin(linger(&mut closing)).await;
                    return;
                }
                Outcome::Abort(broken) => {
                    broken.reset_on_drop();
                    return;
                }
                Outcome::Drop => return,
            }
        }
    }

    /// A resting connection waits here for its client's next byte. False when it should close
    /// instead: quiet past the keep-alive limit, shutting down, or a broken socket.
    async fn wait_for_client<I: Transport>(
        &mut self,
        io: &I,
        quiet_since: tokio::time::Instant,
    ) -> bool {
        // A kept-alive connection whose next request head does not arrive within
        // header_read_timeout (or idle_timeout, if shorter) is closed, resting or not.
        let limit = self
            .limits
            .header_read_timeout
            .min(self.limits.idle_timeout);
        if *self.stop.borrow() {
            return false;
        }
        let _resting = RestingGuard::new(&self.counts);
        tokio::select! {
            ready = std::future::poll_fn(|cx| io.poll_client_ready(cx)) => ready.is_ok(),
            _ = tokio::time::sleep_until(quiet_since + limit) => false,
            _ = self.stop.changed() => false,
        }
    }
}

fn http2_builder(limits: &ConnLimits) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_header_list_size(limits.hard_header_cap().try_into().unwrap_or(u32::MAX))
        // nginx's default: each stream may hold an upstream connection and its buffers.
        .max_concurrent_streams(128);
    builder
}

/// Runs an HTTP/2 connection to completion, starting a graceful shutdown of it when the server
/// stops or when it has been idle for `idle_timeout` (`header_read_timeout` before its first
/// request), and dropping it [`IDLE_CLOSE_GRACE`] after an idle shutdown that did not finish.
///
/// Idle is judged by streams, not bytes: PINGs, or a HEADERS frame sent a byte at a time, move
/// bytes without making any request, and would otherwise hold a connection (and its slot under
/// `server.max_connections`) for ever. A request that has all arrived and waits for its response
/// head is not idle (`upstream.request_timeout` bounds it); a request or response body that
/// moves no frame for `idle_timeout` is.
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
            () = activity.reset_too_often(), if give_up.is_none() => {
                tracing::warn!(
                    "an HTTP/2 client reset requests before their answers faster than allowed: its connection is closed"
                );
                closing = true;
                graceful_shutdown(conn.as_mut());
                give_up = Some(Instant::now() + IDLE_CLOSE_GRACE);
            }
            _ = tokio::time::sleep_until(check) => {
                if give_up.is_some() {
                    tracing::debug!("idle HTTP/2 connection did not finish its streams; dropped");
                    return;
                }
                let stalled = activity.end_stalled_responses(limits.idle_timeout);
                if stalled > 0 {
                    tracing::debug!(stalled, "ended HTTP/2 responses the client took none of for idle_timeout");
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
pub(super) async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopping| *stopping).await;
}

/// Closes our side of a resting connection cleanly (TCP FIN, or TLS close_notify then FIN),
/// giving a client that does not read at most [`LINGER`]. Nothing is in flight either way, so
/// nothing is waited for after it.
async fn close<I: tokio::io::AsyncWrite + Unpin>(io: &mut I) {
    let _ = tokio::time::timeout(LINGER, io.shutdown()).await;
}

/// Closes our side after a response (see [`close`]), then reads and drops what the client still
/// sends until it closes too, for [`LINGER`] and [`LINGER_BYTES`] at most. Bytes left unread when
/// a socket closes make the kernel reset the connection, and a reset throws away what of the
/// response the kernel has not sent yet: a next request already on its way, the rest of a body,
/// or a refused head's body would cost the client the answer it was sent.
async fn linger<I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(io: &mut I) {
    use tokio::io::AsyncReadExt;
    let lingering = async {
        io.shutdown().await?;
        let mut sink = [0u8; 1024];
        let mut drained = 0;
        while drained < LINGER_BYTES {
            match io.read(&mut sink).await? {
                0 => break,
                n => drained += n,
            }
        }
        std::io::Result::Ok(())
    };
    let _ = tokio::time::timeout(LINGER, lingering).await;
}

/// Adapts the app's tower stack to one connection: marks each request with its connection's
/// facts and gives upgrade requests the connection's [`UpgradeHandoff`].
#[derive(Clone)]
pub(super) struct ConnService {
    /// The connection's copy of the stack, called in place: cloning the whole stack for each
    /// request cost more than this lock, which is only ever held for the synchronous `call`.
    app: Arc<std::sync::Mutex<AppService>>,
    conn: ConnInfo,
    upgrades: UpgradeHandoff,
}

/// The stack's response to come.
pub(super) type Responding = <AppService as Service<Request<Body>>>::Future;

impl ConnService {
    /// Calls the stack with `req`.
    pub(super) fn respond(&self, req: Request<Body>) -> Responding {
        let upgrade = wants_upgrade(&req);
        let (mut parts, body) = req.into_parts();
        parts.extensions.insert(RequestFacts {
            conn: Some(self.conn),
            ..RequestFacts::default()
        });
        if upgrade {
            parts.extensions.insert(self.upgrades.clone());
        }
        // Every layer of the stack is always ready (none applies backpressure through
        // poll_ready), so the stack is called directly rather than through `oneshot`.
        self.app
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .call(Request::from_parts(parts, body))
    }

    #[cfg(test)]
    pub(super) fn for_tests(app: AppService, peer: SocketAddr) -> Self {
        ConnService {
            app: Arc::new(std::sync::Mutex::new(app)),
            conn: ConnInfo { peer, tls: false },
            upgrades: UpgradeHandoff::default(),
        }
    }

    /// The upstream's side of an upgrade the stack accepted, if it did.
    pub(super) fn take_tunnel(&self) -> Option<Tunnel> {
        self.upgrades.take()
    }
}

/// [`ConnService`] for hyper's HTTP/2, which cannot say when a connection is idle: it counts
/// each request as in flight from when its body has all arrived until its response head is
/// ready, and each body frame as progress (see [`drive_http2`]).
#[derive(Clone)]
struct Http2Service {
    service: ConnService,
    activity: Arc<Activity>,
    /// How long a request body may move no frame while it is read (`server.idle_timeout`).
    idle_timeout: Duration,
}

impl hyper::service::Service<Request<Incoming>> for Http2Service {
    type Response = Response<ConnBody>;
    type Error = Infallible;
    type Future = Respond;

    fn call(&self, req: Request<Incoming>) -> Respond {
        let (parts, body) = req.into_parts();
        let head = parts.method == http::Method::HEAD;
        let no_body = hyper::body::Body::is_end_stream(&body);
        let exchange = Arc::new(Exchange::start(self.activity.clone(), no_body));
        let body = if no_body {
            // Nothing to read (a GET, say): an empty body is boxed without an allocation.
            Body::new(http_body_util::Empty::new())
        } else {
            Body::new(RequestBody {
                body,
                exchange: exchange.clone(),
                idle_timeout: self.idle_timeout,
                quiet: None,
                moved: false,
            })
        };
        Respond {
            response: self.service.respond(Request::from_parts(parts, body)),
            exchange,
            head,
            answered: false,
        }
    }
}

/// The stack's response on its way to hyper: see [`Exchange`].
struct Respond {
    response: Responding,
    exchange: Arc<Exchange>,
    /// The request is a HEAD: its answer goes without content.
    head: bool,
    /// The head is ready: dropped before that, the stream was reset.
    answered: bool,
}

impl Future for Respond {
    type Output = Result<Response<ConnBody>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let response = match ready!(self.response.as_mut().poll(cx)) {
            Ok(response) => response,
            Err(never) => match never {},
        };
        self.exchange.head_out();
        self.answered = true;
        let response = if self.head {
            without_content(response)
        } else {
            response
        };
        let activity = self.exchange.activity().clone();
        Poll::Ready(Ok(response.map(|body| ConnBody::new(body, Some(activity)))))
    }
}

/// The answer to a HEAD: its head as a GET's would be, no content (RFC 9110 9.3.2). hyper's
/// HTTP/2 server sends whatever body it is given, and the stack's own answers (the session
/// API, every refusal) carry one; HTTP/1.1's engine leaves it out itself.
fn without_content(response: Response<Body>) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    if !parts.headers.contains_key(http::header::CONTENT_LENGTH) {
        // The length a GET would have had, when known.
        if let Some(n) = hyper::body::Body::size_hint(&body)
            .exact()
            .filter(|n| *n > 0)
        {
            parts
                .headers
                .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(n));
        }
    }
    Response::from_parts(parts, Body::new(NoContent))
}

/// A body that has ended and says nothing of its length, so that hyper adds no
/// `content-length: 0` to a HEAD's answer whose length is not known.
struct NoContent;

impl hyper::body::Body for NoContent {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        true
    }
}

impl Drop for Respond {
    fn drop(&mut self) {
        if !self.answered {
            // The stream was reset before its head was ready.
            self.exchange.head_out();
            self.exchange.reset_early();
        }
    }
}

/// An HTTP/2 request body whose frames count as progress on its connection, and whose end
/// (or being let go) starts the wait for the response head: see [`Exchange`].
///
/// A body that moves no frame for `idle_timeout` while it is read fails with
/// [`BodyStalled`](crate::error::BodyStalled) (a 408): the connection's own idle check cannot
/// end one stalled stream while its other streams are busy, and each stalled upload holds an
/// upstream connection.
struct RequestBody {
    body: Incoming,
    exchange: Arc<Exchange>,
    idle_timeout: Duration,
    /// Runs while the body waits for its next frame.
    quiet: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A frame came since the timer was last set.
    moved: bool,
}

impl hyper::body::Body for RequestBody {
    type Data = Bytes;
    type Error = crate::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        let ended = match &frame {
            Poll::Ready(Some(Ok(_))) => {
                this.exchange.activity().progressed();
                this.moved = true;
                this.body.is_end_stream()
            }
            Poll::Ready(_) => true,
            Poll::Pending => {
                let deadline = || tokio::time::Instant::now() + this.idle_timeout;
                let quiet = match &mut this.quiet {
                    Some(quiet) if this.moved => {
                        quiet.as_mut().reset(deadline());
                        quiet
                    }
                    Some(quiet) => quiet,
                    None => this
                        .quiet
                        .insert(Box::pin(tokio::time::sleep_until(deadline()))),
                };
                this.moved = false;
                if quiet.as_mut().poll(cx).is_ready() {
                    this.exchange.body_in();
                    let stalled = crate::error::BodyStalled(this.idle_timeout);
                    return Poll::Ready(Some(Err(stalled.into())));
                }
                false
            }
        };
        if ended {
            this.exchange.body_in();
        }
        frame.map(|f| f.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        self.exchange.body_in();
    }
}

/// A response body on its way to hyper, whose frames count as progress on its connection.
///
/// Data comes out in pieces of at most [`BODY_PIECE`]: hyper's HTTP/2 side takes the next piece
/// only once the client's window has let the last one through, and each piece taken counts as
/// progress (`Activity::progressed`). A slow client reading a large upstream chunk then shows
/// progress as it reads, rather than none until the whole chunk is through. A client that
/// takes none for `idle_timeout` has the body taken away (see [`ResponseFlow`]), and hyper
/// resets the stream when it next asks.
struct ConnBody {
    flow: Arc<ResponseFlow>,
    activity: Option<Arc<Activity>>,
    /// Its place under the connection's stall check, if it is under it.
    watched: Option<u64>,
}

/// The largest data frame handed to hyper at once.
const BODY_PIECE: usize = 64 * 1024;

impl ConnBody {
    fn new(body: Body, activity: Option<Arc<Activity>>) -> Self {
        let ended = hyper::body::Body::is_end_stream(&body);
        let flow = Arc::new(ResponseFlow::new(body));
        let watched = activity
            .as_ref()
            .filter(|_| !ended)
            .map(|activity| activity.watch_response(&flow));
        ConnBody {
            flow,
            activity,
            watched,
        }
    }

    fn piece(&self, rest: &mut Bytes, mut data: Bytes) -> Frame<Bytes> {
        if data.len() > BODY_PIECE {
            *rest = data.split_off(BODY_PIECE);
        }
        if let Some(activity) = &self.activity {
            activity.progressed();
        }
        Frame::data(data)
    }
}

impl hyper::body::Body for ConnBody {
    type Data = Bytes;
    type Error = crate::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &*self;
        let mut flow = this.flow.body();
        let Some((body, rest)) = flow.as_mut() else {
            return Poll::Ready(Some(Err(
                "the client took none of the response for server.idle_timeout".into(),
            )));
        };
        if !rest.is_empty() {
            let data = std::mem::take(rest);
            this.flow.polled(true);
            return Poll::Ready(Some(Ok(this.piece(rest, data))));
        }
        let polled = Pin::new(body).poll_frame(cx);
        this.flow.polled(matches!(polled, Poll::Ready(Some(Ok(_)))));
        match ready!(polled) {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => Poll::Ready(Some(Ok(this.piece(rest, data)))),
                Err(trailers) => Poll::Ready(Some(Ok(trailers))),
            },
            other => Poll::Ready(other),
        }
    }

    fn is_end_stream(&self) -> bool {
        let flow = self.flow.body();
        flow.as_ref()
            .is_some_and(|(body, rest)| rest.is_empty() && body.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let flow = self.flow.body();
        let Some((body, rest)) = flow.as_ref() else {
            return SizeHint::default();
        };
        let rest = rest.len() as u64;
        let body = body.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(body.lower().saturating_add(rest));
        if let Some(upper) = body.upper() {
            hint.set_upper(upper.saturating_add(rest));
        }
        hint
    }
}

impl Drop for ConnBody {
    fn drop(&mut self) {
        if let (Some(activity), Some(id)) = (&self.activity, self.watched) {
            activity.unwatch_response(id);
        }
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
        let mut body = super::ConnBody::new(
            crate::Body::new(http_body_util::Full::new(data.clone())),
            None,
        );
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

    #[tokio::test]
    async fn a_response_body_leaves_the_stall_check_when_it_is_dropped() {
        use http_body_util::BodyExt;
        let activity = std::sync::Arc::new(super::Activity::new());
        let bodies: Vec<_> = (0..3)
            .map(|_| {
                let data = bytes::Bytes::from_static(b"answer");
                let body = crate::Body::new(http_body_util::Full::new(data));
                super::ConnBody::new(body, Some(activity.clone()))
            })
            .collect();
        assert_eq!(activity.watched_responses(), 3);
        for mut body in bodies {
            while body.frame().await.is_some() {}
        }
        assert_eq!(activity.watched_responses(), 0);
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
