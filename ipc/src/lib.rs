//! The wire shared by every aziot service and client.
//!
//! - [`server`]: HTTP/1.1 over a unix-socket listener (tokio + hyper), caller identity from
//!   `SO_PEERCRED`, per-uid throttling, the request pipeline of spec common-http §5.
//! - [`listener`]: socket activation (`LISTEN_FDS`) or a self-bound socket.
//! - [`client`]: async and blocking clients over unix sockets, with keep-alive.
//! - [`config`]: `config.toml` + `config.d/*.toml` merge, unknown-key warnings.
//! - [`principal`]: `[[principal]]` globs.
//! - [`logging`]: the log format of spec common-http §8, on `tracing`.
//! - [`service`]: what a service does for the broker and the worker entry ([`service::ServiceImpl`]).

pub mod client;
pub mod config;
pub mod endpoint;
pub mod handoff;
pub mod listener;
pub mod logging;
pub mod principal;
pub mod server;
pub mod service;

pub use server::{ApiError, Request, Response};

/// Directory of every service socket (`SOCKET_DIR`).
pub const SOCKET_DIR: &str = "/run/aziot";
