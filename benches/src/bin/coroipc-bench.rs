//! `coroipc-bench`: every workload (benches/README.md) on coroipc, on Unix
//! domain sockets and against the machine's floors, with server and clients
//! in separate processes; prints one comparison table. `--sweep` runs the
//! scale sweep instead (idle connections, fan-in clients; see
//! [`coroipc_benches::scale`]).
//!
//! ```text
//! coroipc-bench                      # everything, full counts
//! coroipc-bench --quick              # everything, in under a minute
//! coroipc-bench --workload rr64 --transport coroipc
//! workload=rr64 transport=coroipc median_ns=… p99_ns=… ops_per_s=… gbps=…
//! coroipc-bench --json               # machine-readable
//! coroipc-bench --sweep --quick      # rr64 beside idle connections, fan-in 1..256
//! coroipc-bench --one-cpu            # every process on CPU 0
//! ```

use std::time::Duration;

use clap::Parser;
use coroipc_benches::floor::{self, Kind};
use coroipc_benches::proc::Proc;
use coroipc_benches::report::{table, Outcome, Sample};
use coroipc_benches::scale::{self, Footprint};
use coroipc_benches::workload::{Params, Transport, Workload, ALL, TRANSPORTS};
use coroipc_benches::{rpc, uds};
use coroipc_client::WaitPolicy;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser, Debug)]
#[command(name = "coroipc-bench", about = "coroipc-rs against Unix sockets and the machine's floors")]
struct Args {
    /// Run only this workload (rr64, rr64-sleep, rr64-spin, rr64-pipe, ev64, ev4k, rr1m, connect, fanin).
    #[arg(long)]
    workload: Option<String>,
    /// Run only this transport (coroipc, uds, floor).
    #[arg(long)]
    transport: Option<String>,
    /// Smaller counts: the whole run takes under a minute.
    #[arg(long)]
    quick: bool,
    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
    /// Operations per run (per client for fanin) instead of the workload's default.
    #[arg(long)]
    count: Option<u64>,
    /// Message size in bytes, header included, instead of the workload's default.
    #[arg(long)]
    size: Option<usize>,
    /// Client processes at once instead of the workload's default (fanin: 16, others: 1).
    #[arg(long)]
    clients: Option<usize>,
    /// Idle connections (smallest rings, held by another process) open on the server during the run.
    #[arg(long, default_value_t = 0)]
    idle: usize,
    /// Pin every process of every run (server, clients, floors) to CPU 0.
    #[arg(long)]
    one_cpu: bool,
    /// Run the scale sweep: rr64 with 0, 100, 1000, 3000 and 10000 idle connections, fanin with 1..256 clients.
    #[arg(long)]
    sweep: bool,
    /// Internal: the role of a child process.
    #[arg(long, hide = true)]
    role: Option<String>,
    /// Internal: where the server listens.
    #[arg(long, hide = true)]
    endpoint: Option<String>,
    /// Internal: floor ping-pong kind.
    #[arg(long, hide = true)]
    floor_kind: Option<String>,
    /// Internal: descriptors of the parent for the floor peer.
    #[arg(long, hide = true)]
    fds: Option<String>,
    /// Internal: the server's spin budget in microseconds.
    #[arg(long, hide = true)]
    spin_us: Option<u64>,
    /// Internal: connections the server must hold at once.
    #[arg(long, hide = true, default_value_t = 0)]
    connections: usize,
    /// Internal: pin this child process to a CPU.
    #[arg(long, hide = true)]
    cpu: Option<usize>,
}

