//! A small rtnetlink client: just enough to map Docker's plumbing.
//!
//! bindtrace needs three things from the kernel's routing netlink: the list of links with their
//! bridge master and veth peer ([`dump_links`]), the id under which this namespace knows another
//! namespace ([`netnsid_of`]), and a nudge when either changes
//! (`sources::link_events`, on the same socket code). That is a few
//! hundred lines of byte handling, so we write it ourselves instead of depending on a netlink
//! crate family whose APIs churn between releases.
//!
//! Everything here works on the network namespace of the *calling thread* at the moment a socket
//! is created: a netlink socket stays bound to the namespace it was opened in. Callers that look
//! into another namespace enter it with `setns` on a dedicated thread first.
//!
//! Messages are built and parsed as plain byte slices (native endian, as netlink is), never by
//! casting pointers to libc's structs: libc keeps padding fields of `ifinfomsg`/`sockaddr_nl`
//! private in some versions, and slices let every length check be explicit so a short or
//! malformed message is skipped or reported, never a panic.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};

// Constants libc does not define (include/uapi/linux/net_namespace.h).
/// RTM_NEWNSID/RTM_GETNSID attribute: the namespace id (i32).
const NETNSA_NSID: u16 = 1;
/// RTM_GETNSID attribute: a file descriptor of the namespace to look up (u32).
const NETNSA_FD: u16 = 3;
/// The value of NETNSA_NSID when the namespace has no id in the asking namespace.
const NETNSA_NSID_NOT_ASSIGNED: i32 = -1;

/// `struct nlmsghdr`: len u32, type u16, flags u16, seq u32, pid u32.
const NLMSG_HDRLEN: usize = 16;
/// `struct ifinfomsg`: family u8, pad u8, type u16, index i32, flags u32, change u32.
const IFINFOMSG_LEN: usize = 16;
/// `struct rtgenmsg` is one byte (the family), padded to the 4-byte netlink alignment.
const RTGENMSG_LEN: usize = 4;
/// `struct nlattr`: len u16, type u16.
const NLA_HDRLEN: usize = 4;

/// Start size of the receive buffer. The kernel sizes dump datagrams after the largest buffer
/// the reader has offered, capped at 32 KiB, so 64 KiB holds any of them; a single bigger
/// message (a link with many VF attributes, say) still fits because [`NlSocket::recv`] peeks at
/// the real size first and grows the buffer.
pub(crate) const RECV_BUF_LEN: usize = 64 * 1024;

/// How long a request waits for the kernel's reply. The kernel always answers; this only keeps
/// a caller from hanging forever should that ever not hold.
const REPLY_TIMEOUT_SECS: libc::time_t = 10;

/// How often a dump that the kernel flags as interrupted (NLM_F_DUMP_INTR: links changed while
/// it was being written) is restarted before giving up.
const DUMP_RETRIES: usize = 10;

/// Sequence numbers for requests. Each request uses its own socket, so uniqueness per process is
/// more than enough; checking them keeps a stray message from being taken as our reply.
static NEXT_SEQ: AtomicU32 = AtomicU32::new(1);

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
    // AF_UNSPEC with a zero index asks for every link; the rest of ifinfomsg is unused.
    let mut body = [0u8; IFINFOMSG_LEN];
    body[0] = libc::AF_UNSPEC as u8;
    for _ in 0..DUMP_RETRIES {
        let mut links = Vec::new();
        let outcome = transact(
            libc::RTM_GETLINK,
            (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
            &body,
            |msg_type, payload| {
                if msg_type == libc::RTM_NEWLINK {
                    match parse_link(payload) {
                        Some(link) => links.push(link),
                        None => {
                            log::debug!("skipping malformed RTM_NEWLINK ({} bytes)", payload.len())
                        }
                    }
                }
                Ok(())
            },
        )?;
        if !outcome.interrupted {
            return Ok(links);
        }
        log::debug!("link dump interrupted by a concurrent change, restarting");
    }
    Err(io::Error::new(io::ErrorKind::Interrupted, "link dump kept being interrupted by concurrent changes"))
}

