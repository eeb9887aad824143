"""A driver for CRIU's RPC: one ``criu swrk <fd>`` worker per request.

``criu swrk`` serves one request on a SOCK_SEQPACKET socket it inherits (one protobuf
message per packet, see ``rpc``), then exits. Unlike ``criu service`` it needs no
daemon, runs with our privileges and namespaces, and is the only mode that accepts
``rst_sibling``, ``inherit_fd`` and ``ps.fd``.

Descriptors named in the options are resolved in two different processes:

- ``images_dir_fd``, ``work_dir_fd``, ``status_fd`` and ``pidfd_store_sk`` are opened
  by CRIU through ``/proc/<peer>/fd/<n>``, where the peer is whoever created the socket
  pair (SO_PEERCRED), i.e. *this* process: they must stay open here during ``run``;
  passing them is not needed.
- ``inherit_fd[].fd`` and ``ps.fd`` are used as they are inside the criu process: list
  them in ``pass_fds``, which keeps their numbers in the child.

With ``rst_sibling`` the restored root task is created with CLONE_PARENT, so it is a
child of the caller (reap it with ``os.waitpid``), not of the short-lived criu worker.
"""

from __future__ import annotations

import array
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

from kamra.checkpoint import kdat, rpc

# (script name, pid or 0, received descriptors: the callee's to close)
Notify = Callable[[str, int, list[int]], None]

_MAX_PACKET = 1 << 16  # CRIU's answers are a few hundred bytes
_MAX_FDS = 16
_REAP_GRACE = 30.0  # criu exits right after its answer; a hung one is killed after this
_TIMESTAMP = re.compile(r"^\(\s*[\d.]+\)\s*")


# Errors that say nothing about the container: raising the descriptor limit needs
# CAP_SYS_RESOURCE, absent in some sandboxes (CRIU goes on), and the closing summary.
_NOISE = re.compile(r"Can't setup RLIMIT_NOFILE|(Dumping|Restoring|Pre-dumping) FAILED")


def log_errors(path: str, limit: int = 3) -> list[str]:
    """The last ``limit`` "Error (...)" lines of a CRIU log, timestamps stripped."""
    try:
        with open(path, errors="replace") as f:
            errors = [_TIMESTAMP.sub("", line.strip()) for line in f
                      if "Error (" in line and not _NOISE.search(line)]
    except OSError:
        return []
    return errors[-limit:] if limit > 0 else []


