//! Image versions: an export serves every version it holds, each by its content identity,
//! so a node keeps reading the bytes it booted from whatever happens to the export's path.
//!
//! - The plain export name (`root`) is the file now at the export's path: its *current*
//!   version. A node's reconnect asks for `root@blake3:<hex>`, the version it runs.
//! - Each file version is hashed once, by a thread of its own started when the server
//!   starts and when the path changes (inotify, and a periodic check). No client waits in
//!   it or can cancel it; a client that needs the identity before it is known is told
//!   `hashing=NN%` in the description and retries.
//! - A version stays available while a connection uses it, then for the retention time:
//!   the server keeps the file open (a renamed-over image lives on as long as it is open),
//!   and stores it in a content-addressed directory (`blake3-<hex>`, hard-linked when on
//!   the same filesystem, else copied, then renamed into place). Servers that share that
//!   directory serve each other's versions: that is how a rolling upgrade strands no node.

use crate::config::Export;
use crate::identity::{hash_file, is_identity};
use crate::status::Status;
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// What a file version is, on disk: a rename or rewrite changes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Key {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
}

fn key_of(m: &std::fs::Metadata) -> Key {
    Key {
        dev: m.dev(),
        ino: m.ino(),
        size: m.len(),
        mtime: m.mtime(),
        mtime_nsec: m.mtime_nsec(),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One open file version and who uses it.
struct Rec {
    file: File,
    size: u64,
    users: AtomicUsize,
    /// Unix seconds when it was last in use (a user left, or it was current).
    last_used: AtomicU64,
}

/// A connection's use of a version: counted while it lives.
pub struct Use(Arc<Rec>);

impl Drop for Use {
    fn drop(&mut self) {
        self.0.last_used.store(unix_now(), Relaxed);
        self.0.users.fetch_sub(1, Relaxed);
    }
}

/// The identity of what a connection is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Known(String),
    /// Being hashed: the percentage done.
    Hashing(u8),
    /// Hashing failed (an I/O error); logged.
    Unknown,
}

/// An opened version, ready to serve.
pub struct Version {
    pub file: File,
    pub size: u64,
    pub identity: Identity,
    pub used: Use,
}

enum Hash {
    Running {
        done: Arc<AtomicU64>,
        ready: watch::Receiver<bool>,
    },
    Ready(String),
    Failed,
}

struct Current {
    key: Key,
    rec: Arc<Rec>,
    hash: Hash,
}

#[derive(Default)]
struct State {
    /// Export name -> the file now at its path.
    current: HashMap<String, Current>,
    /// Identity -> every version held, current ones included.
    held: HashMap<String, Arc<Rec>>,
}

/// How a file version is hashed: [`hash_file`]; tests hold it back to see a client arrive
/// while a hash runs.
type Hasher = dyn Fn(&File, &AtomicU64) -> std::io::Result<String> + Send + Sync;

pub struct Versions {
    exports: Vec<Export>,
    hasher: Box<Hasher>,
    /// The shared store, if set; else each export's `.ltsp-versions`.
    dir: Option<PathBuf>,
    retention: Duration,
    status: Arc<Status>,
    state: Mutex<State>,
}

/// A version's file name in a store.
fn stored_name(id: &str) -> String {
    format!("blake3-{}", &id[7..])
}

/// The store beside an export.
fn default_store(e: &Export) -> PathBuf {
    e.path
        .parent()
        .unwrap_or(Path::new("."))
        .join(".ltsp-versions")
}

impl Versions {
    pub fn new(
        exports: Vec<Export>,
        dir: Option<PathBuf>,
        retention: Duration,
        status: Arc<Status>,
    ) -> Arc<Self> {
        Arc::new(Versions {
            exports,
            hasher: Box::new(hash_file),
            dir,
            retention,
            status,
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stores(&self) -> Vec<PathBuf> {
        match &self.dir {
            Some(d) => vec![d.clone()],
            None => {
                let mut v: Vec<PathBuf> = self.exports.iter().map(default_store).collect();
                v.dedup();
                v
            }
        }
    }

    fn store_for(&self, e: &Export) -> PathBuf {
        self.dir.clone().unwrap_or_else(|| default_store(e))
    }

    /// Hashes every export now and follows their paths from here on: inotify for renames
    /// and completed writes, and a check every `min(60 s, retention / 2)` for anything
    /// inotify cannot see (a symlink switched elsewhere). Needs a tokio runtime.
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
                // Stats, opens and directory scans: off the runtime's workers.
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
    /// name appears.
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
            match ino.add_watch(
                &dir,
                AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_CLOSE_WRITE,
            ) {
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

    /// Looks at the export's path; a new file version there becomes current and is
    /// hashed by a thread of its own, which no client can cancel.
    pub fn refresh(self: &Arc<Self>, e: &Export) {
        // A stat first: the common case (nothing changed) opens nothing.
        if let Ok(m) = std::fs::metadata(&e.path) {
            let key = key_of(&m);
            if self
                .lock()
                .current
                .get(&e.name)
                .is_some_and(|c| c.key == key)
            {
                return;
            }
        }
        let file = match File::open(&e.path) {
            Ok(f) => f,
            Err(err) => {
                log::warn!("nbd: export {:?}: {}: {err}", e.name, e.path.display());
                return;
            }
        };
        let Ok(meta) = file.metadata() else { return };
        let key = key_of(&meta);
        let rec = Arc::new(Rec {
            file,
            size: meta.len(),
            users: AtomicUsize::new(0),
            last_used: AtomicU64::new(unix_now()),
        });
        let (tx, ready) = watch::channel(false);
        let done = Arc::new(AtomicU64::new(0));
        {
            let mut st = self.lock();
            if st.current.get(&e.name).is_some_and(|c| c.key == key) {
                return;
            }
            if let Some(old) = st.current.get(&e.name) {
                // No longer current: its retention starts now.
                old.rec.last_used.store(unix_now(), Relaxed);
                log::info!(
                    "nbd: export {:?}: a new image at {}; hashing it",
                    e.name,
                    e.path.display()
                );
            }
            st.current.insert(
                e.name.clone(),
                Current {
                    key,
                    rec: rec.clone(),
                    hash: Hash::Running {
                        done: done.clone(),
                        ready,
                    },
                },
            );
        }
        let me = self.clone();
        let e = e.clone();
        let spawned = std::thread::Builder::new()
            .name("ltsp-hash".into())
            .spawn(move || me.hash(e, key, rec, done, tx));
        if let Err(err) = spawned {
            log::error!("nbd: cannot start hashing: {err}");
        }
    }

    fn hash(
        &self,
        e: Export,
        key: Key,
        rec: Arc<Rec>,
        done: Arc<AtomicU64>,
        tx: watch::Sender<bool>,
    ) {
        let t = std::time::Instant::now();
        let r = (self.hasher)(&rec.file, &done);
        let id = {
            let mut st = self.lock();
            let id = match r {
                Ok(id) => {
                    st.held.entry(id.clone()).or_insert_with(|| rec.clone());
                    Some(id)
                }
                Err(err) => {
                    log::error!("nbd: export {:?}: hashing the image: {err}", e.name);
                    None
                }
            };
            if let Some(c) = st.current.get_mut(&e.name).filter(|c| c.key == key) {
                c.hash = id.clone().map_or(Hash::Failed, Hash::Ready);
                if let Some(id) = &id {
                    self.status.export_ready(&e.name, id);
                }
            }
            id
        };
        let _ = tx.send(true);
        let Some(id) = id else { return };
        log::info!(
            "nbd: export {:?}: {id} ({} bytes, hashed in {:.2} s)",
            e.name,
            rec.size,
            t.elapsed().as_secs_f64()
        );
        self.publish();
        let store = self.store_for(&e);
        if let Err(err) = put(&store, &id, &rec.file) {
            log::warn!(
                "nbd: export {:?}: keeping {id} in {}: {err}; it lasts only while this \
                 server runs",
                e.name,
                store.display()
            );
        }
    }

    /// The export's current version, as last looked at (see [`Versions::refresh`]).
    /// `wait`: how long a client that needs the identity waits for a hash in progress
    /// before it is told to retry.
    pub async fn current(&self, e: &Export, wait: Duration) -> Option<Version> {
        let (rec, ready) = {
            let st = self.lock();
            let c = st.current.get(&e.name)?;
            let ready = match &c.hash {
                Hash::Running { ready, .. } => Some(ready.clone()),
                _ => None,
            };
            (c.rec.clone(), ready)
        };
        if let (Some(mut ready), false) = (ready, wait.is_zero()) {
            let _ = tokio::time::timeout(wait, ready.wait_for(|d| *d)).await;
        }
        let st = self.lock();
        // The hash of this file version (the path may have changed meanwhile).
        let identity = match st.current.get(&e.name) {
            Some(c) if Arc::ptr_eq(&c.rec, &rec) => match &c.hash {
                Hash::Ready(id) => Identity::Known(id.clone()),
                Hash::Failed => Identity::Unknown,
                Hash::Running { done, .. } => Identity::Hashing(
                    (done.load(Relaxed).saturating_mul(100) / rec.size.max(1)).min(99) as u8,
                ),
            },
            _ => st
                .held
                .iter()
                .find(|(_, r)| Arc::ptr_eq(r, &rec))
                .map_or(Identity::Unknown, |(id, _)| Identity::Known(id.clone())),
        };
        drop(st);
        open_rec(&rec, identity)
    }

    /// The version with identity `id`, if this server holds it (open, or in a store).
    pub fn get(&self, id: &str) -> Option<Version> {
        if !is_identity(id) {
            return None;
        }
        let held = self.lock().held.get(id).cloned();
        let rec = match held {
            Some(r) => r,
            None => {
                let (file, path) = self
                    .stores()
                    .into_iter()
                    .map(|d| d.join(stored_name(id)))
                    .find_map(|p| File::open(&p).ok().map(|f| (f, p)))?;
                let size = file.metadata().ok()?.len();
                log::info!("nbd: serving {id} from {}", path.display());
                let rec = Arc::new(Rec {
                    file,
                    size,
                    users: AtomicUsize::new(0),
                    last_used: AtomicU64::new(unix_now()),
                });
                let rec = self
                    .lock()
                    .held
                    .entry(id.to_string())
                    .or_insert(rec)
                    .clone();
                self.publish();
                rec
            }
        };
        open_rec(&rec, Identity::Known(id.to_string()))
    }

    /// Forgets versions no connection has used for the retention time (current ones are
    /// always kept), in memory and in the stores, and marks the ones in use as used now,
    /// for every server sharing the store.
    pub fn sweep(&self) {
        let now = unix_now();
        let keep = self.retention.as_secs();
        let in_use: Vec<String> = {
            let mut st = self.lock();
            let current: Vec<Arc<Rec>> = st.current.values().map(|c| c.rec.clone()).collect();
            for r in &current {
                r.last_used.store(now, Relaxed);
            }
            st.held.retain(|id, r| {
                let live = r.users.load(Relaxed) > 0
                    || current.iter().any(|c| Arc::ptr_eq(c, r))
                    || now.saturating_sub(r.last_used.load(Relaxed)) < keep;
                if !live {
                    log::info!("nbd: {id}: unused for {keep} s; no longer served");
                }
                live
            });
            st.held
                .iter()
                .filter(|(_, r)| {
                    r.users.load(Relaxed) > 0 || current.iter().any(|c| Arc::ptr_eq(c, r))
                })
                .map(|(id, _)| id.clone())
                .collect()
        };
        self.publish();
        let held: std::collections::HashSet<String> = self.lock().held.keys().cloned().collect();
        for dir in self.stores() {
            for id in &in_use {
                mark_used(&dir, id);
            }
            prune(&dir, keep, &held);
        }
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
                    .filter(|(_, c)| matches!(&c.hash, Hash::Ready(x) if x == id))
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
    rec.users.fetch_add(1, Relaxed);
    Some(Version {
        file,
        size: rec.size,
        identity,
        used: Use(rec.clone()),
    })
}

/// Puts version `id` (the bytes of `file`) into the store at `dir`, atomically: a hard
/// link when the store is on the same filesystem, else a copy; under a temporary name,
/// then renamed into place, so a reader never sees part of a version.
fn put(dir: &Path, id: &str, file: &File) -> std::io::Result<()> {
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
    let tmp = dir.join(format!(".tmp-{}-{}-{nanos}", &id[7..], std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    // The open file, not the path: the path may hold another image by now.
    let by_fd = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    let linked = nix::unistd::linkat(
        None,
        &by_fd,
        None,
        &tmp,
        nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW,
    );
    if linked.is_err() {
        // Another filesystem, or a file already renamed over (no name left to link).
        let r = (|| {
            let mut src = File::open(&by_fd)?;
            let mut out = File::create(&tmp)?;
            std::io::copy(&mut src, &mut out)?;
            out.sync_all()
        })();
        if let Err(e) = r {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    }
    std::fs::rename(&tmp, &dst)?;
    mark_used(dir, id);
    log::info!("nbd: {id} kept in {}", dir.display());
    Ok(())
}

/// A version's last use, for every server sharing the store: the mtime of a marker file
/// beside it (the image's own mtime is left alone: it may be an export's hard link).
fn mark_used(dir: &Path, id: &str) {
    let m = dir.join(format!("{}.used", stored_name(id)));
    let r = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&m)
        .and_then(|f| f.set_modified(SystemTime::now()));
    if let Err(e) = r {
        log::debug!("nbd: {}: {e}", m.display());
    }
}

/// Removes stored versions that no server marked used for `keep` seconds and that this
/// server does not hold. Names that are not ours are left alone.
fn prune(dir: &Path, keep: u64, held: &std::collections::HashSet<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let now = SystemTime::now();
    for ent in entries.flatten() {
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with(".tmp-") {
            // A copy that a server stopped in the middle of, a day ago or more.
            let old = ent
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| now.duration_since(t).is_ok_and(|d| d.as_secs() > 86_400));
            if old {
                let _ = std::fs::remove_file(ent.path());
            }
            continue;
        }
        let Some(hex) = name.strip_prefix("blake3-") else {
            continue;
        };
        let id = format!("blake3:{hex}");
        if !is_identity(&id) || held.contains(&id) {
            continue;
        }
        let marker = dir.join(format!("{name}.used"));
        let used = std::fs::metadata(&marker)
            .or_else(|_| ent.metadata())
            .and_then(|m| m.modified());
        let Ok(used) = used else { continue };
        if now.duration_since(used).is_ok_and(|d| d.as_secs() >= keep) {
            log::info!(
                "nbd: {id}: unused for {keep} s; removed from {}",
                dir.display()
            );
            let _ = std::fs::remove_file(ent.path());
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

    /// A new image renamed over the path becomes current; the old one is still served by
    /// its identity, from the open file (no store) and from the store (after a restart).
    #[tokio::test]
    async fn a_swapped_out_version_stays_available_by_identity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.img");
        std::fs::write(&path, b"version one").unwrap();
        let e = export(&path);
        let vs = Versions::new(
            vec![e.clone()],
            None,
            Duration::from_secs(3600),
            Status::new(["root".to_string()]),
        );
        vs.refresh(&e);
        let v1 = known(&vs, &e).await;
        assert_eq!(v1.identity, Identity::Known(id_of(b"version one")));
        drop(v1);
        let new = dir.path().join("new.img");
        std::fs::write(&new, b"version two!").unwrap();
        std::fs::rename(&new, &path).unwrap();
        vs.refresh(&e);
        let v2 = known(&vs, &e).await;
        assert_eq!(v2.identity, Identity::Known(id_of(b"version two!")));
        let old = vs
            .get(&id_of(b"version one"))
            .expect("the old version, by identity");
        assert_eq!(read_all(&old), b"version one");
        assert!(vs.get(&id_of(b"never served")).is_none());
        assert!(vs.get("blake3:../../etc/passwd").is_none());
        // Stored beside the export, content-addressed: a new server process finds it.
        let stored = dir
            .path()
            .join(".ltsp-versions")
            .join(stored_name(&id_of(b"version one")));
        for _ in 0..500 {
            if stored.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(std::fs::read(&stored).unwrap(), b"version one");
        let restarted = Versions::new(
            vec![e.clone()],
            None,
            Duration::from_secs(3600),
            Status::new(["root".to_string()]),
        );
        let again = restarted
            .get(&id_of(b"version one"))
            .expect("from the store");
        assert_eq!(read_all(&again), b"version one");
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
        let st = || Status::new(["root".to_string()]);
        let va = Versions::new(
            vec![ea.clone()],
            Some(shared.path().into()),
            Duration::from_secs(60),
            st(),
        );
        let vb = Versions::new(
            vec![eb.clone()],
            Some(shared.path().into()),
            Duration::from_secs(60),
            st(),
        );
        va.refresh(&ea);
        vb.refresh(&eb);
        known(&va, &ea).await;
        known(&vb, &eb).await;
        let id1 = id_of(b"v1 bytes");
        let mut got = None;
        for _ in 0..500 {
            got = vb.get(&id1);
            if got.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            read_all(&got.expect("v1 through the shared store")),
            b"v1 bytes"
        );
    }

    /// Retention: a version in use is kept whatever its age; an unused one that is not
    /// current goes, from memory and from the store; the current one always stays.
    #[tokio::test]
    async fn unused_versions_go_after_the_retention_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.img");
        std::fs::write(&path, b"old").unwrap();
        let e = export(&path);
        let vs = Versions::new(
            vec![e.clone()],
            None,
            Duration::ZERO,
            Status::new(["root".to_string()]),
        );
        vs.refresh(&e);
        drop(known(&vs, &e).await);
        let old = id_of(b"old");
        let stored = dir.path().join(".ltsp-versions").join(stored_name(&old));
        for _ in 0..500 {
            if stored.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let tmp = dir.path().join("tmp.img");
        std::fs::write(&tmp, b"new").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        vs.refresh(&e);
        drop(known(&vs, &e).await);
        let using = vs.get(&old).expect("held");
        vs.sweep();
        assert!(vs.get(&old).is_some(), "kept while a connection uses it");
        drop(using);
        vs.sweep();
        assert!(
            vs.get(&old).is_none(),
            "gone once unused past the retention"
        );
        assert!(!stored.exists(), "and from the store");
        assert!(
            vs.get(&id_of(b"new")).is_some(),
            "the current version stays"
        );
    }

    /// A client that leaves while the hash runs does not cancel it; one that arrives
    /// meanwhile learns the progress instead of waiting.
    #[tokio::test]
    async fn hashing_runs_on_whoever_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.img");
        std::fs::write(&path, b"slow to hash").unwrap();
        let e = export(&path);
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let g = gate.clone();
        let mut vs = Versions {
            exports: vec![e.clone()],
            hasher: Box::new(move |f, done| {
                let (m, c) = &*g;
                let _open = c.wait_while(m.lock().unwrap(), |open| !*open).unwrap();
                hash_file(f, done)
            }),
            dir: None,
            retention: Duration::from_secs(60),
            status: Status::new(["root".to_string()]),
            state: Mutex::new(State::default()),
        };
        vs.dir = Some(dir.path().join("store"));
        let vs = Arc::new(vs);
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
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        let v = known(&vs, &e).await;
        assert_eq!(v.identity, Identity::Known(id_of(b"slow to hash")));
        assert!(vs.status.health().is_ok());
    }
}
