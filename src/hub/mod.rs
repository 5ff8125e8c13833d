//! The hub: a server hosting replicas that offline-first clients sync with over HTTP,
//! and the client provider that reaches them.
//!
//! Invariants:
//! - A hosted replica is an ordinary [`Replica`](crate::Replica): the same providers,
//!   applier, knowledge and policies as a local sync. The client's
//!   [`RemoteReplica`] implements the provider traits, so the orchestrator cannot
//!   tell a hub from a folder.
//! - A hosted replica takes part in at most one session; a second client gets 409 at
//!   once, never a wait. A session idle past `session_timeout_secs` is ended without
//!   completing: every batch committed before stays (it is in the replica's
//!   knowledge, so the client's next session resumes after it) and nothing else.
//! - Every request carries a bearer token. No token or an unknown one: 401; a token
//!   without the right to the replica, or presenting a replica id it is not bound to,
//!   or teaching the hub versions of a replica it does not sync as: 403. None of them
//!   changes anything, and no token value is ever logged or shown.
//! - Bodies are read within `max_body_bytes` and decoded by [`protocol`] with the
//!   engine's bounded decoders; a malformed body is a 400 that changes nothing.
//! - Shutdown lets in-flight requests finish (each batch is one commit: applied whole
//!   or not at all), rolls back open sessions and flushes every replica.

mod client;
mod config;
mod metrics;
pub mod protocol;
mod server;
mod status;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use thiserror::Error;

pub use crate::metadata::postgres::Leases;
pub use client::{is_hub_url, RemoteReplica};
pub use config::{check_replica_name, HubConfig, Storage, TokenGrant, UploadConflicts};

use crate::stores::StoreError;
use crate::sync::{Clock, SystemClock};

/// Errors of starting, running or reaching a hub.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum HubError {
    #[error("{}: {source}", path.display())]
    ConfigRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}{}{message}", path.display(), if key.is_empty() { ": ".to_string() } else { format!(": `{key}`: ") })]
    Config {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("data folder {}: {source}", path.display())]
    DataFolder {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("hub storage: {message}")]
    Storage { message: String },
    #[error("hosted replica {name}: {source}")]
    Replica { name: String, source: StoreError },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("serving: {0}")]
    Serve(std::io::Error),
    #[error("{url} is not a hosted replica's URL; expected http://HOST:PORT/replicas/NAME")]
    BadUrl { url: String },
    #[error("{url}: {message}")]
    Client { url: String, message: String },
}

/// A hub serving on a thread of its own (tests, the CLI).
pub struct RunningHub {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), HubError>>>,
}

impl RunningHub {
    /// Opens (or creates) every hosted replica, binds the listen address and serves on
    /// a new thread. Errors in opening or binding are returned here, before anything
    /// is served.
    pub fn start(config: HubConfig) -> Result<Self, HubError> {
        Self::start_with_clock(config, Arc::new(SystemClock))
    }

    /// As [`start`](Self::start), with every hosted replica stamping its changes by
    /// `clock` instead of the system clock, so a test can replay a scenario under the
    /// manual clock its local replicas use (last-writer-wins timestamps, tombstone ages).
    pub fn start_with_clock(config: HubConfig, clock: Arc<dyn Clock>) -> Result<Self, HubError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("knit-hub")
            .build()
            .map_err(HubError::Serve)?;
        let addr = config.listen;
        let state = server::HubState::open(config)?;
        for hosted in state.replicas.values() {
            hosted.lock().replica.set_clock(Arc::clone(&clock));
        }
        let state = Arc::new(state);
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(addr))
            .map_err(|source| HubError::Bind { addr, source })?;
        let bound = listener.local_addr().map_err(HubError::Serve)?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("knit-hub".into())
            .spawn(move || {
                runtime.block_on(server::serve(state, listener, async move {
                    let _ = rx.await;
                }))
            })
            .map_err(HubError::Serve)?;
        Ok(Self {
            addr: bound,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    /// The address actually bound (a config may ask for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL of hosted replica `name`.
    pub fn replica_url(&self, name: &str) -> String {
        format!("http://{}/replicas/{name}", self.addr)
    }

    /// Stops accepting, lets in-flight requests finish, rolls back open sessions,
    /// flushes, and waits for all of it.
    pub fn shutdown(mut self) -> Result<(), HubError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), HubError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.thread.take() {
            Some(thread) => thread.join().unwrap_or_else(|_| {
                Err(HubError::Serve(std::io::Error::other(
                    "the hub thread panicked",
                )))
            }),
            None => Ok(()),
        }
    }
}

impl Drop for RunningHub {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
