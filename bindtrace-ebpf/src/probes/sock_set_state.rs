//! `tp_btf/inet_sock_set_state(const struct sock *sk, int oldstate, int newstate)`.
//!
//! Not a refusal hook: it records who connects to a watched bridge's prefix (see `connect.rs`),
//! so a refusal can be attributed to docker-proxy, a host process or another container. It runs
//! on every TCP state change of the host, so the first tests are on the two state arguments
//! (registers): only CLOSE -> SYN_SENT (a `connect()`) and SYN_SENT's way out go further. Loaded
//! next to the refusal hook and optional: without it, bindtrace works, `via` is just less precise.
use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use bindtrace_common::{TCP_CLOSE, TCP_ESTABLISHED, TCP_SYN_SENT};

use crate::connect;

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn bt_sock_set_state(ctx: BtfTracePointContext) -> i32 {
    let old: u32 = ctx.arg(1);
    let new: u32 = ctx.arg(2);
    if old == TCP_CLOSE && new == TCP_SYN_SENT {
        connect::started(ctx.arg(0));
    } else if old == TCP_SYN_SENT && new == TCP_CLOSE {
        connect::closed(ctx.arg(0));
    } else if old == TCP_SYN_SENT && new == TCP_ESTABLISHED {
        connect::established(ctx.arg(0));
    }
    0
}
