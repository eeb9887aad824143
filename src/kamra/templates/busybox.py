"""The built-in busybox template: made from the host's busybox-static, with no network.

The result is reproducible: the same busybox binary always gives the same digest
(fixed file contents, fixed modes, owner root), which makes it a good default.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess

from kamra.errors import InvalidInput
from kamra.templates.model import BuildOptions, BuildResult, Progress, emit

HOST_BUSYBOX = "/bin/busybox"
_MISSING = "busybox-static is not installed: apt-get install busybox-static"

_DIRS = {
    "bin": 0o755, "sbin": 0o755, "usr": 0o755, "usr/bin": 0o755, "usr/sbin": 0o755,
    "etc": 0o755, "etc/init.d": 0o755,
    # /dev stays empty: kamra populates a fresh /dev each time a container starts.
    "dev": 0o755, "proc": 0o555, "sys": 0o555, "run": 0o755,
    "tmp": 0o1777, "root": 0o700, "home": 0o755,
    "var": 0o755, "var/log": 0o755, "var/tmp": 0o1777,
}

_PROFILE = """\
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PS1='\\u@\\h:\\w\\$ '
"""

# busybox init: no ctrlaltdel line, so a stray SIGINT does not reboot the container;
# kamra stops it with SIGUSR2 (poweroff), which runs the shutdown actions.
_INITTAB = """\
::sysinit:/etc/init.d/rcS
console::respawn:-/bin/sh
::shutdown:/bin/sync
"""

# kamra mounts /proc, /sys and /dev before init runs, so there is nothing to mount here.
_RCS = """\
#!/bin/sh
[ -s /etc/hostname ] && hostname -F /etc/hostname 2>/dev/null
exit 0
"""


def _files(version: str) -> dict[str, tuple[str, int]]:
    """Path -> (contents, mode) of the configuration files."""
    return {
        "etc/passwd": ("root:x:0:0:root:/root:/bin/sh\n"
                       "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n", 0o644),
        "etc/group": ("root:x:0:\ntty:x:5:\nnogroup:x:65534:\n", 0o644),
        # '*' locks root's password: the console gives a shell directly, no login needed.
        "etc/shadow": ("root:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n", 0o600),
        "etc/hostname": ("busybox\n", 0o644),
        "etc/hosts": ("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n", 0o644),
        "etc/os-release": (f'NAME="BusyBox"\nID=busybox\nVERSION_ID={version}\n'
                           f'PRETTY_NAME="BusyBox {version}"\n', 0o644),
        "etc/profile": (_PROFILE, 0o644),
        "etc/inittab": (_INITTAB, 0o644),
        "etc/init.d/rcS": (_RCS, 0o755),
    }


def is_static_elf(path: str) -> bool:
    """True for an ELF executable without a program interpreter (PT_INTERP)."""
    with open(path, "rb") as f:
        ident = f.read(64)
        if len(ident) < 64 or ident[:4] != b"\x7fELF":
            return False
        is64, order = ident[4] == 2, "<" if ident[5] == 1 else ">"
        if is64:
            phoff, = struct.unpack_from(order + "Q", ident, 0x20)
            phentsize, phnum = struct.unpack_from(order + "HH", ident, 0x36)
        else:
            phoff, = struct.unpack_from(order + "I", ident, 0x1C)
            phentsize, phnum = struct.unpack_from(order + "HH", ident, 0x2A)
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            header = f.read(4)
            if len(header) < 4:
                return False
            if struct.unpack(order + "I", header)[0] == 3:  # PT_INTERP: dynamically linked
                return False
    return True


def check_host_busybox(path: str = HOST_BUSYBOX) -> str:
    """Return the busybox version; a dynamic busybox would not run inside the rootfs."""
    try:
        static = is_static_elf(path)
    except FileNotFoundError:
        raise InvalidInput(_MISSING) from None
    except OSError as exc:
        raise InvalidInput(f"cannot read {path} ({exc.strerror}): {_MISSING}") from None
    if not static:
        raise InvalidInput(f"{path} is dynamically linked: {_MISSING}")
    out = subprocess.run([path], capture_output=True, text=True, check=False)
    match = re.search(r"BusyBox v([0-9][^\s]*)", out.stdout + out.stderr)
    if not match:
        raise InvalidInput(f"{path} does not look like busybox: {_MISSING}")
    return match.group(1)


def _applets(path: str) -> list[str]:
    out = subprocess.run([path, "--list-full"], capture_output=True, text=True, check=False)
    if out.returncode != 0 or not out.stdout.strip():
        raise InvalidInput(f"{path} --list-full failed ({out.stderr.strip()[:200] or 'no output'})"
                           f": {_MISSING}")
    applets = set()
    for line in out.stdout.split():
        rel = os.path.normpath(line.strip("/"))
        if rel and rel != "bin/busybox" and not rel.startswith(".."):
            applets.add(rel)
    return sorted(applets)


def build_busybox(rootfs: str, options: BuildOptions, progress: Progress | None = None,
                  host_busybox: str = HOST_BUSYBOX) -> BuildResult:
    version = check_host_busybox(host_busybox)
    emit(progress, "build", 0, 3, f"busybox {version}: directories")
    os.makedirs(rootfs, exist_ok=True)
    os.chmod(rootfs, 0o755)
    for rel, mode in _DIRS.items():
        path = os.path.join(rootfs, rel)
        os.makedirs(path, exist_ok=True)
        os.chmod(path, mode)  # explicit: the caller's umask must not shape the template
    os.symlink("/run", os.path.join(rootfs, "var/run"))
    os.symlink("/proc/self/mounts", os.path.join(rootfs, "etc/mtab"))

    emit(progress, "build", 1, 3, "applets")
    target = os.path.join(rootfs, "bin/busybox")
    shutil.copyfile(host_busybox, target)
    os.chmod(target, 0o755)
    for applet in _applets(host_busybox):
        parent = os.path.dirname(applet) or "."
        os.makedirs(os.path.join(rootfs, parent), mode=0o755, exist_ok=True)
        # Relative links keep resolving inside the rootfs even when viewed from the host.
        os.symlink(os.path.relpath("bin/busybox", parent), os.path.join(rootfs, applet))

    emit(progress, "build", 2, 3, "configuration files")
    for rel, (text, mode) in _files(version).items():
        with open(os.path.join(rootfs, rel), "w") as f:
            f.write(text)
        os.chmod(os.path.join(rootfs, rel), mode)
    emit(progress, "build", 3, 3, "done")
    return BuildResult(source=f"busybox {version}", os=f"busybox {version}",
                       init=["/sbin/init"], stop_signal="SIGUSR2")