fn main() {
    let args = Args::parse();
    if let Some(role) = args.role.clone() {
        return child(&role, &args);
    }
    if args.sweep {
        return sweep(&args);
    }
    let workloads: Vec<Workload> = match &args.workload {
        Some(w) => vec![Workload::parse(w).unwrap_or_else(|| fail(&format!("unknown workload {w:?}")))],
        None => ALL.to_vec(),
    };
    let transports: Vec<Transport> = match &args.transport {
        Some(t) => vec![Transport::parse(t).unwrap_or_else(|| fail(&format!("unknown transport {t:?}")))],
        None => TRANSPORTS.to_vec(),
    };
    let runs: Vec<(Params, Transport)> = workloads
        .iter()
        .flat_map(|&w| transports.iter().map(move |&t| (w, t)))
        .map(|(w, t)| (params(&args, w), t))
        .collect();
    let bar = ProgressBar::new(runs.len() as u64);
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}").expect("valid template"));
    let mut outcomes = Vec::new();
    for (params, t) in runs {
        bar.set_message(format!("{} on {t}", params.workload));
        let outcome = run(params, t);
        bar.suspend(|| {
            if !args.json {
                println!("{}", outcome.line());
                if params.idle > 0 {
                    eprintln!("  {}", outcome.note);
                }
            }
        });
        outcomes.push(outcome);
        bar.inc(1);
    }
    bar.finish_and_clear();
    if args.json {
        let all: Vec<_> = outcomes.iter().map(Outcome::json).collect();
        println!("{}", serde_json::to_string_pretty(&all).expect("serialisable"));
    } else if outcomes.len() > 1 {
        println!();
        print!("{}", table(&outcomes));
        println!("\nratios: >1 means coroipc is better (latency: floor or uds time / coroipc time; rates: coroipc / other)");
    }
}

/// The parameters of `w` under the command line's options.
fn params(args: &Args, w: Workload) -> Params {
    let mut p = Params::new(w, args.quick);
    p.count = args.count.unwrap_or(p.count);
    p.size = args.size.unwrap_or(p.size);
    p.clients = args.clients.unwrap_or(p.clients);
    p.idle = args.idle;
    p.cpu = if args.one_cpu { Some(0) } else { pinned_cpu(w) };
    if p.idle > 0 || p.clients > 16 {
        let want = scale::fds_for(p.idle, p.clients);
        let got = scale::raise_fd_limit(want);
        if got < want {
            fail(&format!(
                "{} idle connections and {} clients need {want} descriptors; the limit is {got}",
                p.idle, p.clients
            ));
        }
    }
    p
}

/// The scale sweep (see [`coroipc_benches::scale`]): one line per run, then
/// a table of how the cost grows.
fn sweep(args: &Args) {
    let idle_max = scale::IDLE[scale::IDLE.len() - 1];
    let clients_max = scale::CLIENTS[scale::CLIENTS.len() - 1];
    // As many descriptors as the hard limit allows; points that need more
    // are skipped and say so.
    let limit = scale::raise_fd_limit(scale::fds_for(idle_max, clients_max));
    let mut rows: Vec<(String, usize, Outcome)> = Vec::new();
    for idle in scale::IDLE {
        let want = scale::fds_for(idle, 1);
        if want > limit {
            println!(
                "sweep=idle n={idle} skipped: needs {want} descriptors, the limit is {limit} \
                 (raise the hard limit: ulimit -Hn, as root with CAP_SYS_RESOURCE)"
            );
            continue;
        }
        for t in [Transport::Coroipc, Transport::Uds] {
            let mut p = params(args, Workload::Rr64);
            p.idle = idle;
            let o = run(p, t);
            println!("sweep=idle n={idle} {}", o.line());
            rows.push(("rr64+idle".into(), idle, o));
        }
    }
    for clients in scale::CLIENTS {
        for t in [Transport::Coroipc, Transport::Uds] {
            let mut p = params(args, Workload::Fanin);
            p.clients = clients;
            let o = run(p, t);
            println!("sweep=fanin n={clients} {}", o.line());
            rows.push(("fanin".into(), clients, o));
        }
    }
    println!();
    println!(
        "{:<10} {:>6} {:<8} {:>10} {:>10} {:>12} {:>9}  note",
        "sweep", "n", "transport", "median_ns", "p99_ns", "ops/s", "vs first"
    );
    for (name, n, o) in &rows {
        let first = rows.iter().find(|(m, _, f)| m == name && f.transport == o.transport).map(|(_, _, f)| f);
        let vs = first.and_then(|f| {
            // Latency rows: how much slower than with nothing idle (>1 is
            // slower); fan-in rows: total throughput against one client.
            if name == "fanin" {
                (f.ops_per_s > 0.0).then(|| o.ops_per_s / f.ops_per_s)
            } else {
                (f.median_ns > 0).then(|| o.median_ns as f64 / f.median_ns as f64)
            }
        });
        println!(
            "{:<10} {:>6} {:<8} {:>10} {:>10} {:>12.0} {:>9}  {}",
            name,
            n,
            o.transport.name(),
            o.median_ns,
            o.p99_ns,
            o.ops_per_s,
            vs.map_or("-".into(), |v| format!("{v:.2}x")),
            o.note
        );
    }
    println!("\nvs first: rr64+idle = median / median with 0 idle (1.0 = no cost); fanin = total ops/s / ops/s of 1 client");
}

