//! `tp_btf/kfree_skb(struct sk_buff *skb, void *location, enum skb_drop_reason reason, ...)`.
//!
//! A SYN that finds no socket is freed with SKB_DROP_REASON_NO_SOCKET right after the reset is
//! sent, on every kernel with drop reasons (5.17+), including those where `tcp_send_reset` does
//! not fire without a socket (6.1). This hook runs for every packet the host frees, so the first
//! test is the cheapest one: the reason, an argument already in a register.
use aya_ebpf::{Global, macros::btf_tracepoint, programs::BtfTracePointContext};
use bindtrace_common::HookKind;

use crate::{kernel::ingress_of, packet::tcp_syn, refusal};

/// `SKB_DROP_REASON_NO_SOCKET` on the running kernel (from BTF: 2 on 6.1, 3 on 6.18).
#[unsafe(no_mangle)]
static DROP_REASON_NO_SOCKET: Global<u32> = Global::new(u32::MAX);

#[btf_tracepoint(function = "kfree_skb")]
pub fn bt_kfree_skb(ctx: BtfTracePointContext) -> i32 {
    let reason: u32 = ctx.arg(2);
    if reason != DROP_REASON_NO_SOCKET.load() {
        return 0;
    }
    let skb: u64 = ctx.arg(0);
    let Some(ingress) = ingress_of(skb) else { return 0 };
    let Some(bridge) = refusal::in_scope(&ingress) else { return 0 };
    let Some(seg) = tcp_syn(skb) else { return 0 };
    refusal::record(&ctx, HookKind::KfreeSkb as u8, &ingress, bridge, &seg);
    0
}
