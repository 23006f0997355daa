//! Code both sides of ltsp-rs need: what the agent reads (kernel cmdline, lts.conf) and
//! what crosses the wire (NBD, TFTP). Everything here is pure: no I/O, no syscalls.

pub mod cmdline;
pub mod dhcp;
pub mod ltsconf;
pub mod nbd;
pub mod step;
pub mod tftp;