class CriuError(Exception):
    """CRIU could not do what it was asked; the message says why, as far as CRIU told."""

    def __init__(self, message: str, *, log_path: str | None = None,
                 errno: int | None = None):
        super().__init__(message)
        self.message = message
        self.log_path = log_path
        self.errno = errno


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _receive(sock: socket.socket, deadline: float | None) -> tuple[dict[str, Any], list[int]]:
    """One answer from CRIU and the descriptors that came with it (SCM_RIGHTS)."""
    sock.settimeout(None if deadline is None else max(deadline - time.monotonic(), 1e-3))
    data, ancillary, flags, _ = sock.recvmsg(
        _MAX_PACKET, socket.CMSG_SPACE(_MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, type_, payload in ancillary:
        if level == socket.SOL_SOCKET and type_ == socket.SCM_RIGHTS:
            fds.extend(array.array("i", payload[:len(payload) - len(payload) % 4]))
    try:
        if not data:
            raise EOFError("criu closed the socket")
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise EOFError("an answer from criu was truncated")
        return rpc.decode("criu_resp", data), fds
    except (EOFError, ValueError) as exc:
        _close_all(fds)
        raise EOFError(str(exc)) from exc


def _converse(sock: socket.socket, request: dict[str, Any], notify: Notify | None,
              deadline: float | None) -> tuple[dict[str, Any], Exception | None]:
    """Send ``request`` and answer notifications: CRIU's final answer, and the first
    exception a callback raised."""
    callback_error: Exception | None = None
    sock.send(rpc.encode("criu_req", request))
    while True:
        answer, fds = _receive(sock, deadline)
        if answer.get("type") != rpc.REQ_TYPES["NOTIFY"]:
            _close_all(fds)  # only notifications carry descriptors
            return answer, callback_error
        ok = True
        if notify is None:  # notify_scripts set in opts without a callback
            _close_all(fds)
        else:
            note = answer.get("notify", {})
            # Called even after a failure: CRIU undoes its work through the same scripts
            # (network-unlock after network-lock), and the callee must see that too.
            try:
                notify(note.get("script", ""), note.get("pid", 0), fds)
            except Exception as exc:
                ok = False
                callback_error = callback_error or exc
        reply = {"type": rpc.REQ_TYPES["NOTIFY"], "notify_success": ok}
        sock.send(rpc.encode("criu_req", reply))


def end(proc: subprocess.Popen[bytes]) -> None:
    """Kill a CRIU daemon kamra started (``page_server``, ``lazy_pages``) and whatever it
    forked, then reap it. Killed while it probes the kernel, CRIU leaves the child it
    forked for a ptrace probe sleeping forever (seen here): each daemon runs in a
    process group of its own, and the whole group goes."""
    if proc.returncode is None:  # not reaped yet: its pid (and group) is still its own
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _reap(proc: subprocess.Popen[bytes], *, answered: bool) -> None:
    if answered:
        try:
            proc.wait(_REAP_GRACE)
            return
        except subprocess.TimeoutExpired:
            pass
    proc.kill()
    proc.wait()


def _stderr_tail(stderr: IO[bytes]) -> str:
    stderr.seek(0)
    lines = stderr.read().decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else ""


def _failure(kind: str, answer: dict[str, Any], log_path: str | None, said: str) -> CriuError:
    """The error for a failed answer: the log's last errors, else CRIU's own message.

    The log goes first: cr_errmsg is the *first* error CRIU logged, which may be one it
    went on after (without CAP_SYS_RESOURCE every restore logs "Can't setup
    RLIMIT_NOFILE"), while the last lines name what made it give up.
    """
    detail = "; ".join(log_errors(log_path)) if log_path else ""
    if not detail:
        detail = (answer.get("cr_errmsg") or "").strip()
    if not detail:
        detail = (f"no error in its log {log_path}" if log_path
                  else f"no log_path given; criu said: {said or 'nothing'}")
    return CriuError(f"criu {kind.lower()} failed: {detail}", log_path=log_path,
                     errno=answer.get("cr_errno"))


class Criu:
    """Runs CRIU requests through ``criu swrk``; ``binary`` is looked up in PATH."""

    def __init__(self, binary: str = "criu"):
        self.binary = binary
        kdat.ensure_dir()  # CRIU's kernel-probe cache, safe to read (kamra.checkpoint.kdat)

    def run(self, kind: str, opts: Mapping[str, Any], *, pass_fds: Sequence[int] = (),
            notify: Notify | None = None, log_path: str | None = None,
            timeout: float | None = None) -> dict[str, Any]:
        """Serve one request of ``kind`` (a ``rpc.REQ_TYPES`` name) and return CRIU's answer.

        ``opts`` is a ``criu_opts`` dict (see the module docstring for its descriptors).
        ``notify`` is called for each action script CRIU reaches ("pre-dump",
        "network-lock", "post-restore", ...) with the pid CRIU names (setup-namespaces,
        post-restore) or 0, and the descriptors that came along (orphan-pts-master),
        which become the callee's. If it raises, CRIU is told the script failed and the
        exception is raised once CRIU has answered, chained to the CriuError if CRIU gave
        up because of it. ``log_path`` is where ``opts["log_file"]`` lands on this host,
        read to explain a failure. ``timeout`` bounds the whole request; on expiry the
        worker is killed (tasks it seized are released by the kernel when it dies).
        """
        if kind not in rpc.REQ_TYPES or kind == "NOTIFY":
            raise ValueError(f"not a CRIU request: {kind!r}")
        if opts.get("exec_cmd"):
            # The worker would exec the command after restoring and never exit.
            raise ValueError("exec_cmd is not supported: restore with rst_sibling instead")
        opts = dict(opts)
        if notify is not None:
            opts["notify_scripts"] = True
        request = {"type": rpc.REQ_TYPES[kind], "opts": opts}
        return self._call(kind, request, pass_fds, notify, log_path, timeout)

    def page_server(self, images_dir: str, sock: int) -> subprocess.Popen[bytes]:
        """Start ``criu page-server`` writing the pages a dump sends over the connected
        socket ``sock`` (the dump's ``ps.fd`` peer) into ``images_dir``, logging to
        ``page-server.log`` there. It exits once the dump says it is done
        (PS_IOV_FORCE_CLOSE): wait for it before reading the images, as it flushes
        them on the way out. The caller closes its copy of ``sock``."""
        return subprocess.Popen(
            [self.binary, "page-server", "--images-dir", images_dir,
             "--ps-socket", str(sock), "--log-file", "page-server.log", "-v4"],
            pass_fds=(sock,), close_fds=True, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)  # a group of its own: see end()

    def lazy_pages(self, images_dir: str, sock: int) -> subprocess.Popen[bytes]:
        """Start ``criu lazy-pages`` for a restore from ``images_dir`` with lazy pages:
        it serves the restored tasks' page faults (and then the rest, in the
        background) with pages it asks for over the connected socket ``sock``, at whose
        other end the dump's CRIU serves them. It listens for the restore on
        ``lazy-pages.socket`` in ``images_dir``, logs to ``lazy-pages.log`` there and
        exits once every page arrived. The caller closes its copy of ``sock``."""
        return subprocess.Popen(
            [self.binary, "lazy-pages", "--page-server", "--images-dir", images_dir,
             "--ps-socket", str(sock), "--log-file", "lazy-pages.log", "-v4"],
            pass_fds=(sock,), close_fds=True, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)  # a group of its own: see end()

    def version(self) -> tuple[int, int, int]:
        """(major, minor, sublevel) of the CRIU binary."""
        answer = self._call("VERSION", {"type": rpc.REQ_TYPES["VERSION"]}, (), None, None, 60)
        v = answer.get("version", {})
        return v.get("major_number", 0), v.get("minor_number", 0), v.get("sublevel", 0)

    def features(self) -> dict[str, bool]:
        """Which of mem_track, lazy_pages, pidfd_store this CRIU and kernel support."""
        wanted = {"mem_track": True, "lazy_pages": True, "pidfd_store": True}
        request = {"type": rpc.REQ_TYPES["FEATURE_CHECK"], "features": wanted}
        answer = self._call("FEATURE_CHECK", request, (), None, None, 60)
        return dict(answer.get("features", {}))

    def _call(self, kind: str, request: dict[str, Any], pass_fds: Sequence[int],
              notify: Notify | None, log_path: str | None,
              timeout: float | None) -> dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # A file, not a pipe: a page server forked by criu keeps it open after criu exits.
        with tempfile.TemporaryFile() as stderr:
            try:
                with child:
                    proc = subprocess.Popen(
                        [self.binary, "swrk", str(child.fileno())],
                        pass_fds=(child.fileno(), *pass_fds), close_fds=True,
                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
            except BaseException:
                sock.close()
                raise
            answer: dict[str, Any] | None = None
            callback_error: Exception | None = None
            broken: Exception | None = None
            try:
                answer, callback_error = _converse(sock, request, notify, deadline)
            except (OSError, EOFError) as exc:
                broken = exc
            finally:
                sock.close()  # also ends a PRE_DUMP worker, which waits for a next request
                _reap(proc, answered=answer is not None)
            said = _stderr_tail(stderr)
        if answer is None:
            detail = "; ".join(log_errors(log_path)) if log_path else ""
            if isinstance(broken, TimeoutError):
                why = f"timed out after {timeout} s"
                detail = detail or said
            else:
                why = "stopped answering"
                detail = detail or said or str(broken)
            raise CriuError(f"criu {kind.lower()} {why}" + (f": {detail}" if detail else ""),
                            log_path=log_path) from broken
        if answer.get("success"):
            if callback_error is not None:
                # CRIU ignores some failed scripts (post-resume): its work is done.
                callback_error.add_note(f"criu {kind.lower()} succeeded regardless")
                raise callback_error
            return answer
        error = _failure(kind, answer, log_path, said)
        if callback_error is not None:
            raise callback_error from error
        raise error
