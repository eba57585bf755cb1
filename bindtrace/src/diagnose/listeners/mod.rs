//! A namespace's listening TCP sockets: one sock_diag dump from a thread that joined the
//! namespace ([`sock_diag`]), or the `/proc/net/tcp{,6}` tables where sock_diag is missing
//! ([`proc_net`]), so namespaces without any process (a handle under /run/netns) work too.
pub(crate) mod proc_net;
pub(crate) mod sock_diag;

use std::{collections::HashSet, fs, io, net::IpAddr};

use crate::netns::Netns;

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
/// inet_diag/tcp_diag), the slower /proc tables give the listeners, and no listener is taken
/// for V6ONLY (they do not show the flag).
pub(crate) fn listening_in(ns: &Netns) -> io::Result<Listening> {
    ns.run(|| {
        match sock_diag::listening_here() {
            Ok(found) => return Ok(found),
            Err(e) => log::debug!(
                "sock_diag listener dump failed ({e}); reading /proc/net/tcp (treating [::] listeners as dual-stack)"
            ),
        }
        let mut listeners = proc_net::parse_tcp(&fs::read_to_string("/proc/thread-self/net/tcp")?);
        // tcp6 is absent when IPv6 is disabled: that is not an error.
        if let Ok(text) = fs::read_to_string("/proc/thread-self/net/tcp6") {
            listeners.extend(proc_net::parse_tcp(&text));
        }
        Ok(Listening { listeners, v6only: Default::default() })
    })
}
