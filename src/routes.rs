//! Which policy applies to a request: the session API, or a proxied route with its auth mode.
//!
//! What portcullis judges is what the upstream receives. The path is first brought to its
//! canonical form (RFC 3986 6.2.2: escapes of unreserved characters decoded, dot segments
//! resolved, repeated slashes merged), and that form is both matched and forwarded: a backend
//! that resolved `/login/../game` itself would otherwise run its `/game` handler on a request
//! judged as `/login`. A path that backends read in incompatible ways (an encoded `/` or `\`,
//! a backslash, a malformed or control-character escape) is refused with 400.
//!
//! Backends still differ on what they do with the canonical path: some percent-decode what is
//! left, strip `;parameters` from segments (Java servlet containers), or route ignoring case.
//! The route is judged under each of those readings and the strictest auth mode wins, so that
//! no reading reaches a handler with fewer checks than its route demands.

use std::borrow::Cow;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::uri::PathAndQuery;
use http::{Request, Response, Uri};
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
    /// Forwarded upstream after the route's checks: `auth` from the strictest reading of the
    /// path, the quotas from every route a reading lands on (see [`Routes`]).
    Proxy { auth: AuthMode, routes: Routes },
    /// A path that cannot be judged safely; refused before any other work
    /// ([`crate::limits`]).
    Invalid(PathError),
}

impl RouteClass {
    /// The authentication this request needs before it goes further.
    pub fn auth(self) -> AuthMode {
        match self {
            RouteClass::Api { public: true } => AuthMode::None,
            RouteClass::Api { public: false } => AuthMode::Jwt,
            RouteClass::Proxy { auth, .. } => auth,
            // Never forwarded; should a layer ever let it through, it needs everything.
            RouteClass::Invalid(_) => AuthMode::Session,
        }
    }
}

/// Most `[[routes]]` entries a configuration may have.
pub const MAX_ROUTES: usize = 10_000;

/// The `[[routes]]` entries (by index in configuration order; `None` for the default, no
/// route) that the readings of a request's path land on. A backend may route the request by any
/// of those readings, so it counts against each one's quota: `/LOGIN` against `/login`'s even
/// when, read as it is, it matches no route and needs the default's stricter auth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Routes {
    len: u8,
    /// Route indices; [`Routes::DEFAULT`] for no route. Small, as every request carries one:
    /// configuration allows at most [`MAX_ROUTES`] routes.
    slots: [u16; Routes::CAPACITY],
}

impl Routes {
    /// As many as a path has readings (see `RouteTable::strictest_reading`).
    const CAPACITY: usize = 8;
    const DEFAULT: u16 = u16::MAX;

    /// Only `route`.
    pub fn one(route: Option<usize>) -> Self {
        let mut routes = Routes {
            len: 0,
            slots: [Self::DEFAULT; Self::CAPACITY],
        };
        routes.add(route);
        routes
    }

    fn add(&mut self, route: Option<usize>) {
        let slot = route.map_or(Self::DEFAULT, |i| u16::try_from(i).unwrap_or(Self::DEFAULT));
        let len = usize::from(self.len);
        if !self.slots[..len].contains(&slot) && len < Self::CAPACITY {
            self.slots[len] = slot;
            self.len += 1;
        }
    }

    /// Each route once, in the order the readings found them.
    pub fn iter(&self) -> impl Iterator<Item = Option<usize>> + '_ {
        self.slots[..usize::from(self.len)]
            .iter()
            .map(|&slot| (slot != Self::DEFAULT).then_some(usize::from(slot)))
    }
}

/// Why a path is refused: portcullis and the upstream could read it as different paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// `%2F` or `%5C`: a separator to some backends, data to others.
    EncodedSeparator,
    /// `\`: a separator to some backends (and to browsers), data to others.
    Backslash,
    /// `%` not followed by two hex digits, or an escaped control character.
    BadEscape,
}

