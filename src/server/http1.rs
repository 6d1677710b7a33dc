//! The HTTP/1.1 server side of a client connection, run in the connection's own task: read a
//! request head, call the stack, write the response, and again (pipelined requests wait their
//! turn in the read buffer).
//!
//! The request body is read from the socket as the stack polls it, through the same
//! [`Wire`] the connection writes the response with. Framing follows RFC 9112 section 6 and is
//! strict where a lenient reading could make portcullis and the upstream disagree on where a
//! request ends: `Transfer-Encoding` together with `Content-Length`, a `Transfer-Encoding` not
//! ending in `chunked`, or `Content-Length` values that differ are refused with 400 and the
//! connection closed; so is a request without exactly one `Host` (HTTP/1.1) or with two.
//!
//! A connection whose client goes quiet between requests stops after [`REST_AFTER`] and hands
//! its socket back, holding no buffers, to wait for the next byte (see `connection.rs`).

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, StatusCode, Uri, Version};
use http_body::{Body as _, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use super::connection::{stopped, ConnService};
use super::{ConnLimits, MAX_HEADERS, REST_AFTER};
use crate::forward::Tunnel;
use crate::h1::{
    header_map, header_spans, headers_len, may_be_whole, poll_write_all, put_headers, span_in,
    BodyDecoder, BodyEncoder, Decode, Encode, FramingError, HeadFacts, Step,
};
use crate::{Body, BoxError};

/// Room a read asks for.
const READ_CHUNK: usize = 8 * 1024;
/// A response body is polled for more only while less than this waits to be written: what a
/// client that stops reading leaves here is this and one more piece of the body.
const WRITE_HIGH_WATER: usize = 16 * 1024;
/// Headers the stack adds to a request on its way (identity, forwarding, Host, framing): the
/// map gets room for them at once.
const REQUEST_HEADERS_ADDED: usize = 10;
/// Longest wait for the client to take the last of what was written before the connection
/// closes (see [`super::connection`]'s `linger`, which then takes as long again at most).
const LAST_WRITE: Duration = Duration::from_secs(1);

/// The socket and its buffers, shared by the connection's task (heads, responses) and the
/// request body (which the stack reads as it needs).
struct Wire<I> {
    io: I,
    read: BytesMut,
    write: BytesMut,
    /// The request body being read; `Done` when there is none or all of it was read.
    body: BodyDecoder,
    /// The request body could not be read to its end (malformed, cut short).
    body_failed: bool,
    /// The client asked to be told to go on with its body (`Expect: 100-continue`) and has
    /// been told neither that nor its response yet.
    continue_owed: bool,
    /// Bytes moved either way: the idle check compares it between looks.
    progress: u64,
}

impl<I: AsyncRead + AsyncWrite + Unpin> Wire<I> {
    /// Reads what the client has sent into `read`; `Ok(0)` at the end of its stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.read.capacity() - self.read.len() < READ_CHUNK / 2 {
            self.read.reserve(READ_CHUNK);
        }
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut self.read
        ))?;
        self.progress += n as u64;
        Poll::Ready(Ok(n))
    }

    /// Writes all of `write`, then flushes (TLS keeps records back until then).
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let waiting = self.write.len();
        let written = poll_write_all(&mut self.io, &mut self.write, cx);
        self.progress += (waiting - self.write.len()) as u64;
        written
    }

    /// The request body's next frame.
    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.body_failed {
            return Poll::Ready(Some(Err("the request body could not be read".into())));
        }
        if std::mem::take(&mut self.continue_owed) {
            // The stack wants the body: the client may send it now.
            self.write
                .extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        if !self.write.is_empty() {
            if let Err(e) = ready!(self.poll_write_out(cx)) {
                self.body_failed = true;
                return Poll::Ready(Some(Err(e.into())));
            }
        }
        loop {
            let step = match self.body.step(&mut self.read) {
                Ok(step) => step,
                Err(e) => return Poll::Ready(Some(Err(self.fail_body(e)))),
            };
            match step {
                Step::Data(data) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Step::Trailers(trailers) => {
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                }
                Step::End => return Poll::Ready(None),
                Step::NeedMore => {}
            }
            match ready!(self.poll_fill(cx)) {
                Ok(0) => {
                    let cut = FramingError::Malformed("the client closed the connection mid-body");
                    return Poll::Ready(Some(Err(self.fail_body(cut))));
                }
                Ok(_) => {}
                Err(e) => {
                    self.body_failed = true;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    /// The error the stack sees: a [`FramingError`], which the forwarder answers with 400.
    fn fail_body(&mut self, e: FramingError) -> BoxError {
        self.body_failed = true;
        Box::new(e)
    }
}

type SharedWire<I> = Arc<Mutex<Wire<I>>>;

fn lock<I>(wire: &SharedWire<I>) -> MutexGuard<'_, Wire<I>> {
    // A panic while the lock was held can only have come from the stack polling the body; the
    // wire's state is still whole.
    wire.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A request body, read from the connection as it is polled.
struct RequestBody<I> {
    wire: SharedWire<I>,
    hint: SizeHint,
    ended: bool,
}

impl<I: AsyncRead + AsyncWrite + Unpin + Send + 'static> http_body::Body for RequestBody<I> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let mut wire = lock(&self.wire);
        let frame = ready!(wire.poll_body(cx));
        let ended = wire.body.is_done() || !matches!(frame, Some(Ok(_)));
        drop(wire);
        self.ended = ended;
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

/// A request head, read and checked.
struct Head {
    request: Request<()>,
    framing: Decode,
    keep_alive: bool,
    /// The client asked to keep the connection (what an HTTP/1.0 client must do to keep it).
    keep_alive_token: bool,
    expects_continue: bool,
}

/// Why a head was refused, before any of portcullis saw it.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    why: &'static str,
}

fn too_large(why: &'static str) -> Refusal {
    Refusal {
        status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        why,
    }
}

fn bad(why: &'static str) -> Refusal {
    Refusal {
        status: StatusCode::BAD_REQUEST,
        why,
    }
}

/// Parses the request head at the start of `read`, taking it off when complete; `None` while
/// incomplete. Header values and the target share the head's bytes rather than copying them.
fn parse_head(read: &mut BytesMut, cap: usize) -> Result<Option<Head>, Refusal> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut parsed,
        read,
        &mut slots,
    ) {
        Ok(httparse::Status::Complete(len)) if len <= cap => len,
        Ok(httparse::Status::Partial) if read.len() <= cap => return Ok(None),
        Ok(_) => return Err(too_large("the request head is too large")),
        Err(httparse::Error::TooManyHeaders) => return Err(too_large("too many header lines")),
        Err(_) => return Err(bad("the request head is malformed")),
    };
    let method = parsed
        .method
        .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
        .ok_or(bad("the method is invalid"))?;
    let version = match parsed.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    let target_len = parsed.path.map_or(0, str::len);

    // Where the target and each name and value lie in the head, so that the head can be
    // frozen and shared.
    let target = span_in(read, len, parsed.path.unwrap_or("").as_bytes());
    let spans = header_spans(read, len, parsed.headers);
    let head = read.split_to(len).freeze();

    let uri = Uri::from_maybe_shared(head.slice(target)).map_err(|_| {
        if target_len > u16::MAX as usize - 1 {
            Refusal {
                status: StatusCode::URI_TOO_LONG,
                why: "the request target is too long",
            }
        } else {
            bad("the request target is invalid")
        }
    })?;
    let (headers, facts) = header_map(&head, spans, REQUEST_HEADERS_ADDED).map_err(bad)?;

    // Which authority a request is for must be as clear as where it ends (RFC 9112 3.2).
    if facts.hosts > 1 || (version == Version::HTTP_11 && facts.hosts == 0) {
        return Err(bad("an HTTP/1.1 request needs exactly one Host"));
    }
    let framing = request_framing(version, &facts)?;
    let keep_alive = !facts.close && (version == Version::HTTP_11 || facts.keep_alive);
    let expects_continue =
        version == Version::HTTP_11 && framing != Decode::Done && facts.expects_continue;

    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    Ok(Some(Head {
        request,
        framing,
        keep_alive,
        keep_alive_token: facts.keep_alive,
        expects_continue,
    }))
}

