//! HTTP/1.1 message framing (RFC 9112 sections 6 and 7), shared by the public listener's
//! server side and the upstream pool's client side: reading a body as its framing says, and
//! writing one framed as its head says.
//!
//! Both sides read untrusted bytes, so both read them alike and strictly: a lenient reading
//! that differs from the other party's is how two parties come to disagree on where a message
//! ends.

use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http_body::Frame;
use smallvec::SmallVec;
use tokio::io::AsyncWrite;

/// Most header lines a trailer section may have.
const MAX_TRAILERS: usize = 100;
/// Largest trailer section.
pub(crate) const MAX_TRAILER_BYTES: usize = 8192 + 4096 * 100;
/// Longest chunk-size line, extensions included.
pub(crate) const MAX_CHUNK_LINE: usize = 4096;
/// Most bytes of chunk extensions in one body (hyper's limit too).
pub(crate) const MAX_CHUNK_EXTENSIONS: usize = 16 * 1024;

/// Why a message's framing cannot be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FramingError {
    #[error("{0}")]
    Malformed(&'static str),
    #[error("a head or trailer section is malformed")]
    Head(#[source] httparse::Error),
}

/// Where the reading of a body stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Decode {
    /// Bytes still to come of a Content-Length body.
    Length(u64),
    /// A chunk-size line is next.
    ChunkSize,
    /// Bytes still to come of the current chunk.
    ChunkData(u64),
    /// The CRLF after a chunk's data is next.
    ChunkEnd,
    /// The trailer section after the last chunk is next.
    Trailers,
    /// Everything until the peer closes.
    UntilClose,
    Done,
}

/// What the next step of reading a body found.
#[derive(Debug)]
pub(crate) enum Step {
    Data(Bytes),
    /// The trailer section, which ends the body.
    Trailers(HeaderMap),
    /// The body ended (without trailers).
    End,
    /// More bytes must be read first.
    NeedMore,
}

/// Reads a body out of a connection's read buffer, one step at a time.
#[derive(Clone, Debug)]
pub(crate) struct BodyDecoder {
    state: Decode,
    /// Chunk extensions (and whitespace before them) read so far: ignored, but bounded.
    extension_bytes: usize,
    /// Largest trailer section taken.
    max_trailer_bytes: usize,
    /// Bytes of the trailer section already looked through for its end.
    trailer_scanned: usize,
}

impl BodyDecoder {
    pub(crate) fn new(state: Decode) -> Self {
        BodyDecoder {
            state,
            extension_bytes: 0,
            max_trailer_bytes: MAX_TRAILER_BYTES,
            trailer_scanned: 0,
        }
    }

    /// Takes trailer sections of at most `bytes`.
    pub(crate) fn trailer_limit(mut self, bytes: usize) -> Self {
        self.max_trailer_bytes = bytes;
        self
    }

    pub(crate) fn state(&self) -> Decode {
        self.state
    }

    pub(crate) fn is_done(&self) -> bool {
        self.state == Decode::Done
    }

