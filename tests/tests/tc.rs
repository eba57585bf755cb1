//! The tc hook's attachments: one per port of the selected bridges, following ports as they come
//! and go, and nothing left on any interface after SIGTERM. (detect.rs runs every detection
//! scenario with `--hook tc`; this file checks what it leaves on the interfaces.)
use std::time::{Duration, Instant};

use bindtrace_tests::{
    Bindtrace, Hook, Netns, Topology, is_root,
    native::{ingress_programs, programs_held_by, wait_unloaded},
};

/// Polls `ingress_programs` until `done` holds (rescans are debounced and asynchronous).
fn wait_for(ns: &Netns, ifname: &str, what: &str, done: impl Fn(&[u32]) -> bool) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ids = ingress_programs(ns, ifname);
        if done(&ids) {
            return ids;
        }
        assert!(Instant::now() < deadline, "{ifname}: {what}; attached now: {ids:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn attached_per_port_and_detached_as_ports_leave_and_at_exit() {
    if !is_root() {
        return eprintln!("skipped: needs root");
    }
    let mut topo = Topology::new();
    let a = topo.container();
    let b = topo.container();
    let mut bt = Bindtrace::start(&topo.host, Hook::Tc, &[]);
    let ours = programs_held_by(bt.pid());
    assert!(!ours.is_empty());
    let stderr = bt.stderr();
    assert!(stderr.contains("loaded classifier bt_tc (hook tc: chosen with --hook)"), "{stderr}");

    for c in [&a, &b] {
        let ids = ingress_programs(&topo.host, &c.host_veth);
        assert!(ids.iter().any(|id| ours.contains(id)), "{} not attached: {ids:?}", c.host_veth);
    }
    // Nothing on the bridge itself: only ports carry what leaves a container.
    assert!(ingress_programs(&topo.host, "docker0").iter().all(|id| !ours.contains(id)));

    // A port that leaves the bridge is detached; one that joins is attached.
    topo.host.ip(&["link", "set", &a.host_veth, "nomaster"]);
    wait_for(&topo.host, &a.host_veth, "still attached after leaving docker0", |ids| {
        ids.iter().all(|id| !ours.contains(id))
    });
    topo.host.ip(&["link", "set", &a.host_veth, "master", "docker0"]);
    wait_for(&topo.host, &a.host_veth, "not attached after joining docker0 again", |ids| {
        ids.iter().any(|id| ours.contains(id))
    });
    // A port deleted under it (a container stopping) takes its attachment along, quietly.
    let late = Netns::new("btlate");
    topo.attach(&late, "vtclate0", "eth0", "docker0", 17, 50, false);
    wait_for(&topo.host, "vtclate0", "late port not attached", |ids| ids.iter().any(|id| ours.contains(id)));
    topo.host.ip(&["link", "del", "vtclate0"]);
    std::thread::sleep(Duration::from_millis(300));

    assert_eq!(bt.stop(), Some(0), "{}", bt.stderr());
    assert!(bt.stderr().contains("bindtrace: detached"));
    for c in [&a, &b] {
        let ids = ingress_programs(&topo.host, &c.host_veth);
        assert!(
            ids.iter().all(|id| !ours.contains(id)),
            "{} still attached after SIGTERM: {ids:?}",
            c.host_veth
        );
    }
    assert_eq!(wait_unloaded(&ours), Vec::<u32>::new(), "programs left loaded after SIGTERM");
}

#[test]
fn other_bridges_ports_are_left_alone() {
    if !is_root() {
        return eprintln!("skipped: needs root");
    }
    let mut topo = Topology::new();
    topo.add_bridge("br-other", 21);
    let c = topo.container();
    let other = Netns::new("btoth");
    topo.attach(&other, "vtcoth0", "eth0", "br-other", 21, 2, false);
    let bt = Bindtrace::start(&topo.host, Hook::Tc, &["-i", "docker0"]);
    let ours = programs_held_by(bt.pid());
    assert!(ingress_programs(&topo.host, &c.host_veth).iter().any(|id| ours.contains(id)));
    assert!(ingress_programs(&topo.host, "vtcoth0").iter().all(|id| !ours.contains(id)));
}
