//! One file per kernel hook.
mod kfree_skb;
mod tcp_send_reset;
