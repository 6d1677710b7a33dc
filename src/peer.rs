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
    /// right-most X-Forwarded-For entry that is not itself a trusted proxy.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if !self.contains(peer) {
            return peer;
        }
        let mut hops: Vec<IpAddr> = Vec::new();
        for value in headers.get_all("x-forwarded-for") {
            let Ok(text) = value.to_str() else {
                return peer;
            };
            for part in text.split(',') {
                match parse_forwarded_ip(part.trim()) {
                    Some(ip) => hops.push(canonical(ip)),
                    // A garbled chain cannot be trusted past the proxy that handed it to us.
                    None => return peer,
                }
            }
        }
        hops.iter()
            .rev()
            .copied()
            .find(|ip| !self.contains(*ip))
            .or_else(|| hops.first().copied())
            .unwrap_or(peer)
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

    #[test]
    fn untrusted_peer_cannot_claim_another_address() {
        let ip = trusted().client_ip("203.0.113.9".parse().unwrap(), &headers(&["1.1.1.1"]));
        assert_eq!(ip, "203.0.113.9".parse::<IpAddr>().unwrap());
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
