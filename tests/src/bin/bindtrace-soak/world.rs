//! What the soak makes and churns: a bridge of its own in the host's namespace with namespaces
//! on veths (a free /20 of 198.19.0.0/16, which nothing else here uses), a Docker network with busybox
//! containers, a relay in front of the Docker socket, and a client namespace for DNAT'd
//! connections. Each is a guard that removes what it made on drop (also on panic or Ctrl-C).
use std::{
    net::IpAddr,
    process::Command,
    time::{Duration, Instant},
};

use bindtrace_tests::{
    Netns,
    docker::{Container, Image, Network, docker_ok},
    net::{ip, unique},
};

/// A Linux bridge in the host's namespace with the first /20 of 198.19.0.0/16 no route of this
/// host uses yet (another soak's), deleted on drop.
pub struct Bridge {
    pub name: String,
    /// The /20's third octet.
    base: u32,
    next: u32,
}

impl Bridge {
    pub fn new() -> Bridge {
        let taken = routed_in_198_19();
        let base = (0..16u32)
            .map(|k| k * 16)
            .find(|&b| taken.iter().all(|&(lo, hi)| hi <= b || lo >= b + 16))
            .expect("every /20 of 198.19.0.0/16 is routed already (other soaks running?)");
        let name = unique("soakbr");
        ip(&["link", "add", &name, "type", "bridge"]);
        ip(&["addr", "add", &format!("198.19.{base}.1/20"), "dev", &name]);
        ip(&["link", "set", &name, "up"]);
        Bridge { name, base, next: 2 }
    }

    /// A namespace on a new veth of this bridge, with the next unused address (never reused,
    /// so no stale neighbour entry points at a dead namespace).
    pub fn namespace(&mut self) -> Ns {
        let n = self.next;
        self.next += 1;
        assert!(n < 16 * 250, "the soak ran out of addresses in its /20");
        let addr: IpAddr = format!("198.19.{}.{}", self.base + n / 250, n % 250 + 2).parse().unwrap();
        let ns = Netns::new("soakns");
        let host_veth = unique("sv");
        let tmp = unique("sp");
        ip(&["link", "add", &host_veth, "type", "veth", "peer", "name", &tmp]);
        ip(&["link", "set", &host_veth, "master", &self.name, "up"]);
        ip(&["link", "set", &tmp, "netns", &ns.name]);
        ns.ip(&["link", "set", &tmp, "name", "eth0"]);
        ns.ip(&["addr", "add", &format!("{addr}/20"), "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        Ns { ns, addr, host_veth }
    }
}

/// The third-octet ranges [lo, hi) of the routes inside 198.19.0.0/16 (other soaks' bridges).
fn routed_in_198_19() -> Vec<(u32, u32)> {
    let out =
        Command::new("ip").args(["-4", "route", "show", "root", "198.19.0.0/16"]).output().expect("run ip");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let dest = l.split_whitespace().next()?;
            let (addr, len) = dest.split_once('/').unwrap_or((dest, "32"));
            let third: u32 = addr.split('.').nth(2)?.parse().ok()?;
            let len: u32 = len.parse().ok()?;
            Some((third, third + (1u32 << 24u32.saturating_sub(len).min(8))))
        })
        .collect()
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.name]).status();
    }
}

/// A namespace on the soak's bridge (its veth goes with it).
pub struct Ns {
    pub ns: Netns,
    pub addr: IpAddr,
    pub host_veth: String,
}

impl Ns {
    pub fn inode(&self) -> u64 {
        self.ns.inode()
    }

    /// `Tcp: OutRsts`: every reset this namespace sent (the ground truth of refusals made).
    pub fn out_rsts(&self) -> u64 {
        bindtrace_tests::snmp_out_rsts(&self.ns)
    }
}

/// The Docker side: an image, a network, and the containers made on it.
pub struct Docker {
    pub image: Image,
    pub network: Network,
}

impl Docker {
    pub fn new() -> Docker {
        let image = Image::busybox();
        let network = Network::create();
        Docker { image, network }
    }

    /// A container with busybox httpd on 127.0.0.1:8000 (loopback only: every connection from
    /// outside is refused), published on `publish` when given.
    pub fn container(&self, publish: Option<u16>) -> Ctr {
        let mut opts = vec!["--network".to_owned(), self.network.name.clone()];
        if let Some(p) = publish {
            opts.extend(["-p".to_owned(), format!("{p}:8000")]);
        }
        let opts: Vec<&str> = opts.iter().map(String::as_str).collect();
        let c = Container::run(&self.image, &opts, &["httpd", "-f", "-p", "127.0.0.1:8000", "-h", "/www"]);
        c.wait_listening(8000);
        let pid = c.pid();
        let ip = c.ip(&self.network.name);
        let iflink: u32 = docker_ok(&["exec", &c.name, "cat", "/sys/class/net/eth0/iflink"]).parse().unwrap();
        let host_veth =
            ifname_of(iflink).unwrap_or_else(|| panic!("no host interface {iflink} for {}", c.name));
        let inode = std::fs::metadata(format!("/proc/{pid}/ns/net"))
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap();
        Ctr { _c: c, pid, ip, host_veth, inode }
    }
}

/// A running container of the soak.
pub struct Ctr {
    /// Removes the container on drop.
    pub _c: Container,
    pub pid: u32,
    pub ip: IpAddr,
    pub host_veth: String,
    pub inode: u64,
}

impl Ctr {
    /// `Tcp: OutRsts` of the container's namespace, read through its main process.
    pub fn out_rsts(&self) -> u64 {
        let text = std::fs::read_to_string(format!("/proc/{}/net/snmp", self.pid)).unwrap();
        out_rsts_of(&text)
    }
}

pub fn out_rsts_of(snmp: &str) -> u64 {
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().unwrap(), tcp.next().unwrap());
    let idx = names.split_whitespace().position(|n| n == "OutRsts").unwrap();
    values.split_whitespace().nth(idx).unwrap().parse().unwrap()
}

/// The name of interface `ifindex` in this (the host's) namespace.
fn ifname_of(ifindex: u32) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        for e in std::fs::read_dir("/sys/class/net").ok()?.flatten() {
            let idx = std::fs::read_to_string(e.path().join("ifindex")).unwrap_or_default();
            if idx.trim().parse() == Ok(ifindex) {
                return Some(e.file_name().to_string_lossy().into_owned());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}
