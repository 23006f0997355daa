//! dm-verity over the root device (`ltsp.verity=ROOTHASH`): every block of the image is
//! checked against a hash tree whose root the kernel cmdline pins, so a tampered block
//! reads as an I/O error, never as other bytes.
//!
//! The image is `veritysetup format --hash-offset=SIZE` of the squashfs onto itself
//! (deploy/build-image): the squashfs, padded to 4 KiB, then the verity superblock, then
//! the hash tree. The squashfs superblock gives the offset, the verity superblock the
//! parameters; neither is trusted: any change to them changes the tree the pinned root hash
//! is checked against, and the first read fails.

use crate::system::System;
use std::io::Read;
use std::os::unix::fs::FileExt;

/// The device-mapper name of the verified root (`/sys/block/dm-N/dm/name`).
pub const DM_NAME: &str = "ltsp-root";

/// mksquashfs pads the image to this; the hash tree starts at the next multiple.
const SQUASHFS_PAD: u64 = 4096;
/// `struct verity_sb` of cryptsetup (lib/verity/verity.c), on disk.
const VERITY_SB_SIZE: u64 = 512;

#[derive(Debug, thiserror::Error)]
pub enum VerityError {
    #[error("ltsp.verity={0:?}: expected the image's root hash in hex (root.squashfs.roothash, 40 to 128 hex digits)")]
    BadHash(String),
    #[error("reading {device}: {source}")]
    Read {
        device: String,
        source: std::io::Error,
    },
    #[error(
        "{device} is not a squashfs image (no hsqs magic): cannot find its dm-verity hash tree"
    )]
    NotSquashfs { device: String },
    #[error("{device}: no dm-verity hash tree after the squashfs (at byte {offset}); was the image built with deploy/build-image, which appends it?")]
    NoTree { device: String, offset: u64 },
    #[error("{device}: dm-verity superblock at byte {offset}: {what}")]
    BadSuperblock {
        device: String,
        offset: u64,
        what: String,
    },
    #[error("mapping dm-verity over {device}: {source}; is the dm-verity module loaded?")]
    Map { device: String, source: DmError },
    #[error("dm-verity refused the image on {device}: reading through {mapped} failed ({source}); the image does not match ltsp.verity={hash} (see the kernel log, `device-mapper: verity`)")]
    Mismatch {
        device: String,
        mapped: String,
        hash: String,
        source: std::io::Error,
    },
}

/// One error per device-mapper call.
#[derive(Debug, thiserror::Error)]
pub enum DmError {
    #[error("opening /dev/mapper/control: {0}")]
    Control(std::io::Error),
    #[error("DM_DEV_CREATE: {0}")]
    Create(std::io::Error),
    #[error("DM_TABLE_LOAD: {0}")]
    Load(std::io::Error),
    #[error("DM_DEV_SUSPEND (resume): {0}")]
    Resume(std::io::Error),
    #[error("{path} did not appear: {source}")]
    Node {
        path: String,
        source: std::io::Error,
    },
}

/// The dm-verity target (Documentation/admin-guide/device-mapper/verity.rst), data and
/// hash tree on one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerityTable {
    pub device: String,
    pub data_block_size: u32,
    pub hash_block_size: u32,
    pub data_blocks: u64,
    /// In hash blocks from the start of the device: the tree after the superblock.
    pub hash_start_block: u64,
    pub algorithm: String,
    pub root_hash: String,
    /// Hex; empty for none.
    pub salt: String,
}

impl VerityTable {
    /// The target's length in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.data_blocks * u64::from(self.data_block_size) / 512
    }

    /// The target's parameters as the kernel parses them.
    pub fn params(&self) -> String {
        let salt = if self.salt.is_empty() {
            "-"
        } else {
            &self.salt
        };
        format!(
            "1 {dev} {dev} {} {} {} {} {} {} {salt}",
            self.data_block_size,
            self.hash_block_size,
            self.data_blocks,
            self.hash_start_block,
            self.algorithm,
            self.root_hash,
            dev = self.device,
        )
    }
}

