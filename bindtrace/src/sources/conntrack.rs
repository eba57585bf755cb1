//! NATed connections, from conntrack destroy events (ctnetlink).
//!
//! A connection to a published port from another machine (or with Docker's userland proxy
//! off) is DNATed in the host's namespace to the container's address, and the refusal seen
//! inside the container shows only the translated addresses. Conntrack knows the original
//! ones, but when the container answers the SYN with a reset, netfilter deletes the entry at
//! once (a connection whose only reply is a RST is killed immediately): a lookup afterwards finds
//! nothing. The destroy event still carries both tuples, so bindtrace follows
//! NFNLGRP_CONNTRACK_DESTROY and keeps, for a short while, the NATed TCP flows whose reply comes
//! from a watched prefix, keyed by their reply tuple, which is exactly the refusal's
//! (container address, client address as the container saw it), and by the namespace whose
//! conntrack table they are in.
//!
//! The address alone is not enough: conntrack tables are per namespace, and two networks may
//! reuse the same addresses (rootless Docker's 172.17.0.0/16 is NATed in RootlessKit's
//! namespace, not the host's). A refusal looks its flow up in the table whose NAT leads into
//! the refused namespace ([`Conntrack::table_for`]): for the rootful runtimes, the host's; for a
//! rootless Docker daemon's containers, RootlessKit's (a daemon with `--userland-proxy=false`
//! DNATs there), followed with a socket of its own opened inside that namespace while the
//! daemon has containers running ([`Conntrack::set_tables`]). A table is named by its namespace's identity as everything else
//! names namespaces (`netns::Netns::cookie`: the cookie, or the inode where the kernel has no
//! cookie).
//!
//! UDP is different: a datagram answered by an ICMP port unreachable leaves its entry in place
//! (unreplied, until its timeout), so a UDP refusal's flow is asked for by its reply tuple
//! ([`udp_flow`], a ctnetlink get) when its line is attributed, and no event is kept for it.
//!
//! The messages come from netlink-packet-netfilter and the socket from netlink-sys; only the
//! group number and the SO_RCVBUFFORCE call are spelled out here (neither crate has them).
use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    io,
    net::SocketAddr,
    os::fd::AsRawFd,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use netlink_packet_core::NetlinkPayload;
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
    conntrack::{ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol, Tuple as CtTuple},
};
use netlink_sys::{Socket, protocols::NETLINK_NETFILTER};
use tokio::io::{Interest, unix::AsyncFd};

use crate::{
    netlink::{self, Messages, Msg, RECV_BUF_LEN},
    netns::{
        Netns,
        prefixes::{Prefix, prefix_contains},
    },
};

/// include/uapi/linux/netfilter/nfnetlink.h and nfnetlink_conntrack.h (not in the crate).
const NFNLGRP_CONNTRACK_DESTROY: u32 = 3;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;

/// How long a NATed flow is kept for a refusal line to find it. Lines are written within
/// milliseconds of the refusal; folded lines use their latest sample, at most a fold window old.
const KEEP: Duration = Duration::from_secs(30);
/// Bound on the flows kept (the oldest go first).
const MAX_FLOWS: usize = 4096;
/// Receive buffer: a port scan of a published port ends thousands of refused flows a second.
const RCVBUF: libc::c_int = 4 << 20;

/// One direction of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Tuple {
    pub(crate) src: SocketAddr,
    pub(crate) dst: SocketAddr,
}

/// A connection whose addresses were translated (TCP from destroy events, UDP from a query).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NatFlow {
    /// As the client sent it: the client's address and the published address it dialed.
    pub(crate) orig: Tuple,
    /// As the container answered: the container's address and the client as it saw it.
    pub(crate) reply: Tuple,
}

impl NatFlow {
    pub(crate) fn is_dnat(&self) -> bool {
        self.orig.dst != self.reply.src
    }
}

/// Where a flow is kept: the namespace whose conntrack table it is in, and its reply tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FlowKey {
    table: u64,
    reply: Tuple,
}

/// NATed flows seen lately, by table and reply tuple, and the prefixes worth keeping.
#[derive(Default)]
struct Flows {
    by_reply: HashMap<FlowKey, (NatFlow, Instant)>,
    order: VecDeque<(FlowKey, Instant)>,
    prefixes: BTreeSet<Prefix>,
    overruns: u64,
}

