//! The links of a network namespace with their bridge master and veth peer ([`dump_links`]),
//! and the id under which this namespace knows another namespace ([`netnsid_of`]): just enough
//! routing netlink to map Docker's plumbing. Messages come from netlink-packet-route; the
//! request loop is the shared one in `crate::netlink`.
//!
//! Both work on the network namespace of the *calling thread* (see `crate::netlink`).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use netlink_packet_core::NLM_F_REQUEST;
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
    nsid::{NsidAttribute, NsidMessage},
};
use netlink_sys::protocols::NETLINK_ROUTE;

use crate::netlink;

/// The value of NETNSA_NSID when the namespace has no id in the asking namespace.
const NETNSA_NSID_NOT_ASSIGNED: i32 = -1;

/// One network interface of the calling thread's network namespace, as rtnetlink reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Link {
    /// Interface index, unique only within this namespace.
    pub(crate) ifindex: u32,
    /// IFLA_IFNAME.
    pub(crate) name: String,
    /// IFLA_LINKINFO / IFLA_INFO_KIND: "bridge", "veth", ... (None for devices without a
    /// link type, such as `lo` or physical NICs).
    pub(crate) kind: Option<String>,
    /// IFLA_MASTER: the bridge this interface is a port of.
    pub(crate) master: Option<u32>,
    /// IFLA_LINK (for a veth: the peer's ifindex, in the peer's namespace).
    pub(crate) peer_ifindex: Option<u32>,
    /// IFLA_LINK_NETNSID: the peer's namespace, as an id local to this namespace; None when the
    /// peer is in this same namespace.
    ///
    /// The kernel reports the peer's namespace only as this id. It is the one stable handle:
    /// names under /run/netns are a userspace convention (Docker keeps its own under
    /// /var/run/docker/netns, and a container may have none), and inode numbers are reused as
    /// soon as a namespace dies. Match it against [`netnsid_of`] of a namespace file.
    ///
    /// Some(-1) (NETNSA_NSID_NOT_ASSIGNED) means the peer is elsewhere but the kernel could not
    /// give its namespace an id, which happens while that namespace is being torn down.
    pub(crate) peer_netnsid: Option<i32>,
    /// IFF_UP (administratively up).
    pub(crate) up: bool,
}

/// RTM_GETLINK dump of the calling thread's current network namespace.
///
/// A veth whose peer lives elsewhere comes with the peer namespace's id. In practice the kernel
/// has assigned that id before anyone dumps: moving a device out of a namespace, or creating a
/// veth with its peer in another one, gives the other namespace an id here and announces it with
/// RTM_NEWNSID (the kernel fills IFLA_LINK_NETNSID with an allocating lookup in any case).
pub(crate) fn dump_links() -> io::Result<Vec<Link>> {
    // AF_UNSPEC with a zero index asks for every link.
    let replies =
        netlink::dump(NETLINK_ROUTE, "link dump", || RouteNetlinkMessage::GetLink(LinkMessage::default()))?;
    Ok(replies
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => parse_link(l),
            _ => None,
        })
        .collect())
}

/// RTM_GETNSID with NETNSA_FD: the id this namespace gives to the namespace behind `ns` (an open
/// /proc/PID/ns/net or /run/netns/X file). Ok(None) when no id is assigned
/// (NETNSA_NSID_NOT_ASSIGNED = -1).
///
/// This only looks the id up; it never assigns one.
pub(crate) fn netnsid_of(ns: BorrowedFd<'_>) -> io::Result<Option<i32>> {
    let mut req = NsidMessage::default();
    req.attributes.push(NsidAttribute::Fd(ns.as_raw_fd() as u32));
    let reply = netlink::transact(NETLINK_ROUTE, NLM_F_REQUEST, RouteNetlinkMessage::GetNsId(req))?;
    let nsid = reply.messages.into_iter().find_map(|m| match m {
        RouteNetlinkMessage::NewNsId(n) => n.attributes.into_iter().find_map(|a| match a {
            NsidAttribute::Id(id) => Some(id),
            _ => None,
        }),
        _ => None,
    });
    match nsid {
        Some(NETNSA_NSID_NOT_ASSIGNED) => Ok(None),
        Some(id) => Ok(Some(id)),
        None => Err(io::Error::new(io::ErrorKind::InvalidData, "RTM_GETNSID reply without NETNSA_NSID")),
    }
}

