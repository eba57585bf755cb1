//! A namespace's listening sockets, TCP or UDP: one sock_diag dump from a thread that joined the
//! namespace ([`sock_diag`]), or the `/proc/net/{tcp,udp}{,6}` tables where sock_diag is missing
//! ([`proc_net`]), so namespaces without any process (a handle under /run/netns) work too.
//!
//! A UDP "listener" is a bound, unconnected socket (state CLOSE in both sources): a connected
//! one only takes datagrams from its peer. Docker's embedded DNS (the daemon's TCP and UDP
//! sockets on 127.0.0.11) is left out of what is reported by `docker_dns`, for both protocols.
pub(crate) mod proc_net;
pub(crate) mod sock_diag;

use std::{collections::HashSet, fs, io, net::IpAddr};

use crate::netns::Netns;

/// Which transport's listeners to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// From the IP protocol number in a count key; anything but UDP is TCP (the only other
    /// protocol the kernel side counts).
    pub(crate) fn from_ip(proto: u8) -> Proto {
        if proto == bindtrace_common::IPPROTO_UDP { Proto::Udp } else { Proto::Tcp }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// One listening socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Listener {
    pub(crate) addr: IpAddr,
    pub(crate) port: u16,
    /// Socket inode, to find the processes holding it.
    pub(crate) inode: u64,
}

/// What one dump of a namespace says.
#[derive(Debug, Default)]
pub(crate) struct Listening {
    pub(crate) listeners: Vec<Listener>,
    /// Socket inodes of the IPv6 listeners with IPV6_V6ONLY set.
    pub(crate) v6only: HashSet<u64>,
}

/// Listening sockets of the namespace, and which IPv6 ones have IPV6_V6ONLY: one sock_diag dump
/// made from a thread that joined the namespace. Where sock_diag fails (a kernel without
/// inet_diag/tcp_diag/udp_diag), the slower /proc tables give the listeners, and no listener is
/// taken for V6ONLY (they do not show the flag).
pub(crate) fn listening_in(ns: &Netns, proto: Proto) -> io::Result<Listening> {
    ns.run(|| {
        match sock_diag::listening_here(proto) {
            Ok(found) => return Ok(found),
            Err(e) => log::debug!(
                "sock_diag {} listener dump failed ({e}); reading /proc/net/{} (treating [::] listeners as dual-stack)",
                proto.name(),
                proto.name()
            ),
        }
        let table = format!("/proc/thread-self/net/{}", proto.name());
        let mut listeners = proc_net::parse(proto, &fs::read_to_string(&table)?);
        // The IPv6 table is absent when IPv6 is disabled: that is not an error.
        if let Ok(text) = fs::read_to_string(format!("{table}6")) {
            listeners.extend(proc_net::parse(proto, &text));
        }
        Ok(Listening { listeners, v6only: Default::default() })
    })
}