impl Flows {
    fn wanted(&self, flow: &NatFlow) -> bool {
        (flow.orig.dst != flow.reply.src || flow.orig.src != flow.reply.dst)
            && self.prefixes.iter().any(|p| prefix_contains(p, flow.reply.src.ip()))
    }

    fn remember(&mut self, table: u64, flow: NatFlow, now: Instant) {
        let key = FlowKey { table, reply: flow.reply };
        self.by_reply.insert(key, (flow, now));
        self.order.push_back((key, now));
        while self.order.len() > MAX_FLOWS {
            if let Some((key, at)) = self.order.pop_front()
                && self.by_reply.get(&key).is_some_and(|(_, t)| *t == at)
            {
                self.by_reply.remove(&key);
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(key, at)) = self.order.front() {
            if now.duration_since(at) < KEEP {
                break;
            }
            self.order.pop_front();
            if self.by_reply.get(&key).is_some_and(|(_, t)| *t == at) {
                self.by_reply.remove(&key);
            }
        }
    }
}

/// The detector's view of conntrack: a task reads the destroy events as they come (on the
/// same runtime, so awaiting anything lets it catch up) and this handle looks flows up.
#[derive(Clone)]
pub(crate) struct Conntrack {
    flows: Arc<Mutex<Flows>>,
    /// The namespace whose table the reader follows (bindtrace's own, the host's).
    host_table: u64,
    /// The other tables followed (RootlessKit's), and which refused namespaces they NAT into.
    others: Arc<Mutex<OtherTables>>,
    runtime: tokio::runtime::Handle,
}

/// The conntrack tables of namespaces other than ours that bindtrace follows: a rootless Docker
/// daemon's (RootlessKit's namespace), where its `--userland-proxy=false` DNAT happens.
#[derive(Default)]
struct OtherTables {
    /// Refused namespace (a rootless container's) -> the table that NATs into it.
    route: HashMap<u64, u64>,
    /// Table -> its namespace (held while followed) and its reader.
    readers: HashMap<u64, (Arc<Netns>, tokio::task::AbortHandle)>,
}

impl Drop for OtherTables {
    fn drop(&mut self) {
        for (_, reader) in self.readers.values() {
            reader.abort();
        }
    }
}

/// A namespace whose conntrack table NATs into the namespaces `into` (a rootless daemon's).
pub(crate) struct TableOf {
    pub(crate) ns: Arc<Netns>,
    /// What the table is, for the log (`rootless dockerd PID`).
    pub(crate) what: String,
    pub(crate) into: Vec<u64>,
}

/// include/uapi/linux/netfilter/nfnetlink_conntrack.h and nf_conntrack_common.h.
const CTA_STATUS: u32 = 3;
const IPS_SEEN_REPLY: u32 = 1 << 1;
const IPS_NAT_MASK: u32 = (1 << 4) | (1 << 5);
/// Where a ctnetlink message's attributes start: after the nlmsghdr and the nfgenmsg.
const FIRST_ATTR: u32 = 16 + 4;

/// A classic BPF socket filter that lets through only the destroy events a refusal can be: a
/// NATed connection that never saw a reply. Every connection of the host ends in a destroy
/// event once conntrack runs, and a host serving a published port ends thousands a second; the
/// refused ones are the few whose only answer was a reset, which netfilter kills before it
/// marks the entry `SEEN_REPLY` (nf_conntrack_proto_tcp: "if only reply is a RST ... delete
/// the conntrack immediately"). Dropping the rest in the kernel spares bindtrace a wake-up, a
/// copy and a parse per ordinary connection, and its receive buffer the overruns. An event
/// without a status attribute is let through: userspace decides, as before.
///
/// `ld #nla` (SKF_AD_NLATTR) finds a top-level attribute by type; the status is a big-endian
/// u32, which is what a classic BPF word load reads.
fn refusal_filter() -> [libc::sock_filter; 10] {
    use libc::{
        BPF_ABS, BPF_IMM, BPF_IND, BPF_JEQ, BPF_JMP, BPF_JSET, BPF_K, BPF_LD, BPF_LDX, BPF_MISC, BPF_RET,
        BPF_TAX, BPF_W, SKF_AD_NLATTR, SKF_AD_OFF, sock_filter,
    };
    let op = |code: u32, jt: u8, jf: u8, k: u32| sock_filter { code: code as u16, jt, jf, k };
    const KEEP: u32 = u32::MAX;
    [
        /* 0 */ op(BPF_LD | BPF_IMM, 0, 0, FIRST_ATTR),
        /* 1 */ op(BPF_LDX | BPF_IMM, 0, 0, CTA_STATUS),
        /* 2 */ op(BPF_LD | BPF_W | BPF_ABS, 0, 0, (SKF_AD_OFF + SKF_AD_NLATTR) as u32),
        /* 3: no status -> keep */ op(BPF_JMP | BPF_JEQ | BPF_K, 4, 0, 0),
        /* 4 */ op(BPF_MISC | BPF_TAX, 0, 0, 0),
        /* 5: A = status, after the attribute's 4-byte header */ op(BPF_LD | BPF_W | BPF_IND, 0, 0, 4),
        /* 6: answered -> drop */ op(BPF_JMP | BPF_JSET | BPF_K, 2, 0, IPS_SEEN_REPLY),
        /* 7: NATed -> keep, else drop */ op(BPF_JMP | BPF_JSET | BPF_K, 0, 1, IPS_NAT_MASK),
        /* 8 */ op(BPF_RET | BPF_K, 0, 0, KEEP),
        /* 9 */ op(BPF_RET | BPF_K, 0, 0, 0),
    ]
}

/// Attaches [`refusal_filter`] to `fd`.
fn attach_refusal_filter(fd: libc::c_int) -> io::Result<()> {
    let mut filter = refusal_filter();
    let prog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_mut_ptr() };
    // SAFETY: `prog` points at `filter`, both alive for the call; the kernel copies the program.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&raw const prog).cast(),
            size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// A ctnetlink socket of this thread's network namespace, subscribed to destroy events, with
/// [`refusal_filter`] on it.
fn destroy_socket() -> io::Result<Socket> {
    let mut sock = Socket::new(NETLINK_NETFILTER)?;
    // Before joining the group, so that no unfiltered event is ever queued.
    if let Err(e) = attach_refusal_filter(sock.as_raw_fd()) {
        // Still correct without it, only dearer: userspace sees every connection end.
        log::warn!("conntrack events: cannot filter them in the kernel ({e}); reading them all");
    }
    sock.bind_auto()?;
    sock.set_non_blocking(true)?;
    sock.add_membership(NFNLGRP_CONNTRACK_DESTROY)?;
    // SO_RCVBUFFORCE passes net.core.rmem_max (we have CAP_NET_ADMIN); netlink-sys only
    // offers SO_RCVBUF, the fallback.
    let rcvbuf = RCVBUF;
    // SAFETY: `rcvbuf` is a valid c_int for the duration of the call.
    let forced = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const rcvbuf).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    } == 0;
    if !forced {
        let _ = sock.set_rx_buf_sz(RCVBUF);
    }
    Ok(sock)
}

