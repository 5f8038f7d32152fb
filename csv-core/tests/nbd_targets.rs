//! NbdLun against real NBD targets (nbdkit, qemu-nbd): negotiation fallbacks, block-size
//! limits, FUA emulation, target errors, hung and slow paths, connection loss and healing.
//! Data written through NbdLun is verified with qemu-io or by reading the backing file.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Target, image, pause_ctl, qemu_io_ok};
use csv_core::lun::conformance::{self, pattern};
use csv_core::lun::nbd::Negotiation;
use csv_core::lun::{Lun, LunError, NbdLun, NbdOptions};

const SIZE: u64 = 4 << 20;

fn opts(timeout_ms: u64) -> NbdOptions {
    NbdOptions {
        timeout: Duration::from_millis(timeout_ms),
        connect_timeout: Duration::from_secs(5),
        probe_timeout: Duration::from_millis(500),
    }
}

fn file_bytes(path: &std::path::Path, off: usize, len: usize) -> Vec<u8> {
    std::fs::read(path).unwrap()[off..off + len].to_vec()
}

/// Awaits `f` for at most 10 s (a bound, not a sleep: `f` completes as soon as it can).
async fn within_10s<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not complete within 10 s"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_target_on_a_free_port_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), SIZE);
    let t = Target::nbdkit_tcp(&img, &[]);
    let lun = NbdLun::connect(&t.uri, opts(5000)).await.unwrap();
    assert!(lun.describe().starts_with("nbd://127.0.0.1:"));
    conformance::run_all(Arc::new(lun)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_without_structured_replies_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), SIZE);
    let t = Target::nbdkit_unix(dir.path(), &img, &["--no-sr"], &[]);
    let lun = NbdLun::connect(&t.uri, opts(5000)).await.unwrap();
    let info = lun.export_info();
    assert!(!info.structured);
    assert_eq!(info.negotiation, Negotiation::Go);
    conformance::run_all(Arc::new(lun)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_fixed_newstyle_target_uses_export_name_and_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), SIZE);
    let t = Target::nbdkit_unix(dir.path(), &img, &["--mask-handshake=0"], &[]);
    let lun = NbdLun::connect(&t.uri, opts(5000)).await.unwrap();
    let info = lun.export_info();
    assert_eq!(info.negotiation, Negotiation::ExportName);
    assert_eq!(info.size, SIZE);
    conformance::run_all(Arc::new(lun)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_seen_by_qemu_io() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), SIZE);
    let t = Target::nbdkit_unix(dir.path(), &img, &[], &[]);
    let lun = NbdLun::connect(&t.uri, opts(5000)).await.unwrap();
    lun.write_at(1 << 20, Bytes::from(vec![0xab; 65536]), true)
        .await
        .unwrap();
    lun.write_zeroes((1 << 20) + 4096, 4096).await.unwrap();
    let uri = t.uri.clone();
    let (ab, cd, zero) = tokio::task::spawn_blocking(move || {
        (
            qemu_io_ok(&uri, "read -P 0xab 1048576 4096"),
            qemu_io_ok(&uri, "read -P 0xcd 1048576 4096"),
            qemu_io_ok(&uri, "read -P 0x00 1052672 4096"),
        )
    })
    .await
    .unwrap();
    assert!(ab, "qemu-io does not see the 0xab pattern");
    assert!(!cd, "qemu-io pattern check cannot fail: oracle broken");
    assert!(zero, "qemu-io does not see the zeroed block");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_requests_are_split_to_the_target_maximum() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), SIZE);
    let t = Target::nbdkit_unix(
        dir.path(),
        &img,
        &["--filter=blocksize-policy"],
        &[
            "blocksize-minimum=4096",
            "blocksize-preferred=4096",
            "blocksize-maximum=65536",
            "blocksize-error-policy=error",
        ],
    );
    let lun = NbdLun::connect(&t.uri, opts(5000)).await.unwrap();
    assert_eq!(lun.export_info().block_size, Some((4096, 4096, 65536)));
    assert_eq!(lun.alignment(), 4096);
    let data = pattern(7, 1 << 20);
    lun.write_at(0, data.clone(), false).await.unwrap();
    assert_eq!(lun.read_at(0, 1 << 20).await.unwrap(), data);
    assert!(matches!(
        lun.read_at(512, 512).await,
        Err(LunError::Misaligned { align: 4096, .. })
    ));
    lun.flush().await.unwrap();
    assert_eq!(file_bytes(&img, 0, 1 << 20), data.to_vec());
}

