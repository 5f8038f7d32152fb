//! Real NBD clients against csvd's volume exports: qemu-img, qemu-io, nbdinfo, nbdcopy, fio,
//! python3-libnbd edge cases and malformed traffic, and a VHD made by qemu on the volume,
//! written through one node's decoded export and read back through another node's mount.

mod common;

use std::path::Path;

use common::{TestCluster, mnt, run, uri};

/// `nbd://HOST:PORT/NAME` of node `k`.
fn sized_file(path: &Path, size: u64) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
}

/// Deterministic bytes for reference images.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn py(args: &[&str]) -> String {
    let out = run("/usr/bin/python3", args);
    assert!(out.trim_end().ends_with("OK"), "{args:?}: {out}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_tools_and_fio_work_against_volume_exports_on_any_node() {
    let c = TestCluster::up(2).await;
    let m1 = mnt(&c, 1);
    std::fs::create_dir(m1.join("vms")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src.raw");
    let src_bytes = pattern(8 << 20, 11);
    std::fs::write(&src, &src_bytes).unwrap();
    sized_file(&m1.join("vms/disk.img"), 8 << 20);

    // qemu-img: info, convert into node 1's export, compare through node 2's export.
    let info = run(
        "qemu-img",
        &["info", "-f", "raw", &uri(&c, 1, "vms/disk.img")],
    );
    assert!(info.contains("virtual size: 8 MiB"), "{info}");
    run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            &uri(&c, 1, "vms/disk.img"),
        ],
    );
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            src.to_str().unwrap(),
            &uri(&c, 2, "vms/disk.img"),
        ],
    );

    // qemu-io: patterns, discard, write -z (node 2 writes, node 1 reads).
    sized_file(&m1.join("vms/io.img"), 4 << 20);
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 1M",
            "-c",
            "write -P 0xa5 1M 64k",
            "-c",
            "discard 0 64k",
            "-c",
            "write -z 2M 128k",
            "-c",
            "write -P 0x77 3M 4k",
            &uri(&c, 2, "vms/io.img"),
        ],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0 0 64k",
            "-c",
            "read -P 0x5a 64k 960k",
            "-c",
            "read -P 0xa5 1M 64k",
            "-c",
            "read -P 0 2M 128k",
            "-c",
            "read -P 0x77 3M 4k",
            &uri(&c, 1, "vms/io.img"),
        ],
    );

    // nbdinfo: the list names every file by path; the map shows holes and data.
    let list = run("nbdinfo", &["--list", &uri(&c, 2, "")]);
    for name in ["vms/disk.img", "vms/io.img"] {
        assert!(list.contains(&format!("export=\"{name}\"")), "{list}");
    }
    sized_file(&m1.join("vms/sparse.img"), 8 << 20);
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 1 4M 64k",
            &uri(&c, 1, "vms/sparse.img"),
        ],
    );
    let map = run("nbdinfo", &["--map", &uri(&c, 2, "vms/sparse.img")]);
    let kinds: Vec<&str> = map
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .collect();
    assert!(
        kinds.contains(&"hole,zero") && kinds.contains(&"data"),
        "{map}"
    );
    assert!(map.contains("4194304"), "data at 4 MiB: {map}");

    // nbdcopy between two nodes' exports.
    sized_file(&m1.join("vms/copy.img"), 8 << 20);
    run(
        "nbdcopy",
        &[&uri(&c, 1, "vms/disk.img"), &uri(&c, 2, "vms/copy.img")],
    );
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            src.to_str().unwrap(),
            &uri(&c, 1, "vms/copy.img"),
        ],
    );

    // fio's nbd engine with crc32c verification, pipelined.
    sized_file(&m1.join("vms/fio.img"), 16 << 20);
    let out = run(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={}", uri(&c, 2, "vms/fio.img")),
            "--rw=randwrite",
            "--bs=4k",
            "--size=16M",
            "--iodepth=16",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_state_save=0",
            "--verify_fatal=1",
        ],
    );
    assert!(out.contains("err= 0"), "{out}");

    // 1 MiB blocks written through node 2, verified through both nodes (large reads are
    // sent from the LUN's mapping, the default; the copied and spliced paths, `[nbd] reads`,
    // are tested in nbd-backend's protocol tests).
    sized_file(&m1.join("vms/seq.img"), 32 << 20);
    let seq = |node: u64, extra: &str| {
        let out = run(
            "fio",
            &[
                "--name=seq",
                "--ioengine=nbd",
                &format!("--uri={}", uri(&c, node, "vms/seq.img")),
                "--rw=write",
                "--bs=1M",
                "--size=32M",
                "--iodepth=8",
                "--verify=crc32c",
                "--verify_state_save=0",
                "--verify_fatal=1",
                extra,
            ],
        );
        assert!(out.contains("err= 0"), "{out}");
    };
    seq(2, "--do_verify=1");
    seq(1, "--verify_only=1");
    seq(2, "--verify_only=1");

    // The FUSE view agrees with what the exports wrote.
    assert_eq!(
        std::fs::read(mnt(&c, 2).join("vms/disk.img")).unwrap(),
        src_bytes
    );
    common::fsck(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libnbd_edge_cases_and_malformed_traffic_are_handled_by_a_volume_export() {
    let c = TestCluster::up(1).await;
    let m = mnt(&c, 1);
    sized_file(&m.join("raw.img"), 4 << 20);
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vpc",
            "-o",
            "subformat=dynamic",
            m.join("dyn.vhd").to_str().unwrap(),
            "16M",
        ],
    );
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/nbd-backend/tests/py/edge_cases.py"
    );
    py(&[script, &uri(&c, 1, "{}"), "-"]);

    sized_file(&m.join("scratch.img"), 8 << 20);
    std::fs::write(m.join("keep.img"), pattern(2 << 20, 3)).unwrap();
    let seed = common_seed();
    let node = &c.file.node(1).unwrap().nbd;
    let (host, port) = node.rsplit_once(':').unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/nbd_malformed.py");
    py(&[
        script,
        host,
        port,
        "scratch.img",
        "keep.img",
        &seed.to_string(),
        "300",
    ]);
    assert_eq!(
        std::fs::read(m.join("keep.img")).unwrap(),
        pattern(2 << 20, 3)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_without_write_permission_is_exported_read_only_on_every_node() {
    use std::os::unix::fs::PermissionsExt;
    let c = TestCluster::up(2).await;
    let m1 = mnt(&c, 1);
    let bytes = pattern(1 << 20, 21);
    std::fs::write(m1.join("gold.img"), &bytes).unwrap();
    std::fs::set_permissions(m1.join("gold.img"), std::fs::Permissions::from_mode(0o444)).unwrap();

    for k in [1, 2] {
        let info = run("nbdinfo", &["--json", &uri(&c, k, "gold.img")]);
        assert!(info.contains("\"is_read_only\": true"), "node {k}: {info}");
    }
    // qemu-io cannot open it for writing; a read-only open reads the file.
    let out = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 7 0 4k",
            &uri(&c, 1, "gold.img"),
        ])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "qemu-io opened a read-only export for writing"
    );
    let read = run(
        "qemu-io",
        &[
            "-r",
            "-f",
            "raw",
            "-c",
            "read -v 0 16",
            &uri(&c, 2, "gold.img"),
        ],
    );
    let first: String = bytes[..4].iter().map(|b| format!("{b:02x} ")).collect();
    assert!(read.contains(first.trim_end()), "{read}");
    // A client that writes anyway (libnbd ignores the flag when asked to) gets EPERM.
    py(&[
        "-c",
        concat!(
            "import nbd, sys\n",
            "h = nbd.NBD()\n",
            "h.connect_uri(sys.argv[1])\n",
            "assert h.is_read_only()\n",
            "h.set_strict_mode(0)\n",
            "for op in (lambda: h.pwrite(b'x' * 512, 0), lambda: h.zero(4096, 0), lambda: h.trim(4096, 0)):\n",
            "    try:\n",
            "        op()\n",
            "        raise SystemExit('a write to a read-only export succeeded')\n",
            "    except nbd.Error as e:\n",
            "        assert e.errno == 'EPERM', e\n",
            "print('OK')\n",
        ),
        &uri(&c, 1, "gold.img"),
    ]);
    assert_eq!(std::fs::read(m1.join("gold.img")).unwrap(), bytes);
    let list = run(
        env!("CARGO_BIN_EXE_csvctl"),
        &["--cluster", c.path().to_str().unwrap(), "export", "list"],
    );
    assert!(
        list.lines()
            .any(|l| l.starts_with("gold.img") && l.contains("raw ro")),
        "{list}"
    );

    // chmod u+w: new connections may write.
    std::fs::set_permissions(m1.join("gold.img"), std::fs::Permissions::from_mode(0o644)).unwrap();
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 7 0 4k",
            &uri(&c, 2, "gold.img"),
        ],
    );
    assert_eq!(
        std::fs::read(m1.join("gold.img")).unwrap()[..4096],
        [7u8; 4096]
    );
}

