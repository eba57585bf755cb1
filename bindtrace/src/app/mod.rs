//! The application: the command line, the set-up, and the event loop that wires the sources
//! (kernel, links, Docker, conntrack) through diagnosis and attribution to the sinks (lines and
//! metrics). It decides nothing itself.
pub(crate) mod check;
pub(crate) mod cli;
pub(crate) mod run;
pub(crate) mod timer;
