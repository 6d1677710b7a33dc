//! Configuration: the TOML file as written (serde structs, unknown keys refused), environment
//! overrides, and validation into typed values, once, at start.
//!
//! Reading goes file -> `toml::Table` -> `PORTCULLIS_<SECTION>_<KEY>` overrides -> [`FileConfig`]
//! -> [`FileConfig::validate`] -> [`Config`]. Every problem is reported at once, each naming its key.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderName, HeaderValue, Uri};
use ipnet::IpNet;
use rustls::pki_types::CertificateDer;
use serde::Deserialize;

use crate::routes::matches_prefix;
use crate::session::cache::HEARTBEAT;

/// What the examples' placeholder values (deploy/k8s/secrets.yaml) contain: a secret holding it
/// is public knowledge.
const PLACEHOLDER: &[u8] = b"REPLACE-ME";

fn is_placeholder(secret: &[u8]) -> bool {
    secret
        .windows(PLACEHOLDER.len())
        .any(|w| w.eq_ignore_ascii_case(PLACEHOLDER))
}

/// One problem with the configuration, naming the key it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config key `{}`: {}", self.key, self.reason)
    }
}

/// Every problem found in one configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl ConfigErrors {
    fn one(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigErrors(vec![ConfigError {
            key: key.into(),
            reason: reason.into(),
        }])
    }
}

// ---------------------------------------------------------------------------------------------
// The file as written.
// ---------------------------------------------------------------------------------------------

/// The configuration file as written. Every section and key is optional; defaults are those of
/// the documented `config.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    pub server: ServerSection,
    pub upstream: UpstreamSection,
    pub admin: AdminSection,
    pub log: LogSection,
    pub redis: RedisSection,
    pub session: SessionSection,
    pub identity: IdentitySection,
    pub jwt: JwtSection,
    pub rate_limit: RateLimitSection,
    pub metrics: MetricsSection,
    pub cors: CorsSection,
    /// Per-path policy; the longest matching `path_prefix` wins.
    pub routes: Vec<RouteSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    /// A path prefix matched on whole segments of the normalised path (`/login` matches
    /// `/login` and `/login/x`, not `/loginx`).
    pub path_prefix: String,
    /// `session` (JWT and live session, the default), `jwt` (JWT only) or `none`.
    #[serde(default = "default_auth")]
    pub auth: String,
    /// This route's own per-caller quota, replacing `rate_limit.proxy` here.
    #[serde(default)]
    pub rate_limit: Option<QuotaSection>,
}

/// `requests` per `per`, with bursts of up to `burst` (default: `requests`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaSection {
    pub requests: u32,
    #[serde(with = "humantime_serde")]
    pub per: Duration,
    #[serde(default)]
    pub burst: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// How often the live sessions are counted (one SCAN pass over the session keys).
    #[serde(with = "humantime_serde")]
    pub active_sessions_interval: Duration,
}

/// Cross-origin requests from browser clients; off while `allowed_origins` is empty.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorsSection {
    /// Origins (`https://play.example.com`) whose pages may call portcullis, or `["*"]`.
    pub allowed_origins: Vec<String>,
    pub allowed_methods: Vec<String>,
    /// Absent: `authorization`, `content-type`, the session id header and `x-request-id`.
    pub allowed_headers: Option<Vec<String>>,
    /// Response headers the page's script may read.
    pub expose_headers: Vec<String>,
    /// How long a browser may reuse a preflight's answer.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Let pages send cookies (and read the answer) with `credentials: "include"`.
    pub allow_credentials: bool,
}

