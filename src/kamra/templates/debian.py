"""The Debian template: a minbase debootstrap with systemd as init."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import signal
import subprocess

from kamra.errors import InvalidInput, KamraError
from kamra.templates.aptsources import find_mirror
from kamra.templates.debprogress import DebootstrapProgress
from kamra.templates.fsutil import remove_tree
from kamra.templates.model import BuildOptions, BuildResult, Progress, emit

INCLUDE = ("systemd-sysv", "iproute2", "procps")
_SUITE = re.compile(r"[a-z][a-z0-9.-]{0,31}\Z")
_SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _which(tool: str) -> str | None:
    # debootstrap lives in /usr/sbin, which a non-login PATH may lack.
    return shutil.which(tool, path=os.environ.get("PATH", "") + ":" + _SBIN_PATH)


def debootstrap_argv(suite: str, rootfs: str, mirror: str) -> list[str]:
    debootstrap = _which("debootstrap")
    if debootstrap is None:
        raise InvalidInput("debootstrap is not installed: apt-get install debootstrap")
    argv = [debootstrap, "--variant=minbase", "--include=" + ",".join(INCLUDE),
            suite, rootfs, mirror]
    unshare = _which("unshare")
    if unshare is not None:
        # debootstrap mounts /proc and /sys (and maybe binds /dev) inside the target. In a
        # private mount namespace those mounts die with it, even if it is killed, so they
        # can never outlive the build and be reached by the removal of a failed build.
        argv = [unshare, "--mount", "--propagation", "private", *argv]
    return argv


def _debootstrap_log_tail(rootfs: str) -> str:
    # On failure debootstrap says "See <target>/debootstrap/debootstrap.log"; the cause is there.
    try:
        with open(os.path.join(rootfs, "debootstrap", "debootstrap.log"), errors="replace") as f:
            lines = [line.strip() for line in f.read().splitlines()[-40:] if line.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-2:])


def run_debootstrap(argv: list[str], rootfs: str, progress: Progress | None) -> None:
    parser = DebootstrapProgress(progress)
    env = dict(os.environ, LC_ALL="C", DEBIAN_FRONTEND="noninteractive",
               PATH=os.environ.get("PATH", "") + ":" + _SBIN_PATH)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", env=env,
                            start_new_session=True)  # own group: a cancel stops dpkg too
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            parser.feed(line)
        code = proc.wait()
    except BaseException:
        _stop_group(proc)
        raise
    if code != 0:
        detail = parser.summary()
        log = _debootstrap_log_tail(rootfs) if "debootstrap.log" in " ".join(parser.tail) else ""
        if log:
            detail += " | debootstrap.log: " + log
        raise KamraError(f"debootstrap failed (exit {code}): {detail}")


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def tidy(rootfs: str) -> None:
    """Make the fresh rootfs a template: nothing host- or instance-specific in it."""
    dev = os.path.join(rootfs, "dev")
    for name in os.listdir(dev):
        remove_tree(os.path.join(dev, name))  # kamra builds /dev at each start
    # apt clean: the downloaded .debs and package caches are a third of the size.
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/archives/partial/*",
                    "var/cache/apt/*.bin"):
        for path in glob.glob(os.path.join(rootfs, pattern)):
            remove_tree(path)
    with open(os.path.join(rootfs, "etc/hostname"), "w") as f:
        f.write("debian\n")
    os.chmod(os.path.join(rootfs, "etc/hostname"), 0o644)
    # An empty machine-id makes systemd generate a fresh one on each container's first
    # boot; the one dpkg wrote would otherwise be shared by every container.
    with open(os.path.join(rootfs, "etc/machine-id"), "w"):
        pass
    os.chmod(os.path.join(rootfs, "etc/machine-id"), 0o444)
    # debootstrap copies the host's resolv.conf: host configuration, not template content.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(rootfs, "etc/resolv.conf"))


def build_debian(rootfs: str, options: BuildOptions, progress: Progress | None = None
                 ) -> BuildResult:
    suite = options.suite
    if not isinstance(suite, str) or not _SUITE.match(suite):
        raise InvalidInput(f"invalid Debian suite {str(suite)[:40]!r}: give a release name "
                           "like 'bookworm' or 'trixie'")
    mirror = options.mirror or find_mirror(suite)
    argv = debootstrap_argv(suite, rootfs, mirror)
    emit(progress, "prepare", 0, None, f"debootstrap {suite} from {mirror}")
    run_debootstrap(argv, rootfs, progress)
    emit(progress, "finish", 0, 1, "removing /dev, apt caches and host-specific files")
    tidy(rootfs)
    emit(progress, "finish", 1, 1, "done")
    return BuildResult(source=f"debian {suite}", os=f"Debian {suite}", init=["/sbin/init"],
                       stop_signal="SIGRTMIN+3")