    /// Takes the next piece of the body off `read`. Data is handed out as it arrives, never
    /// more than the framing allows; what follows the body stays in `read`.
    pub(crate) fn step(&mut self, read: &mut BytesMut) -> Result<Step, FramingError> {
        loop {
            match self.state {
                Decode::Done => return Ok(Step::End),
                Decode::Length(_) | Decode::ChunkData(_) | Decode::UntilClose
                    if read.is_empty() =>
                {
                    return Ok(Step::NeedMore)
                }
                Decode::UntilClose => return Ok(Step::Data(read.split().freeze())),
                Decode::Length(owed) | Decode::ChunkData(owed) => {
                    let n = owed.min(read.len() as u64);
                    let data = read.split_to(n as usize).freeze();
                    self.state = match (self.state, owed - n) {
                        (Decode::Length(_), 0) => Decode::Done,
                        (Decode::Length(_), left) => Decode::Length(left),
                        (_, 0) => Decode::ChunkEnd,
                        (_, left) => Decode::ChunkData(left),
                    };
                    return Ok(Step::Data(data));
                }
                Decode::ChunkSize => match parse_chunk_size(read)? {
                    // The same limit whether the line came whole or in pieces.
                    Some(line) if line.len > MAX_CHUNK_LINE => {
                        return Err(FramingError::Malformed("a chunk-size line is too long"))
                    }
                    Some(line) => {
                        read.advance(line.len);
                        self.extension_bytes += line.extension_bytes;
                        if self.extension_bytes > MAX_CHUNK_EXTENSIONS {
                            return Err(FramingError::Malformed("too many chunk extensions"));
                        }
                        self.state = if line.size == 0 {
                            Decode::Trailers
                        } else {
                            Decode::ChunkData(line.size)
                        };
                    }
                    None if read.len() > MAX_CHUNK_LINE => {
                        return Err(FramingError::Malformed("a chunk-size line is too long"))
                    }
                    None => return Ok(Step::NeedMore),
                },
                Decode::ChunkEnd => match read.get(..2) {
                    Some(b"\r\n") => {
                        read.advance(2);
                        self.state = Decode::ChunkSize;
                    }
                    None if read.first().is_none_or(|b| *b == b'\r') => return Ok(Step::NeedMore),
                    _ => return Err(FramingError::Malformed("a chunk overruns its size")),
                },
                Decode::Trailers => {
                    // Looked through once for its end, as a head is (an empty section is
                    // whole at once).
                    if !read.starts_with(b"\r\n") && !may_be_whole(read, self.trailer_scanned) {
                        if read.len() > self.max_trailer_bytes {
                            return Err(FramingError::Malformed(
                                "the trailer section is too large",
                            ));
                        }
                        if bare_lf_from(read, self.trailer_scanned) {
                            return Err(FramingError::Malformed(
                                "a trailer line does not end in CRLF",
                            ));
                        }
                        self.trailer_scanned = read.len();
                        return Ok(Step::NeedMore);
                    }
                    let unread = read.len();
                    let parsed = parse_trailers(read)?;
                    // Whole or not yet, a section past the limit is refused alike.
                    let taken = match &parsed {
                        Some(_) => unread - read.len(),
                        None => read.len(),
                    };
                    if taken > self.max_trailer_bytes {
                        return Err(FramingError::Malformed("the trailer section is too large"));
                    }
                    let Some(trailers) = parsed else {
                        // Not whole yet: a bare LF in it is refused on arrival from now on.
                        if bare_lf_from(read, self.trailer_scanned) {
                            return Err(FramingError::Malformed(
                                "a trailer line does not end in CRLF",
                            ));
                        }
                        self.trailer_scanned = read.len();
                        return Ok(Step::NeedMore);
                    };
                    self.state = Decode::Done;
                    return Ok(if trailers.is_empty() {
                        Step::End
                    } else {
                        Step::Trailers(trailers)
                    });
                }
            }
        }
    }

    /// Steps over the body bytes already in `read`, dropping them; whether the body has ended.
    /// A framing error stops it short, leaving the body not ended.
    pub(crate) fn pass_over(&mut self, read: &mut BytesMut) -> bool {
        while let Ok(Step::Data(_) | Step::Trailers(_)) = self.step(read) {}
        self.is_done()
    }

    /// The peer closed while the body was being read: the end of a close-delimited body, and
    /// a truncation of any other.
    pub(crate) fn peer_closed(&mut self) -> Result<Step, FramingError> {
        match self.state {
            Decode::UntilClose | Decode::Done => {
                self.state = Decode::Done;
                Ok(Step::End)
            }
            _ => Err(FramingError::Malformed("the body was cut short")),
        }
    }
}

/// A chunk-size line (RFC 9112 7.1).
#[derive(Debug, PartialEq, Eq)]
struct ChunkSizeLine {
    /// Its length, CRLF included.
    len: usize,
    size: u64,
    extension_bytes: usize,
}

/// Parses the chunk-size line at the start of `buf`: at least one hex digit, optional
/// whitespace, optional extensions (no control bytes), CRLF. `None` while incomplete.
fn parse_chunk_size(buf: &[u8]) -> Result<Option<ChunkSizeLine>, FramingError> {
    let invalid = FramingError::Malformed("a chunk-size line is invalid");
    let digits = buf.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    // Leading zeros are allowed (RFC 9112 7.1) and add nothing to the size; they count with
    // the extensions below.
    let zeros = buf[..digits].iter().take_while(|b| **b == b'0').count();
    let significant = digits - zeros;
    if significant > 16 {
        return Err(FramingError::Malformed("a chunk size is too large"));
    }
    if digits == buf.len() {
        return Ok(None);
    }
    if digits == 0 {
        return Err(invalid);
    }
    let size = buf[..digits].iter().fold(0u64, |size, b| {
        // Hex digits only, as counted above.
        let value = (*b as char).to_digit(16).unwrap_or(0);
        size << 4 | u64::from(value)
    });
    let mut i = digits;
    while buf.get(i).is_some_and(|b| *b == b' ' || *b == b'\t') {
        i += 1;
    }
    if buf.get(i) == Some(&b';') {
        while let Some(&b) = buf.get(i) {
            if b == b'\r' {
                break;
            }
            if (b < 0x20 && b != b'\t') || b == 0x7f {
                return Err(FramingError::Malformed("a chunk extension is invalid"));
            }
            i += 1;
        }
    }
    // Whitespace and padding zeros count with the extensions: either alone would otherwise
    // carry up to a line's length of overhead per body byte, unbounded.
    let padding = digits - significant.max(1);
    let extension_bytes = i - digits + padding;
    match (buf.get(i), buf.get(i + 1)) {
        (None, _) | (Some(b'\r'), None) => Ok(None),
        (Some(b'\r'), Some(b'\n')) => Ok(Some(ChunkSizeLine {
            len: i + 2,
            size,
            extension_bytes,
        })),
        _ => Err(invalid),
    }
}