impl Default for CorsSection {
    fn default() -> Self {
        let strings = |list: &[&str]| list.iter().map(|s| s.to_string()).collect();
        CorsSection {
            allowed_origins: Vec::new(),
            allowed_methods: strings(&["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]),
            allowed_headers: None,
            expose_headers: strings(&[
                "x-request-id",
                "retry-after",
                "ratelimit-limit",
                "ratelimit-remaining",
                "ratelimit-reset",
            ]),
            max_age: Duration::from_secs(600),
            allow_credentials: false,
        }
    }
}

impl Default for MetricsSection {
    fn default() -> Self {
        MetricsSection {
            active_sessions_interval: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitSection {
    /// Proxied traffic, per user.
    pub proxy: Option<QuotaSection>,
    /// The session API, per user; `requests = 0` turns it off.
    pub sessions_api: Option<QuotaSection>,
    /// Requests without a valid token, per client IP.
    pub anonymous: Option<QuotaSection>,
    /// How often keys idle for a whole window are forgotten.
    #[serde(with = "humantime_serde")]
    pub gc_interval: Duration,
    /// Anonymous IPv6 callers are counted by this many leading bits of their address.
    pub ipv6_prefix: u8,
    /// Callers each limiter tracks at most; new ones past it are refused.
    pub max_tracked_callers: usize,
}

impl Default for RateLimitSection {
    fn default() -> Self {
        RateLimitSection {
            proxy: None,
            sessions_api: Some(QuotaSection {
                requests: 100,
                per: Duration::from_secs(15 * 60),
                burst: None,
            }),
            anonymous: None,
            gc_interval: Duration::from_secs(60),
            ipv6_prefix: 64,
            max_tracked_callers: DEFAULT_MAX_TRACKED_CALLERS,
        }
    }
}

fn default_auth() -> String {
    "session".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// Public address, `ip:port`.
    pub listen: String,
    /// TLS termination; absent means plain HTTP/1.1 and HTTP/2 prior knowledge.
    pub tls: Option<TlsSection>,
    /// Largest request body forwarded, in bytes.
    pub max_body_bytes: u64,
    /// Largest request head (the request line, header names and values), in bytes.
    pub max_header_bytes: usize,
    /// Time a client has to finish its TLS handshake and send a complete request head.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A connection with no request in flight and no bytes moving for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// How long in-flight requests may run after SIGTERM before the process exits anyway.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// After SIGTERM, `/readyz` answers 503 this long before the listener closes, so that load
    /// balancers stop sending first. SIGINT skips it.
    #[serde(with = "humantime_serde")]
    pub shutdown_delay: Duration,
    /// Peers (IPs or CIDRs) whose X-Forwarded-For / X-Forwarded-Proto are believed.
    pub trusted_proxies: Vec<String>,
    /// Most connections served at once; further ones wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Threads serving connections, each with its own single-threaded runtime and upstream
    /// pool; 0 means one per CPU the process may use.
    pub workers: usize,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            listen: "0.0.0.0:8443".into(),
            tls: None,
            max_body_bytes: 10 * 1024 * 1024,
            max_header_bytes: 16 * 1024,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(30),
            shutdown_delay: Duration::from_secs(5),
            trusted_proxies: Vec::new(),
            max_connections: 25_000,
            workers: 0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    /// PEM certificate chain, leaf first.
    pub cert: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
    /// How often the files are checked for a new pair (SIGHUP reloads at once).
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl Default for TlsSection {
    fn default() -> Self {
        TlsSection {
            cert: String::new(),
            key: String::new(),
            reload_interval: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamSection {
    /// `http://host:port` or `https://host:port` of the game backend.
    pub url: String,
    /// Longest wait for the upstream's response head.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Longest wait for a TCP (and TLS) connection to the upstream.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Host header sent upstream; empty keeps the client's.
    pub host: String,
    /// Idle pooled upstream connections are closed after this long; below the upstream's own
    /// keep-alive timeout, so that portcullis closes them first.
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// Most idle pooled connections kept to the upstream, per worker.
    pub pool_max_idle: usize,
    /// Most connections open to the upstream at once, all workers together; 0 is
    /// `server.max_connections`.
    pub max_connections: usize,
    /// PEM file of the CA certificates an https upstream's certificate must chain to, instead
    /// of the web PKI roots; empty uses the web PKI roots.
    pub ca_file: String,
}

impl Default for UpstreamSection {
    fn default() -> Self {
        UpstreamSection {
            url: "http://127.0.0.1:8080".into(),
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(2),
            host: String::new(),
            pool_idle_timeout: Duration::from_secs(4),
            pool_max_idle: 256,
            max_connections: 0,
            ca_file: String::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    /// Health endpoints, plain HTTP; keep it off the public network.
    pub listen: String,
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            listen: "127.0.0.1:9090".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// `text` or `json`.
    pub format: String,
    /// A tracing filter: `info`, `debug`, `portcullis=debug,info`, ...
    pub level: String,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSection {
    /// `redis://[user:password@]host:port[/db]`, or `rediss://` for TLS (`valkey://` and
    /// `valkeys://` alike); `unix:///path/redis.sock[?db=N]` for a Unix socket.
    pub url: String,
    /// Prefix of every key portcullis writes.
    pub key_prefix: String,
    /// Longest wait for one Redis command (or script) before the request fails closed.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Longest wait for a connection to Redis.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl Default for RedisSection {
    fn default() -> Self {
        RedisSection {
            url: "redis://127.0.0.1:6379".into(),
            key_prefix: "aeturnis".into(),
            command_timeout: Duration::from_millis(250),
            connect_timeout: Duration::from_millis(500),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionSection {
    /// Sliding lifetime: every proxied request puts expiry back to now + ttl.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// lastActive is rewritten only when it is older than this (the TTL slides every time).
    #[serde(with = "humantime_serde")]
    pub last_active_resolution: Duration,
    /// Where the session API is served.
    pub api_prefix: String,
    /// A session's TTL is slid at most this often (and a cached session re-checked in Redis).
    /// Default: 30s, or a twentieth of `ttl` when that is shorter.
    #[serde(with = "humantime_serde")]
    pub slide_interval: Option<Duration>,
    /// Admit recently confirmed sessions from memory, kept exact by Redis invalidations.
    pub local_cache: bool,
    /// Most users with sessions held in the local cache.
    pub local_cache_max_entries: usize,
    /// Most live sessions a user may have; opening one more ends the least recently active.
    pub max_per_user: usize,
}

impl Default for SessionSection {
    fn default() -> Self {
        SessionSection {
            ttl: Duration::from_secs(30 * 24 * 3600),
            last_active_resolution: Duration::from_secs(1),
            api_prefix: "/api/v1/sessions".into(),
            slide_interval: None,
            local_cache: true,
            local_cache_max_entries: 100_000,
            max_per_user: 100,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentitySection {
    /// Carries the token's `sub` to the upstream.
    pub user_id_header: String,
    /// Carries the session id to the upstream; also where a client may send its session id
    /// when the token has no `sid` claim.
    pub session_id_header: String,
    /// Carries the session's platform to the upstream.
    pub platform_header: String,
}

impl Default for IdentitySection {
    fn default() -> Self {
        IdentitySection {
            user_id_header: "x-user-id".into(),
            session_id_header: "x-session-id".into(),
            platform_header: "x-session-platform".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwtSection {
    /// Accepted `alg` values, all of one family (HS*, RS*/PS*, ES*, or EdDSA).
    pub algorithms: Vec<String>,
    /// HMAC secret (HS*); the JWT_SECRET environment variable takes precedence.
    pub secret: String,
    /// File holding the HMAC secret, used when `secret` and JWT_SECRET are empty.
    pub secret_file: String,
    /// PEM public key file for RS*, PS*, ES* and EdDSA.
    pub public_key_pem: String,
    /// A key being rotated out, still accepted: HMAC secret (JWT_PREVIOUS_SECRET takes
    /// precedence), its file, or a PEM public key file.
    pub previous_secret: String,
    pub previous_secret_file: String,
    pub previous_public_key_pem: String,
    /// Required `iss`, when set.
    pub issuer: String,
    /// Required `aud`, when set.
    pub audience: String,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    /// Verified tokens remembered, so a token seen again skips its signature check; 0 = none.
    pub verified_tokens: usize,
    /// Refuse tokens without a numeric `iat`: only such a token can be judged against a sign-out.
    pub require_iat: bool,
    /// The query parameter a WebSocket upgrade may carry its token in, when it has no
    /// Authorization header (a browser's WebSocket cannot send one); empty: none.
    pub websocket_query_token: String,
}

impl Default for JwtSection {
    fn default() -> Self {
        JwtSection {
            algorithms: vec!["HS256".into()],
            secret: String::new(),
            secret_file: String::new(),
            public_key_pem: String::new(),
            previous_secret: String::new(),
            previous_secret_file: String::new(),
            previous_public_key_pem: String::new(),
            issuer: String::new(),
            audience: String::new(),
            leeway: Duration::from_secs(30),
            verified_tokens: 8192,
            require_iat: false,
            websocket_query_token: String::new(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The validated configuration.
// ---------------------------------------------------------------------------------------------

/// The configuration after validation: every value typed and checked.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub redis: RedisConfig,
    pub session: SessionConfig,
    pub identity: IdentityConfig,
    pub jwt: JwtConfig,
    pub rate_limit: RateLimitConfig,
    pub metrics: MetricsConfig,
    /// `None` when `[cors]` allows no origin.
    pub cors: Option<CorsConfig>,
    pub routes: Vec<RouteConfig>,
    /// Things worth telling the operator that do not stop portcullis (ignored environment
    /// variables, ...). Logged once logging is set up.
    pub warnings: Vec<String>,
}

/// Which origins may make cross-origin requests, and what a preflight answers them.
#[derive(Debug, Clone)]
pub struct CorsConfig {
    /// Lower-case `scheme://host[:port]`, the default port left out as browsers send it;
    /// `None`: any origin.
    pub origins: Option<Vec<String>>,
    pub methods: HeaderValue,
    pub headers: HeaderValue,
    pub expose: Option<HeaderValue>,
    pub max_age: HeaderValue,
    pub credentials: bool,
}

#[derive(Debug, Clone)]
pub struct MetricsConfig {
    pub active_sessions_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub connection: redis::ConnectionInfo,
    pub key_prefix: String,
    pub command_timeout: Duration,
    pub connect_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub ttl: Duration,
    pub last_active_resolution: Duration,
    /// Without a trailing slash.
    pub api_prefix: String,
    pub slide_interval: Duration,
    /// `Some(max entries)` when the local cache is on.
    pub local_cache: Option<usize>,
    pub max_per_user: usize,
}

#[derive(Debug, Clone)]
pub struct IdentityConfig {
    pub user_id: HeaderName,
    pub session_id: HeaderName,
    pub platform: HeaderName,
}

/// The key that verifies token signatures.
#[derive(Clone, PartialEq, Eq)]
pub enum JwtKey {
    Secret(Vec<u8>),
    PublicPem(Vec<u8>),
}

/// Where one verification key may come from: its environment variable (HMAC), its config keys.
struct JwtKeySource<'a> {
    env: &'static str,
    secret: (&'static str, &'a str),
    secret_file: (&'static str, &'a str),
    public_key_pem: (&'static str, &'a str),
}

/// The value of the environment variable `name`, when set and not empty.
fn env_var<'e>(env: &'e [(String, String)], name: &str) -> Option<&'e str> {
    env.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
}

impl JwtKeySource<'_> {
    /// The variable's value, unless it is empty or only whitespace (a Secret's key made from an
    /// empty file holds a newline): no key either way, as when it is unset.
    fn env_secret<'e>(&self, env: &'e [(String, String)]) -> Option<&'e str> {
        env_var(env, self.env).filter(|value| !value.trim().is_empty())
    }

    /// Whether any source of this key is set, for the algorithms' family.
    fn is_set(&self, family: jsonwebtoken::AlgorithmFamily, env: &[(String, String)]) -> bool {
        match family {
            jsonwebtoken::AlgorithmFamily::Hmac => {
                self.env_secret(env).is_some()
                    || !self.secret.1.is_empty()
                    || !self.secret_file.1.is_empty()
            }
            _ => !self.public_key_pem.1.is_empty(),
        }
    }
}

/// The most clock skew tolerated on `exp` and `nbf`.
const MAX_JWT_LEEWAY: Duration = Duration::from_secs(3600);

impl fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JwtKey::Secret(_) => f.write_str("Secret(..)"),
            JwtKey::PublicPem(_) => f.write_str("PublicPem(..)"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct JwtConfig {
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    pub key: JwtKey,
    /// A key being rotated out: tokens it signed are still accepted.
    pub previous_key: Option<JwtKey>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway: Duration,
    pub verified_tokens: usize,
    /// Tokens without a numeric `iat` are refused.
    pub require_iat: bool,
    /// The query parameter a WebSocket upgrade may carry its token in.
    pub websocket_query_token: Option<String>,
}

/// What a route demands of a request before it is forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// A valid JWT and a live session owned by the token's subject.
    Session,
    /// A valid JWT only.
    Jwt,
    /// Nothing: forwarded without identity headers.
    None,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Normalised prefix without a trailing slash (`""` for the root).
    pub path_prefix: String,
    pub auth: AuthMode,
    pub rate_limit: RouteLimit,
}

/// A route's own rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteLimit {
    /// No `rate_limit` on the route: `rate_limit.proxy` (and `anonymous`) apply.
    Inherit,
    /// `rate_limit = { requests = 0, ... }`: no per-caller quota on this route.
    Off,
    Own(Quota),
}

/// A validated quota: `burst` requests at once, refilling at `requests` per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub requests: std::num::NonZeroU32,
    pub per: Duration,
    pub burst: std::num::NonZeroU32,
}

#[derive(Debug, Clone)]
pub struct RateLimitConfig {
    pub proxy: Option<Quota>,
    pub sessions_api: Option<Quota>,
    pub anonymous: Option<Quota>,
    pub gc_interval: Duration,
    pub ipv6_prefix: u8,
    /// Callers each limiter tracks at most (1 to [`MAX_TRACKED_CALLERS`]).
    pub max_tracked_callers: usize,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub tls: Option<TlsConfig>,
    pub max_body_bytes: u64,
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub shutdown_grace: Duration,
    pub shutdown_delay: Duration,
    pub trusted_proxies: Vec<IpNet>,
    pub max_connections: usize,
    /// Connection-serving threads, resolved (at least 1).
    pub workers: usize,
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub reload_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub scheme: Scheme,
    pub authority: Authority,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// `None` keeps the client's Host.
    pub host: Option<HeaderValue>,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle: usize,
    /// Most connections open to the upstream at once, all workers together.
    pub max_connections: usize,
    /// Trust anchors for an https upstream; `None` means the web PKI roots.
    pub ca: Option<rustls::RootCertStore>,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

impl Config {
    /// Reads, overrides from the process environment, and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let vars: Vec<(String, String)> = std::env::vars().collect();
        Self::load_with_env(path, &vars)
    }

    /// As [`Config::load`], with the environment given explicitly (tests).
    pub fn load_with_env(path: &Path, env: &[(String, String)]) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors::one("--config", format!("cannot read {}: {e}", path.display()))
        })?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        Self::from_toml(&text, base, env)
    }

    /// Parses TOML text; relative paths in it are resolved against `base`.
    pub fn from_toml(
        text: &str,
        base: &Path,
        env: &[(String, String)],
    ) -> Result<Config, ConfigErrors> {
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let at = e.span().map(|span| line_and_column(text, span.start));
            let at = at.map_or(String::new(), |(line, column)| {
                let written = line_key(text, line).map_or(String::new(), |key| format!(" ({key})"));
                format!(" at line {line}{written}, column {column}")
            });
            ConfigErrors::one("(file)", format!("not valid TOML{at}: {}", e.message()))
        })?;
        section_shapes(&table)?;
        let mut warnings = Vec::new();
        let overridden = apply_env_overrides(&mut table, env, &mut warnings)?;
        let file: FileConfig = serde_path_to_error::deserialize(table).map_err(|e| {
            let key = e.path().to_string();
            let error = ConfigErrors::one(
                if key == "." { "(file)".into() } else { key },
                e.into_inner().message().to_string(),
            );
            blame_env(error, &overridden)
        })?;
        let mut config = file
            .validate(base, env)
            .map_err(|e| blame_env(e, &overridden))?;
        warnings.append(&mut config.warnings);
        config.warnings = warnings;
        Ok(config)
    }
}

/// The file's sections, each a table. Checked before the values: serde would also read a
/// section from an array of its values in order (`server = ["0.0.0.0:8443"]`), and name its
/// own types in what it says about a section of the wrong kind.
const SECTIONS: &[&str] = &[
    "server",
    "server.tls",
    "upstream",
    "admin",
    "log",
    "redis",
    "session",
    "identity",
    "jwt",
    "rate_limit",
    "rate_limit.proxy",
    "rate_limit.sessions_api",
    "rate_limit.anonymous",
    "metrics",
    "cors",
];

/// Every section a table, and `routes` an array of tables (`[[routes]]`), each `rate_limit` of
/// which a table too.
fn section_shapes(file: &toml::Table) -> Result<(), ConfigErrors> {
    let mut faults = Vec::new();
    let mut expect_table = |key: String, value: &toml::Value, written: &str| {
        if !value.is_table() {
            faults.push(ConfigError {
                key,
                reason: format!("must be a table ({written}), not {}", a_kind(value)),
            });
        }
    };
    for section in SECTIONS {
        let mut value = None;
        let mut table = Some(file);
        for part in section.split('.') {
            value = table.and_then(|t| t.get(part));
            table = value.and_then(toml::Value::as_table);
        }
        if let Some(value) = value {
            let written = if section.starts_with("rate_limit.") {
                "{ requests = ..., per = \"...\" }".to_string()
            } else {
                format!("[{section}]")
            };
            expect_table(section.to_string(), value, &written);
        }
    }
    match file.get("routes") {
        Some(toml::Value::Array(routes)) => {
            for (i, route) in routes.iter().enumerate() {
                expect_table(format!("routes[{i}]"), route, "[[routes]]");
                if let Some(limit) = route.get("rate_limit") {
                    expect_table(
                        format!("routes[{i}].rate_limit"),
                        limit,
                        "{ requests = ..., per = \"...\" }",
                    );
                }
            }
        }
        Some(other) => faults.push(ConfigError {
            key: "routes".into(),
            reason: format!(
                "must be an array of tables, each [[routes]], not {}",
                a_kind(other)
            ),
        }),
        None => {}
    }
    if faults.is_empty() {
        Ok(())
    } else {
        Err(ConfigErrors(faults))
    }
}

/// "a string", "an array": what kind of TOML value this is.
fn a_kind(value: &toml::Value) -> String {
    let kind = value.type_str();
    let article = if kind.starts_with(['a', 'i']) {
        "an"
    } else {
        "a"
    };
    format!("{article} {kind}")
}

impl FileConfig {
    /// Checks every value, collecting all problems rather than stopping at the first.
    pub fn validate(self, base: &Path, env: &[(String, String)]) -> Result<Config, ConfigErrors> {
        let mut v = Validator::default();

        let listen = v.socket_addr("server.listen", &self.server.listen);
        let tls = self.server.tls.as_ref().map(|tls| TlsConfig {
            cert: v.path("server.tls.cert", &tls.cert, base),
            key: v.path("server.tls.key", &tls.key, base),
            reload_interval: tls.reload_interval,
        });
        if let Some(tls) = &self.server.tls {
            v.nonzero_duration("server.tls.reload_interval", tls.reload_interval);
        }
        v.positive("server.max_body_bytes", self.server.max_body_bytes);
        if !(1024..=MAX_HEADER_BYTES).contains(&self.server.max_header_bytes) {
            v.fail(
                "server.max_header_bytes",
                format!("must be from 1024 to {MAX_HEADER_BYTES} (1 MiB)"),
            );
        }
        v.nonzero_duration(
            "server.header_read_timeout",
            self.server.header_read_timeout,
        );
        v.nonzero_duration("server.idle_timeout", self.server.idle_timeout);
        v.duration("server.shutdown_grace", self.server.shutdown_grace);
        v.duration("server.shutdown_delay", self.server.shutdown_delay);
        v.positive("server.max_connections", self.server.max_connections as u64);
        for (key, n) in [
            ("server.max_connections", self.server.max_connections),
            ("upstream.max_connections", self.upstream.max_connections),
        ] {
            if n > MAX_CONNECTIONS {
                v.fail(key, format!("must be at most {MAX_CONNECTIONS}"));
            }
        }
        if self.server.workers > MAX_WORKERS {
            v.fail(
                "server.workers",
                format!("must be at most {MAX_WORKERS} (0 means one per CPU)"),
            );
        }
        let trusted_proxies = self
            .server
            .trusted_proxies
            .iter()
            .enumerate()
            .filter_map(|(i, s)| v.ip_net(&format!("server.trusted_proxies[{i}]"), s))
            .collect();

        let (scheme, authority) = v.upstream_url("upstream.url", &self.upstream.url);
        v.nonzero_duration("upstream.request_timeout", self.upstream.request_timeout);
        v.nonzero_duration("upstream.connect_timeout", self.upstream.connect_timeout);
        v.duration(
            "upstream.pool_idle_timeout",
            self.upstream.pool_idle_timeout,
        );
        let host = if self.upstream.host.is_empty() {
            None
        } else {
            // Held to the rule a client's Host is: the upstream reads both alike.
            let authority = self.upstream.host.parse::<Authority>().ok();
            match HeaderValue::from_str(&self.upstream.host) {
                Ok(h)
                    if crate::limits::is_host_value(h.as_bytes())
                        && authority
                            .as_ref()
                            .is_some_and(|a| authority_fault(a).is_none()) =>
                {
                    Some(h)
                }
                _ => {
                    v.fail(
                        "upstream.host",
                        "must be a host name (letters, digits, - . _) or IP address, optionally with :port (1 to 65535)",
                    );
                    None
                }
            }
        };

        let upstream_ca = (!self.upstream.ca_file.is_empty())
            .then(|| v.ca_file("upstream.ca_file", &self.upstream.ca_file, base))
            .flatten();

        let admin_listen = v.socket_addr("admin.listen", &self.admin.listen);
        if let (Some(a), Some(b)) = (listen, admin_listen) {
            // An IPv4-mapped IPv6 address (`[::ffff:127.0.0.1]`) binds the IPv4 one.
            let canonical =
                |addr: SocketAddr| SocketAddr::new(addr.ip().to_canonical(), addr.port());
            let (a, b) = (canonical(a), canonical(b));
            // A wildcard takes the port on every address of its family; IPv6's, on Linux's
            // default dual stack, on IPv4's too.
            let covers = |wild: SocketAddr, other: SocketAddr| match wild.ip() {
                std::net::IpAddr::V6(ip) => ip.is_unspecified(),
                std::net::IpAddr::V4(ip) => ip.is_unspecified() && other.is_ipv4(),
            };
            let overlap = a.ip() == b.ip() || covers(a, b) || covers(b, a);
            if a.port() == b.port() && a.port() != 0 && overlap {
                v.fail(
                    "admin.listen",
                    format!(
                        "must differ from server.listen: both would take port {}",
                        a.port()
                    ),
                );
            }
        }

        let format = match self.log.format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            _ => {
                v.fail("log.format", "must be \"text\" or \"json\"");
                LogFormat::Text
            }
        };
        if let Err(reason) = log_filter(&self.log.level) {
            v.fail("log.level", reason);
        }

        let redis = v.redis(&self.redis, env);
        if self.session.ttl < Duration::from_secs(1) {
            v.fail("session.ttl", "must be at least 1s");
        }
        if self.session.ttl > MAX_SESSION_TTL {
            v.fail(
                "session.ttl",
                "must be at most 100 years (expiry is stored in 48-bit milliseconds)",
            );
        }
        if self.session.last_active_resolution >= self.session.ttl {
            v.fail(
                "session.last_active_resolution",
                "must be shorter than session.ttl",
            );
        }
        let slide_interval = match self.session.slide_interval {
            Some(slide) => {
                // Zero caches nothing and slides on every request (a few milliseconds, nearly
                // so): a Redis write each time, each emptying the other replicas' cache of the
                // user. The default is never below 50ms (a twentieth of the shortest ttl).
                if slide < HEARTBEAT {
                    v.fail(
                        "session.slide_interval",
                        format!("must be at least {HEARTBEAT:?} (the local cache's heartbeat): shorter, every request writes to Redis and empties the other replicas' caches"),
                    );
                }
                if slide > self.session.ttl / 10 {
                    v.fail(
                        "session.slide_interval",
                        "must be at most a tenth of session.ttl, so that a session in use never expires",
                    );
                }
                slide
            }
            None => Duration::from_secs(30).min(self.session.ttl / 20),
        };
        if self.session.local_cache && self.session.local_cache_max_entries == 0 {
            v.fail(
                "session.local_cache_max_entries",
                "must be greater than zero",
            );
        }
        if !(1..=MAX_SESSIONS_PER_USER).contains(&self.session.max_per_user) {
            v.fail(
                "session.max_per_user",
                format!("must be between 1 and {MAX_SESSIONS_PER_USER}"),
            );
        }
        let api_prefix = match v.path_prefix("session.api_prefix", &self.session.api_prefix) {
            Some("") => {
                v.fail(
                    "session.api_prefix",
                    "must not be / itself: the session API would answer every request",
                );
                None
            }
            // Its endpoints are matched on the percent-decoded path, which keeps no escape.
            Some(prefix) if prefix.contains('%') => {
                v.fail(
                    "session.api_prefix",
                    "must not contain % escapes: the session API would never match a request",
                );
                None
            }
            prefix => prefix.map(str::to_string),
        };
        let identity = v.identity(&self.identity);
        let jwt = v.jwt(&self.jwt, base, env);
        let cors = v.cors(&self.cors, identity.1.as_ref());

        let rl = &self.rate_limit;
        let rate_limit = RateLimitConfig {
            proxy: rl
                .proxy
                .as_ref()
                .and_then(|q| v.quota("rate_limit.proxy", q)),
            sessions_api: rl
                .sessions_api
                .as_ref()
                .and_then(|q| v.quota("rate_limit.sessions_api", q)),
            anonymous: rl
                .anonymous
                .as_ref()
                .and_then(|q| v.quota("rate_limit.anonymous", q)),
            gc_interval: rl.gc_interval,
            ipv6_prefix: rl.ipv6_prefix,
            max_tracked_callers: rl.max_tracked_callers,
        };
        v.nonzero_duration("rate_limit.gc_interval", rl.gc_interval);
        if !(32..=128).contains(&rl.ipv6_prefix) {
            v.fail(
                "rate_limit.ipv6_prefix",
                format!(
                    "must be between 32 and 128 (bits of an IPv6 address that make one anonymous caller), not {}",
                    rl.ipv6_prefix
                ),
            );
        }
        if !(1..=MAX_TRACKED_CALLERS).contains(&rl.max_tracked_callers) {
            v.fail(
                "rate_limit.max_tracked_callers",
                format!(
                    "must be between 1 and {MAX_TRACKED_CALLERS} (callers each rate limiter tracks at once), not {}",
                    rl.max_tracked_callers
                ),
            );
        }
        v.nonzero_duration(
            "metrics.active_sessions_interval",
            self.metrics.active_sessions_interval,
        );

        if self.routes.len() > crate::routes::MAX_ROUTES {
            v.fail(
                "routes",
                format!(
                    "{} entries; at most {} (a request's route is kept in two bytes)",
                    self.routes.len(),
                    crate::routes::MAX_ROUTES
                ),
            );
        }
        let mut routes = Vec::new();
        for (i, route) in self.routes.iter().enumerate() {
            let key = format!("routes[{i}]");
            let auth = match route.auth.as_str() {
                "session" => AuthMode::Session,
                "jwt" => AuthMode::Jwt,
                "none" => AuthMode::None,
                other => {
                    v.fail(
                        &format!("{key}.auth"),
                        format!("{other:?} is not one of \"session\", \"jwt\", \"none\""),
                    );
                    continue;
                }
            };
            let Some(prefix) = v.path_prefix(&format!("{key}.path_prefix"), &route.path_prefix)
            else {
                continue;
            };
            // The session API is matched first: a route on its paths would never apply.
            if let Some(api) = api_prefix
                .as_deref()
                .filter(|api| matches_prefix(api, prefix))
            {
                v.fail(
                    &format!("{key}.path_prefix"),
                    format!("is under session.api_prefix ({api}), which the session API answers: this route would never apply"),
                );
                continue;
            }
            if routes.iter().any(|r: &RouteConfig| r.path_prefix == prefix) {
                v.fail(&format!("{key}.path_prefix"), "appears twice");
                continue;
            }
            let rate_limit = match &route.rate_limit {
                None => RouteLimit::Inherit,
                Some(q) => match v.quota(&format!("{key}.rate_limit"), q) {
                    Some(quota) => RouteLimit::Own(quota),
                    None => RouteLimit::Off,
                },
            };
            routes.push(RouteConfig {
                path_prefix: prefix.to_string(),
                auth,
                rate_limit,
            });
        }

        let warnings = std::mem::take(&mut v.warnings);
        v.finish()?;
        // `finish` returned Ok, so every value checked above is present.
        let (
            Some(listen),
            Some(admin_listen),
            Some(scheme),
            Some(authority),
            Some(redis),
            Some(api_prefix),
            (Some(user_id), Some(session_id), Some(platform)),
            Some(jwt),
        ) = (
            listen,
            admin_listen,
            scheme,
            authority,
            redis,
            api_prefix,
            identity,
            jwt,
        )
        else {
            return Err(ConfigErrors::one("(file)", "incomplete configuration"));
        };
        Ok(Config {
            server: ServerConfig {
                listen,
                tls,
                max_body_bytes: self.server.max_body_bytes,
                max_header_bytes: self.server.max_header_bytes,
                header_read_timeout: self.server.header_read_timeout,
                idle_timeout: self.server.idle_timeout,
                shutdown_grace: self.server.shutdown_grace,
                shutdown_delay: self.server.shutdown_delay,
                trusted_proxies,
                max_connections: self.server.max_connections,
                workers: match self.server.workers {
                    0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
                    n => n,
                },
            },
            upstream: UpstreamConfig {
                scheme,
                authority,
                request_timeout: self.upstream.request_timeout,
                connect_timeout: self.upstream.connect_timeout,
                host,
                pool_idle_timeout: self.upstream.pool_idle_timeout,
                pool_max_idle: self.upstream.pool_max_idle,
                max_connections: match self.upstream.max_connections {
                    0 => self.server.max_connections,
                    n => n,
                },
                ca: upstream_ca,
            },
            admin: AdminConfig {
                listen: admin_listen,
            },
            log: LogConfig {
                format,
                level: self.log.level,
            },
            redis,
            session: SessionConfig {
                ttl: self.session.ttl,
                last_active_resolution: self.session.last_active_resolution,
                api_prefix,
                slide_interval,
                local_cache: self
                    .session
                    .local_cache
                    .then_some(self.session.local_cache_max_entries),
                max_per_user: self.session.max_per_user,
            },
            identity: IdentityConfig {
                user_id,
                session_id,
                platform,
            },
            jwt,
            rate_limit,
            metrics: MetricsConfig {
                active_sessions_interval: self.metrics.active_sessions_interval,
            },
            cors,
            routes,
            warnings,
        })
    }
}

/// Collects problems while values are checked.
#[derive(Default)]
pub(crate) struct Validator {
    errors: Vec<ConfigError>,
    warnings: Vec<String>,
}

impl Validator {
    pub(crate) fn fail(&mut self, key: &str, reason: impl Into<String>) {
        self.errors.push(ConfigError {
            key: key.into(),
            reason: reason.into(),
        });
    }

    pub(crate) fn finish(self) -> Result<(), ConfigErrors> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(self.errors))
        }
    }

    fn socket_addr(&mut self, key: &str, value: &str) -> Option<SocketAddr> {
        match value.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.fail(key, format!("{value:?} is not an ip:port address"));
                None
            }
        }
    }

    /// Trust anchors from a PEM file of CA certificates; every one must parse.
    fn ca_file(&mut self, key: &str, value: &str, base: &Path) -> Option<rustls::RootCertStore> {
        use rustls::pki_types::pem::PemObject;
        let path = self.path(key, value, base);
        let pem = match read_key_file(&path) {
            Ok(pem) => pem,
            Err(e) => {
                self.fail(key, format!("cannot read {}: {e}", path.display()));
                return None;
            }
        };
        let certs: Vec<CertificateDer<'static>> =
            match CertificateDer::pem_slice_iter(&pem).collect::<Result<_, _>>() {
                Ok(certs) => certs,
                Err(e) => {
                    self.fail(key, format!("{} is not PEM: {e}", path.display()));
                    return None;
                }
            };
        let mut roots = rustls::RootCertStore::empty();
        let (added, ignored) = roots.add_parsable_certificates(certs);
        if added == 0 || ignored > 0 {
            self.fail(
                key,
                format!(
                    "{} must hold X.509 certificates only ({added} usable, {ignored} unparsable)",
                    path.display()
                ),
            );
            return None;
        }
        Some(roots)
    }

    fn path(&mut self, key: &str, value: &str, base: &Path) -> PathBuf {
        if value.is_empty() {
            self.fail(key, "must be set to a PEM file path");
        }
        let p = Path::new(value);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        }
    }

    fn positive(&mut self, key: &str, value: u64) {
        if value == 0 {
            self.fail(key, "must be greater than zero");
        }
    }

    pub(crate) fn nonzero_duration(&mut self, key: &str, value: Duration) {
        if value.is_zero() {
            self.fail(key, "must be longer than zero");
        }
        self.duration(key, value);
    }

    /// A time span a clock reading is moved by: far beyond any use, it would overflow the clock
    /// and end the task that moved it.
    pub(crate) fn duration(&mut self, key: &str, value: Duration) {
        if value > MAX_DURATION {
            self.fail(key, "must be at most 100 years");
        }
    }

    fn ip_net(&mut self, key: &str, value: &str) -> Option<IpNet> {
        if let Ok(net) = value.parse::<IpNet>() {
            return Some(net);
        }
        match value.parse::<std::net::IpAddr>() {
            Ok(ip) => Some(IpNet::from(ip)),
            Err(_) => {
                self.fail(
                    key,
                    format!("{value:?} is neither an IP address nor a CIDR"),
                );
                None
            }
        }
    }

    /// A quota; `requests = 0` means no limit (`None`).
    fn quota(&mut self, key: &str, q: &QuotaSection) -> Option<Quota> {
        let requests = std::num::NonZeroU32::new(q.requests)?;
        if q.per.is_zero() {
            self.fail(&format!("{key}.per"), "must be longer than zero");
            return None;
        }
        if q.per > MAX_DURATION {
            self.duration(&format!("{key}.per"), q.per);
            return None;
        }
        if q.per / q.requests.max(1) == Duration::ZERO {
            self.fail(&format!("{key}.per"), "is too short for that many requests");
            return None;
        }
        let burst = match q.burst {
            None => requests,
            Some(b) => match std::num::NonZeroU32::new(b) {
                Some(b) => b,
                None => {
                    self.fail(&format!("{key}.burst"), "must be at least 1");
                    return None;
                }
            },
        };
        // The limiter counts in u64 nanoseconds: a full burst's span (per / requests x burst)
        // must fit, about 584 years.
        let per_request = u64::try_from((q.per / requests.get()).as_nanos()).ok();
        let span = per_request.and_then(|t| t.checked_mul(u64::from(burst.get())));
        if span.is_none() {
            // `burst` is to blame only when `per` ÷ `requests` alone fits.
            let field = if per_request.is_some() && q.burst.is_some() {
                "burst"
            } else {
                "per"
            };
            self.fail(
                &format!("{key}.{field}"),
                "makes a full burst span more than 584 years (per / requests x burst)",
            );
            return None;
        }
        Some(Quota {
            requests,
            per: q.per,
            burst,
        })
    }

    /// `[cors]`: `None` (off) when no origin is allowed.
    fn cors(&mut self, c: &CorsSection, session_id: Option<&HeaderName>) -> Option<CorsConfig> {
        if c.allowed_origins.is_empty() {
            return None;
        }
        let any = c.allowed_origins.iter().any(|o| o == "*");
        if any && c.allowed_origins.len() > 1 {
            self.fail(
                "cors.allowed_origins",
                "\"*\" allows every origin and stands alone",
            );
        }
        if any && c.allow_credentials {
            self.fail(
                "cors.allowed_origins",
                "cannot be \"*\" while cors.allow_credentials is true: any site could then act with the visitor's cookies",
            );
        }
        let origins = (!any).then(|| {
            c.allowed_origins
                .iter()
                .filter_map(|o| self.origin("cors.allowed_origins", o))
                .collect()
        });
        let methods: Vec<String> = c
            .allowed_methods
            .iter()
            .filter_map(|m| match http::Method::from_bytes(m.as_bytes()) {
                Ok(method) => Some(method.as_str().to_string()),
                Err(_) => {
                    self.fail(
                        "cors.allowed_methods",
                        format!("{m:?} is not a method name"),
                    );
                    None
                }
            })
            .collect();
        let default_headers = ["authorization", "content-type", "x-request-id"]
            .into_iter()
            .map(str::to_string)
            .chain(session_id.map(|h| h.as_str().to_string()))
            .collect::<Vec<_>>();
        let header_list = |v: &mut Self, key: &str, names: &[String]| -> Vec<String> {
            names
                .iter()
                .filter_map(|n| v.header_name(key, n))
                .map(|n| n.as_str().to_string())
                .collect()
        };
        let headers = header_list(
            self,
            "cors.allowed_headers",
            c.allowed_headers.as_deref().unwrap_or(&default_headers),
        );
        let expose = header_list(self, "cors.expose_headers", &c.expose_headers);
        if c.max_age > Duration::from_secs(86_400) {
            self.fail(
                "cors.max_age",
                "must be at most 24h (browsers cap it lower still)",
            );
        }
        let joined = |list: Vec<String>| HeaderValue::from_str(&list.join(", ")).ok();
        Some(CorsConfig {
            origins,
            methods: joined(methods)?,
            headers: joined(headers)?,
            expose: Some(expose).filter(|e| !e.is_empty()).and_then(joined),
            max_age: HeaderValue::from(c.max_age.as_secs()),
            credentials: c.allow_credentials,
        })
    }

    /// An origin as browsers send it: lower-case `scheme://host[:port]`, no default port.
    fn origin(&mut self, key: &str, raw: &str) -> Option<String> {
        let fail = |v: &mut Self| {
            v.fail(
                key,
                format!("{raw:?} is not an origin: scheme://host[:port], http or https, no path"),
            );
            None
        };
        let Ok(uri) = raw.parse::<Uri>() else {
            return fail(self);
        };
        let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
            return fail(self);
        };
        let default_port = match scheme.to_ascii_lowercase().as_str() {
            "https" => 443,
            "http" => 80,
            _ => return fail(self),
        };
        let bare = uri.path_and_query().is_none_or(|p| p.as_str() == "/")
            && !authority.as_str().contains('@');
        if !bare {
            return fail(self);
        }
        // Compared as text with what a browser sends, which is never a pattern.
        if authority.host().contains('*') {
            self.fail(
                key,
                format!("{raw:?} holds a wildcard, which matches no origin: list each origin, or give \"*\" alone for any"),
            );
            return None;
        }
        // A browser sends a host it could connect to, and a port it could use.
        if authority.host().is_empty()
            || authority_fault(authority).is_some()
            || !crate::limits::is_host_value(authority.as_str().as_bytes())
        {
            return fail(self);
        }
        let host = authority.host().to_ascii_lowercase();
        Some(match authority.port_u16() {
            Some(port) if port != default_port => {
                format!("{}://{host}:{port}", scheme.to_ascii_lowercase())
            }
            _ => format!("{}://{host}", scheme.to_ascii_lowercase()),
        })
    }

    fn header_name(&mut self, key: &str, value: &str) -> Option<HeaderName> {
        match HeaderName::from_bytes(value.as_bytes()) {
            Ok(h) => Some(h),
            Err(_) => {
                self.fail(key, format!("{value:?} is not a valid header name"));
                None
            }
        }
    }

    /// A path prefix without its trailing slashes. Requests are matched on their path with
    /// empty, `.` and `..` segments resolved and backslashes refused or taken as separators,
    /// so a prefix holding any of those could never match.
    fn path_prefix<'a>(&mut self, key: &str, raw: &'a str) -> Option<&'a str> {
        if !raw.starts_with('/') {
            self.fail(key, "must start with /");
            return None;
        }
        let prefix = raw.trim_end_matches('/');
        if prefix.contains("//")
            || prefix.contains('\\')
            || prefix.split('/').any(|seg| seg == "." || seg == "..")
        {
            self.fail(
                key,
                "must be a normalised path (no empty, . or .. segments, no backslashes): it could never match a request",
            );
            return None;
        }
        // These a request's path never holds as they are: they end the path (`?`, `#`) or the
        // request line (a space), or no client sends them unescaped and the HTTP layer refuses
        // them. Anything else may come raw (`|`, `[`, UTF-8), and is matched as it comes.
        let never_raw = |c: char| c.is_control() || " ?#<>`".contains(c);
        if let Some(c) = prefix.chars().find(|&c| never_raw(c)) {
            let encoded = percent_encoded(c);
            self.fail(
                key,
                format!("holds {c:?}, which no request's path holds as it is (a client sends it as {encoded}): it could never match a request"),
            );
            return None;
        }
        // Some clients send these as they are (curl `"{}`), browsers percent-encoded (the
        // WHATWG path set), and the two spellings are matched apart. The session API's prefix
        // cannot have a route of its own spelling, so it is not told to.
        if let Some(c) = prefix
            .chars()
            .find(|&c| !c.is_ascii() || "\"{}".contains(c))
            .filter(|_| key.starts_with("routes"))
        {
            self.warnings.push(format!(
                "{key} holds {c:?}, which browsers send as {}: a request spelled so does not match this prefix; give that spelling a route of its own too",
                percent_encoded(c)
            ));
        }
        // Requests are matched in their canonical form (`routes::canonical`): a prefix in
        // another form, or one no canonical path holds, would never match.
        match crate::routes::canonical(prefix) {
            Ok(canonical) if canonical == prefix => Some(prefix),
            Ok(canonical) => {
                self.fail(
                    key,
                    format!("must be written as requests are matched, {canonical:?}: escapes of letters, digits and -._~ stand for the characters themselves"),
                );
                None
            }
            Err(e) => {
                self.fail(key, format!("{}: no request could match it", e.message()));
                None
            }
        }
    }

    /// The three identity header names: each of its own, and none that HTTP or portcullis
    /// already gives a meaning (portcullis strips them from requests and sets them itself).
    fn identity(
        &mut self,
        section: &IdentitySection,
    ) -> (Option<HeaderName>, Option<HeaderName>, Option<HeaderName>) {
        let keys = [
            ("identity.user_id_header", &section.user_id_header),
            ("identity.session_id_header", &section.session_id_header),
            ("identity.platform_header", &section.platform_header),
        ];
        let mut names: [Option<HeaderName>; 3] = [None, None, None];
        for (i, (key, value)) in keys.into_iter().enumerate() {
            let Some(name) = self.header_name(key, value) else {
                continue;
            };
            if let Some((_, what)) = RESERVED_HEADERS.iter().find(|(r, _)| name == *r) {
                self.fail(key, format!("cannot be {name}, which {what}"));
                continue;
            }
            // CGI-style servers read `x_user_id` and `x-user-id` as one header; a client's copy
            // under the dashed spelling is removed only when the configured name is dashed.
            if name.as_str().contains('_') {
                let dashed = name.as_str().replace('_', "-");
                self.fail(
                    key,
                    format!("cannot contain '_' ({dashed}, not {name}): CGI-style servers read both spellings as one header"),
                );
                continue;
            }
            // Header names are case-insensitive; `HeaderName` holds them lowercased.
            if let Some(earlier) = names[..i].iter().position(|n| n.as_ref() == Some(&name)) {
                self.fail(
                    key,
                    format!(
                        "{name} is already {}: each identity header needs a name of its own",
                        keys[earlier].0
                    ),
                );
                continue;
            }
            names[i] = Some(name);
        }
        let [user_id, session_id, platform] = names;
        (user_id, session_id, platform)
    }

    /// The Redis connection: `redis.url`, then REDIS_HOST / REDIS_PORT / REDIS_PASSWORD over it.
    fn redis(&mut self, section: &RedisSection, env: &[(String, String)]) -> Option<RedisConfig> {
        use redis::{ConnectionAddr, IntoConnectionInfo};
        if section.key_prefix.is_empty()
            || section.key_prefix.contains(['{', '}', ' '])
            || section.key_prefix.contains(char::is_control)
        {
            self.fail(
                "redis.key_prefix",
                "must be non-empty without spaces, control characters or braces (braces are Redis Cluster hash tags)",
            );
        }
        self.nonzero_duration("redis.command_timeout", section.command_timeout);
        self.nonzero_duration("redis.connect_timeout", section.connect_timeout);
        let mut info = match section.url.as_str().into_connection_info() {
            Ok(info) => info,
            Err(e) => {
                self.fail(
                    "redis.url",
                    format!("not a redis://, rediss:// (TLS) or unix:// (socket) URL: {e}"),
                );
                return None;
            }
        };
        // SELECT takes 0 up to the server's `databases` less one, at most i32::MAX.
        if !(0..=i64::from(i32::MAX)).contains(&info.redis_settings().db()) {
            self.fail(
                "redis.url",
                "names a database (after the last /) that is not a number from 0 (Redis has 16 unless its `databases` says otherwise)",
            );
            return None;
        }
        let var = |name: &str| {
            env_var(env, name)
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_string)
        };
        let host = var("REDIS_HOST");
        // Only a host: what else it held would be looked up as a name, for ever.
        if let Some(h) = &host {
            let plain = h.parse::<std::net::IpAddr>().is_ok()
                || (!h.contains(':') && crate::limits::is_host_value(h.as_bytes()));
            if !plain {
                self.fail(
                    "REDIS_HOST",
                    format!("{h:?} is not a host name (letters, digits, - . _) or IP address (IPv6 without brackets)"),
                );
                return None;
            }
        }
        // Kubernetes sets REDIS_PORT=tcp://10.0.0.5:6379 for a Service named `redis`: that is
        // a service link, not a port, and must not change where portcullis connects.
        let port = match var("REDIS_PORT") {
            Some(p) => match p.parse::<u16>() {
                Ok(0) => {
                    self.fail("REDIS_PORT", "must be 1 to 65535");
                    return None;
                }
                Ok(port) => Some(port),
                Err(_) => {
                    self.warnings.push(format!(
                        "ignoring REDIS_PORT={p:?}: not a port number (a Kubernetes service link?)"
                    ));
                    None
                }
            },
            None => None,
        };
        if host.is_some() || port.is_some() {
            let addr = match info.addr().clone() {
                ConnectionAddr::Tcp(h, p) => {
                    ConnectionAddr::Tcp(host.unwrap_or(h), port.unwrap_or(p))
                }
                ConnectionAddr::TcpTls {
                    host: h,
                    port: p,
                    insecure,
                    tls_params,
                } => ConnectionAddr::TcpTls {
                    host: host.unwrap_or(h),
                    port: port.unwrap_or(p),
                    insecure,
                    tls_params,
                },
                other => {
                    self.warnings.push(
                        "REDIS_HOST and REDIS_PORT are ignored: redis.url names a Unix socket"
                            .into(),
                    );
                    other
                }
            };
            info = info.set_addr(addr);
        }
        if matches!(
            info.addr(),
            ConnectionAddr::Tcp(_, 0) | ConnectionAddr::TcpTls { port: 0, .. }
        ) {
            self.fail(
                "redis.url",
                "has port 0: a port is 1 to 65535 (Redis listens on 6379 unless told otherwise)",
            );
            return None;
        }
        if let Some(password) = var("REDIS_PASSWORD") {
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        let placeholder = info
            .redis_settings()
            .password()
            .is_some_and(|p| is_placeholder(p.as_bytes()));
        if placeholder {
            self.fail(
                "redis.url",
                "its password (or REDIS_PASSWORD) is the example's placeholder: anyone could use it; make one with `openssl rand -hex 24`",
            );
            return None;
        }
        Some(RedisConfig {
            connection: info,
            key_prefix: section.key_prefix.clone(),
            command_timeout: section.command_timeout,
            connect_timeout: section.connect_timeout,
        })
    }

    fn jwt(
        &mut self,
        section: &JwtSection,
        base: &Path,
        env: &[(String, String)],
    ) -> Option<JwtConfig> {
        use jsonwebtoken::{Algorithm, AlgorithmFamily};
        if section.verified_tokens > MAX_VERIFIED_TOKENS {
            self.fail(
                "jwt.verified_tokens",
                format!("must be at most {MAX_VERIFIED_TOKENS} (0 turns remembering off)"),
            );
        }
        let mut algorithms = Vec::new();
        for (i, name) in section.algorithms.iter().enumerate() {
            match name.parse::<Algorithm>() {
                Ok(alg) => algorithms.push(alg),
                Err(_) => self.fail(
                    &format!("jwt.algorithms[{i}]"),
                    format!("{name:?} is not a supported algorithm (HS256/384/512, RS256/384/512, PS256/384/512, ES256/384, EdDSA)"),
                ),
            }
        }
        if section.algorithms.is_empty() {
            self.fail("jwt.algorithms", "must list at least one algorithm");
        }
        let family = algorithms.first().map(|a| a.family());
        if algorithms.iter().any(|a| Some(a.family()) != family) {
            self.fail(
                "jwt.algorithms",
                "must all be of one family: mixing HMAC and public-key algorithms lets a public key be used as an HMAC secret",
            );
            return None;
        }
        let family = family?;
        let key = self.jwt_key(
            &JwtKeySource {
                env: "JWT_SECRET",
                secret: ("jwt.secret", &section.secret),
                secret_file: ("jwt.secret_file", &section.secret_file),
                public_key_pem: ("jwt.public_key_pem", &section.public_key_pem),
            },
            family,
            &algorithms,
            base,
            env,
        );
        let previous = JwtKeySource {
            env: "JWT_PREVIOUS_SECRET",
            secret: ("jwt.previous_secret", &section.previous_secret),
            secret_file: ("jwt.previous_secret_file", &section.previous_secret_file),
            public_key_pem: (
                "jwt.previous_public_key_pem",
                &section.previous_public_key_pem,
            ),
        };
        // A previous key of the other kind would be ignored: say so rather than let a rotation
        // silently refuse the old tokens.
        let (current, unused, kind, verifies_with) = match family {
            AlgorithmFamily::Hmac => (
                vec![("jwt.public_key_pem", section.public_key_pem.as_str())],
                vec![previous.public_key_pem],
                "an HMAC secret",
                "a secret",
            ),
            _ => (
                vec![
                    ("jwt.secret", section.secret.as_str()),
                    ("jwt.secret_file", section.secret_file.as_str()),
                ],
                vec![previous.secret, previous.secret_file],
                "a PEM public key file",
                "jwt.public_key_pem",
            ),
        };
        for (key, _) in unused.into_iter().filter(|(_, value)| !value.is_empty()) {
            self.fail(
                key,
                format!("does not fit jwt.algorithms ({:?}): the key being rotated out must be {kind}, like the current one", algorithms[0]),
            );
        }
        // A current key of the other kind is only noted: a file (config.toml's secret_file) or
        // an environment may carry one for each family, and switch by `algorithms` alone.
        for (key, _) in current.into_iter().filter(|(_, value)| !value.is_empty()) {
            self.warnings.push(format!(
                "{key} is ignored: jwt.algorithms ({:?}) verify with {verifies_with}",
                algorithms[0]
            ));
        }
        // The variable comes from the same Secret whatever the algorithms (deploy/k8s), so it
        // is not an error here; but a rotation relying on it would refuse the old tokens.
        if family != AlgorithmFamily::Hmac && previous.env_secret(env).is_some() {
            self.warnings.push(format!(
                "JWT_PREVIOUS_SECRET is ignored: jwt.algorithms ({:?}) verify with a public key; name the key being rotated out in jwt.previous_public_key_pem",
                algorithms[0]
            ));
        }
        let previous_key = if previous.is_set(family, env) {
            let previous_key = self.jwt_key(&previous, family, &algorithms, base, env);
            // One public key has several PEM forms (SPKI, PKCS#1 for RSA): compared as keys.
            let same = match (&key, &previous_key) {
                (Some(current @ JwtKey::PublicPem(_)), Some(previous @ JwtKey::PublicPem(_))) => {
                    let bytes = |pem| {
                        crate::authn::decoding_key(pem, family)
                            .ok()
                            .and_then(|k| k.try_get_as_bytes().ok().map(<[u8]>::to_vec))
                    };
                    current == previous
                        || bytes(current).is_some_and(|b| Some(b) == bytes(previous))
                }
                _ => key.is_some() && previous_key == key,
            };
            if same {
                let name = match family {
                    AlgorithmFamily::Hmac => "jwt.previous_secret",
                    _ => "jwt.previous_public_key_pem",
                };
                self.fail(
                    name,
                    "is the current key itself: set it to the key being rotated out, or leave it out",
                );
            }
            previous_key
        } else {
            None
        };
        if section.leeway.subsec_nanos() != 0 {
            // Token times are whole seconds, and so is the verifier's allowance.
            self.fail(
                "jwt.leeway",
                "must be whole seconds (\"30s\", not \"1500ms\")",
            );
        }
        if section.leeway > MAX_JWT_LEEWAY {
            self.fail(
                "jwt.leeway",
                "must be at most 1h: it is the clock skew tolerated between the signer and portcullis",
            );
        }
        let parameter = &section.websocket_query_token;
        let plain = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~');
        if !parameter.bytes().all(plain) {
            self.fail(
                "jwt.websocket_query_token",
                "must be a query parameter name of letters, digits and - _ . ~ (\"access_token\"), or empty for none",
            );
        }
        let key = key?;
        let optional = |s: &str| (!s.is_empty()).then(|| s.to_string());
        Some(JwtConfig {
            algorithms,
            key,
            previous_key,
            issuer: optional(&section.issuer),
            audience: optional(&section.audience),
            leeway: section.leeway,
            verified_tokens: section.verified_tokens,
            require_iat: section.require_iat,
            websocket_query_token: optional(&section.websocket_query_token),
        })
    }

    /// One verification key, from where `source` says it may come; fails (naming the key) when
    /// it is missing, unreadable, too weak or not a key for `first`.
    fn jwt_key(
        &mut self,
        source: &JwtKeySource<'_>,
        family: jsonwebtoken::AlgorithmFamily,
        algorithms: &[jsonwebtoken::Algorithm],
        base: &Path,
        env: &[(String, String)],
    ) -> Option<JwtKey> {
        use jsonwebtoken::AlgorithmFamily;
        let first = *algorithms.first()?;
        let (secret_key, secret_value) = source.secret;
        let (file_key, file_value) = source.secret_file;
        let (pem_key, pem_value) = source.public_key_pem;
        if family == AlgorithmFamily::Hmac {
            let (mut secret, from) = if let Some(s) = source.env_secret(env) {
                (s.as_bytes().to_vec(), source.env)
            } else if !secret_value.is_empty() {
                (secret_value.as_bytes().to_vec(), secret_key)
            } else if !file_value.is_empty() {
                let path = self.path(file_key, file_value, base);
                match read_key_file(&path) {
                    Ok(bytes) => (bytes, file_key),
                    Err(e) => {
                        // The default config's file is the development secret.
                        let hint = if source.env == "JWT_SECRET" {
                            " (deploy/dev-setup.sh creates a development secret)"
                        } else {
                            ""
                        };
                        self.fail(
                            file_key,
                            format!("cannot read {}: {e}{hint}", path.display()),
                        );
                        return None;
                    }
                }
            } else {
                self.fail(
                    secret_key,
                    format!(
                        "an HMAC algorithm needs a secret: set {secret_key}, {file_key} or {}",
                        source.env
                    ),
                );
                return None;
            };
            // The same key however it is delivered: a file, or a Secret made from one
            // (`kubectl create secret --from-file`), ends in a newline that is not part of it.
            while secret.last().is_some_and(|b| b.is_ascii_whitespace()) {
                secret.pop();
            }
            if secret.len() < 32 {
                self.fail(
                    secret_key,
                    format!("must be at least 32 bytes long (it came from {from})"),
                );
                return None;
            }
            if is_placeholder(&secret) {
                self.fail(
                    secret_key,
                    format!("is the example's placeholder (it came from {from}): anyone could sign tokens with it; make one with `openssl rand -hex 32`"),
                );
                return None;
            }
            return Some(JwtKey::Secret(secret));
        }
        if pem_value.is_empty() {
            self.fail(
                pem_key,
                "a public-key algorithm needs a PEM public key file",
            );
            return None;
        }
        let path = self.path(pem_key, pem_value, base);
        let pem = match read_key_file(&path) {
            Ok(pem) => pem,
            Err(e) => {
                self.fail(pem_key, format!("cannot read {}: {e}", path.display()));
                return None;
            }
        };
        // jsonwebtoken reads the public half out of an RSA private key and then verifies
        // nothing with it: every token would be refused, with nothing to say why.
        if pem
            .windows(b"PRIVATE KEY-----".len())
            .any(|w| w == b"PRIVATE KEY-----")
        {
            self.fail(
                pem_key,
                format!(
                    "{} holds a private key: give its public key (`openssl pkey -in KEY -pubout`); the private key is the login service's alone",
                    path.display()
                ),
            );
            return None;
        }
        let pem = JwtKey::PublicPem(pem);
        let key = match crate::authn::decoding_key(&pem, family) {
            Ok(key) => key,
            Err(e) => {
                self.fail(
                    pem_key,
                    format!(
                        "{} is not a usable public key for {first:?}: {e}",
                        path.display()
                    ),
                );
                return None;
            }
        };
        if family == AlgorithmFamily::Ec {
            // An EC key verifies one algorithm only, that of its curve: a key on another curve
            // would refuse every token, as TOKEN_INVALID, with nothing to say why.
            let curve =
                key.try_get_as_bytes()
                    .ok()
                    .map(<[u8]>::len)
                    .and_then(|point| match point {
                        33 | 65 => Some((jsonwebtoken::Algorithm::ES256, "P-256")),
                        49 | 97 => Some((jsonwebtoken::Algorithm::ES384, "P-384")),
                        _ => None,
                    });
            let Some((verifies, curve)) = curve else {
                self.fail(
                    pem_key,
                    format!(
                        "{} is on a curve neither ES256 nor ES384 uses",
                        path.display()
                    ),
                );
                return None;
            };
            if let Some(other) = algorithms.iter().find(|alg| **alg != verifies) {
                self.fail(
                    pem_key,
                    format!(
                        "{} is a {curve} key, which verifies {verifies:?} tokens only, not {other:?}",
                        path.display()
                    ),
                );
                return None;
            }
        }
        Some(pem)
    }

    fn upstream_url(&mut self, key: &str, value: &str) -> (Option<Scheme>, Option<Authority>) {
        let uri: Uri = match value.parse() {
            Ok(u) => u,
            Err(e) => {
                self.fail(key, format!("{value:?} is not a URL: {e}"));
                return (None, None);
            }
        };
        let scheme = match uri.scheme_str() {
            Some("http") => Scheme::HTTP,
            Some("https") => Scheme::HTTPS,
            _ => {
                self.fail(key, "must start with http:// or https://");
                return (None, None);
            }
        };
        let Some(authority) = uri.authority().cloned() else {
            self.fail(key, "must name a host");
            return (None, None);
        };
        if let Some(fault) = authority_fault(&authority) {
            self.fail(key, fault);
            return (None, None);
        }
        if authority.host().is_empty()
            || !crate::limits::is_host_value(authority.as_str().as_bytes())
        {
            self.fail(
                key,
                "must name a host: a host name (letters, digits, - . _) or IP address, then an optional :port",
            );
            return (None, None);
        }
        // The URL parser drops a fragment without a word.
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() || value.contains('#') {
            self.fail(
                key,
                "must not have a path, query or fragment: requests are forwarded with their own path",
            );
        }
        (Some(scheme), Some(authority))
    }
}

/// Largest `server.max_connections` and `upstream.max_connections`: each connection is a file
/// descriptor, and no process gets ten million.
const MAX_CONNECTIONS: usize = 10_000_000;

/// Largest `server.max_header_bytes`: the HTTP layer's own cap is four times it.
const MAX_HEADER_BYTES: usize = 1024 * 1024;

/// The most a key, secret or certificate file holds: a CA bundle of every public root is a
/// few hundred KiB. Past it the file is something else (a log, a device), not read whole.
const MAX_KEY_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// A key, secret or certificate file's contents, up to [`MAX_KEY_FILE_BYTES`].
pub(crate) fn read_key_file(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut contents = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_KEY_FILE_BYTES + 1)
        .read_to_end(&mut contents)?;
    if contents.len() as u64 > MAX_KEY_FILE_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "larger than 4 MiB: not a key or certificate file",
        ));
    }
    Ok(contents)
}

