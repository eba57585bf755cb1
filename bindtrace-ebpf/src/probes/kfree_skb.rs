//! `tp_btf/kfree_skb(struct sk_buff *skb, void *location, enum skb_drop_reason reason, ...)`.
//!
//! A SYN that finds no socket is freed with SKB_DROP_REASON_NO_SOCKET right after the reset is
//! sent, on every kernel with drop reasons (5.17+), including those where `tcp_send_reset` does
//! not fire without a socket (6.1). A UDP datagram to a port no socket is bound to is freed with
//! the same reason right after the ICMP port unreachable is sent (or suppressed by the ICMP rate
//! limit: the datagram is freed either way, so the count is of datagrams, not replies). This hook
//! runs for every packet the host frees, so the first test is the cheapest one: the reason, an
//! argument already in a register.
//!
//! Where the TCP hook is `tcp-send-reset`, this program is attached as well, for UDP only
//! (`KFREE_SKB_TCP` = 0), so no SYN is counted twice.
use aya_ebpf::{Global, macros::btf_tracepoint, programs::BtfTracePointContext};
use bindtrace_common::HookKind;

use crate::{
    kernel::ingress_of,
    packet::{says_udp, tcp_syn, udp_datagram},
    refusal,
};

/// `SKB_DROP_REASON_NO_SOCKET` on the running kernel (from BTF: 2 on 6.1, 3 on 6.18).
#[unsafe(no_mangle)]
static DROP_REASON_NO_SOCKET: Global<u32> = Global::new(u32::MAX);

/// 1 when this program is the TCP hook too (`--hook kfree-skb`), 0 when it counts UDP only.
#[unsafe(no_mangle)]
static KFREE_SKB_TCP: Global<u8> = Global::new(1);

#[btf_tracepoint(function = "kfree_skb")]
pub fn bt_kfree_skb(ctx: BtfTracePointContext) -> i32 {
    let reason: u32 = ctx.arg(2);
    if reason != DROP_REASON_NO_SOCKET.load() {
        return 0;
    }
    let skb: u64 = ctx.arg(0);
    let udp_only = KFREE_SKB_TCP.load() == 0;
    // UDP only: a refused SYN (the most common NO_SOCKET drop in a flood) leaves on its
    // protocol byte, before the device, namespace and scope loads.
    if udp_only && !says_udp(skb) {
        return 0;
    }
    let Some(ingress) = ingress_of(skb) else { return 0 };
    let Some(bridge) = refusal::in_scope(&ingress) else { return 0 };
    let seg = match udp_datagram(skb) {
        Some(seg) => seg,
        None if !udp_only => {
            let Some(seg) = tcp_syn(skb) else { return 0 };
            seg
        }
        None => return 0,
    };
    refusal::record(&ctx, HookKind::KfreeSkb as u8, &ingress, bridge, &seg);
    0
}
