//! Issue 11's test 4, shared by `tests/tests/tc.rs` (this kernel, the clsact path forced) and
//! the kernel matrix (whose guests have no tcx): a SIGKILLed bindtrace leaves its clsact filter
//! (and with it its program) on the port; the next start removes exactly that, while a second,
//! live bindtrace's filter and another tool's filter on the same hook stay.
use std::{
    process::Command,
    time::{Duration, Instant},
};

use crate::{
    Bindtrace, Container, Hook, Netns, Topology,
    native::{ingress_programs, programs_held_by, wait_unloaded},
};

/// `tc -n NS ARGS`, panicking with its stderr on failure; returns stdout.
pub fn tc(ns: &Netns, args: &[&str]) -> String {
    let out = Command::new("tc").arg("-n").arg(&ns.name).args(args).output().expect("run tc");
    assert!(out.status.success(), "tc {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs the scenario on `c`'s port; `timeout` bounds each wait (qemu guests are slow). Panics on
/// a failed check. `--tc-clsact` is a no-op on kernels without tcx.
pub fn sigkill_recovery(topo: &Topology, c: &Container, timeout: Duration) {
    // Another tool's filter on the same ingress hook, there before any bindtrace: a cls_bpf one
    // too (classic BPF that matches nothing, so packets go on to the next filter).
    tc(&topo.host, &["qdisc", "add", "dev", &c.host_veth, "clsact"]);
    let mut add = vec!["filter", "add", "dev", &c.host_veth, "ingress", "pref", "100"];
    add.extend(["bpf", "bytecode", "1,6 0 0 0,", "classid", "1:1"]);
    tc(&topo.host, &add);

    let watching = format!("watching {} (", c.host_veth);
    let start = || {
        let mut bt = Bindtrace::spawn(&topo.host, Hook::Tc, &["--tc-clsact", "--no-metrics"]);
        assert!(bt.wait_ready(timeout), "bindtrace did not become ready:\n{}", bt.stderr());
        assert!(bt.wait_stderr(&watching, timeout), "{}", bt.stderr());
        let ours = programs_held_by(bt.pid());
        let deadline = Instant::now() + timeout;
        while !ingress_programs(&topo.host, &c.host_veth).iter().any(|id| ours.contains(id)) {
            assert!(Instant::now() < deadline, "{} never attached:\n{}", c.host_veth, bt.stderr());
            std::thread::sleep(Duration::from_millis(50));
        }
        (bt, ours)
    };

    let (mut killed, killed_progs) = start();
    let (live, live_progs) = start();
    unsafe { libc::kill(killed.pid() as i32, libc::SIGKILL) };
    killed.stop();
    // What the scenario is about: the dead instance's filter is still there, running its program.
    let left = ingress_programs(&topo.host, &c.host_veth);
    assert!(left.iter().any(|id| killed_progs.contains(id)), "no filter survived the SIGKILL: {left:?}");

    let (restarted, restarted_progs) = start();
    let stderr = restarted.stderr();
    let removed = stderr.lines().find(|l| l.contains("clsact filters that a killed bindtrace left"));
    assert!(removed.is_some_and(|l| l.contains(&c.host_veth)), "{stderr}");
    let now = ingress_programs(&topo.host, &c.host_veth);
    assert!(now.iter().all(|id| !killed_progs.contains(id)), "the dead instance's filter stayed: {now:?}");
    assert_eq!(wait_unloaded(&killed_progs), Vec::<u32>::new(), "the dead instance's programs stay loaded");
    assert!(now.iter().any(|id| live_progs.contains(id)), "the live instance's filter was removed: {now:?}");
    assert!(now.iter().any(|id| restarted_progs.contains(id)), "{now:?}");
    let filters = tc(&topo.host, &["filter", "show", "dev", &c.host_veth, "ingress"]);
    assert!(filters.contains("pref 100 bpf"), "another tool's filter was removed:\n{filters}");
    drop((live, restarted));
}
