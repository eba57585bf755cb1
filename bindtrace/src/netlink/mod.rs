//! Synchronous netlink requests and datagram splitting, shared by every netlink user in
//! bindtrace (`netns::links`, `sources::link_events`, `sources::conntrack`,
//! `diagnose::listeners::sock_diag`).
//!
//! The message formats come from the netlink-packet-* crates and the socket from netlink-sys.
//! What stays here, by hand, is the small request loop around them (about fifty lines): send one
//! request on a fresh socket, read until the request is complete, check the sequence number and
//! port id, turn the kernel's errno into an `io::Error`, restart a dump the kernel flags as
//! interrupted, and give up after a timeout. The rtnetlink crate offers this only as an async
//! connection with its own task and nine more crates; bindtrace's callers are plain functions
//! run on a thread that has entered a namespace, so a blocking loop fits them directly.
//!
//! Everything here works on the network namespace of the *calling thread* at the moment a socket
//! is created: a netlink socket stays bound to the namespace it was opened in. Callers that look
//! into another namespace enter it with `setns` on a dedicated thread first.
//!
//! A message whose header is inconsistent with its datagram is an error; a message whose body
//! the crates cannot decode is skipped (logged at debug), never a panic.

use std::io;
use std::mem;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_MULTIPART, NLM_F_REQUEST, NetlinkBuffer, NetlinkDeserializable,
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable,
};
use netlink_sys::{Socket, SocketAddr};

/// `struct nlmsghdr`: len u32, type u16, flags u16, seq u32, pid u32.
const NETLINK_HEADER_LEN: usize = 16;

/// Start size of the receive buffer. The kernel sizes dump datagrams after the largest buffer
/// the reader has offered, capped at 32 KiB, so 64 KiB holds any of them; a single bigger
/// message (a link with many VF attributes, say) still fits because [`recv_datagram`] peeks at
/// the real size first and grows the buffer.
pub(crate) const RECV_BUF_LEN: usize = 64 * 1024;

/// How long a request waits for the kernel's reply. The kernel always answers; this only keeps
/// a caller from hanging forever should that ever not hold.
const REPLY_TIMEOUT_SECS: libc::time_t = 10;

/// How often a dump that the kernel flags as interrupted (NLM_F_DUMP_INTR: the table changed
/// while it was being written) is restarted before giving up.
const DUMP_RETRIES: usize = 10;

/// Sequence numbers for requests. Each request uses its own socket, so uniqueness per process is
/// more than enough; checking them keeps a stray message from being taken as our reply.
static NEXT_SEQ: AtomicU32 = AtomicU32::new(1);

/// The replies to one request.
pub(crate) struct Reply<I> {
    pub(crate) messages: Vec<I>,
    /// The kernel flagged the dump NLM_F_DUMP_INTR: the result may be inconsistent.
    pub(crate) interrupted: bool,
}

/// A dump (`NLM_F_REQUEST | NLM_F_DUMP`) of `protocol`, restarted while the kernel flags it as
/// interrupted. `what` names it in the log and in the error ("link dump").
pub(crate) fn dump<I>(protocol: isize, what: &str, request: impl Fn() -> I) -> io::Result<Vec<I>>
where
    I: NetlinkSerializable + NetlinkDeserializable,
{
    for _ in 0..DUMP_RETRIES {
        let reply = transact(protocol, NLM_F_REQUEST | NLM_F_DUMP, request())?;
        if !reply.interrupted {
            return Ok(reply.messages);
        }
        log::debug!("{what} interrupted by a concurrent change, restarting");
    }
    Err(io::Error::new(
        io::ErrorKind::Interrupted,
        format!("{what} kept being interrupted by concurrent changes"),
    ))
}

/// Sends one request on a fresh socket of `protocol` and collects the reply messages until the
/// request is complete: NLMSG_DONE for a dump, the first reply or acknowledgement otherwise.
/// Errors the kernel reports become `io::Error`s with its errno.
pub(crate) fn transact<I>(protocol: isize, flags: u16, inner: I) -> io::Result<Reply<I>>
where
    I: NetlinkSerializable + NetlinkDeserializable,
{
    let mut sock = Socket::new(protocol)?;
    let port = sock.bind_auto()?.port_number();
    let timeout = libc::timeval { tv_sec: REPLY_TIMEOUT_SECS, tv_usec: 0 };
    // SAFETY: `timeout` is a valid timeval for the duration of the call (netlink-sys has no
    // setter for SO_RCVTIMEO).
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
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
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(inner));
    msg.finalize();
    let mut out = vec![0; msg.buffer_len()];
    msg.serialize(&mut out);
    retry_eintr(|| sock.send_to(&out, &SocketAddr::new(0, 0), 0))?;

    let is_dump = flags & NLM_F_DUMP == NLM_F_DUMP;
    let mut reply = Reply { messages: Vec::new(), interrupted: false };
    let mut buf = Vec::with_capacity(RECV_BUF_LEN);
    loop {
        recv_datagram(&sock, &mut buf)?;
        for msg in Messages::new(&buf) {
            let msg = msg?;
            let h = msg.header;
            if h.sequence_number != seq || h.port_number != port {
                log::trace!(
                    "netlink: ignoring message type {} seq {} pid {}",
                    h.message_type,
                    h.sequence_number,
                    h.port_number
                );
                continue;
            }
            if h.flags & NLM_F_DUMP_INTR != 0 {
                reply.interrupted = true;
            }
            match msg.decode::<I>() {
                // An acknowledgement, or the request's errno.
                Some(NetlinkPayload::Error(e)) => {
                    return match e.code {
                        Some(errno) => Err(io::Error::from_raw_os_error(-errno.get())),
                        None => Ok(reply),
                    };
                }
                // A dump that failed part-way carries its errno here.
                Some(NetlinkPayload::Done(d)) if d.code < 0 => {
                    return Err(io::Error::from_raw_os_error(-d.code));
                }
                Some(NetlinkPayload::Done(_)) => return Ok(reply),
                Some(NetlinkPayload::Overrun(_)) => {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "netlink reply overrun"));
                }
                Some(NetlinkPayload::InnerMessage(inner)) => {
                    reply.messages.push(inner);
                    if !is_dump && h.flags & NLM_F_MULTIPART == 0 {
                        return Ok(reply);
                    }
                }
                _ => {}
            }
        }
    }
}

