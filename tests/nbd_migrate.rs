//! Write ownership of NBD exports across nodes: the live-migration handoff under load, by a
//! writer on another node and by `csvctl migrate`, with acknowledged-write checking, fio
//! verification, `csvctl export list`, and the handoff time.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{TestCluster, mnt, run, uri};
use csvd::exports::{ExportRow, Migrated};

const WRITER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/nbd_acked_writes.py");

/// Creates a sparse disk image of `len` bytes through node 1's mount; returns its inode.
fn disk(c: &TestCluster, name: &str, len: u64) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let f = std::fs::File::create(mnt(c, 1).join(name)).unwrap();
    f.set_len(len).unwrap();
    f.metadata().unwrap().ino()
}

fn csvctl(c: &TestCluster, args: &[&str]) -> String {
    let bin = env!("CARGO_BIN_EXE_csvctl");
    let mut all = vec!["--cluster", c.path().to_str().unwrap()];
    all.extend_from_slice(args);
    run(bin, &all)
}

fn exports(c: &TestCluster) -> Vec<ExportRow> {
    serde_json::from_str(&csvctl(c, &["export", "list", "--json"])).unwrap()
}

/// Starts the acknowledged-write checker on `uri` (runs until refused or 60 s).
fn start_writer(uri: &str, seed: u64, report: &Path) -> Child {
    eprintln!("writer seed={seed}");
    Command::new("/usr/bin/python3")
        .args([
            WRITER,
            "write",
            uri,
            "60",
            &seed.to_string(),
            report.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until node `node`'s client of `export` owns it (its first write claimed it).
fn wait_writing(c: &TestCluster, export: &str, node: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rows = exports(c);
        let row = rows.iter().find(|r| r.name == export).unwrap();
        if row.owner_node == Some(node) && row.clients.iter().any(|k| k.node == node && k.owner) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no writer on node {node}: {row:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for the writer; it must have stopped because its writes were refused with EPERM.
fn finish_writer(child: Child, report: &Path) -> serde_json::Value {
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "writer failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap();
    let refused = r["refused"].as_array().unwrap();
    assert!(
        !refused.is_empty(),
        "the old connection's writes were not refused: {stdout}"
    );
    assert!(
        refused.iter().all(|x| x["errno"] == libc::EPERM),
        "refusals must be EPERM: {refused:?}"
    );
    assert!(
        r["acked"].as_object().unwrap().len() > 10,
        "too few acknowledged writes: {r}"
    );
    r
}

fn verify(uri: &str, report: &Path) {
    let out = run(
        "/usr/bin/python3",
        &[WRITER, "verify", uri, report.to_str().unwrap()],
    );
    assert!(out.contains("OK"), "{out}");
}

fn fio(uri: &str, args: &[&str]) -> String {
    let mut all = vec![
        "--name=vm".to_string(),
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
    ];
    all.extend(
        [
            "--bs=4k",
            "--offset=32M",
            "--size=16M",
            "--iodepth=16",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--randseed=42",
            "--verify_state_save=0",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    all.extend(args.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    let out = run("fio", &refs);
    assert!(out.contains("err= 0"), "{out}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handoff_under_load_loses_no_acknowledged_write_and_refuses_the_old_connection() {
    let c = TestCluster::up(2).await;
    let export = "vms/vm1.img";
    std::fs::create_dir(mnt(&c, 1).join("vms")).unwrap();
    disk(&c, export, 48 << 20);
    let tmp = tempfile::tempdir().unwrap();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;

    // 1. A VM writes through node 1 (acknowledged writes recorded).
    let r1 = tmp.path().join("w1.json");
    let w1 = start_writer(&uri(&c, 1, export), seed, &r1);
    wait_writing(&c, export, 1);

    // 2. Meanwhile fio starts writing the same export through node 2: its first write asks
    //    node 1 to hand over; fio runs to completion and verifies with zero errors.
    fio(&uri(&c, 2, export), &["--rw=randwrite", "--do_verify=1"]);
    let report1 = finish_writer(w1, &r1);
    eprintln!(
        "writer on node 1: {} slots acknowledged",
        report1["acked"].as_object().unwrap().len()
    );
    // Every write node 1 acknowledged is there, through either node.
    verify(&uri(&c, 2, export), &r1);
    let rows = exports(&c);
    let row = rows.iter().find(|r| r.name == export).unwrap();
    assert_eq!(row.owner_node, Some(2), "{row:?}");
    assert_eq!(row.write_lock_node, Some(2), "{row:?}");

    // 3. An explicit migration back to node 1 while a writer runs on node 2.
    let r2 = tmp.path().join("w2.json");
    let w2 = start_writer(&uri(&c, 2, export), seed + 1, &r2);
    wait_writing(&c, export, 2);
    let m: Migrated =
        serde_json::from_str(&csvctl(&c, &["migrate", export, "--to", "1", "--json"])).unwrap();
    eprintln!(
        "handoff 2 -> 1: {:.1} ms (command {:.1} ms)",
        m.handoff_ms, m.total_ms
    );
    assert!(m.handed_over && m.to == 1, "{m:?}");
    finish_writer(w2, &r2);
    let rows = exports(&c);
    let row = rows.iter().find(|r| r.name == export).unwrap();
    assert_eq!(
        (row.owner_node, row.write_lock_node),
        (Some(1), Some(1)),
        "{row:?}"
    );
    assert_eq!(row.write_lock_token, Some(m.token));

    // 4. Node 1 continues: fio verifies what node 2's fio wrote, both writers' data is intact
    //    through node 1's export and node 2's mount, and new writes work on node 1.
    fio(&uri(&c, 1, export), &["--rw=randwrite", "--verify_only"]);
    verify(&uri(&c, 1, export), &r2);
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x3c 40M 64k",
            &uri(&c, 1, export),
        ],
    );
    let on_node2 = std::fs::read(mnt(&c, 2).join(export)).unwrap();
    assert!(
        on_node2[40 << 20..(40 << 20) + (64 << 10)]
            .iter()
            .all(|b| *b == 0x3c)
    );
    common::fsck(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_is_a_no_op_for_the_owner_and_info_never_takes_ownership() {
    let c = TestCluster::up(2).await;
    disk(&c, "a.img", 1 << 20);
    // INFO (qemu-img info, nbdinfo) from node 2 does not claim.
    run("nbdinfo", &[&uri(&c, 2, "a.img")]);
    run("qemu-img", &["info", "-f", "raw", &uri(&c, 2, "a.img")]);
    let row = exports(&c).into_iter().find(|r| r.name == "a.img").unwrap();
    assert_eq!(row.owner_node, None, "{row:?}");
    // migrate --to 2 with no clients anywhere: node 2 owns it, ready for a VM.
    let m: Migrated =
        serde_json::from_str(&csvctl(&c, &["migrate", "a.img", "--to", "2", "--json"])).unwrap();
    assert!(!m.handed_over);
    let again: Migrated =
        serde_json::from_str(&csvctl(&c, &["migrate", "a.img", "--to", "2", "--json"])).unwrap();
    assert_eq!(again.token, m.token, "the owner keeps its grant");
    let row = exports(&c).into_iter().find(|r| r.name == "a.img").unwrap();
    assert_eq!((row.owner_node, row.write_lock_node), (Some(2), Some(2)));
    // An unknown export is an error, not a silent success.
    let out = Command::new(env!("CARGO_BIN_EXE_csvctl"))
        .args([
            "--cluster",
            c.path().to_str().unwrap(),
            "migrate",
            "nope.img",
            "--to",
            "1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.img"));
}

/// An owner lock a node's session holds without owning the export (a claim whose answer was
/// lost) does not hold up a writer on another node: the first handoff request has the holder
/// release it, and the write goes through at once instead of waiting out the claim (60 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_lock_held_without_owning_the_export_is_released_on_the_first_request() {
    let c = TestCluster::up(2).await;
    let ino = disk(&c, "a.img", 1 << 20);
    c.acquire(2, &format!("nbd-owner:{ino}")).await.unwrap();
    let t0 = Instant::now();
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 64k",
            &uri(&c, 1, "a.img"),
        ],
    );
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(10), "the write took {took:?}");
    assert!(
        c.log(2)
            .contains("releasing an owner lock this node's session holds"),
        "node 2 did not say it released the lock"
    );
    let row = exports(&c).into_iter().find(|r| r.name == "a.img").unwrap();
    assert_eq!(row.owner_node, Some(1), "{row:?}");
    let data = std::fs::read(mnt(&c, 2).join("a.img")).unwrap();
    assert!(data[..64 << 10].iter().all(|b| *b == 0x5a));
}