/// How a request's body is delimited (RFC 9112 6.3). Anything two readers could take two ways
/// is refused.
fn request_framing(version: Version, facts: &HeadFacts) -> Result<Decode, Refusal> {
    if facts.transfer_encoding {
        if version == Version::HTTP_10 {
            return Err(bad("Transfer-Encoding in an HTTP/1.0 request"));
        }
        if facts.content_length.is_some() || facts.bad_content_length.is_some() {
            return Err(bad("both Transfer-Encoding and Content-Length"));
        }
        if !facts.chunked {
            return Err(bad("a Transfer-Encoding that does not end in chunked"));
        }
        return Ok(Decode::ChunkSize);
    }
    match facts.content_length() {
        Ok(Some(0) | None) => Ok(Decode::Done),
        Ok(Some(n)) => Ok(Decode::Length(n)),
        Err(why) => Err(bad(why)),
    }
}

/// How a response is framed on the wire, the headers that says added to `headers`.
fn response_framing(
    status: StatusCode,
    method: &Method,
    request_version: Version,
    headers: &mut HeaderMap,
    facts: &HeadFacts,
    body: &Body,
) -> Encode {
    // The stack's own framing headers are not trusted blindly: a Transfer-Encoding is hop-by-
    // hop (and removed on the way from the upstream), and a Content-Length must be a number.
    if facts.transfer_encoding {
        headers.remove(header::TRANSFER_ENCODING);
    }
    let has_length = facts.content_length.is_some() || facts.bad_content_length.is_some();
    if status.is_informational() || status == StatusCode::NO_CONTENT {
        if has_length {
            headers.remove(header::CONTENT_LENGTH);
        }
        return Encode::None;
    }
    let declared = match facts.content_length() {
        Ok(length) => length,
        Err(_) => {
            headers.remove(header::CONTENT_LENGTH);
            None
        }
    };
    let exact = body.size_hint().exact();
    if *method == Method::HEAD || status == StatusCode::NOT_MODIFIED {
        // The length a GET would have had, when known; no body either way.
        if declared.is_none() {
            if let Some(n) = exact.filter(|n| *n > 0) {
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
            }
        }
        return Encode::None;
    }
    if let Some(n) = declared {
        return Encode::Length(n);
    }
    if let Some(n) = exact {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        return Encode::Length(n);
    }
    if request_version == Version::HTTP_11 {
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        Encode::Chunked
    } else {
        Encode::UntilClose
    }
}

