"""Where CRIU keeps what it learnt about the kernel, so that it probes only once a boot.

Every CRIU process (a dump, a restore, a page server, a lazy-pages daemon) starts by
probing the kernel's features (``kerndat``), some 30 ms here, unless it finds the cache
an earlier one left. CRIU keeps that cache only on a tmpfs (so that a reboot, a new
kernel, empties it), at a path fixed when it is built: ``/run/criu.kdat`` by default.
Where ``/run`` is not a tmpfs (as on this project's machines) every CRIU process probes
again, inside the frozen container's downtime for a restore.

So ``scripts/install_criu.py`` builds CRIU with ``RUNDIR`` set to ``KDAT_DIR``, a
directory on ``/dev/shm``, the tmpfs every Linux host has. ``/dev/shm`` is writable by
everyone, and CRIU reads the cache it finds there as root: before each CRIU run kamra
makes sure the directory is root's own, mode 0700 and not a link, moving away anything
else that took its name (the sticky bit lets nobody else rename or delete it once it is
root's). A CRIU built otherwise (a distribution's) simply does not look there.
"""

from __future__ import annotations

import os
import shutil
import stat

# The same path is in scripts/install_criu.py (RUNDIR of the build).
KDAT_DIR = "/dev/shm/kamra-criu"


def _ours(st: os.stat_result) -> bool:
    return (stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
            and stat.S_IMODE(st.st_mode) == 0o700)


def ensure_dir(path: str = KDAT_DIR) -> bool:
    """Make ``path`` a directory only this user can touch; whether it now is one."""
    for _ in range(3):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                continue  # someone was quicker: look at what they made
            except OSError:
                return False  # no /dev/shm: CRIU probes the kernel each time
            continue
        except OSError:
            return False
        if _ours(st):
            return True
        aside = f"{path}.refused-{os.urandom(4).hex()}"
        try:
            os.rename(path, aside)
            if stat.S_ISDIR(os.lstat(aside).st_mode):
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.unlink(aside)
        except OSError:
            return False
    return False