impl PathError {
    pub fn message(self) -> &'static str {
        match self {
            PathError::EncodedSeparator => {
                "the request path contains an encoded slash or backslash (%2F, %5C)"
            }
            PathError::Backslash => "the request path contains a backslash",
            PathError::BadEscape => {
                "the request path contains a malformed percent escape or an escaped control character"
            }
        }
    }
}

/// How much a mode demands: a reading that lands on a stricter route wins.
fn strictness(mode: AuthMode) -> u8 {
    match mode {
        AuthMode::None => 0,
        AuthMode::Jwt => 1,
        AuthMode::Session => 2,
    }
}

/// The route table: the session API prefix first, then the longest matching `[[routes]]` prefix,
/// else `session`.
#[derive(Debug, Clone)]
pub struct RouteTable {
    api_prefix: String,
    /// Longest prefix first, each with its index in configuration order.
    routes: Vec<(usize, RouteConfig)>,
    /// Some prefix has an upper-case letter: every path gets the case-insensitive reading.
    mixed_case: bool,
}

impl RouteTable {
    pub fn new(api_prefix: &str, routes: &[RouteConfig]) -> Self {
        let mut routes: Vec<(usize, RouteConfig)> = routes.iter().cloned().enumerate().collect();
        routes.sort_by_key(|(_, r)| std::cmp::Reverse(r.path_prefix.len()));
        let mixed_case = routes
            .iter()
            .any(|(_, r)| r.path_prefix.bytes().any(|b| b.is_ascii_uppercase()));
        RouteTable {
            api_prefix: api_prefix.to_string(),
            routes,
            mixed_case,
        }
    }

    pub fn api_prefix(&self) -> &str {
        &self.api_prefix
    }

    /// The class of a request for `raw_path` as it arrived.
    pub fn classify(&self, raw_path: &str) -> RouteClass {
        match canonical(raw_path) {
            Ok(path) => self.classify_canonical(&path),
            Err(e) => RouteClass::Invalid(e),
        }
    }

    /// The class of a request whose path is already canonical (see [`canonical`]).
    pub fn classify_canonical(&self, path: &str) -> RouteClass {
        // `*` (OPTIONS) and an empty path are judged as the root.
        let path = if path.starts_with('/') { path } else { "/" };
        let judged = match path.strip_suffix('/') {
            Some(trimmed) if !trimmed.is_empty() => trimmed,
            _ => path,
        };
        if matches_prefix(&self.api_prefix, judged) {
            let public = judged
                .strip_prefix(self.api_prefix.as_str())
                .is_some_and(|rest| rest == "/openapi.json");
            return RouteClass::Api { public };
        }
        let (auth, routes) = self.strictest_reading(judged);
        RouteClass::Proxy { auth, routes }
    }

    /// The auth of the strictest route among the readings a backend may make of `path` (as it
    /// is, percent-decoded, without `;parameters`, and each of those ignoring case), and every
    /// route those readings land on: `/game;x` or `/GAME` counts against `/game`'s quota as
    /// surely as `/game` does.
    fn strictest_reading(&self, path: &str) -> (AuthMode, Routes) {
        let (mut auth, route) = self.route_for(path, false);
        let mut routes = Routes::one(route);
        let mut consider = |reading: &str, exact_done: bool| {
            for ignore_case in [false, true] {
                let skip = if ignore_case {
                    !self.mixed_case && !reading.bytes().any(|b| b.is_ascii_uppercase())
                } else {
                    exact_done
                };
                if skip {
                    continue;
                }
                let (reading_auth, route) = self.route_for(reading, ignore_case);
                if strictness(reading_auth) > strictness(auth) {
                    auth = reading_auth;
                }
                routes.add(route);
            }
        };
        consider(path, true);
        if path.contains(['%', ';']) {
            let decoded = percent_decode_str(path).decode_utf8_lossy();
            if decoded != path {
                consider(&decoded, false);
            }
            for base in [path, decoded.as_ref()] {
                if base.contains(';') {
                    consider(&resolve(&without_parameters(base)), false);
                }
            }
        }
        (auth, routes)
    }

