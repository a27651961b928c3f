//! `ClientBuilder::require_server_uid`: a squatter that bound the endpoint
//! first, as another user, is refused with `Error::WrongServer` before the
//! client says anything to it.

use std::os::unix::net::UnixListener;
use std::sync::mpsc;
use std::time::Duration;

use coroipc_client::{Client, Error};

/// The uid the squatter runs as (`nobody`).
const SQUATTER_UID: u32 = 65534;

#[test]
fn a_squatter_running_as_another_user_is_refused_with_wrong_server() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("needs root to run a squatter as another user: skipped");
        return;
    }
    let name = format!("coroipc-client-squat-{}", std::process::id());
    let (ready_tx, ready_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let bind_name = name.clone();
    // The squatter: a thread that drops to another uid (the kernel keeps
    // credentials per thread and records the listening thread's), binds
    // the name and never accepts.
    let squatter = std::thread::spawn(move || {
        use std::os::linux::net::SocketAddrExt;
        rustix::thread::set_thread_uid(rustix::process::Uid::from_raw(SQUATTER_UID)).expect("setuid");
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(&bind_name).unwrap();
        let _listener = UnixListener::bind_addr(&addr).expect("bind");
        ready_tx.send(()).unwrap();
        let _ = done_rx.recv_timeout(Duration::from_secs(30));
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).expect("squatter ready");
    let endpoint = format!("@{name}");
    let result = Client::builder(&endpoint, 1)
        .timeout(Duration::from_secs(2))
        .require_server_uid(0)
        .connect()
        .map(|_| ());
    assert!(matches!(result, Err(Error::WrongServer { expected: 0, actual: SQUATTER_UID })), "{result:?}");
    let pending = Client::builder(&endpoint, 1)
        .timeout(Duration::from_secs(2))
        .require_server_uid(0)
        .connect_nonblocking();
    assert!(
        matches!(pending, Err(Error::WrongServer { expected: 0, actual: SQUATTER_UID })),
        "{:?}",
        pending.map(|_| ())
    );
    done_tx.send(()).unwrap();
    squatter.join().unwrap();
}