/// RTM_GETNSID with NETNSA_FD: the id this namespace gives to the namespace behind `ns` (an open
/// /proc/PID/ns/net or /run/netns/X file). Ok(None) when no id is assigned
/// (NETNSA_NSID_NOT_ASSIGNED = -1).
///
/// This only looks the id up; it never assigns one.
pub(crate) fn netnsid_of(ns: BorrowedFd<'_>) -> io::Result<Option<i32>> {
    let mut body = Vec::with_capacity(RTGENMSG_LEN + NLA_HDRLEN + 4);
    body.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    push_attr(&mut body, NETNSA_FD, &(ns.as_raw_fd() as u32).to_ne_bytes());

    let mut nsid = None;
    transact(libc::RTM_GETNSID, libc::NLM_F_REQUEST as u16, &body, |msg_type, payload| {
        if msg_type == libc::RTM_NEWNSID {
            nsid = payload
                .get(RTGENMSG_LEN..)
                .into_iter()
                .flat_map(Attrs::new)
                .find(|&(ty, _)| ty == NETNSA_NSID)
                .and_then(|(_, v)| read_u32(v))
                .map(|v| v as i32);
        }
        Ok(())
    })?;
    match nsid {
        Some(NETNSA_NSID_NOT_ASSIGNED) => Ok(None),
        Some(id) => Ok(Some(id)),
        None => Err(io::Error::new(io::ErrorKind::InvalidData, "RTM_GETNSID reply without NETNSA_NSID")),
    }
}

/// A link from the payload of a RTM_NEWLINK (ifinfomsg + attributes). None when it is too short
/// or has no name.
fn parse_link(payload: &[u8]) -> Option<Link> {
    let hdr = payload.get(..IFINFOMSG_LEN)?;
    let ifindex = read_u32(&hdr[4..8])?;
    let flags = read_u32(&hdr[8..12])?;
    let mut link = Link {
        ifindex,
        name: String::new(),
        kind: None,
        master: None,
        peer_ifindex: None,
        peer_netnsid: None,
        up: flags & libc::IFF_UP as u32 != 0,
    };
    let mut have_name = false;
    for (ty, value) in Attrs::new(&payload[IFINFOMSG_LEN..]) {
        match ty {
            libc::IFLA_IFNAME => {
                link.name = read_string(value);
                have_name = true;
            }
            // An ifindex of 0 never names a device; the kernel reports IFLA_LINK 0 for a veth
            // whose peer is already gone (mid-deletion).
            libc::IFLA_MASTER => link.master = read_u32(value).filter(|&i| i != 0),
            libc::IFLA_LINK => link.peer_ifindex = read_u32(value).filter(|&i| i != 0),
            libc::IFLA_LINK_NETNSID => link.peer_netnsid = read_u32(value).map(|v| v as i32),
            libc::IFLA_LINKINFO => {
                link.kind =
                    Attrs::new(value).find(|&(t, _)| t == libc::IFLA_INFO_KIND).map(|(_, v)| read_string(v));
            }
            _ => {}
        }
    }
    have_name.then_some(link)
}

/// What a finished request reported besides its messages.
pub(crate) struct Outcome {
    /// The kernel flagged the dump NLM_F_DUMP_INTR: the result may be inconsistent.
    pub(crate) interrupted: bool,
}

/// Sends one request on a fresh socket and passes each reply message (type, payload after the
/// netlink header) to `on_msg` until the request is complete: NLMSG_DONE for a dump, the first
/// reply or acknowledgement otherwise. Errors the kernel reports become `io::Error`s.
fn transact(
    msg_type: u16,
    flags: u16,
    body: &[u8],
    on_msg: impl FnMut(u16, &[u8]) -> io::Result<()>,
) -> io::Result<Outcome> {
    transact_on(libc::NETLINK_ROUTE, msg_type, flags, body, on_msg)
}

/// [`transact`] on a socket of another netlink family (sock_diag, for `listen_diag.rs`).
// Long because send, receive, sequence checks and the error/done messages of a request are
// one loop; splitting it would pass its state around.
pub(crate) fn transact_on(
    protocol: libc::c_int,
    msg_type: u16,
    flags: u16,
    body: &[u8],
    mut on_msg: impl FnMut(u16, &[u8]) -> io::Result<()>,
) -> io::Result<Outcome> {
    let mut sock = NlSocket::open_with(protocol, false)?;
    let timeout = libc::timeval { tv_sec: REPLY_TIMEOUT_SECS, tv_usec: 0 };
    // SAFETY: `timeout` is a valid timeval for the duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            sock.fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let seq = NEXT_SEQ.fetch_add(1, Ordering::Relaxed);
    sock.send(&build_message(msg_type, flags, seq, body))?;

    let is_dump = flags & libc::NLM_F_DUMP as u16 == libc::NLM_F_DUMP as u16;
    let mut outcome = Outcome { interrupted: false };
    loop {
        let len = sock.recv()?;
        for msg in Messages::new(&sock.buf[..len]) {
            let msg = msg?;
            if msg.seq != seq || msg.pid != sock.portid {
                log::trace!(
                    "netlink: ignoring message type {} seq {} pid {}",
                    msg.msg_type,
                    msg.seq,
                    msg.pid
                );
                continue;
            }
            if msg.flags & libc::NLM_F_DUMP_INTR as u16 != 0 {
                outcome.interrupted = true;
            }
            match libc::c_int::from(msg.msg_type) {
                libc::NLMSG_NOOP => {}
                libc::NLMSG_ERROR => {
                    // struct nlmsgerr: the (negative) errno, then the offending header.
                    let errno = read_u32(msg.payload).ok_or_else(|| short("NLMSG_ERROR"))? as i32;
                    if errno < 0 {
                        return Err(io::Error::from_raw_os_error(-errno));
                    }
                    return Ok(outcome); // an acknowledgement
                }
                libc::NLMSG_DONE => {
                    // A dump that failed part-way carries its errno here.
                    if let Some(errno) = read_u32(msg.payload).map(|v| v as i32)
                        && errno < 0
                    {
                        return Err(io::Error::from_raw_os_error(-errno));
                    }
                    return Ok(outcome);
                }
                libc::NLMSG_OVERRUN => {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "netlink reply overrun"));
                }
                _ => {
                    on_msg(msg.msg_type, msg.payload)?;
                    if !is_dump && msg.flags & libc::NLM_F_MULTI as u16 == 0 {
                        return Ok(outcome);
                    }
                }
            }
        }
    }
}