/// Reads the destroy events of `sock` (the table `table`) into `flows` until it fails; `what`
/// names the table in the warning.
fn spawn_reader(
    runtime: &tokio::runtime::Handle,
    sock: Socket,
    flows: Arc<Mutex<Flows>>,
    table: u64,
    what: String,
) -> io::Result<tokio::task::AbortHandle> {
    // Registered on the runtime that reads it (the caller may be on another thread).
    let _entered = runtime.enter();
    // SAFETY: the Socket owns its descriptor and closes it only when the AsyncFd drops it.
    let fd = unsafe { AsyncFd::register_with_interest(sock, Interest::READABLE) }?;
    let task = runtime.spawn(async move {
        let mut buf = Vec::with_capacity(RECV_BUF_LEN);
        loop {
            let result = match fd.readable().await {
                Ok(mut guard) => {
                    guard.clear_ready();
                    drain(guard.get_inner(), &mut buf, &flows, table)
                }
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                log::warn!(
                    "conntrack events of {what} stopped ({e}): `via` dnat is no longer reported there"
                );
                return;
            }
        }
    });
    Ok(task.abort_handle())
}

impl Conntrack {
    /// Subscribes to conntrack destroy events of this thread's network namespace (needs
    /// CAP_NET_ADMIN) and starts reading them on the current tokio runtime. Fails when the
    /// kernel has no conntrack netlink support.
    pub(crate) fn spawn() -> io::Result<Conntrack> {
        let host_table = Netns::open(std::path::Path::new("/proc/thread-self/ns/net"))?.cookie;
        let sock = destroy_socket()?;
        let flows: Arc<Mutex<Flows>> = Arc::default();
        let runtime = tokio::runtime::Handle::current();
        // The host's reader runs as long as bindtrace does.
        let _ = spawn_reader(&runtime, sock, flows.clone(), host_table, "the host's table".to_owned())?;
        Ok(Conntrack { flows, host_table, others: Arc::default(), runtime })
    }

