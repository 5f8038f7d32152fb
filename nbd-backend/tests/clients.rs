//! Raw exports driven by real clients: qemu-img, qemu-io, nbdinfo, nbdcopy, fio, libnbd.

mod common;

use common::{Fixture, pattern, qemu_io, run, run_ok, seed};

const MIB: usize = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_write_read_zero_discard_flush_map_reach_the_file() {
    let fx = Fixture::new();
    std::fs::write(fx.export("disk.raw"), vec![0x11u8; 8 * MIB]).unwrap();
    let srv = fx.serve(false);
    let uri = srv.uri("disk.raw");
    qemu_io(
        &uri,
        &[
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            "write -z 1M 1M",
            "read -P 0 1M 1M",
            "discard 2M 1M",
            "write -P 0xcd 3M 64k",
            "flush",
            "read -P 0xcd 3M 64k",
            "read -P 0x11 4M 4M",
        ],
    )
    .await;
    let map = qemu_io(&uri, &["map"]).await;
    assert!(map.contains("allocated"), "{map}");
    srv.stop().await;
    let disk = std::fs::read(fx.export("disk.raw")).unwrap();
    assert!(disk[..MIB].iter().all(|b| *b == 0xab));
    assert!(disk[MIB..2 * MIB].iter().all(|b| *b == 0));
    assert!(disk[3 * MIB..3 * MIB + 65536].iter().all(|b| *b == 0xcd));
    assert!(disk[4 * MIB..].iter().all(|b| *b == 0x11));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_into_export_then_compare_and_info() {
    let seed = seed();
    let fx = Fixture::new();
    let mut src = pattern(6 * MIB, seed);
    src[2 * MIB..3 * MIB].fill(0); // a zero area: qemu-img writes it with WRITE_ZEROES
    let src_path = fx.path("src.raw");
    std::fs::write(&src_path, &src).unwrap();
    std::fs::File::create(fx.export("dst.raw"))
        .unwrap()
        .set_len(src.len() as u64)
        .unwrap();
    let srv = fx.serve(false);
    let uri = srv.uri("dst.raw");
    let src_s = src_path.to_str().unwrap();
    run_ok(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", src_s, &uri],
    )
    .await;
    run_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src_s, &uri],
    )
    .await;
    let info = run_ok("qemu-img", &["info", "--output=json", &uri]).await;
    assert!(info.contains("\"virtual-size\": 6291456"), "{info}");
    srv.stop().await;
    assert!(std::fs::read(fx.export("dst.raw")).unwrap() == src);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_lists_exports_reports_size_and_maps_holes() {
    let fx = Fixture::new();
    std::fs::create_dir(fx.export("vms")).unwrap();
    let f = std::fs::File::create(fx.export("vms/sparse.img")).unwrap();
    f.set_len(4 * MIB as u64).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &vec![1u8; MIB], MIB as u64).unwrap();
    std::fs::write(fx.export("small.img"), vec![0u8; 1000]).unwrap();
    let srv = fx.serve(false);
    let list = run_ok(
        "nbdinfo",
        &[
            "--list",
            &format!("nbd+unix://?socket={}", srv.sock.display()),
        ],
    )
    .await;
    assert!(list.contains("export=\"vms/sparse.img\""), "{list}");
    assert!(list.contains("export=\"small.img\""), "{list}");
    assert!(list.contains("export-size: 4194304"), "{list}");
    // A size that is not a multiple of 512 is advertised with minimum block size 1.
    assert!(list.contains("block_size_minimum: 1"), "{list}");
    let size = run_ok("nbdinfo", &["--size", &srv.uri("vms/sparse.img")]).await;
    assert_eq!(size.trim(), "4194304");
    let map = run_ok("nbdinfo", &["--map", &srv.uri("vms/sparse.img")]).await;
    let lines: Vec<&str> = map.lines().collect();
    assert!(lines.len() >= 3, "{map}");
    assert!(lines[0].contains("hole,zero"), "{map}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("1048576") && l.contains("data")),
        "{map}"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_round_trip_over_multi_conn() {
    let seed = seed();
    let fx = Fixture::new();
    let src = pattern(16 * MIB, seed);
    let src_path = fx.path("src.raw");
    std::fs::write(&src_path, &src).unwrap();
    std::fs::File::create(fx.export("disk.raw"))
        .unwrap()
        .set_len(src.len() as u64)
        .unwrap();
    let srv = fx.serve(false);
    let uri = srv.uri("disk.raw");
    let back = fx.path("back.raw");
    run_ok("nbdcopy", &["--flush", src_path.to_str().unwrap(), &uri]).await;
    run_ok("nbdcopy", &[&uri, back.to_str().unwrap()]).await;
    srv.stop().await;
    assert!(std::fs::read(&back).unwrap() == src);
    assert!(std::fs::read(fx.export("disk.raw")).unwrap() == src);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_pipelined_random_writes_verify_crc32c() {
    let fx = Fixture::new();
    std::fs::File::create(fx.export("fio.img"))
        .unwrap()
        .set_len(32 * MIB as u64)
        .unwrap();
    let srv = fx.serve(false);
    let uri = format!("--uri={}", srv.uri("fio.img"));
    let out = run_ok(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bs=4k-64k",
            "--iodepth=16",
            "--size=32M",
            "--io_size=16M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--output-format=terse",
        ],
    )
    .await;
    assert!(!out.is_empty());
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libnbd_edge_cases() {
    let fx = Fixture::new();
    std::fs::File::create(fx.export("raw.img"))
        .unwrap()
        .set_len(4 * MIB as u64)
        .unwrap();
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vpc",
            "-o",
            "subformat=dynamic",
            fx.export("dyn.vhd").to_str().unwrap(),
            "16M",
        ],
    )
    .await;
    let rw = fx.serve(false);
    let ro = fx.serve(true);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/edge_cases.py");
    let out = run(
        "/usr/bin/python3",
        &[script, &rw.uri_template(), &ro.uri_template()],
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.trim_end().ends_with("OK"),
        "edge_cases.py failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    rw.stop().await;
    ro.stop().await;
}