fn short(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("short {what} message"))
}

/// A netlink socket (NETLINK_ROUTE unless opened with [`NlSocket::open_with`]) bound to a
/// kernel-assigned port id.
pub(crate) struct NlSocket {
    pub(crate) fd: OwnedFd,
    portid: u32,
    buf: Vec<u8>,
}

impl NlSocket {
    pub(crate) fn open(nonblocking: bool) -> io::Result<NlSocket> {
        Self::open_with(libc::NETLINK_ROUTE, nonblocking)
    }

    pub(crate) fn open_with(protocol: libc::c_int, nonblocking: bool) -> io::Result<NlSocket> {
        let mut ty = libc::SOCK_RAW | libc::SOCK_CLOEXEC;
        if nonblocking {
            ty |= libc::SOCK_NONBLOCK;
        }
        // SAFETY: plain syscall; the result is checked before it is wrapped.
        let raw = unsafe { libc::socket(libc::AF_NETLINK, ty, protocol) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };

        // nl_pid 0: let the kernel pick a unique port id, which we read back to check replies.
        let mut addr = sockaddr_nl_zeroed();
        let addr_len = mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: `addr` is a valid sockaddr_nl of `addr_len` bytes.
        if unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), addr_len) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut len = addr_len;
        // SAFETY: `addr` is writable for `len` bytes.
        if unsafe { libc::getsockname(fd.as_raw_fd(), (&raw mut addr).cast(), &mut len) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(NlSocket { fd, portid: addr.nl_pid, buf: Vec::new() })
    }

    /// Sends one datagram to the kernel.
    fn send(&self, msg: &[u8]) -> io::Result<()> {
        let dest = sockaddr_nl_zeroed();
        loop {
            // SAFETY: `msg` and `dest` are valid for the lengths passed.
            let n = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    msg.as_ptr().cast(),
                    msg.len(),
                    0,
                    (&raw const dest).cast(),
                    mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if n >= 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// Receives one datagram into `self.buf` (blocking) and returns its length. Netlink drops
    /// what does not fit, so the size is peeked first and the buffer grown to match.
    fn recv(&mut self) -> io::Result<usize> {
        if self.buf.len() < RECV_BUF_LEN {
            self.buf.resize(RECV_BUF_LEN, 0);
        }
        let fd = self.fd.as_raw_fd();
        let wanted = recv_retry(fd, &mut self.buf, libc::MSG_PEEK | libc::MSG_TRUNC)?;
        if wanted > self.buf.len() {
            self.buf.resize(wanted, 0);
        }
        recv_retry(fd, &mut self.buf, 0)
    }
}

/// `recv` with EINTR retried; returns the length the kernel reports.
fn recv_retry(fd: RawFd, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), flags) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => {}
            // SO_RCVTIMEO expired on the (blocking) request socket.
            io::ErrorKind::WouldBlock => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no netlink reply from the kernel"));
            }
            _ => return Err(err),
        }
    }
}

