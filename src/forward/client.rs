//! The HTTP/1.1 client side of an upstream connection.
//!
//! An exchange runs in the request's own task: it writes the request, reads the answer's head,
//! and the answer's body then reads the rest from the socket as the client connection asks for
//! it. No task sits between a request and its upstream socket, so an answer wakes one task, not
//! two (hyper's client drives each connection from a task of its own, which cost a third of a
//! proxied request's instructions).
//!
//! Framing follows RFC 9112 section 6. A connection goes back to the pool only when its answer
//! ended exactly where its framing said, its request went out whole, and the upstream left
//! nothing more on it: a byte out of place would be read as the next request's answer.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body as _, Frame, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;

use crate::h1::{
    self, header_map, header_spans, headers_len, may_be_whole, put_headers, BodyDecoder,
    BodyEncoder, Decode, Encode, FramingError, HeadFacts, NotChunkedOnce, Step,
};
use crate::{Body, BoxError};

/// A connected upstream socket, plain or TLS.
pub(super) type Io = TokioIo<hyper_rustls::MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>>;

/// Most header lines an answer's head (or trailer section) may have, as hyper allows.
const MAX_HEADERS: usize = 100;
/// Largest answer head (or trailer section), as hyper's client allows.
const MAX_HEAD_BYTES: usize = 8192 + 4096 * 100;
/// Headers the stack may add to an answer: rate limits (four with Retry-After), the request
/// id, CORS (three).
const ANSWER_HEADERS_ADDED: usize = 8;
/// Room a read asks for at first, and again once the connection is back in the pool.
const READ_CHUNK: usize = 8 * 1024;
/// Most room a read asks for: reads that fill their room double it, so a large answer is read
/// in few system calls and forwarded in few pieces. Kept small: while a client does not read,
/// portcullis holds about one piece here and one in the client's write buffer (at 256 KiB
/// that came to 1.5 MiB per stalled download; see bench/HISTORY.md).
const MAX_READ_CHUNK: usize = 32 * 1024;
/// Buffers larger than this are let go when their connection goes back to the pool: an idle
/// connection should not keep what one large exchange needed.
const IDLE_BUFFER_LIMIT: usize = 16 * 1024;
/// The request body is read from the client only while less than this waits to be written.
const WRITE_HIGH_WATER: usize = 64 * 1024;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Nothing of an answer arrived before the connection closed: the upstream closed it under
    /// the request (a keep-alive timeout, a restart).
    #[error("the upstream closed the connection before answering")]
    ClosedBeforeAnswer(#[source] Option<io::Error>),
    #[error("writing to the upstream failed")]
    Write(#[source] io::Error),
    #[error("reading from the upstream failed")]
    Read(#[source] io::Error),
    #[error("the upstream closed the connection in the middle of an answer")]
    Truncated,
    #[error("the upstream's answer is malformed: {0}")]
    Malformed(&'static str),
    #[error("the upstream's answer head is malformed")]
    MalformedHead(#[source] httparse::Error),
    #[error("the request body failed")]
    Upload(#[source] BoxError),
    #[error("the request body does not match its framing: {0}")]
    UploadLength(&'static str),
}

impl From<FramingError> for Error {
    fn from(e: FramingError) -> Self {
        match e {
            FramingError::Malformed(why) => Error::Malformed(why),
            FramingError::Head(e) => Error::MalformedHead(e),
        }
    }
}

impl Error {
    /// The request may not have reached the upstream in a state it could act on.
    pub fn closed_before_answer(&self) -> bool {
        matches!(self, Error::ClosedBeforeAnswer(_))
    }
}

/// Where a connection goes when its exchange is complete and it can carry another.
pub(super) trait Home: Send + Sync + Unpin + 'static {
    fn take_back(&self, conn: Conn);
}

/// An upstream connection between exchanges.
pub struct Conn {
    /// The socket and its place (see [`Line`]).
    io: Box<Line>,
    /// Read from the upstream and not yet consumed.
    read: BytesMut,
    /// Waiting to be written to the upstream.
    write: BytesMut,
    /// Room the next read asks for.
    read_size: usize,
    /// The read buffer's allocation passed [`IDLE_BUFFER_LIMIT`]. Kept as a flag: pieces of
    /// the allocation may still be on their way to the client when the connection rests, and
    /// a shared allocation does not tell its size.
    read_grew: bool,
}

/// A connection's socket, with its place under `upstream.max_connections` (given back when it
/// closes). Boxed together: a TLS session is large, and a connection moves in and out of the
/// pool and through every request's future.
pub(super) struct Line {
    io: Io,
    _slot: Option<OwnedSemaphorePermit>,
}

impl Conn {
    pub(super) fn new(io: Io, slot: Option<OwnedSemaphorePermit>) -> Conn {
        Conn {
            io: Box::new(Line { io, _slot: slot }),
            read: BytesMut::new(),
            write: BytesMut::new(),
            read_size: READ_CHUNK,
            read_grew: false,
        }
    }

    /// Ready to wait in the pool: reads start small again, and buffers a large exchange grew
    /// are let go.
    pub(super) fn rest(&mut self) {
        self.read_size = READ_CHUNK;
        if std::mem::take(&mut self.read_grew) {
            self.read = BytesMut::new();
        }
        // Empty at rest and never shared, the write buffer can say how large its allocation
        // is: `capacity` alone cannot, as it counts only the room after what was written.
        if self.write.try_reclaim(IDLE_BUFFER_LIMIT + 1) {
            self.write = BytesMut::new();
        }
    }

    /// Still open, with nothing on it that no request asked for. Looks without waiting: the
    /// socket is polled with a waker that does nothing, outside tokio's budget (which would
    /// otherwise answer "not yet" for a socket with news on it).
    pub(super) fn is_open(&mut self) -> bool {
        if !self.read.is_empty() || !self.write.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        // A byte is as telling as a buffer full, and needs no room reserved.
        let mut byte = [0u8; 1];
        let io = &mut self.io.io;
        let probe = tokio::task::unconstrained(std::future::poll_fn(|cx| {
            Pin::new(&mut *io).poll_read(cx, &mut ReadBuf::new(&mut byte))
        }));
        // Ready means an end of stream, an error, or bytes no request asked for.
        std::pin::pin!(probe).poll(&mut cx).is_pending()
    }

    /// Reads what the upstream has sent into `read`; `Ok(0)` at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.read.capacity() - self.read.len() < self.read_size / 2 {
            self.read.reserve(self.read_size);
            self.read_grew |= self.read.capacity() > IDLE_BUFFER_LIMIT;
        }
        let room = self.read.capacity() - self.read.len();
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io.io),
            cx,
            &mut self.read
        ))?;
        if n == room && self.read_size < MAX_READ_CHUNK {
            self.read_size *= 2;
        }
        Poll::Ready(Ok(n))
    }

    /// Writes all of `write`, then flushes (TLS keeps records back until then).
    fn poll_write_all(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        h1::poll_write_all(&mut self.io.io, &mut self.write, cx)
    }
}

