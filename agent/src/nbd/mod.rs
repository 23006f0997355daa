//! The NBD root device: the handshake in user space, then the socket handed to the kernel
//! over generic netlink, so no process has to sit in NBD_DO_IT for the node's lifetime.

pub mod attach;
pub mod handshake;
pub mod netlink;
pub mod reconnect;
