//! Image versions: an export serves every version it holds, each by its content identity,
//! so a node keeps reading the bytes it booted from whatever happens to the export's path.
//!
//! - The plain export name (`root`) is the file now at the export's path: its *current*
//!   version. A node's reconnect asks for `root@blake3:<hex>`, the version it runs.
//! - Each file version is hashed once, by a thread of its own (one at a time per export),
//!   started when the server starts and when the path changes (inotify, a stat per
//!   connection, a periodic check). No client waits in it or can cancel it; a client that
//!   needs the identity before it is known is told `hashing=NN%` and retries. A file
//!   rewritten while it is hashed is hashed again: an identity always names stable bytes.
//! - A version stays available while a connection uses it, then for the retention time:
//!   the server keeps the file open (a renamed-over image lives on while it is open), and
//!   copies it into a content-addressed store (`blake3-<hex>`: a reflink where the
//!   filesystem has them, else a copy, renamed into place when whole). Servers that share
//!   the store serve each other's versions: that is how a rolling upgrade strands no node.
//!   A copy, not a hard link: an image rewritten in place must not change a stored version.

use crate::config::Export;
use crate::identity::{hash_file, is_identity};
use crate::status::Status;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// A stored version no server marked used for this long may be removed, whatever the
/// pruning server's own retention: every server marks what it uses at least once a minute.
const PRUNE_FLOOR: u64 = 600;

/// What a file version is, on disk: a rename or a rewrite changes it (ctime cannot be set
/// from user space, so a rewrite that restores the mtime is still seen).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Key {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