/// The trailer section after a chunked body's last chunk, taken off `buf` when complete.
fn parse_trailers(buf: &mut BytesMut) -> Result<Option<HeaderMap>, FramingError> {
    if buf.starts_with(b"\r\n") {
        buf.advance(2);
        return Ok(Some(HeaderMap::new()));
    }
    let mut slots = [httparse::EMPTY_HEADER; MAX_TRAILERS];
    let (len, fields) = match httparse::parse_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(done)) => done,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(FramingError::Head(e)),
    };
    // httparse also ends lines at a bare LF; chunk-size lines here do not, and neither may the
    // section that ends the body: where it ends must not depend on who reads it.
    if has_bare_lf(&buf[..len]) {
        return Err(FramingError::Malformed(
            "a trailer line does not end in CRLF",
        ));
    }
    let mut trailers = HeaderMap::with_capacity(fields.len());
    for field in fields {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| FramingError::Malformed("a trailer name is invalid"))?;
        let value = HeaderValue::from_bytes(field.value)
            .map_err(|_| FramingError::Malformed("a trailer value is invalid"))?;
        trailers.append(name, value);
    }
    buf.advance(len);
    Ok(Some(trailers))
}

/// A line feed not preceded by a carriage return.
fn has_bare_lf(bytes: &[u8]) -> bool {
    bare_lf_from(bytes, 0)
}

/// A line feed not preceded by a carriage return, at `from` or after.
fn bare_lf_from(bytes: &[u8], from: usize) -> bool {
    (from..bytes.len()).any(|i| bytes[i] == b'\n' && (i == 0 || bytes[i - 1] != b'\r'))
}

/// What a head's headers say about its framing and its connection, gathered in one pass as
/// the headers are read (a lookup per header name would hash each name again).
#[derive(Debug, Default)]
pub(crate) struct HeadFacts {
    /// The Content-Length, once every value agreed.
    pub(crate) content_length: Option<u64>,
    /// Why the Content-Length cannot be trusted, if it cannot.
    pub(crate) bad_content_length: Option<&'static str>,
    /// The Content-Length came other than as one plain number on one line (repeated, as a
    /// list, padded, with leading zeros): many readers refuse it so, though its values agree.
    pub(crate) content_length_unusual: bool,
    pub(crate) transfer_encoding: bool,
    /// The last coding of the last Transfer-Encoding is `chunked`.
    pub(crate) chunked: bool,
    /// `Connection: close`.
    pub(crate) close: bool,
    /// `Connection: keep-alive`.
    pub(crate) keep_alive: bool,
    /// `Expect: 100-continue`.
    pub(crate) expects_continue: bool,
    pub(crate) date: bool,
    /// How many Host header lines.
    pub(crate) hosts: usize,
}