/// The pinned root hash, lower-cased; anything but 40 to 128 hex digits is refused (a
/// typo must not boot an unverified root).
pub fn parse_root_hash(s: &str) -> Result<String, VerityError> {
    let ok = (40..=128).contains(&s.len())
        && s.len().is_multiple_of(2)
        && s.bytes().all(|b| b.is_ascii_hexdigit());
    match ok {
        true => Ok(s.to_ascii_lowercase()),
        false => Err(VerityError::BadHash(s.chars().take(200).collect())),
    }
}

/// The table for `device` from its two superblocks.
pub fn read_table(device: &str, root_hash: &str) -> Result<VerityTable, VerityError> {
    let read_err = |source| VerityError::Read {
        device: device.into(),
        source,
    };
    let f = std::fs::File::open(device).map_err(read_err)?;
    let mut sq = [0u8; 48];
    f.read_exact_at(&mut sq, 0).map_err(read_err)?;
    let size = {
        use std::io::Seek;
        let mut f = &f;
        f.seek(std::io::SeekFrom::End(0)).map_err(read_err)?
    };
    let mut sb = [0u8; VERITY_SB_SIZE as usize];
    let offset = hash_offset(&sq).ok_or_else(|| VerityError::NotSquashfs {
        device: device.into(),
    })?;
    if offset
        .checked_add(VERITY_SB_SIZE)
        .is_none_or(|end| end > size)
    {
        return Err(VerityError::NoTree {
            device: device.into(),
            offset,
        });
    }
    f.read_exact_at(&mut sb, offset).map_err(read_err)?;
    table_from(device, &sb, offset, size, root_hash)
}

/// Where the hash area starts: the squashfs's `bytes_used` rounded up to its padding.
pub fn hash_offset(squashfs_sb: &[u8]) -> Option<u64> {
    if squashfs_sb.get(..4)? != b"hsqs" {
        return None;
    }
    let used = u64::from_le_bytes(squashfs_sb.get(40..48)?.try_into().ok()?);
    used.checked_next_multiple_of(SQUASHFS_PAD)
}

/// The table from the verity superblock `sb` found at `offset` of a device of `size`
/// bytes; every field checked before the kernel sees it.
pub fn table_from(
    device: &str,
    sb: &[u8],
    offset: u64,
    size: u64,
    root_hash: &str,
) -> Result<VerityTable, VerityError> {
    let bad = |what: String| VerityError::BadSuperblock {
        device: device.into(),
        offset,
        what,
    };
    if sb.len() < VERITY_SB_SIZE as usize || &sb[..8] != b"verity\0\0" {
        return Err(VerityError::NoTree {
            device: device.into(),
            offset,
        });
    }
    let u32_at = |o: usize| u32::from_le_bytes(sb[o..o + 4].try_into().unwrap());
    let (version, hash_type) = (u32_at(8), u32_at(12));
    if version != 1 || hash_type != 1 {
        return Err(bad(format!(
            "version {version}, hash type {hash_type}; expected 1 and 1"
        )));
    }
    let alg = &sb[32..64];
    let alg = &alg[..alg.iter().position(|&b| b == 0).unwrap_or(alg.len())];
    if alg.is_empty()
        || !alg
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
    {
        return Err(bad("the hash algorithm's name is not plain ASCII".into()));
    }
    let algorithm = String::from_utf8_lossy(alg).into_owned();
    let (dbs, hbs) = (u32_at(64), u32_at(68));
    for (what, bs) in [("data", dbs), ("hash", hbs)] {
        if !bs.is_power_of_two() || !(512..=65536).contains(&bs) {
            return Err(bad(format!("{what} block size {bs}")));
        }
    }
    let data_blocks = u64::from_le_bytes(sb[72..80].try_into().unwrap());
    if data_blocks.checked_mul(u64::from(dbs)) != Some(offset) {
        return Err(bad(format!(
            "{data_blocks} data blocks of {dbs} bytes, but the squashfs ends at byte {offset}"
        )));
    }
    let salt_size = usize::from(u16::from_le_bytes(sb[80..82].try_into().unwrap()));
    if salt_size > 256 {
        return Err(bad(format!("salt of {salt_size} bytes (at most 256)")));
    }
    let salt = sb[88..88 + salt_size]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if let Some(digest) = digest_len(&algorithm) {
        if root_hash.len() != digest * 2 {
            return Err(VerityError::BadHash(format!(
                "{root_hash} ({} hex digits; the image's {algorithm} tree needs {})",
                root_hash.len(),
                digest * 2
            )));
        }
    }
    let hash_start_block = (offset + VERITY_SB_SIZE).div_ceil(u64::from(hbs));
    if hash_start_block * u64::from(hbs) >= size {
        return Err(bad("no hash blocks after the superblock".into()));
    }
    Ok(VerityTable {
        device: device.into(),
        data_block_size: dbs,
        hash_block_size: hbs,
        data_blocks,
        hash_start_block,
        algorithm,
        root_hash: root_hash.into(),
        salt,
    })
}

