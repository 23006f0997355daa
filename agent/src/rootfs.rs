//! The new root: the squashfs image from the NBD device as the read-only lower layer, a
//! tmpfs for the node's writes, overlayfs joining them. The lower layer stays visible in
//! the new root at /rofs (as LTSP5 had it) and under /run/rootfs.

use crate::system::System;
use nix::mount::MsFlags;

#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error("mkdir {path}: {source}")]
    Mkdir {
        path: String,
        source: std::io::Error,
    },
    #[error("mount {device} (squashfs) on {target}: {source}; is the export a squashfs image, and is the squashfs module loaded?")]
    Lower {
        device: String,
        target: String,
        source: std::io::Error,
    },
    #[error("mount tmpfs (size={size}) on {target}: {source}")]
    Upper {
        size: String,
        target: String,
        source: std::io::Error,
    },
    #[error("mount overlay on {target}: {source}; is the overlay module loaded?")]
    Overlay {
        target: String,
        source: std::io::Error,
    },
    #[error("bind {from} on {target}: {source}")]
    Bind {
        from: String,
        target: String,
        source: std::io::Error,
    },
}

/// Where the layers live: below `run` (moved into the new root with /run).
pub fn lower_dir(run: &str) -> String {
    format!("{run}/rootfs/lower")
}

pub fn rw_dir(run: &str) -> String {
    format!("{run}/rootfs/rw")
}

/// The overlay's upper layer (in the tmpfs).
pub fn upper_dir(run: &str) -> String {
    format!("{}/upper", rw_dir(run))
}

fn mkdir(sys: &dyn System, p: &str) -> Result<(), RootError> {
    sys.mkdir(p).map_err(|source| RootError::Mkdir {
        path: p.into(),
        source,
    })
}

/// [`mount_layers`] then [`mount_overlay`].
pub fn mount_root(
    sys: &dyn System,
    device: &str,
    overlay_size: &str,
    run: &str,
    newroot: &str,
) -> Result<(), RootError> {
    mount_layers(sys, device, overlay_size, run)?;
    mount_overlay(sys, run, newroot)
}

/// The squashfs image read-only at [`lower_dir`], a tmpfs of `overlay_size` at
/// [`rw_dir`] with the overlay's upper and work directories.
pub fn mount_layers(
    sys: &dyn System,
    device: &str,
    overlay_size: &str,
    run: &str,
) -> Result<(), RootError> {
    let lower = lower_dir(run);
    let rw = rw_dir(run);
    mkdir(sys, &lower)?;
    mkdir(sys, &rw)?;
    sys.mount(device, &lower, "squashfs", MsFlags::MS_RDONLY, "")
        .map_err(|source| RootError::Lower {
            device: device.into(),
            target: lower.clone(),
            source,
        })?;
    sys.mount(
        "tmpfs",
        &rw,
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        &format!("mode=0755,size={overlay_size}"),
    )
    .map_err(|source| RootError::Upper {
        size: overlay_size.into(),
        target: rw.clone(),
        source,
    })?;
    mkdir(sys, &upper_dir(run))?;
    mkdir(sys, &format!("{rw}/work"))
}

/// The overlay of the layers as the new root, and the lower layer at its /rofs.
pub fn mount_overlay(sys: &dyn System, run: &str, newroot: &str) -> Result<(), RootError> {
    let lower = lower_dir(run);
    let rw = rw_dir(run);
    mkdir(sys, newroot)?;
    let upper = upper_dir(run);
    let opts = format!("lowerdir={lower},upperdir={upper},workdir={rw}/work");
    sys.mount("overlay", newroot, "overlay", MsFlags::empty(), &opts)
        .map_err(|source| RootError::Overlay {
            target: newroot.into(),
            source,
        })?;
    let rofs = format!("{newroot}/rofs");
    mkdir(sys, &rofs)?;
    sys.mount(&lower, &rofs, "", MsFlags::MS_BIND, "")
        .map_err(|source| RootError::Bind {
            from: lower.clone(),
            target: rofs,
            source,
        })?;
    Ok(())
}