/// Why an upstream's authority cannot be used, if it cannot: user info, or a port that is not
/// 1 to 65535 (the `http` parser takes any port text: `host:`, `host:99999`, `host:x`).
fn authority_fault(authority: &Authority) -> Option<&'static str> {
    let text = authority.as_str();
    // Port text is whatever follows a colon after the host (an IPv6 host is bracketed).
    let after_host = text
        .get(text.rfind(']').map_or(0, |i| i + 1)..)
        .unwrap_or("");
    if text.contains('@') {
        // Never sent, and the URL is logged at start.
        Some("must not hold user info (user:password@): portcullis sends no credentials upstream")
    } else if after_host.contains(':') && authority.port_u16().is_none_or(|port| port == 0) {
        Some("has a port that is not 1 to 65535")
    } else {
        None
    }
}

// ---------------------------------------------------------------------------------------------
// Environment overrides.
// ---------------------------------------------------------------------------------------------

/// What a configuration value is, so that an environment string can be turned into it.
#[derive(Clone, Copy)]
enum Kind {
    Str,
    Int,
    Bool,
    /// Comma-separated list of strings.
    List,
}

/// More serving threads than this is a typo, not a machine.
const MAX_WORKERS: usize = 1024;
/// A remembered token takes about 500 bytes: at most about 32 MiB of them.
const MAX_VERIFIED_TOKENS: usize = 1 << 16;
/// One million callers per limiter: about 70 MB of IPv4 addresses or 145 MB of user ids.
pub const DEFAULT_MAX_TRACKED_CALLERS: usize = 1_000_000;
/// A hundred million user ids would take about 15 GB per limiter: more is a typo.
pub const MAX_TRACKED_CALLERS: usize = 100_000_000;
/// A user's sessions share one Redis value that every check of theirs reads; this bounds it
/// (to about 1 MB with the longest metadata).
const MAX_SESSIONS_PER_USER: usize = 1000;