/// What an exchange produced: an answer whose body reads the rest of it, or, for a 101, the
/// connection handed to the new protocol.
pub(super) enum Answer<H: Home> {
    Response(Response<ResponseBody<H>>),
    Switched(Response<()>, Upgraded),
}

/// Sends `req` (origin-form target, Host set, HTTP/1.1 framing headers as they are to be
/// written) on `conn` and reads the answer's head. A request body goes on being sent while
/// the answer is read: an upstream may answer early, and one that streams its answer as the
/// body arrives gets the rest of the body as its answer is read.
pub(super) async fn exchange<H: Home>(
    mut conn: Conn,
    req: Request<Body>,
    home: H,
) -> Result<Answer<H>, Error> {
    let (mut parts, body) = req.into_parts();
    let mut upload = Some(Upload::start(&mut parts, body, &mut conn.write)?);
    let mut write_error = None;
    let mut progress = HeadProgress::default();
    let head = std::future::poll_fn(|cx| {
        if let Some(sending) = &mut upload {
            match sending.poll_send(&mut conn, cx) {
                Poll::Ready(Ok(())) => upload = None,
                // The upstream may have answered and closed: read what it said.
                Poll::Ready(Err(Error::Write(e))) => {
                    upload = None;
                    write_error = Some(e);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        }
        match ready!(poll_head(&mut conn, cx, &parts.method, &mut progress)) {
            Err(Error::ClosedBeforeAnswer(None)) if write_error.is_some() => {
                Poll::Ready(Err(Error::ClosedBeforeAnswer(write_error.take())))
            }
            other => Poll::Ready(other),
        }
    })
    .await?;
    // An answer after a failed write comes on a connection that cannot carry another.
    let keep_alive = head.keep_alive && write_error.is_none();

    if head.status == StatusCode::SWITCHING_PROTOCOLS {
        // The request went out whole before the upstream could agree to switch; what is
        // left is at most a flush.
        if let Some(mut sending) = upload {
            std::future::poll_fn(|cx| sending.poll_send(&mut conn, cx)).await?;
        }
        let response = head.into_response(());
        let upgraded = Upgraded {
            io: conn.io,
            read: conn.read,
        };
        return Ok(Answer::Switched(response, upgraded));
    }

    let mut body = ResponseBody {
        conn: Some(conn),
        upload,
        decoder: BodyDecoder::new(head.framing),
        keep_alive,
        home,
    };
    if body.decoder.is_done() {
        body.finish();
    }
    Ok(Answer::Response(head.into_response(body)))
}

/// The request body on its way up, framed as its head says.
struct Upload {
    body: Body,
    encoder: BodyEncoder,
}

impl Upload {
    /// Writes the request head into `out` and sets the body up to follow it.
    fn start(
        parts: &mut http::request::Parts,
        body: Body,
        out: &mut BytesMut,
    ) -> Result<Upload, Error> {
        let facts = HeadFacts::of(&parts.headers);
        let framing = if facts.transfer_encoding {
            Encode::Chunked
        } else {
            match facts.content_length() {
                Ok(Some(length)) => {
                    // Repeated, a list, or padded with zeros: as one plain value (RFC 9110 8.6),
                    // which every upstream reads alike (Node's parser refuses a list).
                    if facts.content_length_unusual {
                        parts
                            .headers
                            .insert(header::CONTENT_LENGTH, http::HeaderValue::from(length));
                    }
                    Encode::Length(length)
                }
                Ok(None) => Encode::None,
                Err(why) => return Err(Error::UploadLength(why)),
            }
        };
        encode_head(parts, out);
        let mut upload = Upload {
            encoder: BodyEncoder::new(framing),
            body,
        };
        if upload.body.is_end_stream() {
            upload.end(out)?;
        }
        Ok(upload)
    }

    /// Moves the body into `conn`'s write buffer and the buffer to the upstream; ready once all
    /// of the request has been written.
    fn poll_send(&mut self, conn: &mut Conn, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        loop {
            while !self.encoder.is_ended() && conn.write.len() < WRITE_HIGH_WATER {
                match Pin::new(&mut self.body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        // A client's trailers are not passed on (the encoder drops them): no
                        // check reads them, so one named like an identity header would reach
                        // the upstream as though portcullis had set it.
                        self.encoder
                            .encode(frame, &mut conn.write)
                            .map_err(Error::UploadLength)?;
                        if self.body.is_end_stream() {
                            self.end(&mut conn.write)?;
                        }
                    }
                    Poll::Ready(None) => self.end(&mut conn.write)?,
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(Error::Upload(e))),
                    Poll::Pending => break,
                }
            }
            if conn.write.is_empty() && !self.encoder.is_ended() {
                // Waiting for the client's next piece of the body; what went before must not
                // wait with it (TLS holds records back until flushed).
                ready!(Pin::new(&mut conn.io.io).poll_flush(cx)).map_err(Error::Write)?;
                return Poll::Pending;
            }
            ready!(conn.poll_write_all(cx)).map_err(Error::Write)?;
            if self.encoder.is_ended() {
                return Poll::Ready(Ok(()));
            }
        }
    }

    fn end(&mut self, out: &mut BytesMut) -> Result<(), Error> {
        self.encoder.end(out).map_err(Error::UploadLength)
    }
}

/// `METHOD target HTTP/1.1`, then each header as it is.
fn encode_head(parts: &http::request::Parts, out: &mut BytesMut) {
    let target = parts
        .uri
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str);
    let headers_len = headers_len(&parts.headers);
    out.reserve(parts.method.as_str().len() + target.len() + 13 + headers_len);
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.put_u8(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    put_headers(out, &parts.headers);
    out.extend_from_slice(b"\r\n");
}

/// An answer's head, parsed.
#[derive(Debug)]
struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    /// A reason phrase other than the status code's usual one, kept for the client.
    reason: Option<hyper::ext::ReasonPhrase>,
    framing: Decode,
    keep_alive: bool,
}

impl Head {
    fn into_response<B>(self, body: B) -> Response<B> {
        let mut response = Response::new(body);
        *response.status_mut() = self.status;
        *response.version_mut() = self.version;
        *response.headers_mut() = self.headers;
        if let Some(reason) = self.reason {
            response.extensions_mut().insert(reason);
        }
        response
    }
}

/// How far reading an answer's head has come, kept between polls.
#[derive(Default)]
struct HeadProgress {
    /// Some byte of an answer arrived.
    received: bool,
    /// Bytes in the read buffer already looked through for the head's end: a head that
    /// arrives in many pieces is scanned once, not parsed again from its start on every piece.
    looked_at: usize,
}

