//! One file per kernel hook.
mod kfree_skb;
mod tc;
mod tcp_send_reset;
