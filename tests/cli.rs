//! The csvctl binary end to end: `cluster up --detach`, the JSON contracts of
//! `cluster.json` and `status --json`, and `cluster down` leaving nothing behind.

mod common;

use std::process::Command;

use csvd::cluster;

fn csvctl() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_csvctl"));
    c.env("CSVD_BIN", env!("CARGO_BIN_EXE_csvd"));
    c
}

#[test]
fn csvctl_cluster_up_status_and_down_keep_their_json_contracts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("c");
    let out = csvctl()
        .args([
            "cluster",
            "up",
            "--nodes",
            "3",
            "--lun-size",
            "128M",
            "--detach",
            "--dir",
        ])
        .arg(&d)
        .output()
        .unwrap();
    if !out.status.success() {
        common::dump_logs(&d);
        common::kill_everything(&d);
        panic!(
            "cluster up failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("Next:"),
        "cluster up must say what to do next:\n{stdout}"
    );

    // cluster.json contract
    let cj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("cluster.json")).unwrap()).unwrap();
    assert!(cj["lun"].as_str().unwrap().ends_with("lun.img"));
    assert_eq!(cj["volume_uuid"].as_str().unwrap().len(), 36);
    let nodes = cj["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(n["id"].as_u64().unwrap(), i as u64 + 1);
        assert!(n["pid"].as_u64().unwrap() > 0);
        assert!(n["rpc"].as_str().unwrap().starts_with("127.0.0.1:"));
        assert!(n["nbd"].as_str().unwrap().starts_with("127.0.0.1:"));
        assert!(n["mount"].as_str().unwrap().starts_with('/'));
        assert!(n["san"].is_string());
        assert!(n["san_pid"].is_null());
    }

    // status --json contract, through CSV_CLUSTER
    let out = csvctl()
        .env("CSV_CLUSTER", &d)
        .args(["status", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let leader = st["leader"].as_u64().expect("a leader");
    assert!(st["term"].as_u64().unwrap() >= 1);
    let sn = st["nodes"].as_array().unwrap();
    assert_eq!(sn.len(), 3);
    for n in sn {
        let role = n["role"].as_str().unwrap();
        assert!(["leader", "voter", "learner"].contains(&role));
        assert_eq!(role == "leader", n["id"].as_u64() == Some(leader));
        assert_eq!(n["alive"], serde_json::Value::Bool(true));
        assert_eq!(n["path"], "direct");
        assert!(n["reason"].is_null());
    }

    // The other read commands answer JSON too.
    for cmd in ["nodes", "locks"] {
        let out = csvctl()
            .arg("--cluster")
            .arg(&d)
            .args([cmd, "--json"])
            .output()
            .unwrap();
        assert!(out.status.success());
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(v.is_array(), "{cmd}: {v}");
    }

    // A second `cluster up` on a running cluster is refused.
    let out = csvctl()
        .args(["cluster", "up", "--nodes", "3", "--detach", "--dir"])
        .arg(&d)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already running"));

    let pids: Vec<u32> = nodes
        .iter()
        .map(|n| n["pid"].as_u64().unwrap() as u32)
        .collect();
    let out = csvctl()
        .args(["cluster", "down", "--dir"])
        .arg(&d)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for p in pids {
        common::wait_until(std::time::Duration::from_secs(5), "node exit", || {
            !cluster::pid_alive(p)
        });
    }
    for n in nodes {
        assert!(!cluster::is_mounted(std::path::Path::new(
            n["mount"].as_str().unwrap()
        )));
    }
}

#[test]
fn csvctl_format_refuses_to_overwrite_a_volume_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let lun = dir.path().join("lun.img");
    std::fs::File::create(&lun)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let run = |extra: &[&str]| {
        csvctl()
            .args(["format", "--json", "--lun"])
            .arg(&lun)
            .args(extra)
            .output()
            .unwrap()
    };
    let first = run(&[]);
    assert!(first.status.success());
    let v: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    let uuid = v["volume_uuid"].as_str().unwrap().to_string();
    let again = run(&[]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains(&uuid));
    let keep = run(&["--keep-existing"]);
    assert!(keep.status.success());
    let v: serde_json::Value = serde_json::from_slice(&keep.stdout).unwrap();
    assert_eq!(v["volume_uuid"], uuid.as_str());
    let forced = run(&["--force"]);
    assert!(forced.status.success());
    let v: serde_json::Value = serde_json::from_slice(&forced.stdout).unwrap();
    assert_ne!(v["volume_uuid"], uuid.as_str());
}

/// The harness starts processes through `csvctl __spawner` (see `src/spawner.rs`).
#[test]
fn the_spawner_starts_programs_with_their_arguments_and_log_and_reports_failures() {
    use csvd::spawner::{SpawnSpec, Spawner};
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("out.log");
    let mut s = Spawner::start(std::path::Path::new(env!("CARGO_BIN_EXE_csvctl"))).unwrap();
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c").arg("echo hello $0").arg("there");
    let pid = s.spawn(&SpawnSpec::from_command(&cmd, &log)).unwrap();
    assert!(pid > 0);
    common::wait_until(std::time::Duration::from_secs(10), "the output", || {
        std::fs::read_to_string(&log).unwrap_or_default() == "hello there\n"
    });
    let missing = SpawnSpec::from_command(&Command::new("/nonexistent/x"), &log);
    let e = s.spawn(&missing).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/x"), "{e}");
}