impl HeadFacts {
    /// Takes note of one header.
    pub(crate) fn note(&mut self, name: &HeaderName, value: &HeaderValue) {
        // Most headers are none of these: their length tells at once.
        if !matches!(name.as_str().len(), 4 | 6 | 10 | 14 | 17) {
            return;
        }
        if name == header::CONTENT_LENGTH {
            self.content_length_unusual |=
                self.content_length.is_some() || !is_plain_length(value.as_bytes());
            if self.bad_content_length.is_none() {
                match merge_content_length(self.content_length, value) {
                    Ok(length) => self.content_length = length,
                    Err(why) => self.bad_content_length = Some(why),
                }
            }
        } else if name == header::TRANSFER_ENCODING {
            self.transfer_encoding = true;
            self.chunked = value
                .as_bytes()
                .rsplit(|b| *b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name == header::CONNECTION {
            for token in value.as_bytes().split(|b| *b == b',') {
                let token = token.trim_ascii();
                self.close |= token.eq_ignore_ascii_case(b"close");
                self.keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name == header::EXPECT {
            self.expects_continue |= value.as_bytes().eq_ignore_ascii_case(b"100-continue");
        } else if name == header::DATE {
            self.date = true;
        } else if name == header::HOST {
            self.hosts += 1;
        }
    }

    /// Notes every header of `headers`.
    pub(crate) fn of(headers: &HeaderMap) -> Self {
        let mut facts = HeadFacts::default();
        for (name, value) in headers {
            facts.note(name, value);
        }
        facts
    }

    /// The Content-Length, if there is one: every value, and every item of a comma-separated
    /// list, must be the same run of digits.
    pub(crate) fn content_length(&self) -> Result<Option<u64>, &'static str> {
        match self.bad_content_length {
            Some(why) => Err(why),
            None => Ok(self.content_length),
        }
    }
}

/// Whether a head (or trailer section) in `buf`, of which `looked_at` bytes were looked through
/// before, may now be whole: the first look parses at once (a head usually comes whole, often
/// with bytes behind it that a scan would go through too); later looks parse again only once a
/// blank line has come, so a head that arrives in many small pieces is not parsed again from
/// its start on every piece.
pub(crate) fn may_be_whole(buf: &[u8], looked_at: usize) -> bool {
    looked_at == 0 || blank_line_after(buf, looked_at)
}

/// Whether `buf` holds the blank line that ends a head (CRLF CRLF, or LF LF, which httparse
/// accepts too), looking only at the bytes from `from` on (and the three before, where one
/// may have begun). A head that arrives in many small pieces is then scanned once, rather than
/// parsed again from its start on every piece.
pub(crate) fn blank_line_after(buf: &[u8], from: usize) -> bool {
    let tail = buf.get(from.saturating_sub(3)..).unwrap_or_default();
    tail.windows(2).any(|w| w == b"\n\n") || tail.windows(3).any(|w| w == b"\n\r\n")
}

/// Why the transfer codings of `headers` (every Transfer-Encoding line, in order) are not just
/// `chunked`, once: the only coding decoded here, and one a sender may apply only once
/// (RFC 9112 7.1).
pub(crate) enum NotChunkedOnce {
    /// A coding other than `chunked` (`gzip`, or one that cannot be read).
    OtherCoding,
    /// `chunked` more than once.
    Repeated,
}

/// `Ok` when the Transfer-Encoding lines of `headers` name `chunked` once and nothing else.
pub(crate) fn chunked_once(headers: &HeaderMap) -> Result<(), NotChunkedOnce> {
    let mut chunked = 0;
    for value in headers.get_all(header::TRANSFER_ENCODING) {
        for coding in value.as_bytes().split(|b| *b == b',') {
            if !coding.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Err(NotChunkedOnce::OtherCoding);
            }
            chunked += 1;
        }
    }
    if chunked > 1 {
        return Err(NotChunkedOnce::Repeated);
    }
    Ok(())
}

/// Whether a Content-Length value is written the one way every reader takes alike: digits with
/// no leading zero (`0` itself aside). A reader that guesses the base, as C's `strtol(s, 0, 0)`
/// does, reads `010` as 8, and would find the next request in the body's last two bytes.
fn is_plain_length(value: &[u8]) -> bool {
    match value {
        [] => false,
        [b'0', _, ..] => false,
        digits => digits.iter().all(u8::is_ascii_digit),
    }
}

/// The Content-Length of `headers`, read as [`HeadFacts::content_length`] reads it: every value,
/// and every item of a comma-separated list, the same run of digits.
pub(crate) fn content_length(headers: &HeaderMap) -> Result<Option<u64>, &'static str> {
    headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .try_fold(None, merge_content_length)
}

/// `length` so far, with the items of one more Content-Length value.
fn merge_content_length(
    mut length: Option<u64>,
    value: &HeaderValue,
) -> Result<Option<u64>, &'static str> {
    for item in value.as_bytes().split(|b| *b == b',') {
        let item = item.trim_ascii();
        let n = std::str::from_utf8(item)
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or("Content-Length is not a number")?;
        if length.is_some_and(|l| l != n) {
            return Err("Content-Length values differ");
        }
        length = Some(n);
    }
    Ok(length)
}

/// Where each header's name and value lie in a parsed head.
pub(crate) type HeaderSpans = SmallVec<[(Range<usize>, Range<usize>); 24]>;

