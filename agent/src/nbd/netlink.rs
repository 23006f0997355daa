//! The kernel's generic-netlink `nbd` family (include/uapi/linux/nbd-netlink.h):
//! NBD_CMD_CONNECT hands negotiated sockets to the kernel, which then owns them.
//! The few messages needed are encoded here by pure functions (unit-tested); the socket
//! is netlink-sys's.

use netlink_sys::{protocols::NETLINK_GENERIC, Socket, SocketAddr};
use std::io;
use std::os::fd::{AsRawFd, RawFd};

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;

pub const NBD_CMD_CONNECT: u8 = 1;
pub const NBD_CMD_DISCONNECT: u8 = 2;
pub const NBD_CMD_RECONFIGURE: u8 = 3;
pub const NBD_ATTR_INDEX: u16 = 1;
pub const NBD_ATTR_SIZE_BYTES: u16 = 2;
pub const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
pub const NBD_ATTR_TIMEOUT: u16 = 4;
pub const NBD_ATTR_SERVER_FLAGS: u16 = 5;
pub const NBD_ATTR_SOCKETS: u16 = 7;
pub const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
pub const NBD_ATTR_BACKEND_IDENTIFIER: u16 = 10;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;

#[derive(Debug, thiserror::Error)]
pub enum NbdNetlinkError {
    #[error("generic netlink socket: {0}")]
    Socket(io::Error),
    #[error("the kernel has no `nbd` netlink family: is the nbd module loaded?")]
    NoFamily,
    #[error("NBD_CMD_{cmd} for /dev/nbd{index}: {source}")]
    Command {
        cmd: &'static str,
        index: u32,
        source: io::Error,
    },
}

/// One netlink attribute, padded to 4 bytes.
pub fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
    let len = 4 + payload.len();
    let mut v = Vec::with_capacity((len + 3) & !3);
    v.extend_from_slice(&(len as u16).to_ne_bytes());
    v.extend_from_slice(&kind.to_ne_bytes());
    v.extend_from_slice(payload);
    v.resize((len + 3) & !3, 0);
    v
}

/// A generic netlink request: nlmsghdr, genlmsghdr, attributes.
pub fn message(family: u16, cmd: u8, version: u8, seq: u32, attrs: &[u8]) -> Vec<u8> {
    let len = 16 + 4 + attrs.len();
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(&(len as u32).to_ne_bytes());
    v.extend_from_slice(&family.to_ne_bytes());
    v.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    v.extend_from_slice(&seq.to_ne_bytes());
    v.extend_from_slice(&0u32.to_ne_bytes());
    v.extend_from_slice(&[cmd, version, 0, 0]);
    v.extend_from_slice(attrs);
    v
}

/// What NBD_CMD_CONNECT / RECONFIGURE carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    pub index: u32,
    pub size: u64,
    pub block_size: u64,
    pub server_flags: u64,
    pub timeout_secs: u64,
    pub dead_conn_timeout_secs: u64,
    /// Shown in /sys/block/nbdX/backend; the kernel refuses a RECONFIGURE naming another.
    pub backend: Option<String>,
}

pub fn connect_attrs(c: &DeviceConfig, fds: &[RawFd]) -> Vec<u8> {
    let mut a = Vec::new();
    a.extend(attr(NBD_ATTR_INDEX, &c.index.to_ne_bytes()));
    a.extend(attr(NBD_ATTR_SIZE_BYTES, &c.size.to_ne_bytes()));
    a.extend(attr(NBD_ATTR_BLOCK_SIZE_BYTES, &c.block_size.to_ne_bytes()));
    a.extend(attr(NBD_ATTR_SERVER_FLAGS, &c.server_flags.to_ne_bytes()));
    a.extend(attr(NBD_ATTR_TIMEOUT, &c.timeout_secs.to_ne_bytes()));
    a.extend(attr(
        NBD_ATTR_DEAD_CONN_TIMEOUT,
        &c.dead_conn_timeout_secs.to_ne_bytes(),
    ));
    if let Some(b) = &c.backend {
        let mut s = b.as_bytes().to_vec();
        s.push(0);
        a.extend(attr(NBD_ATTR_BACKEND_IDENTIFIER, &s));
    }
    a.extend(sockets_attr(fds));
    a
}

