//! Address prefixes of the watched bridges, in the form the kernel side keys them (IPv4-mapped
//! IPv6, length over 128 bits): the connect tracker's LPM trie and conntrack's filter both
//! use them.
use std::{
    collections::BTreeSet,
    ffi::CStr,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use bindtrace_common::{AF_INET, AF_INET6, Addr16, mapped};

/// A watched prefix: address (IPv4-mapped for IPv4) and length over the 128 bits.
pub(crate) type Prefix = (Addr16, u32);

/// An address as the kernel side keys it (IPv4-mapped for IPv4).
pub(crate) fn addr16(ip: IpAddr) -> Addr16 {
    match ip {
        IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            mapped(AF_INET, &b)
        }
        IpAddr::V6(a) => mapped(AF_INET6, &a.octets()),
    }
}

pub(crate) fn prefix_of(ip: IpAddr, len: u8) -> Prefix {
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
pub(crate) fn prefix_contains(p: &Prefix, ip: IpAddr) -> bool {
    let net = addr16(ip);
    let want = p.1.min(128);
    let full = (want / 8) as usize;
    if net[..full] != p.0[..full] {
        return false;
    }
    let rest = want % 8;
    rest == 0 || (net[full] ^ p.0[full]) & (0xffu8 << (8 - rest)) == 0
}

pub(crate) fn show_prefix(p: &Prefix) -> String {
    let a = Ipv6Addr::from(p.0);
    match a.to_ipv4_mapped() {
        Some(v4) if p.1 >= 96 => format!("{v4}/{}", p.1 - 96),
        _ => format!("{a}/{}", p.1),
    }
}

/// Address prefixes of the interfaces named `names` in this thread's network namespace (IPv6
/// link-local ones left out: every interface has one, and they are not how containers are
/// reached).
pub(crate) fn interface_prefixes(names: &[String]) -> io::Result<BTreeSet<Prefix>> {
    Ok(interface_addresses()?
        .into_iter()
        .filter(|a| names.contains(&a.name))
        .filter_map(|a| {
            let len = match a.mask? {
                IpAddr::V4(m) => u32::from(m).count_ones(),
                IpAddr::V6(m) => u128::from(m).count_ones(),
            } as u8;
            Some(prefix_of(a.addr, len))
        })
        .collect())
}

/// The addresses (link-local ones left out) of interface `ifindex` in the calling thread's
/// network namespace: what a SYN that came in on it could have been sent to, when the line has
/// no sample that says.
pub(crate) fn addresses_of_interface(ifindex: u32) -> io::Result<Vec<IpAddr>> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has the IF_NAMESIZE bytes if_indextoname writes at most.
    if unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) }.is_null() {
        // No such interface (any more): it has no addresses.
        return Ok(Vec::new());
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into `buf`.
    let name = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned();
    Ok(interface_addresses()?.into_iter().filter(|a| a.name == name).map(|a| a.addr).collect())
}

/// Every address of the calling thread's network namespace that another namespace could reach:
/// no loopback, no IPv6 link-local, each once (a workload's addresses, read inside it; and
/// those a forwarder inside the namespace dials when it forwards over `lo`: rootless podman's
/// rootlessport dials the container's own address, `netns/loopback.rs`).
pub(crate) fn global_addresses() -> io::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for a in interface_addresses()? {
        if !a.addr.is_loopback() && !out.contains(&a.addr) {
            out.push(a.addr);
        }
    }
    Ok(out)
}

/// One address of one interface, as getifaddrs lists it.
struct InterfaceAddress {
    name: String,
    addr: IpAddr,
    mask: Option<IpAddr>,
}

/// Every IPv4 and IPv6 address of this thread's network namespace, IPv6 link-local ones left
/// out, read in one getifaddrs walk that the callers above filter.
fn interface_addresses() -> io::Result<Vec<InterfaceAddress>> {
    let mut out = Vec::new();
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
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: the address points to a sockaddr of the family it declares.
        let Some(addr) = (unsafe { sockaddr_ip(ifa.ifa_addr) }) else { continue };
        if matches!(addr, IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80) {
            continue;
        }
        // SAFETY: as for the address, when the mask is there.
        let mask = if ifa.ifa_netmask.is_null() { None } else { unsafe { sockaddr_ip(ifa.ifa_netmask) } };
        // SAFETY: ifa_name is a NUL-terminated string (checked non-null above).
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }.to_string_lossy().into_owned();
        out.push(InterfaceAddress { name, addr, mask });
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
    fn addresses_of_lo() {
        let lo = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
        let a = addresses_of_interface(lo).unwrap();
        assert!(a.contains(&ip("127.0.0.1")), "{a:?}");
        assert!(addresses_of_interface(u32::MAX).unwrap().is_empty());
    }
}
