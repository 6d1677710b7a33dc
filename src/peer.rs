//! Who is on the other end: the TCP peer of a connection, and the client address derived from it
//! (X-Forwarded-For is believed only when the peer is a configured trusted proxy).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderMap, Request};
use ipnet::IpNet;
use tower::{Layer, Service};

use crate::facts::RequestFacts;

/// Facts about the connection a request arrived on, set by the server on every request.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
}

/// Which peers may speak for the client in X-Forwarded-* headers.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    pub fn new(nets: Vec<IpNet>) -> Self {
        TrustedProxies(nets)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client address: the peer itself, unless the peer is trusted, in which case the
    /// right-most X-Forwarded-For entry that is not itself a trusted proxy (the left-most
    /// entry when all are). Header lines read as one list, the last line right-most. An entry
    /// that does not parse before the client is found makes the trusted proxy right of it the
    /// client.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if !self.contains(peer) {
            return peer;
        }
        // From the right, each entry is written by the trusted proxy right of it, up to the
        // client's; what lies left of that is the client's own to write, so it need not parse.
        let entries = headers
            .get_all("x-forwarded-for")
            .iter()
            .rev()
            .flat_map(|line| line.as_bytes().rsplit(|&b| b == b','));
        let mut nearest_trusted = peer;
        for entry in entries {
            let parsed = std::str::from_utf8(entry)
                .ok()
                .and_then(|text| parse_forwarded_ip(text.trim()));
            // A garbled chain cannot be trusted past the proxy that handed it to us.
            let Some(ip) = parsed.map(canonical) else {
                return nearest_trusted;
            };
            if !self.contains(ip) {
                return ip;
            }
            nearest_trusted = ip;
        }
        nearest_trusted
    }
}

/// Sets the client's address (`RequestFacts::client_ip`) on every request, from the
/// connection's peer and, when that peer is a trusted proxy, its X-Forwarded-For.
#[derive(Clone)]
pub struct ClientIpLayer(pub Arc<TrustedProxies>);

impl<S> Layer<S> for ClientIpLayer {
    type Service = ClientIpService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ClientIpService {
            inner,
            trusted: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct ClientIpService<S> {
    inner: S,
    trusted: Arc<TrustedProxies>,
}

impl<S, B> Service<Request<B>> for ClientIpService<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        if let Some(conn) = RequestFacts::of(&req).conn {
            let ip = self.trusted.client_ip(conn.peer.ip(), req.headers());
            RequestFacts::of_mut(&mut req).client_ip = Some(ip);
        }
        self.inner.call(req)
    }
}

/// Accepts `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1` and `[2001:db8::1]:5678`.
fn parse_forwarded_ip(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    s.parse::<SocketAddr>().ok().map(|a| a.ip())
}

