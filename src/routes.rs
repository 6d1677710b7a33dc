//! Which policy applies to a request: the session API, or a proxied route with its auth mode.
//! Prefixes match whole segments of the normalised path (percent-decoded once, dot segments
//! resolved, empty segments dropped), so `/public/../game` and `/public/%2e%2e/game` are judged
//! as `/game`. The path itself is still forwarded byte for byte.

use std::borrow::Cow;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::{Request, Response};
use percent_encoding::percent_decode_str;
use tower::{Layer, Service};

use crate::config::{AuthMode, RouteConfig};
use crate::facts::RequestFacts;
use crate::Body;

/// The class of a request, decided once and carried in its [`crate::facts::RequestFacts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteClass {
    /// The session API; `public` for its OpenAPI document.
    Api { public: bool },
    /// Forwarded upstream after the route's checks. `route` is the index of the matching
    /// `[[routes]]` entry in configuration order, if any.
    Proxy {
        auth: AuthMode,
        route: Option<usize>,
    },
}

impl RouteClass {
    /// The authentication this request needs before it goes further.
    pub fn auth(self) -> AuthMode {
        match self {
            RouteClass::Api { public: true } => AuthMode::None,
            RouteClass::Api { public: false } => AuthMode::Jwt,
            RouteClass::Proxy { auth, .. } => auth,
        }
    }
}

/// The route table: the session API prefix first, then the longest matching `[[routes]]` prefix,
/// else `session`.
#[derive(Debug, Clone)]
pub struct RouteTable {
    api_prefix: String,
    /// Longest prefix first, each with its index in configuration order.
    routes: Vec<(usize, RouteConfig)>,
}

impl RouteTable {
    pub fn new(api_prefix: &str, routes: &[RouteConfig]) -> Self {
        let mut routes: Vec<(usize, RouteConfig)> = routes.iter().cloned().enumerate().collect();
        routes.sort_by_key(|(_, r)| std::cmp::Reverse(r.path_prefix.len()));
        RouteTable {
            api_prefix: api_prefix.to_string(),
            routes,
        }
    }

    pub fn api_prefix(&self) -> &str {
        &self.api_prefix
    }

    pub fn classify(&self, raw_path: &str) -> RouteClass {
        let path = normalise(raw_path);
        if matches_prefix(&self.api_prefix, &path) {
            let public = path == format!("{}/openapi.json", self.api_prefix);
            return RouteClass::Api { public };
        }
        match self
            .routes
            .iter()
            .find(|(_, r)| matches_prefix(&r.path_prefix, &path))
        {
            Some((index, r)) => RouteClass::Proxy {
                auth: r.auth,
                route: Some(*index),
            },
            None => RouteClass::Proxy {
                auth: AuthMode::Session,
                route: None,
            },
        }
    }
}

/// True when `prefix` (normalised, no trailing slash; `""` is the root) covers `path` on whole
/// segments.
pub fn matches_prefix(prefix: &str, path: &str) -> bool {
    prefix.is_empty()
        || path == prefix
        || (path.starts_with(prefix) && path.as_bytes().get(prefix.len()) == Some(&b'/'))
}

/// The path as a server would resolve it: percent-decoded once (so `%2e` and `%2f` count),
/// `.` and `..` resolved, empty segments dropped. Always starts with `/`, never ends with one
/// (except the root). A path that is already so (nearly every one) is returned as it is.
pub fn normalise(raw_path: &str) -> Cow<'_, str> {
    if is_normal(raw_path) {
        Cow::Borrowed(raw_path)
    } else {
        Cow::Owned(resolve(raw_path))
    }
}

fn resolve(raw_path: &str) -> String {
    let decoded = percent_decode_str(raw_path).decode_utf8_lossy();
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split(['/', '\\']) {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len() + 1);
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// True when [`normalise`] would change nothing: no escapes, no backslashes, no empty or dot
/// segments, no trailing slash.
fn is_normal(path: &str) -> bool {
    if path == "/" {
        return true;
    }
    let Some(segments) = path.strip_prefix('/') else {
        return false;
    };
    !path.contains(['%', '\\']) && segments.split('/').all(|s| !matches!(s, "" | "." | ".."))
}

#[derive(Clone)]
pub struct RouterLayer(pub Arc<RouteTable>);

impl<S> Layer<S> for RouterLayer {
    type Service = Router<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Router {
            inner,
            table: self.0.clone(),
        }
    }
}