/// Where `piece` lies in `buf`, whose first `len` bytes are a head: so that the head can be
/// frozen and its pieces shared rather than copied. Empty for an empty piece or one outside.
pub(crate) fn span_in(buf: &[u8], len: usize, piece: &[u8]) -> Range<usize> {
    let start = (piece.as_ptr() as usize).wrapping_sub(buf.as_ptr() as usize);
    if piece.is_empty() || start.saturating_add(piece.len()) > len {
        0..0
    } else {
        start..start + piece.len()
    }
}

/// Where each of `headers`, parsed from the head at the start of `buf`, lies in it.
pub(crate) fn header_spans(
    buf: &[u8],
    len: usize,
    headers: &[httparse::Header<'_>],
) -> HeaderSpans {
    headers
        .iter()
        .map(|h| {
            (
                span_in(buf, len, h.name.as_bytes()),
                span_in(buf, len, h.value),
            )
        })
        .collect()
}

/// The header map of a head frozen into `head`, its values sharing the head's bytes, with room
/// for `room` more; and what its framing and connection headers say.
pub(crate) fn header_map(
    head: &Bytes,
    spans: HeaderSpans,
    room: usize,
) -> Result<(HeaderMap, HeadFacts), &'static str> {
    let mut headers = HeaderMap::with_capacity(spans.len() + room);
    let mut facts = HeadFacts::default();
    for (name, value) in spans {
        let name = HeaderName::from_bytes(&head[name]).map_err(|_| "a header name is invalid")?;
        let value = HeaderValue::from_maybe_shared(head.slice(value))
            .map_err(|_| "a header value is invalid")?;
        facts.note(&name, &value);
        headers.append(name, value);
    }
    Ok((headers, facts))
}

/// How a body goes out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Encode {
    /// No body may follow the head.
    None,
    /// Content-Length; the bytes still owed.
    Length(u64),
    Chunked,
    /// The body runs until the connection closes (an HTTP/1.0 client, no length known).
    UntilClose,
}

/// Writes a body's frames into a write buffer, framed as its head said.
#[derive(Debug)]
pub(crate) struct BodyEncoder {
    framing: Encode,
    /// All of the body is in the write buffer.
    ended: bool,
}

impl BodyEncoder {
    pub(crate) fn new(framing: Encode) -> Self {
        BodyEncoder {
            framing,
            ended: false,
        }
    }

    pub(crate) fn is_ended(&self) -> bool {
        self.ended
    }

    /// Appends a data frame; trailers are dropped (see the callers for why that is right).
    pub(crate) fn encode(
        &mut self,
        frame: Frame<Bytes>,
        out: &mut BytesMut,
    ) -> Result<(), &'static str> {
        let Ok(data) = frame.into_data() else {
            return Ok(());
        };
        if data.is_empty() {
            return Ok(());
        }
        match &mut self.framing {
            Encode::None => return Err("a body where none may be"),
            Encode::Length(owed) => {
                *owed = owed
                    .checked_sub(data.len() as u64)
                    .ok_or("longer than its Content-Length")?;
                out.extend_from_slice(&data);
            }
            Encode::Chunked => {
                put_hex(out, data.len());
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(&data);
                out.extend_from_slice(b"\r\n");
            }
            Encode::UntilClose => out.extend_from_slice(&data),
        }
        Ok(())
    }

    /// The body has no more frames: its end goes into `out`.
    pub(crate) fn end(&mut self, out: &mut BytesMut) -> Result<(), &'static str> {
        if self.ended {
            return Ok(());
        }
        self.ended = true;
        match self.framing {
            Encode::None | Encode::Length(0) | Encode::UntilClose => Ok(()),
            Encode::Length(_) => Err("shorter than its Content-Length"),
            Encode::Chunked => {
                out.extend_from_slice(b"0\r\n\r\n");
                Ok(())
            }
        }
    }
}

/// Writes all of `out` to `io`, then flushes it (TLS keeps records back until then).
pub(crate) fn poll_write_all<W: AsyncWrite + Unpin>(
    io: &mut W,
    out: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    while !out.is_empty() {
        let n = ready!(Pin::new(&mut *io).poll_write(cx, out))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        out.advance(n);
    }
    Pin::new(io).poll_flush(cx)
}