/// Runs one FUA write against nbdkit with the log filter (+ `filters`) and returns the log.
async fn log_of_fua_write(filters: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), SIZE);
    let log = dir.path().join("log.txt");
    let mut o = vec!["--filter=log"];
    o.extend_from_slice(filters);
    let logfile = format!("logfile={}", log.display());
    let mut t = Target::nbdkit_unix(dir.path(), &img, &o, &[&logfile]);
    let lun = NbdLun::connect(&t.uri, opts(5000)).await.unwrap();
    lun.write_at(0, pattern(1, 4096), true).await.unwrap();
    drop(lun);
    t.kill();
    std::fs::read_to_string(&log).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fua_is_native_when_advertised_and_write_plus_flush_otherwise() {
    let native = log_of_fua_write(&[]).await;
    assert!(
        native.contains("Write id=") && native.contains("fua=1"),
        "{native}"
    );
    assert!(!native.contains("Flush id="), "{native}");

    let emulated = log_of_fua_write(&["--filter=fua"]).await; // fuamode=none: no FUA advertised
    assert!(emulated.contains("fua=0 ..."), "{emulated}");
    assert!(emulated.contains("Flush id="), "{emulated}");
}

async fn target_errors_with(extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), SIZE);
    let trigger = dir.path().join("inject");
    let error_file = format!("error-file={}", trigger.display());
    let mut o = vec!["--filter=error"];
    o.extend_from_slice(extra);
    let t = Target::nbdkit_unix(dir.path(), &img, &o, &["error-rate=100%", &error_file]);
    let lun = NbdLun::connect(&t.uri, opts(5000)).await.unwrap();
    lun.write_at(0, pattern(1, 4096), false).await.unwrap();

    std::fs::write(&trigger, b"").unwrap();
    let err = lun.read_at(0, 4096).await.unwrap_err();
    assert!(
        matches!(
            err,
            LunError::Target {
                op: "read",
                errno: 5
            }
        ),
        "{err}"
    );
    let err = lun.write_at(0, pattern(2, 4096), false).await.unwrap_err();
    assert!(
        matches!(
            err,
            LunError::Target {
                op: "write",
                errno: 5
            }
        ),
        "{err}"
    );
    assert!(lun.probe().await.is_err());
    assert_eq!(lun.pending(), 0);

    std::fs::remove_file(&trigger).unwrap();
    lun.probe().await.unwrap();
    assert_eq!(lun.read_at(0, 4096).await.unwrap(), pattern(1, 4096));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_errors_fail_the_request_and_the_path_heals_structured() {
    target_errors_with(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_errors_fail_the_request_and_the_path_heals_simple_replies() {
    target_errors_with(&["--no-sr"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_write_times_out_stays_pending_and_lands_after_resume() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), SIZE);
    let ctl = dir.path().join("pause.ctl");
    let ctl_arg = format!("pause-control={}", ctl.display());
    let _t = Target::nbdkit_unix(dir.path(), &img, &["--filter=pause"], &[&ctl_arg]);
    let lun = NbdLun::connect(&_t.uri, opts(200)).await.unwrap();
    lun.probe().await.unwrap();

    pause_ctl(&ctl, b'p');
    let t0 = Instant::now();
    let err = lun
        .write_at(8192, Bytes::from(vec![0xab; 4096]), false)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            LunError::Timeout {
                op: "write",
                ms: 200
            }
        ),
        "{err}"
    );
    assert!(t0.elapsed() < Duration::from_secs(3));
    assert_eq!(lun.pending(), 1, "a timed-out write must stay tracked");
    assert!(lun.probe().await.is_err(), "probe must fail on a hung path");
    assert_eq!(lun.pending(), 2);
    assert!(
        tokio::time::timeout(Duration::from_millis(100), lun.wait_resolved())
            .await
            .is_err(),
        "wait_resolved returned while the target still holds the write"
    );
    assert_eq!(file_bytes(&img, 8192, 4096), vec![0; 4096]);

    pause_ctl(&ctl, b'r');
    within_10s("wait_resolved after resume", lun.wait_resolved()).await;
    assert_eq!(lun.pending(), 0);
    assert_eq!(
        file_bytes(&img, 8192, 4096),
        vec![0xab; 4096],
        "the ghost write landed after resume"
    );
    lun.probe().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_connection_resolves_pending_and_a_restarted_target_heals_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), SIZE);
    let ctl = dir.path().join("pause.ctl");
    let ctl_arg = format!("pause-control={}", ctl.display());
    let mut t = Target::nbdkit_unix(dir.path(), &img, &["--filter=pause"], &[&ctl_arg]);
    let lun = Arc::new(NbdLun::connect(&t.uri, opts(10_000)).await.unwrap());

    pause_ctl(&ctl, b'p');
    let l2 = lun.clone();
    let writer = tokio::spawn(async move { l2.write_at(0, pattern(3, 4096), false).await });
    let deadline = Instant::now() + Duration::from_secs(10);
    while lun.pending() == 0 {
        assert!(Instant::now() < deadline, "write never became pending");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    t.kill();
    within_10s("wait_resolved after the target died", lun.wait_resolved()).await;
    assert_eq!(lun.pending(), 0);
    match within_10s("the hung write", writer).await.unwrap() {
        Err(LunError::PathUnreachable { reason }) => {
            assert!(reason.contains("outcome unknown"), "{reason}")
        }
        other => panic!("hung write ended with {other:?}"),
    }

    let err = lun.read_at(0, 4096).await.unwrap_err();
    match &err {
        LunError::PathUnreachable { reason } => assert!(reason.contains("not sent"), "{reason}"),
        other => panic!("expected PathUnreachable, got {other}"),
    }
    assert!(err.is_path_error());

    let _t2 = Target::nbdkit_unix(dir.path(), &img, &[], &[]);
    lun.probe().await.unwrap();
    lun.write_at(4096, pattern(4, 4096), true).await.unwrap();
    assert_eq!(file_bytes(&img, 4096, 4096), pattern(4, 4096).to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_write_times_out_then_resolves_and_lands() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), SIZE);
    let _t = Target::nbdkit_unix(dir.path(), &img, &["--filter=delay"], &["wdelay=600ms"]);
    let lun = NbdLun::connect(&_t.uri, opts(100)).await.unwrap();
    let err = lun.write_at(0, pattern(5, 4096), false).await.unwrap_err();
    assert!(matches!(err, LunError::Timeout { ms: 100, .. }), "{err}");
    assert_eq!(lun.pending(), 1);
    within_10s("wait_resolved", lun.wait_resolved()).await;
    assert_eq!(lun.pending(), 0);
    assert_eq!(file_bytes(&img, 0, 4096), pattern(5, 4096).to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_pipelined_on_one_connection() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), SIZE);
    let _t = Target::nbdkit_unix(dir.path(), &img, &["--filter=delay"], &["rdelay=100ms"]);
    let lun = Arc::new(NbdLun::connect(&_t.uri, opts(10_000)).await.unwrap());
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..32u64 {
        let lun = lun.clone();
        tasks.push(tokio::spawn(
            async move { lun.read_at(i * 4096, 4096).await },
        ));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let took = t0.elapsed();
    println!("32 reads against a 100 ms target took {took:?} (serial would be 3.2 s)");
    assert!(
        took < Duration::from_millis(1600),
        "not pipelined: {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_hole_chunks_read_as_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), SIZE);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&pattern(9, 8192), 1 << 20).unwrap();
    }
    let trace = dir.path().join("trace.txt");
    let _t = Target::qemu_nbd_unix_traced(dir.path(), &img, &trace);
    let lun = NbdLun::connect(&_t.uri, opts(5000)).await.unwrap();
    let got = lun.read_at(0, 2 << 20).await.unwrap();
    let want = std::fs::read(&img).unwrap();
    assert!(
        got[..] == want[..2 << 20],
        "sparse read differs from the image"
    );
    let log = std::fs::read_to_string(&trace).unwrap_or_default();
    assert!(
        log.contains("read hole"),
        "qemu-nbd sent no hole chunk: {log}"
    );
}

