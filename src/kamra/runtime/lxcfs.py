"""LXCFS, run and supervised by kamra: /proc files that tell a container the truth.

One lxcfs per data root, mounted at ``<root>/run/lxcfs``. It answers reads of its
proc files with figures of the reading process's cgroup (memory limit and usage,
cpuset, uptime of the container's init), so bind-mounting them over a container's
/proc/meminfo, /proc/cpuinfo, ... makes free, top and uptime inside show the
container's own limits and usage. It is a separate process, started detached, so it
keeps serving across kamrad restarts; kamra stops it only when no container runs.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time

from kamra.linux import libc
from kamra.paths import Layout

log = logging.getLogger("kamra.lxcfs")

# The /proc files LXCFS virtualizes that every container gets (when lxcfs offers them).
PROC_FILES = ("meminfo", "cpuinfo", "stat", "uptime", "diskstats", "swaps", "loadavg")


def _gone(pid: int) -> bool:
    """True once lxcfs has exited: reaped, or a zombie (reaped here when it is our child)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return True
    except ChildProcessError:
        pass  # started by an earlier kamrad: not ours to reap
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


class Lxcfs:
    def __init__(self, layout: Layout):
        self.mountpoint = os.path.join(layout.run, "lxcfs")
        self.pidfile = os.path.join(layout.run, "lxcfs.pid")
        self.logfile = os.path.join(layout.run, "lxcfs.log")

    def alive(self) -> bool:
        try:
            return os.path.ismount(self.mountpoint) and \
                os.path.exists(os.path.join(self.mountpoint, "proc", "meminfo"))
        except OSError:  # "transport endpoint is not connected": lxcfs died
            return False

    def ensure(self) -> str | None:
        """The mountpoint of a running lxcfs, starting one if needed; None without lxcfs."""
        if self.alive():
            return self.mountpoint
        binary = shutil.which("lxcfs")
        if binary is None:
            log.warning("lxcfs is not installed: /proc inside containers shows the host's "
                        "figures (apt-get install lxcfs)")
            return None
        self._unmount()  # a dead lxcfs leaves a mount that answers nothing
        os.makedirs(self.mountpoint, exist_ok=True)
        with open(self.logfile, "ab") as out:
            # -f keeps it a plain child we detach ourselves (a session of its own, so it
            # outlives kamrad); -l virtualizes loadavg too.
            subprocess.Popen([binary, "-f", "-l", "-p", self.pidfile, self.mountpoint],
                             stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                             start_new_session=True, close_fds=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.alive():
                return self.mountpoint
            time.sleep(0.02)
        log.error("lxcfs did not come up; see %s", self.logfile)
        return None

    def _pid(self) -> int | None:
        try:
            with open(self.pidfile) as f:
                pid = int(f.read().strip())
            with open(f"/proc/{pid}/comm") as f:
                return pid if f.read().strip() == "lxcfs" else None
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        """End our lxcfs (only when no container uses it) and remove its mount."""
        pid = self._pid()
        # Unmount first: lxcfs leaves its FUSE loop when its mount goes away; a signal
        # alone keeps it waiting for seconds.
        self._unmount()
        if pid is not None:
            # Its loadavg thread sleeps up to 5 s before it notices a SIGTERM; unmounted,
            # it holds nothing worth a graceful end.
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while not _gone(pid) and time.monotonic() < deadline:
                time.sleep(0.01)
        self._unmount()
        try:
            os.unlink(self.pidfile)
        except FileNotFoundError:
            pass

    def _unmount(self) -> None:
        try:
            if os.path.ismount(self.mountpoint):
                libc.umount(self.mountpoint, libc.MNT_DETACH)
        except OSError:
            try:
                libc.umount(self.mountpoint, libc.MNT_DETACH)
            except OSError:
                pass
