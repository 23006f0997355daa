//! The seam between the boot logic and the kernel: every syscall that changes the machine
//! (mounts, chroot, module loading, exec) goes through [`System`]. [`Real`] makes the
//! syscalls; [`Recorder`] records them so the boot plan is unit-tested without root.

use nix::mount::MsFlags;
use std::collections::BTreeSet;
use std::ffi::CString;
use std::io;
use std::os::fd::RawFd;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub trait System {
    fn mount(
        &self,
        source: &str,
        target: &str,
        fstype: &str,
        flags: MsFlags,
        data: &str,
    ) -> io::Result<()>;
    fn mkdir(&self, path: &str) -> io::Result<()>;
    /// Detaches the mount at `target` (MNT_DETACH).
    fn umount(&self, target: &str) -> io::Result<()>;
    fn chdir(&self, path: &str) -> io::Result<()>;
    fn chroot(&self, path: &str) -> io::Result<()>;
    fn exists(&self, path: &str) -> bool;
    /// finit_module; `Ok` also when the module is already loaded.
    fn load_module(&self, path: &Path, params: &str) -> io::Result<()>;
    /// Deletes the initramfs's files (same device as `/`, not below other mounts).
    fn free_initramfs(&self, keep: &str) -> io::Result<()>;
    /// Runs a program in its own process group (chrooted into `root` if given) until it
    /// exits or `limit.timeout` passes; then the group gets SIGTERM, and SIGKILL after
    /// `limit.grace`. The program may write progress lines to descriptor 3.
    fn run(
        &self,
        root: Option<&str>,
        argv: &[String],
        env: &[(String, String)],
        limit: Limit,
    ) -> io::Result<Outcome>;
    /// Starts this program again as a detached helper named `argv0`, in the idle
    /// scheduling class (it raises itself once set up) and exempt from the OOM killer,
    /// passing it the descriptors `keep`; returns its pid.
    fn spawn(&self, argv0: &str, args: &[String], keep: &[RawFd]) -> io::Result<u32>;
    /// Replaces this process; returns only on failure.
    fn exec(&self, argv: &[String], env: &[(String, String)]) -> io::Error;
    /// Stops a child this process spawned: SIGTERM, SIGKILL after `grace`, then reaped.
    fn stop(&self, pid: u32, grace: Duration) -> io::Result<()>;
    /// A loop device over `file` (read-only if asked); returns its path. Not autocleared:
    /// the device would go as soon as this call closes it, before anything mounts it, and
    /// a root's loop device lives as long as the node.
    fn attach_loop(&self, file: &str, read_only: bool) -> io::Result<String>;
    /// A read-only device-mapper device `name` with the dm-verity `table`; returns its
    /// path (/dev/dm-N).
    fn map_verity(
        &self,
        name: &str,
        table: &crate::verity::VerityTable,
    ) -> Result<String, crate::verity::DmError>;
}

pub struct Real;

/// How long [`System::run`] lets a program run, and how long a signal has to work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub timeout: Duration,
    pub grace: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Its exit code; 128 + the signal's number when a signal ended it.
    Exited(i32),
    /// Still running at the timeout; its process group was killed.
    TimedOut {
        /// The last line it wrote to descriptor 3.
        progress: Option<String>,
        /// SIGTERM was not enough: the group outlived the grace and got SIGKILL.
        sigkill: bool,
        /// Processes of the group still there a grace after SIGKILL (stuck in the kernel,
        /// in uninterruptible sleep): left behind, not waited for.
        left: bool,
    },
}

