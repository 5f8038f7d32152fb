//! A LUN shared by hosts: every node has its own view of one block device, and no node may
//! read data that another node overwrote.
//!
//! Two loop devices over one image file stand in for two hosts attached to one SAN LUN: each
//! loop device has a page cache of its own, exactly as each host has one for `/dev/sdX`, and a
//! buffered read through one of them keeps answering from its cache after a write through the
//! other. Node 1 uses one loop device, node 2 the other, both on the default configuration.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{TestCluster, mnt, run, uri, wait_mounted};

/// A loop device over a file, detached when dropped.
struct LoopDev(String);

impl LoopDev {
    fn attach(file: &Path) -> LoopDev {
        let dev = run("losetup", &["-f", "--show", file.to_str().unwrap()]);
        LoopDev(dev.trim().to_string())
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        // A device still open is detached when it is closed (autoclear).
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// Stops node `k` (SIGTERM: it unmounts and flushes) and waits until it is gone.
fn stop(c: &mut TestCluster, k: u64) {
    c.stop(k, libc::SIGTERM, Duration::from_secs(30));
    csvd::cluster::unmount_if_mounted(&mnt(c, k));
}

/// Points node `k`'s configuration at `lun`.
fn use_lun(c: &TestCluster, k: u64, lun: &str) {
    let path = c.path().join(format!("node{k}/node.toml"));
    let toml = std::fs::read_to_string(&path).unwrap();
    let edited: Vec<String> = toml
        .lines()
        .map(|l| {
            if l.starts_with("lun = ") {
                format!("lun = \"{lun}\"")
            } else {
                l.to_string()
            }
        })
        .collect();
    assert_ne!(edited.join("\n"), toml.trim_end(), "no lun line in {toml}");
    std::fs::write(&path, edited.join("\n") + "\n").unwrap();
}

fn qemu_io(cmd: &str, uri: &str) -> String {
    run("qemu-io", &["-f", "raw", "-c", cmd, uri])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_on_separate_page_caches_never_read_data_another_node_overwrote() {
    let mut c = TestCluster::up(2).await;
    // The volume moves from the image file to two loop devices over it: two "hosts".
    stop(&mut c, 2);
    stop(&mut c, 1);
    let lun = c.file.lun.clone();
    let a = LoopDev::attach(&lun);
    let b = LoopDev::attach(&lun);
    use_lun(&c, 1, &a.0);
    use_lun(&c, 2, &b.0);
    c.restart(1);
    c.restart(2);
    wait_mounted(&c, 1, Duration::from_secs(60));
    wait_mounted(&c, 2, Duration::from_secs(60));
    for (k, dev) in [(1, &a.0), (2, &b.0)] {
        let log = c.log(k);
        assert!(
            log.contains(&format!("blockdev+direct:{dev}")),
            "node {k} should open its block device with O_DIRECT by default:\n{log}"
        );
    }

    // Through the mounts: node 2 reads (and would cache) the first version, node 1 replaces
    // it, node 2 must read the second.
    let (m1, m2) = (mnt(&c, 1), mnt(&c, 2));
    std::fs::write(m1.join("f"), vec![0xa1u8; 256 << 10]).unwrap();
    assert!(
        std::fs::read(m2.join("f"))
            .unwrap()
            .iter()
            .all(|b| *b == 0xa1)
    );
    std::fs::write(m1.join("f"), vec![0xb2u8; 256 << 10]).unwrap();
    let seen = std::fs::read(m2.join("f")).unwrap();
    let stale = seen.iter().filter(|b| **b != 0xb2).count();
    assert_eq!(
        stale, 0,
        "node 2 read {stale} bytes that node 1 had overwritten"
    );

    // Through NBD, as a VM that moves between the nodes: node 1 writes, node 2 reads, node 1
    // writes again (taking the export back), node 2 must read the new data.
    let disk = m1.join("vm.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    qemu_io("write -P 0x11 1M 1M", &uri(&c, 1, "vm.img"));
    qemu_io("read -P 0x11 1M 1M", &uri(&c, 2, "vm.img"));
    qemu_io("write -P 0x22 1M 1M", &uri(&c, 1, "vm.img"));
    let out = qemu_io("read -P 0x22 1M 1M", &uri(&c, 2, "vm.img"));
    assert!(
        !out.contains("Pattern verification failed"),
        "node 2 read data node 1 had overwritten:\n{out}"
    );
    common::fsck(&c).await;
    drop(c);
    drop((a, b));
}