/// A seed from the clock (printed; set NBD_FUZZ_SEED to replay).
fn common_seed() -> u64 {
    let seed = std::env::var("NBD_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("NBD_FUZZ_SEED={seed}");
    seed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_vhd_written_through_node1s_decoded_export_reads_back_identically_on_node2() {
    let c = TestCluster::up(2).await;
    let vhd1 = mnt(&c, 1).join("guest.vhd");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vpc",
            "-o",
            "subformat=dynamic",
            vhd1.to_str().unwrap(),
            "32M",
        ],
    );
    // The decoded export is the virtual disk: write patterns into three VHD blocks.
    let export = uri(&c, 1, "guest.vhd");
    let info = run("qemu-img", &["info", "-f", "raw", &export]);
    let vsize: u64 = info
        .split("virtual size: ")
        .nth(1)
        .and_then(|s| s.split('(').nth(1))
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no virtual size in {info}"));
    let tail = vsize - (64 << 10);
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x11 0 1M",
            "-c",
            "write -P 0x22 5M 512k",
            "-c",
            &format!("write -P 0x33 {tail} 64k"),
            &export,
        ],
    );
    let mut want = vec![0u8; vsize as usize];
    want[..1 << 20].fill(0x11);
    want[5 << 20..(5 << 20) + (512 << 10)].fill(0x22);
    want[tail as usize..].fill(0x33);

    // Node 2 reads the VHD file through its own mount, with qemu's own vpc driver.
    let vhd2 = mnt(&c, 2).join("guest.vhd");
    let out = tempfile::tempdir().unwrap();
    let raw = out.path().join("guest.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "vpc",
            "-O",
            "raw",
            vhd2.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    let got = std::fs::read(&raw).unwrap();
    assert_eq!(got.len(), want.len());
    assert!(
        got == want,
        "the VHD read back on node 2 differs from what was written"
    );
    // Only the written blocks were allocated (the export is thin).
    let map = run(
        "qemu-img",
        &["map", "-f", "vpc", "--output=json", vhd2.to_str().unwrap()],
    );
    assert!(map.contains("\"data\": false"), "{map}");
    common::fsck(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_acknowledged_with_fua_or_flush_survive_a_crash_of_the_serving_node() {
    let mut c = TestCluster::up(3).await;
    let (leader, follower, _) = c.leader_and_followers().await;
    sized_file(&mnt(&c, leader).join("d.img"), 8 << 20);
    // Through the follower's export: a FUA write into a hole (new allocation, so Raft is in
    // the path), a plain write then FLUSH, and a last write with neither.
    let script = r#"
import sys, nbd
h = nbd.NBD(); h.connect_uri(sys.argv[1])
h.pwrite(b"\x11" * 65536, 1 << 20, nbd.CMD_FLAG_FUA)
h.pwrite(b"\x22" * 65536, 3 << 20)
h.flush()
h.pwrite(b"\x33" * 4096, 5 << 20)
print("OK")
"#;
    let out = run(
        "/usr/bin/python3",
        &["-c", script, &uri(&c, follower, "d.img")],
    );
    assert!(out.contains("OK"), "{out}");
    // Crash: no disconnect, no flush, no release of locks.
    c.kill9(follower);
    // The leader's export reads what was acknowledged durable (once the dead node's lock
    // expires with its session).
    let check = r#"
import sys, nbd
h = nbd.NBD(); h.connect_uri(sys.argv[1])
assert h.pread(65536, 1 << 20) == b"\x11" * 65536, "FUA write lost"
assert h.pread(65536, 3 << 20) == b"\x22" * 65536, "flushed write lost"
print("OK")
"#;
    let out = run(
        "/usr/bin/python3",
        &["-c", check, &uri(&c, leader, "d.img")],
    );
    assert!(out.contains("OK"), "{out}");
    common::fsck(&c).await;
}
