//! What the layers learn about a request, carried in one request extension and brought back on
//! its response for the access log and the audit trail.
//!
//! Each fact in an extension of its own cost an allocation and a hash-map entry on every
//! request, and a rehash once a message had four; a second set on the response cost as much
//! again. Each field says which layer fills it in.

use std::net::IpAddr;
use std::time::Duration;

use http::{Extensions, Request, Response};

use crate::authn::Authenticated;
use crate::peer::ConnInfo;
use crate::routes::RouteClass;
use crate::session::gate::Identity;

/// Facts about a request: filled in on its way in, read back from its response.
///
/// The forwarder hands the request's whole extension map over to the response, which
/// allocates nothing. A response made inside the stack (a refusal) carries no facts until
/// the layers it passes on its way out add theirs: the caller, the identity.
#[derive(Debug, Clone, Default)]
pub struct RequestFacts {
    /// The connection it arrived on (the server, for every request).
    pub conn: Option<ConnInfo>,
    /// The client's address as far as it can be trusted (`peer::ClientIpLayer`).
    pub client_ip: Option<IpAddr>,
    /// Session API or proxied route, and the route's auth mode (the router).
    pub route: Option<RouteClass>,
    /// The caller whose token verified (authn).
    pub who: Option<Authenticated>,
    /// The identity the session gate vouches for to the upstream.
    pub identity: Option<Identity>,
    /// How long the upstream took to produce its response head (the forwarder, on the way
    /// back).
    pub upstream_time: Option<Duration>,
}

/// A message nobody has told anything about.
static UNKNOWN: RequestFacts = RequestFacts {
    conn: None,
    client_ip: None,
    route: None,
    who: None,
    identity: None,
    upstream_time: None,
};

impl RequestFacts {
    pub fn of<B>(req: &Request<B>) -> &RequestFacts {
        Self::in_(req.extensions())
    }

    pub fn of_mut<B>(req: &mut Request<B>) -> &mut RequestFacts {
        req.extensions_mut().get_or_insert_default()
    }

    /// The facts a response brought back.
    pub fn on<B>(response: &Response<B>) -> &RequestFacts {
        Self::in_(response.extensions())
    }

    /// The facts a response brings back; new, empty ones if it brings none yet.
    pub fn on_mut<B>(response: &mut Response<B>) -> &mut RequestFacts {
        response.extensions_mut().get_or_insert_default()
    }

    fn in_(extensions: &Extensions) -> &RequestFacts {
        extensions.get().unwrap_or(&UNKNOWN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_are_filled_in_place_and_read_back() {
        let mut req = Request::new(());
        assert!(RequestFacts::of(&req).client_ip.is_none());
        RequestFacts::of_mut(&mut req).client_ip = Some(IpAddr::from([10, 0, 0, 1]));
        RequestFacts::of_mut(&mut req).route = Some(RouteClass::Api { public: false });
        let facts = RequestFacts::of(&req);
        assert_eq!(facts.client_ip, Some(IpAddr::from([10, 0, 0, 1])));
        assert!(facts.route.is_some());
        assert_eq!(req.extensions().len(), 1, "one extension for all the facts");

        // Handed over whole, as the forwarder does: the response brings the same facts back.
        let mut response = Response::new(());
        assert!(RequestFacts::on(&response).client_ip.is_none());
        response
            .extensions_mut()
            .extend(std::mem::take(req.extensions_mut()));
        RequestFacts::on_mut(&mut response).upstream_time = Some(Duration::from_millis(3));
        let back = RequestFacts::on(&response);
        assert_eq!(back.client_ip, Some(IpAddr::from([10, 0, 0, 1])));
        assert_eq!(back.upstream_time, Some(Duration::from_millis(3)));
        assert_eq!(response.extensions().len(), 1);
    }
}