fn digest_len(alg: &str) -> Option<usize> {
    match alg {
        "sha1" => Some(20),
        "sha256" => Some(32),
        "sha512" => Some(64),
        _ => None,
    }
}

/// Maps the verified root over `device` and reads its first block through it, so that a
/// wrong hash or a tampered tree fails here, named, rather than as a squashfs mount error.
/// Returns the dm device to mount.
pub fn map_root(sys: &dyn System, device: &str, pinned: &str) -> Result<String, VerityError> {
    let hash = parse_root_hash(pinned)?;
    let table = read_table(device, &hash)?;
    let mapped = sys
        .map_verity(DM_NAME, &table)
        .map_err(|source| VerityError::Map {
            device: device.into(),
            source,
        })?;
    let mismatch = |source| VerityError::Mismatch {
        device: device.into(),
        mapped: mapped.clone(),
        hash: hash.clone(),
        source,
    };
    let mut first = vec![0u8; table.data_block_size as usize];
    std::fs::File::open(&mapped)
        .and_then(|mut f| f.read_exact(&mut first))
        .map_err(mismatch)?;
    Ok(mapped)
}

/// The device-mapper ioctls of <linux/dm-ioctl.h>: four calls did not justify the
/// `devicemapper` crate, whose -sys crate generates bindings with bindgen and libclang at
/// build time (as loopdev does).
pub mod dm {
    use super::{DmError, VerityTable};
    use std::io;
    use std::mem::{offset_of, size_of};
    use std::os::fd::AsRawFd;

    const DM_NAME_LEN: usize = 128;
    const DM_UUID_LEN: usize = 129;
    const DM_MAX_TYPE_NAME: usize = 16;
    const DM_READONLY_FLAG: u32 = 1 << 0;

    /// `struct dm_ioctl`.
    #[repr(C)]
    pub struct DmIoctl {
        version: [u32; 3],
        data_size: u32,
        data_start: u32,
        target_count: u32,
        open_count: i32,
        flags: u32,
        event_nr: u32,
        padding: u32,
        dev: u64,
        name: [u8; DM_NAME_LEN],
        uuid: [u8; DM_UUID_LEN],
        data: [u8; 7],
    }

    /// `struct dm_target_spec`, followed by its NUL-terminated parameters.
    #[repr(C)]
    pub struct DmTargetSpec {
        sector_start: u64,
        length: u64,
        status: i32,
        next: u32,
        target_type: [u8; DM_MAX_TYPE_NAME],
    }

    // The kernel's sizes and offsets: a wrong layout must not compile.
    const _: () = assert!(size_of::<DmIoctl>() == 312);
    const _: () = assert!(offset_of!(DmIoctl, dev) == 40);
    const _: () = assert!(offset_of!(DmIoctl, name) == 48);
    const _: () = assert!(offset_of!(DmIoctl, uuid) == 176);
    const _: () = assert!(size_of::<DmTargetSpec>() == 40);

