//! The FUSE mounts checked with tools no one here wrote: qemu-img/qemu-io on VHD files
//! (dynamic and fixed) written on node 1 and verified on node 2, and fio's crc32c
//! verification across nodes.

mod common;

use common::{TestCluster, fsck, mnt, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_vhd_written_on_node1_reads_back_exactly_on_node2() {
    let c = TestCluster::up(2).await;
    let (m1, m2) = (mnt(&c, 1), mnt(&c, 2));
    let raw = c.path().join("expect.raw");
    for sub in ["dynamic", "fixed"] {
        let f1 = m1.join(format!("{sub}.vhd"));
        let f2 = m2.join(format!("{sub}.vhd"));
        let (f1, f2) = (f1.to_str().unwrap(), f2.to_str().unwrap());
        run(
            "qemu-img",
            &[
                "create",
                "-f",
                "vpc",
                "-o",
                &format!("subformat={sub}"),
                f1,
                "48M",
            ],
        );
        run(
            "qemu-io",
            &[
                "-f",
                "vpc",
                "-c",
                "write -P 0xab 0 3M",
                "-c",
                "write -P 0xcd 7M 512k",
                "-c",
                "write -P 0x5a 40M 4k",
                "-c",
                "write -z 1M 64k",
                f1,
            ],
        );
        // Node 2 opens the file after node 1's qemu-io exited (closed it).
        run(
            "qemu-io",
            &[
                "-f",
                "vpc",
                "-c",
                "read -P 0xab 0 1M",
                "-c",
                "read -P 0 1M 64k",
                "-c",
                "read -P 0xab 1088k 1984k",
                "-c",
                "read -P 0 3M 4M",
                "-c",
                "read -P 0xcd 7M 512k",
                "-c",
                "read -P 0x5a 40M 4k",
                f2,
            ],
        );
        // The same image converted on node 1 compares identical from node 2.
        run(
            "qemu-img",
            &[
                "convert",
                "-f",
                "vpc",
                "-O",
                "raw",
                f1,
                raw.to_str().unwrap(),
            ],
        );
        let out = run(
            "qemu-img",
            &[
                "compare",
                "-f",
                "vpc",
                "-F",
                "raw",
                f2,
                raw.to_str().unwrap(),
            ],
        );
        assert!(out.contains("identical"), "{out}");
    }
    fsck(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_crc32c_data_written_on_one_node_verifies_on_another() {
    let c = TestCluster::up(2).await;
    let (m1, m2) = (mnt(&c, 1), mnt(&c, 2));
    let args = |m: &std::path::Path, extra: &[&str]| {
        let mut v: Vec<String> = [
            "--name=v",
            "--size=24M",
            "--bs=16k",
            "--rw=randwrite",
            "--ioengine=libaio",
            "--iodepth=16",
            "--direct=1",
            "--verify=crc32c",
            "--randseed=4242",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.push(format!("--filename={}", m.join("fio.dat").display()));
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let w = args(&m1, &["--do_verify=0", "--verify_state_save=0"]);
    run("fio", &w.iter().map(String::as_str).collect::<Vec<_>>());
    let r = args(&m2, &["--verify_only=1", "--verify_state_load=0"]);
    let out = run("fio", &r.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.contains("err= 0"), "{out}");
    // And a verify on the writing node after the other node read it.
    let out = run(
        "fio",
        &args(&m1, &["--verify_only=1", "--verify_state_load=0"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(out.contains("err= 0"), "{out}");
    fsck(&c).await;
}
