//! UDP refusals end to end (issue 14, tests 1-3 and the IPv6 checksum exclusion), in plain
//! namespaces: a datagram to a port no socket in the container's namespace is bound to is a
//! refusal. Run as root through `sudo ./x test` (one test at a time).
//!
//! The drop-reason hooks count UDP (`kfree-skb` itself; next to `tcp-send-reset`, a second
//! program on kfree_skb), exactly. The tc hook counts the ICMP port unreachables leaving the
//! container, which the kernel rate-limits: its counts are lower bounds and say "at least".
use std::{
    io::{BufRead, BufReader},
    net::{IpAddr, SocketAddr, UdpSocket},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use bindtrace_tests::{Bindtrace, Hook, Netns, Topology, connect, listener_pids, root_or_skip};
use serde_json::Value;

/// Instantiates a scenario `fn name(hook: Hook)` for each hook that counts UDP exactly.
macro_rules! for_each_drop_reason_hook {
    ($($name:ident),* $(,)?) => {
        mod tcp_send_reset { $( #[test] fn $name() { if super::root_or_skip() { super::$name(super::Hook::TcpSendReset) } } )* }
        mod kfree_skb { $( #[test] fn $name() { if super::root_or_skip() { super::$name(super::Hook::KfreeSkb) } } )* }
    };
}

/// The same for the tc hook, whose lines differ only in their count's wording (`count_at_least`).
macro_rules! on_tc {
    ($($name:ident),* $(,)?) => {
        mod tc { $( #[test] fn $name() { if super::root_or_skip() { super::$name(super::Hook::Tc) } } )* }
    };
}

for_each_drop_reason_hook!(
    loopback_v4,
    loopback_v6,
    wrong_family_over_ipv6,
    no_listener_names_what_is_bound,
    bound_to_all_addresses_is_silent,
    ipv6_bad_checksum_is_not_a_refusal,
    tcp_is_counted_once,
    burst_is_counted_exactly_under_icmp_rate_limit,
);
on_tc!(
    loopback_v4,
    loopback_v6,
    wrong_family_over_ipv6,
    no_listener_names_what_is_bound,
    bound_to_all_addresses_is_silent,
    ipv6_bad_checksum_is_not_a_refusal,
    tcp_is_counted_once,
    tc_burst_says_at_least,
);

/// A UDP server in a namespace (`ip netns exec NS python3 -c ...`): binds ADDR:PORT, prints
/// "ready PID", and echoes every datagram back. Killed on drop.
struct UdpServer {
    child: Child,
}

const UDP_SERVER_PY: &str = r#"
import os, signal, socket, sys
addr, port = sys.argv[1], int(sys.argv[2])
family = socket.AF_INET6 if ":" in addr else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
if family == socket.AF_INET6:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind((addr, port))
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
print("ready", os.getpid(), flush=True)
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(data, peer)
"#;

impl UdpServer {
    fn start(ns: &Netns, addr: &str, port: u16) -> UdpServer {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "python3", "-c", UDP_SERVER_PY, addr, &port.to_string()])
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .expect("start python3 UDP server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).expect("read UDP server");
        assert_eq!(line.trim(), format!("ready {}", child.id()), "UDP server on {addr}:{port} did not start");
        UdpServer { child }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// Sends one datagram from `from` to `addr:port`, from a socket connected to it, and returns
/// what came back within 2 s: Ok(bytes) for an answer, Err for the ICMP port unreachable
/// (ECONNREFUSED) or a timeout.
fn exchange(from: &Netns, addr: IpAddr, port: u16) -> std::io::Result<Vec<u8>> {
    from.run(|| {
        let local = if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
        let s = UdpSocket::bind(local)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.connect(SocketAddr::new(addr, port))?;
        s.send(b"bindtrace udp test")?;
        let mut buf = [0u8; 64];
        let n = s.recv(&mut buf)?;
        Ok(buf[..n].to_vec())
    })
}

/// A datagram to a closed port: the container's ICMP port unreachable comes back as
/// ECONNREFUSED (the first reply to a peer is never rate limited).
fn refused(from: &Netns, addr: IpAddr, port: u16) {
    let err = exchange(from, addr, port).expect_err("the datagram should be refused");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "to {addr}:{port}: {err}");
}

fn expect_udp(bt: &Bindtrace, port: u16, family: &str) -> Value {
    bt.expect_line(&format!("refused udp on port {port} over {family}"), Duration::from_secs(5), |l| {
        l["event"] == "refused" && l["proto"] == "udp" && l["target_port"] == port && l["family"] == family
    })
}

/// The hook a UDP line names: both drop-reason hooks count UDP on kfree_skb (next to
/// tcp_send_reset, a second program); tc counts the port unreachables itself.
fn udp_hook(hook: Hook) -> &'static str {
    if hook == Hook::Tc { "tc" } else { "kfree-skb" }
}

/// A tc line's count is a lower bound and says so; the drop-reason hooks' are exact (no field).
fn expect_count_wording(hook: Hook, line: &Value) {
    if hook == Hook::Tc {
        assert_eq!(line["count_at_least"], true, "{line:#}");
    } else {
        assert!(line.get("count_at_least").is_none(), "{line:#}");
    }
}

fn loopback_v4(hook: Hook) {
    let mut topo = Topology::new();
    let c = topo.container();
    let server = UdpServer::start(&c.ns, "127.0.0.1", 5301);
    let bt = Bindtrace::start(&topo.host, hook, &[]);
    refused(&topo.host, c.ipv4, 5301);
    let line = expect_udp(&bt, 5301, "ipv4");
    assert_eq!(line["verdict"], "loopback_only", "{line:#}");
    assert_eq!(line["target_ip"], c.ipv4.to_string());
    assert_eq!(line["client_ip"], topo.gateway_v4().to_string());
    assert!(line["client_port"].as_u64().unwrap() > 0);
    assert_eq!(line["hook"], udp_hook(hook));
    assert_eq!(line["netns"], c.ns.inode());
    assert_eq!(line["count"], 1);
    expect_count_wording(hook, &line);
    assert_eq!(line["listeners"][0]["ip"], "127.0.0.1");
    assert_eq!(line["listeners"][0]["port"], 5301);
    assert_eq!(listener_pids(&line, 0), vec![server.pid() as u64]);
    let hint = line["hint"].as_str().unwrap();
    // The server's command line has the loopback address, so the fix replaces it there.
    assert!(hint.contains("Bind to 0.0.0.0:5301") && hint.ends_with("-p 127.0.0.1:5301:5301/udp"), "{hint}");
    // The metric counts it under proto="udp" (the line was written after its series was updated).
    let scrape = bindtrace_tests::metrics::scrape(&topo.host);
    let udp = [("proto", "udp"), ("container_port", "5301"), ("verdict", "loopback_only")];
    assert_eq!(scrape.sum("bindtrace_refused_connections_total", &udp), 1, "{}", scrape.text);
    assert_eq!(scrape.sum("bindtrace_refused_connections_total", &[("proto", "tcp")]), 0, "{}", scrape.text);
}

fn loopback_v6(hook: Hook) {
    let mut topo = Topology::new();
    let c = topo.container();
    let server = UdpServer::start(&c.ns, "::1", 5302);
    let bt = Bindtrace::start(&topo.host, hook, &[]);
    refused(&topo.host, c.ipv6, 5302);
    let line = expect_udp(&bt, 5302, "ipv6");
    assert_eq!(line["verdict"], "loopback_only", "{line:#}");
    assert_eq!(line["hook"], udp_hook(hook));
    expect_count_wording(hook, &line);
    assert_eq!(line["target_ip"], c.ipv6.to_string());
    assert_eq!(line["listeners"][0]["ip"], "::1");
    assert_eq!(listener_pids(&line, 0), vec![server.pid() as u64]);
}

fn wrong_family_over_ipv6(hook: Hook) {
    let mut topo = Topology::new();
    let c = topo.container();
    let _server = UdpServer::start(&c.ns, "0.0.0.0", 5303);
    let bt = Bindtrace::start(&topo.host, hook, &[]);
    // The IPv4 side is served: the same socket answers.
    assert_eq!(exchange(&topo.host, c.ipv4, 5303).expect("served over IPv4"), b"bindtrace udp test");
    refused(&topo.host, c.ipv6, 5303);
    let line = expect_udp(&bt, 5303, "ipv6");
    assert_eq!(line["verdict"], "wrong_family", "{line:#}");
    assert_eq!(line["listeners"][0]["ip"], "0.0.0.0");
}

fn no_listener_names_what_is_bound(hook: Hook) {
    let mut topo = Topology::new();
    let c = topo.container();
    let _other = UdpServer::start(&c.ns, "0.0.0.0", 5305);
    let bt = Bindtrace::start(&topo.host, hook, &[]);
    refused(&topo.host, c.ipv4, 5304);
    let line = expect_udp(&bt, 5304, "ipv4");
    assert_eq!(line["verdict"], "no_listener", "{line:#}");
    let listeners = line["listeners"].as_array().unwrap();
    assert!(listeners.iter().any(|l| l["port"] == 5305 && l["ip"] == "0.0.0.0"), "{line:#}");
}

fn bound_to_all_addresses_is_silent(hook: Hook) {
    let mut topo = Topology::new();
    let c = topo.container();
    let _server = UdpServer::start(&c.ns, "0.0.0.0", 5306);
    let mut bt = Bindtrace::start(&topo.host, hook, &[]);
    assert_eq!(exchange(&topo.host, c.ipv4, 5306).expect("served"), b"bindtrace udp test");
    // Checked after bindtrace's exit flush, which prints everything counted.
    bt.expect_no_refused_after_exit(5306);
}

/// IPv6 frees a datagram whose checksum is wrong with NO_SOCKET when no socket wants it (the
/// reason is set before the checksum is checked): not a refusal. (On tc: the kernel answers
/// only a datagram whose checksum verified, so the bad one has no port unreachable to see.) The bad datagram is sent from
/// a raw socket (the kernel does not checksum raw IPv6 UDP), and its arrival is awaited on the
/// container's `Udp6InCsumErrors`; a good one to another closed port is the control.
fn ipv6_bad_checksum_is_not_a_refusal(hook: Hook) {
    let mut topo = Topology::new();
    let c = topo.container();
    let mut bt = Bindtrace::start(&topo.host, hook, &[]);
    let IpAddr::V6(dst) = c.ipv6 else { unreachable!() };
    let src: std::net::Ipv6Addr = format!("fd00:b7:{}::1", topo.net).parse().unwrap();
    let errors_before = snmp6(&c.ns, "Udp6InCsumErrors");
    topo.host.run(|| send_raw_udp6(src, dst, 5307, false));
    let deadline = Instant::now() + Duration::from_secs(5);
    while snmp6(&c.ns, "Udp6InCsumErrors") == errors_before {
        assert!(Instant::now() < deadline, "the bad datagram never reached the container");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Control: the same datagram with its checksum right is a refusal.
    topo.host.run(|| send_raw_udp6(src, dst, 5308, true));
    let line = expect_udp(&bt, 5308, "ipv6");
    assert_eq!(line["verdict"], "no_listener", "{line:#}");
    bt.expect_no_refused_after_exit(5307);
}

/// With `tcp-send-reset`, kfree_skb is attached for UDP too: a refused SYN must still be
/// counted once (the kfree_skb program skips TCP there), and a UDP datagram once.
fn tcp_is_counted_once(hook: Hook) {
    let mut topo = Topology::new();
    let c = topo.container();
    let mut bt = Bindtrace::start(&topo.host, hook, &[]);
    let err = connect(&topo.host, c.ipv4, 5309).expect_err("refused");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    refused(&topo.host, c.ipv4, 5309);
    bt.expect_udp_and_tcp_once(5309);
}

trait CountsOnce {
    fn expect_udp_and_tcp_once(&mut self, port: u16);
}

impl CountsOnce for Bindtrace {
    /// After the exit flush: the counts of `port`'s lines add up to 1 per protocol.
    fn expect_udp_and_tcp_once(&mut self, port: u16) {
        assert_eq!(self.stop(), Some(0), "bindtrace did not exit cleanly:\n{}", self.stderr());
        let lines = self.lines();
        for proto in ["tcp", "udp"] {
            let total: u64 = lines
                .iter()
                .filter(|l| l["event"] == "refused" && l["target_port"] == port && l["proto"] == proto)
                .map(|l| l["count"].as_u64().unwrap())
                .sum();
            assert_eq!(total, 1, "{proto} refusals of port {port}: {lines:#?}");
        }
    }
}

/// Issue 14's test 4 on the tc hook: the same burst to one closed port, over IPv4 and IPv6, while
/// the ICMP rate limit suppresses most port unreachables. The classifier counts the replies that
/// left, so the lines' counts equal the container's `OutDestUnreachs` increase, fall short of its
/// `UdpNoPorts` one (the datagrams refused), and every line, the start-up message and the exit
/// summary say "at least".
fn tc_burst_says_at_least(hook: Hook) {
    assert_eq!(hook, Hook::Tc);
    let mut topo = Topology::new();
    let c = topo.container();
    let mut bt = Bindtrace::start(&topo.host, hook, &[]);
    assert!(
        bt.stderr().contains("UDP: counted on the tc hook from the ICMP port unreachables"),
        "{}",
        bt.stderr()
    );
    let burst = udp_burst(&topo, &c, [5313, 5314]);
    assert_eq!(bt.stop(), Some(0), "bindtrace did not exit cleanly:\n{}", bt.stderr());
    let lines = bt.lines();
    let udp: Vec<&Value> = lines.iter().filter(|l| l["event"] == "refused" && l["proto"] == "udp").collect();
    assert!(!udp.is_empty(), "{lines:#?}");
    for l in &udp {
        assert_eq!(l["count_at_least"], true, "{l:#}");
        assert_eq!(l["hook"], "tc", "{l:#}");
    }
    let counted = |port: u16| -> u64 {
        udp.iter().filter(|l| l["target_port"] == port).map(|l| l["count"].as_u64().unwrap()).sum()
    };
    let counted = (counted(5313), counted(5314));
    assert_eq!(counted, burst.replies, "one count per port unreachable that left: {lines:#?}");
    assert!(
        counted.0 < burst.no_ports.0 && counted.1 < burst.no_ports.1,
        "the rate limit suppressed replies, so the counts fall short of the datagrams: {counted:?} {burst:?}"
    );
    let total = counted.0 + counted.1;
    assert!(
        bt.stderr().contains(&format!("at least {total} refusals counted since start"))
            && bt.stderr().contains(&format!("at least {total} UDP datagrams among them")),
        "{}",
        bt.stderr()
    );
    eprintln!("udp burst on tc: counted at least {counted:?}, NoPorts {:?}", burst.no_ports);
}

/// What a burst did in the container: datagrams refused and port unreachables sent, (IPv4, IPv6).
#[derive(Debug)]
struct Burst {
    no_ports: (u64, u64),
    replies: (u64, u64),
}

const BURST_CHUNKS: u64 = 10;
const BURST_CHUNK: u64 = 100;

/// `BURST_CHUNKS * BURST_CHUNK` datagrams with valid checksums from the host to `ports[0]` over
/// IPv4 and `ports[1]` over IPv6, both closed. Sent in chunks, each awaited on the container's
/// `UdpNoPorts` / `Udp6NoPorts`, so that no datagram is still in flight (or dropped by a full
/// backlog) when counts are compared.
fn udp_burst(topo: &Topology, c: &bindtrace_tests::Container, ports: [u16; 2]) -> Burst {
    let v4 = (snmp(&c.ns, "Udp:", "NoPorts"), snmp(&c.ns, "Icmp:", "OutDestUnreachs"));
    let v6 = (snmp6(&c.ns, "Udp6NoPorts"), snmp6(&c.ns, "Icmp6OutDestUnreachs"));
    for (addr, port) in [(c.ipv4, ports[0]), (c.ipv6, ports[1])] {
        let no_ports = || match addr {
            IpAddr::V4(_) => snmp(&c.ns, "Udp:", "NoPorts"),
            IpAddr::V6(_) => snmp6(&c.ns, "Udp6NoPorts"),
        };
        let start = no_ports();
        topo.host.run(|| {
            let s = UdpSocket::bind(if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).unwrap();
            for chunk in 1..=BURST_CHUNKS {
                for _ in 0..BURST_CHUNK {
                    s.send_to(b"burst", SocketAddr::new(addr, port)).unwrap();
                }
                let deadline = Instant::now() + Duration::from_secs(10);
                while no_ports() < start + chunk * BURST_CHUNK {
                    assert!(Instant::now() < deadline, "datagrams to {addr}:{port} did not all arrive");
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        });
    }
    let burst = Burst {
        no_ports: (snmp(&c.ns, "Udp:", "NoPorts") - v4.0, snmp6(&c.ns, "Udp6NoPorts") - v6.0),
        replies: (
            snmp(&c.ns, "Icmp:", "OutDestUnreachs") - v4.1,
            snmp6(&c.ns, "Icmp6OutDestUnreachs") - v6.1,
        ),
    };
    let sent = BURST_CHUNKS * BURST_CHUNK;
    assert_eq!(burst.no_ports, (sent, sent), "every datagram reached the container");
    assert!(
        burst.replies.0 < sent && burst.replies.1 < sent,
        "the ICMP rate limit suppressed replies: {burst:?}"
    );
    burst
}

/// Issue 14's test 4: a burst of datagrams with valid checksums to one closed port, over IPv4
/// and IPv6, while the ICMP rate limit suppresses most port unreachables. The lines' counts
/// (after the exit flush) equal the container's own `UdpNoPorts` / `Udp6NoPorts` increase
/// exactly, and the replies it sent are fewer (the limit did suppress some), so the count is of
/// datagrams, not of replies. Sent in chunks, each awaited on the counter, so that no datagram
/// is still in flight (or dropped by a full backlog) when the counts are compared.
fn burst_is_counted_exactly_under_icmp_rate_limit(hook: Hook) {
    let mut topo = Topology::new();
    let c = topo.container();
    let mut bt = Bindtrace::start(&topo.host, hook, &[]);
    let burst = udp_burst(&topo, &c, [5311, 5312]);
    assert_eq!(bt.stop(), Some(0), "bindtrace did not exit cleanly:\n{}", bt.stderr());
    let lines = bt.lines();
    let counted = |port: u16| -> u64 {
        lines
            .iter()
            .filter(|l| l["event"] == "refused" && l["proto"] == "udp" && l["target_port"] == port)
            .map(|l| {
                assert!(l.get("count_at_least").is_none(), "an exact count: {l:#}");
                l["count"].as_u64().expect("an exact count")
            })
            .sum()
    };
    assert_eq!((counted(5311), counted(5312)), burst.no_ports, "{lines:#?}");
    eprintln!("udp burst: NoPorts {:?}, port unreachables sent {:?}", burst.no_ports, burst.replies);
}

/// A field of the namespace's /proc/net/snmp (a `Group: names` line, then `Group: values`).
fn snmp(ns: &Netns, group: &str, name: &str) -> u64 {
    let text = ns.run(|| std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap());
    let mut rows = text.lines().filter(|l| l.starts_with(group));
    let (names, values) = (rows.next().unwrap(), rows.next().unwrap());
    let idx = names.split_whitespace().position(|n| n == name).unwrap_or_else(|| panic!("no {group} {name}"));
    values.split_whitespace().nth(idx).unwrap().parse().unwrap()
}

/// A field of the namespace's /proc/net/snmp6 (`Name value` lines).
fn snmp6(ns: &Netns, name: &str) -> u64 {
    let text = ns.run(|| std::fs::read_to_string("/proc/thread-self/net/snmp6").unwrap());
    text.lines()
        .find_map(|l| l.strip_prefix(name).map(|v| v.trim().parse().unwrap()))
        .unwrap_or_else(|| panic!("no {name} in snmp6"))
}

/// One UDP datagram from a raw IPv6 socket in the calling thread's namespace, with its checksum
/// right (`good`) or off by one.
fn send_raw_udp6(src: std::net::Ipv6Addr, dst: std::net::Ipv6Addr, port: u16, good: bool) {
    let payload = b"bindtrace checksum test";
    let len = (8 + payload.len()) as u16;
    let mut dgram = Vec::new();
    dgram.extend_from_slice(&40000u16.to_be_bytes());
    dgram.extend_from_slice(&port.to_be_bytes());
    dgram.extend_from_slice(&len.to_be_bytes());
    dgram.extend_from_slice(&[0, 0]);
    dgram.extend_from_slice(payload);
    // The pseudo-header: addresses, length, next header 17.
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&u32::from(len).to_be_bytes());
    add(&[0, 0, 0, 17]);
    add(&dgram);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let mut check = !(sum as u16);
    if check == 0 {
        check = 0xffff;
    }
    if !good {
        check = if check == 1 { 2 } else { check - 1 };
    }
    dgram[6..8].copy_from_slice(&check.to_be_bytes());
    unsafe {
        let fd = libc::socket(libc::AF_INET6, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::IPPROTO_UDP);
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let mut sa: libc::sockaddr_in6 = std::mem::zeroed();
        sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        sa.sin6_addr.s6_addr = dst.octets();
        let mut from: libc::sockaddr_in6 = std::mem::zeroed();
        from.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        from.sin6_addr.s6_addr = src.octets();
        let bound = libc::bind(fd, (&raw const from).cast(), size_of::<libc::sockaddr_in6>() as u32);
        assert_eq!(bound, 0, "bind raw socket to {src}: {}", std::io::Error::last_os_error());
        let sent = libc::sendto(
            fd,
            dgram.as_ptr().cast(),
            dgram.len(),
            0,
            (&raw const sa).cast(),
            size_of::<libc::sockaddr_in6>() as u32,
        );
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        assert_eq!(sent, dgram.len() as isize, "sendto {dst}: {err}");
    }
}
