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
    fn chdir(&self, path: &str) -> io::Result<()>;
    fn chroot(&self, path: &str) -> io::Result<()>;
    fn exists(&self, path: &str) -> bool;
    /// finit_module; `Ok` also when the module is already loaded.
    fn load_module(&self, path: &Path, params: &str) -> io::Result<()>;
    /// Deletes the initramfs's files (same device as `/`, not below other mounts).
    fn free_initramfs(&self, keep: &str) -> io::Result<()>;
    /// Runs a program to completion (chrooted into `root` if given); returns its exit code.
    fn run(&self, root: Option<&str>, argv: &[String], env: &[(String, String)])
        -> io::Result<i32>;
    /// Starts this program again as a detached helper named `argv0`, in the idle
    /// scheduling class (it raises itself once set up) and exempt from the OOM killer,
    /// passing it the descriptors `keep`; returns its pid.
    fn spawn(&self, argv0: &str, args: &[String], keep: &[RawFd]) -> io::Result<u32>;
    /// Replaces this process; returns only on failure.
    fn exec(&self, argv: &[String], env: &[(String, String)]) -> io::Error;
}

pub struct Real;

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
        let name = path.to_string_lossy();
        // Compressed modules are decompressed by the kernel (CONFIG_MODULE_DECOMPRESS).
        let flags = if name.ends_with(".ko") {
            ModuleInitFlags::empty()
        } else {
            ModuleInitFlags::from_bits_retain(4) // MODULE_INIT_COMPRESSED_FILE
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
    ) -> io::Result<i32> {
        use std::os::unix::process::CommandExt;
        let mut cmd = std::process::Command::new(&argv[0]);
        cmd.args(&argv[1..]).env_clear().envs(env.iter().cloned());
        if let Some(root) = root {
            let root = cstr(root)?;
            // SAFETY: between fork and exec only async-signal-safe calls (chroot, chdir).
            unsafe {
                cmd.pre_exec(move || {
                    nix::unistd::chroot(root.as_c_str())?;
                    nix::unistd::chdir("/")?;
                    Ok(())
                });
            }
        }
        let st = cmd.status()?;
        Ok(st
            .code()
            .unwrap_or(128 + std::os::unix::process::ExitStatusExt::signal(&st).unwrap_or(0)))
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
    ) -> io::Result<i32> {
        let within = root.map(|r| format!("in {r} ")).unwrap_or_default();
        self.record(format!("run {within}{}", argv.join(" | ")))
            .map(|_| 0)
    }
    fn exec(&self, argv: &[String], _env: &[(String, String)]) -> io::Error {
        let _ = self.record(format!("exec {}", argv.join(" ")));
        io::Error::other("recorded exec")
    }
}
