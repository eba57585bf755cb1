//! `tp_btf/tcp_send_reset(const struct sock *sk, const struct sk_buff *skb, enum sk_rst_reason)`.
//!
//! For a SYN to a port with no listener, `tcp_v4_send_reset`/`tcp_v6_send_reset` run with no
//! socket and reason NO_SOCKET; `skb` is the incoming SYN, so its device is the container-side
//! interface and its headers hold the client's address. The reason argument exists (and the
//! socketless case reaches this tracepoint) from about 6.10; the loader checks the prototype in BTF.
use aya_ebpf::{Global, macros::btf_tracepoint, programs::BtfTracePointContext};
use bindtrace_common::HookKind;

use crate::{kernel::ingress_of, packet::tcp_syn, refusal};

/// `SK_RST_REASON_NO_SOCKET` on the running kernel (from BTF).
#[unsafe(no_mangle)]
static RST_REASON_NO_SOCKET: Global<u32> = Global::new(u32::MAX);

#[btf_tracepoint(function = "tcp_send_reset")]
pub fn bt_send_reset(ctx: BtfTracePointContext) -> i32 {
    let reason: u32 = ctx.arg(2);
    if reason != RST_REASON_NO_SOCKET.load() {
        return 0;
    }
    let skb: u64 = ctx.arg(1);
    let Some(ingress) = ingress_of(skb) else { return 0 };
    let Some(bridge) = refusal::in_scope(&ingress) else { return 0 };
    let Some(seg) = tcp_syn(skb) else { return 0 };
    refusal::record(&ctx, HookKind::TcpSendReset as u8, &ingress, bridge, &seg);
    0
}
