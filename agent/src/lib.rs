//! ltsp-agent: the early-boot agent of a network-booted node. [`boot::boot`] is the whole
//! boot as one function; each step is a module; [`system::System`] is the seam to the
//! kernel.

pub mod apply;
pub mod boot;
pub mod config;
pub mod failure;
pub mod log;
pub mod modules;
pub mod nbd;
pub mod net;
pub mod rootfs;
pub mod switch_root;
pub mod system;
pub mod tftp;
pub mod toram;
pub mod trust;
pub mod verity;