/// Each header as `name: value` CRLF.
pub(crate) fn put_headers(out: &mut BytesMut, headers: &HeaderMap) {
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// The bytes `put_headers` writes for `headers`.
pub(crate) fn headers_len(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum()
}

pub(crate) fn put_hex(out: &mut BytesMut, n: usize) {
    let digits = (usize::BITS - n.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        out.put_u8(b"0123456789abcdef"[(n >> (i * 4)) & 0xf]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blank_line_is_found_in_what_is_new_or_across_its_edge() {
        let head = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n";
        assert!(blank_line_after(head, 0));
        // The blank line straddles the old and the new bytes.
        for from in head.len() - 3..=head.len() - 1 {
            assert!(blank_line_after(head, from), "{from}");
        }
        // One wholly among bytes looked at before is not looked for again.
        let with_body = b"GET / HTTP/1.1\r\n\r\nbody";
        assert!(!blank_line_after(with_body, with_body.len() - 1));
        assert!(blank_line_after(b"GET / HTTP/1.1\nHost: h\n\n", 10));
        assert!(!blank_line_after(b"GET / HTTP/1.1\r\nHost: h\r\n", 0));
        assert!(!blank_line_after(b"", 5));
    }

    #[test]
    fn chunk_size_lines_are_read_strictly() {
        let line = |len, size, extension_bytes| {
            Some(ChunkSizeLine {
                len,
                size,
                extension_bytes,
            })
        };
        // Each parses (`None`: incomplete, needs more).
        let cases: [(&[u8], Option<ChunkSizeLine>); 13] = [
            (b"5\r\n", line(3, 5, 0)),
            (b"aB\r\nrest", line(4, 0xab, 0)),
            (b"5 \t\r\n", line(5, 5, 2)),
            (b"5;name=\"v a\"\r\n", line(14, 5, 11)),
            (b"5 ;x\r\n", line(6, 5, 3)),
            (b"ffffffffffffffff\r\n", line(18, u64::MAX, 0)),
            (b"0\r\n", line(3, 0, 0)),
            (b"00000000000000000005\r\n", line(22, 5, 19)),
            (b"00000000000000000000\r\n", line(22, 0, 19)),
            (b"05 \r\n", line(5, 5, 2)),
            (b"5", None),
            (b"5;abc", None),
            (b"5\r", None),
        ];
        for (input, expected) in cases {
            let got = parse_chunk_size(input).ok();
            assert_eq!(got, Some(expected), "{}", String::from_utf8_lossy(input));
        }
        for input in [
            &b"\r\n"[..],
            b"  5\r\n",
            b";x\r\n",
            b"5;a\nX\r\n",
            b"5\n",
            b"5 x\r\n",
            b"5\rX",
            b"10000000000000000\r\n",
            b"0010000000000000000\r\n",
        ] {
            assert!(
                parse_chunk_size(input).is_err(),
                "{}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn a_trailer_section_past_the_limit_is_refused_whole_or_in_pieces() {
        let body = b"0\r\nx-a: 0123456789\r\nx-b: 0123456789\r\n\r\n";
        let section = body.len() - 3;
        for limit in [section - 1, section] {
            // All of it in one read.
            let mut decoder = BodyDecoder::new(Decode::ChunkSize).trailer_limit(limit);
            let mut read = BytesMut::from(&body[..]);
            let step = decoder.step(&mut read);
            // A byte at a time.
            let mut decoder = BodyDecoder::new(Decode::ChunkSize).trailer_limit(limit);
            let mut pieces = BytesMut::new();
            let mut bytewise = Ok(Step::NeedMore);
            for byte in body {
                pieces.extend_from_slice(&[*byte]);
                bytewise = decoder.step(&mut pieces);
                if !matches!(bytewise, Ok(Step::NeedMore)) {
                    break;
                }
            }
            for got in [step, bytewise] {
                if limit < section {
                    assert!(got.is_err(), "limit {limit}: {got:?}");
                } else {
                    assert!(
                        matches!(got, Ok(Step::Trailers(_))),
                        "limit {limit}: {got:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn chunk_sizes_are_written_in_lowercase_hex_without_padding() {
        for (n, text) in [
            (1, "1"),
            (15, "f"),
            (16, "10"),
            (0xabc, "abc"),
            (65536, "10000"),
        ] {
            let mut out = BytesMut::new();
            put_hex(&mut out, n);
            assert_eq!(&out[..], text.as_bytes());
        }
    }

    /// Decodes `input` fed one byte at a time; the data, the trailers, and what was left.
    fn decode_bytewise(
        state: Decode,
        input: &[u8],
    ) -> Result<(Vec<u8>, HeaderMap, Vec<u8>), FramingError> {
        let mut decoder = BodyDecoder::new(state);
        let (mut data, mut trailers, mut read) = (Vec::new(), HeaderMap::new(), BytesMut::new());
        let mut input = input.iter();
        loop {
            match decoder.step(&mut read)? {
                Step::Data(d) => data.extend_from_slice(&d),
                Step::Trailers(t) => {
                    trailers = t;
                    break;
                }
                Step::End => break,
                Step::NeedMore => match input.next() {
                    Some(b) => read.put_u8(*b),
                    None => {
                        decoder.peer_closed()?;
                        break;
                    }
                },
            }
        }
        read.extend(input.copied());
        Ok((data, trailers, read.to_vec()))
    }

    /// Padding zeros before a chunk size count against a body's extension budget, as
    /// whitespace does: otherwise each byte of data could carry a line's worth of them.
    #[test]
    fn padding_zeros_count_against_the_extension_budget() {
        let decode = |chunks: usize| {
            let mut body = Vec::new();
            for _ in 0..chunks {
                body.extend_from_slice(&[b'0'; 1000]);
                body.extend_from_slice(b"1\r\nx\r\n");
            }
            body.extend_from_slice(b"0\r\n\r\n");
            let mut decoder = BodyDecoder::new(Decode::ChunkSize);
            let mut read = BytesMut::from(&body[..]);
            let mut data = 0;
            loop {
                match decoder.step(&mut read)? {
                    Step::Data(d) => data += d.len(),
                    Step::Trailers(_) | Step::End => return Ok(data),
                    Step::NeedMore => panic!("the whole body was given"),
                }
            }
        };
        // 999 padding zeros each: 16 chunks fit the 16 KiB, 17 do not.
        assert_eq!(decode(16).ok(), Some(16));
        assert!(matches!(decode(17), Err(FramingError::Malformed(_))));
    }

    #[test]
    fn bodies_end_where_their_framing_says_and_leave_the_rest() {
        let (data, _, rest) = decode_bytewise(Decode::Length(5), b"hello, next").unwrap();
        assert_eq!((&data[..], &rest[..]), (&b"hello"[..], &b", next"[..]));

        let (data, trailers, rest) = decode_bytewise(
            Decode::ChunkSize,
            b"3;x=y\r\nabc\r\n2\r\nde\r\n0\r\ntrailer-one: 1\r\n\r\nGET",
        )
        .unwrap();
        assert_eq!(&data[..], b"abcde");
        assert_eq!(trailers["trailer-one"], "1");
        assert_eq!(&rest[..], b"GET");

        let (data, trailers, rest) =
            decode_bytewise(Decode::ChunkSize, b"1\r\na\r\n0\r\n\r\nnext").unwrap();
        assert_eq!(
            (&data[..], trailers.len(), &rest[..]),
            (&b"a"[..], 0, &b"next"[..])
        );

        let (data, _, _) = decode_bytewise(Decode::UntilClose, b"all of it").unwrap();
        assert_eq!(&data[..], b"all of it");
    }

    #[test]
    fn a_trailer_section_in_pieces_is_judged_as_they_come() {
        let mut decoder = BodyDecoder::new(Decode::ChunkSize);
        let mut read = BytesMut::from(&b"0\r\nx-a: 1\r\nx-b"[..]);
        assert!(matches!(decoder.step(&mut read), Ok(Step::NeedMore)));
        read.extend_from_slice(b": 2\r\n\r");
        assert!(matches!(decoder.step(&mut read), Ok(Step::NeedMore)));
        read.extend_from_slice(b"\nGET");
        let Ok(Step::Trailers(trailers)) = decoder.step(&mut read) else {
            panic!("the section ended");
        };
        assert_eq!(trailers["x-a"], "1");
        assert_eq!(trailers["x-b"], "2");
        assert_eq!(&read[..], b"GET");

        // A bare LF is refused on arrival, without waiting for the section to end.
        let mut decoder = BodyDecoder::new(Decode::ChunkSize);
        let mut read = BytesMut::from(&b"0\r\nx-a: 1\r\n"[..]);
        assert!(matches!(decoder.step(&mut read), Ok(Step::NeedMore)));
        read.extend_from_slice(b"x-b: 2\nx-c");
        assert!(decoder.step(&mut read).is_err());
    }

    #[test]
    fn a_chunk_size_line_over_the_limit_is_refused_whole_or_in_pieces() {
        let mut body = b"1;x=".to_vec();
        body.extend(std::iter::repeat_n(b'a', MAX_CHUNK_LINE));
        body.extend_from_slice(b"\r\na\r\n0\r\n\r\n");
        let mut decoder = BodyDecoder::new(Decode::ChunkSize);
        let mut read = BytesMut::from(&body[..]);
        assert!(decoder.step(&mut read).is_err(), "whole");
        assert!(
            decode_bytewise(Decode::ChunkSize, &body).is_err(),
            "in pieces"
        );
        // Just under the limit, it is read.
        let mut body = b"1;x=".to_vec();
        body.extend(std::iter::repeat_n(b'a', MAX_CHUNK_LINE - 6));
        body.extend_from_slice(b"\r\na\r\n0\r\n\r\n");
        assert!(decode_bytewise(Decode::ChunkSize, &body).is_ok());
    }

    #[test]
    fn a_trailer_section_must_end_its_lines_in_crlf() {
        for body in [
            &b"1\r\na\r\n0\r\n\nnext"[..],
            b"1\r\na\r\n0\r\nx-t: 1\n\r\n",
            b"1\r\na\r\n0\r\nx-t: 1\r\n\n",
        ] {
            // All of it in one read, then a byte at a time.
            let mut decoder = BodyDecoder::new(Decode::ChunkSize);
            let mut read = BytesMut::from(body);
            let at_once = loop {
                match decoder.step(&mut read) {
                    Ok(Step::Data(_)) => {}
                    other => break other,
                }
            };
            assert!(
                at_once.is_err(),
                "{}: {at_once:?}",
                String::from_utf8_lossy(body)
            );
            assert!(
                decode_bytewise(Decode::ChunkSize, body).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        let (_, trailers, _) =
            decode_bytewise(Decode::ChunkSize, b"1\r\na\r\n0\r\nx-t: 1\r\n\r\n").unwrap();
        assert_eq!(trailers["x-t"], "1");
    }

    #[test]
    fn bodies_cut_short_or_overrunning_are_errors() {
        for (state, input) in [
            (Decode::Length(10), &b"short"[..]),
            (Decode::ChunkSize, b"5\r\nabc"),
            (Decode::ChunkSize, b"3\r\nabcdef\r\n0\r\n\r\n"),
            (
                Decode::ChunkSize,
                b"3\r\nabc\r\n0\r\nbroken trailer\r\n\r\n",
            ),
        ] {
            assert!(
                decode_bytewise(state, input).is_err(),
                "{}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn a_plain_length_has_no_leading_zero() {
        for plain in ["0", "7", "10", "18446744073709551615"] {
            assert!(is_plain_length(plain.as_bytes()), "{plain}");
        }
        for unusual in ["", "00", "010", "7,7", " 7", "7 ", "+7", "0x7"] {
            assert!(!is_plain_length(unusual.as_bytes()), "{unusual:?}");
        }
    }

    #[test]
    fn framing_headers_are_read_as_lists() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.append(*name, HeaderValue::from_static(value));
            }
            map
        };
        let facts = |pairs: &[(&'static str, &'static str)]| HeadFacts::of(&headers(pairs));
        let length = |value| facts(&[("content-length", value)]).content_length();
        assert!(length("7, 8").is_err());
        assert!(length("+7").is_err());
        assert!(facts(&[("transfer-encoding", "gzip, chunked")]).chunked);
        assert!(!facts(&[("transfer-encoding", "chunked, gzip")]).chunked);
        let upgrade = facts(&[("connection", "Upgrade, Close"), ("date", "x")]);
        assert!(upgrade.close && !upgrade.keep_alive && upgrade.date);
        assert!(facts(&[("connection", "keep-alive")]).keep_alive);
        assert!(facts(&[("expect", "100-Continue")]).expects_continue);
        assert_eq!(facts(&[("host", "a"), ("host", "b")]).hosts, 2);
        let lengths = facts(&[("content-length", "7, 7"), ("content-length", "7")]);
        assert_eq!(lengths.content_length(), Ok(Some(7)));
        let differing = facts(&[("content-length", "7"), ("content-length", "8")]);
        assert!(differing.content_length().is_err());
    }

    #[test]
    fn bodies_are_written_as_framed() {
        let mut out = BytesMut::new();
        let mut chunked = BodyEncoder::new(Encode::Chunked);
        chunked
            .encode(Frame::data(Bytes::from_static(b"hello")), &mut out)
            .unwrap();
        chunked.end(&mut out).unwrap();
        assert_eq!(&out[..], b"5\r\nhello\r\n0\r\n\r\n");

        let mut length = BodyEncoder::new(Encode::Length(3));
        let mut out = BytesMut::new();
        assert!(length
            .encode(Frame::data(Bytes::from_static(b"four")), &mut out)
            .is_err());
        let mut length = BodyEncoder::new(Encode::Length(3));
        length
            .encode(Frame::data(Bytes::from_static(b"ab")), &mut out)
            .unwrap();
        assert!(length.end(&mut out).is_err(), "shorter than its length");

        let mut none = BodyEncoder::new(Encode::None);
        assert!(none
            .encode(Frame::data(Bytes::from_static(b"x")), &mut out)
            .is_err());
    }
}
