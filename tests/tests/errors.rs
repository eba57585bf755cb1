//! Bad input and bad environments: clear errors, non-zero exits, nothing left loaded.
use std::{process::Command, time::Duration};

use bindtrace_tests::{
    Bindtrace, Hook, Topology,
    bindtrace::binary,
    native::{programs_held_by, still_loaded},
    root_or_skip,
};

#[test]
fn unknown_interface_lists_the_bridges() {
    if !root_or_skip() {
        return;
    }
    let topo = Topology::new();
    let mut bt = Bindtrace::spawn(&topo.host, Hook::KfreeSkb, &["-i", "nosuch0"]);
    let (code, stderr) = bt.wait_exit(Duration::from_secs(20));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("no interface named nosuch0"), "{stderr}");
    assert!(stderr.contains("bridges here: docker0"), "{stderr}");
}

#[test]
fn not_a_bridge_is_refused() {
    if !root_or_skip() {
        return;
    }
    let topo = Topology::new();
    let mut bt = Bindtrace::spawn(&topo.host, Hook::KfreeSkb, &["-i", "lo"]);
    let (code, stderr) = bt.wait_exit(Duration::from_secs(20));
    assert_eq!(code, Some(1));
    assert!(stderr.contains("lo is not a bridge"), "{stderr}");
}

#[test]
fn unprivileged_run_names_the_capabilities() {
    if !root_or_skip() {
        return;
    }
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", &binary()]);
    let mut bt = Bindtrace::spawn_cmd(cmd);
    let (code, stderr) = bt.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(1), "{stderr}");
    for cap in ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", "CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "sudo"] {
        assert!(stderr.contains(cap), "missing {cap} in: {stderr}");
    }
}

#[test]
fn sigterm_detaches_everything() {
    if !root_or_skip() {
        return;
    }
    for hook in [Hook::TcpSendReset, Hook::KfreeSkb, Hook::Tc] {
        let topo = Topology::new();
        let mut bt = Bindtrace::start(&topo.host, hook, &[]);
        let ids = programs_held_by(bt.pid());
        assert!(!ids.is_empty(), "holds its programs while running");
        assert_eq!(still_loaded(&ids), ids);
        assert_eq!(bt.stop(), Some(0), "{}", bt.stderr());
        assert!(bt.stderr().contains("bindtrace: detached"));
        // Program teardown after the last fd closes is asynchronous (RCU): allow a moment.
        let mut left = still_loaded(&ids);
        for _ in 0..100 {
            if left.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
            left = still_loaded(&ids);
        }
        assert!(left.is_empty(), "left loaded after SIGTERM: {left:?}");
    }
}

#[test]
fn bad_flags_are_explained() {
    let out = Command::new(binary()).args(["--ringbuf-size", "1000"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("power of two"));
}