    /// Only flows answered from these prefixes (the watched bridges) are kept.
    pub(crate) fn set_prefixes(&self, prefixes: &BTreeSet<Prefix>) {
        if let Ok(mut f) = self.flows.lock() {
            f.prefixes = prefixes.clone();
        }
    }

    /// The tables of other namespaces to follow, each with the namespaces it NATs into (each
    /// running rootless Docker daemon's RootlessKit namespace and its containers'). A table new
    /// here gets a ctnetlink socket opened inside its namespace (on a helper thread that joins
    /// it, as `netns::run_in` does) and a reader; one no longer named (its daemon or its last
    /// container gone) has its reader stopped and its namespace let go.
    pub(crate) fn set_tables(&self, tables: Vec<TableOf>) {
        let Ok(mut others) = self.others.lock() else { return };
        let wanted: HashMap<u64, &TableOf> =
            tables.iter().filter(|t| t.ns.cookie != self.host_table).map(|t| (t.ns.cookie, t)).collect();
        others.readers.retain(|table, (_, reader)| {
            let keep = wanted.contains_key(table);
            if !keep {
                reader.abort();
                log::info!(
                    "conntrack table of netns {table} no longer followed (its daemon has no running containers)"
                );
            }
            keep
        });
        others.route.clear();
        for (&table, t) in &wanted {
            if let std::collections::hash_map::Entry::Vacant(slot) = others.readers.entry(table) {
                let opened = t.ns.run(destroy_socket).and_then(|sock| {
                    spawn_reader(&self.runtime, sock, self.flows.clone(), table, t.what.clone())
                });
                match opened {
                    Ok(reader) => {
                        log::info!("following the conntrack table of {} (netns {})", t.what, t.ns.inode);
                        slot.insert((t.ns.clone(), reader));
                    }
                    Err(e) => {
                        // Tried again at the next scan; its refusals read the host's table.
                        log::debug!("conntrack table of {} (netns {}): {e}", t.what, t.ns.inode);
                        continue;
                    }
                }
            }
            for &refused in &t.into {
                others.route.insert(refused, table);
            }
        }
    }

    /// The namespaces of the tables other than the host's, by the refused namespaces they NAT
    /// into (a UDP refusal's entry is asked for inside them).
    pub(crate) fn tables_by_refused(&self) -> HashMap<u64, Arc<Netns>> {
        let Ok(others) = self.others.lock() else { return HashMap::new() };
        others
            .route
            .iter()
            .filter_map(|(refused, table)| Some((*refused, others.readers.get(table)?.0.clone())))
            .collect()
    }

    /// The conntrack table whose NAT leads into the refused namespace `refused_netns`: for the
    /// rootful runtimes (Docker, podman, containerd, all NATing in the host's namespace), the
    /// host's; for a rootless Docker daemon's containers, RootlessKit's (see [`Self::set_tables`]).
    pub(crate) fn table_for(&self, refused_netns: u64) -> u64 {
        self.others.lock().ok().and_then(|o| o.route.get(&refused_netns).copied()).unwrap_or(self.host_table)
    }

    /// The NATed flow the container at `target` answered for `client` (as it saw the client),
    /// refused in the namespace `refused_netns`, from the table that NATs into it.
    pub(crate) fn flow(&self, refused_netns: u64, target: SocketAddr, client: SocketAddr) -> Option<NatFlow> {
        let key = FlowKey { table: self.table_for(refused_netns), reply: Tuple { src: target, dst: client } };
        let f = self.flows.lock().ok()?;
        f.by_reply.get(&key).map(|(flow, _)| *flow)
    }
}