/// Session expiry is stored as 48-bit Unix milliseconds (`session::record`), which run out in
/// the year 10889; a longer ttl would wrap to 1970 and every new session be born expired. A
/// century (humantime's `100y`) outlasts any session and stays far inside that.
pub const MAX_SESSION_TTL: Duration = Duration::from_secs(100 * 31_557_600);

/// The longest timeout or interval: a century, as for sessions. Far longer, a clock reading
/// moved by it overflows (about 3 × 10^11 years), which ends the task that moved it. Also the
/// longest `dev-token --ttl`.
pub const MAX_DURATION: Duration = MAX_SESSION_TTL;

/// Header names an identity header may not take, with what each already does.
const RESERVED_HEADERS: &[(&str, &str)] = &[
    ("connection", "is hop-by-hop (RFC 9110 7.6.1)"),
    ("keep-alive", "is hop-by-hop (RFC 9110 7.6.1)"),
    ("proxy-connection", "is hop-by-hop (RFC 9110 7.6.1)"),
    ("proxy-authenticate", "is hop-by-hop (RFC 9110 7.6.1)"),
    ("proxy-authorization", "is hop-by-hop (RFC 9110 7.6.1)"),
    ("te", "is hop-by-hop (RFC 9110 7.6.1)"),
    ("trailer", "is hop-by-hop (RFC 9110 7.6.1)"),
    ("transfer-encoding", "frames the request body"),
    ("upgrade", "is hop-by-hop (RFC 9110 7.6.1)"),
    ("content-length", "frames the request body"),
    ("host", "names the server the request is for"),
    ("authorization", "carries the client's bearer token"),
    ("cookie", "carries the client's cookies"),
    ("x-forwarded-for", "portcullis sets to the client address"),
    (
        "x-forwarded-proto",
        "portcullis sets to the client's scheme",
    ),
    ("x-forwarded-host", "portcullis sets to the client's Host"),
    ("x-request-id", "portcullis sets to the request id"),
];