fn sockaddr_nl_zeroed() -> libc::sockaddr_nl {
    // SAFETY: sockaddr_nl is plain old data; all zeroes is valid (and is the kernel's address).
    let mut addr: libc::sockaddr_nl = unsafe { mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    addr
}

pub(crate) fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` is a valid c_int for the duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// A netlink message: header + `body`, with the header's length filled in.
fn build_message(msg_type: u16, flags: u16, seq: u32, body: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDRLEN + body.len();
    let mut msg = Vec::with_capacity(align4(len));
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&msg_type.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: the kernel fills in ours
    msg.extend_from_slice(body);
    msg
}

/// Appends one attribute, padded to the 4-byte alignment.
fn push_attr(buf: &mut Vec<u8>, ty: u16, value: &[u8]) {
    buf.extend_from_slice(&((NLA_HDRLEN + value.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize(align4(buf.len()), 0);
}

const fn align4(len: usize) -> usize {
    (len + 3) & !3
}

pub(crate) fn read_u32(b: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(..4)?.try_into().ok()?))
}

pub(crate) fn read_u16(b: &[u8]) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(..2)?.try_into().ok()?))
}

/// A NUL-terminated attribute string (the terminator is optional).
fn read_string(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// One netlink message inside a datagram.
pub(crate) struct Msg<'a> {
    pub(crate) msg_type: u16,
    flags: u16,
    seq: u32,
    pid: u32,
    pub(crate) payload: &'a [u8],
}

/// The messages of one datagram. A header that claims more bytes than remain yields one error
/// and ends the iteration.
pub(crate) struct Messages<'a> {
    rest: &'a [u8],
}

impl<'a> Messages<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Messages { rest: buf }
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = io::Result<Msg<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let rest = mem::take(&mut self.rest);
        let len = read_u32(rest).map_or(0, |l| l as usize);
        if rest.len() < NLMSG_HDRLEN || len < NLMSG_HDRLEN || len > rest.len() {
            return Some(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("malformed netlink message (length {len}, {} bytes left)", rest.len()),
            )));
        }
        let msg = Msg {
            msg_type: read_u16(&rest[4..])?,
            flags: read_u16(&rest[6..])?,
            seq: read_u32(&rest[8..])?,
            pid: read_u32(&rest[12..])?,
            payload: &rest[NLMSG_HDRLEN..len],
        };
        self.rest = rest.get(align4(len)..).unwrap_or(&[]);
        Some(Ok(msg))
    }
}

/// The attributes in a byte range, as (type without the NLA_F_NESTED/NLA_F_NET_BYTEORDER bits,
/// value). Stops at the first attribute whose length does not fit.
pub(crate) struct Attrs<'a> {
    rest: &'a [u8],
}

impl<'a> Attrs<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Attrs { rest: buf }
    }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let rest = mem::take(&mut self.rest);
        let len = usize::from(read_u16(rest)?);
        let ty = read_u16(rest.get(2..)?)? & libc::NLA_TYPE_MASK as u16;
        if len < NLA_HDRLEN || len > rest.len() {
            return None;
        }
        self.rest = rest.get(align4(len)..).unwrap_or(&[]);
        Some((ty, &rest[NLA_HDRLEN..len]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::link_events::LinkWatcher;
    use std::fs::File;
    use std::os::fd::AsFd;
    use std::process::Command;
    use std::sync::atomic::AtomicUsize;
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
            .expect("watcher error");
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

                let mut w = LinkWatcher::new().expect("LinkWatcher::new");
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

                let mut w = LinkWatcher::new().expect("LinkWatcher::new");
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
        assert!(LinkWatcher::new().is_err());
    }

    fn attr(ty: u16, value: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        push_attr(&mut v, ty, value);
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

    #[test]
    fn parses_link_attributes() {
        let link = parse_link(&sample_link()).expect("parse");
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
        for n in 0..payload.len() {
            let link = parse_link(&payload[..n]);
            if n < IFINFOMSG_LEN + NLA_HDRLEN + b"vethA\0".len() {
                assert!(link.is_none(), "no name yet at {n} bytes");
            }
        }
        // An attribute claiming more than is there ends the walk.
        let mut bad = payload[..IFINFOMSG_LEN].to_vec();
        bad.extend_from_slice(&[200, 0, 3, 0, b'x', 0, 0, 0]);
        assert_eq!(parse_link(&bad), None);

        let msg = build_message(libc::RTM_NEWLINK, 0, 9, &payload);
        let parsed: Vec<_> = Messages::new(&msg).collect::<Result<_, _>>().expect("valid");
        assert_eq!(parsed.len(), 1);
        assert_eq!((parsed[0].msg_type, parsed[0].seq), (libc::RTM_NEWLINK, 9));
        for n in 1..msg.len() {
            let mut it = Messages::new(&msg[..n]);
            assert!(it.next().expect("one item").is_err(), "truncated at {n}");
            assert!(it.next().is_none());
        }
        // A length below the header size must not loop forever.
        let mut zero = msg.clone();
        zero[..4].copy_from_slice(&0u32.to_ne_bytes());
        assert_eq!(Messages::new(&zero).count(), 1);
    }
}