/// Classifies each request and passes it on with its [`RouteClass`].
#[derive(Clone)]
pub struct Router<S> {
    inner: S,
    table: Arc<RouteTable>,
}

impl<S> Service<Request<Body>> for Router<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let class = self.table.classify(req.uri().path());
        RequestFacts::of_mut(&mut req).route = Some(class);
        self.inner.call(req)
    }
}

/// Sends API requests to one service and proxied requests to another.
#[derive(Clone)]
pub struct Split<A, P> {
    pub api: A,
    pub proxy: P,
}

impl<A, P, E> Service<Request<Body>> for Split<A, P>
where
    A: Service<Request<Body>, Response = Response<Body>, Error = E>,
    P: Service<Request<Body>, Response = Response<Body>, Error = E>,
    A::Future: Send + 'static,
    P::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = E;
    type Future = Either<A::Future, P::Future>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), E>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        match RequestFacts::of(&req).route {
            Some(RouteClass::Api { .. }) => Either::Left(self.api.call(req)),
            _ => Either::Right(self.proxy.call(req)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(prefix: &str, auth: AuthMode) -> RouteConfig {
        RouteConfig {
            path_prefix: prefix.into(),
            auth,
            rate_limit: crate::config::RouteLimit::Inherit,
        }
    }

    fn auth(class: RouteClass) -> AuthMode {
        class.auth()
    }

    fn table() -> RouteTable {
        RouteTable::new(
            "/api/v1/sessions",
            &[
                route("/login", AuthMode::None),
                route("/public", AuthMode::None),
                route("/public/profile", AuthMode::Jwt),
            ],
        )
    }

    #[test]
    fn normalisation_resolves_encoded_dot_segments() {
        assert_eq!(normalise("/public/../game"), "/game");
        assert_eq!(normalise("/public/%2e%2e/game"), "/game");
        assert_eq!(normalise("/public/%2E%2E%2Fgame"), "/game");
        assert_eq!(normalise("//a/./b//"), "/a/b");
        assert_eq!(normalise("/.."), "/");
        assert_eq!(normalise(""), "/");
    }

    #[test]
    fn paths_already_normal_are_borrowed_and_the_rest_resolved() {
        for path in ["/", "/game", "/game/x.y", "/a/b/c", "/a/..b", "/a/.b/c"] {
            assert!(
                matches!(normalise(path), Cow::Borrowed(p) if p == path),
                "{path}"
            );
        }
        for path in [
            "", "//", "/a/", "/a//b", "/a/.", "/a/..", "/./a", "/a\\b", "/a/%41", "a/b", "/%2e",
        ] {
            assert!(matches!(normalise(path), Cow::Owned(_)), "{path}");
            assert_eq!(normalise(path), resolve(path), "{path}");
        }
        assert_eq!(normalise("/a\\b/"), "/a/b");
        assert_eq!(normalise("/a/%41"), "/a/A");
    }

    #[test]
    fn prefixes_match_whole_segments_and_longest_wins() {
        let t = table();
        assert_eq!(auth(t.classify("/login")), AuthMode::None);
        assert_eq!(auth(t.classify("/login/x")), AuthMode::None);
        assert_eq!(auth(t.classify("/loginx")), AuthMode::Session);
        assert_eq!(auth(t.classify("/public/profile/7")), AuthMode::Jwt);
        assert_eq!(auth(t.classify("/public/x")), AuthMode::None);
        assert_eq!(auth(t.classify("/game")), AuthMode::Session);
    }

    #[test]
    fn traversal_out_of_an_open_route_is_judged_by_its_target() {
        let t = table();
        assert_eq!(auth(t.classify("/public/../game")), AuthMode::Session);
        assert_eq!(auth(t.classify("/public/%2e%2e/game")), AuthMode::Session);
        assert_eq!(auth(t.classify("/login/..%2fgame")), AuthMode::Session);
    }

    #[test]
    fn the_session_api_is_recognised_after_normalisation() {
        let t = table();
        assert_eq!(
            t.classify("/api/v1/sessions/create"),
            RouteClass::Api { public: false }
        );
        assert_eq!(
            t.classify("/public/../api/v1/sessions/x"),
            RouteClass::Api { public: false }
        );
        assert_eq!(
            t.classify("/api/v1/sessions/openapi.json"),
            RouteClass::Api { public: true }
        );
        assert_eq!(auth(t.classify("/api/v1/sessionsx")), AuthMode::Session);
    }
}
