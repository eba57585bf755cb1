//! Listening TCP sockets of a namespace and the processes that hold them.
//!
//! The listeners come from a sock_diag dump (`listen_diag.rs`), or `/proc/thread-self/net/tcp{,6}`
//! where sock_diag is unavailable, made by a thread that joined the namespace, so namespaces
//! without any process (a handle under /run/netns) work too. The
//! processes come from `/proc/PID/fd`, restricted to processes of that namespace.
use std::{
    collections::{BTreeMap, HashMap},
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use serde::Serialize;

use crate::{
    diagnose::listen_diag::Listening,
    netns::{self, Netns},
};

/// `TCP_LISTEN` in /proc/net/tcp's `st` column.
const TCP_LISTEN: u8 = 0x0A;

/// One listening socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub addr: IpAddr,
    pub port: u16,
    /// Socket inode, to find the processes holding it.
    pub inode: u64,
}

/// A process holding a socket, as seen from the host's pid namespace.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Holder {
    pub pid: u32,
    pub comm: String,
    /// The pid inside the process's own pid namespace (the container's), from `NSpid`; absent
    /// when it is the host's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_pid: Option<u32>,
    /// The command line, arguments joined by spaces.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub cmdline: String,
    /// The arguments one by one, and the executable's file name (`busybox` for its applets).
    #[serde(skip)]
    pub argv: Vec<String>,
    #[serde(skip)]
    pub exe: String,
}

impl Holder {
    /// A holder known only by pid and command name.
    pub fn new(pid: u32, comm: impl Into<String>) -> Holder {
        Holder {
            pid,
            comm: comm.into(),
            container_pid: None,
            cmdline: String::new(),
            argv: Vec::new(),
            exe: String::new(),
        }
    }

    /// Everything /proc says about `pid` that helps a reader: comm, the pid inside its
    /// namespace, the command line and the executable.
    pub fn describe(pid: u32) -> Holder {
        let argv = argv_of(pid);
        Holder {
            pid,
            comm: comm_of(pid),
            container_pid: nspid_of(pid),
            cmdline: argv.join(" "),
            argv,
            exe: fs::read_link(format!("/proc/{pid}/exe"))
                .ok()
                .and_then(|p| {
                    p.file_name().map(|n| n.to_string_lossy().trim_end_matches(" (deleted)").to_owned())
                })
                .unwrap_or_default(),
        }
    }
}

/// `/proc/PID/cmdline` split at NULs.
pub fn argv_of(pid: u32) -> Vec<String> {
    let Ok(raw) = fs::read(format!("/proc/{pid}/cmdline")) else { return Vec::new() };
    raw.split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// The pid of `pid` in its own pid namespace (last field of `NSpid:` in /proc/PID/status),
/// when that namespace is not the one bindtrace sees it from.
pub fn nspid_of(pid: u32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_nspid(&status)
}

fn parse_nspid(status: &str) -> Option<u32> {
    let fields: Vec<&str> =
        status.lines().find_map(|l| l.strip_prefix("NSpid:"))?.split_whitespace().collect();
    if fields.len() < 2 {
        return None;
    }
    fields.last()?.parse().ok()
}

/// Parses `/proc/net/tcp` or `/proc/net/tcp6` and keeps the listening sockets.
pub fn parse_proc_net_tcp(text: &str) -> Vec<Listener> {
    text.lines().skip(1).filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Listener> {
    // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 10 || u8::from_str_radix(fields[3], 16).ok()? != TCP_LISTEN {
        return None;
    }
    let (addr_hex, port_hex) = fields[1].split_once(':')?;
    Some(Listener {
        addr: parse_hex_addr(addr_hex)?,
        port: u16::from_str_radix(port_hex, 16).ok()?,
        inode: fields[9].parse().ok()?,
    })
}

/// The kernel prints addresses as native-endian 32-bit words in hex (`%08X` per word).
fn parse_hex_addr(hex: &str) -> Option<IpAddr> {
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_ne_bytes())
    };
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?))),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

/// Listening sockets of the namespace, IPv4 and IPv6 together.
pub fn listeners_in(ns: &Netns) -> io::Result<Vec<Listener>> {
    listening_in(ns).map(|l| l.listeners)
}

