//! What comes in: kernel samples and counts folded into lines, link events, Docker's
//! containers and events, containerd's tasks, conntrack's NAT events.
pub(crate) mod conntrack;
pub(crate) mod containerd;
pub(crate) mod docker;
pub(crate) mod fold;
pub(crate) mod kernel_log;
pub(crate) mod link_events;
pub(crate) mod overflow;
pub(crate) mod ring;