/// A link from a decoded RTM_NEWLINK. None when it has no name.
pub(crate) fn parse_link(msg: LinkMessage) -> Option<Link> {
    let mut link = Link {
        ifindex: msg.header.index,
        name: String::new(),
        kind: None,
        master: None,
        peer_ifindex: None,
        peer_netnsid: None,
        up: msg.header.flags.contains(LinkFlags::Up),
    };
    let mut have_name = false;
    for attr in msg.attributes {
        match attr {
            LinkAttribute::IfName(name) => {
                link.name = name;
                have_name = true;
            }
            // An ifindex of 0 never names a device; the kernel reports IFLA_LINK 0 for a veth
            // whose peer is already gone (mid-deletion).
            LinkAttribute::Controller(i) => link.master = Some(i).filter(|&i| i != 0),
            LinkAttribute::Link(i) => link.peer_ifindex = Some(i).filter(|&i| i != 0),
            LinkAttribute::LinkNetNsId(id) => link.peer_netnsid = Some(id),
            LinkAttribute::LinkInfo(infos) => {
                link.kind = infos.into_iter().find_map(|i| match i {
                    // Kinds the crate does not know come back as Other, with the kernel's string.
                    LinkInfo::Kind(InfoKind::Other(s)) => Some(s),
                    LinkInfo::Kind(k) => Some(k.to_string()),
                    _ => None,
                });
            }
            _ => {}
        }
    }
    have_name.then_some(link)
}