    /// The auth and index of the longest `[[routes]]` prefix covering `path`, else the default
    /// (`session`, no route).
    fn route_for(&self, path: &str, ignore_case: bool) -> (AuthMode, Option<usize>) {
        self.routes
            .iter()
            .find(|(_, r)| {
                if ignore_case {
                    matches_prefix_ignoring_case(&r.path_prefix, path)
                } else {
                    matches_prefix(&r.path_prefix, path)
                }
            })
            .map_or((AuthMode::Session, None), |(index, r)| {
                (r.auth, Some(*index))
            })
    }
}

/// True when `prefix` (normalised, no trailing slash; `""` is the root) covers `path` on whole
/// segments.
pub fn matches_prefix(prefix: &str, path: &str) -> bool {
    prefix.is_empty()
        || path == prefix
        || (path.starts_with(prefix) && path.as_bytes().get(prefix.len()) == Some(&b'/'))
}

fn matches_prefix_ignoring_case(prefix: &str, path: &str) -> bool {
    let head = path.as_bytes().get(..prefix.len());
    prefix.is_empty()
        || (head.is_some_and(|head| head.eq_ignore_ascii_case(prefix.as_bytes()))
            && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/')))
}

/// Each segment cut at its first `;`, as servlet containers do before routing.
fn without_parameters(path: &str) -> String {
    path.split('/')
        .map(|segment| segment.split(';').next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("/")
}

/// The canonical form of a request path (RFC 3986 6.2.2): escapes of unreserved characters
/// decoded, dot segments resolved, repeated slashes merged, a trailing slash kept. Borrowed
/// when the path is already so, as nearly every one is; a path that does not start with `/`
/// (`*`) is left as it is.
pub fn canonical(raw_path: &str) -> Result<Cow<'_, str>, PathError> {
    if !raw_path.starts_with('/') || is_canonical(raw_path) {
        return Ok(Cow::Borrowed(raw_path));
    }
    let decoded = decode_unreserved(raw_path)?;
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in decoded.split('/').skip(1) {
        trailing_slash = matches!(segment, "" | "." | "..");
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

/// True when [`canonical`] would change nothing: no escapes, no backslashes, no empty or dot
/// segments (a trailing slash is kept).
fn is_canonical(path: &str) -> bool {
    let Some(segments) = path.strip_prefix('/') else {
        return false;
    };
    let segments = segments.strip_suffix('/').unwrap_or(segments);
    path == "/"
        || (!path.contains(['%', '\\'])
            && segments.split('/').all(|s| !matches!(s, "" | "." | "..")))
}

/// Decodes the escapes of unreserved characters (`A-Z a-z 0-9 - . _ ~`), which name the same
/// resource either way; other escapes stay as they are. Refuses what backends disagree on.
fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => return Err(PathError::Backslash),
            b'%' => {
                let byte = bytes
                    .get(i + 1..i + 3)
                    .and_then(|hex| std::str::from_utf8(hex).ok())
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                    .ok_or(PathError::BadEscape)?;
                out.push_str(&path[copied..i]);
                match byte {
                    b'/' | b'\\' => return Err(PathError::EncodedSeparator),
                    b if b.is_ascii_control() => return Err(PathError::BadEscape),
                    b if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') => {
                        out.push(char::from(b));
                    }
                    _ => out.push_str(&path[i..i + 3]),
                }
                i += 3;
                copied = i;
            }
            _ => i += 1,
        }
    }
    out.push_str(&path[copied..]);
    Ok(out)
}

/// The path as a lenient server would resolve it: percent-decoded once, `.` and `..` resolved,
/// empty segments dropped, no trailing slash. For matching the session API's own endpoints.
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

