//! Userspace side of the connect tracker (`bindtrace-ebpf/src/connect.rs`): which prefixes to
//! watch, and who connected with a given 4-tuple.
use std::{
    collections::BTreeSet,
    ffi::CStr,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use aya::{
    Ebpf,
    maps::{
        HashMap, MapData,
        lpm_trie::{Key, LpmTrie},
    },
    programs::BtfTracePoint,
};
use bindtrace_common::{AF_INET, AF_INET6, Addr16, ConnectKey, Connector, mapped};

const PROGRAM: &str = "bt_sock_set_state";
const TRACEPOINT: &str = "inet_sock_set_state";

/// Who made a connection, as the kernel recorded it when the socket entered SYN_SENT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectorInfo {
    /// Process id in the initial pid namespace.
    pub pid: u32,
    pub comm: String,
    pub netns_cookie: u64,
    pub netns_ino: u32,
}

impl From<Connector> for ConnectorInfo {
    fn from(c: Connector) -> Self {
        let end = c.comm.iter().position(|&b| b == 0).unwrap_or(c.comm.len());
        ConnectorInfo {
            pid: c.tgid,
            comm: String::from_utf8_lossy(&c.comm[..end]).into_owned(),
            netns_cookie: c.netns_cookie,
            netns_ino: c.netns_ino,
        }
    }
}

/// A watched prefix: address (IPv4-mapped for IPv4) and length over the 128 bits.
pub type Prefix = (Addr16, u32);

pub struct ConnectTracker {
    dests: LpmTrie<MapData, Addr16, u32>,
    connectors: HashMap<MapData, ConnectKey, Connector>,
    installed: BTreeSet<Prefix>,
}

impl ConnectTracker {
    /// Loads and attaches `tp_btf/inet_sock_set_state` from the already loaded object (whose
    /// globals were set from [`crate::kernel::sock_layout::SockLayout`]) and takes its maps.
    pub fn attach(ebpf: &mut Ebpf, btf: &aya::Btf) -> anyhow::Result<ConnectTracker> {
        use anyhow::Context as _;
        let program: &mut BtfTracePoint = ebpf
            .program_mut(PROGRAM)
            .with_context(|| format!("the eBPF object has no program {PROGRAM}"))?
            .try_into()?;
        program.load(TRACEPOINT, btf).with_context(|| format!("loading tp_btf/{TRACEPOINT}"))?;
        program.attach().with_context(|| format!("attaching tp_btf/{TRACEPOINT}"))?;
        let dests = ebpf.take_map("CONNECT_DESTS").context("no map CONNECT_DESTS")?;
        let connectors = ebpf.take_map("CONNECTORS").context("no map CONNECTORS")?;
        Ok(ConnectTracker {
            dests: LpmTrie::try_from(dests)?,
            connectors: HashMap::try_from(connectors)?,
            installed: BTreeSet::new(),
        })
    }

    /// Makes the kernel's prefix set equal to `prefixes`.
    pub fn set_prefixes(&mut self, prefixes: &BTreeSet<Prefix>) {
        for p in self.installed.difference(prefixes).copied().collect::<Vec<_>>() {
            if let Err(e) = self.dests.remove(&Key::new(p.1, p.0)) {
                log::debug!("removing a watched prefix: {e}");
            }
            self.installed.remove(&p);
        }
        for p in prefixes.difference(&self.installed.clone()) {
            match self.dests.insert(&Key::new(p.1, p.0), 1, 0) {
                Ok(()) => {
                    self.installed.insert(*p);
                }
                Err(e) => log::warn!("watching connects to {}: {e}", show_prefix(p)),
            }
        }
    }

    pub fn prefixes(&self) -> &BTreeSet<Prefix> {
        &self.installed
    }

    /// Who connected from `client` to `target` and was refused, if the kernel saw it.
    pub fn lookup(&self, client: SocketAddr, target: SocketAddr) -> Option<ConnectorInfo> {
        let key = ConnectKey {
            client_addr: addr16(client.ip()),
            target_addr: addr16(target.ip()),
            client_port: client.port(),
            target_port: target.port(),
            _pad: 0,
        };
        self.connectors.get(&key, 0).ok().map(ConnectorInfo::from)
    }
}

/// An address as the kernel side keys it (IPv4-mapped for IPv4).
pub fn addr16(ip: IpAddr) -> Addr16 {
    match ip {
        IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            mapped(AF_INET, &b)
        }
        IpAddr::V6(a) => mapped(AF_INET6, &a.octets()),
    }
}

