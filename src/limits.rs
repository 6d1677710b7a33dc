//! Request size limits, applied before anything else looks at a request: the head (431) and the
//! body (413). Requests that servers could read in two ways are refused here too, after the
//! access log has seen them: a path the router could not judge safely, two Authorization
//! headers, a transfer coding other than chunked, a Host that contradicts the target's
//! authority. A declared Content-Length over the limit is refused at once; a streamed body is
//! cut off where it crosses the limit, and the forwarder turns that into a 413.

use std::convert::Infallible;
use std::future::Ready;
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::uri::Authority;
use http::{header, HeaderValue, Request, Response, Version};
use http_body_util::Limited;
use tower::{Layer, Service};

use crate::error::Rejection;
use crate::facts::RequestFacts;
use crate::h1::NotChunkedOnce;
use crate::routes::RouteClass;
use crate::Body;

#[derive(Debug, Clone, Copy)]
pub struct RequestLimitsLayer {
    pub max_header_bytes: usize,
    pub max_body_bytes: u64,
}

impl<S> Layer<S> for RequestLimitsLayer {
    type Service = RequestLimits<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestLimits {
            inner,
            limits: *self,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RequestLimits<S> {
    inner: S,
    limits: RequestLimitsLayer,
}

/// Size of the request head as it would be written in HTTP/1.1: request line and header lines.
pub fn head_size<B>(req: &Request<B>) -> usize {
    let target = req.uri().path_and_query().map_or(1, |p| p.as_str().len());
    let line = req.method().as_str().len() + target + 12;
    req.headers().iter().fold(line, |n, (name, value)| {
        n + name.as_str().len() + value.len() + 4
    })
}

/// Most header lines a request may carry.
pub const MAX_HEADER_COUNT: usize = 100;

/// How many header lines a request's headers make upstream: HTTP/2 clients may send each cookie
/// as a field of its own (RFC 9113 8.2.3), and those go upstream joined into one line (an
/// HTTP/1.x request's Cookie lines go as they came).
fn header_lines<B>(req: &Request<B>) -> usize {
    let fields = req.headers().len();
    if fields <= MAX_HEADER_COUNT || req.version() != Version::HTTP_2 {
        return fields;
    }
    let cookies = req.headers().get_all(header::COOKIE).iter().count();
    fields - cookies.saturating_sub(1)
}

/// Checks a request against the limits without looking at its body.
pub fn check(req: &Request<Body>, limits: &RequestLimitsLayer) -> Result<(), Rejection> {
    if let Some(RouteClass::Invalid(e)) = RequestFacts::of(req).route {
        return Err(Rejection::InvalidPath(e));
    }
    if head_size(req) > limits.max_header_bytes || header_lines(req) > MAX_HEADER_COUNT {
        return Err(Rejection::HeadersTooLarge(limits.max_header_bytes));
    }
    check_unambiguous(req)?;
    // Every value, and every item of a list (`Content-Length: 8, 8`), as the body will be read.
    let declared = crate::h1::content_length(req.headers()).ok().flatten();
    if declared.is_some_and(|len| len > limits.max_body_bytes) {
        return Err(Rejection::PayloadTooLarge(limits.max_body_bytes));
    }
    Ok(())
}

/// Refuses requests whose meaning depends on which of two conflicting fields a server believes:
/// the upstream, or a backend behind it, could act on the one portcullis did not check.
fn check_unambiguous(req: &Request<Body>) -> Result<(), Rejection> {
    // A tunnel to wherever the client names is not a reverse proxy's to open (501: a method
    // this server does not support anywhere, so a 405's Allow would have nothing to list).
    if req.method() == http::Method::CONNECT {
        return Err(Rejection::ConnectUnsupported);
    }
    // `*` names the server as a whole, for OPTIONS only (RFC 9112 3.2.4): with another method
    // each server would make up its own meaning for it.
    if req.uri().path() == "*" && req.method() != http::Method::OPTIONS {
        return Err(Rejection::Malformed(
            "an asterisk target is for OPTIONS only",
        ));
    }
    if let Some(authority) = req.uri().authority() {
        // `host:port` alone (authority form) is CONNECT's target (RFC 9112 3.2.3), refused
        // above.
        if req.uri().scheme().is_none() {
            return Err(Rejection::Malformed(
                "an authority-form target is for CONNECT only",
            ));
        }
        // The upstream is told it as the Host, when the request has none: it is held to what
        // a Host may be. User info may not stand in it (RFC 9110 4.2.4, RFC 9113 8.3.1).
        if !is_host_value(authority.as_str().as_bytes()) {
            return Err(Rejection::Malformed(
                "the target's authority is not a host name or address with an optional port",
            ));
        }
    }
    let mut authorizations = 0;
    let mut hosts = 0;
    let mut host_named = false;
    let mut transfer_encoded = false;
    // Every field line (`keys()` would name a repeated header once).
    for (name, value) in req.headers() {
        if name == header::AUTHORIZATION {
            // Only the first is verified; a backend may read another.
            authorizations += 1;
            if authorizations > 1 {
                return Err(Rejection::Malformed("more than one Authorization header"));
            }
        } else if name == header::HOST {
            // Which authority the request is for must be as clear as where it ends (HTTP/1.1's
            // engine refuses a second Host with a bare 400; this is HTTP/2's case).
            hosts += 1;
            if hosts > 1 {
                return Err(Rejection::Malformed("more than one Host header"));
            }
            if !is_host_value(value.as_bytes()) {
                return Err(Rejection::Malformed(
                    "the Host header is not a host name or address with an optional port",
                ));
            }
            host_named = !value.is_empty();
        } else if name == header::TRANSFER_ENCODING {
            transfer_encoded = true;
        }
    }
    // An HTTP/2 request may leave both out (or send an empty Host); the upstream would then be
    // told its own address, or nothing.
    if !host_named && req.uri().authority().is_none() && req.version() == Version::HTTP_2 {
        return Err(Rejection::Malformed(
            "the request names no authority (:authority or Host)",
        ));
    }
    if transfer_encoded {
        match crate::h1::chunked_once(req.headers()) {
            Ok(()) => {}
            // HTTP/1.1 decodes `chunked` only: another coding would reach the upstream as if
            // the body were plain (RFC 9112 6.1 answers 501).
            Err(NotChunkedOnce::OtherCoding) => return Err(Rejection::TransferCodingUnsupported),
            // Decoded once, the rest of the framing would go upstream as body bytes.
            Err(NotChunkedOnce::Repeated) => {
                return Err(Rejection::Malformed("chunked applied more than once"))
            }
        }
    }
    // A Host that names another authority than the request's target (HTTP/2's :authority,
    // HTTP/1.1's absolute form) leaves the upstream told one and routed by the other: RFC 9113
    // 8.3.1 makes such an HTTP/2 request malformed, and HTTP/1.1 servers differ on which wins.
    // Looked up only when the target names an authority: most requests' targets do not.
    let host = || req.headers().get(header::HOST);
    if let Some((authority, host)) = req.uri().authority().and_then(|a| Some((a, host()?))) {
        if !same_authority(req.uri(), authority, host) {
            return Err(Rejection::Malformed(if req.version() == Version::HTTP_2 {
                "the Host header differs from :authority"
            } else {
                "the Host header differs from the target's authority"
            }));
        }
    }
    Ok(())
}

/// Whether a Host value names an authority the one way every reader takes it (RFC 9112 3.2
/// asks for a 400 otherwise): a host name (letters, digits, `-`, `.`, `_`) or IP address, and an
/// optional port number; or nothing at all, as a request without an authority is sent. An
/// upstream that builds URLs from Host (or X-Forwarded-Host, copied from it) then cannot be
/// handed `a.example@b.example`, `a.example/../b`, `a.example,b.example` (a list, whose first
/// item some readers take and whose last others do), percent-encoding, or a value with spaces
/// or control bytes. RFC 3986 would allow more punctuation in a name, which no DNS name uses;
/// an IPv6 zone (`[fe80::1%25eth0]`) has no meaning beyond the client's machine.
pub(crate) fn is_host_value(value: &[u8]) -> bool {
    if value.is_empty() {
        return true;
    }
    let (host, rest) = if let Some(literal) = value.strip_prefix(b"[") {
        // An IPv6 address, bracketed.
        let Some(end) = literal.iter().position(|&b| b == b']') else {
            return false;
        };
        let address = std::str::from_utf8(&literal[..end]).ok();
        (
            address.is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok()),
            &literal[end + 1..],
        )
    } else {
        let end = value.iter().position(|&b| b == b':').unwrap_or(value.len());
        let name = &value[..end];
        (
            !name.is_empty()
                && name.iter().all(|&b| HOST_NAME[usize::from(b)])
                && (!looks_numeric(name) || is_dotted_quad(name)),
            &value[end..],
        )
    };
    let port = match rest {
        [] => true,
        // Five digits at most, so the number cannot overflow.
        [b':', digits @ ..] if (1..=5).contains(&digits.len()) => digits
            .iter()
            .try_fold(0u32, |n, &d| {
                d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0'))
            })
            .is_some_and(|port| port <= u32::from(u16::MAX)),
        _ => false,
    };
    host && port
}

/// Whether a host name ends in a label that URL parsers read as a number (all digits, or `0x`
/// and hex), so that they read the whole name as an IPv4 address in their own way: `127.1`,
/// `0x7f.1` and `0177.0.0.1` are all 127.0.0.1 to a browser or `inet_aton`, and names to others.
fn looks_numeric(name: &[u8]) -> bool {
    let name = name.strip_suffix(b".").unwrap_or(name);
    let last = name.rsplit(|&b| b == b'.').next().unwrap_or_default();
    match last {
        [b'0', b'x' | b'X', hex @ ..] => hex.iter().all(u8::is_ascii_hexdigit),
        digits => !digits.is_empty() && digits.iter().all(u8::is_ascii_digit),
    }
}

/// Whether `name` is an IPv4 address written the one way every reader takes alike: four
/// decimal numbers up to 255, none with a leading zero. Read by hand: a pod's address is the
/// Host of every probe and of many in-cluster calls.
fn is_dotted_quad(name: &[u8]) -> bool {
    let mut parts = 0;
    name.split(|&b| b == b'.').all(|part| {
        parts += 1;
        let number = match part {
            [b'0'] => Some(0),
            [b'1'..=b'9', rest @ ..] if rest.len() <= 2 => part.iter().try_fold(0u16, |n, &d| {
                d.is_ascii_digit().then(|| n * 10 + u16::from(d - b'0'))
            }),
            _ => None,
        };
        number.is_some_and(|n| n <= 255)
    }) && parts == 4
}

/// The bytes of a host name in a Host: letters, digits, `-`, `.` and `_` (which service names
/// use). A table, as the check runs on every request's Host.
const HOST_NAME: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        table[i] = b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_');
        i += 1;
    }
    table
};