fn key_of(m: &std::fs::Metadata) -> Key {
    Key {
        dev: m.dev(),
        ino: m.ino(),
        size: m.len(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One open file version: its identity once hashed, and who uses it.
struct Rec {
    file: File,
    size: u64,
    key: Key,
    id: OnceLock<String>,
    /// Bytes hashed so far.
    done: AtomicU64,
    failed: AtomicBool,
    /// Set once the hash ended, either way.
    ready: watch::Sender<bool>,
    users: AtomicUsize,
    /// Unix seconds when it was last in use (a user left, or it was current).
    last_used: AtomicU64,
}

impl Rec {
    fn new(file: File, meta: &std::fs::Metadata) -> Arc<Rec> {
        Arc::new(Rec {
            file,
            size: meta.len(),
            key: key_of(meta),
            id: OnceLock::new(),
            done: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            ready: watch::channel(false).0,
            users: AtomicUsize::new(0),
            last_used: AtomicU64::new(unix_now()),
        })
    }

    /// Still the bytes it was opened as (not rewritten in place since). The ctime is left
    /// out: renaming a new image over this one, or moving it aside, changes it too.
    fn unchanged(&self) -> bool {
        self.file.metadata().is_ok_and(|m| {
            let now = key_of(&m);
            (now.dev, now.ino, now.size, now.mtime)
                == (self.key.dev, self.key.ino, self.key.size, self.key.mtime)
        })
    }

    fn identity(&self) -> Identity {
        match self.id.get() {
            Some(id) => Identity::Known(id.clone()),
            None if self.failed.load(Ordering::Acquire) => Identity::Unknown,
            None => Identity::Hashing(
                (self.done.load(Ordering::Relaxed).saturating_mul(100) / self.size.max(1)).min(99)
                    as u8,
            ),
        }
    }

    fn in_use(&self) -> bool {
        self.users.load(Ordering::Acquire) > 0
    }
}

/// A connection's use of a version: counted while it lives.
pub struct Use(Arc<Rec>);

impl Drop for Use {
    fn drop(&mut self) {
        self.0.last_used.store(unix_now(), Ordering::Relaxed);
        self.0.users.fetch_sub(1, Ordering::Release);
    }
}

/// The identity of what a connection is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Known(String),
    /// Being hashed: the percentage done.
    Hashing(u8),
    /// Hashing failed (an I/O error, logged); tried again at the next check.
    Unknown,
}

/// An opened version, ready to serve.
pub struct Version {
    pub file: File,
    pub size: u64,
    pub identity: Identity,
    pub used: Use,
}

#[derive(Default)]
struct State {
    /// Export name -> the file now at its path.
    current: HashMap<String, Arc<Rec>>,
    /// Exports with a hash running, and whether their path changed meanwhile.
    hashing: HashMap<String, bool>,
    /// Identity -> a file that serves it.
    held: HashMap<String, Arc<Rec>>,
    /// Every file version alive (held, current or in a connection): liveness goes by
    /// identity, and one identity may be open as several files.
    all: Vec<Weak<Rec>>,
    /// Exports whose path could not be opened (logged once).
    missing: HashSet<String>,
}

/// How a file version is hashed: [`hash_file`]; tests hold it back or make it fail.
type Hasher = dyn Fn(&File, &AtomicU64) -> std::io::Result<String> + Send + Sync;

pub struct Versions {
    exports: Vec<Export>,
    hasher: Box<Hasher>,
    /// The content-addressed store: `versions_dir`, else `.ltsp-versions` beside the first
    /// export.
    store: PathBuf,
    retention: Duration,
    status: Arc<Status>,
    state: Mutex<State>,
}

/// A version's file name in a store (`id` is well-formed: see [`is_identity`]).
fn stored_name(id: &str) -> String {
    format!("blake3-{}", id.trim_start_matches("blake3:"))
}

impl Versions {
    pub fn new(
        exports: Vec<Export>,
        dir: Option<PathBuf>,
        retention: Duration,
        status: Arc<Status>,
    ) -> Arc<Self> {
        Self::with_hasher(exports, dir, retention, status, Box::new(hash_file))
    }

    fn with_hasher(
        exports: Vec<Export>,
        dir: Option<PathBuf>,
        retention: Duration,
        status: Arc<Status>,
        hasher: Box<Hasher>,
    ) -> Arc<Self> {
        let store = dir.unwrap_or_else(|| {
            exports
                .first()
                .and_then(|e| e.path.parent())
                .unwrap_or(Path::new("."))
                .join(".ltsp-versions")
        });
        Arc::new(Versions {
            exports,
            hasher,
            store,
            retention,
            status,
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hashes every export now and follows their paths from here on: inotify for renames,
    /// new names and completed writes, and a check every `min(60 s, retention / 2)` for
    /// anything inotify cannot see. Needs a tokio runtime.
    pub fn start(self: &Arc<Self>) {
        for e in &self.exports {
            self.refresh(e);
        }
        let me = self.clone();
        if let Err(e) = std::thread::Builder::new()
            .name("ltsp-versions-watch".into())
            .spawn(move || me.watch())
        {
            log::warn!("nbd: cannot watch the export paths ({e}); checked periodically");
        }
        let me = self.clone();
        let every = (self.retention / 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let me = me.clone();
                // Stats, opens, copies and directory scans: off the runtime's workers.
                let _ = tokio::task::spawn_blocking(move || {
                    for e in &me.exports {
                        me.refresh(e);
                    }
                    me.sweep();
                })
                .await;
            }
        });
    }

    /// Blocks on inotify events for the exports' directories, refreshing an export whose
    /// name appears (all of them when events were lost).
    fn watch(self: Arc<Self>) {
        use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
        let ino = match Inotify::init(InitFlags::IN_CLOEXEC) {
            Ok(i) => i,
            Err(e) => {
                log::warn!("nbd: inotify: {e}; export paths are checked periodically");
                return;
            }
        };
        let mut dirs: HashMap<_, PathBuf> = HashMap::new();
        for e in &self.exports {
            let dir = e.path.parent().unwrap_or(Path::new(".")).to_path_buf();
            if dirs.values().any(|d| *d == dir) {
                continue;
            }
            let flags = AddWatchFlags::IN_MOVED_TO
                | AddWatchFlags::IN_CLOSE_WRITE
                | AddWatchFlags::IN_CREATE;
            match ino.add_watch(&dir, flags) {
                Ok(wd) => {
                    dirs.insert(wd, dir);
                }
                Err(err) => log::warn!("nbd: inotify on {}: {err}", dir.display()),
            }
        }
        loop {
            let events = match ino.read_events() {
                Ok(ev) => ev,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    log::warn!("nbd: inotify: {e}; export paths are checked periodically");
                    return;
                }
            };
            for ev in events {
                if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    for e in &self.exports {
                        self.refresh(e);
                    }
                    continue;
                }
                let (Some(dir), Some(name)) = (dirs.get(&ev.wd), ev.name.as_ref()) else {
                    continue;
                };
                let path = dir.join(name);
                for e in self.exports.iter().filter(|e| e.path == path) {
                    self.refresh(e);
                }
            }
        }
    }

    /// Looks at the export's path (blocking: a stat, and an open when it changed). A new
    /// file version there becomes current and is hashed by a thread of its own, which no
    /// client can cancel; while one runs for this export, a newer file waits for it.
    pub fn refresh(self: &Arc<Self>, e: &Export) {
        // A stat first: the common case (nothing changed) opens nothing.
        let key = std::fs::metadata(&e.path).ok().map(|m| key_of(&m));
        {
            let mut st = self.lock();
            if let Some(pending) = st.hashing.get_mut(&e.name) {
                *pending = true;
                return;
            }
            if let Some(c) = st.current.get(&e.name).filter(|c| Some(c.key) == key) {
                if c.failed.load(Ordering::Acquire) {
                    // A hash that failed (an I/O error) is tried again.
                    let rec = c.clone();
                    rec.failed.store(false, Ordering::Release);
                    rec.ready.send_replace(false);
                    st.hashing.insert(e.name.clone(), false);
                    drop(st);
                    self.spawn_hash(e, rec);
                }
                return;
            }
        }
        let (file, meta) = match File::open(&e.path).and_then(|f| f.metadata().map(|m| (f, m))) {
            Ok(x) => x,
            Err(err) => {
                // Once until the path is back, not once per connection.
                if self.lock().missing.insert(e.name.clone()) {
                    log::warn!("nbd: export {:?}: {}: {err}", e.name, e.path.display());
                }
                return;
            }
        };
        let rec = Rec::new(file, &meta);
        {
            let mut st = self.lock();
            st.missing.remove(&e.name);
            if st.hashing.contains_key(&e.name)
                || st.current.get(&e.name).is_some_and(|c| c.key == rec.key)
            {
                return; // another caller got here first
            }
            if let Some(old) = st.current.get(&e.name) {
                // No longer current: its retention starts now.
                old.last_used.store(unix_now(), Ordering::Relaxed);
                log::info!(
                    "nbd: export {:?}: a new image at {}; hashing it",
                    e.name,
                    e.path.display()
                );
            }
            st.current.insert(e.name.clone(), rec.clone());
            st.all.push(Arc::downgrade(&rec));
            st.hashing.insert(e.name.clone(), false);
        }
        self.spawn_hash(e, rec);
    }

    fn spawn_hash(self: &Arc<Self>, e: &Export, rec: Arc<Rec>) {
        let me = self.clone();
        let e2 = e.clone();
        let r2 = rec.clone();
        let spawned = std::thread::Builder::new()
            .name("ltsp-hash".into())
            .spawn(move || me.hash(e2, r2));
        if let Err(err) = spawned {
            log::error!("nbd: export {:?}: cannot start hashing: {err}", e.name);
            rec.failed.store(true, Ordering::Release);
            rec.ready.send_replace(true);
            self.lock().hashing.remove(&e.name);
        }
    }

    fn hash(self: Arc<Self>, e: Export, rec: Arc<Rec>) {
        let t = std::time::Instant::now();
        let r = (self.hasher)(&rec.file, &rec.done);
        // Rewritten in place while it was read: the hash names no stable bytes.
        let stable = rec.unchanged();
        let (keep, pending) = {
            let mut st = self.lock();
            let mut pending = st.hashing.remove(&e.name).unwrap_or(false);
            let current = st
                .current
                .get(&e.name)
                .is_some_and(|c| Arc::ptr_eq(c, &rec));
            let keep = match r {
                Ok(id) if stable => {
                    let _ = rec.id.set(id.clone());
                    log::info!(
                        "nbd: export {:?}: {id} ({} bytes, hashed in {:.2} s)",
                        e.name,
                        rec.size,
                        t.elapsed().as_secs_f64()
                    );
                    if current {
                        self.status.export_ready(&e.name, &id);
                    }
                    // A superseded version nobody used is not worth keeping.
                    let keep = current || rec.in_use();
                    if keep {
                        st.held.entry(id.clone()).or_insert_with(|| rec.clone());
                    }
                    keep.then_some(id)
                }
                Ok(_) => {
                    log::warn!(
                        "nbd: export {:?}: {} changed while it was hashed; hashing it again",
                        e.name,
                        e.path.display()
                    );
                    rec.failed.store(true, Ordering::Release);
                    pending = true;
                    None
                }
                Err(err) => {
                    log::error!("nbd: export {:?}: hashing the image: {err}", e.name);
                    rec.failed.store(true, Ordering::Release);
                    None
                }
            };
            (keep, pending)
        };
        rec.ready.send_replace(true);
        if pending {
            self.refresh(&e);
        }
        self.publish();
        if let Some(id) = keep {
            if let Err(err) = put(&self.store, &id, &rec) {
                log::warn!(
                    "nbd: export {:?}: keeping {id} in {}: {err}; it lasts only while this \
                     server runs",
                    e.name,
                    self.store.display()
                );
            }
        }
    }

    /// The export's current version, as last looked at (see [`Versions::refresh`]).
    /// `wait`: how long a client that needs the identity waits for a hash in progress
    /// before it is told to retry.
    pub async fn current(&self, e: &Export, wait: Duration) -> Option<Version> {
        let rec = self.lock().current.get(&e.name).cloned()?;
        if !wait.is_zero() {
            let mut ready = rec.ready.subscribe();
            let _ = tokio::time::timeout(wait, ready.wait_for(|d| *d)).await;
        }
        let _st = self.lock(); // counted under the lock: a sweep sees the user
        open_rec(&rec, rec.identity())
    }

    /// The version with identity `id`, if this server holds it (open, or in the store).
    /// Blocking: it may open a file in the store.
    pub fn get(&self, id: &str) -> Option<Version> {
        if !is_identity(id) {
            return None;
        }
        {
            let mut st = self.lock();
            if let Some(r) = st.held.get(id).cloned() {
                if r.unchanged() {
                    return open_rec(&r, Identity::Known(id.to_string()));
                }
                // Rewritten in place since it was hashed: no longer those bytes.
                log::warn!(
                    "nbd: {id}: its file was rewritten in place; served from the store only"
                );
                st.held.remove(id);
            }
        }
        let path = self.store.join(stored_name(id));
        // No symlink, no FIFO or device: only a regular file in the store is a version.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
            .open(&path)
            .ok()?;
        let meta = file.metadata().ok().filter(|m| m.is_file())?;
        let rec = Rec::new(file, &meta);
        let _ = rec.id.set(id.to_string());
        rec.ready.send_replace(true);
        let mut st = self.lock();
        let rec = st.held.entry(id.to_string()).or_insert(rec).clone();
        st.all.push(Arc::downgrade(&rec));
        log::info!("nbd: serving {id} from {}", path.display());
        let v = open_rec(&rec, Identity::Known(id.to_string()));
        drop(st);
        self.publish();
        v
    }

    /// Forgets versions no connection has used for the retention time (current ones are
    /// always kept), in memory and in the store; marks the ones in use as used now, for
    /// every server sharing the store, and puts back any of them missing from it.
    pub fn sweep(&self) {
        let now = unix_now();
        let keep = self.retention.as_secs();
        let (live, in_use) = {
            let mut st = self.lock();
            st.all.retain(|w| w.strong_count() > 0);
            for r in st.current.values() {
                r.last_used.store(now, Ordering::Relaxed);
            }
            let mut live = HashSet::new();
            let mut in_use: HashMap<String, Arc<Rec>> = HashMap::new();
            for r in st.all.iter().filter_map(Weak::upgrade) {
                let Some(id) = r.id.get() else { continue };
                let current = st.current.values().any(|c| Arc::ptr_eq(c, &r));
                if current || r.in_use() {
                    in_use.entry(id.clone()).or_insert_with(|| r.clone());
                }
                if current
                    || r.in_use()
                    || now.saturating_sub(r.last_used.load(Ordering::Relaxed)) < keep
                {
                    live.insert(id.clone());
                }
            }
            st.held.retain(|id, _| {
                let l = live.contains(id);
                if !l {
                    log::info!("nbd: {id}: unused for {keep} s; no longer served");
                }
                l
            });
            (live, in_use)
        };
        self.publish();
        for (id, rec) in &in_use {
            if self.store.join(stored_name(id)).exists() {
                mark_used(&self.store, id);
            } else if let Err(e) = put(&self.store, id, rec) {
                log::warn!("nbd: keeping {id} in {}: {e}", self.store.display());
            }
        }
        prune(&self.store, keep.max(PRUNE_FLOOR), &live);
    }

    /// Shows the versions held in the status and metrics.
    fn publish(&self) {
        let st = self.lock();
        let list = st
            .held
            .keys()
            .map(|id| {
                let exports: Vec<String> = st
                    .current
                    .iter()
                    .filter(|(_, c)| c.id.get() == Some(id))
                    .map(|(n, _)| n.clone())
                    .collect();
                (id.clone(), exports)
            })
            .collect();
        self.status.set_versions(list);
    }
}

fn open_rec(rec: &Arc<Rec>, identity: Identity) -> Option<Version> {
    let file = rec.file.try_clone().ok()?;
    rec.users.fetch_add(1, Ordering::AcqRel);
    Some(Version {
        file,
        size: rec.size,
        identity,
        used: Use(rec.clone()),
    })
}

/// Puts version `id` (the bytes of `rec`) into the store at `dir`: copied (the kernel
/// reflinks where the filesystem can) under a temporary name, marked used, then renamed
/// into place, so no server ever sees part of a version or an unmarked one.
fn put(dir: &Path, id: &str, rec: &Rec) -> std::io::Result<()> {
    let dst = dir.join(stored_name(id));
    if dst.exists() {
        mark_used(dir, id);
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    // Unique among replicas sharing the store (in containers every server may be PID 1).
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let tmp = dir.join(format!(
        ".tmp-{}-{}-{nanos}",
        stored_name(id),
        std::process::id()
    ));
    let r = (|| {
        // The open file, not the path (which may hold another image by now), opened anew
        // for an offset of its own.
        let mut src = File::open(format!("/proc/self/fd/{}", rec.file.as_raw_fd()))?;
        let mut out = File::create(&tmp)?;
        std::io::copy(&mut src, &mut out)?;
        out.sync_all()?;
        if !rec.unchanged() {
            return Err(std::io::Error::other(
                "the image changed while it was copied",
            ));
        }
        mark_used(dir, id);
        std::fs::rename(&tmp, &dst)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r?;
    log::info!("nbd: {id} kept in {}", dir.display());
    Ok(())
}

/// A version's last use, for every server sharing the store: the mtime of a marker file
/// beside it.
fn mark_used(dir: &Path, id: &str) {
    let m = dir.join(format!("{}.used", stored_name(id)));
    let r = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&m)
        .and_then(|f| f.set_modified(SystemTime::now()));
    if let Err(e) = r {
        log::warn!("nbd: {}: {e}", m.display());
    }
}

/// Removes stored versions that no server marked used for `keep` seconds and that this
/// server keeps alive, their markers, markers left without a version, and temporary
/// copies a server stopped in the middle of a day ago or more. Other names are left alone.
fn prune(dir: &Path, keep: u64, live: &HashSet<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let now = SystemTime::now();
    let age = |p: &Path| {
        std::fs::symlink_metadata(p)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| now.duration_since(t).ok())
            .map(|d| d.as_secs())
    };
    for ent in entries.flatten() {
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        let path = ent.path();
        if name.starts_with(".tmp-") {
            if age(&path).is_some_and(|a| a > 86_400) {
                let _ = std::fs::remove_file(&path);
            }
            continue;
        }
        let Some(rest) = name.strip_prefix("blake3-") else {
            continue;
        };
        let (hex, marker) = match rest.strip_suffix(".used") {
            Some(hex) => (hex, true),
            None => (rest, false),
        };
        let id = format!("blake3:{hex}");
        if !is_identity(&id) || live.contains(&id) {
            continue;
        }
        if marker {
            if !dir.join(stored_name(&id)).exists() && age(&path).is_some_and(|a| a >= keep) {
                let _ = std::fs::remove_file(&path);
            }
            continue;
        }
        // No marker: being put there right now (it is written before the rename).
        let marker = dir.join(format!("{name}.used"));
        if age(&marker).is_some_and(|a| a >= keep) {
            log::info!(
                "nbd: {id}: unused for {keep} s; removed from {}",
                dir.display()
            );
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::remove_file(marker);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Condvar;

    fn export(path: &Path) -> Export {
        Export {
            name: "root".into(),
            path: path.to_path_buf(),
        }
    }

    fn id_of(data: &[u8]) -> String {
        format!("blake3:{}", blake3::hash(data).to_hex())
    }

    fn status() -> Arc<Status> {
        Status::new(["root".to_string()])
    }

    fn read_all(v: &Version) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut b = vec![0u8; v.size as usize];
        v.file.read_exact_at(&mut b, 0).unwrap();
        b
    }

    async fn known(vs: &Versions, e: &Export) -> Version {
        for _ in 0..500 {
            let v = vs.current(e, Duration::from_millis(20)).await.unwrap();
            if matches!(v.identity, Identity::Known(_)) {
                return v;
            }
        }
        panic!("never hashed");
    }

    /// A directory with `root.img` holding `data`, its export, and a server over it whose
    /// current version is hashed.
    async fn serving(
        data: &[u8],
        retention: Duration,
    ) -> (tempfile::TempDir, PathBuf, Export, Arc<Versions>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.img");
        std::fs::write(&path, data).unwrap();
        let e = export(&path);
        let vs = Versions::new(vec![e.clone()], None, retention, status());
        vs.refresh(&e);
        drop(known(&vs, &e).await);
        (dir, path, e, vs)
    }

    async fn until(what: &str, mut cond: impl FnMut() -> bool) {
        for _ in 0..1000 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never: {what}");
    }

    fn replace(path: &Path, data: &[u8]) {
        let tmp = path.with_extension("new");
        std::fs::write(&tmp, data).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    /// Makes a stored version look unused for `secs` (its marker's mtime).
    fn backdate(store: &Path, id: &str, secs: u64) {
        let m = store.join(format!("{}.used", stored_name(id)));
        let f = File::options().write(true).open(m).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(secs))
            .unwrap();
    }

    /// A hasher held back until `open` is set.
    fn gated() -> (Arc<(Mutex<bool>, Condvar)>, Box<Hasher>) {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let g = gate.clone();
        let h: Box<Hasher> = Box::new(move |f, done| {
            let (m, c) = &*g;
            let _open = c.wait_while(m.lock().unwrap(), |open| !*open).unwrap();
            hash_file(f, done)
        });
        (gate, h)
    }

    fn open_gate(gate: &(Mutex<bool>, Condvar)) {
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
    }

    /// A new image renamed over the path becomes current; the old one is still served by
    /// its identity, from the open file and, after a restart, from the store.
    #[tokio::test]
    async fn a_swapped_out_version_stays_available_by_identity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.img");
        std::fs::write(&path, b"version one").unwrap();
        let e = export(&path);
        let vs = Versions::new(vec![e.clone()], None, Duration::from_secs(3600), status());
        vs.refresh(&e);
        let v1 = known(&vs, &e).await;
        assert_eq!(v1.identity, Identity::Known(id_of(b"version one")));
        drop(v1);
        replace(&path, b"version two!");
        vs.refresh(&e);
        let v2 = known(&vs, &e).await;
        assert_eq!(v2.identity, Identity::Known(id_of(b"version two!")));
        let old = vs.get(&id_of(b"version one")).expect("the old version");
        assert_eq!(read_all(&old), b"version one");
        assert!(vs.get(&id_of(b"never served")).is_none());
        assert!(vs.get("blake3:../../etc/passwd").is_none());
        let stored = dir
            .path()
            .join(".ltsp-versions")
            .join(stored_name(&id_of(b"version one")));
        until("v1 stored", || stored.exists()).await;
        assert_eq!(std::fs::read(&stored).unwrap(), b"version one");
        let restarted = Versions::new(vec![e.clone()], None, Duration::from_secs(3600), status());
        let again = restarted
            .get(&id_of(b"version one"))
            .expect("from the store");
        assert_eq!(read_all(&again), b"version one");
    }

    /// An image rewritten in place (cp over it, rsync --inplace) must never be served
    /// under the identity of the bytes it held: the store's copy is, or nothing.
    #[tokio::test]
    async fn a_rewrite_in_place_never_changes_a_version() {
        let (dir, path, e, vs) = serving(b"version one", Duration::from_secs(3600)).await;
        let v1 = id_of(b"version one");
        let stored = dir.path().join(".ltsp-versions").join(stored_name(&v1));
        until("v1 stored", || stored.exists()).await;
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&path, b"VERSION TWO").unwrap(); // same inode, same size
        let got = vs.get(&v1).expect("served from the store");
        assert_eq!(read_all(&got), b"version one");
        assert_eq!(std::fs::read(&stored).unwrap(), b"version one");
        // The path's new bytes get an identity of their own.
        vs.refresh(&e);
        let now = known(&vs, &e).await;
        assert_eq!(now.identity, Identity::Known(id_of(b"VERSION TWO")));
    }

    /// Two servers sharing a store: one that never had a version serves it.
    #[tokio::test]
    async fn servers_sharing_a_store_serve_each_others_versions() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let shared = tempfile::tempdir().unwrap();
        std::fs::write(a.path().join("root.img"), b"v1 bytes").unwrap();
        std::fs::write(b.path().join("root.img"), b"v2 bytes").unwrap();
        let ea = export(&a.path().join("root.img"));
        let eb = export(&b.path().join("root.img"));
        let hour = Duration::from_secs(3600);
        let va = Versions::new(vec![ea.clone()], Some(shared.path().into()), hour, status());
        let vb = Versions::new(vec![eb.clone()], Some(shared.path().into()), hour, status());
        va.refresh(&ea);
        vb.refresh(&eb);
        known(&va, &ea).await;
        known(&vb, &eb).await;
        let id1 = id_of(b"v1 bytes");
        until("v1 in the shared store", || {
            shared.path().join(stored_name(&id1)).exists()
        })
        .await;
        let got = vb.get(&id1).expect("v1 through the shared store");
        assert_eq!(read_all(&got), b"v1 bytes");
    }

    /// Retention: a version in use is kept whatever its age; an unused one that is not
    /// current goes, from memory and (once no server marked it for the floor) the store;
    /// the current one always stays.
    #[tokio::test]
    async fn unused_versions_go_after_the_retention_time() {
        let (dir, path, e, vs) = serving(b"old", Duration::ZERO).await;
        let old = id_of(b"old");
        let store = dir.path().join(".ltsp-versions");
        until("old stored", || store.join(stored_name(&old)).exists()).await;
        replace(&path, b"new");
        vs.refresh(&e);
        drop(known(&vs, &e).await);
        let new = id_of(b"new");
        until("new stored", || store.join(stored_name(&new)).exists()).await;
        let using = vs.get(&old).expect("held");
        backdate(&store, &old, PRUNE_FLOOR + 1);
        vs.sweep();
        assert!(vs.get(&old).is_some(), "kept while a connection uses it");
        assert!(store.join(stored_name(&old)).exists());
        drop(using);
        backdate(&store, &old, PRUNE_FLOOR + 1);
        backdate(&store, &new, PRUNE_FLOOR + 1);
        vs.sweep();
        assert!(
            !store.join(stored_name(&old)).exists(),
            "gone from the store"
        );
        assert!(vs.get(&old).is_none(), "and from memory");
        assert!(vs.get(&new).is_some(), "the current version stays");
        assert!(store.join(stored_name(&new)).exists());
    }

    /// A restart with nodes reconnecting: they ask for v1 (from the store) before the
    /// start-up hash of the same bytes at the path is done. v1 is both, and stays alive
    /// (in memory and the store) while anything uses it.
    #[tokio::test]
    async fn one_identity_open_twice_is_alive_while_either_is_used() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.img");
        std::fs::write(&path, b"v1").unwrap();
        let e = export(&path);
        let v1 = id_of(b"v1");
        // A first server run stored v1.
        let first = Versions::new(vec![e.clone()], None, Duration::ZERO, status());
        first.refresh(&e);
        drop(known(&first, &e).await);
        let store = dir.path().join(".ltsp-versions");
        until("v1 stored", || store.join(stored_name(&v1)).exists()).await;
        let (gate, hasher) = gated();
        let vs = Versions::with_hasher(vec![e.clone()], None, Duration::ZERO, status(), hasher);
        vs.refresh(&e);
        let early = vs
            .get(&v1)
            .expect("from the store, while the path is hashed");
        drop(early);
        open_gate(&gate);
        let plain = known(&vs, &e).await; // a node on the plain name: v1, the path's file
        backdate(&store, &v1, PRUNE_FLOOR + 1);
        vs.sweep();
        assert!(vs.get(&v1).is_some(), "current: served by identity");
        assert!(
            store.join(stored_name(&v1)).exists(),
            "and kept in the store"
        );
        // No longer current, but a connection still reads it.
        replace(&path, b"v2");
        vs.refresh(&e);
        drop(known(&vs, &e).await);
        backdate(&store, &v1, PRUNE_FLOOR + 1);
        vs.sweep();
        assert!(vs.get(&v1).is_some(), "in use by a connection");
        assert!(store.join(stored_name(&v1)).exists());
        drop(plain);
    }

    /// A client that leaves while the hash runs does not cancel it; one that arrives
    /// meanwhile learns the progress instead of waiting.
    #[tokio::test]
    async fn hashing_runs_on_whoever_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.img");
        std::fs::write(&path, b"slow to hash").unwrap();
        let e = export(&path);
        let (gate, hasher) = gated();
        let vs = Versions::with_hasher(
            vec![e.clone()],
            Some(dir.path().join("store")),
            Duration::from_secs(60),
            status(),
            hasher,
        );
        vs.refresh(&e);
        // A client gives up (its handshake timed out) while waiting.
        let waited = tokio::time::timeout(
            Duration::from_millis(30),
            vs.current(&e, Duration::from_secs(60)),
        )
        .await;
        assert!(waited.is_err());
        let v = vs.current(&e, Duration::from_millis(10)).await.unwrap();
        assert!(
            matches!(v.identity, Identity::Hashing(p) if p < 100),
            "{:?}",
            v.identity
        );
        assert!(vs.status.health().is_err(), "not ready while hashing");
        open_gate(&gate);
        let v = known(&vs, &e).await;
        assert_eq!(v.identity, Identity::Known(id_of(b"slow to hash")));
        assert!(vs.status.health().is_ok());
    }

    /// A hash that failed (an I/O error) is tried again at the next look at the path.
    #[tokio::test]
    async fn a_failed_hash_is_tried_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.img");
        std::fs::write(&path, b"flaky disk").unwrap();
        let e = export(&path);
        let tries = Arc::new(AtomicUsize::new(0));
        let t = tries.clone();
        let vs = Versions::with_hasher(
            vec![e.clone()],
            None,
            Duration::from_secs(60),
            status(),
            Box::new(move |f, done| {
                if t.fetch_add(1, Ordering::SeqCst) == 0 {
                    Err(std::io::Error::other("EIO"))
                } else {
                    hash_file(f, done)
                }
            }),
        );
        vs.refresh(&e);
        let v = vs.current(&e, Duration::from_secs(5)).await.unwrap();
        assert_eq!(v.identity, Identity::Unknown);
        vs.refresh(&e);
        assert_eq!(
            known(&vs, &e).await.identity,
            Identity::Known(id_of(b"flaky disk"))
        );
        assert_eq!(tries.load(Ordering::SeqCst), 2);
    }

    /// The store holds only well-formed regular files: a symlink or a FIFO planted there
    /// is not served (and opening it neither follows nor blocks).
    #[tokio::test]
    async fn only_regular_files_in_the_store_are_versions() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        std::fs::create_dir_all(&store).unwrap();
        let e = export(&dir.path().join("root.img"));
        let vs = Versions::new(
            vec![e],
            Some(store.clone()),
            Duration::from_secs(60),
            status(),
        );
        let link = format!("blake3:{}", "1".repeat(64));
        std::os::unix::fs::symlink("/etc/passwd", store.join(stored_name(&link))).unwrap();
        assert!(vs.get(&link).is_none(), "a symlink");
        let fifo = format!("blake3:{}", "2".repeat(64));
        nix::unistd::mkfifo(
            &store.join(stored_name(&fifo)),
            nix::sys::stat::Mode::S_IRWXU,
        )
        .unwrap();
        assert!(vs.get(&fifo).is_none(), "a FIFO");
    }
}
