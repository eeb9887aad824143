"""The restore helper: a forked child of the keeper that runs ``criu restore``.

Restored processes must end up where a started init would: in the container's cgroup
(the helper joins it before CRIU forks anything; CRIU leaves cgroups alone) and as a
child of the keeper, which is their subreaper and so learns their exit status. With
``rst_sibling`` the restored init is the helper's child; once the helper exits, the
keeper inherits it.

Protocol on the session socket with kamrad (``kamra.linux.fdpass`` messages):
  helper -> kamrad  ``{"notify": script, "pid": pid}`` for the scripts kamrad asked to
                    hear (``req["forward"]``), answered with ``{"ok": true}`` or
                    ``{"error": ...}`` (CRIU then gives up and undoes the restore);
  helper -> kamrad  ``{"pid": pid, "start": ticks}`` or ``{"error": ..., "log": path}``.
The new console master CRIU hands over (``orphan-pts-master``) goes to the keeper
over ``adopt`` together with the pid, before kamrad hears of success.
"""

from __future__ import annotations

import os
import socket

# Imported here, in the keeper, not in each forked helper (about 10 ms per restore).
from kamra.checkpoint.criu import Criu, CriuError
from kamra.linux import fdpass
from kamra.runtime import child


def restore_helper(conn: socket.socket, adopt: socket.socket, req: dict,
                   fds: list[int]) -> None:
    """Never returns."""
    try:
        child.clean_slate({conn.fileno(), adopt.fileno(), *fds})
        child.set_name("kamra-restore")
        conn.settimeout(None)
        _run(conn, adopt, req, fds)
    except BaseException as exc:  # noqa: BLE001 - report anything, never return
        try:
            fdpass.send(conn, {"error": f"restore: {exc}"})
        except OSError:
            pass
    os._exit(0)


def _ask(conn: socket.socket, script: str, pid: int) -> None:
    fdpass.send(conn, {"notify": script, "pid": pid})
    reply, extra = fdpass.recv(conn)
    for fd in extra:
        os.close(fd)
    if reply is None:
        raise RuntimeError(f"kamrad went away during {script}")
    if "error" in reply:
        raise RuntimeError(reply["error"])


def _run(conn: socket.socket, adopt: socket.socket, req: dict, fds: list[int]) -> None:
    child.write_cgroup_procs(req.get("cgroup_procs", []))
    opts = dict(req["opts"])
    opts["images_dir_fd"] = fds[0]  # opened by CRIU through /proc/<us>/fd
    forward = set(req.get("forward", ()))
    output_r = output_w = -1
    if req.get("output_key"):
        # The init's output pipe (its other end was the keeper's): a new one takes its place.
        output_r, output_w = os.pipe2(os.O_CLOEXEC)
        opts["inherit_fd"] = [{"key": req["output_key"], "fd": output_w}]
    master: list[int] = []
    restored: list[int] = []

    def notify(script: str, pid: int, passed: list[int]) -> None:
        if script == "orphan-pts-master":
            master.extend(passed)
            return
        for fd in passed:
            os.close(fd)
        if pid:  # CRIU names the root task at setup-namespaces and post-restore only
            restored[:] = [pid]
        if script in forward:
            _ask(conn, script, pid or (restored[0] if restored else 0))

    try:
        answer = Criu(req.get("criu") or "criu").run(
            "RESTORE", opts, notify=notify, log_path=req.get("log_path"),
            timeout=req.get("timeout"), pass_fds=[output_w] if output_w >= 0 else [])
    except CriuError as exc:
        fdpass.send(conn, {"error": exc.message, "log": exc.log_path})
        return
    finally:
        if output_w >= 0:
            os.close(output_w)
    pid = int(answer.get("restore", {}).get("pid") or (restored[0] if restored else 0))
    if not pid:
        fdpass.send(conn, {"error": "CRIU restored no process"})
        return
    fdpass.send(adopt, {"name": req["name"], "pid": pid, "console_log": req.get("console_log"),
                        "console": bool(master), "output": output_r >= 0},
                master[:1] + ([output_r] if output_r >= 0 else []))
    reply, _ = fdpass.recv(adopt)
    if not reply or "error" in reply:
        fdpass.send(conn, {"error": (reply or {}).get("error", "the keeper did not adopt "
                                                                "the restored init")})
        return
    fdpass.send(conn, {"pid": pid, "start": reply.get("start")})