pub fn prefix_of(ip: IpAddr, len: u8) -> Prefix {
    let (bits, total) = match ip {
        IpAddr::V4(_) => (u32::from(len) + 96, 128),
        IpAddr::V6(_) => (u32::from(len), 128),
    };
    let mut addr = addr16(ip);
    // Clear host bits: the trie stores networks.
    for (i, byte) in addr.iter_mut().enumerate() {
        let start = (i * 8) as u32;
        if start >= bits {
            *byte = 0;
        } else if start + 8 > bits {
            *byte &= 0xffu8 << (8 - (bits - start));
        }
    }
    (addr, bits.min(total))
}

/// Whether `ip` falls in `p`.
pub fn prefix_contains(p: &Prefix, ip: IpAddr) -> bool {
    let net = addr16(ip);
    let want = p.1.min(128);
    let full = (want / 8) as usize;
    if net[..full] != p.0[..full] {
        return false;
    }
    let rest = want % 8;
    rest == 0 || (net[full] ^ p.0[full]) & (0xffu8 << (8 - rest)) == 0
}

pub fn show_prefix(p: &Prefix) -> String {
    let a = Ipv6Addr::from(p.0);
    match a.to_ipv4_mapped() {
        Some(v4) if p.1 >= 96 => format!("{v4}/{}", p.1 - 96),
        _ => format!("{a}/{}", p.1),
    }
}

/// Address prefixes of the interfaces named `names` in this thread's network namespace (IPv6
/// link-local ones left out: every interface has one, and they are not how containers are
/// reached).
pub fn interface_prefixes(names: &[String]) -> io::Result<BTreeSet<Prefix>> {
    let mut out = BTreeSet::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `ifap` with a list we free below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: `cur` walks the list getifaddrs returned, which stays valid until freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_netmask.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }.to_string_lossy();
        if !names.iter().any(|n| *n == name) {
            continue;
        }
        // SAFETY: the address and mask point to sockaddrs of the family they declare.
        let (addr, mask) = unsafe { (sockaddr_ip(ifa.ifa_addr), sockaddr_ip(ifa.ifa_netmask)) };
        let (Some(addr), Some(mask)) = (addr, mask) else { continue };
        if let IpAddr::V6(a) = addr
            && a.segments()[0] & 0xffc0 == 0xfe80
        {
            continue;
        }
        let len = match mask {
            IpAddr::V4(m) => u32::from(m).count_ones(),
            IpAddr::V6(m) => u128::from(m).count_ones(),
        } as u8;
        out.insert(prefix_of(addr, len));
    }
    // SAFETY: frees the list getifaddrs allocated, once.
    unsafe { libc::freeifaddrs(ifap) };
    Ok(out)
}

/// # Safety
/// `sa` must point to a valid sockaddr of the family it declares.
unsafe fn sockaddr_ip(sa: *const libc::sockaddr) -> Option<IpAddr> {
    match i32::from(unsafe { (*sa).sa_family }) {
        libc::AF_INET => {
            let sin = unsafe { &*(sa as *const libc::sockaddr_in) };
            Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))))
        }
        libc::AF_INET6 => {
            let sin6 = unsafe { &*(sa as *const libc::sockaddr_in6) };
            Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn prefixes_are_networks_in_mapped_form() {
        let p = prefix_of(ip("172.17.0.1"), 16);
        assert_eq!(p.1, 112);
        assert_eq!(show_prefix(&p), "172.17.0.0/16");
        assert_eq!(show_prefix(&prefix_of(ip("10.1.2.3"), 20)), "10.1.0.0/20");
        assert_eq!(show_prefix(&prefix_of(ip("fd00:b7:17::1"), 64)), "fd00:b7:17::/64");
        assert_eq!(addr16(ip("172.17.0.2"))[10..], [0xff, 0xff, 172, 17, 0, 2]);
        assert!(prefix_contains(&p, ip("172.17.200.3")));
        assert!(!prefix_contains(&p, ip("172.18.0.2")));
        assert!(!prefix_contains(&p, ip("fd00::1")));
        let odd = prefix_of(ip("10.1.2.3"), 20);
        assert!(prefix_contains(&odd, ip("10.1.15.255")));
        assert!(!prefix_contains(&odd, ip("10.1.16.0")));
    }

    #[test]
    fn loopback_prefix_of_lo() {
        let p = interface_prefixes(&["lo".to_owned()]).unwrap();
        assert!(
            p.contains(&prefix_of(ip("127.0.0.1"), 8)),
            "{:?}",
            p.iter().map(show_prefix).collect::<Vec<_>>()
        );
    }

    #[test]
    fn comm_is_trimmed() {
        let mut c = Connector { tgid: 7, ..Default::default() };
        c.comm[..12].copy_from_slice(b"docker-proxy");
        let info = ConnectorInfo::from(c);
        assert_eq!(info.comm, "docker-proxy");
        assert_eq!(info.pid, 7);
    }
}
