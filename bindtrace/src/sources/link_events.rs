//! Link events: a netlink socket subscribed to link and namespace-id changes, which only says
//! *that* something changed; the scope is then recomputed from a fresh dump
//! (`netns::links::dump_links`). The socket is netlink-sys's; the messages are only counted by
//! their header type, never decoded.
use std::{io, os::fd::AsRawFd};

use netlink_sys::{Socket, protocols::NETLINK_ROUTE};
use tokio::io::{Interest, unix::AsyncFd};

use crate::netlink::{Messages, RECV_BUF_LEN};

/// Receive buffer asked for on the watcher socket. Starting a batch of containers produces a
/// burst of notifications; a larger queue makes ENOBUFS (and thus a full re-dump) rarer. The
/// kernel caps it at net.core.rmem_max, which is fine: overruns are handled anyway.
pub(crate) const WATCH_RCVBUF: u32 = 1 << 20;

/// What one wake-up of the watcher read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LinkChanges {
    /// Link and namespace-id notifications.
    pub(crate) messages: usize,
    /// Times the socket overran (ENOBUFS): notifications were dropped, so the caller must
    /// re-read every link.
    pub(crate) overruns: u64,
}

/// A unicast route of the main table: what a CNI adds for a routed workload. The local
/// table's routes (one per address, an IPv6 link-local one per veth coming up) are not: they
/// would double every container start's rescans.
fn is_main_unicast(m: &crate::netlink::Msg<'_>) -> bool {
    use netlink_packet_core::NetlinkPayload;
    use netlink_packet_route::{
        RouteNetlinkMessage,
        route::{RouteHeader, RouteType},
    };
    match m.decode::<RouteNetlinkMessage>() {
        Some(NetlinkPayload::InnerMessage(
            RouteNetlinkMessage::NewRoute(r) | RouteNetlinkMessage::DelRoute(r),
        )) => r.header.table == RouteHeader::RT_TABLE_MAIN && r.header.kind == RouteType::Unicast,
        _ => false,
    }
}

/// A netlink socket subscribed to RTNLGRP_LINK, RTNLGRP_NSID and the IPv4 and IPv6 route
/// groups (main-table unicast routes only count), registered with tokio.
///
/// It only says *that* something changed; callers re-run `dump_links` for the new state. That
/// keeps one code path for the state (the dump) and makes lost notifications harmless.
pub(crate) struct LinkWatcher {
    fd: AsyncFd<Socket>,
    buf: Vec<u8>,
}

impl std::fmt::Debug for LinkWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkWatcher").field("fd", &self.fd.get_ref().as_raw_fd()).finish()
    }
}

impl LinkWatcher {
    /// Creates the socket in the calling thread's network namespace, asking for `rcvbuf` bytes
    /// of receive buffer. Must be called inside a tokio runtime with IO enabled (an error is
    /// returned otherwise).
    pub(crate) fn new(rcvbuf: u32) -> io::Result<LinkWatcher> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(io::Error::other("LinkWatcher::new needs a tokio runtime with IO enabled"));
        }
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.set_non_blocking(true)?;
        // Link changes (new/changed/deleted interfaces, master changes) and namespace ids: a
        // peer moving to another namespace shows up here as a RTM_DELLINK of the peer plus,
        // the first time, a RTM_NEWNSID for its new namespace.
        // Routes too: a routed workload (Calico's `cali*`, no bridge) gets its /32 route on
        // the host after its veth is up and its address set inside, with no link change left
        // to say that its address is now there to watch (`refresh_prefixes`).
        for group in
            [libc::RTNLGRP_LINK, libc::RTNLGRP_NSID, libc::RTNLGRP_IPV4_ROUTE, libc::RTNLGRP_IPV6_ROUTE]
        {
            sock.add_membership(group)?;
        }
        if let Err(e) = sock.set_rx_buf_sz(rcvbuf.min(i32::MAX as u32) as libc::c_int) {
            log::debug!("netlink watcher: SO_RCVBUF not raised: {e}");
        }
        // Only readability matters; registering for writes would just wake us for nothing.
        // SAFETY: the Socket owns its descriptor and closes it only when the AsyncFd drops it.
        let fd = unsafe { AsyncFd::register_with_interest(sock, Interest::READABLE) }?;
        Ok(LinkWatcher { fd, buf: Vec::with_capacity(RECV_BUF_LEN) })
    }

    /// Waits until at least one link/nsid notification arrives or the socket overran, drains
    /// every queued message without blocking, and says what it read.
    ///
    /// Cancel safe: nothing is lost if the future is dropped while waiting.
    pub(crate) async fn changed(&mut self) -> io::Result<LinkChanges> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut changes = LinkChanges::default();
            loop {
                // MSG_TRUNC makes the kernel report the full datagram length; a notification
                // bigger than the buffer is still counted by what fits (recv writes at most the
                // buffer's capacity).
                self.buf.clear();
                match guard.get_inner().recv(&mut self.buf, libc::MSG_DONTWAIT | libc::MSG_TRUNC) {
                    Ok(_) => {}
                    Err(e) => match e.raw_os_error() {
                        Some(libc::EAGAIN) => {
                            guard.clear_ready();
                            break;
                        }
                        Some(libc::EINTR) => continue,
                        Some(libc::ENOBUFS) => {
                            // Notifications were dropped; what is still queued comes after
                            // the gap. Keep draining, and report the gap as a change.
                            changes.overruns += 1;
                            continue;
                        }
                        _ => return Err(e),
                    },
                }
                changes.messages += Messages::new(&self.buf)
                    .map_while(Result::ok)
                    .filter(|m| match m.header.message_type {
                        libc::RTM_NEWLINK | libc::RTM_DELLINK | libc::RTM_NEWNSID | libc::RTM_DELNSID => true,
                        libc::RTM_NEWROUTE | libc::RTM_DELROUTE => is_main_unicast(m),
                        _ => false,
                    })
                    .count();
            }
            if changes != LinkChanges::default() {
                return Ok(changes);
            }
        }
    }
}