fn sockets_attr(fds: &[RawFd]) -> Vec<u8> {
    let mut items = Vec::new();
    for fd in fds {
        items.extend(attr(
            NBD_SOCK_ITEM,
            &attr(NBD_SOCK_FD, &(*fd as u32).to_ne_bytes()),
        ));
    }
    attr(NBD_ATTR_SOCKETS, &items)
}

/// Walks attributes: (type without flag bits, payload).
pub fn parse_attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let kind = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if len < 4 || len > b.len() {
            break;
        }
        out.push((kind, &b[4..len]));
        b = &b[((len + 3) & !3).min(b.len())..];
    }
    out
}

pub struct Genl {
    sock: Socket,
    family: u16,
    seq: u32,
}

impl Genl {
    /// Opens a generic netlink socket and resolves the `nbd` family.
    pub fn open() -> Result<Genl, NbdNetlinkError> {
        let mut sock = Socket::new(NETLINK_GENERIC).map_err(NbdNetlinkError::Socket)?;
        sock.bind_auto().map_err(NbdNetlinkError::Socket)?;
        sock.connect(&SocketAddr::new(0, 0))
            .map_err(NbdNetlinkError::Socket)?;
        let mut g = Genl {
            sock,
            family: 0,
            seq: 0,
        };
        let name = attr(CTRL_ATTR_FAMILY_NAME, b"nbd\0");
        let replies = g
            .transact(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, &name)
            .map_err(|e| {
                if e.raw_os_error() == Some(nix::libc::ENOENT) {
                    NbdNetlinkError::NoFamily
                } else {
                    NbdNetlinkError::Socket(e)
                }
            })?;
        for r in replies {
            for (k, v) in parse_attrs(&r) {
                if k == CTRL_ATTR_FAMILY_ID && v.len() >= 2 {
                    g.family = u16::from_ne_bytes([v[0], v[1]]);
                }
            }
        }
        if g.family == 0 {
            return Err(NbdNetlinkError::NoFamily);
        }
        Ok(g)
    }

    /// Sends a request; returns the attribute payloads of its replies, or the error.
    fn transact(
        &mut self,
        family: u16,
        cmd: u8,
        version: u8,
        attrs: &[u8],
    ) -> io::Result<Vec<Vec<u8>>> {
        self.seq += 1;
        let msg = message(family, cmd, version, self.seq, attrs);
        self.sock.send(&msg, 0)?;
        let mut replies = Vec::new();
        let mut buf = vec![0u8; 16384];
        loop {
            let n = self.sock.recv(&mut &mut buf[..], 0)?;
            let mut b = &buf[..n];
            while b.len() >= 16 {
                let len =
                    (u32::from_ne_bytes(b[..4].try_into().unwrap()) as usize).clamp(16, b.len());
                let kind = u16::from_ne_bytes([b[4], b[5]]);
                let seq = u32::from_ne_bytes(b[8..12].try_into().unwrap());
                let body = &b[16..len];
                if seq == self.seq {
                    if kind == NLMSG_ERROR {
                        let code = i32::from_ne_bytes(
                            body.get(..4).unwrap_or(&[0; 4]).try_into().unwrap(),
                        );
                        return if code == 0 {
                            Ok(replies)
                        } else {
                            Err(io::Error::from_raw_os_error(-code))
                        };
                    }
                    if body.len() >= 4 {
                        replies.push(body[4..].to_vec());
                    }
                }
                b = &b[((len + 3) & !3).min(b.len())..];
            }
        }
    }