/// The log filter `spec` describes (`log.level`, `PORTCULLIS_LOG`), or why it is refused.
///
/// Stricter than tracing's own syntax: a bare word there is a target's name, so a misspelt level
/// (`warning`, `verbose`) would parse and silence every line, errors included. Here a directive
/// without `=` must be a level, and a target's level is written `target=level`.
pub fn log_filter(spec: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    const TRY: &str = "try \"info\" or \"portcullis=debug,info\"";
    // Trimmed here: tracing would read "info " as a target's name.
    let directives: Vec<&str> = spec
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    if directives.is_empty() {
        return Err(format!("is empty ({TRY}, or \"off\" for no logs)"));
    }
    for &directive in &directives {
        let bare = !directive.contains(['=', '[', '{']);
        if bare
            && directive
                .parse::<tracing_subscriber::filter::LevelFilter>()
                .is_err()
        {
            return Err(format!(
                "{directive:?} is not a level (trace, debug, info, warn, error, off); \
                 a target's level is written target=level ({TRY})"
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(directives.join(","))
        .map_err(|e| format!("not a valid filter: {e} ({TRY})"))
}

/// Every key that `PORTCULLIS_<SECTION>_<KEY>` can set. Dots become underscores:
/// `server.tls.cert` is `PORTCULLIS_SERVER_TLS_CERT`.
const OVERRIDABLE: &[(&str, Kind)] = &[
    ("server.listen", Kind::Str),
    ("server.tls.cert", Kind::Str),
    ("server.tls.key", Kind::Str),
    ("server.max_body_bytes", Kind::Int),
    ("server.max_header_bytes", Kind::Int),
    ("server.header_read_timeout", Kind::Str),
    ("server.idle_timeout", Kind::Str),
    ("server.shutdown_grace", Kind::Str),
    ("server.shutdown_delay", Kind::Str),
    ("server.tls.reload_interval", Kind::Str),
    ("server.trusted_proxies", Kind::List),
    ("server.max_connections", Kind::Int),
    ("server.workers", Kind::Int),
    ("upstream.url", Kind::Str),
    ("upstream.request_timeout", Kind::Str),
    ("upstream.connect_timeout", Kind::Str),
    ("upstream.host", Kind::Str),
    ("upstream.pool_idle_timeout", Kind::Str),
    ("upstream.pool_max_idle", Kind::Int),
    ("upstream.max_connections", Kind::Int),
    ("upstream.ca_file", Kind::Str),
    ("admin.listen", Kind::Str),
    ("log.format", Kind::Str),
    ("log.level", Kind::Str),
    ("redis.url", Kind::Str),
    ("redis.key_prefix", Kind::Str),
    ("redis.command_timeout", Kind::Str),
    ("redis.connect_timeout", Kind::Str),
    ("session.ttl", Kind::Str),
    ("session.last_active_resolution", Kind::Str),
    ("session.api_prefix", Kind::Str),
    ("session.slide_interval", Kind::Str),
    ("session.local_cache", Kind::Bool),
    ("session.local_cache_max_entries", Kind::Int),
    ("session.max_per_user", Kind::Int),
    ("identity.user_id_header", Kind::Str),
    ("identity.session_id_header", Kind::Str),
    ("identity.platform_header", Kind::Str),
    ("jwt.algorithms", Kind::List),
    ("jwt.secret", Kind::Str),
    ("jwt.secret_file", Kind::Str),
    ("jwt.public_key_pem", Kind::Str),
    ("jwt.previous_secret", Kind::Str),
    ("jwt.previous_secret_file", Kind::Str),
    ("jwt.previous_public_key_pem", Kind::Str),
    ("jwt.issuer", Kind::Str),
    ("jwt.audience", Kind::Str),
    ("jwt.leeway", Kind::Str),
    ("jwt.verified_tokens", Kind::Int),
    ("jwt.require_iat", Kind::Bool),
    ("jwt.websocket_query_token", Kind::Str),
    ("rate_limit.gc_interval", Kind::Str),
    ("rate_limit.ipv6_prefix", Kind::Int),
    ("rate_limit.max_tracked_callers", Kind::Int),
    ("metrics.active_sessions_interval", Kind::Str),
    ("cors.allowed_origins", Kind::List),
    ("cors.allowed_methods", Kind::List),
    ("cors.allowed_headers", Kind::List),
    ("cors.expose_headers", Kind::List),
    ("cors.max_age", Kind::Str),
    ("cors.allow_credentials", Kind::Bool),
    ("rate_limit.proxy.requests", Kind::Int),
    ("rate_limit.proxy.per", Kind::Str),
    ("rate_limit.proxy.burst", Kind::Int),
    ("rate_limit.sessions_api.requests", Kind::Int),
    ("rate_limit.sessions_api.per", Kind::Str),
    ("rate_limit.sessions_api.burst", Kind::Int),
    ("rate_limit.anonymous.requests", Kind::Int),
    ("rate_limit.anonymous.per", Kind::Str),
    ("rate_limit.anonymous.burst", Kind::Int),
];

const ENV_PREFIX: &str = "PORTCULLIS_";

/// The environment variable that overrides `key`.
pub fn env_name(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.replace('.', "_").to_ascii_uppercase())
}

/// Kubernetes puts `<SERVICE>_PORT`, `<SERVICE>_PORT_<n>_TCP...` and `<SERVICE>_SERVICE_HOST/PORT...`
/// into every pod for each Service of the namespace; a Service named `portcullis` (or
/// `portcullis-<x>`) yields `PORTCULLIS_...` names that are not overrides. No config key ends
/// in `port`, or contains `service_host` / `service_port`, so these can never be mistaken for one.
fn is_service_link(rest: &str) -> bool {
    rest == "PORT"
        || rest.ends_with("_PORT")
        || rest.starts_with("PORT_")
        || rest.contains("_PORT_")
        || rest.starts_with("SERVICE_")
        || rest.contains("_SERVICE_")
}

/// What line `line` (from 1) sets: a key or section portcullis knows, as it names them; never
/// a value, which may be a secret. Only a line that starts a statement is read so (one inside a
/// multi-line string or array is the value itself): the TOML before it parses whole just then,
/// the error being the file's first. And only a name the configuration has is shown, so that
/// a value on a line that lost its `=` (`secret "..."`) is not taken for a key.
fn line_key(text: &str, line: usize) -> Option<String> {
    let start: usize = text
        .split_inclusive('\n')
        .take(line.checked_sub(1)?)
        .map(str::len)
        .sum();
    text.get(..start)?.parse::<toml::Table>().ok()?;
    let written = text.get(start..)?.lines().next()?.trim();
    let known = |name: &str| {
        OVERRIDABLE
            .iter()
            .any(|(key, _)| key.rsplit('.').next() == Some(name))
            || ROUTE_KEYS.contains(&name)
    };
    if let Some(header) = written.strip_prefix('[') {
        let inner = header.trim_start_matches('[');
        let name = inner.split(']').next()?.trim();
        (SECTIONS.contains(&name) || name == "routes").then(|| format!("`[{name}]`"))
    } else {
        // The known name alone: what else the written key held could be part of a value.
        let name = written.split_once('=')?.0.rsplit('.').next()?.trim();
        known(name).then(|| format!("`{name}`"))
    }
}

/// `c` as a URL carries it escaped: each byte of its UTF-8, `%XX`.
fn percent_encoded(c: char) -> String {
    let mut utf8 = [0u8; 4];
    c.encode_utf8(&mut utf8)
        .bytes()
        .map(|b| format!("%{b:02X}"))
        .collect()
}

/// The keys of a `[[routes]]` entry and of its `rate_limit`, which no variable sets.
const ROUTE_KEYS: &[&str] = &[
    "path_prefix",
    "auth",
    "rate_limit",
    "requests",
    "per",
    "burst",
];

/// 1-based line and column of byte `offset` in `text`.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Errors about a key an environment variable set name the variable: the file may be fine. So
/// do errors about a part of it (`server.trusted_proxies[0]`) or the table it is in (a
/// `rate_limit.proxy` that lacks a field once `rate_limit.proxy.requests` is set).
fn blame_env(mut errors: ConfigErrors, overridden: &[(&str, String)]) -> ConfigErrors {
    // `overridden` pairs each key set with its note: "set by VAR", or for a table an override
    // made where the file had none, "[table] made by VAR".
    let within = |inner: &str, outer: &str| {
        inner
            .strip_prefix(outer)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
    };
    for error in &mut errors.0 {
        let set = |key: &&str| within(&error.key, key) || within(key, &error.key);
        // The closest: a key's own variable before the one that made its table.
        let closest = overridden
            .iter()
            .filter(|(key, _)| set(key))
            .min_by_key(|(key, _)| key.len().abs_diff(error.key.len()));
        if let Some((_, var)) = closest {
            if !error.reason.contains(var.as_str()) {
                error.reason.push_str(&format!(" ({var})"));
            }
        }
    }
    errors
}

/// Applies the `PORTCULLIS_*` overrides; returns each key set, with the variable that set it.
fn apply_env_overrides(
    table: &mut toml::Table,
    env: &[(String, String)],
    warnings: &mut Vec<String>,
) -> Result<Vec<(&'static str, String)>, ConfigErrors> {
    let mut errors = Vec::new();
    let mut overridden = Vec::new();
    for (name, value) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        // PORTCULLIS_LOG is the log filter, read by the binary itself; checked here, so that
        // one that does not parse is refused rather than passed over for `log.level`.
        if rest == "LOG" {
            // Empty, it is ignored (the binary does the same), as an empty REDIS_HOST is.
            if !value.trim().is_empty() {
                if let Err(reason) = log_filter(value) {
                    errors.push(ConfigError {
                        key: "log.level".into(),
                        reason: format!("{name}={value:?}: {reason}"),
                    });
                }
            }
            continue;
        }
        let Some((key, kind)) = OVERRIDABLE
            .iter()
            .find(|(key, _)| env_name(key) == *name)
            .copied()
        else {
            if !is_service_link(rest) {
                warnings.push(format!(
                    "ignoring environment variable {name}: no such config key"
                ));
            }
            continue;
        };
        let parsed = match kind {
            Kind::Str => toml::Value::String(value.clone()),
            Kind::Int => match value.trim().parse::<i64>() {
                Ok(n) => toml::Value::Integer(n),
                Err(_) => {
                    errors.push(ConfigError {
                        key: key.into(),
                        reason: format!("{name}={value:?} is not an integer"),
                    });
                    continue;
                }
            },
            Kind::Bool => match value.trim() {
                "true" | "1" => toml::Value::Boolean(true),
                "false" | "0" => toml::Value::Boolean(false),
                _ => {
                    errors.push(ConfigError {
                        key: key.into(),
                        reason: format!("{name}={value:?} is not true or false"),
                    });
                    continue;
                }
            },
            Kind::List => toml::Value::Array(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| toml::Value::String(s.to_string()))
                    .collect(),
            ),
        };
        // A table the file does not have, made by this variable, is blamed on it: its other
        // keys are then missing because of it (`[server.tls]` without `cert`).
        let parent = key.rsplit_once('.').map_or("", |(parent, _)| parent);
        let made = !parent.is_empty() && !has_table(table, parent);
        set_path(table, key, parsed);
        overridden.push((key, format!("set by {name}")));
        if made && !overridden.iter().any(|(k, _)| *k == parent) {
            overridden.push((parent, format!("[{parent}] made by {name}")));
        }
    }
    if errors.is_empty() {
        Ok(overridden)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Whether the file has the table at `dotted`.
fn has_table(table: &toml::Table, dotted: &str) -> bool {
    let mut cur = table;
    for part in dotted.split('.') {
        match cur.get(part) {
            Some(toml::Value::Table(inner)) => cur = inner,
            _ => return false,
        }
    }
    true
}

fn set_path(table: &mut toml::Table, dotted: &str, value: toml::Value) {
    let mut parts: Vec<&str> = dotted.split('.').collect();
    let Some(leaf) = parts.pop() else { return };
    let mut cur = table;
    for part in parts {
        let entry = cur
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        let toml::Value::Table(t) = entry else { return };
        cur = t;
    }
    cur.insert(leaf.to_string(), value);
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: (&str, &str) = ("JWT_SECRET", "0123456789abcdef0123456789abcdef");

    fn parse(text: &str) -> Result<Config, ConfigErrors> {
        parse_env(text, &[])
    }

    fn parse_env(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
        let env: Vec<(String, String)> = std::iter::once(&SECRET)
            .chain(env)
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_toml(text, Path::new("/etc/portcullis"), &env)
    }

    fn hmac_key(text: &str, env: &[(&str, &str)]) -> Result<Vec<u8>, ConfigErrors> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let config = Config::from_toml(text, Path::new("/etc/portcullis"), &env)?;
        match config.jwt.key {
            JwtKey::Secret(secret) => Ok(secret),
            _ => panic!("not an HMAC key"),
        }
    }

    #[test]
    fn a_secret_is_the_same_key_with_or_without_its_trailing_newline() {
        let bare = hmac_key("", &[SECRET]).unwrap();
        let with_newline = format!("{}\n", SECRET.1);
        assert_eq!(
            hmac_key("", &[("JWT_SECRET", &with_newline)]).unwrap(),
            bare
        );
        let in_file = format!("[jwt]\nsecret = \"{} \"\n", SECRET.1);
        assert_eq!(hmac_key(&in_file, &[]).unwrap(), bare);
    }

    #[test]
    fn a_previous_jwt_key_is_read_like_the_current_one_and_checked() {
        let previous = |c: Config| match c.jwt.previous_key {
            Some(JwtKey::Secret(secret)) => Some(String::from_utf8(secret).unwrap()),
            Some(JwtKey::PublicPem(_)) => panic!("not an HMAC key"),
            None => None,
        };
        let old = "o".repeat(32);
        assert_eq!(previous(parse("").unwrap()), None);
        let from_env = parse_env("", &[("JWT_PREVIOUS_SECRET", &format!("{old}\n"))]).unwrap();
        assert_eq!(previous(from_env), Some(old.clone()), "trimmed");
        let in_file = format!("[jwt]\nprevious_secret = \"{old}\"\n");
        assert_eq!(previous(parse(&in_file).unwrap()), Some(old.clone()));
        // Empty or whitespace only (a Secret's key from an empty file): no previous key.
        for blank in ["", "\n", " \r\n"] {
            let c = parse_env("", &[("JWT_PREVIOUS_SECRET", blank)]).unwrap();
            assert_eq!(previous(c), None, "{blank:?}");
        }

        let only_error = |text: &str, env: &[(&str, &str)]| {
            let err = parse_env(text, env).unwrap_err();
            assert_eq!(err.0.len(), 1, "{err}");
            (err.0[0].key.clone(), err.0[0].reason.clone())
        };
        let (key, reason) = only_error("", &[("JWT_PREVIOUS_SECRET", "short")]);
        assert_eq!(key, "jwt.previous_secret");
        assert!(
            reason.contains("32 bytes") && reason.contains("JWT_PREVIOUS_SECRET"),
            "{reason}"
        );
        let (key, reason) = only_error("", &[("JWT_PREVIOUS_SECRET", SECRET.1)]);
        assert_eq!(key, "jwt.previous_secret");
        assert!(reason.contains("current key"), "{reason}");
        let (key, reason) = only_error("[jwt]\nprevious_public_key_pem = \"old.pem\"\n", &[]);
        assert_eq!(key, "jwt.previous_public_key_pem");
        assert!(reason.contains("HMAC secret"), "{reason}");
        let (key, _) = only_error("[jwt]\nprevious_secret_file = \"/nonexistent/old\"\n", &[]);
        assert_eq!(key, "jwt.previous_secret_file");
        // A current key of the other kind is named in a warning, rather than left unsaid.
        let c = parse("[jwt]\npublic_key_pem = \"current.pem\"\n").unwrap();
        assert!(
            c.warnings
                .iter()
                .any(|w| w.starts_with("jwt.public_key_pem is ignored")),
            "{:?}",
            c.warnings
        );
        let err = parse(&format!(
            "[jwt]\nalgorithms = [\"RS256\"]\nsecret = \"{old}\"\n"
        ))
        .unwrap_err();
        assert!(
            err.0.iter().all(|e| e.key != "jwt.secret"),
            "only a warning: {err}"
        );
    }

    #[test]
    fn an_ec_key_must_be_on_the_curve_of_every_algorithm_listed() {
        let dir = tempfile::tempdir().unwrap();
        for (name, alg) in [
            ("p256.pem", &rcgen::PKCS_ECDSA_P256_SHA256),
            ("p384.pem", &rcgen::PKCS_ECDSA_P384_SHA384),
        ] {
            let pair = rcgen::KeyPair::generate_for(alg).unwrap();
            std::fs::write(dir.path().join(name), pair.public_key_pem()).unwrap();
        }
        let config = |algorithms: &str, pem: &str| {
            let text = format!("[jwt]\nalgorithms = [{algorithms}]\npublic_key_pem = \"{pem}\"\n");
            Config::from_toml(&text, dir.path(), &[])
        };
        assert!(config("\"ES256\"", "p256.pem").is_ok());
        assert!(config("\"ES384\"", "p384.pem").is_ok());
        for (algorithms, pem, named) in [
            ("\"ES384\"", "p256.pem", "ES384"),
            ("\"ES256\"", "p384.pem", "ES256"),
            ("\"ES256\", \"ES384\"", "p256.pem", "ES384"),
        ] {
            let err = config(algorithms, pem).unwrap_err();
            assert_eq!(err.0[0].key, "jwt.public_key_pem", "{err}");
            assert!(err.0[0].reason.contains(named), "{err}");
        }
    }

    #[test]
    fn a_public_key_file_of_another_kind_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        std::fs::write(dir.path().join("ec.pem"), ec.public_key_pem()).unwrap();
        std::fs::write(dir.path().join("junk.pem"), "not a key\n").unwrap();
        for (algorithm, pem) in [("RS256", "ec.pem"), ("ES256", "junk.pem")] {
            let text =
                format!("[jwt]\nalgorithms = [\"{algorithm}\"]\npublic_key_pem = \"{pem}\"\n");
            let err = Config::from_toml(&text, dir.path(), &[]).unwrap_err();
            assert_eq!(err.0[0].key, "jwt.public_key_pem", "{err}");
            assert!(
                err.0[0].reason.contains("not a usable public key for"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_private_key_given_for_the_public_one_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        crate::tls::for_tests::openssl(dir.path(), &["genrsa", "-out", "private.pem", "2048"]);
        for key in ["public_key_pem", "previous_public_key_pem"] {
            let other = if key == "public_key_pem" {
                ""
            } else {
                "public_key_pem = \"private.pem\"\n"
            };
            let text = format!("[jwt]\nalgorithms = [\"RS256\"]\n{key} = \"private.pem\"\n{other}");
            let err = Config::from_toml(&text, dir.path(), &[]).unwrap_err();
            let fault = err
                .0
                .iter()
                .find(|f| f.key == format!("jwt.{key}"))
                .unwrap_or_else(|| panic!("{key}: {err}"));
            assert!(fault.reason.contains("holds a private key"), "{err}");
        }
    }

    #[test]
    fn the_current_public_key_in_another_pem_form_is_not_taken_for_the_previous_one() {
        let dir = tempfile::tempdir().unwrap();
        let openssl = |args: &[&str]| crate::tls::for_tests::openssl(dir.path(), args);
        openssl(&["genrsa", "-out", "private.pem", "2048"]);
        openssl(&["rsa", "-in", "private.pem", "-pubout", "-out", "spki.pem"]);
        openssl(&[
            "rsa",
            "-in",
            "private.pem",
            "-RSAPublicKey_out",
            "-out",
            "pkcs1.pem",
        ]);
        openssl(&["genrsa", "-out", "other.pem", "2048"]);
        openssl(&[
            "rsa",
            "-in",
            "other.pem",
            "-pubout",
            "-out",
            "other-spki.pem",
        ]);
        let with_previous = |previous: &str| {
            let text = format!(
                "[jwt]\nalgorithms = [\"RS256\"]\npublic_key_pem = \"spki.pem\"\nprevious_public_key_pem = \"{previous}\"\n"
            );
            Config::from_toml(&text, dir.path(), &[])
        };
        for same in ["spki.pem", "pkcs1.pem"] {
            let err = with_previous(same).unwrap_err();
            assert_eq!(err.0[0].key, "jwt.previous_public_key_pem", "{same}: {err}");
            assert!(err.0[0].reason.contains("current key itself"), "{err}");
        }
        assert!(with_previous("other-spki.pem").is_ok());
    }

    #[test]
    fn a_previous_public_key_is_read_and_jwt_previous_secret_is_not_taken_for_one() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["current.pem", "old.pem"] {
            let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
            std::fs::write(dir.path().join(name), pair.public_key_pem()).unwrap();
        }
        let text = "[jwt]\nalgorithms = [\"EdDSA\"]\npublic_key_pem = \"current.pem\"\n\
                    previous_public_key_pem = \"old.pem\"\n";
        let env = |vars: &[(&str, &str)]| -> Vec<(String, String)> {
            vars.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let c = Config::from_toml(text, dir.path(), &env(&[])).unwrap();
        let old = std::fs::read(dir.path().join("old.pem")).unwrap();
        assert!(matches!(c.jwt.previous_key, Some(JwtKey::PublicPem(pem)) if pem == old));
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);

        let secret = "o".repeat(32);
        let c =
            Config::from_toml(text, dir.path(), &env(&[("JWT_PREVIOUS_SECRET", &secret)])).unwrap();
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert!(c.warnings[0].contains("JWT_PREVIOUS_SECRET is ignored"));

        let same = text.replace("old.pem", "current.pem");
        let err = Config::from_toml(&same, dir.path(), &env(&[])).unwrap_err();
        assert_eq!(err.0[0].key, "jwt.previous_public_key_pem", "{err}");
    }

    #[test]
    fn the_ipv6_prefix_of_an_anonymous_caller_is_32_to_128_bits() {
        assert_eq!(parse("").unwrap().rate_limit.ipv6_prefix, 64);
        let c = parse("[rate_limit]\nipv6_prefix = 56\n").unwrap();
        assert_eq!(c.rate_limit.ipv6_prefix, 56);
        for bad in [0, 31, 129] {
            let err = parse(&format!("[rate_limit]\nipv6_prefix = {bad}\n")).unwrap_err();
            assert_eq!(err.0[0].key, "rate_limit.ipv6_prefix", "{err}");
        }
    }

    #[test]
    fn max_tracked_callers_is_1_to_100_million() {
        assert_eq!(parse("").unwrap().rate_limit.max_tracked_callers, 1_000_000);
        let c = parse("[rate_limit]\nmax_tracked_callers = 2\n").unwrap();
        assert_eq!(c.rate_limit.max_tracked_callers, 2);
        for bad in ["0", "100000001", "-1"] {
            let err = parse(&format!("[rate_limit]\nmax_tracked_callers = {bad}\n")).unwrap_err();
            assert_eq!(err.0[0].key, "rate_limit.max_tracked_callers", "{err}");
        }
    }

    #[test]
    fn max_tracked_callers_can_be_set_from_the_environment() {
        let var = "PORTCULLIS_RATE_LIMIT_MAX_TRACKED_CALLERS";
        let c = parse_env("", &[(var, "5000")]).unwrap();
        assert_eq!(c.rate_limit.max_tracked_callers, 5000);
        let err = parse_env("", &[(var, "0")]).unwrap_err();
        assert_eq!(err.0[0].key, "rate_limit.max_tracked_callers", "{err}");
        assert!(err.0[0].reason.contains(var), "{err}");
    }

    #[test]
    fn the_websocket_query_token_is_a_plain_parameter_name_or_nothing() {
        assert_eq!(parse("").unwrap().jwt.websocket_query_token, None);
        let c = parse("[jwt]\nwebsocket_query_token = \"access_token\"\n").unwrap();
        assert_eq!(c.jwt.websocket_query_token.as_deref(), Some("access_token"));
        for bad in ["access token", "a=b", "a&b", "t%5F"] {
            let err = parse(&format!("[jwt]\nwebsocket_query_token = {bad:?}\n")).unwrap_err();
            assert_eq!(err.0[0].key, "jwt.websocket_query_token", "{bad}");
        }
    }

    #[test]
    fn jwt_leeway_is_at_most_an_hour() {
        assert!(parse("[jwt]\nleeway = \"1h\"\n").is_ok());
        let err = parse("[jwt]\nleeway = \"1500ms\"\n").unwrap_err();
        assert_eq!(err.0[0].key, "jwt.leeway");
        assert!(err.0[0].reason.contains("whole seconds"), "{err}");
        let err = parse("[jwt]\nleeway = \"61m\"\n").unwrap_err();
        assert_eq!(err.0[0].key, "jwt.leeway", "{err}");
    }

    #[test]
    fn the_examples_placeholder_secrets_are_refused() {
        let placeholder = "REPLACE-ME-with-at-least-32-random-bytes-0000000000";
        let err = hmac_key("", &[("JWT_SECRET", placeholder)]).unwrap_err();
        assert_eq!(err.0[0].key, "jwt.secret");
        assert!(err.0[0].reason.contains("placeholder") && err.0[0].reason.contains("JWT_SECRET"));
        let err = hmac_key(&format!("[jwt]\nsecret = \"{placeholder}\"\n"), &[]).unwrap_err();
        assert!(err.0[0].reason.contains("jwt.secret"), "{err}");

        let err = parse_env(
            "",
            &[("REDIS_PASSWORD", "REPLACE-ME-with-a-random-password")],
        )
        .unwrap_err();
        assert_eq!(err.0[0].key, "redis.url");
        assert!(err.0[0].reason.contains("placeholder"), "{err}");
        let err = parse("[redis]\nurl = \"redis://:replace-me@redis:6379\"\n").unwrap_err();
        assert_eq!(err.0[0].key, "redis.url");
    }

    #[test]
    fn a_toml_syntax_error_says_where() {
        let err =
            parse("[server]\nlisten = \"0.0.0.0:8443\"\n\n[session]\nttl = \"30d\n").unwrap_err();
        assert_eq!(err.0[0].key, "(file)");
        assert!(
            err.0[0].reason.contains("at line 5 (`ttl`), column"),
            "{err}"
        );
        let err = parse("[server]\n[server]\n").unwrap_err();
        assert!(err.0[0].reason.contains("line 2"), "{err}");
    }

    #[test]
    fn errors_about_an_overridden_key_name_the_variable() {
        // The key itself, an item of a list a variable set, and the table a variable's key is
        // in; and a table a variable made where the file has none, whose missing keys are its
        // doing.
        for (var, value, key, note) in [
            (
                "PORTCULLIS_LOG_FORMAT",
                "yaml",
                "log.format",
                "(set by {var})",
            ),
            (
                "PORTCULLIS_SERVER_TRUSTED_PROXIES",
                "bogus",
                "server.trusted_proxies[0]",
                "(set by {var})",
            ),
            (
                "PORTCULLIS_RATE_LIMIT_PROXY_REQUESTS",
                "50",
                "rate_limit.proxy",
                "([rate_limit.proxy] made by {var})",
            ),
            (
                "PORTCULLIS_SERVER_TLS_RELOAD_INTERVAL",
                "1s",
                "server.tls.cert",
                "([server.tls] made by {var})",
            ),
        ] {
            let err = parse_env("", &[(var, value)]).unwrap_err();
            assert_eq!(err.0[0].key, key);
            assert!(
                err.0[0].reason.contains(&note.replace("{var}", var)),
                "{err}"
            );
        }
        // The variable's own key is still blamed as set by it.
        let err = parse_env("", &[("PORTCULLIS_SERVER_TLS_RELOAD_INTERVAL", "0s")]).unwrap_err();
        let interval = err
            .0
            .iter()
            .find(|e| e.key == "server.tls.reload_interval")
            .unwrap_or_else(|| panic!("{err}"));
        assert!(
            interval
                .reason
                .contains("(set by PORTCULLIS_SERVER_TLS_RELOAD_INTERVAL)"),
            "{err}"
        );
        let err = parse_env("", &[("PORTCULLIS_SESSION_TTL", "5")]).unwrap_err();
        assert_eq!(err.0[0].key, "session.ttl");
        assert!(err.0[0].reason.contains("PORTCULLIS_SESSION_TTL"), "{err}");
        // The same mistake in the file names no variable.
        let err = parse("[log]\nformat = \"yaml\"\n").unwrap_err();
        assert!(!err.0[0].reason.contains("PORTCULLIS_"), "{err}");
    }

    #[test]
    fn empty_file_gives_documented_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.server.listen, "0.0.0.0:8443".parse().unwrap());
        assert_eq!(c.admin.listen, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(c.server.max_body_bytes, 10 * 1024 * 1024);
        assert!(c.server.tls.is_none());
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let err = parse("[server]\nlisen = \"0.0.0.0:1\"\n").unwrap_err();
        assert_eq!(err.0[0].key, "server.lisen");
        assert!(err.0[0].reason.contains("unknown field"), "{err}");
    }

    #[test]
    fn workers_default_to_one_per_cpu_and_can_be_pinned() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(parse("").unwrap().server.workers, cpus);
        assert_eq!(parse("[server]\nworkers = 3\n").unwrap().server.workers, 3);
        let env = parse_env("", &[("PORTCULLIS_SERVER_WORKERS", "1")]).unwrap();
        assert_eq!(env.server.workers, 1);
    }

    #[test]
    fn upstream_ca_file_must_hold_usable_ca_certificates() {
        let err = parse("[upstream]\nca_file = \"/nonexistent/ca.pem\"\n").unwrap_err();
        assert_eq!(err.0[0].key, "upstream.ca_file");
        assert!(err.0[0].reason.contains("cannot read"), "{err}");

        let not_pem = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(not_pem.path(), "no certificate here\n").unwrap();
        let err = parse(&format!(
            "[upstream]\nca_file = \"{}\"\n",
            not_pem.path().display()
        ))
        .unwrap_err();
        assert_eq!(err.0[0].key, "upstream.ca_file");
        assert!(err.0[0].reason.contains("0 usable"), "{err}");

        assert!(parse("").unwrap().upstream.ca.is_none());
    }

    #[test]
    fn require_iat_is_off_unless_asked_for() {
        assert!(!parse("").unwrap().jwt.require_iat);
        assert!(
            parse("[jwt]\nrequire_iat = true\n")
                .unwrap()
                .jwt
                .require_iat
        );
        let err = parse("[jwt]\nrequire_iat = \"yes\"\n").unwrap_err();
        assert_eq!(err.0[0].key, "jwt.require_iat", "{err}");
    }

    #[test]
    fn verified_tokens_is_bounded() {
        assert_eq!(parse("").unwrap().jwt.verified_tokens, 8192);
        assert_eq!(
            parse("[jwt]\nverified_tokens = 0\n")
                .unwrap()
                .jwt
                .verified_tokens,
            0
        );
        let err = parse("[jwt]\nverified_tokens = 10000000\n").unwrap_err();
        assert_eq!(err.0[0].key, "jwt.verified_tokens");
        assert!(err.0[0].reason.contains("at most 65536"), "{err}");
    }

    #[test]
    fn max_sessions_per_user_is_bounded() {
        assert_eq!(parse("").unwrap().session.max_per_user, 100);
        assert_eq!(
            parse("[session]\nmax_per_user = 1\n")
                .unwrap()
                .session
                .max_per_user,
            1
        );
        for bad in ["0", "1001"] {
            let err = parse(&format!("[session]\nmax_per_user = {bad}\n")).unwrap_err();
            assert_eq!(err.0[0].key, "session.max_per_user");
            assert!(err.0[0].reason.contains("between 1 and 1000"), "{err}");
        }
    }

    #[test]
    fn session_ttl_is_bounded_so_that_expiry_fits_its_48_bits() {
        assert_eq!(
            parse("[session]\nttl = \"100y\"\n").unwrap().session.ttl,
            Duration::from_secs(100 * 31_557_600)
        );
        // 9000 years from now is past 2^48 ms after 1970: it wrapped to an expiry in the past.
        for bad in ["101y", "9000y"] {
            let err = parse(&format!("[session]\nttl = \"{bad}\"\n")).unwrap_err();
            assert_eq!(err.0.len(), 1, "{err}");
            assert_eq!(err.0[0].key, "session.ttl");
            assert!(err.0[0].reason.contains("at most 100 years"), "{err}");
        }
    }

    #[test]
    fn slide_interval_is_at_least_the_cache_heartbeat_and_at_most_a_tenth_of_ttl() {
        assert_eq!(
            parse("").unwrap().session.slide_interval,
            Duration::from_secs(30)
        );
        let shortest = parse("[session]\nttl = \"1s\"\nlast_active_resolution = \"0s\"\n").unwrap();
        assert_eq!(shortest.session.slide_interval, Duration::from_millis(50));
        let c = parse("[session]\nslide_interval = \"20ms\"\n").unwrap();
        assert_eq!(c.session.slide_interval, Duration::from_millis(20));
        for (bad, why) in [
            ("0s", "at least 20ms"),
            ("19ms", "at least 20ms"),
            ("3d4h", "at most a tenth"),
        ] {
            let err = parse(&format!("[session]\nslide_interval = \"{bad}\"\n")).unwrap_err();
            assert_eq!(err.0.len(), 1, "{bad}: {err}");
            assert_eq!(err.0[0].key, "session.slide_interval");
            assert!(err.0[0].reason.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn absurd_worker_count_names_the_key() {
        let err = parse("[server]\nworkers = 100000\n").unwrap_err();
        assert_eq!(err.0[0].key, "server.workers");
        assert!(err.0[0].reason.contains("at most 1024"), "{err}");
        let err = parse("[server]\nworkers = -1\n").unwrap_err();
        assert_eq!(err.0[0].key, "server.workers");
    }

    #[test]
    fn identity_headers_must_differ_ignoring_case() {
        let err = parse("[identity]\nuser_id_header = \"x-id\"\nsession_id_header = \"X-Id\"\n")
            .unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        assert_eq!(err.0[0].key, "identity.session_id_header");
        assert!(
            err.0[0].reason.contains("already identity.user_id_header"),
            "{err}"
        );

        let err = parse("[identity]\nplatform_header = \"x-session-id\"\n").unwrap_err();
        assert_eq!(err.0[0].key, "identity.platform_header");
        assert!(
            err.0[0]
                .reason
                .contains("already identity.session_id_header"),
            "{err}"
        );
    }

    #[test]
    fn identity_headers_cannot_contain_underscores() {
        for key in ["user_id_header", "session_id_header", "platform_header"] {
            let err = parse(&format!("[identity]\n{key} = \"X_Game_User\"\n")).unwrap_err();
            assert_eq!(err.0.len(), 1, "{err}");
            assert_eq!(err.0[0].key, format!("identity.{key}"));
            assert!(err.0[0].reason.contains("x-game-user"), "{err}");
        }
        assert!(parse("[identity]\nuser_id_header = \"X-Game-User\"\n").is_ok());
    }

    #[test]
    fn identity_headers_cannot_take_a_name_http_or_portcullis_uses() {
        for name in [
            "Connection",
            "keep-alive",
            "proxy-connection",
            "proxy-authenticate",
            "proxy-authorization",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "content-length",
            "host",
            "Authorization",
            "cookie",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "x-request-id",
        ] {
            for key in ["user_id_header", "session_id_header", "platform_header"] {
                let err = parse(&format!("[identity]\n{key} = \"{name}\"\n")).unwrap_err();
                assert_eq!(err.0.len(), 1, "{key} = {name}: {err}");
                assert_eq!(err.0[0].key, format!("identity.{key}"));
                assert!(
                    err.0[0]
                        .reason
                        .starts_with(&format!("cannot be {}", name.to_ascii_lowercase())),
                    "{err}"
                );
            }
        }
        let c = parse("[identity]\nuser_id_header = \"X-Player\"\n").unwrap();
        assert_eq!(c.identity.user_id, "x-player");
    }

    #[test]
    fn unknown_section_is_an_error() {
        let err = parse("[servr]\n").unwrap_err();
        assert!(err.to_string().contains("servr"), "{err}");
    }

    #[test]
    fn bad_duration_names_the_key() {
        let err = parse("[upstream]\nrequest_timeout = \"soon\"\n").unwrap_err();
        assert_eq!(err.0[0].key, "upstream.request_timeout");
    }

    #[test]
    fn human_durations_are_parsed() {
        let c =
            parse("[upstream]\nrequest_timeout = \"250ms\"\n[server]\nshutdown_grace = \"1m\"\n")
                .unwrap();
        assert_eq!(c.upstream.request_timeout, Duration::from_millis(250));
        assert_eq!(c.server.shutdown_grace, Duration::from_secs(60));
    }

    #[test]
    fn every_validation_problem_is_reported_at_once() {
        let err = parse(
            "[server]\nlisten = \"nowhere\"\n[upstream]\nurl = \"ftp://x\"\n[log]\nformat = \"xml\"\n",
        )
        .unwrap_err();
        let keys: Vec<&str> = err.0.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["server.listen", "upstream.url", "log.format"]);
    }

    #[test]
    fn at_most_max_routes_routes() {
        let routes = |n: usize| {
            (0..n)
                .map(|i| format!("[[routes]]\npath_prefix = \"/r{i}\"\n"))
                .collect::<String>()
        };
        assert!(parse(&routes(crate::routes::MAX_ROUTES)).is_ok());
        let err = parse(&routes(crate::routes::MAX_ROUTES + 1)).unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        assert_eq!(err.0[0].key, "routes");
        assert!(err.0[0].reason.contains("at most 10000"), "{err}");
    }

    #[test]
    fn routes_are_normalised_and_checked() {
        let c = parse(
            "[[routes]]\npath_prefix = \"/login/\"\nauth = \"none\"\n[[routes]]\npath_prefix = \"/\"\n",
        )
        .unwrap();
        assert_eq!(c.routes[0].path_prefix, "/login");
        assert_eq!(c.routes[0].auth, AuthMode::None);
        assert_eq!(c.routes[1].path_prefix, "");
        assert_eq!(c.routes[1].auth, AuthMode::Session);

        let err = parse("[[routes]]\npath_prefix = \"/a/../b\"\n[[routes]]\npath_prefix = \"/x\"\nauth = \"open\"\n[[routes]]\npath_prefix = \"/a\\\\b\"\n")
            .unwrap_err();
        let keys: Vec<&str> = err.0.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "routes[0].path_prefix",
                "routes[1].auth",
                "routes[2].path_prefix"
            ]
        );
    }

    #[test]
    fn cors_is_off_until_an_origin_is_allowed_and_origins_are_kept_as_browsers_send_them() {
        assert!(parse("").unwrap().cors.is_none());
        let c = parse(
            "[cors]\nallowed_origins = [\"HTTPS://Play.Example.com:443/\", \"http://localhost:5173\"]\n",
        )
        .unwrap();
        let cors = c.cors.unwrap();
        assert_eq!(
            cors.origins.unwrap(),
            ["https://play.example.com", "http://localhost:5173"]
        );
        assert_eq!(
            cors.headers,
            "authorization, content-type, x-request-id, x-session-id"
        );
        assert_eq!(cors.max_age, "600");
        let env = parse_env("", &[("PORTCULLIS_CORS_ALLOWED_ORIGINS", "*")]).unwrap();
        assert!(env.cors.unwrap().origins.is_none(), "* allows any origin");
    }

    #[test]
    fn cors_errors_name_the_key() {
        for (toml, key, says) in [
            (
                "allowed_origins = [\"play.example.com\"]",
                "cors.allowed_origins",
                "not an origin",
            ),
            (
                "allowed_origins = [\"https://a.example/path\"]",
                "cors.allowed_origins",
                "no path",
            ),
            (
                "allowed_origins = [\"ftp://a.example\"]",
                "cors.allowed_origins",
                "http or https",
            ),
            (
                "allowed_origins = [\"https://*.a.example\"]",
                "cors.allowed_origins",
                "wildcard",
            ),
            (
                "allowed_origins = [\"https://a.example:0\"]",
                "cors.allowed_origins",
                "not an origin",
            ),
            (
                "allowed_origins = [\"https://a.example:99999\"]",
                "cors.allowed_origins",
                "not an origin",
            ),
            (
                "allowed_origins = [\"https://a,b\"]",
                "cors.allowed_origins",
                "not an origin",
            ),
            (
                "allowed_origins = [\"*\", \"https://a.example\"]",
                "cors.allowed_origins",
                "stands alone",
            ),
            (
                "allowed_origins = [\"*\"]\nallow_credentials = true",
                "cors.allowed_origins",
                "cookies",
            ),
            (
                "allowed_origins = [\"https://a.example\"]\nmax_age = \"2d\"",
                "cors.max_age",
                "24h",
            ),
            (
                "allowed_origins = [\"https://a.example\"]\nallowed_methods = [\"G ET\"]",
                "cors.allowed_methods",
                "not a method",
            ),
            (
                "allowed_origins = [\"https://a.example\"]\nallowed_headers = [\"x y\"]",
                "cors.allowed_headers",
                "header name",
            ),
        ] {
            let err = parse(&format!("[cors]\n{toml}\n")).unwrap_err();
            assert_eq!(err.0[0].key, key, "{toml}: {err}");
            assert!(err.0[0].reason.contains(says), "{toml}: {err}");
        }
    }

    #[test]
    fn route_prefixes_must_be_canonical_paths() {
        for good in ["/a%20b", "/a|b", "/[x]^", "/café", "/{json}"] {
            let c = parse(&format!(
                "[[routes]]\npath_prefix = \"{good}\"\nauth = \"none\"\n"
            ))
            .unwrap();
            assert_eq!(c.routes[0].path_prefix, good);
            // What browsers send escaped is matched apart from it: said at start.
            let warned = c.warnings.iter().any(|w| w.contains("browsers send as"));
            assert_eq!(
                warned,
                good.contains(['\u{e9}', '{']),
                "{good}: {:?}",
                c.warnings
            );
        }
        let c = parse("[[routes]]\npath_prefix = \"/caf\u{e9}\"\nauth = \"none\"\n").unwrap();
        assert!(c.warnings[0].contains("as %C3%A9"), "{:?}", c.warnings);
        for (bad, says) in [
            ("/%7Euser", "\"/~user\""),
            ("/a%2Fb", "encoded slash"),
            ("/a%zz", "malformed"),
            (
                "/a b",
                "holds ' ', which no request's path holds as it is (a client sends it as %20)",
            ),
            ("/x?y", "as %3F"),
            ("/x#y", "as %23"),
            ("/a<b", "as %3C"),
            ("/a\tb", "as %09"),
            ("/a\u{85}b", "as %C2%85"),
        ] {
            let err = parse(&format!(
                "[[routes]]\npath_prefix = \"{bad}\"\nauth = \"none\"\n"
            ))
            .unwrap_err();
            assert_eq!(err.0[0].key, "routes[0].path_prefix", "{bad}");
            assert!(err.0[0].reason.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn api_prefix_must_be_a_normalised_path_that_can_match() {
        assert_eq!(parse("").unwrap().session.api_prefix, "/api/v1/sessions");
        let c = parse("[session]\napi_prefix = \"/api/v2/sessions/\"\n").unwrap();
        assert_eq!(c.session.api_prefix, "/api/v2/sessions");
        // No route can have the escaped spelling of the API's own prefix: no advice to add one.
        let c = parse("[session]\napi_prefix = \"/api/{v2}\"\n").unwrap();
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        for (bad, why) in [
            ("/api//v1/sessions", "normalised"),
            ("/api/./sessions", "normalised"),
            ("/api/../sessions", "normalised"),
            ("/api\\\\sessions", "normalised"),
            ("/api/v1%2Fsessions", "encoded slash"),
            ("/api/%73essions", "\"/api/sessions\""),
            ("/api/a%20b", "% escapes"),
            ("/s p", "could never match"),
            ("/x?y", "could never match"),
            ("api/v1/sessions", "start with /"),
            ("", "start with /"),
            ("/", "not be / itself"),
            ("//", "not be / itself"),
        ] {
            let err = parse(&format!("[session]\napi_prefix = \"{bad}\"\n")).unwrap_err();
            assert_eq!(err.0.len(), 1, "{bad:?}: {err}");
            assert_eq!(err.0[0].key, "session.api_prefix", "{bad:?}");
            assert!(err.0[0].reason.contains(why), "{bad:?}: {err}");
        }
    }

    #[test]
    fn a_route_on_the_session_api_paths_is_refused() {
        for dead in [
            "/api/v1/sessions",
            "/api/v1/sessions/",
            "/api/v1/sessions/x",
        ] {
            let err = parse(&format!(
                "[[routes]]\npath_prefix = \"{dead}\"\nauth = \"none\"\n"
            ))
            .unwrap_err();
            assert_eq!(err.0.len(), 1, "{dead}: {err}");
            assert_eq!(err.0[0].key, "routes[0].path_prefix");
            assert!(err.0[0].reason.contains("session.api_prefix"), "{err}");
        }
        let err = parse(
            "[session]\napi_prefix = \"/sessions\"\n[[routes]]\npath_prefix = \"/sessions/x\"\n",
        )
        .unwrap_err();
        assert_eq!(err.0[0].key, "routes[0].path_prefix");
        // Above it, beside it, or the root: the route applies to the paths the API leaves.
        let c = parse(
            "[[routes]]\npath_prefix = \"/api\"\n[[routes]]\npath_prefix = \"/api/v1/sessionsx\"\n[[routes]]\npath_prefix = \"/\"\n",
        )
        .unwrap();
        assert_eq!(c.routes.len(), 3);
    }

    #[test]
    fn rate_limits_default_to_the_session_api_only() {
        let c = parse("").unwrap();
        assert!(c.rate_limit.proxy.is_none());
        assert!(c.rate_limit.anonymous.is_none());
        let api = c.rate_limit.sessions_api.unwrap();
        assert_eq!(api.requests.get(), 100);
        assert_eq!(api.burst.get(), 100);
        assert_eq!(api.per, Duration::from_secs(900));
    }

    #[test]
    fn quotas_parse_with_burst_and_zero_turns_a_limit_off() {
        let c = parse(
            "[rate_limit.proxy]\nrequests = 10\nper = \"1s\"\nburst = 20\n[rate_limit.sessions_api]\nrequests = 0\nper = \"1m\"\n[[routes]]\npath_prefix = \"/login\"\nauth = \"none\"\nrate_limit = { requests = 5, per = \"1m\" }\n",
        )
        .unwrap();
        let proxy = c.rate_limit.proxy.unwrap();
        assert_eq!((proxy.requests.get(), proxy.burst.get()), (10, 20));
        assert!(c.rate_limit.sessions_api.is_none());
        assert!(matches!(c.routes[0].rate_limit, RouteLimit::Own(q) if q.requests.get() == 5));
        let err = parse("[rate_limit.anonymous]\nrequests = 5\nper = \"0s\"\n").unwrap_err();
        assert_eq!(err.0[0].key, "rate_limit.anonymous.per");
    }

    /// Every timeout and interval has a ceiling: far beyond any use, a clock reading moved by
    /// it overflows, and the task that moved it (a connection, the pool, the eviction) ends.
    #[test]
    fn timeouts_and_intervals_are_at_most_a_century() {
        for (section, key) in [
            ("server", "header_read_timeout"),
            ("server", "idle_timeout"),
            ("server", "shutdown_grace"),
            ("server", "shutdown_delay"),
            ("upstream", "request_timeout"),
            ("upstream", "connect_timeout"),
            ("upstream", "pool_idle_timeout"),
            ("redis", "command_timeout"),
            ("redis", "connect_timeout"),
            ("rate_limit", "gc_interval"),
            ("metrics", "active_sessions_interval"),
            ("rate_limit.proxy", "per"),
        ] {
            let requests = if key == "per" { "requests = 1\n" } else { "" };
            let at = |span: &str| parse(&format!("[{section}]\n{requests}{key} = \"{span}\"\n"));
            let err = at("500000000000y").unwrap_err();
            assert_eq!(err.0[0].key, format!("{section}.{key}"), "{err}");
            assert!(err.to_string().contains("at most 100 years"), "{err}");
            assert!(at("100y").is_ok(), "{section}.{key} = 100y");
        }
    }

    #[test]
    fn a_quota_whose_burst_would_span_more_than_the_limiter_counts_is_refused() {
        let quota = |per: &str, burst: &str| {
            parse(&format!(
                "[rate_limit.proxy]\nrequests = 1\nper = \"{per}\"\n{burst}"
            ))
        };
        let err = quota("100y", "burst = 6\n").unwrap_err();
        assert_eq!(err.0[0].key, "rate_limit.proxy.burst");
        assert!(err.0[0].reason.contains("584 years"), "{}", err.0[0].reason);
        let err = quota("30d", "burst = 10000\n").unwrap_err();
        assert_eq!(err.0[0].key, "rate_limit.proxy.burst");
        let err = quota("600y", "burst = 1\n").unwrap_err();
        assert_eq!(err.0[0].key, "rate_limit.proxy.per");
        let c = quota("30d", "burst = 100\n").unwrap();
        assert_eq!(c.rate_limit.proxy.unwrap().burst.get(), 100);
        assert!(quota("100y", "burst = 5\n").is_ok());
    }

    #[test]
    fn a_toml_error_names_the_line_it_is_on_by_its_key_not_its_value() {
        for (toml, says) in [
            (
                "[server]\nlisten = \"a\"\nlisten = \"b\"\n",
                "at line 3 (`listen`), column 1",
            ),
            ("[server]\n[server]\n", "at line 2 (`[server]`)"),
            (
                "[server]\nmax_body_bytes = 18446744073709551615\n",
                "at line 2 (`max_body_bytes`)",
            ),
        ] {
            let err = parse(toml).unwrap_err();
            assert_eq!(err.0[0].key, "(file)", "{toml}: {err}");
            assert!(err.0[0].reason.contains(says), "{toml}: {err}");
        }
        let err = parse("[jwt]\nsecret = \"first-secret-text\"\nsecret = \"hush\"\n").unwrap_err();
        assert!(err.0[0].reason.contains("(`secret`)"), "{err}");
        assert!(!err.to_string().contains("hush"), "{err}");
        // Inside a multi-line string or array, a line is the value; a line whose `=` went
        // missing, or that is not a known key or section, may hold one: nothing of it is shown.
        for toml in [
            "[jwt]\nsecret = \"\"\"\nhush-hush=1\\qx\n\"\"\"\n",
            "[server]\ntrusted_proxies = [\n\"hush\" \"x\",\n]\n",
            "[jwt]\nsecret \"aHVzaA==\"\n",
            "[jwt]\nsecret: \"hush=hush\"\n",
            "[jwt]\nsecret = \"a\"\n  hush-second-half==\n",
            "[jwt] secret = \"hush\"\n",
            "[jwt]\nsecret \"hush.secret = 1\"\n",
        ] {
            let err = parse(toml).unwrap_err();
            assert!(err.0[0].reason.contains("at line"), "{err}");
            assert!(!err.to_string().contains("hush"), "{toml}: {err}");
        }
    }

    #[test]
    fn every_section_must_be_a_table_and_routes_an_array_of_them() {
        for (toml, key, says) in [
            (
                "server = [\"127.0.0.1:1\"]\n",
                "server",
                "must be a table ([server]), not an array",
            ),
            (
                "[[upstream]]\nurl = \"http://a:1\"\n",
                "upstream",
                "not an array",
            ),
            (
                "[server]\ntls = \"yes\"\n",
                "server.tls",
                "([server.tls]), not a string",
            ),
            ("session = []\n", "session", "not an array"),
            (
                "[rate_limit]\nproxy = 5\n",
                "rate_limit.proxy",
                "{ requests = ..., per = \"...\" }), not an integer",
            ),
            ("routes = \"x\"\n", "routes", "array of tables"),
            ("routes = [1]\n", "routes[0]", "not an integer"),
            (
                "[[routes]]\npath_prefix = \"/a\"\nrate_limit = [1, \"1s\"]\n",
                "routes[0].rate_limit",
                "not an array",
            ),
        ] {
            let err = parse(toml).unwrap_err();
            assert_eq!(err.0[0].key, key, "{toml}: {err}");
            assert!(err.0[0].reason.contains(says), "{toml}: {err}");
        }
    }

    #[test]
    fn upstream_url_with_path_is_refused() {
        let err = parse("[upstream]\nurl = \"http://game:8080/api\"\n").unwrap_err();
        assert_eq!(err.0[0].key, "upstream.url");
    }

    #[test]
    fn upstream_url_and_host_with_a_bad_port_credentials_or_a_fragment_are_refused() {
        for (url, says) in [
            ("http://127.0.0.1:99999", "port"),
            ("http://game:0", "port"),
            ("http://game:", "port"),
            ("http://user:pw@game:8080", "user info"),
            ("http://game:8080#frag", "fragment"),
            ("http://:8080", "must name a host"),
            ("http://a,b:8080", "must name a host"),
            ("http://127.1:8080", "must name a host"),
            ("http://[fe80::1%25eth0]:8080", "must name a host"),
        ] {
            let err = parse(&format!("[upstream]\nurl = \"{url}\"\n")).unwrap_err();
            assert_eq!(err.0[0].key, "upstream.url", "{url}");
            assert!(err.0[0].reason.contains(says), "{url}: {err}");
            assert!(!err.to_string().contains("pw"), "{err}");
        }
        for url in [
            "http://game:8080",
            "https://[::1]:8443/",
            "http://[::1]",
            "http://game",
            "http://game_server.ns.svc:8080",
            "http://127.0.0.1:8080",
        ] {
            assert!(
                parse(&format!("[upstream]\nurl = \"{url}\"\n")).is_ok(),
                "{url}"
            );
        }
        for host in [
            "a:99999",
            "a:",
            "a:0",
            "user@game",
            "a,b",
            "a;b",
            "a!b",
            "a$b",
            "a&b",
            "127.1",
            "0x7f.0.0.1",
            "[fe80::1%25eth0]",
            "a b",
        ] {
            let err = parse(&format!("[upstream]\nhost = \"{host}\"\n")).unwrap_err();
            assert_eq!(err.0[0].key, "upstream.host", "{host}");
        }
        for host in [
            "game.example:8443",
            "game.example",
            "10.0.0.1",
            "[::1]:80",
            "a_b",
        ] {
            assert!(
                parse(&format!("[upstream]\nhost = \"{host}\"\n")).is_ok(),
                "{host}"
            );
        }
    }

    #[test]
    fn upstream_connections_default_to_the_client_connection_limit() {
        assert_eq!(parse("").unwrap().upstream.max_connections, 25_000);
        let c = parse("[server]\nmax_connections = 100\n").unwrap();
        assert_eq!(c.upstream.max_connections, 100);
        let c =
            parse("[server]\nmax_connections = 100\n[upstream]\nmax_connections = 7\n").unwrap();
        assert_eq!(c.upstream.max_connections, 7);
        for key in ["server", "upstream"] {
            let err = parse(&format!("[{key}]\nmax_connections = 10000001\n")).unwrap_err();
            assert_eq!(err.0[0].key, format!("{key}.max_connections"));
        }
    }

    #[test]
    fn max_header_bytes_has_a_ceiling() {
        let err = parse("[server]\nmax_header_bytes = 9223372036854775807\n").unwrap_err();
        assert_eq!(err.0[0].key, "server.max_header_bytes");
        assert!(parse("[server]\nmax_header_bytes = 1048576\n").is_ok());
    }

    #[test]
    fn the_admin_listener_may_not_take_the_public_port_through_a_wildcard() {
        for (public, admin) in [
            ("0.0.0.0:47003", "127.0.0.1:47003"),
            ("127.0.0.1:47003", "0.0.0.0:47003"),
            ("[::]:47003", "0.0.0.0:47003"),
            ("[::1]:47003", "[::]:47003"),
            ("127.0.0.1:47003", "127.0.0.1:47003"),
            ("[::ffff:127.0.0.1]:47003", "127.0.0.1:47003"),
            ("0.0.0.0:47003", "[::ffff:127.0.0.1]:47003"),
        ] {
            let text = format!("[server]\nlisten = \"{public}\"\n[admin]\nlisten = \"{admin}\"\n");
            let err = parse(&text).unwrap_err();
            assert_eq!(err.0[0].key, "admin.listen", "{public} {admin}");
        }
        for (public, admin) in [
            ("127.0.0.1:47003", "[::1]:47003"),
            ("0.0.0.0:47003", "[::1]:47003"),
            ("0.0.0.0:47003", "0.0.0.0:47004"),
            ("127.0.0.1:0", "127.0.0.1:0"),
        ] {
            let text = format!("[server]\nlisten = \"{public}\"\n[admin]\nlisten = \"{admin}\"\n");
            assert!(parse(&text).is_ok(), "{public} {admin}");
        }
    }

    #[test]
    fn tls_paths_resolve_against_the_config_directory() {
        let c = parse("[server.tls]\ncert = \"c.pem\"\nkey = \"/abs/k.pem\"\n").unwrap();
        let tls = c.server.tls.unwrap();
        assert_eq!(tls.cert, Path::new("/etc/portcullis/c.pem"));
        assert_eq!(tls.key, Path::new("/abs/k.pem"));
    }

    #[test]
    fn env_overrides_the_file() {
        let c = parse_env(
            "[upstream]\nurl = \"http://a:1\"\n",
            &[
                ("PORTCULLIS_UPSTREAM_URL", "http://b:2"),
                (
                    "PORTCULLIS_SERVER_TRUSTED_PROXIES",
                    "10.0.0.0/8, 192.168.1.1",
                ),
                ("PORTCULLIS_SERVER_MAX_BODY_BYTES", "42"),
            ],
        )
        .unwrap();
        assert_eq!(c.upstream.authority.as_str(), "b:2");
        assert_eq!(c.server.trusted_proxies.len(), 2);
        assert_eq!(c.server.max_body_bytes, 42);
    }

    #[test]
    fn bad_env_value_names_key_and_variable() {
        let err = parse_env("", &[("PORTCULLIS_SERVER_MAX_BODY_BYTES", "lots")]).unwrap_err();
        assert_eq!(err.0[0].key, "server.max_body_bytes");
        assert!(err.0[0].reason.contains("PORTCULLIS_SERVER_MAX_BODY_BYTES"));
    }

    #[test]
    fn a_log_filter_in_the_environment_that_does_not_parse_is_refused() {
        // A misspelt level would parse as a target's name, and silence every line.
        for bad in [
            "debug,=[[",
            "warning",
            "info,verbose",
            "portcullis=loud",
            " , ",
        ] {
            let err = parse_env("", &[("PORTCULLIS_LOG", bad)]).unwrap_err();
            assert_eq!(err.0.len(), 1, "{err}");
            assert_eq!(err.0[0].key, "log.level", "{bad}");
            assert!(err.0[0].reason.contains("PORTCULLIS_LOG"), "{err}");
        }
        let err = parse_env("", &[("PORTCULLIS_LOG", "warning")]).unwrap_err();
        assert!(
            err.0[0].reason.contains("\"warning\" is not a level"),
            "{err}"
        );
        // Empty, it is ignored, as the binary ignores it.
        for good in [
            "portcullis=debug,info",
            "WARN",
            "off",
            "warn,audit=info,",
            "",
            "  ",
            "info ",
        ] {
            assert!(
                parse_env("", &[("PORTCULLIS_LOG", good)]).is_ok(),
                "{good:?}"
            );
        }
        for bad in ["", "warning", "verbose"] {
            let err = parse(&format!("[log]\nlevel = {bad:?}\n")).unwrap_err();
            assert_eq!(err.0[0].key, "log.level", "{bad:?}");
        }
        // Spaces around a directive are not part of it (tracing would take "info " for a
        // target's name, and log nothing).
        let filter = log_filter(" warn , portcullis=debug ").unwrap().to_string();
        assert!(
            filter.contains("portcullis=debug") && filter.contains("warn"),
            "{filter}"
        );
        assert!(!filter.contains(' '), "{filter}");
    }

    #[test]
    fn a_redis_address_that_can_never_connect_is_refused() {
        for (url, says) in [
            ("http://h:6379", "not a redis://"),
            ("redis://h:0", "port 0"),
            ("redis://127.0.0.1:6379/-1", "database"),
            ("redis://127.0.0.1:6379/99999999999", "database"),
        ] {
            let err = parse(&format!("[redis]\nurl = \"{url}\"\n")).unwrap_err();
            assert_eq!(err.0[0].key, "redis.url", "{url}: {err}");
            assert!(err.0[0].reason.contains(says), "{url}: {err}");
        }
        for url in [
            "redis://h:6379/15",
            "REDIS://h",
            "rediss://h:6380/0",
            "valkey://h:6379",
            "unix:///run/redis/redis.sock",
            "redis+unix:///run/redis/redis.sock?db=2",
        ] {
            assert!(
                parse(&format!("[redis]\nurl = \"{url}\"\n")).is_ok(),
                "{url}"
            );
        }
        for host in ["x@127.0.0.1", "a b", "127.0.0.1/5", "[::1", "h:6379"] {
            let err = parse_env("", &[("REDIS_HOST", host)]).unwrap_err();
            assert_eq!(err.0[0].key, "REDIS_HOST", "{host}: {err}");
        }
        for host in ["redis", "redis.game.svc.cluster.local", "10.0.0.5", "::1"] {
            assert!(parse_env("", &[("REDIS_HOST", host)]).is_ok(), "{host}");
        }
        let c = parse_env(
            "[redis]\nurl = \"unix:///run/redis.sock\"\n",
            &[("REDIS_HOST", "redis")],
        )
        .unwrap();
        assert!(c.warnings[0].contains("Unix socket"), "{:?}", c.warnings);
        let err = parse_env("", &[("REDIS_PORT", "0")]).unwrap_err();
        assert_eq!(err.0[0].key, "REDIS_PORT", "{err}");
        let err = parse("[redis]\nkey_prefix = \"a\\tb\"\n").unwrap_err();
        assert_eq!(err.0[0].key, "redis.key_prefix", "{err}");
    }

    #[test]
    fn ignored_variables_are_reported_as_warnings() {
        let c = parse_env(
            "",
            &[
                ("PORTCULLIS_SERVER_LISTN", "0.0.0.0:1"),
                ("PORTCULLIS_LOG", "debug"),
                ("REDIS_PORT", "tcp://10.0.0.5:6379"),
                ("PORTCULLIS_SERVICE_HOST", "10.0.0.7"),
            ],
        )
        .unwrap();
        assert_eq!(c.warnings.len(), 2, "{:?}", c.warnings);
        assert!(c.warnings[0].contains("PORTCULLIS_SERVER_LISTN"));
        assert!(c.warnings[1].contains("REDIS_PORT"));
    }

    #[test]
    fn kubernetes_service_links_do_not_override_anything() {
        let c = parse_env(
            "",
            &[
                ("PORTCULLIS_PORT", "tcp://10.0.0.7:8443"),
                ("PORTCULLIS_SERVICE_HOST", "10.0.0.7"),
                ("PORTCULLIS_SERVICE_PORT", "8443"),
                ("PORTCULLIS_PORT_8443_TCP", "tcp://10.0.0.7:8443"),
                ("PORTCULLIS_PORT_8443_TCP_ADDR", "10.0.0.7"),
                ("PORTCULLIS_PORT_8443_TCP_PORT", "8443"),
                ("PORTCULLIS_PORT_8443_TCP_PROTO", "tcp"),
                ("PORTCULLIS_UPSTREAM_PORT", "tcp://10.0.0.8:80"),
                ("PORTCULLIS_UPSTREAM_SERVICE_HOST", "10.0.0.8"),
            ],
        )
        .unwrap();
        assert_eq!(c.server.listen, "0.0.0.0:8443".parse().unwrap());
        assert_eq!(c.upstream.authority.as_str(), "127.0.0.1:8080");
    }
}
