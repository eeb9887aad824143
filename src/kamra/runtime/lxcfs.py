"""LXCFS, run and supervised by kamra: /proc files that tell a container the truth.

One lxcfs per data root, mounted at ``<root>/run/lxcfs``. It answers reads of its
proc files with figures of the reader's container (memory limit and usage,
cpuset, uptime of the container's init), so bind-mounting them over a container's
/proc/meminfo, /proc/cpuinfo, ... makes free, top and uptime inside show the
container's own limits and usage. It is a separate process, started detached, so it
keeps serving across kamrad restarts; kamra stops it only when no container runs.

Whose figures: lxcfs finds the init of the reader's pid namespace and reads that init's
cgroup (``<container>/payload`` in every hierarchy; on a hybrid host the v1 memory
hierarchy, never the controller-less cgroup2 one). Processes started with ``exec`` join
the same payload cgroup, and lxcfs walks up to ``<container>`` for the limit, so
MemTotal is the container's limit and MemFree (limit - usage) follows every process in
it, on each read (lxcfs caches no figures between reads).

Known limits, not ours to fix here (measured on Linux 6.18 with lxcfs 5.0.3):

* sendfile()/splice() readers (busybox ``cat`` is one) go through the kernel's page cache
  even though lxcfs opens its files with direct I/O (a kernel fix was posted in 2026:
  "fuse: use copy_splice_read() for FOPEN_DIRECT_IO splice read"). Such a read stops at
  the file size the kernel last learnt, which is the host file's size or the length of
  the shortest answer any reader got since, and under concurrent reads it can return
  the page another container's reader filled. Plain read() (``dd``, ``free``, ``top``,
  most programs) is always exact.
* lxcfs 5.0.3 counts tmpfs/shm pages as reclaimable cache in MemAvailable (fixed upstream
  in lxcfs 6.0), so a file in /dev/shm or /tmp lowers MemFree but not MemAvailable.
* busybox ``free`` takes total/used/free from sysinfo(2), which lxcfs cannot answer: only
  its "available" column comes from /proc/meminfo. procps ``free`` reads /proc/meminfo
  (used = MemTotal - MemAvailable).

/proc/uptime is the age of the container's init: a standby launcher (cgroup v1) forks the
init only when its container starts, so the time the spare waited is not counted.
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


def host_has_swap(meminfo: str = "/proc/meminfo") -> bool:
    """Whether the host has swap now (SwapTotal > 0); True when it cannot tell."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("SwapTotal:"):
                    return int(line.split()[1]) > 0
    except (OSError, ValueError, IndexError):
        pass
    return True


def lxcfs_options(help_text: str, swap: bool) -> list[str]:
    """lxcfs's command-line options beyond ``-f -p PIDFILE``, for the flags this lxcfs
    offers (``help_text``: what ``lxcfs --help`` printed).

    * ``-l``: virtualize /proc/loadavg too.
    * ``--enable-pidfd``: lxcfs caches, per pid namespace, which pid is its init, and
      without pidfds checks the entry only by the ctime (whole seconds) of
      /proc/<pid>; pids wrap quickly (pid_max is 32768 on small hosts) and namespace
      inode numbers are reused as soon as a container stops, so a reused entry could
      point a new container's reads at an unrelated process's cgroup. A pidfd cannot be
      fooled by reuse (lxcfs 7 makes it the default).
    * ``--disable-swap`` when the host has no swap: lxcfs 5.0.3 then computes SwapFree
      as 0 minus the container's memsw-minus-mem usage, two counters it reads at
      different instants, and prints 18446744073709551360 kB now and then (a line that
      also makes /proc/meminfo longer than the size the kernel believes it has, so a
      sendfile reader loses its last line). Without swap, 0/0 is the truth anyway.
    """
    options = []
    if "--enable-loadavg" in help_text:
        options.append("-l")
    if "--enable-pidfd" in help_text:
        options.append("--enable-pidfd")
    if not swap and "--disable-swap" in help_text:
        options.append("-u")
    return options


def _help_text(binary: str) -> str:
    try:
        done = subprocess.run([binary, "--help"], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout + done.stderr


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
        options = lxcfs_options(_help_text(binary), host_has_swap())
        with open(self.logfile, "ab") as out:
            # -f keeps it a plain child we detach ourselves (a session of its own, so it
            # outlives kamrad).
            subprocess.Popen([binary, "-f", *options, "-p", self.pidfile, self.mountpoint],
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