    /// NBD_CMD_CONNECT: the kernel takes the sockets (our fds can then be closed).
    pub fn connect(
        &mut self,
        c: &DeviceConfig,
        socks: &[&impl AsRawFd],
    ) -> Result<(), NbdNetlinkError> {
        let fds: Vec<RawFd> = socks.iter().map(|s| s.as_raw_fd()).collect();
        let attrs = connect_attrs(c, &fds);
        self.transact(self.family, NBD_CMD_CONNECT, 1, &attrs)
            .map(drop)
            .map_err(|source| NbdNetlinkError::Command {
                cmd: "CONNECT",
                index: c.index,
                source,
            })
    }

    /// NBD_CMD_RECONFIGURE with new sockets: replaces connections the kernel marked dead.
    pub fn reconfigure(
        &mut self,
        index: u32,
        backend: Option<&str>,
        socks: &[&impl AsRawFd],
    ) -> Result<(), NbdNetlinkError> {
        let fds: Vec<RawFd> = socks.iter().map(|s| s.as_raw_fd()).collect();
        let mut a = attr(NBD_ATTR_INDEX, &index.to_ne_bytes());
        if let Some(b) = backend {
            let mut s = b.as_bytes().to_vec();
            s.push(0);
            a.extend(attr(NBD_ATTR_BACKEND_IDENTIFIER, &s));
        }
        a.extend(sockets_attr(&fds));
        self.transact(self.family, NBD_CMD_RECONFIGURE, 1, &a)
            .map(drop)
            .map_err(|source| NbdNetlinkError::Command {
                cmd: "RECONFIGURE",
                index,
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_and_parse_back() {
        let a = attr(NBD_ATTR_INDEX, &0u32.to_ne_bytes());
        assert_eq!(a.len(), 8);
        let b = attr(CTRL_ATTR_FAMILY_NAME, b"nbd\0");
        assert_eq!(b.len(), 8);
        let c = attr(NBD_ATTR_BACKEND_IDENTIFIER, b"abcde\0");
        assert_eq!(c.len(), 12, "10 bytes pad to 12");
        let mut all = a.clone();
        all.extend(&c);
        let p = parse_attrs(&all);
        assert_eq!(
            p,
            vec![
                (NBD_ATTR_INDEX, &[0u8, 0, 0, 0][..]),
                (NBD_ATTR_BACKEND_IDENTIFIER, &b"abcde\0"[..])
            ]
        );
    }

    #[test]
    fn connect_message_layout() {
        let c = DeviceConfig {
            index: 0,
            size: 1 << 30,
            block_size: 4096,
            server_flags: 0x103,
            timeout_secs: 30,
            dead_conn_timeout_secs: 300,
            backend: None,
        };
        let a = connect_attrs(&c, &[7, 9]);
        let m = message(0x1a, NBD_CMD_CONNECT, 1, 5, &a);
        assert_eq!(
            u32::from_ne_bytes(m[..4].try_into().unwrap()) as usize,
            m.len()
        );
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), 0x1a);
        assert_eq!(&m[16..20], &[NBD_CMD_CONNECT, 1, 0, 0]);
        let attrs = parse_attrs(&m[20..]);
        let kinds: Vec<u16> = attrs.iter().map(|(k, _)| *k).collect();
        assert_eq!(kinds, vec![1, 2, 3, 5, 4, 8, 7]);
        let size = attrs
            .iter()
            .find(|(k, _)| *k == NBD_ATTR_SIZE_BYTES)
            .unwrap()
            .1;
        assert_eq!(u64::from_ne_bytes(size.try_into().unwrap()), 1 << 30);
        // Two socket items, each with its fd.
        let socks = parse_attrs(attrs.last().unwrap().1);
        let fds: Vec<u32> = socks
            .iter()
            .map(|(_, item)| {
                let inner = parse_attrs(item);
                u32::from_ne_bytes(inner[0].1.try_into().unwrap())
            })
            .collect();
        assert_eq!(fds, vec![7, 9]);
    }
}
