//! SAN path faults under the real consumers: fio's NBD engine with crc32c verification
//! against node 1's export, and a FUSE file workload on node 1's mount, both running while
//! node 1's nbdkit path goes down, hangs, errors 1% of requests, or slows by 200 ms. Each
//! must see zero errors, read back every write, and node 1 must return to direct I/O.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{TestCluster, mnt};
use csvd::cluster::{ClusterFile, SanMode};
use csvd::config::RedirectorSection;
use csvd::fault::{self, Fault};

fn fast_redirector() -> RedirectorSection {
    RedirectorSection {
        io_timeout_ms: 800,
        probe_interval_ms: 200,
        failback_healthy_ms: 1_500,
        failback_max_ms: 6_000,
        flap_window_ms: 300,
        pause_bound_ms: 10_000,
        peer_retry_ms: 1_000,
        ..RedirectorSection::default()
    }
}

fn inject(c: &mut TestCluster, node: u64, f: Fault) {
    let dir = c.path().to_path_buf();
    let csvd = c.opts.csvd.clone();
    tokio::task::block_in_place(|| fault::inject(&dir, node, f, &mut c.children, &csvd))
        .unwrap_or_else(|e| panic!("fault {f:?} on node {node}: {e:#}"));
    c.file = ClusterFile::load(&dir).unwrap();
}

/// fio over NBD: random 4 KiB writes with crc32c headers, then a verify pass.
fn spawn_fio(uri: String) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let out = Command::new("fio")
            .args([
                "--name=redirect",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=randwrite",
                "--bs=4k",
                "--size=8M",
                "--iodepth=8",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--verify_state_save=0",
                "--rate_iops=600",
            ])
            .output()
            .expect("fio runs");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// FUSE: write + fsync + read back whole files until told to stop; returns (files, errors).
fn spawn_fuse(dir: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(u32, Vec<String>)> {
    std::thread::spawn(move || {
        use std::io::Write;
        let mut errors = Vec::new();
        let mut n = 0u32;
        while !stop.load(Ordering::Relaxed) && n < 400 {
            let path = dir.join(format!("f{}", n % 8));
            let data: Vec<u8> = (0..128 * 1024u32)
                .map(|i| (i.wrapping_mul(31) ^ n) as u8)
                .collect();
            let res = (|| -> std::io::Result<()> {
                let mut f = std::fs::File::create(&path)?;
                f.write_all(&data)?;
                f.sync_all()?;
                drop(f);
                let back = std::fs::read(&path)?;
                if back != data {
                    return Err(std::io::Error::other("read back differs"));
                }
                Ok(())
            })();
            if let Err(e) = res {
                errors.push(format!("{}: {e}", path.display()));
            }
            n += 1;
        }
        (n, errors)
    })
}

async fn wait_path(c: &TestCluster, node: u64, path: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let st = c.client().status().await.unwrap();
        if st.nodes.iter().any(|n| n.id == node && n.path == path) {
            return;
        }
        assert!(Instant::now() < deadline, "node {node} not {path}: {st:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn fault_under_workloads(c: &mut TestCluster, name: &str, fault: Fault) {
    let m1 = mnt(c, 1);
    let dir = m1.join(format!("work-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    let img = format!("work-{name}/fio.img");
    std::fs::File::create(m1.join(&img))
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let uri = format!("nbd://{}/{img}", c.file.node(1).unwrap().nbd);
    let stop = Arc::new(AtomicBool::new(false));
    let fio = spawn_fio(uri);
    let fuse = spawn_fuse(dir.clone(), stop.clone());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let t = Instant::now();
    inject(c, 1, fault);
    if !matches!(fault, Fault::SanFlaky { .. } | Fault::SanSlow { .. }) {
        wait_path(c, 1, "redirected", Duration::from_secs(10)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    inject(c, 1, Fault::SanUp);
    let out = tokio::task::block_in_place(|| fio.join().unwrap());
    stop.store(true, Ordering::Relaxed);
    let (files, errors) = tokio::task::block_in_place(|| fuse.join().unwrap());
    eprintln!(
        "{name}: fault window {:?}, fuse files {files}, fio: {}",
        t.elapsed(),
        out.lines().find(|l| l.contains("err=")).unwrap_or("?")
    );
    assert!(out.contains("err= 0"), "{name}: fio saw errors:\n{out}");
    assert!(
        !out.contains("verify:"),
        "{name}: fio verify failed:\n{out}"
    );
    assert!(errors.is_empty(), "{name}: FUSE errors: {errors:?}");
    assert!(files > 0);
    // The data is the same seen from another node.
    let m2 = mnt(c, 2);
    for i in 0..8u32.min(files) {
        let p = Path::new(&format!("work-{name}")).join(format!("f{i}"));
        assert_eq!(
            std::fs::read(m1.join(&p)).unwrap(),
            std::fs::read(m2.join(&p)).unwrap(),
            "{name}: {} differs between nodes",
            p.display()
        );
    }
    wait_path(c, 1, "direct", Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_fio_verify_and_fuse_workloads_ride_out_every_san_fault() {
    let mut c = TestCluster::up_with(3, |o| {
        o.san = SanMode::Nbdkit;
        o.redirector = fast_redirector();
    })
    .await;
    fault_under_workloads(&mut c, "down", Fault::SanDown).await;
    fault_under_workloads(&mut c, "hang", Fault::SanHang).await;
    fault_under_workloads(&mut c, "flaky", Fault::SanFlaky { rate_pct: 1.0 }).await;
    fault_under_workloads(&mut c, "slow", Fault::SanSlow { delay_ms: 200 }).await;
    common::fsck(&c).await;
}
