//! The application: the command line, the set-up, and the event loop that wires the sources
//! (kernel, links, Docker, conntrack) through diagnosis and attribution to the sinks (lines and
//! metrics). It decides nothing itself.
pub(crate) mod audits;
pub(crate) mod check;
pub(crate) mod check_names;
pub(crate) mod cli;
pub(crate) mod detector;
pub(crate) mod docker_sync;
pub(crate) mod enrichment;
pub(crate) mod event_loop;
pub(crate) mod generate;
pub(crate) mod hiccups;
pub(crate) mod key_sync;
pub(crate) mod losses;
pub(crate) mod printing;
pub(crate) mod scope_sync;
pub(crate) mod setup;
pub(crate) mod timer;