/// Classifies each request and passes it on with its [`RouteClass`], its path made canonical.
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
        let class = match canonical(req.uri().path()) {
            Ok(Cow::Borrowed(path)) => self.table.classify_canonical(path),
            Ok(Cow::Owned(path)) => match with_path(req.uri(), &path) {
                Some(uri) => {
                    *req.uri_mut() = uri;
                    self.table.classify_canonical(&path)
                }
                None => RouteClass::Invalid(PathError::BadEscape),
            },
            Err(e) => RouteClass::Invalid(e),
        };
        RequestFacts::of_mut(&mut req).route = Some(class);
        self.inner.call(req)
    }
}

/// `uri` with its path replaced and its query kept.
fn with_path(uri: &Uri, path: &str) -> Option<Uri> {
    let path_and_query = match uri.query() {
        Some(query) => PathAndQuery::try_from(format!("{path}?{query}")),
        None => PathAndQuery::try_from(path),
    }
    .ok()?;
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query);
    Uri::from_parts(parts).ok()
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
        assert_eq!(auth(t.classify("/game/../public")), AuthMode::None);
    }

    #[test]
    fn canonical_paths_decode_unreserved_escapes_and_resolve_dot_segments() {
        for (raw, want) in [
            ("/", "/"),
            ("/game/x.y", "/game/x.y"),
            ("/a/", "/a/"),
            ("*", "*"),
            ("", ""),
            ("/public/%2e%2e/game", "/game"),
            ("/public/%2E%2E/game/", "/game/"),
            ("/a//b///c", "/a/b/c"),
            ("/a/b/..", "/a/"),
            ("/a/./b/.", "/a/b/"),
            ("/..", "/"),
            ("/%7Euser/%41-%5f", "/~user/A-_"),
            ("/a/%20b%3B%25", "/a/%20b%3B%25"),
            ("/caf%C3%A9", "/caf%C3%A9"),
        ] {
            assert_eq!(canonical(raw).as_deref(), Ok(want), "{raw}");
        }
        for raw in ["/", "/game/x.y", "/a/", "/a/..b/.c", "*"] {
            assert!(matches!(canonical(raw), Ok(Cow::Borrowed(_))), "{raw}");
        }
    }

    #[test]
    fn paths_backends_disagree_on_are_invalid() {
        for (raw, want) in [
            ("/a%2fb", PathError::EncodedSeparator),
            ("/a/%2F..", PathError::EncodedSeparator),
            ("/a%5Cb", PathError::EncodedSeparator),
            ("/a\\b", PathError::Backslash),
            ("/a/%zz", PathError::BadEscape),
            ("/a/%4", PathError::BadEscape),
            ("/a/%", PathError::BadEscape),
            ("/a/%00", PathError::BadEscape),
            ("/a/%1b[31m", PathError::BadEscape),
            ("/a/%7f", PathError::BadEscape),
        ] {
            assert_eq!(canonical(raw), Err(want), "{raw}");
            assert_eq!(table().classify(raw), RouteClass::Invalid(want), "{raw}");
        }
    }

    fn nested() -> RouteTable {
        RouteTable::new(
            "/api/v1/sessions",
            &[
                route("/open", AuthMode::None),
                route("/open/admin", AuthMode::Session),
                route("/open/me", AuthMode::Jwt),
            ],
        )
    }

    #[test]
    fn each_reading_of_a_path_is_held_to_the_strictest_route_it_reaches() {
        let t = nested();
        for path in [
            "/open/ADMIN",
            "/open/Admin/users",
            "/OPEN/x",
            "/open/admin;",
            "/open/admin;jsessionid=x/users",
            "/open/x/..;/admin",
            "/open/admin%3Bx",
            "/open/adm%69n",
        ] {
            assert_eq!(auth(t.classify(path)), AuthMode::Session, "{path}");
        }
        assert_eq!(auth(t.classify("/open/ME;x")), AuthMode::Jwt);
        for path in ["/open/x", "/open/News;v=2", "/open/a%20b", "/open/adminx"] {
            assert_eq!(auth(t.classify(path)), AuthMode::None, "{path}");
        }
        // Each route a reading reaches supplies its limits: `/open` read as it is, `/open/admin`
        // ignoring case.
        assert_eq!(quotas(&t, "/open/ADMIN"), [Some(0), Some(1)]);
    }

    /// The routes whose quotas a request for `path` counts against, in index order (`None`, the
    /// default, first).
    fn quotas(t: &RouteTable, path: &str) -> Vec<Option<usize>> {
        match t.classify(path) {
            RouteClass::Proxy { routes, .. } => {
                let mut all: Vec<_> = routes.iter().collect();
                all.sort();
                all
            }
            other => panic!("{path}: {other:?}"),
        }
    }

    #[test]
    fn every_route_a_reading_reaches_supplies_a_quota() {
        let t = RouteTable::new(
            "/api/v1/sessions",
            &[
                route("", AuthMode::None),
                route("/login", AuthMode::None),
                route("/game", AuthMode::Session),
                route("/game/shop", AuthMode::Session),
            ],
        );
        for (path, expected) in [
            ("/login", &[Some(1)][..]),
            ("/log%69n", &[Some(1)]),
            // As it is, the root route's; without parameters, or ignoring case, `/login`'s.
            ("/login;a", &[Some(0), Some(1)]),
            ("/LOGIN", &[Some(0), Some(1)]),
            ("/Login/x", &[Some(0), Some(1)]),
            ("/game/x", &[Some(2)]),
            ("/game;x/buy", &[Some(0), Some(2)]),
            ("/GAME/buy", &[Some(0), Some(2)]),
            ("/game/shop;x", &[Some(2), Some(3)]),
            ("/game/SHOP", &[Some(2), Some(3)]),
            ("/GAME/shop/1", &[Some(0), Some(3)]),
        ] {
            assert_eq!(quotas(&t, path), expected, "{path}");
        }
        // A route that needs less than the default still counts a path one of whose readings
        // lands on it: `/SIGNIN` needs a session (as it is, it matches no route), and counts
        // against `/signin`'s quota as well as the default's.
        let t = RouteTable::new("/api/v1/sessions", &[route("/signin", AuthMode::None)]);
        for path in ["/SIGNIN", "/signin;x"] {
            assert_eq!(auth(t.classify(path)), AuthMode::Session, "{path}");
            assert_eq!(quotas(&t, path), [None, Some(0)], "{path}");
        }
    }

    #[test]
    fn a_prefix_with_capitals_is_matched_ignoring_case_too() {
        let t = RouteTable::new(
            "/api/v1/sessions",
            &[
                route("/Game", AuthMode::Jwt),
                route("/login", AuthMode::None),
            ],
        );
        assert_eq!(auth(t.classify("/Game/x")), AuthMode::Jwt);
        // Case-sensitive backends route `/game` elsewhere (default: session).
        assert_eq!(auth(t.classify("/game/x")), AuthMode::Session);
        assert_eq!(auth(t.classify("/login")), AuthMode::None);
    }

    #[test]
    fn the_router_forwards_the_canonical_path_with_the_query_as_sent() {
        let table = Arc::new(table());
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = seen.clone();
        let inner = tower::service_fn(move |req: Request<Body>| {
            let class = RequestFacts::of(&req).route;
            record.lock().unwrap().push((req.uri().clone(), class));
            std::future::ready(Ok::<_, std::convert::Infallible>(Response::new(
                crate::error::full(""),
            )))
        });
        let mut router = RouterLayer(table).layer(inner);
        for target in [
            "/login/./x?q=%2e%2e",
            "https://game.example/public/../game?a=1",
            "/game",
        ] {
            let req = Request::builder()
                .uri(target)
                .body(crate::error::full(""))
                .unwrap();
            drop(router.call(req));
        }
        let seen = seen.lock().unwrap();
        assert_eq!(seen[0].0, "/login/x?q=%2e%2e");
        assert_eq!(auth(seen[0].1.unwrap()), AuthMode::None);
        assert_eq!(seen[1].0, "https://game.example/game?a=1");
        assert_eq!(auth(seen[1].1.unwrap()), AuthMode::Session);
        assert_eq!(seen[2].0, "/game");
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
