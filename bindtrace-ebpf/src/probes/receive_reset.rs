//! `tp_btf/tcp_receive_reset(struct sock *sk)`.
//!
//! Not a refusal hook: it records who made a connection a watched workload refused (see
//! `connect.rs`). It fires only when a socket receives a reset, so the connections a host makes
//! all day that succeed never run it; the first test is the socket's state (SYN_SENT: a
//! refused connect). Loaded next to the refusal hook and optional: without it, bindtrace works,
//! `via` is just less precise.
use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};

use crate::connect;

#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn bt_receive_reset(ctx: BtfTracePointContext) -> i32 {
    connect::reset(ctx.arg(0));
    0
}