/// Decodes a RTM_NEWLINK as it comes off the socket (used by the parser tests).
#[cfg(test)]
fn decode_link(datagram: &[u8]) -> io::Result<Option<Link>> {
    use netlink_packet_core::NetlinkPayload;
    let Some(msg) = netlink::Messages::new(datagram).next().transpose()? else { return Ok(None) };
    Ok(match msg.decode::<RouteNetlinkMessage>() {
        Some(NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l))) => parse_link(l),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::link_events::LinkWatcher;
    use std::fs::File;
    use std::os::fd::{AsFd, AsRawFd};
    use std::process::Command;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// The topology tests create namespaces, links and bridges.
    fn skip_unless_root() -> bool {
        !crate::testing::root_or_skip("creates network namespaces")
    }

    static NS_COUNT: AtomicUsize = AtomicUsize::new(0);

    /// A network namespace made with `ip netns add`, deleted on drop (also while unwinding).
    struct NetNs {
        name: String,
    }

    impl NetNs {
        fn new() -> NetNs {
            let name = format!("bt-nl-{}-{}", std::process::id(), NS_COUNT.fetch_add(1, Ordering::Relaxed));
            run_ip(&["netns", "add", &name]);
            NetNs { name }
        }

        fn path(&self) -> String {
            format!("/run/netns/{}", self.name)
        }

        fn open(&self) -> File {
            File::open(self.path()).unwrap_or_else(|e| panic!("open {}: {e}", self.path()))
        }

        /// `ip -n <this namespace> args...`, panicking with its stderr on failure.
        fn ip(&self, args: &[&str]) -> String {
            let mut all = vec!["-n", self.name.as_str()];
            all.extend_from_slice(args);
            run_ip(&all)
        }

        /// A device's ifindex as iproute2 sees it ("3: eth0@if4: <...>").
        fn ifindex(&self, dev: &str) -> u32 {
            let out = self.ip(&["-o", "link", "show", "dev", dev]);
            out.split(':')
                .next()
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or_else(|| panic!("no ifindex in {out:?}"))
        }

        /// The id this namespace gives to `other`, according to `ip netns list-id`.
        fn list_id(&self, other: &NetNs) -> Option<i32> {
            let out = self.ip(&["netns", "list-id"]);
            let tail = format!("(iproute2 netns name: {})", other.name);
            out.lines()
                .filter(|l| l.trim_end().ends_with(&tail))
                .find_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        }

        /// Runs `f` on a thread that has entered this namespace (setns affects only the
        /// calling thread, so the test harness stays where it was).
        fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
            let ns = self.open();
            std::thread::scope(|s| {
                let handle = s.spawn(move || {
                    // SAFETY: plain syscall on a valid namespace fd.
                    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        panic!("setns: {}", io::Error::last_os_error());
                    }
                    drop(ns);
                    f()
                });
                handle.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
        }
    }

    impl Drop for NetNs {
        fn drop(&mut self) {
            // Never panic here: this also runs while a failed test unwinds.
            match Command::new("ip").args(["netns", "del", &self.name]).output() {
                Ok(out) if out.status.success() => {}
                Ok(out) => eprintln!("ip netns del {}: {}", self.name, String::from_utf8_lossy(&out.stderr)),
                Err(e) => eprintln!("ip netns del {}: {e}", self.name),
            }
        }
    }

    fn run_ip(args: &[&str]) -> String {
        let out = Command::new("ip").args(args).output().unwrap_or_else(|e| panic!("ip {args:?}: {e}"));
        assert!(out.status.success(), "ip {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime")
    }

    fn find<'a>(links: &'a [Link], name: &str) -> &'a Link {
        links.iter().find(|l| l.name == name).unwrap_or_else(|| panic!("{name} not in dump: {links:#?}"))
    }

    fn ports(links: &[Link], bridge: u32) -> Vec<&str> {
        links.iter().filter(|l| l.master == Some(bridge)).map(|l| l.name.as_str()).collect()
    }

    /// Reads whatever notifications are still queued, so the next `changed` reflects only what
    /// the test does next.
    async fn drain(w: &mut LinkWatcher) {
        while let Ok(r) = tokio::time::timeout(Duration::from_millis(200), w.changed()).await {
            r.expect("watcher error while draining");
        }
    }

    async fn expect_change(w: &mut LinkWatcher, what: &str) -> usize {
        let n = tokio::time::timeout(Duration::from_secs(5), w.changed())
            .await
            .unwrap_or_else(|_| panic!("no link notification after {what}"))
            .expect("watcher error")
            .messages;
        assert!(n > 0, "changed() returned 0 after {what}");
        n
    }

    /// A bridge docker0 (up) in `host`.
    fn add_bridge(host: &NetNs) -> u32 {
        host.ip(&["link", "add", "docker0", "type", "bridge"]);
        host.ip(&["link", "set", "docker0", "up"]);
        host.ifindex("docker0")
    }

    #[test]
    fn veth_port_with_peer_in_other_namespace() {
        if skip_unless_root() {
            return;
        }
        let host = NetNs::new();
        let ctr = NetNs::new();
        let bridge = add_bridge(&host);
        host.ip(&["link", "add", "vethA", "type", "veth", "peer", "name", "eth0"]);
        host.ip(&["link", "set", "eth0", "netns", &ctr.name]);
        host.ip(&["link", "set", "vethA", "master", "docker0", "up"]);
        let eth0 = ctr.ifindex("eth0");
        let veth = host.ifindex("vethA");

        let (links, nsid) = host.run(|| {
            let links = dump_links().expect("dump_links");
            let nsid = netnsid_of(ctr.open().as_fd()).expect("netnsid_of");
            (links, nsid)
        });

        let br = find(&links, "docker0");
        assert_eq!(br.ifindex, bridge);
        assert_eq!(br.kind.as_deref(), Some("bridge"));
        assert!(br.up);
        assert_eq!(br.master, None);

        let v = find(&links, "vethA");
        assert_eq!(v.ifindex, veth);
        assert_eq!(v.kind.as_deref(), Some("veth"));
        assert_eq!(v.master, Some(bridge));
        assert_eq!(v.peer_ifindex, Some(eth0));
        assert!(v.up);
        let id = v.peer_netnsid.expect("peer_netnsid for a peer in another namespace");
        assert_eq!(nsid, Some(id), "netnsid_of(ctr) disagrees with IFLA_LINK_NETNSID");
        assert_eq!(host.list_id(&ctr), Some(id), "ip netns list-id disagrees");
        assert_eq!(ports(&links, bridge), ["vethA"]);

        let lo = find(&links, "lo");
        assert_eq!((lo.kind.as_deref(), lo.master, lo.peer_netnsid), (None, None, None));

        // And from the other side: eth0 points back at vethA in the host namespace.
        let (ctr_links, host_id) = ctr.run(|| {
            let links = dump_links().expect("dump_links in ctr");
            (links, netnsid_of(host.open().as_fd()).expect("netnsid_of"))
        });
        let e = find(&ctr_links, "eth0");
        assert_eq!(e.ifindex, eth0);
        assert_eq!(e.peer_ifindex, Some(veth));
        assert!(e.peer_netnsid.is_some());
        assert_eq!(host_id, e.peer_netnsid);
    }

    #[test]
    fn watcher_sees_peer_move_docker_order() {
        if skip_unless_root() {
            return;
        }
        let host = NetNs::new();
        let ctr = NetNs::new();
        let bridge = add_bridge(&host);
        // Docker creates the pair on the host, enslaves the host side, then moves the peer.
        host.ip(&["link", "add", "vethA", "type", "veth", "peer", "name", "eth0"]);
        host.ip(&["link", "set", "vethA", "master", "docker0", "up"]);

        host.run(|| {
            rt().block_on(async {
                let links = dump_links().expect("dump_links");
                let v = find(&links, "vethA").clone();
                let e = find(&links, "eth0");
                assert_eq!(v.master, Some(bridge));
                assert_eq!(v.peer_netnsid, None, "peer still in the same namespace");
                assert_eq!(v.peer_ifindex, Some(e.ifindex));
                assert_eq!(e.peer_ifindex, Some(v.ifindex));
                assert_eq!(netnsid_of(ctr.open().as_fd()).expect("netnsid_of"), None);

                let mut w =
                    LinkWatcher::new(crate::sources::link_events::WATCH_RCVBUF).expect("LinkWatcher::new");
                drain(&mut w).await;
                host.ip(&["link", "set", "eth0", "netns", &ctr.name]);
                let n = expect_change(&mut w, "moving eth0 to ctr").await;
                eprintln!("notifications after the move: {n}");

                let links = dump_links().expect("dump_links after the move");
                let v = find(&links, "vethA");
                assert!(links.iter().all(|l| l.name != "eth0"), "eth0 still here");
                assert_eq!(v.master, Some(bridge));
                assert_eq!(v.peer_ifindex, Some(ctr.ifindex("eth0")));
                let id = v.peer_netnsid.expect("peer_netnsid after the move");
                let nsid = netnsid_of(ctr.open().as_fd()).expect("netnsid_of");
                assert_eq!(nsid, Some(id));
            })
        });
    }

    #[test]
    fn watcher_sees_port_leave() {
        if skip_unless_root() {
            return;
        }
        let host = NetNs::new();
        let ctr = NetNs::new();
        let bridge = add_bridge(&host);
        for (veth, peer) in [("vethA", "eth0"), ("vethB", "eth1")] {
            host.ip(&["link", "add", veth, "type", "veth", "peer", "name", peer]);
            host.ip(&["link", "set", peer, "netns", &ctr.name]);
            host.ip(&["link", "set", veth, "master", "docker0", "up"]);
        }

        host.run(|| {
            rt().block_on(async {
                let links = dump_links().expect("dump_links");
                assert_eq!(ports(&links, bridge), ["vethA", "vethB"]);

                let mut w =
                    LinkWatcher::new(crate::sources::link_events::WATCH_RCVBUF).expect("LinkWatcher::new");
                drain(&mut w).await;
                host.ip(&["link", "set", "vethA", "nomaster"]);
                expect_change(&mut w, "vethA nomaster").await;
                let links = dump_links().expect("dump_links");
                assert_eq!(find(&links, "vethA").master, None);
                assert_eq!(ports(&links, bridge), ["vethB"]);

                drain(&mut w).await;
                host.ip(&["link", "del", "vethB"]);
                expect_change(&mut w, "deleting vethB").await;
                let links = dump_links().expect("dump_links");
                assert!(links.iter().all(|l| l.name != "vethB"), "vethB still listed");
                assert!(ports(&links, bridge).is_empty());
            })
        });
        // Deleting one end of a pair removes the other.
        assert!(ctr.ip(&["-o", "link"]).lines().all(|l| !l.contains("eth1")));
    }

    #[test]
    fn dump_spans_many_datagrams() {
        if skip_unless_root() {
            return;
        }
        // 300 pairs make a dump of several hundred KiB, far more than one datagram, so the
        // multipart path (and NLMSG_DONE at the end) is exercised for real.
        const PAIRS: usize = 300;
        let host = NetNs::new();
        let batch: String = (0..PAIRS).map(|i| format!("link add v{i} type veth peer name p{i}\n")).collect();
        let mut child = Command::new("ip")
            .args(["-n", &host.name, "-batch", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("ip -batch");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin.write_all(batch.as_bytes()).expect("write batch");
        }
        assert!(child.wait().expect("ip -batch").success(), "ip -batch failed");

        let links = host.run(|| dump_links().expect("dump_links"));
        assert_eq!(links.len(), 1 + 2 * PAIRS, "lo plus every veth end");
        let v = find(&links, "v299");
        let p = find(&links, "p299");
        assert_eq!(v.peer_ifindex, Some(p.ifindex));
        assert_eq!(p.peer_ifindex, Some(v.ifindex));
    }

    #[test]
    fn netnsid_not_assigned_is_none() {
        if skip_unless_root() {
            return;
        }
        let a = NetNs::new();
        let b = NetNs::new();
        a.run(|| {
            assert_eq!(netnsid_of(b.open().as_fd()).expect("netnsid_of"), None);
            // Looking it up must not have assigned one.
            assert_eq!(netnsid_of(b.open().as_fd()).expect("netnsid_of"), None);
        });
        assert_eq!(a.list_id(&b), None);

        a.ip(&["netns", "set", &b.name, "7"]);
        a.run(|| assert_eq!(netnsid_of(b.open().as_fd()).expect("netnsid_of"), Some(7)));

        // Not a namespace file: the kernel refuses it, which must be an error, not None.
        let not_ns = File::open("/dev/null").expect("/dev/null");
        a.run(|| assert!(netnsid_of(not_ns.as_fd()).is_err()));
    }

    #[test]
    fn watcher_needs_runtime() {
        assert!(LinkWatcher::new(crate::sources::link_events::WATCH_RCVBUF).is_err());
    }

    const IFINFOMSG_LEN: usize = 16;
    const NLA_HDRLEN: usize = 4;

    fn attr(ty: u16, value: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((NLA_HDRLEN + value.len()) as u16).to_ne_bytes());
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(value);
        v.resize((v.len() + 3) & !3, 0);
        v
    }

    /// A RTM_NEWLINK payload like the kernel's for a bridged veth with a remote peer.
    fn sample_link() -> Vec<u8> {
        let mut p = vec![0u8; IFINFOMSG_LEN];
        p[4..8].copy_from_slice(&5u32.to_ne_bytes());
        p[8..12].copy_from_slice(&(libc::IFF_UP as u32).to_ne_bytes());
        p.extend(attr(libc::IFLA_IFNAME, b"vethA\0"));
        p.extend(attr(libc::IFLA_MASTER, &3u32.to_ne_bytes()));
        p.extend(attr(libc::IFLA_LINK, &7u32.to_ne_bytes()));
        p.extend(attr(libc::IFLA_LINK_NETNSID, &2i32.to_ne_bytes()));
        let info = attr(libc::IFLA_INFO_KIND, b"veth\0");
        p.extend(attr(libc::IFLA_LINKINFO | libc::NLA_F_NESTED as u16, &info));
        p
    }

    /// `payload` framed as one RTM_NEWLINK message.
    fn newlink(payload: &[u8]) -> Vec<u8> {
        let mut msg = Vec::new();
        msg.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&libc::RTM_NEWLINK.to_ne_bytes());
        msg.extend_from_slice(&[0u8; 10]);
        msg.extend_from_slice(payload);
        msg
    }

    #[test]
    fn parses_link_attributes() {
        let link = decode_link(&newlink(&sample_link())).expect("valid").expect("a link");
        assert_eq!(
            link,
            Link {
                ifindex: 5,
                name: "vethA".into(),
                kind: Some("veth".into()),
                master: Some(3),
                peer_ifindex: Some(7),
                peer_netnsid: Some(2),
                up: true,
            }
        );
    }

    #[test]
    fn malformed_input_never_panics() {
        let payload = sample_link();
        // Every truncation of the body, framed consistently: skipped or parsed, never a panic.
        for n in 0..payload.len() {
            let link = decode_link(&newlink(&payload[..n])).expect("framing is valid");
            if n < IFINFOMSG_LEN + NLA_HDRLEN + b"vethA\0".len() {
                assert!(link.is_none(), "no name yet at {n} bytes");
            }
        }
        // An attribute claiming more than is there.
        let mut bad = payload[..IFINFOMSG_LEN].to_vec();
        bad.extend_from_slice(&[200, 0, 3, 0, b'x', 0, 0, 0]);
        assert_eq!(decode_link(&newlink(&bad)).expect("framing is valid"), None);
        // Garbage bodies.
        for garbage in [&[0xffu8; 3][..], &[0xff; 40], &[0; 17]] {
            let _ = decode_link(&newlink(garbage));
        }
        // A datagram cut inside the message is an error.
        let msg = newlink(&payload);
        for n in 1..msg.len() {
            assert!(decode_link(&msg[..n]).is_err(), "truncated at {n}");
        }
    }
}