/// Listening sockets of the namespace, and which IPv6 ones have IPV6_V6ONLY: one sock_diag dump
/// made from a thread that joined the namespace. Where sock_diag fails (a kernel without
/// inet_diag/tcp_diag), the slower /proc tables give the listeners, and no listener is taken
/// for V6ONLY (they do not show the flag).
pub fn listening_in(ns: &Netns) -> io::Result<Listening> {
    ns.run(|| {
        match crate::diagnose::listen_diag::listening_here() {
            Ok(found) => return Ok(found),
            Err(e) => log::debug!(
                "sock_diag listener dump failed ({e}); reading /proc/net/tcp (treating [::] listeners as dual-stack)"
            ),
        }
        let mut listeners = parse_proc_net_tcp(&fs::read_to_string("/proc/thread-self/net/tcp")?);
        // tcp6 is absent when IPv6 is disabled: that is not an error.
        if let Ok(text) = fs::read_to_string("/proc/thread-self/net/tcp6") {
            listeners.extend(parse_proc_net_tcp(&text));
        }
        Ok(Listening { listeners, v6only: Default::default() })
    })
}

/// The processes holding each of `inodes`, among the processes of the namespace `netns_inode`
/// (all of them share one listening socket when a server pre-forks). Sorted by pid.
pub fn holders(inodes: &[u64], netns_inode: u64) -> BTreeMap<u64, Vec<Holder>> {
    let mut found: BTreeMap<u64, Vec<Holder>> = BTreeMap::new();
    if inodes.is_empty() {
        return found;
    }
    let wanted: HashMap<String, u64> = inodes.iter().map(|i| (format!("socket:[{i}]"), *i)).collect();
    for pid in netns::pids() {
        if netns::inode_of_pid(pid) != Some(netns_inode) {
            continue;
        }
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else { continue };
            if let Some(inode) = target.to_str().and_then(|t| wanted.get(t)) {
                let holders = found.entry(*inode).or_default();
                if !holders.iter().any(|h| h.pid == pid) {
                    holders.push(Holder::describe(pid));
                }
            }
        }
    }
    for holders in found.values_mut() {
        holders.sort();
    }
    found
}

pub fn comm_of(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm")).map(|s| s.trim_end().to_owned()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0
   1: 00000000:0BB8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12346 1 0000000000000000 100 0 0 10 0
   2: 020011AC:1F40 010011AC:B8E6 01 00000000:00000000 00:00000000 00000000     0        0 12347 1 0000000000000000 100 0 0 10 0
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:1F40 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 222 1 0000000000000000 100 0 0 10 0
   1: 0000000000000000FFFF00000100007F:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 223 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn parses_ipv4_listeners_and_skips_other_states() {
        let l = parse_proc_net_tcp(TCP);
        assert_eq!(
            l,
            vec![
                Listener { addr: "127.0.0.1".parse().unwrap(), port: 8000, inode: 12345 },
                Listener { addr: "0.0.0.0".parse().unwrap(), port: 3000, inode: 12346 },
            ]
        );
    }

    #[test]
    fn parses_ipv6_and_mapped_listeners() {
        let l = parse_proc_net_tcp(TCP6);
        assert_eq!(l[0].addr, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(l[0].port, 8000);
        assert_eq!(l[1].addr, "::ffff:127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(l[1].port, 80);
    }

    #[test]
    fn nspid_is_the_innermost() {
        assert_eq!(parse_nspid("Name:\thttpd\nNSpid:\t31455\t1\n"), Some(1));
        assert_eq!(parse_nspid("NSpid:\t812\n"), None);
        assert_eq!(parse_nspid("Name: x\n"), None);
    }

    #[test]
    fn describe_reads_our_own_process() {
        let me = Holder::describe(std::process::id());
        assert!(!me.argv.is_empty());
        assert_eq!(me.cmdline, me.argv.join(" "));
        assert!(!me.exe.is_empty());
    }

    #[test]
    fn malformed_lines_are_skipped() {
        assert!(parse_proc_net_tcp("header\n garbage\n 0: zz:zz 0 0A\n").is_empty());
    }
}
