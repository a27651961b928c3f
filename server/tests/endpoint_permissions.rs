//! A path endpoint's socket file gets the mode and owner asked for with
//! `ServerBuilder::endpoint_permissions`, and abstract names refuse them.

use std::os::unix::fs::{FileTypeExt, MetadataExt};

use coroipc_server::{Server, ServerBuildError};

#[test]
fn a_path_endpoint_gets_its_mode_and_owner() {
    let dir = std::env::temp_dir().join(format!("coroipc-perm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("s.sock");
    let root = rustix::process::geteuid().is_root();
    let gid = root.then_some(65534);
    let server = Server::builder()
        .endpoint(path.to_str().unwrap())
        .endpoint_permissions(0o660, None, gid)
        .build()
        .expect("build");
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.mode() & 0o7777, 0o660, "the mode asked for");
    if let Some(gid) = gid {
        assert_eq!(meta.gid(), gid, "the group asked for");
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_abstract_endpoint_refuses_permissions() {
    let r = Server::builder()
        .endpoint(&format!("@coroipc-perm-{}", std::process::id()))
        .endpoint_permissions(0o600, None, None)
        .build();
    match r {
        Err(ServerBuildError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput),
        other => panic!("{other:?}"),
    }
}