/// Whether a Host header names the target's authority: the same host (in any case) and port,
/// a missing port being the scheme's default (`a.example` is `a.example:80` over http). Both
/// have passed [`is_host_value`]: no user info, and a port only where there is a number.
fn same_authority(uri: &http::Uri, authority: &Authority, host: &HeaderValue) -> bool {
    let default_port = if uri.scheme() == Some(&http::uri::Scheme::HTTPS) {
        443
    } else {
        80
    };
    let Some(host) = host.to_str().ok().and_then(|h| h.parse::<Authority>().ok()) else {
        return false;
    };
    host.host().eq_ignore_ascii_case(authority.host())
        && host.port_u16().unwrap_or(default_port) == authority.port_u16().unwrap_or(default_port)
}

impl<S> Service<Request<Body>> for RequestLimits<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    // The inner future as it is (no box around a box): this layer adds no step after it.
    type Future = Either<Ready<Result<Response<Body>, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        if let Err(rejection) = check(&req, &self.limits) {
            return Either::Left(std::future::ready(Ok(rejection.into_response())));
        }
        // A body with nothing left to read cannot exceed the limit: it is not wrapped.
        if http_body::Body::is_end_stream(req.body()) {
            return Either::Right(self.inner.call(req));
        }
        let max = usize::try_from(self.limits.max_body_bytes).unwrap_or(usize::MAX);
        let req = req.map(|body| Body::new(Limited::new(body, max)));
        Either::Right(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hand-read dotted quad agrees with the standard library's strict parser.
    #[test]
    fn a_dotted_quad_is_four_plain_decimal_numbers() {
        for quad in ["0.0.0.0", "10.0.0.1", "255.255.255.255", "192.168.100.9"] {
            assert!(is_dotted_quad(quad.as_bytes()), "{quad}");
            assert!(quad.parse::<std::net::Ipv4Addr>().is_ok(), "{quad}");
        }
        for not in [
            "256.0.0.1",
            "1.2.3",
            "1.2.3.4.5",
            "01.2.3.4",
            "1.2.3.04",
            "1..3.4",
            "1.2.3.",
            "",
            "1.2.3.1000",
            "a.2.3.4",
            "0x7f.0.0.1",
        ] {
            assert!(!is_dotted_quad(not.as_bytes()), "{not}");
            assert!(not.parse::<std::net::Ipv4Addr>().is_err(), "{not}");
        }
    }
}