/// Reads every queued event of the table `table` without blocking.
fn drain(sock: &Socket, buf: &mut Vec<u8>, flows: &Mutex<Flows>, table: u64) -> io::Result<()> {
    let now = Instant::now();
    let mut flows = flows.lock().map_err(|_| io::Error::other("conntrack state poisoned"))?;
    loop {
        buf.clear();
        if let Err(err) = sock.recv(buf, libc::MSG_DONTWAIT) {
            match err.raw_os_error() {
                Some(libc::EAGAIN) => break,
                Some(libc::EINTR) => continue,
                Some(libc::ENOBUFS) => {
                    // Events were dropped (a burst of connections ended): the flows we missed
                    // show as `via` unknown, nothing worse.
                    flows.overruns += 1;
                    if flows.overruns.is_power_of_two() {
                        log::debug!("conntrack events overran {} times", flows.overruns);
                    }
                    continue;
                }
                _ => return Err(err),
            }
        }
        for msg in Messages::new(buf).map_while(Result::ok) {
            if let Some(flow) = destroyed_flow(&msg)
                && flows.wanted(&flow)
            {
                flows.remember(table, flow, now);
            }
        }
    }
    flows.expire(now);
    Ok(())
}

/// Both tuples of a TCP destroy event; None for any other message.
pub(crate) fn destroyed_flow(msg: &Msg<'_>) -> Option<NatFlow> {
    // Check the type before decoding: the kernel filter lets through events without a status.
    if msg.header.message_type != (NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE) {
        return None;
    }
    let NetlinkPayload::InnerMessage(NetfilterMessage {
        inner: NetfilterMessageInner::Conntrack(ConntrackMessage::Delete(attrs)),
        ..
    }) = msg.decode::<NetfilterMessage>()?
    else {
        return None;
    };
    flow_of(&attrs, Protocol::Tcp)
}

