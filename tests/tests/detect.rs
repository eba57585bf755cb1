//! The detector end to end, for each hook: real kernel, real namespaces, real sockets.
//! Run as root through `sudo ./x test` (one test at a time).
use std::{net::IpAddr, time::Duration};

use bindtrace_tests::{
    Bindtrace, Container, Hook, Listener, Netns, Topology, connect, listener_pids, root_or_skip,
    snmp_out_rsts,
};

/// Instantiates a scenario `fn name(hook: Hook)` once per hook.
macro_rules! for_each_hook {
    ($($name:ident),* $(,)?) => {
        mod tcp_send_reset { $( #[test] fn $name() { if super::root_or_skip() { super::$name(super::Hook::TcpSendReset) } } )* }
        mod kfree_skb { $( #[test] fn $name() { if super::root_or_skip() { super::$name(super::Hook::KfreeSkb) } } )* }
        mod tc { $( #[test] fn $name() { if super::root_or_skip() { super::$name(super::Hook::Tc) } } )* }
    };
}

for_each_hook!(
    loopback_v4,
    loopback_v6_only_listener,
    no_listener_names_what_listens,
    no_listener_in_namespace_without_process,
    other_address_and_wrong_family,
    healthy_listener_and_dead_server_are_silent,
    listeners_before_after_and_preforked,
    scope_is_the_selected_bridge_only,
    ports_that_join_and_leave,
    container_on_two_bridges,
    folding_adds_up_with_a_tiny_ring_buffer,
);

fn refused(c: &Container, host: &Netns, addr: IpAddr, port: u16) {
    let err = connect(host, addr, port).expect_err("connection should be refused");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "to {addr}:{port} from {}", c.ns.name);
}

fn loopback_v4(hook: Hook) {
    let mut topo = Topology::new();
    let c = topo.container();
    let server = Listener::start(&c.ns.name, "127.0.0.1", 8000, &[]);
    let bt = Bindtrace::start(&topo.host, hook, &[]);
    refused(&c, &topo.host, c.ipv4, 8000);
    let line = bt.expect_refused(8000);
    assert_eq!(line["verdict"], "loopback_only", "{line:#}");
    assert_eq!(line["proto"], "tcp");
    assert_eq!(line["target_ip"], c.ipv4.to_string());
    assert_eq!(line["client_ip"], topo.gateway_v4().to_string());
    assert!(line["client_port"].as_u64().unwrap() > 0);
    assert_eq!(line["bridge"], "docker0");
    assert_eq!(line["hook"], hook.arg());
    assert_eq!(line["netns"], c.ns.inode());
    assert!(line["netns_cookie"].as_u64().unwrap() > 0);
    assert!(line["ktime_ns"].as_u64().unwrap() > 0);
    assert!(line["time"].as_str().unwrap().ends_with('Z'));
    assert_eq!(line["count"], 1);
    assert_eq!(line["listeners"][0]["ip"], "127.0.0.1");
    assert_eq!(line["listeners"][0]["port"], 8000);
    assert_eq!(listener_pids(&line, 0), vec![server.pid() as u64]);
    assert_eq!(line["listeners"][0]["pids"][0]["comm"], "python3");
    let hint = line["hint"].as_str().unwrap();
    assert!(hint.contains("0.0.0.0:8000") && hint.contains("-p 127.0.0.1:8000:8000"), "{hint}");
}

fn loopback_v6_only_listener(hook: Hook) {
    let mut topo = Topology::new();
    let c = topo.container();
    let _server = Listener::start(&c.ns.name, "::1", 8001, &[]);
    let bt = Bindtrace::start(&topo.host, hook, &[]);
    refused(&c, &topo.host, c.ipv4, 8001);
    let v4 = bt.expect_line("over IPv4", Duration::from_secs(5), |l| {
        l["target_port"] == 8001 && l["family"] == "ipv4"
    });
    assert_eq!(v4["verdict"], "loopback_only", "{v4:#}");
    assert_eq!(v4["listeners"][0]["ip"], "::1");
    refused(&c, &topo.host, c.ipv6, 8001);
    let v6 = bt.expect_line("over IPv6", Duration::from_secs(5), |l| {
        l["target_port"] == 8001 && l["family"] == "ipv6"
    });
    assert_eq!(v6["verdict"], "loopback_only", "{v6:#}");
    assert_eq!(v6["target_ip"], c.ipv6.to_string());
    assert_eq!(v6["listeners"][0]["ip"], "::1");
}

fn no_listener_names_what_listens(hook: Hook) {
    let mut topo = Topology::new();
    let c = topo.container();
    let _other = Listener::start(&c.ns.name, "0.0.0.0", 3000, &[]);
    let bt = Bindtrace::start(&topo.host, hook, &[]);
    refused(&c, &topo.host, c.ipv4, 8002);
    let line = bt.expect_refused(8002);
    assert_eq!(line["verdict"], "no_listener", "{line:#}");
    assert!(line["listeners"].as_array().unwrap().iter().any(|l| l["port"] == 3000), "{line:#}");
    assert!(line["hint"].as_str().unwrap().contains("3000"));
}

fn no_listener_in_namespace_without_process(hook: Hook) {
    let mut topo = Topology::new();
    let c = topo.container();
    let bt = Bindtrace::start(&topo.host, hook, &[]);
    refused(&c, &topo.host, c.ipv4, 8003);
    let line = bt.expect_refused(8003);
    assert_eq!(line["verdict"], "no_listener", "{line:#}");
    assert_eq!(line["listeners"], serde_json::json!([]));
    assert_eq!(line["netns"], c.ns.inode());
}

fn other_address_and_wrong_family(hook: Hook) {
    let mut topo = Topology::new();
    let c = topo.container();
    c.ns.ip(&["addr", "add", "10.123.0.7/32", "dev", "lo"]);
    let _specific = Listener::start(&c.ns.name, "10.123.0.7", 8004, &[]);
    let _v4_only = Listener::start(&c.ns.name, "0.0.0.0", 8005, &[]);
    let _v6_only = Listener::start(&c.ns.name, "::", 8006, &["--v6only"]);
    let bt = Bindtrace::start(&topo.host, hook, &[]);

    refused(&c, &topo.host, c.ipv4, 8004);
    let line = bt.expect_refused(8004);
    assert_eq!(line["verdict"], "other_address", "{line:#}");
    assert_eq!(line["listeners"][0]["ip"], "10.123.0.7");

    refused(&c, &topo.host, c.ipv6, 8005);
    let line = bt.expect_refused(8005);
    assert_eq!(line["verdict"], "wrong_family", "{line:#}");
    assert_eq!(line["listeners"][0]["ip"], "0.0.0.0");

    refused(&c, &topo.host, c.ipv4, 8006);
    let line = bt.expect_refused(8006);
    assert_eq!(line["verdict"], "wrong_family", "{line:#}");
    assert!(line["hint"].as_str().unwrap().contains("IPV6_V6ONLY"));
}

fn healthy_listener_and_dead_server_are_silent(hook: Hook) {
    use std::io::{Read, Write};
    let mut topo = Topology::new();
    let c = topo.container();
    let healthy = Listener::start(&c.ns.name, "0.0.0.0", 8007, &[]);
    let mut bt = Bindtrace::start(&topo.host, hook, &[]);
    let mut s = connect(&topo.host, c.ipv4, 8007).expect("healthy listener accepts");
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.contains("200 OK"));

    // A server killed while a client keeps sending: the resets answer data, not SYNs.
    let victim = Listener::start(&c.ns.name, "0.0.0.0", 8008, &[]);
    let mut s = connect(&topo.host, c.ipv4, 8008).expect("connect");
    drop(victim);
    for _ in 0..20 {
        if s.write_all(b"more data\n").is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Both negative checks after the exit flush.
    bt.expect_no_refused_after_exit(8007);
    bt.expect_no_refused_after_exit(8008);
    drop(healthy);
}

fn listeners_before_after_and_preforked(hook: Hook) {
    let mut topo = Topology::new();
    let c = topo.container();
    let before = Listener::start(&c.ns.name, "127.0.0.1", 8010, &[]);
    let bt = Bindtrace::start(&topo.host, hook, &[]);
    let after = Listener::start(&c.ns.name, "127.0.0.1", 8011, &[]);
    let forked = Listener::start(&c.ns.name, "127.0.0.1", 8012, &["--fork", "3"]);
    let reuse = Listener::start(&c.ns.name, "127.0.0.1", 8013, &["--reuseport", "2"]);
    for (port, l) in [(8010, &before), (8011, &after), (8012, &forked), (8013, &reuse)] {
        refused(&c, &topo.host, c.ipv4, port);
        let line = bt.expect_refused(port);
        assert_eq!(line["verdict"], "loopback_only", "{line:#}");
        let mut named: Vec<u64> = line["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|l| l["pids"].as_array().unwrap().iter().map(|p| p["pid"].as_u64().unwrap()))
            .collect();
        named.sort();
        named.dedup();
        let mut want: Vec<u64> = l.pids.iter().map(|p| *p as u64).collect();
        want.sort();
        assert_eq!(named, want, "port {port}: {line:#}");
    }
    let line = bt.expect_refused(8013);
    assert_eq!(line["listeners"].as_array().unwrap().len(), 2, "two SO_REUSEPORT sockets: {line:#}");
}

fn scope_is_the_selected_bridge_only(hook: Hook) {
    // A second "host" with its own docker0 and the very same addresses: not ours.
    let mut topo = Topology::new();
    let mut other = Topology::new();
    let ours = topo.container();
    let theirs = other.container();
    assert_eq!(ours.ipv4, theirs.ipv4);
    let _a = Listener::start(&ours.ns.name, "127.0.0.1", 8020, &[]);
    let _b = Listener::start(&theirs.ns.name, "127.0.0.1", 8020, &[]);
    let mut bt = Bindtrace::start(&topo.host, hook, &[]);
    refused(&theirs, &other.host, theirs.ipv4, 8020);
    refused(&ours, &topo.host, ours.ipv4, 8020);
    let line = bt.expect_refused(8020);
    assert_eq!(line["netns"], ours.ns.inode());
    // After the exit flush: theirs never got a line, ours exactly one.
    let theirs_ns = theirs.ns.inode();
    bt.expect_none_after_exit("refused in the other topology", |l| {
        l["event"] == "refused" && l["netns"] == theirs_ns
    });
    assert_eq!(bt.lines().iter().filter(|l| l["event"] == "refused").count(), 1);
}

fn ports_that_join_and_leave(hook: Hook) {
    let topo = Topology::new();
    let mut bt = Bindtrace::start(&topo.host, hook, &[]);
    // Joins after start, in Docker's order (the host side is enslaved, then the peer moves).
    let ns = Netns::new("btlate");
    topo.attach(&ns, "vlate0", "eth0", "docker0", 17, 40, false);
    let _server = Listener::start(&ns.name, "127.0.0.1", 8030, &[]);
    let addr: IpAddr = "172.17.0.40".parse().unwrap();
    let mut caught = None;
    for _ in 0..30 {
        let _ = connect(&topo.host, addr, 8030);
        if let Some(l) = bt.lines().into_iter().find(|l| l["target_port"] == 8030) {
            caught = Some(l);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let line = caught.unwrap_or_else(|| panic!("late joiner not caught:\n{}", bt.stderr()));
    assert_eq!(line["verdict"], "loopback_only");
    assert_eq!(line["netns"], ns.inode());

    // Leaves docker0 but stays reachable over a direct link on the same eth0: out of scope.
    topo.host.ip(&["link", "set", "vlate0", "nomaster"]);
    topo.host.ip(&["addr", "add", "172.31.0.1/24", "dev", "vlate0"]);
    ns.ip(&["addr", "add", "172.31.0.40/24", "dev", "eth0"]);
    assert!(bt.wait_stderr("vlate0 left scope", Duration::from_secs(5)), "{}", bt.stderr());
    let err = connect(&topo.host, "172.31.0.40".parse().unwrap(), 8030).expect_err("refused");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    // After the exit flush, which prints everything counted: a port that left is not watched.
    bt.expect_none_after_exit("refused over the direct link", |l| l["target_ip"] == "172.31.0.40");
}

fn container_on_two_bridges(hook: Hook) {
    let mut topo = Topology::new();
    topo.add_bridge("br-two", 19);
    let c = topo.container();
    topo.attach(&c.ns, &format!("{}b", c.host_veth), "eth1", "br-two", 19, 2, false);
    let _server = Listener::start(&c.ns.name, "127.0.0.1", 8040, &[]);
    let two: IpAddr = "172.19.0.2".parse().unwrap();
    {
        let mut bt = Bindtrace::start(&topo.host, hook, &["-i", "docker0"]);
        refused(&c, &topo.host, two, 8040);
        refused(&c, &topo.host, c.ipv4, 8040);
        let line = bt.expect_refused(8040);
        assert_eq!(line["bridge"], "docker0");
        bt.expect_none_after_exit("refused on the unwatched br-two", |l| {
            l["event"] == "refused" && l["target_ip"] == "172.19.0.2"
        });
    }
    let bt = Bindtrace::start(&topo.host, hook, &["-i", "docker0", "-i", "br-two"]);
    refused(&c, &topo.host, two, 8040);
    let line = bt.expect_refused(8040);
    assert_eq!(line["bridge"], "br-two", "{line:#}");
    assert_eq!(line["target_ip"], "172.19.0.2");
}

fn folding_adds_up_with_a_tiny_ring_buffer(hook: Hook) {
    let mut topo = Topology::new();
    let c = topo.container();
    let _server = Listener::start(&c.ns.name, "127.0.0.1", 9000, &[]);
    let mut bt = Bindtrace::start(&topo.host, hook, &["--ringbuf-size", "4096", "--fold-window", "500ms"]);
    let rsts_before = snmp_out_rsts(&c.ns);
    // 150 ports x 20 attempts. The first round runs while bindtrace is stopped (SIGSTOP), so
    // its 150 first-of-key samples meet a 4 KiB ring (56 samples) that nobody drains: the loss
    // does not depend on how fast the consumer is.
    let ports: Vec<u16> = (9000..9150).collect();
    let mut attempts = std::collections::HashMap::new();
    let pid = bt.pid() as i32;
    topo.host.run(|| {
        for round in 0..20 {
            // SAFETY: signals to our own child.
            unsafe { libc::kill(pid, if round == 0 { libc::SIGSTOP } else { libc::SIGCONT }) };
            for &p in &ports {
                let r = std::net::TcpStream::connect_timeout(
                    &std::net::SocketAddr::new(c.ipv4, p),
                    Duration::from_secs(2),
                );
                assert!(r.is_err(), "round {round} port {p} connected");
                *attempts.entry(p).or_insert(0u64) += 1;
            }
        }
    });
    let rsts = snmp_out_rsts(&c.ns) - rsts_before;
    // No pause: the exit flush below prints every count.
    assert_eq!(bt.stop(), Some(0), "clean exit:\n{}", bt.stderr());
    assert!(bt.stderr().contains("exact: the hook never skipped"), "{}", bt.stderr());
    let lines = bt.lines();
    let mut per_port = std::collections::HashMap::new();
    for l in lines.iter().filter(|l| l["event"] == "refused") {
        *per_port.entry(l["target_port"].as_u64().unwrap() as u16).or_insert(0u64) +=
            l["count"].as_u64().unwrap();
    }
    let lost: u64 = lines.iter().filter(|l| l["event"] == "lost").map(|l| l["count"].as_u64().unwrap()).sum();
    assert_eq!(per_port, attempts, "per key, the counts add up to the refusals");
    assert_eq!(per_port.values().sum::<u64>(), rsts, "and to the resets the container sent (OutRsts)");
    assert!(lost > 0, "a 4 KiB ring cannot hold them all, and the loss is reported");
    let printed = lines.iter().filter(|l| l["event"] == "refused").count() as u64;
    assert!(printed < rsts, "repeats were folded: {printed} lines for {rsts} refusals");
}