/// Takes ownership of descriptor `fd`, handed over by the parent, once fstat shows it is
/// open and of the file type `kind` (`S_IFSOCK`, `S_IFCHR`); `what` names that type in
/// the error.
pub fn adopt_inherited(
    fd: RawFd,
    kind: nix::libc::mode_t,
    what: &str,
) -> Result<std::os::fd::OwnedFd, String> {
    use std::os::fd::{FromRawFd, OwnedFd};
    if fd < 3 {
        return Err("not an inherited descriptor".into());
    }
    // fstat fails cleanly on a closed descriptor.
    let st = nix::sys::stat::fstat(fd).map_err(|e| e.to_string())?;
    if st.st_mode & nix::libc::S_IFMT != kind {
        return Err(format!("not a {what}"));
    }
    // SAFETY: the parent passed this descriptor to this process alone; nothing else here
    // owns it, and from now on the OwnedFd closes it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// sched_setscheduler(2) for this process, priority 0. A raw system call: musl's wrapper
/// always fails with ENOSYS. Async-signal-safe (used between fork and exec).
pub fn set_scheduler(policy: i32) -> io::Result<()> {
    // The kernel's struct sched_param is one int.
    let priority: nix::libc::c_int = 0;
    // SAFETY: the kernel reads one int through the pointer during the call only.
    let r = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_sched_setscheduler,
            0,
            policy,
            &priority as *const nix::libc::c_int,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The pointer array execve takes: each string's, then NULL. Valid while `v` lives.
fn null_terminated(v: &[CString]) -> Vec<*const nix::libc::c_char> {
    v.iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in argument"))
}

impl System for Real {
    fn mount(
        &self,
        source: &str,
        target: &str,
        fstype: &str,
        flags: MsFlags,
        data: &str,
    ) -> io::Result<()> {
        let fstype = (!fstype.is_empty()).then_some(fstype);
        let data = (!data.is_empty()).then_some(data);
        nix::mount::mount(Some(source), target, fstype, flags, data).map_err(io::Error::from)
    }

    fn umount(&self, target: &str) -> io::Result<()> {
        nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH).map_err(io::Error::from)
    }
    fn mkdir(&self, path: &str) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn chdir(&self, path: &str) -> io::Result<()> {
        nix::unistd::chdir(path).map_err(io::Error::from)
    }

    fn chroot(&self, path: &str) -> io::Result<()> {
        nix::unistd::chroot(path).map_err(io::Error::from)
    }

    fn exists(&self, path: &str) -> bool {
        Path::new(path).exists()
    }

    fn load_module(&self, path: &Path, params: &str) -> io::Result<()> {
        use nix::kmod::{finit_module, ModuleInitFlags};
        let f = std::fs::File::open(path)?;
        // Compressed modules are decompressed by the kernel (CONFIG_MODULE_DECOMPRESS).
        let flags = match crate::modules::Compression::of(path) {
            Some(crate::modules::Compression::None) | None => ModuleInitFlags::empty(),
            Some(_) => ModuleInitFlags::from_bits_retain(4), // MODULE_INIT_COMPRESSED_FILE
        };
        match finit_module(&f, &cstr(params)?, flags) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn free_initramfs(&self, keep: &str) -> io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let dev = std::fs::symlink_metadata("/")?.dev();
        fn walk(dir: &Path, dev: u64, keep: &Path) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for e in entries.flatten() {
                let p = e.path();
                let Ok(m) = std::fs::symlink_metadata(&p) else {
                    continue;
                };
                if p == keep || m.dev() != dev {
                    continue;
                }
                if m.is_dir() {
                    walk(&p, dev, keep);
                    let _ = std::fs::remove_dir(&p);
                } else {
                    let _ = std::fs::remove_file(&p);
                }
            }
        }
        walk(Path::new("/"), dev, Path::new(keep));
        Ok(())
    }

    fn run(
        &self,
        root: Option<&str>,
        argv: &[String],
        env: &[(String, String)],
        limit: Limit,
    ) -> io::Result<Outcome> {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let deadline = Instant::now() + limit.timeout;
        // Orphans of the group (a killed shell's children) become ours to reap, as they
        // are when this is PID 1.
        // SAFETY: prctl with integer arguments only.
        unsafe {
            nix::libc::prctl(nix::libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        }
        let (progress_r, progress_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        let w = progress_w.as_raw_fd();
        let mut cmd = std::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .env_clear()
            .envs(env.iter().cloned())
            .process_group(0);
        let root = root.map(cstr).transpose()?;
        // SAFETY: between fork and exec only async-signal-safe calls (dup2, fcntl, chroot,
        // chdir) on values made before the fork.
        unsafe {
            cmd.pre_exec(move || {
                // Descriptor 3 is the progress pipe, without close-on-exec.
                if w == 3 {
                    nix::libc::fcntl(3, nix::libc::F_SETFD, 0);
                } else if nix::libc::dup2(w, 3) < 0 {
                    return Err(io::Error::last_os_error());
                }
                if let Some(root) = &root {
                    nix::unistd::chroot(root.as_c_str())?;
                    nix::unistd::chdir("/")?;
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        drop(progress_w);
        let pid = child.id() as i32;
        let mut progress = Progress::new(progress_r);
        let pidfd = pidfd_open(pid);
        if let Some(st) = wait_until(&mut child, pidfd.as_ref(), &mut progress, deadline)? {
            return Ok(Outcome::Exited(exit_code(st)));
        }
        // The timeout: the whole group, so a shell's children go too.
        let group = nix::unistd::Pid::from_raw(-pid);
        let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGTERM);
        let mut sigkill = false;
        if !group_gone(pid, Instant::now() + limit.grace) {
            sigkill = true;
            let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
        }
        let left = sigkill && !group_gone(pid, Instant::now() + limit.grace);
        progress.read_available();
        Ok(Outcome::TimedOut {
            progress: progress.last(),
            sigkill,
            left,
        })
    }

    fn spawn(&self, argv0: &str, args: &[String], keep: &[RawFd]) -> io::Result<u32> {
        use std::os::fd::AsRawFd;
        use std::os::unix::ffi::OsStrExt;
        // Everything the child needs is made before fork: between fork and exec it may
        // only make async-signal-safe calls, and allocating is not one.
        let argv: Vec<CString> = std::iter::once(argv0)
            .chain(args.iter().map(String::as_str))
            .map(cstr)
            .collect::<io::Result<_>>()?;
        let envp: Vec<CString> = std::env::vars_os()
            .filter_map(|(k, v)| {
                let mut kv = k.as_bytes().to_vec();
                kv.push(b'=');
                kv.extend_from_slice(v.as_bytes());
                CString::new(kv).ok()
            })
            .collect();
        let (argv_p, envp_p) = (null_terminated(&argv), null_terminated(&envp));
        // Opened now: the child may first run after the switch has moved /proc and /dev
        // out of its root. /proc/self/exe is this binary even once its file is deleted.
        let exe = std::fs::File::open("/proc/self/exe")?;
        let null = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")?;
        let console = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/console")
            .ok();
        let (exe_fd, null_fd) = (exe.as_raw_fd(), null.as_raw_fd());
        let console_fd = console.as_ref().map_or(-1, |c| c.as_raw_fd());
        let failed =
            b"ltsp-agent: WARNING the reconnect helper could not be started (exec failed)\n";
        // SAFETY: the child makes only async-signal-safe system calls (sched_setscheduler,
        // setpgid, dup2, fcntl, execveat, write, _exit) on values made before the fork, then
        // execs or exits; the parent returns at once. No exec-error pipe, so the boot does
        // not wait for the exec: the child runs it in the idle class, when the CPU is free.
        match unsafe { nix::unistd::fork() }.map_err(io::Error::from)? {
            nix::unistd::ForkResult::Child => unsafe {
                let _ = set_scheduler(nix::libc::SCHED_IDLE);
                // Its own process group: signals for the boot script's group miss it.
                nix::libc::setpgid(0, 0);
                for fd in 0..3 {
                    nix::libc::dup2(null_fd, fd);
                }
                for &fd in keep {
                    nix::libc::fcntl(fd, nix::libc::F_SETFD, 0);
                }
                nix::libc::syscall(
                    nix::libc::SYS_execveat,
                    exe_fd,
                    c"".as_ptr(),
                    argv_p.as_ptr(),
                    envp_p.as_ptr(),
                    nix::libc::AT_EMPTY_PATH,
                );
                if console_fd >= 0 {
                    nix::libc::write(console_fd, failed.as_ptr().cast(), failed.len());
                }
                nix::libc::_exit(127)
            },
            nix::unistd::ForkResult::Parent { child } => {
                let pid = child.as_raw() as u32;
                // Exempt from the OOM killer before it runs at all (it is in the idle class).
                if let Err(e) = std::fs::write(format!("/proc/{pid}/oom_score_adj"), "-1000") {
                    log::warn!("{argv0}: oom_score_adj: {e}");
                }
                Ok(pid)
            }
        }
    }

    fn exec(&self, argv: &[String], env: &[(String, String)]) -> io::Error {
        let args: io::Result<Vec<CString>> = argv.iter().map(|a| cstr(a)).collect();
        let envs: io::Result<Vec<CString>> =
            env.iter().map(|(k, v)| cstr(&format!("{k}={v}"))).collect();
        match (args, envs) {
            (Ok(a), Ok(e)) if !a.is_empty() => match nix::unistd::execve(&a[0], &a, &e) {
                Ok(never) => match never {},
                Err(err) => err.into(),
            },
            (Err(e), _) | (_, Err(e)) => e,
            _ => io::Error::new(io::ErrorKind::InvalidInput, "empty argv"),
        }
    }

    fn stop(&self, pid: u32, grace: Duration) -> io::Result<()> {
        use nix::sys::signal::{kill, Signal};
        use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        kill(pid, Signal::SIGTERM)?;
        let until = Instant::now() + grace;
        loop {
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) if Instant::now() < until => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Ok(WaitStatus::StillAlive) => {
                    kill(pid, Signal::SIGKILL)?;
                    waitpid(pid, None)?;
                    return Ok(());
                }
                Ok(_) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn attach_loop(&self, file: &str, read_only: bool) -> io::Result<String> {
        loopdev::attach(Path::new(file), read_only)
    }

    fn map_verity(
        &self,
        name: &str,
        table: &crate::verity::VerityTable,
    ) -> Result<String, crate::verity::DmError> {
        crate::verity::dm::create_verity(name, table)
    }
}

/// The loop-device ioctls, from <linux/loop.h>: four calls did not justify a crate that
/// generates bindings with libclang at build time (loopdev, loopdev-3), on every build
/// host and for every cross target of this static binary.
mod loopdev {
    use std::fs::{File, OpenOptions};
    use std::io;
    use std::os::fd::AsRawFd;
    use std::path::Path;

    const LOOP_CTL_GET_FREE: nix::libc::Ioctl = 0x4C82;
    const LOOP_CONFIGURE: nix::libc::Ioctl = 0x4C0A;
    const LO_FLAGS_READ_ONLY: u32 = 1;
    const LO_NAME_SIZE: usize = 64;

    /// `struct loop_info64`.
    #[repr(C)]
    struct LoopInfo64 {
        lo_device: u64,
        lo_inode: u64,
        lo_rdevice: u64,
        lo_offset: u64,
        lo_sizelimit: u64,
        lo_number: u32,
        lo_encrypt_type: u32,
        lo_encrypt_key_size: u32,
        lo_flags: u32,
        lo_file_name: [u8; LO_NAME_SIZE],
        lo_crypt_name: [u8; LO_NAME_SIZE],
        lo_encrypt_key: [u8; 32],
        lo_init: [u64; 2],
    }

    /// `struct loop_config` (LOOP_CONFIGURE, Linux 5.8).
    #[repr(C)]
    struct LoopConfig {
        fd: u32,
        block_size: u32,
        info: LoopInfo64,
        reserved: [u64; 8],
    }

    // The kernel's sizes: a wrong layout must not compile.
    const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
    const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

    pub fn attach(file: &Path, read_only: bool) -> io::Result<String> {
        let backing = OpenOptions::new().read(true).write(!read_only).open(file)?;
        let ctl = File::open("/dev/loop-control")?;
        // Another process may take the free device between the two calls: a few tries.
        let mut last = io::Error::other("no free loop device");
        for _ in 0..8 {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
            let n = unsafe { nix::libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let path = format!("/dev/loop{n}");
            let dev = OpenOptions::new()
                .read(true)
                .write(!read_only)
                .open(&path)?;
            let mut info = LoopInfo64 {
                lo_device: 0,
                lo_inode: 0,
                lo_rdevice: 0,
                lo_offset: 0,
                lo_sizelimit: 0,
                lo_number: 0,
                lo_encrypt_type: 0,
                lo_encrypt_key_size: 0,
                lo_flags: if read_only { LO_FLAGS_READ_ONLY } else { 0 },
                lo_file_name: [0; LO_NAME_SIZE],
                lo_crypt_name: [0; LO_NAME_SIZE],
                lo_encrypt_key: [0; 32],
                lo_init: [0; 2],
            };
            let name = file.as_os_str().as_encoded_bytes();
            let k = name.len().min(LO_NAME_SIZE - 1);
            info.lo_file_name[..k].copy_from_slice(&name[..k]);
            let cfg = LoopConfig {
                fd: backing.as_raw_fd() as u32,
                block_size: 0,
                info,
                reserved: [0; 8],
            };
            // SAFETY: LOOP_CONFIGURE reads one `struct loop_config`, which `cfg` is (the
            // size is checked at compile time) and outlives the call.
            let r = unsafe { nix::libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &cfg) };
            if r == 0 {
                return Ok(path);
            }
            last = io::Error::last_os_error();
            if last.raw_os_error() != Some(nix::libc::EBUSY) {
                return Err(last);
            }
        }
        Err(last)
    }
}

fn exit_code(st: std::process::ExitStatus) -> i32 {
    st.code()
        .unwrap_or(128 + std::os::unix::process::ExitStatusExt::signal(&st).unwrap_or(0))
}

/// A pidfd for `pid`: readable once it exits. None on kernels before 5.3.
fn pidfd_open(pid: i32) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: a system call with integer arguments; a descriptor it returns is ours.
    let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid, 0) };
    (fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// What a program writes to its progress pipe; only the tail is kept.
struct Progress {
    fd: Option<std::os::fd::OwnedFd>,
    tail: Vec<u8>,
}

impl Progress {
    fn new(fd: std::os::fd::OwnedFd) -> Progress {
        let _ = nix::fcntl::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        );
        Progress {
            fd: Some(fd),
            tail: Vec::new(),
        }
    }

    fn read_available(&mut self) {
        let Some(fd) = &self.fd else { return };
        let mut buf = [0u8; 4096];
        loop {
            match nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(fd), &mut buf) {
                Ok(0) => {
                    self.fd = None;
                    return;
                }
                Ok(n) => {
                    self.tail.extend_from_slice(&buf[..n]);
                    // Bounded: a program writing without end costs 8 KiB at most.
                    if self.tail.len() > 8192 {
                        self.tail.drain(..self.tail.len() - 4096);
                    }
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(_) => return,
            }
        }
    }

    fn last(&self) -> Option<String> {
        let text = String::from_utf8_lossy(&self.tail);
        text.lines()
            .rev()
            .find(|l| !l.is_empty())
            .map(str::to_string)
    }
}

/// Waits for `child` to exit, reading its progress, until `deadline`; None: still running.
fn wait_until(
    child: &mut std::process::Child,
    pidfd: Option<&std::os::fd::OwnedFd>,
    progress: &mut Progress,
    deadline: Instant,
) -> io::Result<Option<std::process::ExitStatus>> {
    use nix::poll::{PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    loop {
        if let Some(st) = child.try_wait()? {
            progress.read_available();
            return Ok(Some(st));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        // Without a pidfd (an old kernel) the exit is seen at the next 10 ms tick.
        let left = deadline - now;
        let left = if pidfd.is_some() {
            left
        } else {
            left.min(Duration::from_millis(10))
        };
        let ms = PollTimeout::try_from(left.as_millis().clamp(1, 60_000) as i32)
            .unwrap_or(PollTimeout::MAX);
        let mut fds = Vec::with_capacity(2);
        if let Some(p) = pidfd {
            fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
        }
        if let Some(r) = &progress.fd {
            fds.push(PollFd::new(r.as_fd(), PollFlags::POLLIN));
        }
        match nix::poll::poll(&mut fds, ms) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        drop(fds);
        progress.read_available();
    }
}

/// Reaps the members of process group `pgid` that are our children (its leader, and as
/// a subreaper its orphans) until none is left or `deadline` passes; true: none left.
fn group_gone(pgid: i32, deadline: Instant) -> bool {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let group = nix::unistd::Pid::from_raw(-pgid);
    loop {
        loop {
            match waitpid(group, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => {}
            }
        }
        // kill(0) also finds zombies: the group is empty once all are reaped.
        if nix::sys::signal::kill(group, None) == Err(nix::errno::Errno::ESRCH) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Records every call as one line; `exists` answers from a set of paths, and calls whose
/// text contains one of `failures` fail with EIO. The boot plan is then a list of strings.
#[derive(Default)]
pub struct Recorder {
    pub calls: Mutex<Vec<String>>,
    pub present: Mutex<BTreeSet<String>>,
    pub failures: Vec<String>,
    /// What the kernel would make appear: when a module whose path contains the first
    /// string loads, the file (second) is written with the text (third), like a probe
    /// adding a device to sysfs.
    pub probes: Vec<(String, std::path::PathBuf, String)>,
    /// Copies of the descriptors a spawned helper would have kept, for the test to read.
    pub kept: Mutex<Vec<std::os::fd::OwnedFd>>,
}

impl Recorder {
    fn record(&self, call: String) -> io::Result<()> {
        let fail = self.failures.iter().any(|f| call.contains(f.as_str()));
        self.calls.lock().unwrap().push(call);
        if fail {
            Err(io::Error::from_raw_os_error(5))
        } else {
            Ok(())
        }
    }

    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

impl System for Recorder {
    fn mount(
        &self,
        source: &str,
        target: &str,
        fstype: &str,
        flags: MsFlags,
        data: &str,
    ) -> io::Result<()> {
        let names: Vec<&str> = flags.iter_names().map(|(n, _)| n).collect();
        let flags = if names.is_empty() {
            "(empty)".to_string()
        } else {
            names.join(" | ")
        };
        let r = self.record(
            format!("mount {source} {target} {fstype} {flags} {data}")
                .trim_end()
                .to_string(),
        );
        if r.is_ok() {
            self.present.lock().unwrap().insert(target.to_string());
        }
        r
    }
    fn umount(&self, target: &str) -> io::Result<()> {
        self.present.lock().unwrap().remove(target);
        self.record(format!("umount {target}"))
    }
    fn mkdir(&self, path: &str) -> io::Result<()> {
        self.present.lock().unwrap().insert(path.to_string());
        self.record(format!("mkdir {path}"))
    }
    fn chdir(&self, path: &str) -> io::Result<()> {
        self.record(format!("chdir {path}"))
    }
    fn chroot(&self, path: &str) -> io::Result<()> {
        self.record(format!("chroot {path}"))
    }
    fn exists(&self, path: &str) -> bool {
        self.present.lock().unwrap().contains(path)
    }
    fn load_module(&self, path: &Path, params: &str) -> io::Result<()> {
        for (module, file, text) in &self.probes {
            if path.to_string_lossy().contains(module.as_str()) {
                std::fs::create_dir_all(file.parent().unwrap_or(Path::new("/")))?;
                std::fs::write(file, text)?;
            }
        }
        self.record(
            format!("load {} {params}", path.display())
                .trim_end()
                .to_string(),
        )
    }
    fn free_initramfs(&self, keep: &str) -> io::Result<()> {
        self.record(format!("free_initramfs except {keep}"))
    }
    fn spawn(&self, argv0: &str, args: &[String], keep: &[RawFd]) -> io::Result<u32> {
        for &fd in keep {
            // SAFETY: the caller keeps `fd` open for the duration of this call.
            let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            self.kept.lock().unwrap().push(fd.try_clone_to_owned()?);
        }
        let keep = if keep.is_empty() {
            String::new()
        } else {
            format!(" (keeps fds {keep:?})")
        };
        self.record(format!("spawn {argv0} {}{keep}", args.join(" ")))
            .map(|_| 4242)
    }
    fn run(
        &self,
        root: Option<&str>,
        argv: &[String],
        _env: &[(String, String)],
        limit: Limit,
    ) -> io::Result<Outcome> {
        let within = root.map(|r| format!("in {r} ")).unwrap_or_default();
        self.record(format!(
            "run {within}{} (timeout {} s)",
            argv.join(" | "),
            limit.timeout.as_secs()
        ))
        .map(|_| Outcome::Exited(0))
    }
    fn exec(&self, argv: &[String], _env: &[(String, String)]) -> io::Error {
        let _ = self.record(format!("exec {}", argv.join(" ")));
        io::Error::other("recorded exec")
    }
    fn stop(&self, pid: u32, _grace: Duration) -> io::Result<()> {
        self.record(format!("stop {pid}"))
    }
    fn attach_loop(&self, file: &str, read_only: bool) -> io::Result<String> {
        let ro = if read_only { "ro" } else { "rw" };
        self.record(format!("loop {file} {ro}"))
            .map(|_| "/dev/loop0".to_string())
    }
    fn map_verity(
        &self,
        name: &str,
        table: &crate::verity::VerityTable,
    ) -> Result<String, crate::verity::DmError> {
        // The "mapped device" is a file beside the backing one, `.dm` added: a test puts
        // there what reads through the mapping should give.
        self.record(format!("verity {name} {}", table.params()))
            .map(|_| format!("{}.dm", table.device))
            .map_err(crate::verity::DmError::Load)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str, timeout_ms: u64) -> Outcome {
        let env = [("PATH".to_string(), "/usr/bin:/bin".to_string())];
        let argv = ["/bin/sh".to_string(), "-c".into(), script.into()];
        let limit = Limit {
            timeout: Duration::from_millis(timeout_ms),
            grace: Duration::from_millis(300),
        };
        Real.run(None, &argv, &env, limit).unwrap()
    }

    #[test]
    fn a_program_that_ends_gives_its_exit_code() {
        assert_eq!(sh("exit 3", 20_000), Outcome::Exited(3));
        assert_eq!(sh("kill -9 $$", 20_000), Outcome::Exited(128 + 9));
    }

    #[test]
    fn past_the_timeout_the_whole_group_is_killed_and_reaped() {
        // The shell's child in the background: killed with it, and reaped (no zombie).
        let out = sh("sleep 30 & echo $! >&3; wait", 300);
        let Outcome::TimedOut {
            progress: Some(pid),
            sigkill: false,
            left: false,
        } = out
        else {
            panic!("{out:?}")
        };
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "the background child {pid} is gone"
        );
    }

    #[test]
    fn a_group_deaf_to_sigterm_gets_sigkill() {
        let out = sh("trap '' TERM; echo one >&3; echo two >&3; sleep 30", 300);
        assert_eq!(
            out,
            Outcome::TimedOut {
                progress: Some("two".into()),
                sigkill: true,
                left: false
            }
        );
    }
}