/// `HTTP/1.1 status reason`, the headers, `Date` when the stack set none, and what the
/// connection does next.
fn encode_response_head(
    parts: &http::response::Parts,
    facts: &HeadFacts,
    close: bool,
    keep_alive_token: bool,
    out: &mut BytesMut,
) {
    let status = parts.status;
    let reason = parts
        .extensions
        .get::<hyper::ext::ReasonPhrase>()
        .map(|r| r.as_bytes())
        .or_else(|| status.canonical_reason().map(str::as_bytes))
        .unwrap_or(b"");
    out.reserve(headers_len(&parts.headers) + reason.len() + 96);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(reason);
    out.extend_from_slice(b"\r\n");
    put_headers(out, &parts.headers);
    if !facts.date {
        out.extend_from_slice(b"date: ");
        date::put_now(out);
        out.extend_from_slice(b"\r\n");
    }
    if close {
        if !facts.close {
            out.extend_from_slice(b"connection: close\r\n");
        }
    } else if keep_alive_token {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// The bare response to a head refused before the stack saw it.
fn encode_refusal(status: StatusCode, out: &mut BytesMut) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\ncontent-length: 0\r\nconnection: close\r\ndate: ");
    date::put_now(out);
    out.extend_from_slice(b"\r\n\r\n");
}

/// How a run of the engine ended.
pub(super) enum Outcome<I> {
    /// Between requests, quiet since the instant given: the socket, with nothing unread.
    Rest(I, Instant),
    /// A 101 went out: the socket, what the client sent after its request, and the tunnel.
    Upgrade(I, Bytes, Tunnel),
    /// Done with the socket, which is to be closed cleanly.
    Close(I),
    /// The response broke off: the socket is to be reset, so that the client cannot take what
    /// it got for a whole response (one that runs until the close, as to an HTTP/1.0 client,
    /// has no other end to miss).
    Abort(I),
    /// Done with the socket, which is to be dropped (timed out, broken, or still in use by a
    /// request body the stack kept).
    Drop,
}

/// What the next head wait found. Returned once per request and taken apart at once: boxing
/// the head would cost an allocation per request for nothing.
#[allow(clippy::large_enum_variant)]
enum Next {
    Head(Head),
    Rest,
    /// The client closed between requests, or the server stops, or the keep-alive limit.
    Close,
    Refuse(Refusal),
    Drop(&'static str),
}

/// What an exchange left the connection fit for.
enum After {
    Again,
    /// The connection carries no other request: the response said it closes, or what is left
    /// of the request body cannot be told from a next request.
    Close,
    Upgrade(Tunnel),
    /// The response did not go out whole.
    Abort(&'static str),
    Drop(&'static str),
}

/// One connection's HTTP/1.1 server, from a fresh start or a rest to the next rest or its end.
pub(super) struct Engine<'a, I> {
    wire: SharedWire<I>,
    service: &'a ConnService,
    limits: &'a ConnLimits,
    stop: StopSignal,
    stopping: bool,
    timer: Pin<Box<Sleep>>,
}

impl<'a, I> Engine<'a, I>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    pub(super) fn new(
        io: I,
        service: &'a ConnService,
        limits: &'a ConnLimits,
        stop: &watch::Receiver<bool>,
    ) -> Self {
        Engine {
            wire: Arc::new(Mutex::new(Wire {
                io,
                read: BytesMut::new(),
                write: BytesMut::new(),
                body: BodyDecoder::new(Decode::Done),
                body_failed: false,
                continue_owed: false,
                progress: 0,
            })),
            service,
            limits,
            stop: StopSignal::new(stop),
            stopping: *stop.borrow(),
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
        }
    }

    /// Serves requests until the connection rests, upgrades or ends. `quiet_since`: when the
    /// connection last rested, when it did: a client that wakes it without a byte of a request
    /// (over TLS, a record that decrypts to nothing) does not move the keep-alive limit on.
    pub(super) async fn run(mut self, quiet_since: Option<Instant>) -> Outcome<I> {
        let mut quiet_since = quiet_since.unwrap_or_else(Instant::now);
        loop {
            let head = match self.next_head(quiet_since).await {
                Next::Head(head) => head,
                Next::Rest => {
                    return match self.take_io() {
                        Some((io, unread)) if unread.is_empty() => Outcome::Rest(io, quiet_since),
                        _ => Outcome::Drop,
                    }
                }
                Next::Close => return self.into_close(),
                Next::Refuse(refusal) => {
                    tracing::debug!(status = %refusal.status, why = refusal.why, "request head refused");
                    encode_refusal(refusal.status, &mut lock(&self.wire).write);
                    return self.close().await;
                }
                Next::Drop(why) => {
                    tracing::debug!(why, "connection dropped");
                    return Outcome::Drop;
                }
            };
            match self.exchange(head).await {
                After::Again => quiet_since = Instant::now(),
                After::Close => return self.close().await,
                After::Upgrade(tunnel) => {
                    return match self.take_io() {
                        Some((io, unread)) => Outcome::Upgrade(io, unread, tunnel),
                        None => Outcome::Drop,
                    }
                }
                After::Abort(why) => {
                    tracing::debug!(why, "response broke off; connection reset");
                    return match self.take_io() {
                        Some((io, _)) => Outcome::Abort(io),
                        None => Outcome::Drop,
                    };
                }
                After::Drop(why) => {
                    tracing::debug!(why, "connection dropped");
                    return Outcome::Drop;
                }
            }
        }
    }

    /// The socket and what was read past the last request, if nothing else holds them.
    fn take_io(self) -> Option<(I, Bytes)> {
        let wire = Arc::into_inner(self.wire)?;
        let wire = wire
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Some((wire.io, wire.read.freeze()))
    }

    fn into_close(self) -> Outcome<I> {
        match self.take_io() {
            Some((io, _)) => Outcome::Close(io),
            None => Outcome::Drop,
        }
    }

    /// Sends what is left to write (a refusal), and hands the socket over to be closed.
    async fn close(self) -> Outcome<I> {
        let flushed = std::future::poll_fn(|cx| lock(&self.wire).poll_write_out(cx));
        match tokio::time::timeout(LAST_WRITE, flushed).await {
            Ok(Ok(())) => self.into_close(),
            _ => Outcome::Drop,
        }
    }

    /// The next request head: already read (pipelined) or on its way. Between requests, the
    /// connection rests after [`REST_AFTER`] of quiet, and closes at the keep-alive limit
    /// (`header_read_timeout`, or `idle_timeout` if shorter) when that comes first; a head
    /// must be complete `header_read_timeout` after its first byte.
    async fn next_head(&mut self, quiet_since: Instant) -> Next {
        let keep_alive_limit = self
            .limits
            .header_read_timeout
            .min(self.limits.idle_timeout);
        let rest_at = quiet_since + REST_AFTER;
        let close_at = quiet_since + keep_alive_limit;
        let mut head_started: Option<Instant> = None;
        let mut timer_set = false;
        let cap = self.limits.hard_header_cap();
        // How much of a partial head has been looked at: after the first look, the head is
        // parsed again only once a blank line has come (or the cap is passed).
        let mut looked_at: usize = 0;
        // Blank lines before the request line (RFC 9112 2.2) are let go as they come, and
        // counted against the cap: the parser would skip them again on every look.
        let mut blank_lines: usize = 0;
        if self.stopping {
            return Next::Close;
        }
        std::future::poll_fn(|cx| {
            let mut wire = lock(&self.wire);
            loop {
                if !wire.read.is_empty() {
                    let blank = wire
                        .read
                        .iter()
                        .take_while(|b| matches!(b, b'\r' | b'\n'))
                        .count();
                    if blank > 0 {
                        wire.read.advance(blank);
                        looked_at = looked_at.saturating_sub(blank);
                        blank_lines += blank;
                    }
                    let room = cap.saturating_sub(blank_lines);
                    let whole = wire.read.len() > room || may_be_whole(&wire.read, looked_at);
                    looked_at = wire.read.len();
                    if whole {
                        match parse_head(&mut wire.read, room) {
                            Ok(Some(head)) => return Poll::Ready(Next::Head(head)),
                            Ok(None) => {}
                            Err(refusal) => return Poll::Ready(Next::Refuse(refusal)),
                        }
                    }
                    if head_started.is_none() {
                        let now = Instant::now();
                        head_started = Some(now);
                        self.timer
                            .as_mut()
                            .reset(now + self.limits.header_read_timeout);
                        timer_set = true;
                    }
                }
                match wire.poll_fill(cx) {
                    Poll::Ready(Ok(0)) if wire.read.is_empty() => {
                        return Poll::Ready(Next::Close);
                    }
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Next::Drop("the client closed mid-head"))
                    }
                    Poll::Ready(Ok(_)) => {}
                    Poll::Ready(Err(_)) => {
                        return Poll::Ready(Next::Drop("reading the request head failed"))
                    }
                    Poll::Pending => break,
                }
            }
            drop(wire);
            if head_started.is_none() {
                if self.stopping || self.stop.poll_stopped(cx).is_ready() {
                    // Nothing of a request has come: the client is not waited for.
                    return Poll::Ready(Next::Close);
                }
                if !timer_set {
                    self.timer.as_mut().reset(rest_at.min(close_at));
                    timer_set = true;
                }
            }
            ready!(self.timer.as_mut().poll(cx));
            Poll::Ready(match head_started {
                Some(_) => Next::Drop("request head not complete within header_read_timeout"),
                None if close_at <= rest_at => Next::Close,
                None => Next::Rest,
            })
        })
        .await
    }

    /// Whether the request body has been read whole, once what of it has arrived and the stack
    /// did not read is passed over. Only for a body nothing else can read any more.
    fn pass_over_body(&self) -> bool {
        let mut wire = lock(&self.wire);
        let wire = &mut *wire;
        if wire.body_failed {
            return false;
        }
        wire.body.pass_over(&mut wire.read)
    }

    /// Whether the rest of a request body the stack still holds is all in the read buffer.
    /// Judged on a copy of the decoder and of the unread bytes: the stack may still read it.
    fn body_has_arrived(&self) -> bool {
        let wire = lock(&self.wire);
        if wire.body_failed {
            return false;
        }
        match wire.body.state() {
            Decode::Done => return true,
            Decode::Length(owed) => return wire.read.len() as u64 >= owed,
            _ => {}
        }
        wire.body
            .clone()
            .pass_over(&mut BytesMut::from(&wire.read[..]))
    }

    /// Runs one exchange: calls the stack, writes its response, and says what the connection
    /// can do next.
    async fn exchange(&mut self, head: Head) -> After {
        let Head {
            request,
            framing,
            keep_alive,
            keep_alive_token,
            expects_continue,
        } = head;
        let method = request.method().clone();
        let version = request.version();
        let body = {
            let mut wire = lock(&self.wire);
            // A trailer section is held whole until it ends: no larger than a head may be.
            wire.body = BodyDecoder::new(framing).trailer_limit(self.limits.max_header_bytes);
            wire.body_failed = false;
            wire.continue_owed = expects_continue;
            match framing {
                Decode::Done => Body::new(http_body_util::Empty::new()),
                _ => Body::new(RequestBody {
                    wire: self.wire.clone(),
                    hint: match framing {
                        Decode::Length(n) => SizeHint::with_exact(n),
                        _ => SizeHint::default(),
                    },
                    ended: false,
                }),
            }
        };
        let (parts, ()) = request.into_parts();
        let mut responding = self.service.respond(Request::from_parts(parts, body));

        // The response head; meanwhile, a stop makes this the connection's last exchange, a
        // request body that moves nothing for idle_timeout ends it, and so does the client
        // going away once its request is all here: the upstream exchange is let go rather
        // than finished for no one (as nginx does, logging a 499). Looked for only while
        // nothing is buffered: bytes sent ahead (a pipelined request) say the client is
        // there, and are kept for their turn.
        let response = {
            let mut idle = IdleCheck::new(&self.wire, self.limits.idle_timeout);
            let response = std::future::poll_fn(|cx| {
                if let Poll::Ready(response) = responding.as_mut().poll(cx) {
                    return Poll::Ready(Ok(response));
                }
                if !self.stopping && self.stop.poll_stopped(cx).is_ready() {
                    self.stopping = true;
                }
                let mut wire = lock(&self.wire);
                if !wire.body.is_done() {
                    drop(wire);
                    if idle.poll_idle(&mut self.timer, cx).is_ready() {
                        return Poll::Ready(Err("the request body stalled past idle_timeout"));
                    }
                } else if wire.read.is_empty() {
                    if let Poll::Ready(Ok(0) | Err(_)) = wire.poll_fill(cx) {
                        return Poll::Ready(Err("the client went away before its response"));
                    }
                }
                Poll::Pending
            })
            .await;
            match response {
                Ok(Ok(response)) => response,
                Ok(Err(never)) => match never {},
                Err(why) => return After::Drop(why),
            }
        };
        drop(responding);

        let (mut parts, mut body) = response.into_parts();
        let upgrade = parts.status == StatusCode::SWITCHING_PROTOCOLS;
        // A request body that has not all arrived: the connection ends after this response, and
        // the response says so. One the stack still holds (an upstream that answered before
        // taking all of the upload) is judged as it stands; should the stack still hold it once
        // the response is out, the connection ends without having said so (below).
        let body_left = if Arc::strong_count(&self.wire) == 1 {
            !self.pass_over_body()
        } else {
            !self.body_has_arrived()
        };
        let facts = HeadFacts::of(&parts.headers);
        let framing = response_framing(
            parts.status,
            &method,
            version,
            &mut parts.headers,
            &facts,
            &body,
        );
        let close = self.stopping
            || !keep_alive
            || body_left
            || facts.close
            || framing == Encode::UntilClose
            || upgrade;
        {
            let mut wire = lock(&self.wire);
            // Too late for a 100 Continue: the client has its answer.
            wire.continue_owed = false;
            let keep_alive_token = keep_alive_token && version == Version::HTTP_10;
            encode_response_head(
                &parts,
                &facts,
                close && !upgrade,
                keep_alive_token,
                &mut wire.write,
            );
        }
        drop(parts);

        // The body; a client that takes none of it for idle_timeout is dropped.
        let mut encoder = BodyEncoder::new(framing);
        if framing == Encode::None {
            drop(body);
            body = Body::new(http_body_util::Empty::new());
            let _ = encoder.end(&mut lock(&self.wire).write);
        }
        let mut idle = IdleCheck::new(&self.wire, self.limits.idle_timeout);
        let sent = std::future::poll_fn(|cx| {
            if !self.stopping && self.stop.poll_stopped(cx).is_ready() {
                self.stopping = true;
            }
            loop {
                // The body is polled without the wire locked: an upstream's answer may still
                // be sending the request body, which reads from the wire.
                let mut waiting = lock(&self.wire).write.len();
                let mut body_pending = false;
                while !encoder.is_ended() && waiting < WRITE_HIGH_WATER {
                    let frame = match Pin::new(&mut body).poll_frame(cx) {
                        Poll::Ready(frame) => frame,
                        Poll::Pending => {
                            body_pending = true;
                            break;
                        }
                    };
                    let ended = body.is_end_stream();
                    let mut wire = lock(&self.wire);
                    let framed = match frame {
                        Some(Ok(frame)) => encoder.encode(frame, &mut wire.write).and_then(|()| {
                            if ended {
                                encoder.end(&mut wire.write)
                            } else {
                                Ok(())
                            }
                        }),
                        None => encoder.end(&mut wire.write),
                        Some(Err(e)) => {
                            tracing::debug!(error = %e, "response body failed; connection aborted");
                            return Poll::Ready(Err("the response body failed"));
                        }
                    };
                    if let Err(why) = framed {
                        tracing::debug!(why, "response body does not match its framing");
                        return Poll::Ready(Err("the response body does not match its framing"));
                    }
                    waiting = wire.write.len();
                }
                match lock(&self.wire).poll_write_out(cx) {
                    Poll::Ready(Ok(())) if encoder.is_ended() => return Poll::Ready(Ok(())),
                    // All written; the body will wake the task when it has more.
                    Poll::Ready(Ok(())) if body_pending => break,
                    // All written after the buffer filled up: on with the body.
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(_)) => return Poll::Ready(Err("writing the response failed")),
                    // The client's socket is full: writable again wakes the task.
                    Poll::Pending => break,
                }
            }
            if idle.poll_idle(&mut self.timer, cx).is_ready() {
                return Poll::Ready(Err("no byte of the response moved for idle_timeout"));
            }
            Poll::Pending
        })
        .await;
        drop(body);
        if let Err(why) = sent {
            return After::Abort(why);
        }

        if upgrade {
            if body_left {
                // The client's side would start with the rest of its request body.
                return After::Close;
            }
            return match self.service.take_tunnel() {
                Some(tunnel) => After::Upgrade(tunnel),
                None => After::Close,
            };
        }
        if Arc::strong_count(&self.wire) > 1 {
            // Something kept the request body: it could read the next request's bytes.
            return After::Close;
        }
        if !self.pass_over_body() {
            // The rest of the body is still to come: the connection cannot tell it from the
            // next request without reading it, so it closes, once the client has had a moment
            // to take the response.
            return After::Close;
        }
        if close {
            After::Close
        } else {
            After::Again
        }
    }
}

