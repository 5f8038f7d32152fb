//! VHD exports against qemu: images made by `qemu-img create -f vpc`, written through our
//! decoded export with qemu-io, then decoded by qemu (`qemu-img convert -f vpc`, `qemu-nbd -f
//! vpc`) and compared with what we serve.

mod common;

use std::time::Duration;

use common::{Fixture, qemu_io, run, run_ok};
use nbd_backend::vhd::footer::{DISK_DIFFERENCING, Footer};

/// Serves `path` with qemu-nbd (read-only, vpc decoder) on `sock`; killed on drop.
struct QemuNbd {
    _child: tokio::process::Child,
}

impl QemuNbd {
    async fn start(path: &std::path::Path, sock: &std::path::Path) -> QemuNbd {
        let child = tokio::process::Command::new("qemu-nbd")
            .args(["-t", "-r", "-f", "vpc", "-x", "vhd", "-k"])
            .arg(sock)
            .arg(path)
            .kill_on_drop(true)
            .spawn()
            .expect("qemu-nbd is installed");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "qemu-nbd did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        QemuNbd { _child: child }
    }
}

async fn create(fx: &Fixture, name: &str, subformat: &str, size: &str) -> String {
    let path = fx.export(name);
    let opt = format!("subformat={subformat}");
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vpc",
            "-o",
            &opt,
            path.to_str().unwrap(),
            size,
        ],
    )
    .await;
    path.to_str().unwrap().to_owned()
}

/// Writes through our export, then checks qemu decodes the file to the same bytes.
async fn write_then_compare_with_qemu(subformat: &str) {
    let fx = Fixture::new();
    let vhd = create(&fx, "d.vhd", subformat, "24M").await;
    let srv = fx.serve(false);
    let uri = srv.uri("d.vhd");
    let info = run_ok("qemu-img", &["info", "--output=json", "-f", "vpc", &vhd]).await;
    let ours = run_ok("nbdinfo", &["--size", &uri]).await;
    assert!(
        info.contains(&format!("\"virtual-size\": {}", ours.trim())),
        "size differs: qemu {info} vs ours {ours}"
    );
    qemu_io(
        &uri,
        &[
            "write -P 0x5a 0 64k",
            "write -P 0x11 3M 2M", // crosses the 4 MiB block boundary
            "write -P 0x22 9000 1000",
            "write -z 3M 256k",
            "write -P 0x33 20M 512",
            "flush",
            "read -P 0x5a 0 8k",
            "read -P 0x11 4M 1M",
            "read -P 0 3M 256k",
            "read -P 0 12M 1M",
        ],
    )
    .await;
    // qemu decodes the file on disk to exactly what we serve.
    let raw = fx.path("out.raw");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "vpc",
            "-O",
            "raw",
            &vhd,
            raw.to_str().unwrap(),
        ],
    )
    .await;
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            raw.to_str().unwrap(),
            &uri,
        ],
    )
    .await;
    let bytes = std::fs::read(&raw).unwrap();
    assert!(bytes[..9000].iter().all(|b| *b == 0x5a));
    assert!(bytes[10000..65536].iter().all(|b| *b == 0x5a));
    assert!(bytes[9000..10000].iter().all(|b| *b == 0x22));
    assert!(
        bytes[3 << 20..(3 << 20) + (256 << 10)]
            .iter()
            .all(|b| *b == 0)
    );
    assert!(
        bytes[(3 << 20) + (256 << 10)..5 << 20]
            .iter()
            .all(|b| *b == 0x11)
    );
    assert!(bytes[20 << 20..(20 << 20) + 512].iter().all(|b| *b == 0x33));
    // And qemu's own NBD server over the same file agrees with ours.
    let qsock = fx.path("q.sock");
    let _q = QemuNbd::start(std::path::Path::new(&vhd), &qsock).await;
    let quri = format!("nbd+unix:///vhd?socket={}", qsock.display());
    run_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &quri, &uri],
    )
    .await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_vhd_written_through_export_decodes_identically_in_qemu() {
    write_then_compare_with_qemu("dynamic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_vhd_written_through_export_decodes_identically_in_qemu() {
    write_then_compare_with_qemu("fixed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_vhd_map_matches_qemu_nbd() {
    let fx = Fixture::new();
    let vhd = create(&fx, "m.vhd", "dynamic", "16M").await;
    let srv = fx.serve(false);
    let uri = srv.uri("m.vhd");
    qemu_io(&uri, &["write -P 1 2M 4k", "write -P 2 10M 2M"]).await;
    let ours = run_ok("nbdinfo", &["--map", &uri]).await;
    let qsock = fx.path("q.sock");
    let _q = QemuNbd::start(std::path::Path::new(&vhd), &qsock).await;
    let quri = format!("nbd+unix:///vhd?socket={}", qsock.display());
    let theirs = run_ok("nbdinfo", &["--map", &quri]).await;
    assert_eq!(ours, theirs, "ours:\n{ours}\nqemu-nbd:\n{theirs}");
    assert!(ours.contains("hole,zero"), "{ours}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_and_differencing_vhds_are_refused_with_a_reason() {
    let fx = Fixture::new();
    let bad = create(&fx, "bad.vhd", "fixed", "4M").await;
    let mut bytes = std::fs::read(&bad).unwrap();
    let n = bytes.len();
    bytes[n - 512 + 40] ^= 0xff; // original size: checksum no longer matches
    std::fs::write(&bad, &bytes).unwrap();
    let diff = create(&fx, "diff.vhd", "dynamic", "4M").await;
    let mut bytes = std::fs::read(&diff).unwrap();
    let n = bytes.len();
    let mut f = Footer::parse(&bytes[n - 512..]).unwrap();
    f.disk_type = DISK_DIFFERENCING;
    let enc = f.encode();
    bytes[..512].copy_from_slice(&enc);
    bytes[n - 512..].copy_from_slice(&enc);
    std::fs::write(&diff, &bytes).unwrap();
    std::fs::write(fx.export("ok.raw"), vec![0u8; 65536]).unwrap();
    let srv = fx.serve(false);
    for (name, reason) in [("bad.vhd", "checksum"), ("diff.vhd", "differencing")] {
        // libnbd reports the GO error; qemu also prints the server's message.
        let out = run("nbdinfo", &[&srv.uri(name)]).await;
        assert!(!out.status.success(), "{name} was served to nbdinfo");
        let out = run("qemu-img", &["info", &srv.uri(name)]).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} was served to qemu");
        assert!(stderr.contains(reason), "{name}: {stderr}");
    }
    // The server keeps serving other exports.
    run_ok("qemu-img", &["info", &srv.uri("ok.raw")]).await;
    srv.stop().await;
}
