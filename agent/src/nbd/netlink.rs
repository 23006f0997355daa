//! The kernel's generic-netlink `nbd` family (include/uapi/linux/nbd-netlink.h):
//! NBD_CMD_CONNECT hands negotiated sockets to the kernel, which then owns them.
//! The few messages needed are encoded here by pure functions (unit-tested); the socket
//! is netlink-sys's.

use netlink_sys::{protocols::NETLINK_GENERIC, Socket, SocketAddr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const CTRL_ATTR_MCAST_GROUPS: u16 = 7;
const CTRL_ATTR_MCAST_GRP_NAME: u16 = 1;
const CTRL_ATTR_MCAST_GRP_ID: u16 = 2;
/// The group the kernel multicasts NBD_CMD_LINK_DEAD to.
const NBD_MCAST_GROUP: &[u8] = b"nbd_mc_group";
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;

pub const NBD_CMD_CONNECT: u8 = 1;
pub const NBD_CMD_DISCONNECT: u8 = 2;
pub const NBD_CMD_RECONFIGURE: u8 = 3;
pub const NBD_CMD_LINK_DEAD: u8 = 4;
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
    #[error("the kernel's `nbd` family has no multicast group: no NBD_CMD_LINK_DEAD events")]
    NoGroup,
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

/// The family's id and its multicast group's, from a CTRL_CMD_GETFAMILY reply.
pub fn parse_family(reply: &[u8]) -> (Option<u16>, Option<u32>) {
    let (mut family, mut group) = (None, None);
    for (k, v) in parse_attrs(reply) {
        match k {
            CTRL_ATTR_FAMILY_ID if v.len() >= 2 => family = Some(u16::from_ne_bytes([v[0], v[1]])),
            CTRL_ATTR_MCAST_GROUPS => {
                for (_, grp) in parse_attrs(v) {
                    let a = parse_attrs(grp);
                    let name = a.iter().find(|(k, _)| *k == CTRL_ATTR_MCAST_GRP_NAME);
                    let id = a.iter().find(|(k, _)| *k == CTRL_ATTR_MCAST_GRP_ID);
                    if let (Some((_, n)), Some((_, id))) = (name, id) {
                        if n.strip_suffix(b"\0").unwrap_or(n) == NBD_MCAST_GROUP && id.len() >= 4 {
                            group = Some(u32::from_ne_bytes(id[..4].try_into().unwrap()));
                        }
                    }
                }
            }
            _ => {}
        }
    }
    (family, group)
}

/// The devices named by the NBD_CMD_LINK_DEAD messages in one netlink datagram.
pub fn parse_link_dead(mut b: &[u8], family: u16) -> Vec<u32> {
    let mut out = Vec::new();
    while b.len() >= 20 {
        let len = (u32::from_ne_bytes(b[..4].try_into().unwrap()) as usize).clamp(16, b.len());
        let kind = u16::from_ne_bytes([b[4], b[5]]);
        if kind == family && len >= 20 && b[16] == NBD_CMD_LINK_DEAD {
            for (k, v) in parse_attrs(&b[20..len]) {
                if k == NBD_ATTR_INDEX && v.len() >= 4 {
                    out.push(u32::from_ne_bytes(v[..4].try_into().unwrap()));
                }
            }
        }
        b = &b[((len + 3) & !3).min(b.len())..];
    }
    out
}

pub struct Genl {
    sock: Socket,
    family: u16,
    group: Option<u32>,
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
            group: None,
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
            let (family, group) = parse_family(&r);
            g.family = family.unwrap_or(g.family);
            g.group = group.or(g.group);
        }
        if g.family == 0 {
            return Err(NbdNetlinkError::NoFamily);
        }
        Ok(g)
    }

    /// The resolved `nbd` family id.
    pub fn family(&self) -> u16 {
        self.family
    }

    /// The socket, to hand a subscribed listener to the reconnect helper.
    pub fn into_fd(self) -> OwnedFd {
        // SAFETY: into_raw_fd gives up the socket's only owner; OwnedFd becomes it.
        unsafe { OwnedFd::from_raw_fd(self.sock.into_raw_fd()) }
    }

    /// A listener subscribed by another process (the boot), for the `nbd` family `family`.
    pub fn adopt(fd: OwnedFd, family: u16) -> Genl {
        Genl {
            // SAFETY: the OwnedFd's ownership moves into the Socket, which closes it.
            sock: unsafe { Socket::from_raw_fd(fd.into_raw_fd()) },
            family,
            group: None,
            seq: 0,
        }
    }

    /// Turns this socket into a listener for NBD_CMD_LINK_DEAD (use another for commands:
    /// a command's replies and the events would interleave).
    pub fn subscribe(&mut self) -> Result<(), NbdNetlinkError> {
        let group = self.group.ok_or(NbdNetlinkError::NoGroup)?;
        self.sock
            .add_membership(group)
            .map_err(NbdNetlinkError::Socket)
    }

    /// Blocks until link-dead events arrive; returns the devices they name (one entry per
    /// dead connection).
    pub fn wait_link_dead(&mut self) -> io::Result<Vec<u32>> {
        let mut buf = vec![0u8; 16384];
        loop {
            let n = self.sock.recv(&mut &mut buf[..], 0)?;
            let dead = parse_link_dead(&buf[..n], self.family);
            if !dead.is_empty() {
                return Ok(dead);
            }
        }
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

    /// NBD_CMD_DISCONNECT: the kernel ends the device's connections (the server is told
    /// with NBD_CMD_DISC) and the device stops.
    pub fn disconnect(&mut self, index: u32) -> Result<(), NbdNetlinkError> {
        let a = attr(NBD_ATTR_INDEX, &index.to_ne_bytes());
        self.transact(self.family, NBD_CMD_DISCONNECT, 1, &a)
            .map(drop)
            .map_err(|source| NbdNetlinkError::Command {
                cmd: "DISCONNECT",
                index,
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
    fn family_reply_gives_id_and_multicast_group() {
        let mut grp = attr(CTRL_ATTR_MCAST_GRP_NAME, b"nbd_mc_group\0");
        grp.extend(attr(CTRL_ATTR_MCAST_GRP_ID, &9u32.to_ne_bytes()));
        let mut reply = attr(CTRL_ATTR_FAMILY_NAME, b"nbd\0");
        reply.extend(attr(CTRL_ATTR_FAMILY_ID, &0x1bu16.to_ne_bytes()));
        reply.extend(attr(CTRL_ATTR_MCAST_GROUPS, &attr(1, &grp)));
        assert_eq!(parse_family(&reply), (Some(0x1b), Some(9)));
        let without = attr(CTRL_ATTR_FAMILY_ID, &0x1bu16.to_ne_bytes());
        assert_eq!(parse_family(&without), (Some(0x1b), None));
    }

    #[test]
    fn link_dead_events_name_their_device() {
        // Two events in one datagram (both connections of nbd0 died), then one for nbd3,
        // and a message of another family that must be ignored.
        let ev = |fam: u16, cmd: u8, idx: u32| {
            let mut m = message(fam, cmd, 1, 0, &attr(NBD_ATTR_INDEX, &idx.to_ne_bytes()));
            m.resize((m.len() + 3) & !3, 0);
            m
        };
        let mut d = ev(0x1b, NBD_CMD_LINK_DEAD, 0);
        d.extend(ev(0x1b, NBD_CMD_LINK_DEAD, 0));
        d.extend(ev(0x1c, NBD_CMD_LINK_DEAD, 7));
        d.extend(ev(0x1b, NBD_CMD_CONNECT, 5));
        d.extend(ev(0x1b, NBD_CMD_LINK_DEAD, 3));
        assert_eq!(parse_link_dead(&d, 0x1b), vec![0, 0, 3]);
        assert!(
            parse_link_dead(&d[..10], 0x1b).is_empty(),
            "a truncated datagram"
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
