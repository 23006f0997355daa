//! Switching to the new root as util-linux's switch_root and systemd do: mounts private,
//! the API filesystems moved into the new root, the initramfs's files deleted to free its
//! memory, the new root moved onto / and chrooted into.

use crate::system::System;
use nix::mount::MsFlags;

#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    #[error("make / private: {0}")]
    Private(std::io::Error),
    #[error("move {from} to {to}: {source}")]
    Move {
        from: String,
        to: String,
        source: std::io::Error,
    },
    #[error("{op} {path}: {source}")]
    Enter {
        op: &'static str,
        path: String,
        source: std::io::Error,
    },
}

pub const API_MOUNTS: &[&str] = &["/dev", "/proc", "/sys", "/run"];

pub fn switch_root(sys: &dyn System, newroot: &str) -> Result<(), SwitchError> {
    // A shared mount cannot be moved; nothing in the initramfs needs propagation.
    sys.mount("none", "/", "", MsFlags::MS_REC | MsFlags::MS_PRIVATE, "")
        .map_err(SwitchError::Private)?;
    for m in API_MOUNTS {
        let to = format!("{newroot}{m}");
        if !sys.exists(&to) {
            sys.mkdir(&to).map_err(|source| SwitchError::Move {
                from: m.to_string(),
                to: to.clone(),
                source,
            })?;
        }
        sys.mount(m, &to, "", MsFlags::MS_MOVE, "")
            .map_err(|source| SwitchError::Move {
                from: m.to_string(),
                to,
                source,
            })?;
    }
    let enter = |op: &'static str, path: &str, r: std::io::Result<()>| {
        r.map_err(|source| SwitchError::Enter {
            op,
            path: path.into(),
            source,
        })
    };
    enter("chdir", newroot, sys.chdir(newroot))?;
    // The initramfs is a ramfs: its files would hold memory for the node's whole life.
    if let Err(e) = sys.free_initramfs(newroot) {
        log::warn!("switch_root: freeing the initramfs: {e}");
    }
    sys.mount(newroot, "/", "", MsFlags::MS_MOVE, "")
        .map_err(|source| SwitchError::Move {
            from: newroot.into(),
            to: "/".into(),
            source,
        })?;
    enter("chroot", ".", sys.chroot("."))?;
    enter("chdir", "/", sys.chdir("/"))
}
