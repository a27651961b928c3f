//! The workloads (benches/README.md) and their parameters.

use std::fmt;

/// One workload (benches/README.md, "The workloads").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Workload {
    /// Request 64 B, response 64 B, one in flight, the library's default waiting.
    Rr64,
    /// `rr64` with spinning disabled: every wait sleeps in the kernel.
    Rr64Sleep,
    /// `rr64` with both sides busy-polling.
    Rr64Spin,
    /// `rr64` with 32 requests in flight.
    Rr64Pipe,
    /// `rr64` from an async client: one task calling in turn, on a
    /// two-worker multi-thread tokio runtime.
    Rr64Async,
    /// 2,000,000 dispatch messages of 64 B, server → client.
    Ev64,
    /// 500,000 dispatch messages of 4096 B.
    Ev4k,
    /// Request 1 MiB, response 64 B.
    Rr1m,
    /// Connect, one rr64, disconnect.
    Connect,
    /// 16 clients doing rr64 against one server.
    Fanin,
}

/// Every workload, in table order.
pub const ALL: [Workload; 10] = [
    Workload::Rr64,
    Workload::Rr64Sleep,
    Workload::Rr64Spin,
    Workload::Rr64Pipe,
    Workload::Rr64Async,
    Workload::Ev64,
    Workload::Ev4k,
    Workload::Rr1m,
    Workload::Connect,
    Workload::Fanin,
];

/// The transports compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// coroipc-rs: shared-memory rings.
    Coroipc,
    /// The same protocol over Unix domain stream sockets.
    Uds,
    /// The machine's physical limits.
    Floor,
}

/// Every transport, in table order.
pub const TRANSPORTS: [Transport; 3] = [Transport::Coroipc, Transport::Uds, Transport::Floor];

impl Workload {
    /// The name used on the command line and in output.
    pub fn name(self) -> &'static str {
        match self {
            Self::Rr64 => "rr64",
            Self::Rr64Sleep => "rr64-sleep",
            Self::Rr64Spin => "rr64-spin",
            Self::Rr64Pipe => "rr64-pipe",
            Self::Rr64Async => "rr64-async",
            Self::Ev64 => "ev64",
            Self::Ev4k => "ev4k",
            Self::Rr1m => "rr1m",
            Self::Connect => "connect",
            Self::Fanin => "fanin",
        }
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Option<Self> {
        ALL.into_iter().find(|w| w.name() == s)
    }

    /// Message size (whole message including our 16-byte header).
    pub fn default_size(self) -> usize {
        match self {
            Self::Ev4k => 4096,
            Self::Rr1m => 1 << 20,
            _ => 64,
        }
    }

    /// Operations per run (per client for `fanin`); `quick` for `--quick`.
    pub fn default_count(self, quick: bool) -> u64 {
        let (full, q) = match self {
            Self::Rr64 | Self::Rr64Sleep | Self::Rr64Spin | Self::Rr64Async => (200_000, 20_000),
            Self::Rr64Pipe => (1_000_000, 100_000),
            Self::Ev64 => (2_000_000, 200_000),
            Self::Ev4k => (500_000, 50_000),
            Self::Rr1m => (2_000, 300),
            Self::Connect => (3_000, 300),
            Self::Fanin => (20_000, 2_000),
        };
        if quick {
            q
        } else {
            full
        }
    }

    /// Clients in flight at once.
    pub fn clients(self) -> usize {
        if self == Self::Fanin {
            16
        } else {
            1
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Transport {
    /// The name used on the command line and in output.
    pub fn name(self) -> &'static str {
        match self {
            Self::Coroipc => "coroipc",
            Self::Uds => "uds",
            Self::Floor => "floor",
        }
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Option<Self> {
        TRANSPORTS.into_iter().find(|t| t.name() == s)
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Parameters of one run.
#[derive(Clone, Copy, Debug)]
pub struct Params {
    /// The workload.
    pub workload: Workload,
    /// Operations (per client).
    pub count: u64,
    /// Message size, header included.
    pub size: usize,
    /// Client processes in flight at once ([`Workload::clients`] unless
    /// the scale sweep or `--clients` says otherwise).
    pub clients: usize,
    /// Idle connections held open on the server during the run (the scale
    /// sweep; 0 otherwise).
    pub idle: usize,
    /// The CPU every process of the run is pinned to, if any.
    pub cpu: Option<usize>,
}

impl Params {
    /// `workload` with its default count (`quick` for `--quick`), size and
    /// clients, nothing idle, unpinned.
    pub fn new(workload: Workload, quick: bool) -> Self {
        Self {
            workload,
            count: workload.default_count(quick),
            size: workload.default_size(),
            clients: workload.clients(),
            idle: 0,
            cpu: None,
        }
    }
}

/// Commands of the benchmark service (shared by coroipc and uds servers).
pub mod cmd {
    /// Echo a message of the same size back (rr64 and friends).
    pub const ECHO: u16 = 0;
    /// Answer 64 bytes whatever the request size (rr1m).
    pub const SINK: u16 = 1;
    /// Send `count` dispatch messages of `size` bytes; payload: count u64, size u64.
    pub const STREAM: u16 = 2;
}

/// The benchmark service id.
pub const SERVICE: u16 = 7;
/// Bytes of our message header (counted in every message size).
pub const HEADER: usize = coroipc_transport::message::HEADER_LEN;