/// IPv4-mapped IPv6 addresses (from dual-stack sockets) compare as the IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in xff {
            h.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn trusted() -> TrustedProxies {
        TrustedProxies::new(vec!["10.0.0.0/8".parse().unwrap()])
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// The client address a request from `peer` with these X-Forwarded-For lines gets.
    fn client(peer: &str, xff: &[&str]) -> IpAddr {
        trusted().client_ip(ip(peer), &headers(xff))
    }

    #[test]
    fn untrusted_peer_cannot_claim_another_address() {
        let ip = trusted().client_ip("203.0.113.9".parse().unwrap(), &headers(&["1.1.1.1"]));
        assert_eq!(ip, "203.0.113.9".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn untrusted_peer_ignores_the_header_whatever_it_holds() {
        let peer = "203.0.113.9";
        assert_eq!(client(peer, &["10.1.1.1"]), ip(peer));
        assert_eq!(client(peer, &["nonsense"]), ip(peer));
        assert_eq!(client(peer, &["198.51.100.4", "10.1.1.1, junk"]), ip(peer));
    }

    #[test]
    fn junk_left_of_the_client_is_ignored() {
        // What the client wrote itself: it cannot move the request into its proxy's bucket.
        assert_eq!(
            client("10.0.0.2", &["unknown, 203.0.113.66"]),
            ip("203.0.113.66")
        );
        assert_eq!(
            client("10.0.0.2", &["unknown, 6.6.6.6, 203.0.113.66, 10.1.1.1"]),
            ip("203.0.113.66")
        );
    }

    #[test]
    fn junk_at_the_boundary_stops_at_the_proxy_that_handed_it_over() {
        assert_eq!(
            client("10.0.0.2", &["203.0.113.66, unknown, 10.1.1.1"]),
            ip("10.1.1.1")
        );
        assert_eq!(
            client("10.0.0.2", &["203.0.113.66, 10.3.3.3, unknown, 10.1.1.1"]),
            ip("10.1.1.1")
        );
        assert_eq!(
            client("10.0.0.2", &["203.0.113.66, unknown"]),
            ip("10.0.0.2")
        );
        assert_eq!(
            client("10.0.0.2", &["203.0.113.66", ""]),
            ip("10.0.0.2"),
            "an empty entry is garbled too"
        );
    }

    #[test]
    fn header_lines_are_one_list_the_last_line_right_most() {
        assert_eq!(
            client("10.0.0.2", &["198.51.100.4", "203.0.113.66"]),
            ip("203.0.113.66")
        );
        assert_eq!(
            client(
                "10.0.0.2",
                &["unknown", "203.0.113.66, 10.1.1.1", "10.2.2.2"]
            ),
            ip("203.0.113.66")
        );
        assert_eq!(
            client("10.0.0.2", &["203.0.113.66", "junk", "10.1.1.1"]),
            ip("10.1.1.1")
        );
    }

    #[test]
    fn when_every_entry_is_trusted_the_left_most_is_the_client() {
        assert_eq!(
            client("10.0.0.2", &["10.3.3.3, 10.1.1.1", "10.2.2.2"]),
            ip("10.3.3.3")
        );
    }

    #[test]
    fn entries_may_carry_ports_brackets_and_spaces() {
        assert_eq!(
            client("10.0.0.2", &["[2001:db8::7]:443,\t10.1.1.1:80"]),
            ip("2001:db8::7")
        );
        assert_eq!(
            client("10.0.0.2", &["  203.0.113.66:5000  "]),
            ip("203.0.113.66")
        );
        assert_eq!(
            client("10.0.0.2", &["::ffff:203.0.113.66"]),
            ip("203.0.113.66")
        );
    }

    #[test]
    fn non_utf8_entries_are_garbled_only_where_they_are_walked() {
        let peer = ip("10.0.0.2");
        let raw = |bytes: &[u8]| {
            let mut h = HeaderMap::new();
            h.append("x-forwarded-for", HeaderValue::from_bytes(bytes).unwrap());
            h
        };
        assert_eq!(
            trusted().client_ip(peer, &raw(b"\xff\xfe, 203.0.113.66")),
            ip("203.0.113.66")
        );
        assert_eq!(
            trusted().client_ip(peer, &raw(b"203.0.113.66, \xe9t\xe9, 10.1.1.1")),
            ip("10.1.1.1")
        );
        assert_eq!(trusted().client_ip(peer, &raw(b"203.0.113.66, \xff")), peer);
    }

    #[test]
    fn trusted_peer_gives_rightmost_untrusted_hop() {
        let ip = trusted().client_ip(
            "10.0.0.2".parse().unwrap(),
            &headers(&["6.6.6.6, 198.51.100.4", "10.1.1.1"]),
        );
        assert_eq!(ip, "198.51.100.4".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn trusted_peer_without_header_is_the_client() {
        let ip = trusted().client_ip("10.0.0.2".parse().unwrap(), &headers(&[]));
        assert_eq!(ip, "10.0.0.2".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn garbled_chain_falls_back_to_the_peer() {
        let ip = trusted().client_ip("10.0.0.2".parse().unwrap(), &headers(&["nonsense"]));
        assert_eq!(ip, "10.0.0.2".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn mapped_ipv6_peer_matches_ipv4_network() {
        assert!(trusted().contains("::ffff:10.0.0.3".parse().unwrap()));
    }
}
