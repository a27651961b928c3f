//! [`ServerHandle`]: how other threads control a running server, and the
//! state they share with it (the waker, control requests, the registry of
//! open connections).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use coroipc_transport::eventfd::EventFd;

use super::RawId;
use crate::connection::{Connection, ConnectionId};
use crate::stats::Stats;

#[derive(Default)]
pub(super) struct ControlRequests {
    pub(super) shutdown_services: Vec<u16>,
    pub(super) pause_services: Vec<(u16, bool)>,
}

/// State shared with [`ServerHandle`]s and connections.
pub(super) struct Shared {
    pub(super) waker: Arc<EventFd>,
    pub(super) shutdown: AtomicBool,
    pub(super) control: Mutex<ControlRequests>,
    pub(super) registry: Mutex<HashMap<RawId, Connection>>,
    /// Counters of connections that are gone.
    pub(super) closed_stats: Mutex<Stats>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Controls a running server from any thread. Cheap to clone.
#[derive(Clone)]
pub struct ServerHandle {
    pub(super) shared: Arc<Shared>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle").finish_non_exhaustive()
    }
}

impl ServerHandle {
    /// Shuts the whole server down: every connection is closed (waking its
    /// client), disconnect callbacks run, and [`Server::run`](super::Server::run) returns.
    #[doc(alias = "coroipcs_ipc_exit")]
    pub fn shutdown(&self) {
        self.shared.shutdown.store(true, Ordering::Release);
        self.shared.waker.signal();
    }

    /// Shuts one service down: its connections are closed and new clients
    /// of it are refused with "no such service".
    #[doc(alias = "coroipcs_ipc_service_exit")]
    pub fn shutdown_service(&self, service: u16) {
        lock(&self.shared.control).shutdown_services.push(service);
        self.shared.waker.signal();
    }

    /// Pauses (or resumes) reading requests on every connection of
    /// `service` (request-side flow control).
    pub fn pause_service(&self, service: u16, paused: bool) {
        lock(&self.shared.control).pause_services.push((service, paused));
        self.shared.waker.signal();
    }

    /// The open connections.
    pub fn connections(&self) -> Vec<Connection> {
        let mut v: Vec<Connection> = lock(&self.shared.registry).values().cloned().collect();
        v.sort_by_key(Connection::id);
        v
    }

    /// The connection with `id`, if open.
    pub fn connection(&self, id: ConnectionId) -> Option<Connection> {
        lock(&self.shared.registry).get(&id.get()).cloned()
    }

    /// Server-wide counters: every connection, open or gone.
    pub fn stats(&self) -> Stats {
        // Both under the registry lock: see `Server::finish_close`.
        let registry = lock(&self.shared.registry);
        let mut all: Vec<Stats> = registry.values().map(Connection::stats).collect();
        all.push(*lock(&self.shared.closed_stats));
        drop(registry);
        Stats::sum(all.iter())
    }
}