/// Reads until a final answer's head is complete; informational answers (100, 103) are read
/// and dropped.
fn poll_head(
    conn: &mut Conn,
    cx: &mut Context<'_>,
    method: &Method,
    progress: &mut HeadProgress,
) -> Poll<Result<Head, Error>> {
    loop {
        if !conn.read.is_empty() {
            progress.received = true;
            if !may_be_whole(&conn.read, progress.looked_at) {
                if conn.read.len() > MAX_HEAD_BYTES {
                    return Poll::Ready(Err(Error::Malformed("the head is too large")));
                }
                progress.looked_at = conn.read.len();
            } else {
                match parse_head(&mut conn.read, method)? {
                    Parsed::Final(head) => return Poll::Ready(Ok(head)),
                    Parsed::Informational => {
                        progress.looked_at = 0;
                        continue;
                    }
                    Parsed::Partial if conn.read.len() > MAX_HEAD_BYTES => {
                        return Poll::Ready(Err(Error::Malformed("the head is too large")))
                    }
                    Parsed::Partial => progress.looked_at = conn.read.len(),
                }
            }
        }
        match ready!(conn.poll_fill(cx)) {
            Ok(0) if progress.received => return Poll::Ready(Err(Error::Truncated)),
            Ok(0) => return Poll::Ready(Err(Error::ClosedBeforeAnswer(None))),
            Ok(_) => {}
            Err(e) if !progress.received && closed_under_us(&e) => {
                return Poll::Ready(Err(Error::ClosedBeforeAnswer(Some(e))))
            }
            Err(e) => return Poll::Ready(Err(Error::Read(e))),
        }
    }
}

/// The upstream closed the connection. `UnexpectedEof` is TLS's word for a TCP close without
/// `close_notify`, which many https servers end kept-alive connections with. (In a body that
/// runs until the close, it stays an error: RFC 9112 9.8 counts only a length or a last chunk
/// as complete then.)
fn closed_under_us(e: &io::Error) -> bool {
    use io::ErrorKind;
    matches!(
        e.kind(),
        ErrorKind::ConnectionReset
            | ErrorKind::BrokenPipe
            | ErrorKind::ConnectionAborted
            | ErrorKind::UnexpectedEof
    )
}

#[derive(Debug)]
enum Parsed {
    Partial,
    Informational,
    Final(Head),
}

/// Parses the head at the start of `buf`, taking it off `buf` when complete. Header values
/// share the head's bytes rather than copying them.
fn parse_head(buf: &mut BytesMut, method: &Method) -> Result<Parsed, Error> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut parsed,
        buf,
        &mut slots,
    ) {
        // The limit holds however the head arrived: whole in one large read, too.
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD_BYTES => {
            return Err(Error::Malformed("the head is too large"))
        }
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(e) => return Err(Error::MalformedHead(e)),
    };
    let status = parsed
        .code
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or(Error::Malformed("the status code is out of range"))?;
    if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
        buf.advance(len);
        return Ok(Parsed::Informational);
    }
    let version = match parsed.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    let reason = parsed
        .reason
        .filter(|r| !r.is_empty() && Some(*r) != status.canonical_reason())
        .and_then(|r| hyper::ext::ReasonPhrase::try_from(r.as_bytes()).ok());

    // Where each name and value lies in the head, so that the head can be frozen and shared.
    let spans = header_spans(buf, len, parsed.headers);
    let head = buf.split_to(len).freeze();

    // Room for what the stack adds on the way back (rate-limit headers, the request id), so
    // that the map does not grow, rehashing, as they go in.
    let (mut headers, facts) =
        header_map(&head, spans, ANSWER_HEADERS_ADDED).map_err(Error::Malformed)?;
    let (framing, keep_alive) = framing(status, version, method, &mut headers, &facts)?;
    Ok(Parsed::Final(Head {
        status,
        version,
        headers,
        reason,
        framing,
        keep_alive,
    }))
}

/// How the answer's body is delimited (RFC 9112 6.3), and whether the connection can carry
/// another exchange after it. A Content-Length beside a Transfer-Encoding is removed: the
/// latter decides, and the client must not be told otherwise.
fn framing(
    status: StatusCode,
    version: Version,
    method: &Method,
    headers: &mut HeaderMap,
    facts: &HeadFacts,
) -> Result<(Decode, bool), Error> {
    let keep_alive = !facts.close && (version == Version::HTTP_11 || facts.keep_alive);
    // Passed on as one value, which every client reads (RFC 9110 8.6): Node refuses a list or
    // a repeated line, and HTTP/2 clients reset the stream.
    if let (true, Ok(Some(length))) = (facts.content_length_unusual, facts.content_length()) {
        headers.insert(header::CONTENT_LENGTH, http::HeaderValue::from(length));
    }

    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Ok((Decode::Done, keep_alive));
    }
    if status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || method == Method::HEAD
    {
        // No body follows, whatever the head says. A head that announces one anyway (for HEAD,
        // the length a GET would get) comes from an upstream that may also send it, perhaps a
        // moment later: on a reused connection those bytes would be read as the next request's
        // answer, which may be another client's. Such a connection carries nothing more.
        let announces_body =
            facts.transfer_encoding || !matches!(facts.content_length(), Ok(None | Some(0)));
        return Ok((Decode::Done, keep_alive && !announces_body));
    }
    if facts.transfer_encoding {
        if version == Version::HTTP_10 {
            return Err(Error::Malformed("Transfer-Encoding in an HTTP/1.0 answer"));
        }
        // Only `chunked` is decoded, once: a body under another coding (gzip), or chunked twice,
        // would reach the client as if it were plain, its Transfer-Encoding removed as
        // hop-by-hop.
        match h1::chunked_once(headers) {
            Ok(()) => {}
            Err(NotChunkedOnce::OtherCoding) => {
                return Err(Error::Malformed("a transfer coding other than chunked"))
            }
            Err(NotChunkedOnce::Repeated) => {
                return Err(Error::Malformed("chunked applied more than once"))
            }
        }
        // Both at once is how request smuggling starts (RFC 9112 6.3): read this answer by its
        // Transfer-Encoding, then trust the connection no further.
        let keep_alive = keep_alive && headers.remove(header::CONTENT_LENGTH).is_none();
        return Ok((Decode::ChunkSize, keep_alive));
    }
    Ok(match facts.content_length().map_err(Error::Malformed)? {
        Some(0) => (Decode::Done, keep_alive),
        Some(n) => (Decode::Length(n), keep_alive),
        None => (Decode::UntilClose, false),
    })
}

/// An answer's body, read from the connection as it is polled. Read to its end, it sends the
/// connection home; dropped before that, it closes it.
pub(super) struct ResponseBody<H: Home> {
    conn: Option<Conn>,
    /// The request body, if the upstream answered before all of it went up.
    upload: Option<Upload>,
    decoder: BodyDecoder,
    keep_alive: bool,
    home: H,
}

impl<H: Home> ResponseBody<H> {
    /// The body has ended: the connection goes home if it can carry another exchange.
    fn finish(&mut self) {
        self.decoder = BodyDecoder::new(Decode::Done);
        if let Some(conn) = self.conn.take() {
            if self.keep_alive && self.upload.is_none() && conn.read.is_empty() {
                self.home.take_back(conn);
            }
        }
    }