fn fail(msg: &str) -> ! {
    eprintln!("coroipc-bench: {msg}");
    std::process::exit(2);
}

/// Spin budgets of the server loop per workload.
fn server_spin(w: Workload) -> Duration {
    match w {
        Workload::Rr64Sleep => Duration::ZERO,
        Workload::Rr64Spin => Duration::from_secs(1),
        _ => Duration::from_micros(50),
    }
}

/// Client wait policy per workload.
fn client_policy(w: Workload) -> WaitPolicy {
    match w {
        Workload::Rr64Sleep => WaitPolicy::sleep_only(WaitPolicy::default().sleep),
        Workload::Rr64Spin => WaitPolicy::spin_only(),
        _ => WaitPolicy::default(),
    }
}

/// The CPU the processes of a workload are pinned to, if any.
///
/// `rr64-sleep` compares sleeping mechanisms. On the 2-vCPU VMs this runs
/// on, a wake-up that crosses CPUs costs a VM exit (~21 µs: the guest's
/// halt polling is off) whatever the mechanism, and the scheduler places
/// the pair on one CPU or two by chance (benches/README.md, "Wake path").
/// Pinning every process of the workload — ours and the floors' — to one
/// CPU compares the mechanisms instead of the placements.
fn pinned_cpu(w: Workload) -> Option<usize> {
    (w == Workload::Rr64Sleep).then_some(0)
}

fn run(p: Params, t: Transport) -> Outcome {
    static RUN: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let pid = std::process::id();
    let common = |role: &str, endpoint: &str| -> Vec<String> {
        vec![
            "--role".into(),
            role.into(),
            "--transport".into(),
            t.name().into(),
            "--workload".into(),
            p.workload.name().into(),
            "--endpoint".into(),
            endpoint.into(),
            "--count".into(),
            p.count.to_string(),
            "--size".into(),
            p.size.to_string(),
            "--spin-us".into(),
            server_spin(p.workload).as_micros().to_string(),
        ]
        .into_iter()
        .chain(["--connections".to_string(), (p.idle + p.clients).to_string()])
        .chain(p.cpu.map(|c| ["--cpu".to_string(), c.to_string()]).into_iter().flatten())
        .collect()
    };
    match t {
        Transport::Coroipc | Transport::Uds => {
            let endpoint = if t == Transport::Coroipc {
                format!("@coroipc-bench-{pid}-{n}")
            } else {
                format!("/tmp/coroipc-bench-{pid}-{n}.sock")
            };
            let mut server = Proc::spawn(&common("server", &endpoint));
            server.expect_line("READY");
            let mut note = String::new();
            let idlers: Vec<Proc> = if p.idle > 0 {
                let before = Footprint::of(server.pid());
                // Several holders, so that no client process runs out of
                // descriptors before the server does.
                let idlers: Vec<Proc> = scale::shares(p.idle)
                    .into_iter()
                    .map(|n| {
                        let mut args = common("idle", &endpoint);
                        args.extend(["--idle".to_string(), n.to_string()]);
                        let mut idler = Proc::spawn(&args);
                        idler.expect_line("READY");
                        idler
                    })
                    .collect();
                let after = Footprint::settled(server.pid(), Duration::from_secs(10));
                let (kib, fds) = after.per_connection(before, p.idle);
                note = format!("{} idle: server +{kib:.1} KiB RSS, +{fds:.1} fds per connection", p.idle);
                idlers
            } else {
                Vec::new()
            };
            let clients: Vec<Proc> =
                (0..p.clients).map(|_| Proc::spawn(&common("client", &endpoint))).collect();
            let samples: Vec<Sample> = clients.into_iter().map(Proc::result).collect();
            drop(idlers);
            server.kill();
            if t == Transport::Uds {
                let _ = std::fs::remove_file(&endpoint);
            }
            Outcome::from_samples(p.workload, t, &samples, &note)
        }
        Transport::Floor => floor_outcome(p),
    }
}

