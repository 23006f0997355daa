"""The QEMU test bed shared by qemu/boot and qemu/fault: a network namespace with a bridge,
tap, dnsmasq and ltsp-server (Bed), and a node under QEMU TCG booting from it by
firmware PXE, its serial console streamed and driven (Node)."""
import glob
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
SERVER_IP = "192.0.2.1"
SERVER2_IP = "192.0.2.2"
MAC = "52:54:00:12:34:56"
KMSG = re.compile(r"\[\s*\d+\.\d{6}\] ")
# A kernel message that landed in the middle of a command's output line: the rest of the
# line is the kernel's (its own newline ends it), not the command's.
KMSG_INSIDE = re.compile(r"\[\s*\d+\.\d{6}\] .*$")


def log(msg):
    print(f"qemu/boot: {msg}", flush=True)


def sh(*cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


class Fail(Exception):
    pass


AGENT_TARGET = {"amd64": "x86_64-unknown-linux-musl", "arm64": "aarch64-unknown-linux-musl"}


def build(args):
    """Builds both binaries and the Debian packages (scripts/package), then the test image
    with the agent installed from its .deb (qemu/prepare), of args.suite (default trixie)
    and args.arch (default amd64; arm64: the agent cross-built, the image under
    qemu-user-static). With args.image "docker": deploy/Dockerfile built by podman
    (qemu/build-docker-image), the server binary and what it serves taken from the image.
    Returns (server, artifacts)."""
    suite = getattr(args, "suite", "trixie")
    if getattr(args, "image", "test") == "docker":
        work = os.environ.get("LTSP_QEMU_WORK", os.path.join(HERE, "work"))
        art = os.path.join(work, f"docker-{suite}")
        # --no-build: what the last build produced (the tests build it before taking the
        # QEMU lock); otherwise build or confirm it is up to date.
        if not (args.no_build and os.path.exists(os.path.join(art, "KEY"))):
            art = subprocess.run([os.path.join(HERE, "build-docker-image"), "--suite", suite], check=True,
                                 stdout=subprocess.PIPE, text=True).stdout.strip()
        return os.path.join(art, "ltsp-server"), art
    env = dict(os.environ)
    env["PATH"] = os.path.expanduser("~/.cargo/bin") + ":" + env.get("PATH", "")
    arch = getattr(args, "arch", "amd64")
    agent = os.path.join(TOP, f"target/{AGENT_TARGET[arch]}/agent/ltsp-agent")
    server = os.path.join(TOP, "target/release/ltsp-server")
    debs = sorted(glob.glob(os.path.join(TOP, f"target/packages/ltsp-agent_*_{arch}.deb")))
    deb = debs[-1] if debs else None
    if not args.no_build or not deb or not os.path.exists(server):
        log("building ltsp-server (release), ltsp-agent (static, musl) and their .deb packages")
        out = subprocess.run([os.path.join(TOP, "scripts/package")], cwd=TOP, env=env, check=True,
                             capture_output=True, text=True).stdout.split()
        if arch != "amd64":
            log(f"building ltsp-agent for {arch} and its .deb package")
            out = subprocess.run([os.path.join(TOP, "scripts/package"), "--agent-arch", arch], cwd=TOP,
                                 env=env, check=True, capture_output=True, text=True).stdout.split()
        deb = next(p for p in out if "ltsp-agent_" in p)
        deb = deb if os.path.isabs(deb) else os.path.join(TOP, deb)
    sh(os.path.join(HERE, "prepare"), "--suite", suite, "--arch", arch, deb, agent)
    work = os.environ.get("LTSP_QEMU_WORK", os.path.join(HERE, "work"))
    return server, os.path.join(work, f"artifacts-{suite}" + ("" if arch == "amd64" else f"-{arch}"))


def read_text(path):
    """A file's text; closed once read."""
    with open(path) as f:
        return f.read()


def tail(path, n):
    """The last `n` lines of a file, or "" if there is none."""
    if not os.path.exists(path):
        return ""
    return "".join(read_text(path).splitlines(keepends=True)[-n:])


def stop_pid(pid, timeout=5):
    """SIGTERM to `pid` (a process this bed started), then SIGKILL if it outlives `timeout`."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    end = time.time() + timeout
    while time.time() < end:
        if not os.path.exists(f"/proc/{pid}"):
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def children(pid):
    """The PIDs whose parent is `pid`."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = read_text(f"/proc/{d}/stat")
        except OSError:
            continue
        # The command name (field 2) may hold spaces and parentheses: fields after the last ')'.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(d))
    return out


@dataclass
class BedSettings:
    """What the bed serves and how.

    dhcp: "all" (dnsmasq knows PXE), "pxe-only" (dnsmasq answers iPXE but not the agent),
    "proxy" (a site DHCP server without PXE; ltsp-server's proxyDHCP answers) or "server"
    (ltsp-server is the DHCP server). nbd: False serves TFTP only. second_server: a second
    ltsp-server on SERVER2_IP exporting a copy of the image (another file, same bytes).
    boot_files: "http" has iPXE fetch the kernel and initramfs from ltsp-server's HTTP port
    instead of TFTP. versions_dir: the content-addressed store of image versions every
    ltsp-server of the bed shares (--nbd-versions-dir). loader: "ipxe" or "grub". kernel: a directory with another vmlinuz and
    initrd-standalone.img (qemu/prepare-generic). stock: the stock Debian image directory
    (initramfs-tools + nbd-client) instead of ours. nbd_server: who serves the root,
    "ltsp" (ltsp-server) or "nbd-server" (Debian's, ltsp-server then serves TFTP only). dhcp_range: what
    ltsp-server leases as the DHCP server. server_config: TOML settings for the first
    ltsp-server (--config), beside its flags. lts_conf_sig: served beside lts.conf as
    lts.conf.sig. initrd: another initramfs to serve (one with a trust key). nbd_trace: the
    first ltsp-server writes its NBD request trace there (--nbd-trace). uki: a signed
    Unified Kernel Image (deploy/build-uki), served as UKI_PATH and given to UEFI firmware
    PXE as its boot file (no iPXE). arch: the node's
    architecture; arm64 boots GRUB (the artifacts' grub/ tree) from UEFI PXE, with
    its boot files under ltsp/arm64/ and its console on ttyAMA0."""
    artifacts: str
    server_bin: str
    lts_conf: str | None = None
    flavour: str = "standalone"
    extra_cmdline: str = ""
    stock: str | None = None
    nbd_server: str = "ltsp"
    nbdroot: str = ":root"
    dhcp: str = "all"
    nbd: bool = True
    second_server: bool = False
    boot_files: str = "tftp"
    loader: str = "ipxe"
    kernel: str | None = None
    versions_dir: str | None = None
    dhcp_range: str = "192.0.2.100-192.0.2.199"
    server_config: str | None = None
    lts_conf_sig: str | None = None
    initrd: str | None = None
    nbd_trace: str | None = None
    uki: str | None = None
    arch: str = "amd64"


UKI_PATH = "ltsp/amd64/ltsp.efi"
# Debian's OVMF test key: enrolled as PK, KEK and db in OVMF_VARS_4M.snakeoil.fd; its
# private key is encrypted with the passphrase "snakeoil".
SNAKEOIL_KEY = "/usr/share/ovmf/PkKek-1-snakeoil.key"
SNAKEOIL_CERT = "/usr/share/ovmf/PkKek-1-snakeoil.pem"


def node_cmdline(s):
    """The kernel command line the node is given (boot.ipxe, or the UKI's)."""
    console = "ttyAMA0" if s.arch == "arm64" else "ttyS0"
    cmdline = f"console={console},115200 root=/dev/nbd0 nbdroot={s.nbdroot} ltsp.on-failure=halt"
    if s.flavour == "initramfs-tools":
        cmdline += " boot=ltsp"
    if s.stock:
        # nbd-client's initramfs script; `,nbd0` because it reads `server,name` as a port.
        cmdline = f"console=ttyS0,115200 root=/dev/nbd0 nbdroot={SERVER_IP},root,nbd0 ip=dhcp rootfstype=squashfs ro"
    if s.extra_cmdline:
        cmdline += " " + s.extra_cmdline
    return cmdline


class Bed:
    """The network namespace with its bridge, tap, dnsmasq and ltsp-server."""

    def __init__(self, settings):
        self.settings = settings
        self.ns = f"ltsp-qemu-{os.getpid()}"
        self.site = f"ltsp-site-{os.getpid()}"
        self.site_added = False
        self.dir = tempfile.mkdtemp(prefix="ltsp-qemu-")
        self.procs = []
        self.nbd_server_pid = None
        self.server_log = os.path.join(self.dir, "server.log")
        self.server2_log = os.path.join(self.dir, "server2.log")
        self.dnsmasq_log = os.path.join(self.dir, "dnsmasq.log")
        self.nbd_server_log = os.path.join(self.dir, "nbd-server.log")
        self.syslog = None
        self.syslog_done = threading.Event()
        self.tftp = os.path.join(self.dir, "tftp")
        self.squashfs = os.path.join(self.dir, "root.squashfs")
        self.squashfs2 = os.path.join(self.dir, "root2.squashfs")
        self.server_cmdline = self.kernel_cmdline()

    def ip(self, *a):
        sh("ip", "-n", self.ns, *a)

    def start(self):
        self.make_network()
        self.stage_boot_files()
        self.start_servers()
        self.start_dhcp()

    def make_network(self):
        """The namespace: a bridge with the server's addresses and the node's tap."""
        sh("ip", "netns", "add", self.ns)
        self.ip("link", "set", "lo", "up")
        self.ip("link", "add", "br0", "type", "bridge")
        self.ip("addr", "add", f"{SERVER_IP}/24", "dev", "br0")
        # An IPv6 prefix with router advertisements: iPXE otherwise waits ~13 s for IPv6
        # router discovery to time out.
        self.ip("addr", "add", "2001:db8:1::1/64", "dev", "br0", "nodad")
        self.ip("tuntap", "add", "tap0", "mode", "tap")
        self.ip("link", "set", "tap0", "master", "br0")
        self.ip("link", "set", "tap0", "up")
        self.ip("link", "set", "br0", "up")

    def stage_boot_files(self):
        """The TFTP root (kernel, initramfs, lts.conf, iPXE, GRUB) and the image."""
        s = self.settings
        d = os.path.join(self.tftp, f"ltsp/{s.arch}")
        os.makedirs(d)
        initrd = "initrd-standalone.img" if s.flavour == "standalone" else "initrd-initramfs-tools.img"
        art = s.artifacts
        if s.stock:
            art, initrd = s.stock, "initrd.img"
        elif s.kernel:
            art = s.kernel
        shutil.copy(os.path.join(art, "vmlinuz"), os.path.join(d, "vmlinuz"))
        shutil.copy(s.initrd or os.path.join(art, initrd), os.path.join(d, "initrd.img"))
        if s.lts_conf:
            shutil.copy(s.lts_conf, os.path.join(d, "lts.conf"))
        if s.lts_conf_sig:
            shutil.copy(s.lts_conf_sig, os.path.join(d, "lts.conf.sig"))
        if s.uki:
            shutil.copy(s.uki, os.path.join(self.tftp, UKI_PATH))
        # iPXE for firmware PXE, from Debian's ipxe package: BIOS and UEFI x86-64.
        for f in ["undionly.kpxe", "ipxe.efi", "snponly.efi"]:
            shutil.copy(os.path.join("/usr/lib/ipxe", f), os.path.join(self.tftp, f))
        if s.arch == "arm64":
            # UEFI arm64 PXE boots GRUB (Debian packages no arm64 iPXE): grub-mknetdir's
            # arm64-efi tree, made by qemu/prepare.
            shutil.copytree(os.path.join(art, "grub"), os.path.join(self.tftp, "grub"))
        elif s.loader == "grub":
            # GRUB netboot as LTSP set it up: grub-mknetdir's images and modules; grub.cfg
            # is generated by ltsp-server from [boot].
            sh("grub-mknetdir", f"--net-directory={self.tftp}", "--subdir=grub", stdout=subprocess.DEVNULL,
               stderr=subprocess.DEVNULL)
        shutil.copy(os.path.join(s.stock or s.artifacts, "root.squashfs"), self.squashfs)

    def kernel_cmdline(self):
        return node_cmdline(self.settings)

    def start_servers(self):
        """ltsp-server, the second one if asked for, Debian's nbd-server if it serves the root."""
        s = self.settings
        self.start_server(self.tftp, self.server_cmdline)
        if s.second_server:
            self.ip("addr", "add", f"{SERVER2_IP}/24", "dev", "br0")
            shutil.copy(self.squashfs, self.squashfs2)
            self.start_server2()
        if s.nbd_server == "nbd-server":
            self.start_nbd_server()

    def start_nbd_server(self):
        """Debian's nbd-server exporting the image as `root`. It logs only to syslog: it runs
        in a mount namespace of its own whose /dev holds just null and a log socket this bed
        reads into nbd_server_log (the host's /dev is untouched)."""
        conf = os.path.join(self.dir, "nbd-server.conf")
        with open(conf, "w") as f:
            f.write(f"[generic]\nlistenaddr = {SERVER_IP}\nport = 10809\nuser = root\ngroup = root\n"
                    f"[root]\nexportname = {self.squashfs}\nreadonly = true\n")
        dev = os.path.join(self.dir, "nbd-server-dev")
        os.makedirs(dev)
        open(os.path.join(dev, "null"), "w").close()
        self.syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.syslog.bind(os.path.join(dev, "log"))
        self.syslog.settimeout(0.2)
        self.syslog_thread = threading.Thread(target=self.read_syslog, daemon=True)
        self.syslog_thread.start()
        pidfile = os.path.join(self.dir, "nbd-server.pid")
        sh("ip", "netns", "exec", self.ns, "unshare", "--mount", "--propagation", "private", "sh", "-c",
           'mount --bind /dev/null "$1/null" && mount --rbind "$1" /dev && exec nbd-server -C "$2" -p "$3"',
           "sh", dev, conf, pidfile)
        # It daemonizes: its pid file is how this bed knows it (and stops it alone). The
        # daemon writes it after the command returned, so wait for it.
        deadline = time.time() + 10
        while not os.path.exists(pidfile) or not read_text(pidfile).strip():
            if time.time() > deadline:
                raise Fail(f"nbd-server wrote no pid file; its log:\n{tail(self.nbd_server_log, 10)}")
            time.sleep(0.02)
        self.nbd_server_pid = int(read_text(pidfile).strip())

    def read_syslog(self):
        """nbd-server's syslog messages, one a line, until the bed stops."""
        with open(self.nbd_server_log, "a") as out:
            while not self.syslog_done.is_set():
                try:
                    msg = self.syslog.recv(8192)
                except TimeoutError:
                    continue
                # "<30>Dec  3 16:37:53 nbd_server[10837]: text": the text after the tag.
                text = msg.decode("utf-8", "replace").rstrip("\n")
                out.write(re.sub(r"^<\d+>\w{3} [ \d]\d [\d:]{8} ", "", text) + "\n")
                out.flush()

    def start_dhcp(self):
        """dnsmasq as the site's DHCP server (in its own namespace for "proxy"), and IPv6 RAs."""
        s = self.settings
        ns, iface = self.ns, "br0"
        if s.dhcp == "proxy":
            # The site's DHCP server on a host of its own, knowing nothing of PXE.
            ns, iface = self.site, "eth0"
            sh("ip", "netns", "add", ns)
            self.site_added = True
            self.ip("link", "add", "vsite", "type", "veth", "peer", "name", "eth0", "netns", ns)
            self.ip("link", "set", "vsite", "master", "br0")
            self.ip("link", "set", "vsite", "up")
            sh("ip", "-n", ns, "addr", "add", "192.0.2.254/24", "dev", "eth0")
            sh("ip", "-n", ns, "addr", "add", "2001:db8:1::254/64", "dev", "eth0", "nodad")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            pxe = []
        elif s.dhcp == "server":
            pxe = []  # ltsp-server is the DHCP server; dnsmasq only sends IPv6 RAs
        elif s.arch == "arm64":
            # UEFI arm64 firmware PXE (client architecture 11) gets GRUB.
            pxe = ["--dhcp-match=set:arm64,option:client-arch,11",
                   f"--dhcp-boot=tag:arm64,grub/arm64-efi/core.efi,,{SERVER_IP}"]
        elif s.loader == "grub":
            pxe = [f"--dhcp-boot=grub/i386-pc/core.0,,{SERVER_IP}",
                   "--dhcp-match=set:efi64,option:client-arch,7", "--dhcp-match=set:efi64,option:client-arch,9",
                   f"--dhcp-boot=tag:efi64,grub/x86_64-efi/core.efi,,{SERVER_IP}"]
        else:
            # The site's DHCP server told about PXE: iPXE gets boot.ipxe, UEFI firmware
            # PXE ipxe.efi (BIOS firmware here is iPXE already: the NIC's ROM).
            pxe = ["--dhcp-userclass=set:ipxe,iPXE", f"--dhcp-boot=tag:ipxe,boot.ipxe,,{SERVER_IP}",
                   "--dhcp-match=set:efi64,option:client-arch,7", "--dhcp-match=set:efi64,option:client-arch,9",
                   f"--dhcp-boot=tag:efi64,tag:!ipxe,{UKI_PATH if s.uki else 'ipxe.efi'},,{SERVER_IP}",
                   "--dhcp-option-force=tag:ipxe,encap:175,176,1"]
        with open(self.dnsmasq_log, "w") as out:
            dns = subprocess.Popen(
                ["ip", "netns", "exec", ns, "dnsmasq", "--keep-in-foreground", "--log-facility=-",
                 "--conf-file=/dev/null", "--port=0", f"--interface={iface}", "--bind-interfaces",
                 *([] if s.dhcp == "server" else ["--dhcp-range=192.0.2.100,192.0.2.199,255.255.255.0,12h"]),
                 "--dhcp-leasefile=" + os.path.join(self.dir, "leases"),
                 *pxe, "--no-ping", "--log-dhcp",
                 "--enable-ra", f"--dhcp-range=::,constructor:{iface},ra-only",
                 "--pid-file=" + os.path.join(self.dir, "dnsmasq.pid")]
                + (["--dhcp-ignore=tag:!ipxe"] if s.dhcp == "pxe-only" else []),
                stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(dns)

    def start_server(self, tftp, cmdline):
        s = self.settings
        nbd = (["--no-nbd"] if s.nbd_server != "ltsp" or not s.nbd else
               ["--nbd-listen", f"{SERVER_IP}:10809", "--export", f"root={self.squashfs}"])
        self.server_args = ["serve", "--tftp-root", tftp, "--tftp-listen", f"{SERVER_IP}:69", *nbd,
                            "--boot-kernel", f"ltsp/{s.arch}/vmlinuz", "--boot-initrd", f"ltsp/{s.arch}/initrd.img",
                            "--boot-cmdline", cmdline]
        if s.boot_files == "http":
            self.server_args += ["--http-listen", f"{SERVER_IP}:8080", "--boot-http"]
        if s.dhcp == "proxy":
            self.server_args += ["--proxy-dhcp", "br0"]
        if s.dhcp == "server":
            # The lease file in the bed's directory: kept across a restart of the server,
            # gone with the bed.
            self.dhcp_leases = os.path.join(self.dir, "dhcp-leases")
            self.server_args += ["--dhcp-server", "br0", "--dhcp-range", s.dhcp_range,
                                 "--dhcp-lease-file", self.dhcp_leases]
        if s.server_config:
            conf = os.path.join(self.dir, "server.toml")
            with open(conf, "w") as f:
                f.write(s.server_config)
            self.server_args += ["--config", conf]
        if s.versions_dir:
            self.server_args += ["--nbd-versions-dir", s.versions_dir]
        if s.nbd_trace:
            self.server_args += ["--nbd-trace", s.nbd_trace]
        if s.uki:
            self.server_args += ["--pxe-uefi", UKI_PATH]
        ready = "nbd: listening" if nbd[0] != "--no-nbd" else "tftp: serving"
        self.server = self.launch(self.server_args, self.server_log, ready)

    def start_server2(self, image=None):
        """The second server, exporting `image` (default: the bed's copy of the image)."""
        args = ["serve", "--no-tftp", "--nbd-listen", f"{SERVER2_IP}:10809",
                "--export", f"root={image or self.squashfs2}"]
        if self.settings.versions_dir:
            args += ["--nbd-versions-dir", self.settings.versions_dir]
        self.server2 = self.launch(args, self.server2_log, "nbd: listening")

    def restart_server(self):
        """Starts the (killed) first server again with the same settings."""
        s = self.settings
        ready = "nbd: listening" if s.nbd and s.nbd_server == "ltsp" else "tftp: serving"
        self.server = self.launch(self.server_args, self.server_log, ready)

    def launch(self, args, logfile, ready):
        """Starts an ltsp-server; returns once its log shows `ready` one more time."""
        before = read_text(logfile).count(ready) if os.path.exists(logfile) else 0
        with open(logfile, "a") as out:
            p = subprocess.Popen(["ip", "netns", "exec", self.ns, self.settings.server_bin, *args],
                                 stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(p)
        deadline = time.time() + 10
        while time.time() < deadline:
            if read_text(logfile).count(ready) > before:
                return p
            if p.poll() is not None:
                break
            time.sleep(0.05)
        raise Fail("ltsp-server did not start: " + read_text(logfile)[-2000:])

    def stop(self):
        """Stops what this bed started, each by its own PID, then removes the namespaces."""
        if self.nbd_server_pid:
            # nbd-server forks one child per client: those are this bed's too.
            served = children(self.nbd_server_pid)
            stop_pid(self.nbd_server_pid)
            for pid in served:
                stop_pid(pid)
        if self.syslog:
            self.syslog_done.set()
            self.syslog_thread.join()
            self.syslog.close()
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        left = subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True).stdout.split()
        if left:
            log(f"processes still in {self.ns}, not started by this bed, left alone: {' '.join(left)}")
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
        if self.site_added:
            subprocess.run(["ip", "netns", "del", self.site], capture_output=True)


class Node:
    """QEMU with the serial console on a pipe; lines are stamped with seconds since start."""

    def __init__(self, bed, memory, firmware, machine="q35", nic="virtio-net-pci", kernel=None, append=None,
                 cpus=1):
        """machine: q35 (PCIe, like the servers it stands for; UEFI always uses it) or pc
        (i440fx). On pc the kernel interprets QEMU's generated _PRT loop in AML when the
        NIC's driver enables the device: ~85 ms of the boot under TCG, ~10 ms on q35.
        cpus: vCPUs, all run by one host thread (single-threaded TCG), so a node takes one
        core whatever its vCPUs. Multi-threaded TCG crashed a 2-vCPU guest while its kernel
        patched its own code under another vCPU (inet_ehashfn, at the first TCP connects)."""
        arm64 = bed.settings.arch == "arm64"
        cmd = ["ip", "netns", "exec", bed.ns, "qemu-system-aarch64" if arm64 else "qemu-system-x86_64",
               "-accel", "tcg" if cpus == 1 else "tcg,thread=single", "-m", str(memory),
               "-smp", str(cpus), "-nodefaults", "-display", "none", "-no-user-config",
               *([] if arm64 else ["-vga", "none"]),
               "-chardev", "stdio,id=s0,signal=off", "-serial", "chardev:s0",
               "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"]
        if arm64:
            # The virt machine with AAVMF (qemu-efi-aarch64): UEFI's own PXE on virtio-net
            # loads GRUB. cortex-a72: -cpu max emulates pointer authentication, which
            # costs TCG much time, and Debian's arm64 kernel needs nothing past ARMv8.0.
            vars_copy = os.path.join(bed.dir, "AAVMF_VARS.fd")
            shutil.copy("/usr/share/AAVMF/AAVMF_VARS.fd", vars_copy)
            cmd += ["-machine", "virt", "-cpu", "cortex-a72",
                    "-drive", "if=pflash,format=raw,readonly=on,file=/usr/share/AAVMF/AAVMF_CODE.fd",
                    "-drive", f"if=pflash,format=raw,file={vars_copy}",
                    "-device", f"virtio-net-pci,netdev=n0,mac={MAC},romfile=,bootindex=1"]
        elif firmware in ("uefi", "uefi-secure-boot"):
            # OVMF, and its own network stack: no iPXE ROM on the NIC, so the firmware's PXE
            # must chainload ipxe.efi (or a signed UKI) as real UEFI machines do.
            # uefi-secure-boot: OVMF's Secure Boot build (its variable store is guarded by
            # SMM) with Debian's variables that enroll the snakeoil key and enable it.
            sb = firmware == "uefi-secure-boot"
            code = "OVMF_CODE_4M.secboot.fd" if sb else "OVMF_CODE_4M.fd"
            vars_copy = os.path.join(bed.dir, "OVMF_VARS.fd")
            shutil.copy(f"/usr/share/OVMF/{'OVMF_VARS_4M.snakeoil.fd' if sb else 'OVMF_VARS_4M.fd'}", vars_copy)
            cmd += ["-machine", "q35,smm=on" if sb else "q35"]
            if sb:
                cmd += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
            cmd += ["-drive", f"if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/{code}",
                    "-drive", f"if=pflash,format=raw,file={vars_copy}",
                    "-device", f"virtio-net-pci,netdev=n0,mac={MAC},romfile=" + ("" if kernel else ",bootindex=1")]
            if kernel:
                # The firmware loads this EFI image itself (fw_cfg) with `append` as its
                # load options: what a loader that chainloads the UKI would pass.
                cmd += ["-kernel", kernel, "-append", append or ""]
        else:
            cmd += ["-machine", machine, "-boot", "n", "-device", f"{nic},netdev=n0,mac={MAC}"]
        self.firmware = firmware
        self.t0 = time.time()
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.buf = b""
        self.lines = []  # (seconds since start, text)
        self.seen = 0  # lines examined by wait_for
        self.quiet = False  # the root shell is set up for `run` (shell_ready)
        self.partial = ""

    def now(self):
        return time.time() - self.t0

    def pump(self, timeout):
        """Reads what the console printed within `timeout`; returns new complete lines."""
        r, _, _ = select.select([self.p.stdout], [], [], timeout)
        new = []
        if r:
            data = os.read(self.p.stdout.fileno(), 65536)
            if not data:
                raise Fail(f"QEMU exited (status {self.p.wait()})")
            self.buf += data
            *complete, self.buf = self.buf.split(b"\n")
            for raw in complete:
                text = raw.decode("utf-8", "replace").replace("\r", "")
                text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
                t = self.now()
                self.lines.append((t, text))
                new.append((t, text))
                print(f"[{t:8.3f}] {text}", flush=True)
        return new

    def wait_for(self, pattern, deadline, fail_patterns=(), partial=False):
        """Waits for a console line matching `pattern`. Lines are examined in order from
        where the previous wait stopped, so lines that arrived in one read with an
        earlier match are not skipped. `partial`: also match the unfinished last line
        (a prompt has no newline)."""
        rx = re.compile(pattern)
        while True:
            while self.seen < len(self.lines):
                t, line = self.lines[self.seen]
                self.seen += 1
                for fp, why in fail_patterns:
                    if re.search(fp, line):
                        raise Fail(f"{why}: {line.strip()}")
                if rx.search(line):
                    return t, line
            tail = self.buf.decode("utf-8", "replace")
            if partial and rx.search(tail):
                return self.now(), tail
            left = deadline - time.time()
            if left <= 0:
                raise Fail(f"timed out waiting for {pattern!r}")
            self.pump(min(left, 0.5))

    def type(self, text):
        self.p.stdin.write(text.encode())
        self.p.stdin.flush()

    def run(self, command, deadline):
        """Runs a shell command on the node's serial root shell; returns its output."""
        tag = f"@@{int(time.time() * 1000) % 100000}"
        self.seen = len(self.lines)  # only what the command prints from now on
        # The quotes keep the markers out of the terminal's echo of the command: only
        # what echo prints reads "TAG-B", even if the echo arrives garbled or split.
        self.type(f"echo {tag}-''B; {command}; echo; echo {tag}-''E\n")
        out = []
        inside = False
        while True:
            while self.seen < len(self.lines):
                line = self.lines[self.seen][1]
                self.seen += 1
                # The prompt may precede a marker on its line. A line with "echo TAG" is
                # the terminal echoing the command itself (a shell that has not run
                # `stty -echo` yet), not its output.
                echoed = f"echo {tag}" in line
                if line.rstrip().endswith(f"{tag}-E") and not echoed:
                    return "\n".join(out)
                # Kernel messages reach the same console (on Debian 13, udev still loads
                # modules after multi-user): they are not the command's output.
                kmsg = KMSG.match(line)
                if inside and not echoed and not kmsg:
                    out.append(KMSG_INSIDE.sub("", line))
                if line.rstrip().endswith(f"{tag}-B") and not echoed:
                    inside = True
            left = deadline - time.time()
            if left <= 0:
                raise Fail(f"timed out running {command!r}")
            self.pump(min(left, 0.5))

    def stop(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()
        for f in (self.p.stdin, self.p.stdout):
            try:
                f.close()
            except OSError:
                pass  # the pipe's other end is gone with QEMU


FAILS = [
    (r"Kernel panic", "kernel panic"),
    (r"ltsp-agent.*step `\w+` failed", "ltsp-agent failed"),
    (r"ALERT! ", "initramfs-tools dropped to its shell"),
]
MULTI_USER = r"Reached target .*(Multi-User System|multi-user\.target)"
# The root shell's prompt. Not anchored at the line's end: on Debian 13 udev still loads
# modules after multi-user, and a kernel message can land right after the prompt.
PROMPT = r"root@[\w.-]+:~# ?"


def boot_once(node, bed, deadline, marks, n):
    """Waits for one boot to reach multi-user and the root shell; records the timeline."""
    start = node.now() if n > 1 else 0.0
    marks[f"multi-user{'' if n == 1 else n}"] = multi_user(node, deadline, FAILS)
    shell_ready(node, deadline, FAILS)
    return start


def multi_user(node, deadline, fails=()):
    """Seconds from QEMU start at which this boot reached multi-user.target.
    systemd prints "Reached target" on the console only while no unit that uses the
    console runs. On a slow boot the serial getty starts first (Type=idle waits at most
    5 s for the other jobs), and the line never comes. Then the root shell says when:
    the target's activation on the node's monotonic clock, put on ours by /proc/uptime."""
    node.quiet = False  # a new boot: its shell is not set up yet
    t, line = node.wait_for(f"{MULTI_USER}|{PROMPT}", deadline, fails, partial=True)
    if re.search(MULTI_USER, line):
        return t
    # The prompt is here (that wait may have passed its line): set the shell up now.
    shell_ready(node, deadline, fails, prompt_seen=True)
    while True:
        out = node.run("systemctl is-active multi-user.target; cut -d' ' -f1 /proc/uptime; "
                       "systemctl show -P ActiveEnterTimestampMonotonic multi-user.target", deadline)
        words = out.split()
        if len(words) >= 3 and words[-3] == "active":
            try:
                uptime, entered = float(words[-2]), int(words[-1])
            except ValueError:
                raise Fail(f"unexpected answer about multi-user.target: {out!r}")
            # When the uptime's line arrived: the node's clock against ours.
            now = next((t for t, x in reversed(node.lines) if x.strip() == words[-2]), node.now())
            if entered > 0:
                return now - uptime + entered / 1e6
        if time.time() >= deadline:
            raise Fail(f"timed out waiting for multi-user.target (the shell says {out.strip()!r})")
        time.sleep(1)


def shell_ready(node, deadline, fails=(), prompt_seen=False):
    """Waits for the serial root shell's prompt (unless the caller saw it), then makes the
    shell quiet for `run`."""
    if node.quiet:
        return
    if not prompt_seen:
        node.wait_for(PROMPT, deadline, fails, partial=True)
    # Wait for the line this prints, not for a prompt: the old prompt is still in the
    # buffer, and a command typed before `stty -echo` ran would be echoed into its output.
    # The new prompt does not look like a login shell's (PROMPT): after a reboot, the old
    # one left in the buffer must not pass for the next boot's.
    # Typed again if no answer comes: the getty flushes what arrives before it is set up.
    while True:
        node.type("export TERM=dumb PS1='ltsp-bed# '; stty -echo cols 200; echo @@shell-''ready\n")
        try:
            node.wait_for(r"@@shell-ready", min(deadline, time.time() + 15), fails)
            node.quiet = True
            return
        except Fail as e:
            if not str(e).startswith("timed out") or time.time() >= deadline:
                raise


def agent_line(line):
    """(seconds since the kernel started, text) of an agent's console line: written by the
    agent (`ltsp-agent [  1.234] text`) or echoed from kmsg (`[  1.234567] ltsp-agent: text`)."""
    m = re.match(r"(?:ltsp-agent \[\s*(\d+\.\d+)\]|\[\s*(\d+\.\d+)\] ltsp-agent:) (.*)$", line)
    if not m:
        return None
    return float(m.group(1) or m.group(2)), m.group(3)


def timeline(node, bed, marks):
    """Seconds from QEMU start for each milestone, from the console, the server and dnsmasq."""
    lines = node.lines
    kstart = None
    for t, line in lines:
        m = re.match(r"\[\s*(\d+\.\d+)\] Run /init as init process", line)
        if m:
            kstart = t - float(m.group(1))
            break
    dhcp = "DHCPACK" in read_text(bed.dnsmasq_log) or None
    agent = {}
    for t, line in lines:
        m = agent_line(line)
        if not m or kstart is None:
            continue
        # Marks are the one-word lines; the agent's own `timeline:` line has them all on
        # its clock (the kernel stamps echoed lines with its own, a few ms apart).
        if " " not in m[1] and m[1] not in agent:
            agent[m[1]] = kstart + m[0]
        if m[1].startswith("timeline: "):
            for kv in m[1].split()[1:]:
                k, _, v = kv.partition("=")
                agent[k] = kstart + float(v)
    out = {}
    if dhcp:
        # dnsmasq logs without sub-second stamps; the server logs the first TFTP transfer.
        for t, line in lines:
            if "ltsp-agent" in line:
                break
    srv = read_text(bed.server_log)
    # What the boot files took, as the server saw each transfer end (TFTP: the last ACK).
    for name, key in [("vmlinuz", "fetch-kernel"), ("initrd.img", "fetch-initrd")]:
        m = re.search(r"(tftp|http): \S+: sent \"[^\"]*" + re.escape(name) + r"\" \((\d+) bytes.*? in ([\d.]+)s", srv)
        if m:
            out[f"{key}-{m.group(1)}"] = float(m.group(3))
    out["kernel-start"] = kstart
    out["agent-start"] = agent.get("start")
    out["net-up"] = agent.get("net-up")
    out["nbd-connected"] = agent.get("nbd-connected")
    out["exec-init"] = agent.get("exec-init") or agent.get("handover")
    for t, line in lines:
        m = re.match(r"\[\s*(\d+\.\d+)\] systemd\[1\]: systemd \d+", line)
        if m and kstart is not None:
            out["systemd-start"] = kstart + float(m.group(1))
            break
    out.update(marks)
    return out, agent, srv




def trust_initrd(art, work, pub):
    """The standalone initramfs rebuilt with a site's minisign public key (--trust-key)."""
    ver = read_text(os.path.join(art, "VERSION")).strip()
    kernel = subprocess.run([os.path.join(HERE, "fetch-kernel"), ver], check=True, capture_output=True,
                            text=True).stdout.strip().splitlines()[-1]
    agent = os.path.join(TOP, "target/x86_64-unknown-linux-musl/agent/ltsp-agent")
    initrd = os.path.join(work, "initrd-trust.img")
    sh(os.path.join(TOP, "mkinitramfs-hook/ltsp-mkinitramfs"), "--agent", agent, "--kernel-root", kernel,
       "--version", ver, "--output", initrd, "--trust-key", pub, stderr=subprocess.DEVNULL)
    return initrd


def sign_lts_conf(conf, work, comment):
    """A site's key pair made with minisign, `conf` signed with it as work/lts.conf and
    work/lts.conf.sig. Returns the public key's path."""
    if not os.path.exists(os.path.join(work, "site.pub")):
        sh("minisign", "-G", "-W", "-p", "site.pub", "-s", "site.key", cwd=work, stdout=subprocess.DEVNULL)
    shutil.copy(conf, os.path.join(work, "lts.conf"))
    sh("minisign", "-S", "-s", "site.key", "-m", "lts.conf", "-x", "lts.conf.sig", "-t", comment,
       cwd=work, stdout=subprocess.DEVNULL)
    return os.path.join(work, "site.pub")


def secure_boot(settings, work, initrd=None):
    """Makes the bed boot UEFI firmware straight into a signed UKI, as a site would set it
    up: lts.conf signed with a site key (unless `initrd`, one with a trust key already,
    is given: the caller signed it), the standalone initramfs with that key, and a command
    line pinning the server, the failure policy and the image's root hash, all signed with
    the snakeoil key the firmware's db holds. Sets settings.uki (and .initrd, .lts_conf,
    .lts_conf_sig); returns the UKI's path."""
    art = settings.artifacts
    if initrd is None:
        pub = sign_lts_conf(settings.lts_conf, work, "lts.conf signed for the test bed")
        settings.lts_conf = os.path.join(work, "lts.conf")
        settings.lts_conf_sig = os.path.join(work, "lts.conf.sig")
        initrd = trust_initrd(art, work, pub)
    settings.initrd = initrd
    # Nothing is learnt from the network that the UKI's command line could pin.
    if settings.nbdroot == ":root":
        settings.nbdroot = f"{SERVER_IP}/root"
    cmdline = f"{node_cmdline(settings)} ltsp.server={SERVER_IP}"
    verity = [] if "ltsp.verity=" in cmdline else ["--roothash", os.path.join(art, "root.squashfs.roothash")]
    key = os.path.join(work, "db.key")
    sh("openssl", "pkey", "-in", SNAKEOIL_KEY, "-passin", "pass:snakeoil", "-out", key)
    uki = os.path.join(work, "ltsp.efi")
    sh(os.path.join(TOP, "deploy/build-uki"), "--kernel", os.path.join(art, "vmlinuz"), "--initrd", initrd,
       "--cmdline", cmdline, *verity, "--key", key, "--cert", SNAKEOIL_CERT, "--output", uki)
    settings.uki = uki
    return uki


def uki_cmdline(uki):
    """The command line inside a UKI (its .cmdline section)."""
    with tempfile.NamedTemporaryFile() as f:
        sh("objcopy", "-O", "binary", "--only-section=.cmdline", uki, f.name)
        return read_text(f.name)


SECURE_BOOT_VAR = "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"


def check_secure_boot(node, deadline):
    """The booted node runs under Secure Boot (the EFI variable's value, after its 4
    attribute bytes, is 1) with kernel lockdown on. Returns the one-line summary."""
    out = node.run(f"echo SB=$(od -An -tu1 {SECURE_BOOT_VAR} | awk '{{print $NF}}') "
                   "LOCKDOWN=$(cat /sys/kernel/security/lockdown | tr ' ' ,)", deadline)
    m = re.search(r"SB=(\S*) LOCKDOWN=(\S*)", out)
    if not m or m.group(1) != "1" or not re.search(r"\[(integrity|confidentiality)\]", m.group(2)):
        raise Fail(f"the node is not under Secure Boot with lockdown: {out.strip()}")
    return f"SecureBoot=1 lockdown={m.group(2).replace(',', ' ')}"