    fn fail(&mut self, error: Error) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        self.decoder = BodyDecoder::new(Decode::Done);
        self.conn = None;
        Poll::Ready(Some(Err(error)))
    }

    /// The next frame of the body; `Ready(None)` at its end.
    fn poll_decode(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let step = match self.decoder.step(&mut conn.read) {
                Ok(step) => step,
                Err(e) => return self.fail(e.into()),
            };
            match step {
                Step::Data(data) => {
                    if self.decoder.is_done() {
                        self.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Step::Trailers(mut trailers) => {
                    self.finish();
                    super::strip_trailer_fields(&mut trailers);
                    if trailers.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                Step::End => {
                    self.finish();
                    return Poll::Ready(None);
                }
                Step::NeedMore => {}
            }
            match ready!(conn.poll_fill(cx)) {
                // The end of the stream is the end of a body that runs until it, and the
                // connection's end too.
                Ok(0) => match self.decoder.peer_closed() {
                    Ok(_) => {
                        self.conn = None;
                        return Poll::Ready(None);
                    }
                    Err(_) => return self.fail(Error::Truncated),
                },
                Ok(_) => {}
                Err(e) => return self.fail(Error::Read(e)),
            }
        }
    }
}

impl<H: Home> http_body::Body for ResponseBody<H> {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        // An upstream that answered before the whole request body arrived gets the rest while
        // its answer is read; one that streams its answer as the body comes needs it.
        if let (Some(upload), Some(conn)) = (&mut this.upload, &mut this.conn) {
            match upload.poll_send(conn, cx) {
                Poll::Ready(Ok(())) => this.upload = None,
                // The upstream stopped reading; what it says may still be whole. Cut short,
                // the request leaves the connection unable to carry another.
                Poll::Ready(Err(Error::Write(e))) => {
                    tracing::debug!(error = %e, "request body cut short after the answer began");
                    this.upload = None;
                    this.keep_alive = false;
                }
                // The client's body failed (too large, broken off): the upstream would wait for
                // the rest forever, so the exchange ends here.
                Poll::Ready(Err(e)) => {
                    this.upload = None;
                    return this.fail(e);
                }
                Poll::Pending => {}
            }
        }
        this.poll_decode(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder.state() {
            Decode::Length(n) => SizeHint::with_exact(n),
            Decode::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// The upstream's side of a switched connection: what it sent after its 101, then the socket.
pub struct Upgraded {
    io: Box<Line>,
    read: BytesMut,
}

impl AsyncRead for Upgraded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.read.is_empty() {
            let n = this.read.len().min(buf.remaining());
            buf.put_slice(&this.read[..n]);
            this.read.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io.io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    //! Each exchange runs against a real socket whose other end the test scripts byte by byte.

    use std::sync::{Arc, Mutex};

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use http::header::HeaderValue;

    /// Where the tests' connections go home: they can be counted and used again.
    #[derive(Clone, Default)]
    struct Kennel(Arc<Mutex<Vec<Conn>>>);

    impl Home for Kennel {
        fn take_back(&self, conn: Conn) {
            self.0.lock().unwrap().push(conn);
        }
    }

    impl Kennel {
        fn take(&self) -> Option<Conn> {
            self.0.lock().unwrap().pop()
        }
    }

    /// A client connection and the upstream's end of it.
    async fn connected() -> (Conn, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (upstream, _) = listener.accept().await.unwrap();
        let io = hyper_rustls::MaybeHttpsStream::Http(TokioIo::new(client));
        (Conn::new(TokioIo::new(io), None), upstream)
    }

    fn request(method: Method, target: &str) -> Request<Body> {
        Request::builder()
            .method(method)
            .uri(target)
            .header(header::HOST, "game.internal")
            .body(Body::new(http_body_util::Empty::<Bytes>::new()))
            .unwrap()
    }

    fn get(target: &str) -> Request<Body> {
        request(Method::GET, target)
    }

    /// Reads one request head off `upstream` and returns it.
    async fn read_request_head(upstream: &mut TcpStream) -> String {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            assert_eq!(upstream.read(&mut byte).await.unwrap(), 1, "request head");
            head.push(byte[0]);
        }
        String::from_utf8(head).unwrap()
    }

    /// Sends `req` on `conn`; the upstream answers `answer` once it has the request's head.
    async fn exchange_with(
        conn: Conn,
        upstream: &mut TcpStream,
        req: Request<Body>,
        answer: &[u8],
        home: &Kennel,
    ) -> Result<Answer<Kennel>, Error> {
        let sent = exchange(conn, req, home.clone());
        let upstream_side = async {
            read_request_head(upstream).await;
            upstream.write_all(answer).await.unwrap();
        };
        let (result, ()) = tokio::join!(sent, upstream_side);
        result
    }

    fn response(answer: Answer<Kennel>) -> Response<ResponseBody<Kennel>> {
        match answer {
            Answer::Response(response) => response,
            Answer::Switched(..) => panic!("an ordinary answer was taken for a 101"),
        }
    }

    /// One GET answered with `answer`: the response, its body read to the end, and whether
    /// the connection went home.
    async fn get_answered(answer: &[u8]) -> (http::response::Parts, Result<Bytes, Error>, bool) {
        let (conn, mut upstream) = connected().await;
        let home = Kennel::default();
        let answer = exchange_with(conn, &mut upstream, get("/"), answer, &home).await;
        let (parts, body) = response(answer.unwrap()).into_parts();
        let body = body.collect().await.map(|c| c.to_bytes());
        let went_home = home.take().is_some();
        (parts, body, went_home)
    }

    /// As [`get_answered`], with the upstream closing the connection once its head has been
    /// read and `more` sent after it: the body, and whether the connection went home.
    async fn get_answered_then_closed(answer: &[u8], more: &[u8]) -> (Result<Bytes, Error>, bool) {
        let (conn, mut upstream) = connected().await;
        let home = Kennel::default();
        let answer = exchange_with(conn, &mut upstream, get("/"), answer, &home).await;
        let body = response(answer.unwrap()).into_body();
        upstream.write_all(more).await.unwrap();
        drop(upstream);
        let body = body.collect().await.map(|c| c.to_bytes());
        (body, home.take().is_some())
    }

    #[tokio::test]
    async fn a_request_is_written_as_its_head_says() {
        let (conn, mut upstream) = connected().await;
        let mut req = get("/shop/items?page=2&sort=a%20b");
        req.headers_mut()
            .append("x-user-id", HeaderValue::from_static("u-1"));
        req.headers_mut()
            .append("cookie", HeaderValue::from_static("a=1; b=2"));
        let sent = exchange(conn, req, Kennel::default());
        let seen = async {
            let head = read_request_head(&mut upstream).await;
            upstream
                .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                .await
                .unwrap();
            head
        };
        let (answer, head) = tokio::join!(sent, seen);
        assert_eq!(
            head,
            "GET /shop/items?page=2&sort=a%20b HTTP/1.1\r\nhost: game.internal\r\n\
             x-user-id: u-1\r\ncookie: a=1; b=2\r\n\r\n"
        );
        assert_eq!(response(answer.unwrap()).status(), StatusCode::NO_CONTENT);
    }

    #[tokio::test]
    async fn a_content_length_answer_is_read_whole_and_its_connection_reused() {
        let (conn, mut upstream) = connected().await;
        let home = Kennel::default();
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\n\r\nhello";
        let first = exchange_with(conn, &mut upstream, get("/1"), answer, &home).await;
        let (parts, body) = response(first.unwrap()).into_parts();
        assert_eq!(parts.headers["x-a"], "1");
        assert_eq!(parts.headers[header::CONTENT_LENGTH], "5");
        assert_eq!(body.size_hint().exact(), Some(5));
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");

        let conn = home.take().expect("the connection went home");
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecond";
        let second = exchange_with(conn, &mut upstream, get("/2"), answer, &home).await;
        let body = response(second.unwrap()).into_body();
        assert_eq!(body.collect().await.unwrap().to_bytes(), "second");
        assert!(home.take().is_some());
    }

    #[tokio::test]
    async fn a_chunked_answer_is_decoded_with_its_extensions_and_trailers() {
        let (conn, mut upstream) = connected().await;
        let home = Kennel::default();
        // Fields that frame or route a message, or belong to one connection, go no further:
        // an HTTP/2 client resets a stream whose trailers carry them.
        let answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
            5;name=value\r\nhello\r\nA \r\n, world!!!\r\n0\r\nx-checksum: 42\r\n\
            connection: close, x-private\r\nx-private: 1\r\ntransfer-encoding: chunked\r\n\
            content-length: 5\r\nkeep-alive: timeout=5\r\nhost: elsewhere\r\n\r\n";
        let answer = exchange_with(conn, &mut upstream, get("/"), answer, &home).await;
        let body = response(answer.unwrap()).into_body();
        let collected = body.collect().await.unwrap();
        let trailers = collected.trailers().unwrap();
        let names: Vec<_> = trailers.keys().map(|name| name.as_str()).collect();
        assert_eq!(names, ["x-checksum"]);
        assert_eq!(trailers["x-checksum"], "42");
        assert_eq!(collected.to_bytes(), "hello, world!!!");
        assert!(
            home.take().is_some(),
            "a complete chunked answer frees its connection"
        );
    }

    #[tokio::test]
    async fn a_trailer_section_left_empty_ends_the_body_without_one() {
        let (_, body, home) = get_answered(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
              2\r\nok\r\n0\r\nconnection: close\r\ncontent-length: 2\r\n\r\n",
        )
        .await;
        assert_eq!(body.unwrap(), "ok");
        assert!(home);
        let (conn, mut upstream) = connected().await;
        let answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
              0\r\ncontent-length: 0\r\n\r\n";
        let home = Kennel::default();
        let answer = exchange_with(conn, &mut upstream, get("/"), answer, &home).await;
        let collected = response(answer.unwrap()).into_body().collect().await;
        assert!(collected.unwrap().trailers().is_none());
    }

    #[tokio::test]
    async fn an_answer_arriving_a_byte_at_a_time_is_read_the_same() {
        let (conn, mut upstream) = connected().await;
        upstream.set_nodelay(true).unwrap();
        let home = Kennel::default();
        let answer: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-b: 2\r\n\r\n\
            3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let sent = async {
            let response = response(exchange(conn, get("/"), home.clone()).await.unwrap());
            response.into_body().collect().await.unwrap().to_bytes()
        };
        let dribble = async {
            read_request_head(&mut upstream).await;
            for byte in answer {
                upstream.write_all(&[*byte]).await.unwrap();
                upstream.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
        };
        let (body, ()) = tokio::join!(sent, dribble);
        assert_eq!(body, "abcde");
        assert!(home.take().is_some());
    }

    #[tokio::test]
    async fn transfer_encoding_overrides_content_length_which_is_removed() {
        // The body is read by its chunks; the connection is trusted no further.
        let (parts, body, home) = get_answered(
            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\ntransfer-encoding: chunked\r\n\r\n\
              2\r\nok\r\n0\r\n\r\n",
        )
        .await;
        assert!(!parts.headers.contains_key(header::CONTENT_LENGTH));
        assert_eq!(body.unwrap(), "ok");
        assert!(!home);
    }

    #[tokio::test]
    async fn an_answer_without_length_runs_until_close_and_ends_its_connection() {
        let (body, home) =
            get_answered_then_closed(b"HTTP/1.1 200 OK\r\n\r\nall of this", b", and this").await;
        assert_eq!(body.unwrap(), "all of this, and this");
        assert!(!home);
    }

    #[tokio::test]
    async fn connection_close_and_http_1_0_decide_reuse() {
        let cases: [(&[u8], bool); 5] = [
            (b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", true),
            (
                b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
                false,
            ),
            (
                b"HTTP/1.1 200 OK\r\nconnection: keep-alive, Close\r\ncontent-length: 0\r\n\r\n",
                false,
            ),
            (b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n", false),
            (
                b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n",
                true,
            ),
        ];
        for (answer, reused) in cases {
            let (_, body, home) = get_answered(answer).await;
            assert_eq!(body.unwrap(), "");
            assert_eq!(home, reused, "{}", String::from_utf8_lossy(answer));
        }
    }

    #[tokio::test]
    async fn bodiless_answers_end_at_once_and_are_reused_only_when_they_announce_no_body() {
        for (method, answer, reused) in [
            (Method::HEAD, &b"HTTP/1.1 200 OK\r\n\r\n"[..], true),
            (
                Method::HEAD,
                b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
                true,
            ),
            (Method::GET, b"HTTP/1.1 204 No Content\r\n\r\n", true),
            (Method::GET, b"HTTP/1.1 304 Not Modified\r\n\r\n", true),
            // A body announced: the upstream may send it after all, a moment later.
            (
                Method::HEAD,
                b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n",
                false,
            ),
            (
                Method::HEAD,
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                false,
            ),
            (
                Method::GET,
                b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n",
                false,
            ),
            (
                Method::GET,
                b"HTTP/1.1 304 Not Modified\r\ncontent-length: 50\r\n\r\n",
                false,
            ),
        ] {
            let what = String::from_utf8_lossy(answer);
            let (conn, mut upstream) = connected().await;
            let home = Kennel::default();
            let req = request(method.clone(), "/");
            let answer = exchange_with(conn, &mut upstream, req, answer, &home).await;
            let response = response(answer.unwrap());
            assert!(response.body().is_end_stream(), "{method} {what}");
            assert_eq!(
                home.take().is_some(),
                reused,
                "{method} {what}: home before the body is read"
            );
            // The length of what a GET would get is the client's to see.
            if what.contains("1234") {
                assert_eq!(response.headers()[header::CONTENT_LENGTH], "1234");
            }
        }
    }

    #[tokio::test]
    async fn informational_answers_are_passed_over() {
        let (parts, body, home) = get_answered(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n\
              HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
        )
        .await;
        assert_eq!(parts.status, StatusCode::CREATED);
        assert!(!parts.headers.contains_key("link"));
        assert_eq!(body.unwrap(), "ok");
        assert!(home);
    }

    #[tokio::test]
    async fn a_short_final_head_after_a_dribbled_informational_one_is_read() {
        let (conn, mut upstream) = connected().await;
        upstream.set_nodelay(true).unwrap();
        let home = Kennel::default();
        let early = b"HTTP/1.1 103 Early Hints\r\nlink: </a-stylesheet-with-a-long-name.css>\r\n\r";
        let sent = async {
            let response = response(exchange(conn, get("/"), home.clone()).await.unwrap());
            response.status()
        };
        let dribble = async {
            read_request_head(&mut upstream).await;
            for byte in early {
                upstream.write_all(&[*byte]).await.unwrap();
                tokio::task::yield_now().await;
            }
            // The informational head's last byte and the whole final head, shorter than it.
            upstream
                .write_all(b"\nHTTP/1.1 204 No Content\r\n\r\n")
                .await
                .unwrap();
        };
        // Not `timeout`, which polls the exchange once more when its time is up.
        let status = tokio::select! {
            biased;
            () = tokio::time::sleep(std::time::Duration::from_secs(5)) => {
                panic!("the final head was not read")
            }
            (status, ()) = async { tokio::join!(sent, dribble) } => status,
        };
        assert_eq!(status, StatusCode::NO_CONTENT);
    }

    #[tokio::test]
    async fn an_unusual_reason_phrase_is_kept_and_a_usual_one_is_not() {
        let (parts, _, _) =
            get_answered(b"HTTP/1.1 200 Fine Thanks\r\ncontent-length: 0\r\n\r\n").await;
        let reason = parts.extensions.get::<hyper::ext::ReasonPhrase>().unwrap();
        assert_eq!(reason.as_bytes(), b"Fine Thanks");
        let (parts, _, _) = get_answered(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
        assert!(parts.extensions.get::<hyper::ext::ReasonPhrase>().is_none());
    }

    #[tokio::test]
    async fn repeated_content_length_must_agree_and_goes_on_as_one_value() {
        let (parts, body, home) =
            get_answered(b"HTTP/1.1 200 OK\r\ncontent-length: 2, 2\r\ncontent-length: 2\r\n\r\nok")
                .await;
        assert_eq!(body.unwrap(), "ok");
        assert!(home);
        let lengths: Vec<_> = parts
            .headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .collect();
        assert_eq!(lengths, ["2"]);
        let (parts, _, _) = get_answered(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
        assert_eq!(parts.headers[header::CONTENT_LENGTH], "2");

        for answer in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: +2\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\ncontent-length: 0x2\r\n\r\nok",
        ] {
            let (conn, mut upstream) = connected().await;
            let home = Kennel::default();
            let result = exchange_with(conn, &mut upstream, get("/"), answer, &home);
            assert!(
                matches!(result.await, Err(Error::Malformed(_))),
                "{}",
                String::from_utf8_lossy(answer)
            );
        }
    }

    #[tokio::test]
    async fn malformed_heads_and_chunks_are_errors() {
        for answer in [
            &b"HTTP/1.1 2000 OK\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
            b"SMTP ready\r\n\r\n",
            b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
            // Codings other than chunked are not decoded, and the client would not be told.
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nzipped",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
            // Nor is chunked applied twice: decoded once, its inner framing would be body.
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        ] {
            let (conn, mut upstream) = connected().await;
            let home = Kennel::default();
            let result = exchange_with(conn, &mut upstream, get("/"), answer, &home);
            let error = result.await.err();
            assert!(
                matches!(error, Some(Error::Malformed(_) | Error::MalformedHead(_))),
                "{}: {error:?}",
                String::from_utf8_lossy(answer)
            );
        }
        for answer in [
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"[..],
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n",
        ] {
            let (_, body, home) = get_answered(answer).await;
            assert!(matches!(body, Err(Error::Malformed(_))), "{body:?}");
            assert!(!home);
        }
    }

    #[tokio::test]
    async fn a_head_larger_than_the_limit_is_refused() {
        let (conn, mut upstream) = connected().await;
        let sent = exchange(conn, get("/"), Kennel::default());
        let flood = async {
            read_request_head(&mut upstream).await;
            upstream.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
            let line = format!("x-filler: {}\r\n", "f".repeat(10_000));
            // Stops when the client gives up and closes.
            for _ in 0..MAX_HEAD_BYTES / line.len() + 2 {
                if upstream.write_all(line.as_bytes()).await.is_err() {
                    break;
                }
            }
        };
        let (result, ()) = tokio::join!(sent, flood);
        assert!(matches!(result, Err(Error::Malformed(_))));
    }

    #[test]
    fn a_whole_head_over_the_limit_is_refused_as_one_arriving_in_pieces_is() {
        let line = format!("x-filler: {}\r\n", "f".repeat(8_000));
        let head = |lines: usize| {
            let mut head = String::from("HTTP/1.1 200 OK\r\n");
            head.push_str(&line.repeat(lines));
            head.push_str("content-length: 0\r\n\r\n");
            BytesMut::from(head.as_bytes())
        };
        let fits = MAX_HEAD_BYTES / line.len() - 1;
        assert!(matches!(
            parse_head(&mut head(fits), &Method::GET),
            Ok(Parsed::Final(_))
        ));
        assert!(matches!(
            parse_head(&mut head(fits + 2), &Method::GET),
            Err(Error::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn bytes_after_the_answer_keep_the_connection_from_going_home() {
        let (_, body, home) =
            get_answered(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n")
                .await;
        assert_eq!(body.unwrap(), "ok");
        assert!(!home);
    }

    #[tokio::test]
    async fn a_body_cut_short_is_an_error() {
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf";
        let (body, home) = get_answered_then_closed(answer, b"").await;
        assert!(matches!(body, Err(Error::Truncated)), "{body:?}");
        assert!(!home);
    }

    #[tokio::test]
    async fn closing_before_any_byte_of_an_answer_is_told_apart() {
        let (conn, mut upstream) = connected().await;
        let sent = exchange(conn, get("/"), Kennel::default());
        let close = async {
            read_request_head(&mut upstream).await;
            drop(upstream);
        };
        let (result, ()) = tokio::join!(sent, close);
        assert!(result.err().unwrap().closed_before_answer());

        let (conn, mut upstream) = connected().await;
        let answer = b"HTTP/1.1 200 OK\r\ncontent-";
        let sent = exchange(conn, get("/"), Kennel::default());
        let close = async {
            read_request_head(&mut upstream).await;
            upstream.write_all(answer).await.unwrap();
            drop(upstream);
        };
        let (result, ()) = tokio::join!(sent, close);
        let error = result.err().unwrap();
        assert!(matches!(error, Error::Truncated), "{error:?}");
        assert!(!error.closed_before_answer());
    }

    #[tokio::test]
    async fn an_idle_connection_is_open_until_the_upstream_closes_it_or_speaks() {
        let (mut conn, upstream) = connected().await;
        assert!(conn.is_open());
        drop(upstream);
        // The end of the stream is seen once it arrives; no waker is left to tell us when.
        let mut closed = false;
        for _ in 0..100 {
            if !conn.is_open() {
                closed = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(closed, "a closed connection was still taken for open");

        let (mut conn, mut upstream) = connected().await;
        upstream
            .write_all(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
            .await
            .unwrap();
        let mut spoke = false;
        for _ in 0..100 {
            if !conn.is_open() {
                spoke = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(spoke, "bytes no request asked for were not noticed");
    }

    fn streamed(chunks: Vec<&'static str>) -> Body {
        let frames = chunks.into_iter().map(|c| {
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(c.as_bytes())))
        });
        Body::new(http_body_util::StreamBody::new(futures_util::stream::iter(
            frames,
        )))
    }

    /// Sends `req` and returns every byte the upstream received before it answered 200.
    async fn upload(
        req: Request<Body>,
        expect_len: usize,
    ) -> (Vec<u8>, Result<Answer<Kennel>, Error>) {
        let (conn, mut upstream) = connected().await;
        let sent = exchange(conn, req, Kennel::default());
        let receive = async {
            let mut seen = Vec::new();
            while seen.len() < expect_len {
                let mut buf = [0u8; 1024];
                // Fewer bytes than expected fail the comparison, rather than waiting for ever.
                let read = tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    upstream.read(&mut buf),
                );
                let Ok(n) = read.await else { break };
                let n = n.unwrap();
                if n == 0 {
                    break;
                }
                seen.extend_from_slice(&buf[..n]);
            }
            upstream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
            seen
        };
        let (result, seen) = tokio::join!(sent, receive);
        (seen, result)
    }

    #[tokio::test]
    async fn a_body_without_length_goes_up_chunked_and_one_with_length_as_is() {
        let mut req = Request::post("/chunked")
            .header(header::HOST, "h")
            .header(header::TRANSFER_ENCODING, "chunked")
            .body(streamed(vec!["hello", "", "0123456789abcdef!"]))
            .unwrap();
        *req.version_mut() = Version::HTTP_11;
        let expected = "POST /chunked HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n\
                        5\r\nhello\r\n11\r\n0123456789abcdef!\r\n0\r\n\r\n";
        let (seen, result) = upload(req, expected.len()).await;
        assert_eq!(String::from_utf8(seen).unwrap(), expected);
        assert!(result.is_ok());

        // A length repeated in a list or on two lines, as HTTP allows, is still the one length,
        // and goes up as one value; one with leading zeros goes up without them. A plain one is
        // written as it came.
        let cases: [(&[&'static str], &str); 4] = [
            (&["8, 8"], "8"),
            (&["8", "8"], "8"),
            (&["08"], "8"),
            (&["8"], "8"),
        ];
        for (values, written) in cases {
            let mut req = Request::put("/sized")
                .header(header::HOST, "h")
                .body(streamed(vec!["abcd", "efgh"]))
                .unwrap();
            for value in values {
                req.headers_mut()
                    .append(header::CONTENT_LENGTH, HeaderValue::from_static(value));
            }
            let expected = format!(
                "PUT /sized HTTP/1.1\r\nhost: h\r\ncontent-length: {written}\r\n\r\nabcdefgh"
            );
            let (seen, result) = upload(req, expected.len()).await;
            assert_eq!(String::from_utf8(seen).unwrap(), expected, "{values:?}");
            assert!(result.is_ok());
        }
    }

    #[tokio::test]
    async fn a_clients_trailers_are_not_passed_on() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-user-id", HeaderValue::from_static("admin"));
        let frames = vec![
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"data"))),
            Ok(Frame::trailers(trailers)),
        ];
        let req = Request::post("/t")
            .header(header::HOST, "h")
            .header(header::TRANSFER_ENCODING, "chunked")
            .body(Body::new(http_body_util::StreamBody::new(
                futures_util::stream::iter(frames),
            )))
            .unwrap();
        let expected = "POST /t HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n\
                        4\r\ndata\r\n0\r\n\r\n";
        let (seen, result) = upload(req, expected.len()).await;
        assert_eq!(String::from_utf8(seen).unwrap(), expected);
        assert!(result.is_ok());
    }

    #[tokio::test]
    async fn a_body_that_breaks_its_content_length_is_refused() {
        for (length, chunks) in [("3", vec!["abcd"]), ("10", vec!["abcd"])] {
            let (conn, _upstream) = connected().await;
            let req = Request::post("/")
                .header(header::HOST, "h")
                .header(header::CONTENT_LENGTH, length)
                .body(streamed(chunks))
                .unwrap();
            let result = exchange(conn, req, Kennel::default()).await;
            assert!(matches!(result, Err(Error::UploadLength(_))), "{length}");
        }
    }

    #[tokio::test]
    async fn an_early_answer_arrives_while_the_body_is_still_going_up() {
        let (conn, mut upstream) = connected().await;
        let home = Kennel::default();
        // A body the client has not finished sending.
        let (tx, body) = crate::tls::for_tests::fed_body();
        let req = Request::post("/upload")
            .header(header::HOST, "h")
            .header(header::CONTENT_LENGTH, "1000000")
            .body(body)
            .unwrap();
        let sent = exchange(conn, req, home.clone());
        let refuse = async {
            read_request_head(&mut upstream).await;
            upstream
                .write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 4\r\n\r\nnope")
                .await
                .unwrap();
        };
        let feed = async {
            tx.send(Bytes::from_static(b"first part")).await.unwrap();
        };
        let (answer, (), ()) = tokio::join!(sent, refuse, feed);
        // The sender stays open: the body never ends.
        let response = response(answer.unwrap());
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(
            response.into_body().collect().await.unwrap().to_bytes(),
            "nope"
        );
        assert!(
            home.take().is_none(),
            "a connection whose request went up in part cannot carry another"
        );
    }

    /// A TLS connection whose socket holds only a few KiB between the client and the
    /// upstream's end (`crate::tls::for_tests::small_buffered_pair`), with TLS served on it.
    async fn connected_over_tls_with_small_buffers(
    ) -> (Conn, tokio_rustls::server::TlsStream<TcpStream>) {
        use crate::tls::for_tests::{handshake, small_buffered_pair};
        let (client, upstream) = small_buffered_pair(true).await;
        let (client, upstream) = handshake(TokioIo::new(TokioIo::new(client)), upstream).await;
        let io = hyper_rustls::MaybeHttpsStream::Https(TokioIo::new(client));
        (Conn::new(TokioIo::new(io), None), upstream)
    }

    #[tokio::test]
    async fn what_an_upload_wrote_over_tls_goes_out_while_it_waits_for_the_client() {
        // Much more than the sockets hold: the upload waits for its socket again and again,
        // and TLS still holds records back when the client's first part has all been written.
        const FIRST: usize = 512 * 1024;
        let (conn, mut upstream) = connected_over_tls_with_small_buffers().await;
        let (tx, body) = crate::tls::for_tests::fed_body();
        let req = Request::post("/upload")
            .header(header::HOST, "h")
            .header(header::CONTENT_LENGTH, (FIRST + 1).to_string())
            .body(body)
            .unwrap();
        let sent = exchange(conn, req, Kennel::default());
        // The upstream answers once it has the whole body; the client sends its last byte only
        // once the upstream has all the rest. If what went out before the client's pause stayed
        // in TLS, each would wait for the other for ever.
        let (got_first, first_arrived) = tokio::sync::oneshot::channel::<()>();
        let upstream_side = async {
            crate::tls::for_tests::read_paused_message(&mut upstream, FIRST, got_first).await;
            upstream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .unwrap();
            upstream.flush().await.unwrap();
        };
        let client_side = async {
            tx.send(Bytes::from(vec![b'x'; FIRST])).await.unwrap();
            first_arrived.await.unwrap();
            tx.send(Bytes::from_static(b"y")).await.unwrap();
        };
        let (answer, (), ()) = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            tokio::join!(sent, upstream_side, client_side)
        })
        .await
        .expect("the upload went through");
        let response = response(answer.unwrap());
        assert_eq!(response.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn a_switch_hands_over_the_connection_with_what_followed_the_101() {
        let (conn, mut upstream) = connected().await;
        let mut req = get("/ws");
        req.headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        let answer = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\nframe-1";
        let home = Kennel::default();
        let answer = exchange_with(conn, &mut upstream, req, answer, &home).await;
        let Ok(Answer::Switched(response, mut upgraded)) = answer else {
            panic!("a 101 was not taken for a switch");
        };
        assert_eq!(response.headers()[header::UPGRADE], "websocket");
        upstream.write_all(b"+frame-2").await.unwrap();
        let mut got = vec![0u8; "frame-1+frame-2".len()];
        upgraded.read_exact(&mut got).await.unwrap();
        assert_eq!(got, b"frame-1+frame-2");
        upgraded.write_all(b"reply").await.unwrap();
        let mut reply = [0u8; 5];
        upstream.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"reply");
        assert!(home.take().is_none());
    }

    #[tokio::test]
    async fn a_body_that_fails_after_the_answer_began_ends_the_exchange() {
        let (conn, mut upstream) = connected().await;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, BoxError>>(1);
        let body =
            http_body_util::StreamBody::new(futures_util::stream::unfold(rx, |mut rx| async {
                let item = rx.recv().await?;
                Some((item.map(Frame::data), rx))
            }));
        let req = Request::post("/stream")
            .header(header::HOST, "h")
            .header(header::TRANSFER_ENCODING, "chunked")
            .body(Body::new(body))
            .unwrap();
        let home = Kennel::default();
        // A streaming upstream: it answers at once and goes on reading.
        let answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n";
        let sent = exchange_with(conn, &mut upstream, req, answer, &home);
        let (answer, ()) = tokio::join!(sent, async {
            tx.send(Ok(Bytes::from_static(b"part"))).await.unwrap();
        });
        let mut body = response(answer.unwrap()).into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "ok");
        tx.send(Err("the client went away".into())).await.unwrap();
        let next = tokio::time::timeout(std::time::Duration::from_secs(5), body.frame())
            .await
            .expect("the exchange ended rather than waiting for the upstream");
        assert!(matches!(next, Some(Err(Error::Upload(_)))), "{next:?}");
        assert!(home.take().is_none());
    }

    #[tokio::test]
    async fn chunk_extensions_are_bounded_per_body() {
        // Extensions, or whitespace alone after each size.
        for extension in [format!(";{}", "e".repeat(1000)), " ".repeat(1001)] {
            let mut answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
            for _ in 0..crate::h1::MAX_CHUNK_EXTENSIONS / 1000 + 1 {
                answer.extend_from_slice(format!("1{extension}\r\nx\r\n").as_bytes());
            }
            answer.extend_from_slice(b"0\r\n\r\n");
            let (_, body, home) = get_answered(&answer).await;
            assert!(matches!(body, Err(Error::Malformed(_))), "{body:?}");
            assert!(!home);
        }
    }

    #[tokio::test]
    async fn a_large_answer_is_read_in_growing_pieces_and_its_buffers_let_go_at_rest() {
        const LEN: usize = 4 * 1024 * 1024;
        let (conn, mut upstream) = connected().await;
        let home = Kennel::default();
        let sent = exchange(conn, get("/big"), home.clone());
        let serve = async {
            read_request_head(&mut upstream).await;
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {LEN}\r\n\r\n");
            upstream.write_all(head.as_bytes()).await.unwrap();
            upstream
        };
        let (answer, mut upstream) = tokio::join!(sent, serve);
        let mut body = response(answer.unwrap()).into_body();
        let write_body = tokio::spawn(async move {
            upstream.write_all(&vec![b'x'; LEN]).await.unwrap();
            upstream
        });
        let (mut pieces, mut received) = (0, 0);
        while let Some(frame) = body.frame().await {
            received += frame.unwrap().into_data().unwrap().len();
            pieces += 1;
        }
        let _upstream = write_body.await.unwrap();
        assert_eq!(received, LEN);
        // In fixed 8 KiB reads this would be 512 pieces.
        assert!(pieces < 200, "{pieces} pieces");

        let mut conn = home.take().expect("the connection went home");
        assert!(conn.read_size > READ_CHUNK);
        assert!(conn.read_grew);
        conn.rest();
        assert_eq!(conn.read_size, READ_CHUNK);
        assert_eq!(conn.read.capacity(), 0, "the large read buffer was let go");
    }

    #[tokio::test]
    async fn a_large_upload_leaves_no_large_write_buffer_at_rest() {
        const LEN: usize = 200 * 1024;
        let (conn, mut upstream) = connected().await;
        let home = Kennel::default();
        let req = Request::post("/upload")
            .header(header::HOST, "h")
            .header(header::CONTENT_LENGTH, LEN.to_string())
            .body(Body::new(http_body_util::Full::new(Bytes::from(vec![
                b'u';
                LEN
            ]))))
            .unwrap();
        let sent = exchange(conn, req, home.clone());
        let receive = async {
            let head = read_request_head(&mut upstream).await;
            let mut body = vec![0u8; LEN];
            upstream.read_exact(&mut body).await.unwrap();
            upstream
                .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                .await
                .unwrap();
            head
        };
        let (answer, head) = tokio::join!(sent, receive);
        assert!(head.starts_with("POST /upload HTTP/1.1\r\n"));
        assert_eq!(response(answer.unwrap()).status(), StatusCode::NO_CONTENT);
        let mut conn = home.take().expect("the connection went home");
        // What the test checks: the upload left a large allocation behind...
        assert!(conn.write.is_empty() && conn.write.capacity() < IDLE_BUFFER_LIMIT);
        conn.rest();
        // ...which rest lets go of.
        assert!(!conn.write.try_reclaim(1), "the write buffer was let go");
    }
}