/// Receives one datagram into `buf` (blocking) in full: netlink drops what does not fit, so the
/// size is peeked first and the buffer grown to match. SO_RCVTIMEO expiring is `TimedOut`.
fn recv_datagram(sock: &Socket, buf: &mut Vec<u8>) -> io::Result<()> {
    let timed_out = |e: io::Error| match e.kind() {
        io::ErrorKind::WouldBlock => {
            io::Error::new(io::ErrorKind::TimedOut, "no netlink reply from the kernel")
        }
        _ => e,
    };
    buf.clear();
    buf.reserve(RECV_BUF_LEN);
    let wanted = retry_eintr(|| {
        buf.clear();
        sock.recv(buf, libc::MSG_PEEK | libc::MSG_TRUNC)
    })
    .map_err(timed_out)?;
    buf.clear();
    buf.reserve(wanted);
    retry_eintr(|| {
        buf.clear();
        sock.recv(buf, 0)
    })
    .map_err(timed_out)?;
    Ok(())
}

fn retry_eintr<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// One netlink message inside a datagram: its header, and its bytes to decode on demand (a
/// watcher that only counts notifications never decodes them).
pub(crate) struct Msg<'a> {
    pub(crate) header: NetlinkHeader,
    bytes: &'a [u8],
}

impl Msg<'_> {
    /// The decoded payload; None (logged at debug) when the crate cannot decode it, or panics
    /// on it: netlink-packet-netfilter 0.4.0 slices out of bounds on a short nftables set
    /// attribute (found by the conntrack fuzz target), and a message must never end bindtrace.
    pub(crate) fn decode<I: NetlinkDeserializable>(&self) -> Option<NetlinkPayload<I>> {
        let bytes = self.bytes;
        let Ok(decoded) = std::panic::catch_unwind(|| NetlinkMessage::<I>::deserialize(bytes)) else {
            log::debug!(
                "skipping a netlink message of type {} ({} bytes) that the decoder panicked on",
                self.header.message_type,
                bytes.len()
            );
            return None;
        };
        match decoded {
            Ok(m) => Some(m.payload),
            Err(e) => {
                log::debug!(
                    "skipping a netlink message of type {} ({} bytes) that does not decode: {e}",
                    self.header.message_type,
                    self.bytes.len()
                );
                None
            }
        }
    }
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
        let len = rest.get(..4).map_or(0, |b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize);
        if rest.len() < NETLINK_HEADER_LEN || len < NETLINK_HEADER_LEN || len > rest.len() {
            return Some(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("malformed netlink message (length {len}, {} bytes left)", rest.len()),
            )));
        }
        let bytes = &rest[..len];
        let buf = NetlinkBuffer::new(bytes);
        let mut header = NetlinkHeader::default();
        header.length = buf.length();
        header.message_type = buf.message_type();
        header.flags = buf.flags();
        header.sequence_number = buf.sequence_number();
        header.port_number = buf.port_number();
        self.rest = rest.get((len + 3) & !3..).unwrap_or(&[]);
        Some(Ok(Msg { header, bytes }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A datagram of one message of `msg_type` with `payload`, as the kernel would frame it.
    pub(crate) fn frame(msg_type: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut msg = Vec::new();
        msg.extend_from_slice(&((NETLINK_HEADER_LEN + payload.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&msg_type.to_ne_bytes());
        msg.extend_from_slice(&0u16.to_ne_bytes());
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(payload);
        msg
    }

    #[test]
    fn truncated_datagrams_are_errors_not_panics() {
        let msg = frame(16, 9, &[0u8; 20]);
        let parsed: Vec<_> = Messages::new(&msg).collect::<Result<_, _>>().expect("valid");
        assert_eq!(parsed.len(), 1);
        assert_eq!((parsed[0].header.message_type, parsed[0].header.sequence_number), (16, 9));
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

    /// The conntrack fuzz target's finding: an nftables message whose set attribute is
    /// shorter than its header made the crate panic; decoding it now gives None.
    #[test]
    fn a_decoder_panic_is_a_skipped_message() {
        let datagram = include_bytes!("../../../fuzz/corpus/conntrack/crash-nftables-set-attribute");
        let decoded: Vec<_> = Messages::new(datagram)
            .map_while(Result::ok)
            .map(|m| m.decode::<netlink_packet_netfilter::NetfilterMessage>().is_some())
            .collect();
        assert!(decoded.contains(&false), "{decoded:?}");
    }
}
