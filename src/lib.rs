//! portcullis: a session-enforcing reverse proxy for game backends.
//!
//! A request reads top to bottom through the modules: [`server`] accepts it (TLS from [`tls`],
//! the connection's [`peer`]), [`app`] holds the tower stack in order: [`access_log`], then
//! [`limits`] on size, and finally [`forward`] sends it upstream and streams the answer back.
//! [`error`] is the one place failures become responses; [`config`] is read and validated once
//! at start; [`admin`] serves health on its own port; [`echo`] is a demo upstream.

#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod app;
pub mod config;
pub mod echo;
pub mod error;
pub mod forward;
pub mod limits;
pub mod peer;
pub mod server;
pub mod tls;

/// Errors that only need to be reported.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every request and response inside the stack.
pub type Body = http_body_util::combinators::BoxBody<bytes::Bytes, BoxError>;
