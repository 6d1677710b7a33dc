//! What the layers learn about a request, carried in one request extension, and what the access
//! log needs to know about its answer, carried in one response extension.
//!
//! Each fact in an extension of its own cost an allocation and a hash-map entry on every
//! request, and a rehash once a message had four: about 5% of an enforced request's
//! instructions. Each field says which layer fills it in.

use std::net::IpAddr;
use std::time::Duration;

use http::{Request, Response};

use crate::authn::Authenticated;
use crate::peer::ConnInfo;
use crate::routes::RouteClass;
use crate::session::gate::Identity;

/// Facts about a request, filled in on its way in.
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
}

/// A request nobody has told anything about.
static UNKNOWN_REQUEST: RequestFacts = RequestFacts {
    conn: None,
    client_ip: None,
    route: None,
    who: None,
    identity: None,
};

impl RequestFacts {
    pub fn of<B>(req: &Request<B>) -> &RequestFacts {
        req.extensions().get().unwrap_or(&UNKNOWN_REQUEST)
    }

    pub fn of_mut<B>(req: &mut Request<B>) -> &mut RequestFacts {
        req.extensions_mut().get_or_insert_default()
    }
}

/// Facts about how a request was answered, for the access log and the audit trail. A refusal
/// carries its [`crate::error::Rejection`] as an extension of its own.
#[derive(Debug, Clone, Default)]
pub struct ResponseFacts {
    /// How long the upstream took to produce its response head (forward).
    pub upstream_time: Option<Duration>,
    /// The caller whose token verified (authn).
    pub who: Option<Authenticated>,
    /// The identity the session gate vouched for.
    pub identity: Option<Identity>,
}

static UNKNOWN_RESPONSE: ResponseFacts = ResponseFacts {
    upstream_time: None,
    who: None,
    identity: None,
};

impl ResponseFacts {
    pub fn of<B>(response: &Response<B>) -> &ResponseFacts {
        response.extensions().get().unwrap_or(&UNKNOWN_RESPONSE)
    }

    pub fn of_mut<B>(response: &mut Response<B>) -> &mut ResponseFacts {
        response.extensions_mut().get_or_insert_default()
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

        let mut response = Response::new(());
        assert!(ResponseFacts::of(&response).upstream_time.is_none());
        ResponseFacts::of_mut(&mut response).upstream_time = Some(Duration::from_millis(3));
        assert_eq!(
            ResponseFacts::of(&response).upstream_time,
            Some(Duration::from_millis(3))
        );
    }
}
