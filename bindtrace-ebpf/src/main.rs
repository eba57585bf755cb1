//! bindtrace's kernel side.
//!
//! Why these hooks: a SYN to a port where nothing in the container's namespace accepts it is
//! answered by the kernel itself, with no socket involved, so socket-based tracers (tcpdrop,
//! trace_tcpdrop) return early and see nothing. Two places see it without kprobes or fentry
//! (both unavailable on some hosts):
//! - `tp_btf/tcp_send_reset` with reason NO_SOCKET: the reset itself (kernels from about 6.10);
//! - `tp_btf/kfree_skb` with drop reason NO_SOCKET: the refused SYN being freed (from 5.17).
//!
//! Both are BTF tracepoints, so they need no tracefs (they work under `ip netns exec`), and get
//! the `sk_buff` pointer directly. Older kernels (and `--hook tc` anywhere) use a third place:
//! - a tc classifier on each port's host-side veth, seeing the RST|ACK leave the container.
//!
//! The loader attaches exactly one of the three.
//!
//! A third program, `tp_btf/tcp_receive_reset` (`connect.rs`), records who made a refused
//! connection, so a refusal can say whether docker-proxy, a host process or another container
//! made it (with `tp_btf/inet_sock_set_state` parking connects where the reset is processed in
//! a softirq). For UDP, which that tracepoint never sees, two fexit
//! programs (`probes/udp_connect.rs`) record each datagram socket's `connect()` to those
//! addresses, or where fexit is refused `tp_btf/sock_recv_length` the owner's read of the
//! refusal, so a datagram docker-proxy forwarded is attributed after its socket is closed.
//!
//! Per event the work is: one compare on the reason, a few reads to find the namespace and
//! interface, one scope lookup, a SYN check, one per-CPU counter update. A ring-buffer record is
//! sent only when userspace needs something new: the first refusal of a key on a CPU, then at most
//! one per fold window.
#![no_std]
#![no_main]

mod connect;
mod kernel;
mod packet;
mod probes;
mod refusal;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// GPL-compatible: the helpers used (probe_read_kernel, ktime, ring buffer) require it.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