/// Watches an exchange for `idle_timeout` without bytes moving, looking every quarter of it
/// (at most every second) rather than reading the clock on every poll.
/// Costs nothing until the exchange first has to wait.
struct IdleCheck<'w, I> {
    wire: &'w SharedWire<I>,
    idle_timeout: Duration,
    /// The progress count at the last look, and since when it has not changed; `None` until
    /// the first wait.
    seen: Option<(u64, Instant)>,
}

impl<'w, I> IdleCheck<'w, I> {
    fn new(wire: &'w SharedWire<I>, idle_timeout: Duration) -> Self {
        IdleCheck {
            wire,
            idle_timeout,
            seen: None,
        }
    }

    fn look_every(&self) -> Duration {
        (self.idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
    }

    /// Ready once nothing moved for `idle_timeout`.
    fn poll_idle(&mut self, timer: &mut Pin<Box<Sleep>>, cx: &mut Context<'_>) -> Poll<()> {
        if self.seen.is_none() {
            let now = Instant::now();
            self.seen = Some((lock(self.wire).progress, now));
            timer.as_mut().reset(now + self.look_every());
        }
        loop {
            ready!(timer.as_mut().poll(cx));
            let now = Instant::now();
            let progress = lock(self.wire).progress;
            match self.seen {
                Some((seen, _)) if seen != progress => self.seen = Some((progress, now)),
                Some((_, since)) if now.duration_since(since) >= self.idle_timeout => {
                    return Poll::Ready(())
                }
                _ => {}
            }
            timer.as_mut().reset(now + self.look_every());
        }
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
}

/// The server's stop signal, looked at each time a connection's task wakes. Polling tokio's
/// watch takes a lock to register the waker again every time; this registers it only when the
/// task's waker changed, and otherwise reads the signal's version.
pub(super) struct StopSignal {
    probe: watch::Receiver<bool>,
    stopped: Pin<Box<dyn Future<Output = ()> + Send>>,
    last_waker: LastWaker,
    /// `stopped` has finished: it may not be polled again.
    done: bool,
}

impl StopSignal {
    pub(super) fn new(stop: &watch::Receiver<bool>) -> Self {
        StopSignal {
            probe: stop.clone(),
            stopped: Box::pin(stopped(stop.clone())),
            last_waker: LastWaker::default(),
            done: false,
        }
    }

    /// Ready once the server stops (or its signal is gone); keeps being ready after.
    pub(super) fn poll_stopped(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.done {
            return Poll::Ready(());
        }
        let unchanged = matches!(self.probe.has_changed(), Ok(false));
        if unchanged && self.last_waker.is_this_task(cx) {
            // The waker `stopped` holds is this task's: a stop will wake it.
            return Poll::Pending;
        }
        self.probe.mark_unchanged();
        ready!(self.last_waker.poll(self.stopped.as_mut(), cx));
        self.done = true;
        Poll::Ready(())
    }
}

/// The `Date` header's value, formatted once a second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    use bytes::BytesMut;

    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }

    pub(super) fn put_now(out: &mut BytesMut) {
        let now = SystemTime::now();
        let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHED.with_borrow_mut(|(at, text)| {
            if *at != second {
                *at = second;
                *text = httpdate::fmt_http_date(now);
            }
            out.extend_from_slice(text.as_bytes());
        });
    }
}

#[cfg(test)]
mod tests;