fn floor_outcome(p: Params) -> Outcome {
    let w = p.workload;
    match w {
        Workload::Rr64 | Workload::Rr64Spin | Workload::Rr64Async => {
            let s = floor::ping_pong(Kind::Spin, p.count, p.cpu);
            Outcome::from_samples(w, Transport::Floor, &[s], "cache-line ping-pong")
        }
        Workload::Rr64Sleep => {
            let cpu = p.cpu;
            let futex = floor::ping_pong(Kind::Futex, p.count, cpu);
            let pipe = floor::ping_pong(Kind::Pipe, p.count, cpu);
            let note = format!(
                "best of futex {} ns / pipe {} ns ping-pong; all pinned to one CPU",
                futex.median_ns, pipe.median_ns
            );
            let best = if pipe.median_ns < futex.median_ns { pipe } else { futex };
            Outcome::from_samples(w, Transport::Floor, &[best], &note)
        }
        Workload::Ev4k | Workload::Rr1m => {
            let s = floor::memcpy(p.size, p.count * p.size as u64);
            Outcome::from_samples(w, Transport::Floor, &[s], "single-thread memcpy")
        }
        _ => Outcome::from_samples(w, Transport::Floor, &[], "n/a"),
    }
}

fn child(role: &str, args: &Args) {
    if let Some(cpu) = args.cpu {
        let _ = coroipc_benches::proc::pin(cpu);
    }
    let workload = args.workload.as_deref().and_then(Workload::parse);
    let transport = args.transport.as_deref().and_then(Transport::parse);
    let endpoint = args.endpoint.clone().unwrap_or_default();
    match role {
        "server" => {
            let spin = Duration::from_micros(args.spin_us.unwrap_or(50));
            let result = match transport {
                Some(Transport::Coroipc) => rpc::serve(&endpoint, spin, args.connections + 16),
                Some(Transport::Uds) => uds::serve(&endpoint),
                _ => fail("server needs --transport coroipc|uds"),
            };
            if let Err(e) = result {
                fail(&format!("server: {e}"));
            }
        }
        "client" => {
            let w = workload.unwrap_or_else(|| fail("client needs --workload"));
            let mut p = Params::new(w, false);
            p.count = args.count.unwrap_or(p.count);
            p.size = args.size.unwrap_or(p.size);
            let sample = match transport {
                Some(Transport::Coroipc) => rpc::client(&endpoint, p, client_policy(w)),
                Some(Transport::Uds) => uds::client(&endpoint, p),
                _ => fail("client needs --transport coroipc|uds"),
            };
            println!("{}", sample.to_line());
        }
        "idle" => {
            let n = args.idle;
            // Both kinds are kept (not just counted) until the process dies.
            let (coroipc, uds) = match transport {
                Some(Transport::Coroipc) => (scale::idle_coroipc(&endpoint, n), Vec::new()),
                Some(Transport::Uds) => (Vec::new(), scale::idle_uds(&endpoint, n)),
                _ => fail("idle needs --transport coroipc|uds"),
            };
            println!("READY {}", coroipc.len() + uds.len());
            // Hold them until the parent kills this process.
            loop {
                std::thread::park();
            }
        }
        "floor-peer" => {
            let kind = args.floor_kind.as_deref().and_then(Kind::parse).unwrap_or_else(|| fail("floor kind"));
            floor::peer(kind, args.fds.as_deref().unwrap_or_default(), args.count.unwrap_or(0));
        }
        other => fail(&format!("unknown role {other:?}")),
    }
}
