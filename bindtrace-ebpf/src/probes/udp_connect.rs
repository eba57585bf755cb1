//! `fexit/__ip4_datagram_connect` and `fexit/__ip6_datagram_connect(struct sock *sk,
//! struct sockaddr *uaddr, int addr_len)`.
//!
//! Not refusal hooks: they record who connected a UDP socket to a watched bridge's prefix (see
//! `connect::udp_connected`). `inet_sock_set_state` never fires for UDP, and docker-proxy may
//! close the connected socket that forwarded a datagram as soon as the container answers it with
//! a port unreachable, so userspace cannot find it any more. The `__` functions are the ones
//! every kernel's UDP connect runs through (5.10 and 6.1 via `ip4_datagram_connect`, 6.13+ via
//! `udp_connect`). They run on every datagram socket's `connect()` on the host, so the first
//! tests are the return value (an argument slot, no helper: `bpf_get_func_ret` needs 5.17) and
//! one LPM lookup of the destination; everything else leaves there. Optional: without them a
//! datagram through docker-proxy keeps `via` only while its socket is open.
//!
//! Where fexit cannot be loaded (kernels or hosts that refuse trampolines), a BTF tracepoint
//! in the socket owner's read of the refusal records the same (`bt_sock_recv_length`).
use aya_ebpf::{
    macros::{btf_tracepoint, fexit},
    programs::{BtfTracePointContext, FExitContext},
};
use bindtrace_common::ECONNREFUSED;

use crate::connect;

#[fexit(function = "__ip4_datagram_connect")]
pub fn fx_udp4_connect(ctx: FExitContext) -> i32 {
    // The return value follows the three arguments.
    let ret: i32 = ctx.arg(3);
    if ret == 0 {
        connect::udp_connected(ctx.arg(0), true);
    }
    0
}

#[fexit(function = "__ip6_datagram_connect")]
pub fn fx_udp6_connect(ctx: FExitContext) -> i32 {
    let ret: i32 = ctx.arg(3);
    if ret == 0 {
        connect::udp_connected(ctx.arg(0), false);
    }
    0
}

/// `tp_btf/sock_recv_length(struct sock *sk, int ret, int flags)` (Linux 6.3+): where fexit is
/// not available, the same record from the owner's read of the refusal (see
/// `connect::udp_refused_read`). It runs on every `recvmsg()` of the host, so the first test is
/// the return value, an argument: only a read that failed with ECONNREFUSED goes further.
#[btf_tracepoint(function = "sock_recv_length")]
pub fn bt_sock_recv_length(ctx: BtfTracePointContext) -> i32 {
    let ret: i32 = ctx.arg(1);
    if ret == -ECONNREFUSED {
        connect::udp_refused_read(ctx.arg(0));
    }
    0
}