#[tokio::test]
async fn a_server_that_is_not_nbd_is_refused_cleanly() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("http.sock");
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
    });
    let err = NbdLun::connect(
        &format!("nbd+unix:///?socket={}", sock.display()),
        opts(1000),
    )
    .await
    .err()
    .unwrap();
    match err {
        LunError::PathUnreachable { reason } => {
            assert!(reason.contains("not an NBD server"), "{reason}")
        }
        other => panic!("{other}"),
    }
}

/// Throughput numbers for the report: `cargo test -p csv-core --test nbd_targets -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn report_throughput_against_nbdkit() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 64 << 20);
    let _t = Target::nbdkit_unix(dir.path(), &img, &[], &[]);
    let lun = Arc::new(NbdLun::connect(&_t.uri, opts(10_000)).await.unwrap());
    for (bs, qd, write) in [
        (4096usize, 16u64, false),
        (4096, 16, true),
        (1 << 20, 4, false),
        (1 << 20, 4, true),
    ] {
        let t0 = Instant::now();
        let dur = Duration::from_secs(2);
        let mut tasks = Vec::new();
        for w in 0..qd {
            let lun = lun.clone();
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                let blocks = (64 << 20) / bs as u64;
                let data = Bytes::from(vec![0x5a; bs]);
                while t0.elapsed() < dur {
                    let off = ((n * 7919 + w * 104729) % blocks) * bs as u64;
                    if write {
                        lun.write_at(off, data.clone(), false).await.unwrap();
                    } else {
                        lun.read_at(off, bs).await.unwrap();
                    }
                    n += 1;
                }
                n
            }));
        }
        let mut ops = 0;
        for t in tasks {
            ops += t.await.unwrap();
        }
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "{} bs={bs} qd={qd}: {:.0} IOPS, {:.1} MiB/s",
            if write { "write" } else { "read" },
            ops as f64 / secs,
            ops as f64 * bs as f64 / secs / (1 << 20) as f64
        );
    }
}
