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

/// `freer`: a pipe to a process whose root stays the initramfs (the reconnect helper); a
/// byte on it has that process delete the initramfs's files in its own time. Without it,
/// or if nobody reads it any more, they are deleted here.
pub fn switch_root(
    sys: &dyn System,
    newroot: &str,
    freer: Option<std::fs::File>,
) -> Result<(), SwitchError> {
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
    // Nothing from it is needed now: the API mounts are in the new root.
    let handed_over = freer.is_some_and(|mut f| std::io::Write::write_all(&mut f, b"1").is_ok());
    if !handed_over {
        if let Err(e) = sys.free_initramfs(newroot) {
            log::warn!("switch_root: freeing the initramfs: {e}");
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::Recorder;

    fn frees_itself(freer: Option<std::fs::File>) -> bool {
        let sys = Recorder::default();
        switch_root(&sys, "/new", freer).unwrap();
        sys.calls()
            .contains(&"free_initramfs except /new".to_string())
    }

    #[test]
    fn the_initramfs_is_freed_here_unless_a_helper_takes_it_over() {
        assert!(frees_itself(None));
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        assert!(!frees_itself(Some(w.into())));
        let mut got = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(r), &mut got).unwrap();
        assert_eq!(got, "1");
        // The helper is gone (its end closed): the boot does it after all.
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        drop(r);
        assert!(frees_itself(Some(w.into())));
    }
}
