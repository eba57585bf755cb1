//! Namespaces and topologies: a "host" namespace with a bridge named docker0, containers on
//! veth pairs, as Docker builds them.
use std::{
    fs::File,
    io,
    net::{IpAddr, SocketAddr, TcpStream},
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// The next number of this process's sequence (for unique names and addresses).
pub fn next_seq() -> u32 {
    SEQ.fetch_add(1, Ordering::Relaxed)
}

/// A short unique tag: interface names are limited to 15 bytes.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}x{}", std::process::id() % 100_000, SEQ.fetch_add(1, Ordering::Relaxed))
}

/// Runs `ip ARGS`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Netns {
        let name = unique(prefix);
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Netns { name }
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    pub fn inode(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(self.path()).unwrap().ino()
    }

    /// Runs `f` on a thread inside this namespace.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let file = File::open(self.path()).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                assert_eq!(unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
                f()
            })
            .join()
            .unwrap()
        })
    }

    pub fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        ip(&full);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A TCP connection attempt from inside `ns`, with a short timeout.
pub fn connect(ns: &Netns, addr: IpAddr, port: u16) -> io::Result<TcpStream> {
    ns.run(|| TcpStream::connect_timeout(&SocketAddr::new(addr, port), Duration::from_secs(2)))
}

/// `Tcp: OutRsts` of a namespace: the ground truth for how many resets it sent.
pub fn snmp_out_rsts(ns: &Netns) -> u64 {
    let text = ns.run(|| std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap());
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().unwrap(), tcp.next().unwrap());
    let idx = names.split_whitespace().position(|n| n == "OutRsts").unwrap();
    values.split_whitespace().nth(idx).unwrap().parse().unwrap()
}

/// A container: its own namespace, eth0 on a veth whose host side is a port of a bridge.
pub struct Container {
    pub ns: Netns,
    pub ipv4: IpAddr,
    pub ipv6: IpAddr,
    pub host_veth: String,
}

/// The "host": a namespace with bridge `bridge` (172.17.0.1/16, fd00:b7::1/64 by default),
/// in which bindtrace runs as it would on a Docker host.
pub struct Topology {
    pub host: Netns,
    pub bridge: String,
    /// Third octet / group used for this bridge's addresses.
    pub net: u8,
    next_host: u8,
}

impl Topology {
    pub fn new() -> Topology {
        let host = Netns::new("bthost");
        let t = Topology { host, bridge: String::new(), net: 17, next_host: 2 };
        t.with_bridge("docker0", 17)
    }

    fn with_bridge(mut self, name: &str, net: u8) -> Topology {
        self.add_bridge(name, net);
        self.bridge = name.into();
        self.net = net;
        self
    }

    /// Another bridge in the host namespace, 172.NET.0.1/16 and fd00:b7:NET::1/64.
    pub fn add_bridge(&self, name: &str, net: u8) {
        self.host.ip(&["link", "add", name, "type", "bridge"]);
        self.host.ip(&["addr", "add", &format!("172.{net}.0.1/16"), "dev", name]);
        self.host.ip(&["addr", "add", &format!("fd00:b7:{net}::1/64"), "dev", name, "nodad"]);
        self.host.ip(&["link", "set", name, "up"]);
    }

    pub fn gateway_v4(&self) -> IpAddr {
        format!("172.{}.0.1", self.net).parse().unwrap()
    }

    /// A container on this topology's main bridge.
    pub fn container(&mut self) -> Container {
        let n = self.next_host;
        self.next_host += 1;
        let ns = Netns::new("btctr");
        let host_veth = unique("vb");
        self.attach(&ns, &host_veth, "eth0", &self.bridge.clone(), self.net, n, true);
        Container {
            ipv4: format!("172.{}.0.{n}", self.net).parse().unwrap(),
            ipv6: format!("fd00:b7:{}::{n}", self.net).parse().unwrap(),
            ns,
            host_veth,
        }
    }

    /// Connects `ns` to `bridge` through a new veth (`host_veth` in the host, `ifname` inside)
    /// with 172.NET.0.N and fd00:b7:NET::N. Docker's order: the host side is enslaved while
    /// the peer is still in the host namespace, then the peer moves.
    #[allow(clippy::too_many_arguments)]
    pub fn attach(
        &self,
        ns: &Netns,
        host_veth: &str,
        ifname: &str,
        bridge: &str,
        net: u8,
        n: u8,
        default_route: bool,
    ) {
        let tmp = unique("vp");
        self.host.ip(&["link", "add", host_veth, "type", "veth", "peer", "name", &tmp]);
        self.host.ip(&["link", "set", host_veth, "master", bridge, "up"]);
        self.host.ip(&["link", "set", &tmp, "netns", &ns.name]);
        ns.ip(&["link", "set", &tmp, "name", ifname]);
        ns.ip(&["addr", "add", &format!("172.{net}.0.{n}/16"), "dev", ifname]);
        ns.ip(&["addr", "add", &format!("fd00:b7:{net}::{n}/64"), "dev", ifname, "nodad"]);
        ns.ip(&["link", "set", ifname, "up"]);
        if default_route {
            ns.ip(&["route", "add", "default", "via", &format!("172.{net}.0.1")]);
        }
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

/// A non-blocking TCP connect() to `target:port` from the calling thread's namespace: the socket
/// and the connect's errno (0 when it completed at once, EINPROGRESS while the SYN is out,
/// ECONNREFUSED when the reset came back within the call). Err when no socket could be made.
pub fn connect_nonblocking(target: IpAddr, port: u16) -> io::Result<(std::os::fd::OwnedFd, i32)> {
    use std::os::fd::FromRawFd;
    let (family, addr): (i32, Vec<u8>) = match target {
        IpAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: port.to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.octets()) },
                sin_zero: [0; 8],
            };
            (libc::AF_INET, bytes_of(&sin))
        }
        IpAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: port.to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr { s6_addr: a.octets() },
                sin6_scope_id: 0,
            };
            (libc::AF_INET6, bytes_of(&sin6))
        }
    };
    // SAFETY: plain syscalls; the descriptor is checked, then owned.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let rc = unsafe { libc::connect(fd, addr.as_ptr().cast(), addr.len() as u32) };
    let err = if rc == 0 { 0 } else { io::Error::last_os_error().raw_os_error().unwrap_or(0) };
    Ok((owned, err))
}

/// The bytes of a C socket address struct.
fn bytes_of<T>(v: &T) -> Vec<u8> {
    // SAFETY: reads size_of::<T>() bytes of a live value (plain C structs without padding that
    // matters to the kernel).
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
}