/// The UDP flow whose reply tuple is (`target` -> `client`), from a ctnetlink query in this
/// thread's network namespace (needs CAP_NET_ADMIN); None when conntrack has no such entry. The
/// caller runs it in the namespace whose table NATs into the refused one (the host's, where the
/// enrichment worker runs, or RootlessKit's, on a thread that joined it).
pub(crate) fn udp_flow(target: SocketAddr, client: SocketAddr) -> io::Result<Option<NatFlow>> {
    let family = if target.is_ipv4() { NetfilterProtoFamily::IPv4 } else { NetfilterProtoFamily::IPv6 };
    let reply_tuple = vec![
        CtTuple::Ip(vec![IPTuple::SourceAddress(target.ip()), IPTuple::DestinationAddress(client.ip())]),
        CtTuple::Proto(vec![
            ProtoTuple::Protocol(Protocol::Udp),
            ProtoTuple::SourcePort(target.port()),
            ProtoTuple::DestinationPort(client.port()),
        ]),
    ];
    let request = NetfilterMessage::new(
        NetfilterHeader::new(family, 0, 0),
        ConntrackMessage::Get(vec![ConntrackAttribute::CtaTupleReply(reply_tuple)]),
    );
    // The kernel flags its answer NLM_F_MULTI but sends no NLMSG_DONE after it: ask for the
    // acknowledgement, which then ends the reply.
    let flags = netlink_packet_core::NLM_F_REQUEST | netlink_packet_core::NLM_F_ACK;
    let reply = match netlink::transact(NETLINK_NETFILTER, flags, request) {
        Ok(r) => r,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(reply.messages.iter().find_map(|m| match &m.inner {
        NetfilterMessageInner::Conntrack(ConntrackMessage::New(attrs)) => flow_of(attrs, Protocol::Udp),
        _ => None,
    }))
}

/// Both tuples of a conntrack entry of protocol `proto`.
fn flow_of(attrs: &[ConntrackAttribute], proto: Protocol) -> Option<NatFlow> {
    let mut orig = None;
    let mut reply = None;
    for attr in attrs {
        match attr {
            ConntrackAttribute::CtaTupleOrig(t) => orig = parse_tuple(t, proto),
            ConntrackAttribute::CtaTupleReply(t) => reply = parse_tuple(t, proto),
            _ => {}
        }
    }
    Some(NatFlow { orig: orig?, reply: reply? })
}

/// A tuple of protocol `want`; None for other protocols.
fn parse_tuple(parts: &[CtTuple], want: Protocol) -> Option<Tuple> {
    let (mut src, mut dst, mut proto, mut sport, mut dport) = (None, None, None, None, None);
    for part in parts {
        match part {
            CtTuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => src = Some(*a),
                        IPTuple::DestinationAddress(a) => dst = Some(*a),
                        _ => {}
                    }
                }
            }
            CtTuple::Proto(ps) => {
                for p in ps {
                    match p {
                        ProtoTuple::Protocol(p) => proto = Some(*p),
                        ProtoTuple::SourcePort(v) => sport = Some(*v),
                        ProtoTuple::DestinationPort(v) => dport = Some(*v),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if proto? != want {
        return None;
    }
    Some(Tuple { src: SocketAddr::new(src?, sport?), dst: SocketAddr::new(dst?, dport?) })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CTA_TUPLE_ORIG: u16 = 1;
    const CTA_TUPLE_REPLY: u16 = 2;
    const CTA_TUPLE_IP: u16 = 1;
    const CTA_TUPLE_PROTO: u16 = 2;
    const CTA_IP_V4_SRC: u16 = 1;
    const CTA_IP_V4_DST: u16 = 2;
    const CTA_PROTO_NUM: u16 = 1;
    const CTA_PROTO_SRC_PORT: u16 = 2;
    const CTA_PROTO_DST_PORT: u16 = 3;

    /// `payload` (nfgenmsg + attributes) framed as one IPCTNL_MSG_CT_DELETE event.
    fn destroy_event(payload: &[u8]) -> Vec<u8> {
        let mut msg = Vec::new();
        msg.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&(NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE).to_ne_bytes());
        msg.extend_from_slice(&[0u8; 10]);
        msg.extend_from_slice(payload);
        msg
    }

    /// `payload` framed as one destroy event, decoded.
    fn parse_destroy(payload: &[u8]) -> Option<NatFlow> {
        let msg = destroy_event(payload);
        destroyed_flow(&Messages::new(&msg).next()?.ok()?)
    }

    fn attr(ty: u16, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&ty.to_ne_bytes());
        out.extend_from_slice(value);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out
    }

    fn nested(ty: u16, parts: &[Vec<u8>]) -> Vec<u8> {
        attr(ty | libc::NLA_F_NESTED as u16, &parts.concat())
    }

    fn tuple(ty: u16, src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        nested(
            ty,
            &[
                nested(CTA_TUPLE_IP, &[attr(CTA_IP_V4_SRC, &src), attr(CTA_IP_V4_DST, &dst)]),
                nested(
                    CTA_TUPLE_PROTO,
                    &[
                        attr(CTA_PROTO_NUM, &[6]),
                        attr(CTA_PROTO_SRC_PORT, &sport.to_be_bytes()),
                        attr(CTA_PROTO_DST_PORT, &dport.to_be_bytes()),
                    ],
                ),
            ],
        )
    }

    #[test]
    fn parses_a_dnat_destroy_event() {
        let mut payload = vec![2, 0, 0, 0];
        payload.extend(tuple(CTA_TUPLE_ORIG, [10, 9, 0, 2], [10, 9, 0, 1], 40000, 8000));
        payload.extend(tuple(CTA_TUPLE_REPLY, [172, 17, 0, 2], [10, 9, 0, 2], 8000, 40000));
        payload.extend(attr(3, &[0, 0, 0, 1])); // CTA_STATUS, ignored
        let flow = parse_destroy(&payload).unwrap();
        assert_eq!(flow.orig.src, "10.9.0.2:40000".parse().unwrap());
        assert_eq!(flow.orig.dst, "10.9.0.1:8000".parse().unwrap());
        assert_eq!(flow.reply.src, "172.17.0.2:8000".parse().unwrap());
        assert!(flow.is_dnat());
    }

    #[test]
    fn only_nated_flows_from_watched_prefixes_are_kept() {
        let t = |a: &str, b: &str| Tuple { src: a.parse().unwrap(), dst: b.parse().unwrap() };
        let mut f = Flows::default();
        f.prefixes.insert(crate::netns::prefixes::prefix_of("172.17.0.1".parse().unwrap(), 16));
        let dnat = NatFlow {
            orig: t("10.9.0.2:4000", "10.9.0.1:8000"),
            reply: t("172.17.0.2:8000", "10.9.0.2:4000"),
        };
        let plain = NatFlow {
            orig: t("172.17.0.1:5000", "172.17.0.2:80"),
            reply: t("172.17.0.2:80", "172.17.0.1:5000"),
        };
        let outbound = NatFlow {
            orig: t("172.17.0.2:5000", "1.1.1.1:443"),
            reply: t("1.1.1.1:443", "192.168.1.5:5000"),
        };
        assert!(f.wanted(&dnat));
        assert!(!f.wanted(&plain));
        assert!(!f.wanted(&outbound));
        let now = Instant::now();
        f.remember(1, dnat, now);
        assert!(f.by_reply.contains_key(&FlowKey { table: 1, reply: dnat.reply }));
        f.expire(now + KEEP);
        assert!(f.by_reply.is_empty());
    }

    /// The same reply tuple in two namespaces' tables (two networks reusing one prefix) is two
    /// flows: each table's is found under its own namespace, never the other's.
    #[test]
    fn flows_are_kept_per_table() {
        let t = |a: &str, b: &str| Tuple { src: a.parse().unwrap(), dst: b.parse().unwrap() };
        let mut f = Flows::default();
        f.prefixes.insert(crate::netns::prefixes::prefix_of("172.17.0.1".parse().unwrap(), 16));
        let reply = t("172.17.0.2:8000", "172.17.0.1:4000");
        let host = NatFlow { orig: t("10.9.0.2:4000", "10.9.0.1:8000"), reply };
        let rootless = NatFlow { orig: t("127.0.0.1:4000", "127.0.0.1:18000"), reply };
        let now = Instant::now();
        f.remember(1, host, now);
        f.remember(2, rootless, now);
        let get = |table| f.by_reply.get(&FlowKey { table, reply }).map(|(flow, _)| *flow);
        assert_eq!(get(1), Some(host));
        assert_eq!(get(2), Some(rootless));
        assert_eq!(get(3), None);
        let ct = Conntrack {
            flows: Arc::new(Mutex::new(f)),
            host_table: 1,
            others: Arc::default(),
            runtime: tokio::runtime::Builder::new_current_thread().build().unwrap().handle().clone(),
        };
        assert_eq!(ct.flow(99, reply.src, reply.dst), Some(host), "a rootful refusal reads the host's table");
        // A rootless container's namespace (99) behind the table 2: its refusal reads that one.
        ct.others.lock().unwrap().route.insert(99, 2);
        assert_eq!(ct.flow(99, reply.src, reply.dst), Some(rootless), "RootlessKit's table");
        assert_eq!(ct.flow(98, reply.src, reply.dst), Some(host));
    }

    #[test]
    fn a_udp_entry_gives_both_tuples_and_tcp_parsing_skips_it() {
        let t = |src: &str, dst: &str, sport, dport| {
            vec![
                CtTuple::Ip(vec![
                    IPTuple::SourceAddress(src.parse().unwrap()),
                    IPTuple::DestinationAddress(dst.parse().unwrap()),
                ]),
                CtTuple::Proto(vec![
                    ProtoTuple::Protocol(Protocol::Udp),
                    ProtoTuple::SourcePort(sport),
                    ProtoTuple::DestinationPort(dport),
                ]),
            ]
        };
        let attrs = vec![
            ConntrackAttribute::CtaTupleOrig(t("198.18.0.2", "198.18.0.1", 40000, 5353)),
            ConntrackAttribute::CtaTupleReply(t("172.17.0.2", "198.18.0.2", 53, 40000)),
            ConntrackAttribute::CtaTimeout(30),
        ];
        let flow = flow_of(&attrs, Protocol::Udp).unwrap();
        assert_eq!(flow.orig.dst, "198.18.0.1:5353".parse().unwrap());
        assert_eq!(flow.reply.src, "172.17.0.2:53".parse().unwrap());
        assert!(flow.is_dnat());
        assert_eq!(flow_of(&attrs, Protocol::Tcp), None);
    }

    #[test]
    fn other_protocols_and_garbage_are_skipped() {
        let udp = nested(CTA_TUPLE_ORIG, &[nested(CTA_TUPLE_PROTO, &[attr(CTA_PROTO_NUM, &[17])])]);
        assert!(parse_destroy(&[&[2u8, 0, 0, 0][..], &udp].concat()).is_none());
        assert!(parse_destroy(&[1, 2]).is_none());
        assert!(parse_destroy(&[2, 0, 0, 0, 0xff, 0xff, 1]).is_none());
        // Every truncation of a valid event: skipped or parsed, never a panic.
        let mut full = vec![2, 0, 0, 0];
        full.extend(tuple(CTA_TUPLE_ORIG, [10, 9, 0, 2], [10, 9, 0, 1], 40000, 8000));
        full.extend(tuple(CTA_TUPLE_REPLY, [172, 17, 0, 2], [10, 9, 0, 2], 8000, 40000));
        for n in 0..full.len() {
            let _ = parse_destroy(&full[..n]);
        }
        assert!(parse_destroy(&full).is_some());
    }

    /// The kernel runs the filter: a datagram socket pair with it on the receiving end (the
    /// kernel filters AF_UNIX datagrams as it filters netlink broadcasts, and `ld #nla` reads
    /// any linear skb) gets the events as a conntrack listener would, and only the refusals.
    #[test]
    fn the_kernel_filter_keeps_only_unanswered_nated_flows() {
        const CTA_STATUS_U16: u16 = CTA_STATUS as u16;
        let event = |status: Option<u32>| {
            let mut payload = vec![2, 0, 0, 0];
            payload.extend(tuple(CTA_TUPLE_ORIG, [10, 9, 0, 2], [10, 9, 0, 1], 40000, 8000));
            payload.extend(tuple(CTA_TUPLE_REPLY, [172, 17, 0, 2], [10, 9, 0, 2], 8000, 40000));
            if let Some(status) = status {
                payload.extend(attr(CTA_STATUS_U16, &status.to_be_bytes()));
            }
            payload.extend(attr(7, &[0, 0, 0, 9])); // CTA_TIMEOUT, after the status as the kernel puts it
            destroy_event(&payload)
        };
        const CONFIRMED: u32 = 1 << 3;
        const ASSURED: u32 = 1 << 2;
        const DST_NAT_DONE: u32 = 1 << 8;
        let cases: [(&str, Option<u32>, bool); 6] = [
            ("refused through a DNAT", Some(CONFIRMED | (1 << 5) | DST_NAT_DONE), true),
            ("refused through a SNAT", Some(CONFIRMED | (1 << 4)), true),
            (
                "answered through a DNAT",
                Some(CONFIRMED | (1 << 5) | DST_NAT_DONE | IPS_SEEN_REPLY | ASSURED),
                false,
            ),
            ("refused, no NAT", Some(CONFIRMED), false),
            ("answered, no NAT", Some(CONFIRMED | IPS_SEEN_REPLY | ASSURED), false),
            ("no status attribute", None, true),
        ];
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors.
        assert_eq!(unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_DGRAM, 0, fds.as_mut_ptr()) }, 0);
        let (tx, rx) = (fds[0], fds[1]);
        attach_refusal_filter(rx).expect("the kernel takes the filter");
        for (what, status, _) in &cases {
            let msg = event(*status);
            // SAFETY: `msg` is alive for the call.
            let sent = unsafe { libc::send(tx, msg.as_ptr().cast(), msg.len(), 0) };
            assert_eq!(sent, msg.len() as isize, "{what}");
        }
        let mut received = Vec::new();
        let mut buf = [0u8; 512];
        loop {
            // SAFETY: `buf` is alive and as long as said.
            let n = unsafe { libc::recv(rx, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            if n < 0 {
                break;
            }
            received.push(buf[..n as usize].to_vec());
        }
        // SAFETY: both descriptors are ours and closed once.
        unsafe {
            libc::close(tx);
            libc::close(rx);
        }
        let expected: Vec<Vec<u8>> = cases.iter().filter(|c| c.2).map(|c| event(c.1)).collect();
        let names = |msgs: &[Vec<u8>]| {
            msgs.iter()
                .map(|m| cases.iter().find(|c| event(c.1) == *m).map_or("?", |c| c.0))
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&received), names(&expected));
        // What passes still parses as the flow it is.
        assert!(parse_destroy(&received[0][16..]).is_some_and(|f| f.is_dnat()));
    }
}