    /// `_IOWR(0xfd, nr, struct dm_ioctl)`.
    const fn iowr(nr: u32) -> u32 {
        (3 << 30) | ((size_of::<DmIoctl>() as u32) << 16) | (0xfd << 8) | nr
    }
    pub const DM_DEV_CREATE: u32 = iowr(3);
    pub const DM_DEV_REMOVE: u32 = iowr(4);
    pub const DM_DEV_SUSPEND: u32 = iowr(6);
    pub const DM_TABLE_LOAD: u32 = iowr(9);

    fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
        buf[at..at + bytes.len()].copy_from_slice(bytes);
    }

    /// A `struct dm_ioctl` for device `name`, followed by `payload`; version 4.0.0 (any
    /// kernel with this interface accepts it).
    pub fn request(name: &str, flags: u32, targets: u32, payload: &[u8]) -> io::Result<Vec<u8>> {
        if name.is_empty() || name.len() >= DM_NAME_LEN || name.contains(['/', '\0']) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad device-mapper name {name:?}"),
            ));
        }
        let head = size_of::<DmIoctl>();
        let size = head + payload.len();
        let mut b = vec![0u8; size];
        put(&mut b, offset_of!(DmIoctl, version), &4u32.to_ne_bytes());
        put(
            &mut b,
            offset_of!(DmIoctl, data_size),
            &(size as u32).to_ne_bytes(),
        );
        put(
            &mut b,
            offset_of!(DmIoctl, data_start),
            &(head as u32).to_ne_bytes(),
        );
        put(
            &mut b,
            offset_of!(DmIoctl, target_count),
            &targets.to_ne_bytes(),
        );
        put(&mut b, offset_of!(DmIoctl, flags), &flags.to_ne_bytes());
        put(&mut b, offset_of!(DmIoctl, name), name.as_bytes());
        put(&mut b, head, payload);
        Ok(b)
    }

    /// One `struct dm_target_spec` for the whole device and its parameters, padded to 8.
    pub fn verity_target(t: &VerityTable) -> Vec<u8> {
        let params = t.params();
        let spec = size_of::<DmTargetSpec>();
        let len = (spec + params.len() + 1).next_multiple_of(8);
        let mut b = vec![0u8; len];
        put(
            &mut b,
            offset_of!(DmTargetSpec, length),
            &t.sectors().to_ne_bytes(),
        );
        put(
            &mut b,
            offset_of!(DmTargetSpec, next),
            &(len as u32).to_ne_bytes(),
        );
        put(&mut b, offset_of!(DmTargetSpec, target_type), b"verity");
        put(&mut b, spec, params.as_bytes());
        b
    }

    /// The device number the kernel wrote back (its `huge_encode_dev` form).
    pub fn minor_of(reply: &[u8]) -> u64 {
        let at = offset_of!(DmIoctl, dev);
        let dev = u64::from_ne_bytes(reply[at..at + 8].try_into().unwrap());
        (dev & 0xff) | ((dev >> 12) & !0xff)
    }

    fn call(ctl: &std::fs::File, nr: u32, buf: &mut [u8]) -> io::Result<()> {
        // SAFETY: `buf` starts with a struct dm_ioctl whose data_size is buf.len() (built
        // by `request`); the kernel reads and writes at most data_size bytes of it during
        // the call, and nothing else holds the buffer.
        let r = unsafe { nix::libc::ioctl(ctl.as_raw_fd(), nr as _, buf.as_mut_ptr()) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    fn control() -> Result<std::fs::File, DmError> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/mapper/control")
            .map_err(DmError::Control)
    }

    /// Creates `name` read-only with the verity table and resumes it; returns /dev/dm-N.
    /// A device left half made is removed.
    pub fn create_verity(name: &str, t: &VerityTable) -> Result<String, DmError> {
        let ctl = control()?;
        let mut create = request(name, 0, 0, &[]).map_err(DmError::Create)?;
        call(&ctl, DM_DEV_CREATE, &mut create).map_err(DmError::Create)?;
        let path = format!("/dev/dm-{}", minor_of(&create));
        let made = (|| {
            let mut load =
                request(name, DM_READONLY_FLAG, 1, &verity_target(t)).map_err(DmError::Load)?;
            call(&ctl, DM_TABLE_LOAD, &mut load).map_err(DmError::Load)?;
            // DM_DEV_SUSPEND without DM_SUSPEND_FLAG resumes: the loaded table goes live.
            let mut resume = request(name, 0, 0, &[]).map_err(DmError::Resume)?;
            call(&ctl, DM_DEV_SUSPEND, &mut resume).map_err(DmError::Resume)?;
            wait_node(&path)
        })();
        if made.is_err() {
            let _ = remove(name);
        }
        made.map(|()| path)
    }

    /// devtmpfs makes the node as the disk is added; a short wait covers a slow one.
    fn wait_node(path: &str) -> Result<(), DmError> {
        for _ in 0..100 {
            if std::path::Path::new(path).exists() {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Err(DmError::Node {
            path: path.into(),
            source: io::Error::from(io::ErrorKind::NotFound),
        })
    }

    /// Removes device `name` (tests; a failed mapping).
    pub fn remove(name: &str) -> io::Result<()> {
        let ctl = control().map_err(|e| io::Error::other(e.to_string()))?;
        let mut b = request(name, 0, 0, &[])?;
        call(&ctl, DM_DEV_REMOVE, &mut b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "3f3ba560fdc464b779df6fadc54f44f04c5d0d7e4b7f2849cfe596c11f74d648";

    /// The superblock `veritysetup format --hash-offset=303104` wrote for a 74-block image.
    fn superblock() -> Vec<u8> {
        let mut sb = vec![0u8; 512];
        sb[..8].copy_from_slice(b"verity\0\0");
        sb[8..12].copy_from_slice(&1u32.to_le_bytes());
        sb[12..16].copy_from_slice(&1u32.to_le_bytes());
        sb[32..38].copy_from_slice(b"sha256");
        sb[64..68].copy_from_slice(&4096u32.to_le_bytes());
        sb[68..72].copy_from_slice(&4096u32.to_le_bytes());
        sb[72..80].copy_from_slice(&74u64.to_le_bytes());
        sb[80..82].copy_from_slice(&32u16.to_le_bytes());
        for i in 0..32 {
            sb[88 + i] = i as u8;
        }
        sb
    }

    #[test]
    fn table_string_is_the_kernels_format() {
        let t = table_from("/dev/nbd0", &superblock(), 303104, 311296, HASH).unwrap();
        let salt: String = (0..32u8).map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            t.params(),
            format!("1 /dev/nbd0 /dev/nbd0 4096 4096 74 75 sha256 {HASH} {salt}")
        );
        assert_eq!(t.sectors(), 74 * 8);
        let no_salt = VerityTable {
            salt: String::new(),
            ..t
        };
        assert!(no_salt.params().ends_with(&format!("{HASH} -")));
    }

    #[test]
    fn squashfs_superblock_gives_the_hash_offset() {
        let mut sq = vec![0u8; 48];
        sq[..4].copy_from_slice(b"hsqs");
        sq[40..48].copy_from_slice(&300001u64.to_le_bytes());
        assert_eq!(hash_offset(&sq), Some(303104));
        sq[40..48].copy_from_slice(&303104u64.to_le_bytes());
        assert_eq!(hash_offset(&sq), Some(303104));
        sq[40..48].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(hash_offset(&sq), None);
        assert_eq!(hash_offset(b"ext4"), None);
    }

    #[test]
    fn superblock_that_disagrees_is_refused() {
        let ok = superblock();
        // (offset, bytes written there, what the error says)
        let salt_300 = 300u16.to_le_bytes();
        let cases: [(usize, &[u8], &str); 6] = [
            (0, b"X", "no dm-verity hash tree"),
            (8, &[2], "version 2"),
            (72, &[75], "75 data blocks"),
            (66, &[3], "data block size"),
            (80, &salt_300, "salt of 300"),
            (33, b" ", "not plain ASCII"),
        ];
        for (at, bytes, says) in cases {
            let mut sb = ok.clone();
            sb[at..at + bytes.len()].copy_from_slice(bytes);
            let e = table_from("/dev/nbd0", &sb, 303104, 311296, HASH).unwrap_err();
            assert!(e.to_string().contains(says), "{e} lacks {says}");
        }
        // A sha256 tree with a 40-digit hash, and no room for the tree.
        let e = table_from("/dev/nbd0", &ok, 303104, 311296, &HASH[..40]).unwrap_err();
        assert!(matches!(e, VerityError::BadHash(_)), "{e}");
        let e = table_from("/dev/nbd0", &ok, 303104, 303616, HASH).unwrap_err();
        assert!(e.to_string().contains("no hash blocks"), "{e}");
    }

    #[test]
    fn root_hash_must_be_hex() {
        assert_eq!(parse_root_hash(&HASH.to_uppercase()).unwrap(), HASH);
        for bad in [
            "",
            "xyz",
            &HASH[1..],
            &format!("{HASH}g0"),
            &"a".repeat(130),
        ] {
            assert!(parse_root_hash(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ioctl_buffers_have_the_kernels_layout() {
        use dm::*;
        assert_eq!(DM_DEV_CREATE, 0xc138_fd03);
        assert_eq!(DM_DEV_REMOVE, 0xc138_fd04);
        assert_eq!(DM_DEV_SUSPEND, 0xc138_fd06);
        assert_eq!(DM_TABLE_LOAD, 0xc138_fd09);
        let t = table_from("/dev/loop0", &superblock(), 303104, 311296, HASH).unwrap();
        let target = verity_target(&t);
        assert_eq!(target.len() % 8, 0);
        assert_eq!(&target[..8], &0u64.to_ne_bytes(), "sector_start");
        assert_eq!(&target[8..16], &(74u64 * 8).to_ne_bytes(), "length");
        assert_eq!(
            &target[20..24],
            &(target.len() as u32).to_ne_bytes(),
            "next"
        );
        assert_eq!(&target[24..40], b"verity\0\0\0\0\0\0\0\0\0\0");
        let params = &target[40..];
        let end = params.iter().position(|&b| b == 0).expect("NUL-terminated");
        assert_eq!(&params[..end], t.params().as_bytes());

        let b = request("ltsp-root", 1, 1, &target).unwrap();
        assert_eq!(b.len(), 312 + target.len());
        assert_eq!(&b[0..12], &[4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0][..]);
        assert_eq!(&b[12..16], &(b.len() as u32).to_ne_bytes(), "data_size");
        assert_eq!(&b[16..20], &312u32.to_ne_bytes(), "data_start");
        assert_eq!(&b[20..24], &1u32.to_ne_bytes(), "target_count");
        assert_eq!(&b[28..32], &1u32.to_ne_bytes(), "flags: read-only");
        assert_eq!(&b[48..58], b"ltsp-root\0");
        assert_eq!(&b[312..], &target[..]);
        for bad in ["", "a/b", &"n".repeat(128)] {
            assert!(request(bad, 0, 0, &[]).is_err(), "{bad}");
        }

        // dev 253:0 and 253:300 as the kernel encodes them.
        let mut reply = vec![0u8; 312];
        reply[40..48].copy_from_slice(&(253u64 << 8).to_ne_bytes());
        assert_eq!(minor_of(&reply), 0);
        let dev = (300u64 & 0xff) | (253 << 8) | ((300 & !0xff) << 12);
        reply[40..48].copy_from_slice(&dev.to_ne_bytes());
        assert_eq!(minor_of(&reply), 300);
    }
}
