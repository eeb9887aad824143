"""kamra's own network lock for a restore into a new network namespace.

While CRIU restores TCP connections, nothing may reach the container's sockets (a packet
for a port not yet restored would be answered with a reset). CRIU's own nftables lock
does that, but it lifts it by deleting its table, and removing hooks waits for an RCU
grace period: 13 ms here, between the last restored socket and the resumed tasks.

So for a restore into an empty namespace (the one kamra wires) CRIU is told to skip
locking and kamra locks instead, with the same rules (drop everything in and out but
packets with CRIU's socket mark), made before the namespace is wired. At CRIU's
``network-unlock`` a rule accepting everything goes to the top of both chains, a commit
that waits for nothing (about half a millisecond), and the table is deleted in the
background while the tasks run.
"""

from __future__ import annotations

import os
import threading

from kamra.errors import KamraError
from kamra.network import netns
from kamra.network.nft import open_backend

TABLE = "inet kamra-restore-lock"
SOCCR_MARK = 0xC114  # CRIU's mark for its own packets (soccr), let through as CRIU does
_LOCK = f"""table {TABLE} {{
  chain input {{ type filter hook input priority 0; policy drop; meta mark {SOCCR_MARK:#x} accept; }}
  chain output {{ type filter hook output priority 0; policy drop; meta mark {SOCCR_MARK:#x} accept; }}
}}
"""
_OPEN = f"insert rule {TABLE} input accept\ninsert rule {TABLE} output accept\n"


class RestoreLock:
    """Locks the namespace ``ns_fd`` at once; ``release`` lets traffic through, ``close``
    frees what is left (the namespace of a failed restore goes with its tasks)."""

    def __init__(self, ns_fd: int):
        self._fd = os.dup(ns_fd)
        self._backend = None
        self._released = False
        try:
            # (A libnftables context stays in the namespace it was made in; the nft
            # command, its fallback, runs in the caller's: so every call goes there.)
            self._backend = netns.run_in_netns(self._fd, open_backend)
            self._run(_LOCK, "lock the network")
        except BaseException:
            self._free()
            raise

    def _run(self, commands: str, what: str) -> None:
        assert self._backend is not None
        ok, _, error = netns.run_in_netns(self._fd, self._backend.run, commands)
        if not ok:
            raise KamraError(f"{what}: nftables: {error.strip()}")

    def release(self) -> None:
        self._run(_OPEN, "unlock the network")
        self._released = True  # the thread below frees the rest
        threading.Thread(target=self._drop, name="kamra-drop-restore-lock",
                         daemon=True).start()

    def _drop(self) -> None:
        try:
            self._run(f"delete table {TABLE}\n", "drop the restore lock")
        except KamraError:
            pass  # the namespace went with its tasks; nothing is left to drop
        finally:
            self._free()

    def close(self) -> None:
        """The restore ended without ``release`` (it failed)."""
        if not self._released:
            self._free()

    def _free(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
