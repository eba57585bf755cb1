//! The tc hook's attachments: one per port of the selected bridges, following ports as they come
//! and go, and nothing left on any interface after SIGTERM. (detect.rs runs every detection
//! scenario with `--hook tc`; this file checks what it leaves on the interfaces.)
use std::time::{Duration, Instant};

use bindtrace_tests::{
    Bindtrace, Hook, Netns, Topology,
    native::{ingress_programs, programs_held_by, wait_unloaded},
    root_or_skip,
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
    if !root_or_skip() {
        return;
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
    if !root_or_skip() {
        return;
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

/// The tc hook runs for every packet leaving a container, so its fast path is measured: packets
/// per second through the bridge without and with `--hook tc`, and the program's own time per
/// packet from the kernel's BPF statistics (BPF_ENABLE_STATS, held only while measuring).
/// `cargo test --release -p bindtrace-tests --test tc -- --ignored --nocapture fast_path`
#[test]
#[ignore = "benchmark; run explicitly"]
fn fast_path_cost() {
    use std::{
        io::Write as _,
        net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
        sync::{
            Arc,
            atomic::{AtomicBool, AtomicU64, Ordering},
        },
    };
    if !root_or_skip() {
        return;
    }
    const ROUND: Duration = Duration::from_secs(3);
    let mut topo = Topology::new();
    let c = topo.container();
    let sink: SocketAddr = "172.17.0.1:9999".parse().unwrap();

    // Small UDP datagrams from the container to the host, as fast as one sender goes; counted
    // where they arrive.
    let udp_round = |topo: &Topology| -> f64 {
        let rx = topo.host.run(|| UdpSocket::bind(sink).unwrap());
        rx.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let got = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let counter = {
            let (got, stop) = (got.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    if rx.recv(&mut buf).is_ok() {
                        got.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        let tx = c.ns.run(|| UdpSocket::bind("0.0.0.0:0").unwrap());
        let t0 = Instant::now();
        while t0.elapsed() < ROUND {
            for _ in 0..256 {
                let _ = tx.send_to(&[0u8; 32], sink);
            }
        }
        let pps = got.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        counter.join().unwrap();
        pps
    };
    // TCP segments (ACK|PSH data, the common case on a busy container) through the same port.
    let tcp_round = |topo: &Topology| {
        let server = topo.host.run(|| TcpListener::bind("172.17.0.1:9998").unwrap());
        let drain = std::thread::spawn(move || {
            let (mut s, _) = server.accept().unwrap();
            let mut buf = [0u8; 65536];
            while std::io::Read::read(&mut s, &mut buf).map(|n| n > 0).unwrap_or(false) {}
        });
        let mut s = c.ns.run(|| TcpStream::connect("172.17.0.1:9998").unwrap());
        s.set_nodelay(true).unwrap();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(1) {
            s.write_all(&[1u8; 100]).unwrap();
        }
        drop(s);
        drain.join().unwrap();
    };
    let stats = |ids: &[u32]| -> (u64, Duration) {
        aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .filter(|p| ids.contains(&p.id()) && p.name_as_str() == Some("bt_tc"))
            .map(|p| (p.run_count(), p.run_time()))
            .next()
            .expect("bt_tc is loaded")
    };

    let mut without = Vec::new();
    let mut with = Vec::new();
    let mut per_packet = Vec::new();
    for _ in 0..3 {
        without.push(udp_round(&topo));
        let bt = Bindtrace::start(&topo.host, Hook::Tc, &[]);
        let ids = programs_held_by(bt.pid());
        let enabled = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");
        let (n0, t0) = stats(&ids);
        with.push(udp_round(&topo));
        let (n1, t1) = stats(&ids);
        per_packet.push(("udp", (t1 - t0).as_nanos() as f64 / (n1 - n0).max(1) as f64, n1 - n0));
        tcp_round(&topo);
        let (n2, t2) = stats(&ids);
        per_packet.push(("tcp", (t2 - t1).as_nanos() as f64 / (n2 - n1).max(1) as f64, n2 - n1));
        // Refusals take the slow path: port lookup, count, and a sample for the first.
        for _ in 0..500 {
            let _ = bindtrace_tests::connect(&topo.host, c.ipv4, 8999);
        }
        let (n3, t3) = stats(&ids);
        per_packet.push(("rst", (t3 - t2).as_nanos() as f64 / (n3 - n2).max(1) as f64, n3 - n2));
        drop(enabled);
        drop(bt);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (a, b) = (median(without.clone()), median(with.clone()));
    println!("udp pps through the bridge, without tc: {without:.0?} (median {a:.0})");
    println!(
        "udp pps through the bridge, with tc:    {with:.0?} (median {b:.0}, {:+.1}%)",
        (b / a - 1.0) * 100.0
    );
    for kind in ["udp", "tcp", "rst"] {
        let v: Vec<f64> = per_packet.iter().filter(|p| p.0 == kind).map(|p| p.1).collect();
        let runs: u64 = per_packet.iter().filter(|p| p.0 == kind).map(|p| p.2).sum();
        println!("bt_tc ns per {kind} packet: {v:.0?} (median {:.0}, {runs} runs)", median(v.clone()));
    }
}

/// Issue 11, test 4, on this kernel with the clsact path forced (`--tc-clsact`); the kernel
/// matrix runs the same scenario on its guests, which have no tcx. See `tc_recovery`.
#[test]
fn after_a_sigkill_the_next_start_removes_what_was_left_and_nothing_else() {
    if !root_or_skip() {
        return;
    }
    let mut topo = Topology::new();
    let c = topo.container();
    bindtrace_tests::tc_recovery::sigkill_recovery(&topo, &c, Duration::from_secs(20));
}
