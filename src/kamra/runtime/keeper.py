"""The keeper: one small, single-threaded process per data root that outlives kamrad.

It is the fork server and child subreaper of every container init, so it alone
learns their exit statuses; it holds the console pty masters (a closed master hangs
the console up for good) and writes console.log; it forks exec helpers. kamrad talks
to it over ``<root>/run/keeper.sock`` with length-prefixed JSON messages
(``kamra.linux.fdpass``) and can be killed at any instant without harm.

Requests (the first message on a connection, ``{"op": ...}``):
  ping | list | watch | prepare | release | spawn | restore | exec | attach | signal |
  forget | shutdown
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import selectors
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

from kamra.linux import fdpass, libc, proc
from kamra.paths import Layout, bind_unix, remove_files, write_pid_file
from kamra.runtime import console as consolemod
from kamra.runtime.execute import exec_helper
from kamra.runtime.initproc import launcher, standby
from kamra.runtime.restorer import restore_helper

UNCLAIMED_MAX = 1024


@dataclass
class Init:
    name: str
    pid: int
    start: int | None
    master: int | None = None
    # The keeper keeps a slave descriptor open too: with no slave open, a pty master
    # reports hang-up on every poll, and the console would be lost between two programs.
    slave: int | None = None
    output: int | None = None  # read end of the init's output pipe (an OS init's stdio)
    log: consolemod.ConsoleLog | None = None
    status: int | None = None  # wait status once exited
    exited_at: float | None = None
    clients: dict[int, tuple[socket.socket, bytearray]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"pid": self.pid, "start": self.start, "status": self.status,
                "exited_at": self.exited_at, "console": self.master is not None}


@dataclass
class Standby:
    """A launcher forked in advance into a spare cgroup (see ``initproc.standby``)."""

    id: str
    pid: int
    ctrl: socket.socket
    conn: socket.socket | None = None  # the prepare request waiting for "ready"
    buffer: bytearray = field(default_factory=bytearray)


@dataclass
class PendingSpawn:
    conn: socket.socket
    req: dict
    report: socket.socket
    master: int | None = None  # the console pty, sent by the init
    slave: int | None = None
    output: int | None = None
    buffer: bytearray = field(default_factory=bytearray)


class Keeper:
    def __init__(self, layout: Layout):
        self.layout = layout
        self.sel = selectors.DefaultSelector()
        self.inits: dict[str, Init] = {}
        self.by_pid: dict[int, Init] = {}
        self.masters: dict[int, Init] = {}
        self.outputs: dict[int, Init] = {}
        self.pending: dict[int, PendingSpawn] = {}
        self.helpers: set[int] = set()
        self.unclaimed: dict[int, int] = {}
        self.watchers: list[socket.socket] = []
        self.standbys: dict[str, Standby] = {}
        self.preparing: dict[int, Standby] = {}
        self.running = True

    # -- set-up -------------------------------------------------------------------------
    def serve(self, listener: socket.socket) -> None:
        libc.prctl(libc.PR_SET_CHILD_SUBREAPER, 1)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, lambda *_: self._stop_if_idle())
        listener.setblocking(False)
        self.sel.register(listener, selectors.EVENT_READ, ("accept", listener))
        self.sel.register(wake_r, selectors.EVENT_READ, ("signal", wake_r))
        self._reap()
        while self.running:
            for key, _ in self.sel.select(timeout=None):
                kind, obj = key.data
                try:
                    getattr(self, "_on_" + kind)(obj)
                except Exception as exc:  # noqa: BLE001 - the keeper must survive anything
                    print(f"keeper: {kind}: {exc!r}", file=sys.stderr, flush=True)
        self._end_standbys()

    def _end_standbys(self) -> None:
        """Kill and reap every spare launcher: a zombie left to another reaper would keep
        its cgroup busy until that reaper gets to it."""
        spares = list(self.standbys.values()) + list(self.preparing.values())
        self.standbys.clear()
        self.preparing.clear()
        for spare in spares:
            spare.ctrl.close()
            try:
                os.kill(spare.pid, signal.SIGKILL)
                os.waitpid(spare.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.helpers.discard(spare.pid)

    def _stop_if_idle(self) -> None:
        if not any(i.status is None for i in self.inits.values()) and not self.pending:
            self.running = False

    # -- events -------------------------------------------------------------------------
    def _on_signal(self, fd: int) -> None:
        try:
            while os.read(fd, 512):
                pass
        except BlockingIOError:
            pass
        self._reap()

    def _on_accept(self, listener: socket.socket) -> None:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        conn.settimeout(5)
        try:
            req, fds = fdpass.recv(conn)
        except (OSError, ValueError):
            conn.close()
            return
        if req is None:
            conn.close()
            for fd in fds:
                os.close(fd)
            return
        handler = getattr(self, "_op_" + str(req.get("op")), None)
        if handler is None:
            self._reply(conn, {"error": f"unknown keeper op {req.get('op')!r}"}, close=True)
            for fd in fds:
                os.close(fd)
            return
        try:
            handler(conn, req, fds)
        except Exception as exc:  # noqa: BLE001
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._reply(conn, {"error": str(exc)}, close=True)

    @staticmethod
    def _reply(conn: socket.socket, message: dict, close: bool = False,
               fds: list[int] | tuple[int, ...] = ()) -> None:
        try:
            fdpass.send(conn, message, fds)
        except OSError:
            close = True
        if close:
            conn.close()

    # -- requests -----------------------------------------------------------------------
    def _op_ping(self, conn: socket.socket, req: dict, fds: list[int]) -> None:
        self._reply(conn, {"ok": True, "pid": os.getpid()}, close=True)

    def _op_list(self, conn: socket.socket, req: dict, fds: list[int]) -> None:
        self._reply(conn, {"inits": {n: i.to_json() for n, i in self.inits.items()}}, close=True)

    def _op_watch(self, conn: socket.socket, req: dict, fds: list[int]) -> None:
        self._reply(conn, {"ok": True})
        conn.setblocking(False)
        self.watchers.append(conn)
        self.sel.register(conn, selectors.EVENT_READ, ("watcher", conn))

    def _on_watcher(self, conn: socket.socket) -> None:
        if conn not in self.watchers:
            return
        try:
            if conn.recv(64):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self.sel.unregister(conn)
        self.watchers.remove(conn)
        conn.close()

    def _op_forget(self, conn: socket.socket, req: dict, fds: list[int]) -> None:
        init = self.inits.get(req["name"])
        if init is not None and init.status is None:
            self._reply(conn, {"error": f"{req['name']} is still running"}, close=True)
            return
        if init is not None:
            self._drop(init)
        self._reply(conn, {"ok": True}, close=True)

    def _op_signal(self, conn: socket.socket, req: dict, fds: list[int]) -> None:
        init = self.inits.get(req["name"])
        if init is None or init.status is not None:
            self._reply(conn, {"error": "not running", "gone": True}, close=True)
            return
        # Safe from pid reuse: the init is our child and is not reaped while it runs.
        os.kill(init.pid, int(req["signal"]))
        self._reply(conn, {"ok": True}, close=True)

    def _op_shutdown(self, conn: socket.socket, req: dict, fds: list[int]) -> None:
        live = sorted(n for n, i in self.inits.items() if i.status is None)
        if live and not req.get("force"):
            self._reply(conn, {"error": f"containers still running: {', '.join(live)}"},
                        close=True)
            return
        self._reply(conn, {"ok": True}, close=True)
        self.running = False

    def _make_room(self, name: str) -> None:
        """Forget ``name``'s ended init before a new one takes its place."""
        old = self.inits.get(name)
        if old is not None:
            if old.status is None:
                raise RuntimeError(f"{name} is already running (pid {old.pid})")
            self._drop(old)

    def _op_prepare(self, conn: socket.socket, req: dict, fds: list[int]) -> None:
        sid = str(req["id"])
        if sid in self.standbys:
            raise RuntimeError(f"standby {sid} exists")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            standby(theirs.fileno(), list(req["cgroup_procs"]), ready_w)
        self.helpers.add(pid)
        theirs.close()
        os.close(ready_w)
        os.set_blocking(ready_r, False)
        self.preparing[ready_r] = Standby(id=sid, pid=pid, ctrl=ours, conn=conn)
        self.sel.register(ready_r, selectors.EVENT_READ, ("ready", ready_r))

    def _on_ready(self, fd: int) -> None:
        spare = self.preparing.get(fd)
        if spare is None:
            return
        try:
            chunk = os.read(fd, 256)
        except BlockingIOError:
            return
        if chunk:
            spare.buffer += chunk
            return
        self.sel.unregister(fd)
        os.close(fd)
        del self.preparing[fd]
        assert spare.conn is not None
        answer = bytes(spare.buffer).decode(errors="replace")
        if answer.startswith("ok "):
            self.standbys[spare.id] = spare
            self._reply(spare.conn, {"ok": True, "pid": spare.pid}, close=True)
        else:
            spare.ctrl.close()
            self._reply(spare.conn, {"error": answer or "standby launcher died"}, close=True)
        spare.conn = None

    def _op_release(self, conn: socket.socket, req: dict, fds: list[int]) -> None:
        ids = list(self.standbys) if req["id"] == "*" else [req["id"]]
        released = []
        for sid in ids:
            spare = self.standbys.pop(sid, None)
            if spare is not None:
                spare.ctrl.close()  # end of stream: the standby exits
                released.append({"id": sid, "pid": spare.pid})
        self._reply(conn, {"ok": True, "released": released}, close=True)

    def _hand_to_standby(self, req: dict, fds: list[int]) -> bool:
        """Give ``req`` and ``fds`` to the standby it names, if there is one; whether
        it went (our copies of ``fds`` stay ours to close)."""
        spare = self.standbys.pop(req.get("standby") or "", None)
        if spare is None:
            return False
        try:
            fdpass.send(spare.ctrl, req, fds)
        finally:
            spare.ctrl.close()
        return True

    def _op_spawn(self, conn: socket.socket, req: dict, fds: list[int]) -> None:
        name = req["name"]
        self._make_room(name)
        # kamrad's wired network namespace travels last (kamra.network).
        netns_fd = fds.pop() if req.get("netns") and fds else None
        console = bool(req.get("console", True))
        if not console and len(fds) < 3:
            raise RuntimeError("spawn without a console needs three stdio descriptors")
        stdio = None if console else (fds[0], fds[1], fds[2])
        # A stream socket, not a pipe: the init sends its console pty over it.
        report, report_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        handed = [report_w.fileno(), *(stdio or ())] + \
            ([netns_fd] if netns_fd is not None else [])
        if not self._hand_to_standby(req, handed):
            pid = os.fork()
            if pid == 0:
                report.close()
                launcher(req, stdio, report_w.fileno(), netns_fd)
            self.helpers.add(pid)
        report_w.close()
        for fd in fds:
            os.close(fd)
        if netns_fd is not None:
            os.close(netns_fd)
        report.setblocking(False)
        self.pending[report.fileno()] = PendingSpawn(conn, req, report)
        self.sel.register(report, selectors.EVENT_READ, ("report", report.fileno()))

    def _on_report(self, fd: int) -> None:
        pending = self.pending.get(fd)
        if pending is None:
            return
        try:
            chunk, fds, _, _ = socket.recv_fds(pending.report, 4096, 3)
        except BlockingIOError:
            return
        except OSError:
            chunk, fds = b"", []
        for received in fds:
            os.set_inheritable(received, False)
        if fds:
            for old in (pending.master, pending.slave, pending.output):
                if old is not None:
                    os.close(old)
            pending.master, pending.slave, pending.output = (fds + [None, None])[:3]
        if chunk:
            pending.buffer += chunk
            return
        self.sel.unregister(pending.report)
        pending.report.close()
        del self.pending[fd]
        pid, error = 0, ""
        for line in pending.buffer.decode(errors="replace").splitlines():
            if line.startswith("pid "):
                pid = int(line[4:])
            elif line.startswith("error ") and not error:
                error = line[6:]
        if error or not pid:
            for fd in (pending.master, pending.slave, pending.output):
                if fd is not None:
                    os.close(fd)
            self._reply(pending.conn, {"error": error or "the container init failed to start"},
                        close=True)
            return
        if pending.req.get("console", True) and pending.master is None:
            self._reply(pending.conn, {"error": "the container init sent no console"},
                        close=True)
            return
        init = self._adopt(pending.req["name"], pid, pending.master, pending.slave,
                           pending.req.get("console_log"), pending.output)
        self._reply(pending.conn, {"pid": pid, "start": init.start}, close=True)

    def _adopt(self, name: str, pid: int, master: int | None, slave: int | None,
               console_log: str | None, output: int | None = None) -> Init:
        """Register a container init (just spawned, or restored by CRIU) and its console."""
        init = Init(name=name, pid=pid, start=proc.start_time(pid), master=master, slave=slave,
                    output=output)
        if output is not None:
            os.set_blocking(output, False)
            self.outputs[output] = init
            self.sel.register(output, selectors.EVENT_READ, ("output", output))
        self.inits[name] = init
        self.by_pid[pid] = init
        if init.master is not None:
            libc.set_winsize(init.master, 24, 80)
            init.log = consolemod.ConsoleLog(console_log) if console_log else None
            os.set_blocking(init.master, False)
            self.masters[init.master] = init
            self.sel.register(init.master, selectors.EVENT_READ, ("console", init.master))
        if pid in self.unclaimed:
            self._exited(init, self.unclaimed.pop(pid))
        return init

    def _op_restore(self, conn: socket.socket, req: dict, fds: list[int]) -> None:
        """Fork a helper that runs ``criu restore`` (kamra.runtime.restorer); it hands
        the restored init and its new console back over ``adopt``."""
        name = req["name"]
        self._make_room(name)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # A standby is in the container's cgroup already (see initproc.standby).
        if not self._hand_to_standby(req, [conn.fileno(), theirs.fileno(), *fds]):
            pid = os.fork()
            if pid == 0:
                ours.close()
                restore_helper(conn, theirs, req, fds)
            self.helpers.add(pid)
        theirs.close()
        conn.close()
        for fd in fds:
            os.close(fd)
        ours.settimeout(5)
        self.sel.register(ours, selectors.EVENT_READ, ("adopt", ours))

    def _on_adopt(self, sock: socket.socket) -> None:
        self.sel.unregister(sock)
        try:
            message, fds = fdpass.recv(sock)
        except (OSError, ValueError):
            message, fds = None, []
        try:
            if message is None:
                return  # the restore failed; the helper told kamrad why
            name = message["name"]
            if name in self.inits and self.inits[name].status is None:
                raise RuntimeError(f"{name} is already running")
            handed = list(fds)
            master = handed.pop(0) if message.get("console") and handed else None
            output = handed.pop(0) if message.get("output") and handed else None
            slave = None
            if master is not None:
                # The keeper keeps a slave open too (see Init.slave).
                slave = fcntl.ioctl(master, libc.TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY)
            init = self._adopt(name, int(message["pid"]), master, slave,
                               message.get("console_log"), output)
            fdpass.send(sock, {"ok": True, "start": init.start})
        except Exception as exc:  # noqa: BLE001 - tell the helper, keep serving
            for fd in fds:
                os.close(fd)
            try:
                fdpass.send(sock, {"error": str(exc)})
            except OSError:
                pass
        finally:
            sock.close()

    def _op_exec(self, conn: socket.socket, req: dict, fds: list[int]) -> None:
        pid = os.fork()
        if pid == 0:
            conn.settimeout(None)
            exec_helper(conn, req, fds)
        self.helpers.add(pid)
        for fd in fds:
            os.close(fd)
        conn.close()

    def _op_attach(self, conn: socket.socket, req: dict, fds: list[int]) -> None:
        init = self.inits.get(req["name"])
        if init is None or init.status is not None:
            self._reply(conn, {"error": f"{req['name']} is not running"}, close=True)
            return
        if init.master is None:
            self._reply(conn, {"error": f"{req['name']} has no console: its init runs with "
                                        "the stdio of the client that started it"}, close=True)
            return
        self._reply(conn, {"ok": True})
        conn.settimeout(2)
        init.clients[conn.fileno()] = (conn, bytearray())
        self.sel.register(conn, selectors.EVENT_READ, ("client", (init, conn)))

    # -- consoles -----------------------------------------------------------------------
    def _on_console(self, fd: int) -> None:
        # An event of this very select() round may refer to a console that an earlier
        # event of the round closed (its init exited): skip it.
        init = self.masters.get(fd)
        if init is not None:
            self._drain(init)

    def _on_output(self, fd: int) -> None:
        init = self.outputs.get(fd)
        if init is not None and not self._drain(init, fd):
            self._close_output(init)  # every writer is gone

    def _close_output(self, init: Init) -> None:
        if init.output is not None:
            self.sel.unregister(init.output)
            del self.outputs[init.output]
            os.close(init.output)
            init.output = None

    def _drain(self, init: Init, fd: int | None = None) -> bool:
        """Copy console output (of the pty, or of ``fd``, the init's output pipe) to
        console.log and every attached client. False at the pipe's end of file."""
        source = init.master if fd is None else fd
        if source is None:
            return True
        while True:
            try:
                data = os.read(source, 65536)
            except BlockingIOError:
                return True
            except OSError as exc:
                if exc.errno == errno.EIO:  # no slave open any more: nothing left to read
                    return True
                raise
            if not data:
                return fd is None
            if init.log is not None:
                init.log.write(data)
            for cfd, (client, _) in list(init.clients.items()):
                try:
                    client.sendall(data)
                except OSError:
                    self._detach(init, cfd)

    def _unwatch_master(self, init: Init) -> None:
        if init.master is not None and init.master in self.masters:
            self.sel.unregister(init.master)
            del self.masters[init.master]

    def _on_client(self, pair: tuple[Init, socket.socket]) -> None:
        init, conn = pair
        cfd = conn.fileno()
        if cfd < 0 or cfd not in init.clients:
            return  # detached earlier in this select() round
        try:
            data = conn.recv(65536)
        except (BlockingIOError, TimeoutError):
            return
        except OSError:
            data = b""
        if not data:
            self._detach(init, cfd)
            return
        buffer = init.clients[cfd][1]
        buffer += data
        for kind, payload in consolemod.parse_frames(buffer):
            if init.master is None:
                break
            if kind == consolemod.DATA:
                try:
                    os.write(init.master, payload)
                except OSError:
                    pass
            elif kind == consolemod.WINSIZE:
                rows, cols = consolemod.parse_winsize(payload)
                libc.set_winsize(init.master, rows, cols)

    def _detach(self, init: Init, cfd: int) -> None:
        client, _ = init.clients.pop(cfd, (None, None))
        if client is not None:
            try:
                self.sel.unregister(client)
            except (KeyError, ValueError):
                pass
            client.close()

    # -- exits --------------------------------------------------------------------------
    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.helpers:
                self.helpers.discard(pid)
                continue
            init = self.by_pid.get(pid)
            if init is None:
                if len(self.unclaimed) >= UNCLAIMED_MAX:
                    self.unclaimed.pop(next(iter(self.unclaimed)))
                self.unclaimed[pid] = status
                continue
            self._exited(init, status)

    def _exited(self, init: Init, status: int) -> None:
        print(f"keeper: {init.name} init {init.pid} exited, wait status {status}",
              file=sys.stderr, flush=True)
        self.by_pid.pop(init.pid, None)
        init.status = status
        init.exited_at = time.time()
        self._drain(init)
        for cfd in list(init.clients):
            self._detach(init, cfd)
        self._close_console(init)
        event = {"event": "exit", "name": init.name, "pid": init.pid, "start": init.start,
                 "status": status}
        for conn in list(self.watchers):
            try:
                conn.setblocking(True)
                conn.settimeout(2)
                fdpass.send(conn, event)
                conn.setblocking(False)
            except OSError:
                self.sel.unregister(conn)
                self.watchers.remove(conn)
                conn.close()

    def _close_console(self, init: Init) -> None:
        if init.output is not None:
            self._drain(init, init.output)
            self._close_output(init)
        self._unwatch_master(init)
        for attr in ("master", "slave"):
            fd = getattr(init, attr)
            if fd is not None:
                os.close(fd)
                setattr(init, attr, None)
        if init.log is not None:
            init.log.close()
            init.log = None

    def _drop(self, init: Init) -> None:
        for cfd in list(init.clients):
            self._detach(init, cfd)
        self._close_console(init)
        self.inits.pop(init.name, None)
        self.by_pid.pop(init.pid, None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kamra-keeper")
    parser.add_argument("--root", required=True)
    parser.add_argument("--foreground", action="store_true")
    args = parser.parse_args(argv)
    layout = Layout.at(args.root)
    layout.ensure()
    ready_r, ready_w = os.pipe()
    if not args.foreground:
        # Detach: the keeper must not be a child of the kamrad that started it.
        if os.fork() > 0:
            os.close(ready_w)
            ok = os.read(ready_r, 1)
            return 0 if ok == b"1" else 1
        os.close(ready_r)
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.close(devnull)
    os.chdir("/")
    libc.set_process_name("kamra-keeper")
    listener = bind_unix(layout.keeper_socket)
    write_pid_file(layout.keeper_pid)
    os.write(ready_w, b"1")
    os.close(ready_w)
    keeper = Keeper(layout)
    try:
        keeper.serve(listener)
    finally:
        listener.close()
        remove_files(layout.keeper_socket, layout.keeper_pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
