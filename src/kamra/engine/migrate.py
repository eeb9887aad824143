"""Moving a container to another kamra host: ``kamra migrate NAME REMOTE``.

Authenticated TLS connections (kamra.remote) carry everything; the source drives:

  check    the target: name free, same template (digest), addresses free, plan known
           and its limits ones the target can give; a missing template is sent
  files    while the container runs, rounds of its upper directory: all, then what
           changed during the previous round, until a round is small
  pages    (live) a second connection: the target starts ``criu page-server`` behind
           it, and the source's CRIU dump streams the memory pages into it
  send     with the tasks frozen (CRIU's post-dump) or the container stopped (restart
           mode): the other images and the last file delta, as one archive; the target
           imports it and puts the pages beside the images
  restore  (live) the target restores the processes and stops at CRIU's post-restore:
           all in place, nothing running, the network locked; it answers "restored"
  resume   the commit: the source records ``migrating`` durably, then says ``resume``;
           the target announces the address (host route, proxy ARP, gratuitous ARP),
           lets CRIU unlock the network and resume the tasks, and answers; the source's
           frozen tasks are killed (post-dump returns) and its copy removed; ``done``
           tells the target the answer arrived. Restart mode starts it instead.

With ``--lazy`` (post-copy) the dump keeps the pages and the order changes: after
``send`` the source commits, then asks for ``restore`` with lazy pages; the target
starts ``criu lazy-pages`` on its end of the page connection, which fetches the pages
from the source's CRIU while the container runs there (see ``_live_lazy``).

Exactly one host runs the container. Before the commit any failure makes the source's
CRIU resume its frozen tasks (a post-dump that raises), the target's CRIU kill what it
restored (a post-restore that fails), and the target drop what it received when the
connection closes (the record is marked ``arriving`` until the commit, so a target
kamrad that dies drops it when it starts again). After the commit the source never
resumes: a lost answer leaves it ``migrating`` until it asks the remote (``kamra
migrate`` again, or kamrad at start); the target shows ``migrating`` until then too.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kamra import scratch
from kamra.checkpoint import archive, criu, page_protocol
from kamra.checkpoint.criu import Criu, log_errors
from kamra.checkpoint.page_protocol import AnswerAhead
from kamra.engine.checkpoint import DumpFailed, criu_binary, release_network_lock
from kamra.errors import AlreadyExists, Conflict, InvalidInput, KamraError
from kamra.linux import proc
from kamra.remote import tls, wire
from kamra.remote.relay import AHEAD, BufferPool, Relayed, relay, socket_pair
from kamra.remote.resumable import Stream
from kamra.remote.store import RemoteStore, parse_address
from kamra.templates.model import Progress, emit

if TYPE_CHECKING:
    from kamra.engine.host import Host
    from kamra.state import ContainerRecord

log = logging.getLogger("kamra.migrate")

MODES = ("auto", "live", "restart")
MAX_ARCHIVE = 1 << 40
OPERATION_TIMEOUT = 600.0  # seconds one request may take on the target
MAX_ROUNDS = 3  # file copy rounds while the container runs
ROUND_SMALL = 1 << 20  # a round this small leaves the rest to the final one...
ROUND_QUICK = 0.5  # ...as does one this quick (seconds)
CTIME_SLACK = 1.0  # seconds a round starts before its mark (coarse change times)
COMMIT_TIMEOUT = 60.0  # seconds a restored target waits, stopped, for the source's commit
RESUME_FOR = 60.0  # seconds a broken lazy page stream is tried again before it is given up
# A broken lazy page stream the target will not resume: how long to wait for its answer
# to the restore, which says whether it gave the container back (seconds).
GIVE_BACK_WAIT = 10.0


@dataclass
class _Trip:
    """One migration under way: its connection, the remote's name, progress reports."""

    sock: ssl.SSLSocket
    remote: str
    progress: Progress | None
    id: str = field(default_factory=lambda: os.urandom(8).hex())
    since: float | None = None  # the start of the last file round the target has
    rounds: list[dict] = field(default_factory=list)


LAZY_PIPE = 4 << 20  # the pipe CRIU's lazy pages ask for (PIPE_MAX_SIZE pages, rounded)


def lazy_pages_unavailable() -> str | None:
    """Why ``--lazy`` cannot work on this host, in one line; None when it can."""
    from kamra.linux.caps import CAPS, has_cap

    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            pipe_max = int(f.read())
    except (OSError, ValueError):
        pipe_max = 0
    if not has_cap(CAPS["sys_resource"]) and pipe_max < LAZY_PIPE:
        return (f"--lazy (post-copy) is not available here: CRIU's lazy pages need "
                f"{LAZY_PIPE >> 20} MiB pipes, and without CAP_SYS_RESOURCE "
                f"fs.pipe-max-size ({pipe_max >> 10} KiB) caps them, so CRIU's page "
                f"transfer fails; raise it (sysctl fs.pipe-max-size={LAZY_PIPE}, as "
                "'make setup' does) or migrate without --lazy")
    try:
        features = Criu(criu_binary()).features()
    except KamraError as exc:
        return f"--lazy (post-copy) is not available here: {exc.message}"
    if not features.get("lazy_pages"):
        return ("--lazy (post-copy) is not available here: CRIU finds no usable "
                "userfaultfd in this kernel; migrate without --lazy")
    return None


class RemoteRefused(KamraError):
    """The target answered with an error."""


def _ask(sock: ssl.SSLSocket, message: dict) -> dict:
    try:
        wire.send(sock, message)
        reply, _ = wire.recv(sock)
    except (OSError, wire.WireError) as exc:
        raise KamraError(f"the other host went away during {message.get('op')!r}: "
                         f"{exc or type(exc).__name__}") from None
    if "error" in reply:
        raise RemoteRefused(str(reply["error"]))
    return reply


class Migrations:
    """Both sides of a migration for one Host."""

    def __init__(self, host: Host):
        self.host = host
        self.remotes = RemoteStore(host.layout.root)
        self._guard = threading.Lock()
        self._incoming: dict[str, _IncomingPages] = {}  # by migration id
        self._streams: dict[str, _PageStream] = {}  # lazy page streams, by migration id

    # -- remotes ------------------------------------------------------------------------
    def connect(self, remote: dict) -> ssl.SSLSocket:
        sock, _ = tls.connect(parse_address(remote["address"]), remote["fingerprint"])
        try:
            wire.send(sock, {"op": "hello", "token": remote["token"]})
            reply, _ = wire.recv(sock)
        except (OSError, wire.WireError) as exc:
            sock.close()
            raise KamraError(f"{remote['address']} closed the connection: {exc}") from None
        if "error" in reply:
            sock.close()
            raise RemoteRefused(f"{remote['address']}: {reply['error']}")
        # Unpacking and restoring a large container takes a while on the other side.
        sock.settimeout(OPERATION_TIMEOUT)
        return sock

    def add_remote(self, name: str, address: str, token: str) -> dict:
        if not token:
            raise InvalidInput("give the token the other host printed ('kamra remote token' "
                               "there): --token T")
        if name in self.remotes.remotes():
            raise AlreadyExists(f"remote {name!r} exists: remove it first")
        parse_address(address)
        sock, fingerprint = tls.connect(parse_address(address), None)  # trust on first use
        with sock:
            wire.send(sock, {"op": "hello", "token": token})
            reply, _ = wire.recv(sock)
        if "error" in reply:
            raise RemoteRefused(f"{address}: {reply['error']}")
        self.remotes.add(name, address, fingerprint, token)
        return {"name": name, "address": address, "fingerprint": fingerprint}

    # -- source -------------------------------------------------------------------------
    def migrate(self, name: str, remote_name: str, mode: str = "auto",
                progress: Progress | None = None, lazy: bool = False) -> dict:
        if mode not in MODES:
            raise InvalidInput(f"unknown mode {mode!r}: use auto, live or restart")
        if lazy and mode == "restart":
            raise InvalidInput("--lazy moves memory after the container resumed there: it "
                               "needs live migration (--mode live or auto)")
        if lazy and (why := lazy_pages_unavailable()):
            raise InvalidInput(why)
        host = self.host
        remote = self.remotes.get(remote_name)
        began = time.perf_counter()
        with host._lock(name):
            record = host._record(name)
            if record.state == "migrating":
                return self._settle(record, remote_name, began)
            if record.state not in ("running", "stopped"):
                raise Conflict(f"container {name!r} is {record.state}: only a running or "
                               "stopped container can migrate")
            if (mode == "live" or lazy) and record.state != "running":
                raise Conflict(f"container {name!r} is not running: live migration needs "
                               "a running container (use --mode restart)")
            emit(progress, "check", message=remote_name)
            with self.connect(remote) as sock:
                trip = _Trip(sock, remote_name, progress)
                checked = _ask(sock, {"op": "check", "name": name, "trip": trip.id,
                                      "manifest": host.checkpoints._manifest(record, None)})
                if checked.get("need_template"):
                    self._send_template(trip, record.template)
                reason = None
                result: dict[str, Any] | None = None
                if record.state == "running" and mode in ("auto", "live"):
                    try:
                        result = self._live_lazy(record, trip) if lazy else \
                            self._live(record, trip)
                    except _NotDumpable as exc:
                        if mode == "live":
                            raise KamraError(f"live migration of {name!r} is not possible: "
                                             f"{exc}; the container keeps running here") \
                                from None
                        reason = str(exc)
                if result is None:
                    result = self._restart(record, trip)
        result.update({"name": name, "remote": remote_name, "reason": reason,
                       "total_ms": round((time.perf_counter() - began) * 1000, 1)})
        return result

    def _send_archive(self, trip: _Trip, record: ContainerRecord, meta: dict | None,
                      images: str | None, pages: bool = False) -> int:
        """Pack and send the container (its images, if any, and its files, or what
        changed in them since the last round) as it is packed: no file on the source."""
        host = self.host
        upper = host.storage(record).upper_dir(host.layout.container_dir(record.name))
        manifest = host.checkpoints._manifest(record, meta)
        if trip.since is not None:
            manifest["upper_paths"] = archive.upper_paths(upper)
        # CRIU's images go as they are, ahead of the archive: no tar to run on either
        # side for them and no second pass to check them, with the container down.
        names = wire.plain_files(images) if images else None
        return self._upload(
            trip, {"op": "send", "name": record.name, "pages": trip.id if pages else None,
                   "files": trip.id if trip.since is not None else None,
                   "images": names is not None},
            lambda out: archive.stream(out, manifest, None if names is not None else images,
                                       upper, trip.since),
            "send", None, f"sending {record.name!r} to the target failed",
            f"sending {record.name!r} to {trip.remote} failed: ",
            preface=(lambda sock: wire.send_files(sock, images, names))
            if images and names is not None else None)

    def _upload(self, trip: _Trip, request: dict, write: Callable[[wire.FileSender], None],
                phase: str, label: str | None, failed: str, refused: str,
                preface: Callable[[ssl.SSLSocket], int] | None = None) -> int:
        """Send ``request``, then what ``preface`` sends (returning its bytes), then
        what ``write`` writes as a file; the target must answer ok. Returns the bytes
        sent."""
        sock = trip.sock
        try:
            wire.send(sock, request)
            before = preface(sock) if preface is not None else 0
            sender = wire.FileSender(sock, lambda n: emit(trip.progress, phase, before + n,
                                                          message=label))
            write(sender)
            sender.close()
            reply, _ = wire.recv(sock)
        except (OSError, wire.WireError) as exc:
            raise KamraError(f"{failed}: {exc or type(exc).__name__}") from None
        if "error" in reply:
            raise RemoteRefused(refused + str(reply["error"]))
        return before + sender.sent

    def _precopy(self, trip: _Trip, record: ContainerRecord) -> None:
        """Copy the container's files while it runs, in rounds: everything, then what
        changed during the previous round, until a round is small; the last changes go
        with the final archive, once the container is frozen or stopped."""
        upper = self.host.storage(record).upper_dir(
            self.host.layout.container_dir(record.name))
        for number in range(1, MAX_ROUNDS + 1):
            # Change times are coarse (a clock tick): start the next round a bit early.
            mark = time.time() - CTIME_SLACK
            began = time.perf_counter()
            sent = self._send_files(trip, upper, number)
            trip.since = mark
            took = time.perf_counter() - began
            trip.rounds.append({"round": number, "bytes": sent,
                                "ms": round(took * 1000, 1)})
            if sent < ROUND_SMALL or took < ROUND_QUICK:
                return

    def _send_files(self, trip: _Trip, upper: str, number: int) -> int:
        emit(trip.progress, "files", message=f"round {number}")
        since = trip.since
        return self._upload(trip, {"op": "files", "trip": trip.id, "round": number},
                            lambda out: archive.stream_files(out, upper, since),
                            "files", f"round {number}",
                            f"copying the files to {trip.remote} failed",
                            f"copying the files to {trip.remote} failed: ")

    def _send_template(self, trip: _Trip, name: str) -> None:
        """The target lacks the template: send it (it verifies the digest)."""
        from kamra.templates.archive import stream_template

        info = self.host.templates.get(name)
        self._upload(trip, {"op": "template", "name": name, "digest": info.digest},
                     lambda out: stream_template(info, out), "template", name,
                     f"sending template {name!r} failed",
                     f"the target refused template {name!r}: ")

    def _dumpable(self, record: ContainerRecord) -> None:
        try:
            self.host.checkpoints._check_dumpable(record)
        except Conflict as exc:
            raise _NotDumpable(exc.message) from None

    def _failed_before_commit(self, trip: _Trip, name: str, failed: DumpFailed,
                              relayed: list[Relayed]) -> KamraError:
        """What to say of a dump that failed before the commit (the container runs on
        here): a broken page stream is not the container's fault (no fallback to
        restart mode); anything else is CRIU's reason it cannot be dumped."""
        if not (relayed and relayed[0].cut and "page-xfer" in failed.message):
            return _NotDumpable(failed.message)
        why = "the connection broke"
        try:  # the target's page server may have failed (a full disk)
            trip.sock.settimeout(10)
            _ask(trip.sock, {"op": "pages-failed", "trip": trip.id})
        except RemoteRefused as exc:
            why = exc.message
        except KamraError:
            pass
        return KamraError(f"the memory of {name!r} could not reach {trip.remote} ({why}); "
                          "it keeps running here")

    @staticmethod
    def _result(trip: _Trip, outcome: dict, relayed: list[Relayed], frozen: float,
                marks: list[tuple[str, float]], **extra: Any) -> dict:
        """A live migration's result: bytes, downtime (freeze to the target's answer)
        and its phases."""
        pages_bytes = relayed[0].sent if relayed else 0
        phases, last = {}, frozen
        for phase, at in marks:
            phases[phase] = round((at - last) * 1000, 1)
            last = at
        files_bytes = sum(r["bytes"] for r in trip.rounds)
        return {"mode": "live", **extra,
                "bytes": outcome.get("bytes", 0) + pages_bytes + files_bytes,
                "pages_bytes": pages_bytes, "downtime_ms": round((last - frozen) * 1000, 1),
                "phases_ms": phases, "rounds": trip.rounds,
                "status": (outcome.get("reply") or {}).get("status") or {}}

    def _live(self, record: ContainerRecord, trip: _Trip) -> dict:
        host = self.host
        name = record.name
        self._dumpable(record)
        outcome: dict[str, Any] = {}

        marks: list[tuple[str, float]] = []

        def post_dump(images: str, meta: dict) -> None:
            # The tasks are frozen, the network locked, the pages on the target.
            marks.append(("dump", time.perf_counter()))
            outcome["bytes"] = self._send_archive(trip, record, meta, images, pages=True)
            marks.append(("send", time.perf_counter()))
            self._restore_there(trip, name)  # restored there, stopped: raises if not
            marks.append(("restore", time.perf_counter()))
            self._commit(trip, record, outcome)  # never raises: the target owns it now
            marks.append(("resume", time.perf_counter()))

        self._precopy(trip, record)
        pages = self._open_pages(trip, name)
        pool = BufferPool()
        pool.warm(self._memory_of(record) + (8 << 20))  # (what the page stream adds)
        reported = [0]

        def on_pages(sent: int) -> None:  # every few MB: the tasks are frozen meanwhile
            if sent - reported[0] >= 4 << 20:
                reported[0] = sent
                emit(trip.progress, "pages", sent, message=name)

        failed, frozen, relayed = self._dump_carrying(
            record, trip, pages,
            lambda local: relay(pages, local, on_pages, tap=AnswerAhead(), pool=pool), post_dump)
        if failed is not None:
            raise self._failed_before_commit(trip, name, failed, relayed)
        # Committed: the source's tasks are gone (CRIU killed them after post-dump).
        host.wait_exit(name, record.init_pid, 10)
        host._finish_stop(record, {"status": None, "code": None, "signal": None,
                                   "reason": f"migrated to {trip.remote}"}, state="migrating")
        # Frozen here until resumed there (the answer); cleaning up here comes after.
        reply = outcome.get("reply")
        if reply is None:
            raise KamraError(f"lost {trip.remote} after it was told to resume {name!r} "
                             f"({outcome.get('lost')}): it runs there unless that failed; "
                             f"it stays 'migrating' here until 'kamra migrate {name} "
                             f"{trip.remote}' settles it") from None
        if "error" in reply:
            raise RemoteRefused(f"{trip.remote} could not resume {name!r} after taking it "
                                f"over: {reply['error']}; its checkpoint is kept there "
                                f"('kamra restore {name}' on {trip.remote}), it stays "
                                "'migrating' here")
        self._confirm(trip, name)
        self._forget(record)
        return self._result(trip, outcome, relayed, frozen, marks)

    def _memory_of(self, record: ContainerRecord) -> int:
        """The container's anonymous and shared memory now: about what its dump sends."""
        total = 0
        for pid in self.host.cgroups.pids(record.name):
            fields = proc.status_fields(pid)  # (empty if it is gone meanwhile)
            for key in ("RssAnon", "RssShmem"):
                total += int(fields.get(key, "0 kB").split()[0]) * 1024
        return total

    def _live_lazy(self, record: ContainerRecord, trip: _Trip) -> dict:
        """Post-copy: the target resumes the container before its memory arrived and
        pulls the pages (those faulted on first, then the rest in the background) from
        the source's CRIU over the page connection. The commit comes before the restore
        there, as the restore already faults on pages, which CRIU serves only once its
        post-dump returned. From the commit on the memory exists only here until it
        went: a cut of the page connection pauses the transfer until the source has
        connected again (``kamra.remote.resumable``); a failure it cannot bridge leaves
        the container 'migrating' (see docs/migration.md)."""
        host = self.host
        name = record.name
        self._dumpable(record)
        outcome: dict[str, Any] = {}
        marks: list[tuple[str, float]] = []
        answered = threading.Event()
        streamed = [0]  # page bytes relayed so far

        def wait_answer() -> None:
            try:
                outcome["reply"], _ = wire.recv(trip.sock)
            except (OSError, wire.WireError) as exc:
                outcome["lost"] = str(exc) or type(exc).__name__
            outcome["pages_at_answer"] = streamed[0]
            marks.append(("restore", time.perf_counter()))
            answered.set()

        def post_dump(images: str, meta: dict) -> None:
            try:
                commit_and_restore(images, meta)
            except BaseException:
                if record.state != "migrating":
                    # CRIU serves lazy pages even after a failed post-dump: end that.
                    _break(pages)
                raise

        def commit_and_restore(images: str, meta: dict) -> None:
            # Frozen, the network locked; the memory stays here, in CRIU's pipes.
            marks.append(("dump", time.perf_counter()))
            outcome["bytes"] = self._send_archive(trip, record, meta, images, pages=False)
            marks.append(("send", time.perf_counter()))
            self._record_commit(record, trip.remote)  # from here on it never resumes here
            emit(trip.progress, "restore", message=trip.remote)
            try:
                wire.send(trip.sock, {"op": "restore", "name": name, "lazy": True})
            except OSError as exc:  # it never heard of the commit: undo it
                self._record_commit(record, None)
                raise KamraError(f"{trip.remote} went away before restoring: {exc}") \
                    from None
            threading.Thread(target=wait_answer, name="kamra-answer", daemon=True).start()

        self._precopy(trip, record)
        pages = self._open_pages(trip, name, lazy=True)

        def on_pages(sent: int) -> None:
            if sent - streamed[0] >= 4 << 20 or not streamed[0]:
                emit(trip.progress, "pages", sent, message=name)
            streamed[0] = sent

        def given_back() -> bool:
            """Whether the target answered that its restore failed and it holds nothing:
            then CRIU must fail (and resume the tasks here), not end as if all went."""
            answered.wait(GIVE_BACK_WAIT)
            return bool((outcome.get("reply") or {}).get("dropped"))

        def renew(received: int) -> tuple[ssl.SSLSocket, int] | bytes | None:
            """The page connection broke: connect again and go on where it stopped."""
            if record.state != "migrating":
                return None  # not committed: the container goes on here, no pages needed
            if answered.is_set() and given_back():
                return page_protocol.ABORT
            deadline = time.monotonic() + RESUME_FOR
            while time.monotonic() < deadline:
                try:
                    sock = self.connect(self.remotes.get(trip.remote))
                except KamraError as exc:
                    log.warning("reconnecting the page stream of %s: %s", name, exc.message)
                    time.sleep(1)
                    continue
                try:
                    sock.settimeout(10)
                    reply = _ask(sock, {"op": "pages-resume", "trip": trip.id,
                                        "received": received})
                    sock.settimeout(OPERATION_TIMEOUT)
                    log.info("the page stream of %s goes on", name)
                    return sock, int(reply["received"])
                except RemoteRefused as exc:  # it has no such stream (any more)
                    sock.close()
                    log.warning("%s cannot resume the page stream of %s: %s", trip.remote,
                                name, exc.message)
                    return page_protocol.ABORT if given_back() else None
                except KamraError as exc:
                    sock.close()
                    log.warning("resuming the page stream of %s: %s", name, exc.message)
                    time.sleep(1)
            return None

        streams: list[Stream] = []

        def carry(local: socket.socket) -> Relayed:
            streams.append(Stream(local, on_pages))
            return streams[0].run(pages, renew)

        failed, frozen, relayed = self._dump_carrying(record, trip, pages, carry, post_dump,
                                                      lazy=True)
        transferred = time.perf_counter()
        if record.state != "migrating":  # failed before the commit: it runs here again
            assert failed is not None
            raise self._failed_before_commit(trip, name, failed, relayed)
        answered.wait(COMMIT_TIMEOUT)
        reply = outcome.get("reply")
        if failed is not None and reply and reply.get("dropped") \
                and proc.alive(record.init_pid, record.init_start):
            # The target could not restore it and holds nothing of it now; CRIU resumed
            # the tasks here when their pages stopped being asked for: take it back.
            self._uncommit(record)
            raise RemoteRefused(f"{trip.remote} could not restore {name!r} after the "
                                f"commit ({reply.get('error')}); it runs here again")
        if failed is not None:
            # CRIU resumes its tasks when the transfer fails: the target may run them.
            self._end_tasks_here(record)
        else:
            host.wait_exit(name, record.init_pid, 10)
        host._finish_stop(record, {"status": None, "code": None, "signal": None,
                                   "reason": f"migrated to {trip.remote}"}, state="migrating")
        reply = outcome.get("reply")
        if failed is not None or reply is None or "error" in reply:
            why = (failed.message if failed is not None else
                   (reply or {}).get("error") or outcome.get("lost") or "no answer")
            raise KamraError(f"the lazy migration of {name!r} to {trip.remote} failed after "
                             f"the commit ({why}); it stays 'migrating' here until 'kamra "
                             f"migrate {name} {trip.remote}' settles it")
        self._confirm(trip, name)
        self._forget(record)
        pages_bytes = relayed[0].sent if relayed else 0
        return self._result(
            trip, outcome, relayed, frozen, marks, lazy=True,
            page_stream_cuts=streams[0].cuts if streams else 0,
            pages_after_resume_bytes=pages_bytes - outcome.get("pages_at_answer", 0),
            pages_ms=round((transferred - frozen) * 1000, 1))

    def _dump_carrying(self, record: ContainerRecord, trip: _Trip, pages: ssl.SSLSocket,
                       carry: Callable[[socket.socket], Relayed],
                       post_dump: Callable[[str, dict], None], lazy: bool = False
                       ) -> tuple[DumpFailed | None, float, list[Relayed]]:
        """Dump with CRIU's page socket carried to ``pages`` by ``carry(local end)`` in
        a thread; returns the dump's failure (None: it went), when the freeze began, and
        what was carried."""
        local, for_criu = socket_pair()
        relayed: list[Relayed] = []
        carrying = threading.Thread(target=lambda: relayed.append(carry(local)),
                                    name="kamra-pages", daemon=True)
        carrying.start()
        frozen = time.perf_counter()
        emit(trip.progress, "dump", message=record.name)
        failed: DumpFailed | None = None
        try:
            self.host.checkpoints._dump(record, False, post_dump=post_dump,
                                        page_server=for_criu, lazy=lazy)
        except DumpFailed as exc:
            failed = exc
        finally:
            for_criu.close()  # CRIU is gone: the relay reads the end of it
            carrying.join(30)
            pages.close()
            local.close()
        return failed, frozen, relayed

    def _uncommit(self, record: ContainerRecord) -> None:
        """A lazy migration the target gave back: the tasks CRIU resumed here run on,
        with the network CRIU left locked unlocked, the address announced here again
        (the target may have claimed it), and the record running, durably."""
        try:
            release_network_lock(record.init_pid)
        except (KamraError, OSError) as exc:
            log.error("unlocking the network of %s: %s", record.name, exc)
        record.state = "running"
        record.migrating_to = None
        self.host.store.update(record)
        self.host.store.sync()
        self.host.network.announce(record)
        log.warning("%s runs here again: its target gave it back", record.name)

    def _end_tasks_here(self, record: ContainerRecord) -> None:
        """A lazy transfer that failed after the commit: CRIU resumed the tasks here (with
        the network still locked); the target may run them, so they end at once."""
        self.host.cgroups.kill(record.name)
        self.host.wait_exit(record.name, record.init_pid, 10)

    def _open_pages(self, trip: _Trip, name: str, lazy: bool = False) -> ssl.SSLSocket:
        """A second connection for CRIU's page stream: the target starts its page server
        behind it (lazy: its lazy-pages daemon, once the images arrived)."""
        sock = self.connect(self.remotes.get(trip.remote))
        try:
            _ask(sock, {"op": "pages", "name": name, "trip": trip.id, "lazy": lazy})
        except BaseException:
            sock.close()
            raise
        return sock

    def _restore_there(self, trip: _Trip, name: str) -> None:
        emit(trip.progress, "restore", message=trip.remote)
        reply = _ask(trip.sock, {"op": "restore", "name": name})
        if not reply.get("restored"):
            raise KamraError(f"{trip.remote} answered the restore with {reply}")

    def _record_commit(self, record: ContainerRecord, remote: str | None) -> None:
        """The point of no return, durably (remote None: undo a commit not yet told)."""
        record.state = "migrating" if remote else "checkpointing"
        record.migrating_to = remote
        self.host.store.update(record)
        self.host.store.sync()

    def _commit(self, trip: _Trip, record: ContainerRecord, outcome: dict) -> None:
        """The point of no return: recorded durably here, then the target resumes it."""
        self._record_commit(record, trip.remote)
        emit(trip.progress, "resume", message=trip.remote)
        try:
            wire.send(trip.sock, {"op": "resume", "name": record.name})
            outcome["reply"], _ = wire.recv(trip.sock)
        except (OSError, wire.WireError) as exc:
            outcome["lost"] = str(exc) or type(exc).__name__

    def _restart(self, record: ContainerRecord, trip: _Trip) -> dict:
        host = self.host
        was_running = record.state == "running"
        if was_running:
            self._precopy(trip, record)
        stopped_at = time.perf_counter()
        if was_running:
            emit(trip.progress, "stop", message=record.name)
            host._stop_locked(record, 10, False)
        try:
            sent = self._send_archive(trip, record, None, None)
        except BaseException:
            if was_running:  # not moved: it runs here again
                host._start_locked(record, None)
            raise
        status = self._resume(record, trip, start=was_running)
        downtime = (time.perf_counter() - stopped_at) * 1000
        self._confirm(trip, record.name)
        self._forget(record)
        return {"mode": "restart", "bytes": sent + sum(r["bytes"] for r in trip.rounds),
                "downtime_ms": round(downtime, 1), "rounds": trip.rounds, "status": status}

    def _resume(self, record: ContainerRecord, trip: _Trip, start: bool = True) -> dict:
        """Restart mode: the target starts what it received."""
        name = record.name
        sock, remote = trip.sock, trip.remote
        emit(trip.progress, "resume", message=remote)
        try:
            wire.send(sock, {"op": "resume", "name": name, "start": start})
        except (OSError, wire.WireError) as exc:
            raise KamraError(f"migrating {name!r} to {remote} failed before the target "
                             f"started it ({exc}); it is stopped here: 'kamra start {name}' "
                             "starts it again") from None
        try:
            reply, _ = wire.recv(sock)
        except (OSError, wire.WireError) as exc:
            record.state = "migrating"
            record.migrating_to = remote
            self.host.store.update(record)
            raise KamraError(f"lost {remote} while it started {name!r} ({exc}): it may run "
                             f"there now; it stays 'migrating' here until 'kamra migrate "
                             f"{name} {remote}' settles it") from None
        if "error" in reply:
            raise RemoteRefused(f"{remote} could not start {name!r}: {reply['error']}; its "
                                "files stay there (stopped)")
        return reply.get("status") or {}

    def _settle(self, record: ContainerRecord, remote_name: str, began: float) -> dict:
        """A migration whose end was not heard: ask the remote whether it has the
        container. If it does, this copy goes; if not, it is stopped here (its files
        are intact; its processes did not survive)."""
        name = record.name
        if record.migrating_to and record.migrating_to != remote_name:
            raise Conflict(f"container {name!r} was migrating to {record.migrating_to!r}: "
                           f"settle it with 'kamra migrate {name} {record.migrating_to}'")
        remote = self.remotes.get(remote_name)
        with self.connect(remote) as sock:
            there = _ask(sock, {"op": "has", "name": name}).get("state")
        if there:
            self._forget(record)
            outcome = f"it is {there} on {remote_name}; removed here"
        else:
            self.host.checkpoints.discard(name)
            record.state = "stopped"
            record.migrating_to = None
            self.host.store.update(record)
            outcome = (f"{remote_name} does not have it; it is stopped here (start it "
                       "with 'kamra start')")
        return {"name": name, "remote": remote_name, "mode": "settle", "settled": outcome,
                "reason": None, "bytes": 0, "downtime_ms": 0,
                "total_ms": round((time.perf_counter() - began) * 1000, 1)}

    def _confirm(self, trip: _Trip, name: str) -> None:
        """Tell the target its answer arrived (it stops showing the migration); over a
        new connection if this one broke meanwhile (a lazy migration takes a while)."""
        try:
            wire.send(trip.sock, {"op": "done", "name": name})
            return
        except (OSError, wire.WireError):
            pass
        try:
            with self.connect(self.remotes.get(trip.remote)) as sock:
                wire.send(sock, {"op": "done", "name": name})
        except (KamraError, OSError, wire.WireError) as exc:
            log.warning("telling %s that %s arrived: %s", trip.remote, name, exc)

    def cleanup_incoming(self) -> list[str]:
        """What migrations to this host left when kamrad stopped in their middle (pages,
        file rounds, archives, containers received but not committed): none runs before
        kamrad serves, so all of it goes. Their sources resumed their own copies."""
        removed = []
        for record in self.host.store.list():
            if record.arriving:
                self._drop_arrival(record)
                removed.append(f"container {record.name} (its migration from "
                               f"{record.migrating_from} was not committed)")
        try:
            entries = os.listdir(self.host.layout.run)
        except FileNotFoundError:
            return removed
        for entry in entries:
            if entry.startswith("incoming-"):
                path = os.path.join(self.host.layout.run, entry)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.unlink(path)
                removed.append(path)
        return removed

    def settle_pending(self, stop: threading.Event, every: float = 30.0) -> None:
        """kamrad's background task: settle migrations whose end was not heard, asking
        their remotes until each has answered (a remote may be down for a while)."""
        while not stop.is_set():
            pending = [r for r in self.host.store.list()
                       if r.state == "migrating" and r.migrating_to]
            if not pending:
                return
            for record in pending:
                try:
                    with self.host._lock(record.name):
                        current = self.host.store.get(record.name)
                        if current is None or current.state != "migrating":
                            continue
                        done = self._settle(current, str(current.migrating_to),
                                            time.perf_counter())
                    log.info("settled %s: %s", record.name, done["settled"])
                except (KamraError, OSError, wire.WireError) as exc:
                    log.warning("cannot settle the migration of %s yet: %s", record.name,
                                getattr(exc, "message", exc))
            stop.wait(every)

    def _drop_arrival(self, record: ContainerRecord) -> None:
        """Undo what a restore of an uncommitted arrival left (CRIU killed what it
        restored when it lost kamrad), then the container itself."""
        host = self.host
        with host._lock(record.name):
            host.cgroups.kill(record.name)  # none should be left: they never resumed
            host._finish_stop(record, {"status": None, "code": None, "signal": None,
                                       "reason": "migration not committed"})
            host.checkpoints.discard(record.name)
            host._destroy_locked(record)

    def _forget(self, record: ContainerRecord) -> None:
        """The target runs it: remove the source's copy (files, checkpoint, addresses)."""
        self.host._destroy_locked(record)

    # -- target -------------------------------------------------------------------------
    def serve(self, sock: ssl.SSLSocket, peer: str) -> None:
        """Requests from one authenticated source host (see the module docstring)."""
        imported: str | None = None
        trip: str | None = None
        try:
            while True:
                try:
                    message, _ = wire.recv(sock)
                except (OSError, wire.WireError):
                    return
                op = message.get("op")
                try:
                    if op == "pages":
                        self._serve_pages(sock, str(message["name"]), str(message["trip"]),
                                          bool(message.get("lazy")))
                        return
                    if op == "pages-resume":  # a lazy page stream broke: its new link
                        self._resume_pages(sock, str(message["trip"]),
                                           int(message["received"]))
                        return
                    if op == "has":  # a source settling a migration it did not hear end
                        found = self._confirmed(str(message["name"]))
                        # One still arriving is not ours: its commit never came.
                        wire.send(sock, {"state": found.state if found and not
                                         found.arriving else None})
                    elif op == "done":  # the source heard the answer and forgets its copy
                        self._confirmed(str(message["name"]))
                        return
                    elif op == "check":
                        trip = message.get("trip")
                        wire.send(sock, self._check(message["name"], message["manifest"]))
                    elif op == "template":
                        self._receive_template(sock, str(message["name"]),
                                               str(message["digest"]))
                        wire.send(sock, {"ok": True})
                    elif op == "files":
                        trip = str(message["trip"])
                        self._receive_files(sock, trip)
                        wire.send(sock, {"ok": True})
                    elif op == "send":
                        imported = self._receive(sock, str(message["name"]),
                                                 message.get("pages"), message.get("files"),
                                                 source=peer.rsplit(":", 1)[0],
                                                 images=bool(message.get("images")),
                                                 trip=str(trip) if trip else None)
                        wire.send(sock, {"ok": True})
                    elif op == "restore" and message.get("lazy"):
                        name = str(message["name"])
                        if name != imported or trip is None:
                            raise Conflict(f"nothing of {name!r} was received")
                        self._arrived(name)  # the source committed before asking
                        imported = None
                        try:
                            status = self._restore_lazy(name, str(trip))
                        except KamraError as exc:
                            # Nothing of it runs here: give it back to the source, whose
                            # tasks CRIU resumes as their pages are no longer asked for.
                            wire.send(sock, {"error": exc.message,
                                             "dropped": self._give_back(name)})
                            continue
                        wire.send(sock, {"ok": True, "status": status})
                    elif op == "restore":
                        name = str(message["name"])
                        if name != imported:
                            raise Conflict(f"nothing of {name!r} was received")
                        committed: list[bool] = []
                        try:
                            status = self._restore_here(sock, name, committed)
                        finally:
                            if committed:  # from the commit on the container is ours
                                imported = None
                        wire.send(sock, {"ok": True, "status": status})
                    elif op == "resume":
                        name = str(message["name"])
                        if name != imported:
                            raise Conflict(f"nothing of {name!r} was received")
                        self._arrived(name)
                        imported = None  # from here on the container is ours
                        wire.send(sock, self._start_here(name, bool(message.get("start"))))
                    elif op == "pages-failed":  # why the page stream of a trip broke
                        wire.send(sock, {"error": self._pages_failure(str(message["trip"]))})
                    else:
                        wire.send(sock, {"error": f"unknown request {op!r}"})
                except KamraError as exc:
                    wire.send(sock, {"error": exc.message})
                except (ssl.SSLError, ConnectionError, wire.WireError):
                    return  # the connection itself broke
                except OSError as exc:  # this host's trouble, e.g. a full disk: say so
                    wire.send(sock, {"error": f"the target could not store what arrived "
                                              f"({exc.strerror or exc})"})
        finally:
            if trip is not None:
                self._discard_pages(str(trip))
                shutil.rmtree(self._files_dir(str(trip)), ignore_errors=True)
            if imported is not None:
                log.warning("%s went away before resuming %s: dropping what it sent",
                            peer, imported)
                self._drop(imported)

    def _arrived(self, name: str) -> None:
        """Restart mode's commit: the container is this host's now (it still shows
        ``migrating`` until the source says it heard the answer)."""
        with self.host._lock(name):
            record = self.host.store.get(name)
            if record is not None:
                record.arriving = False
                self.host.store.update(record)

    def _confirmed(self, name: str) -> ContainerRecord | None:
        with self.host._lock(name):
            record = self.host.store.get(name)
            if record is not None and record.migrating_from and not record.arriving:
                record.migrating_from = None
                self.host.store.update(record)
            return record

    def _serve_pages(self, sock: ssl.SSLSocket, name: str, trip: str,
                     lazy: bool = False) -> None:
        """A CRIU page server whose socket is relayed over this connection: the pages
        of a live migration land in a staging directory until the archive comes.
        ``lazy``: the socket waits for the lazy-pages daemon a lazy restore starts."""
        from kamra.names import check_name

        check_name(name)
        if not trip.isalnum() or len(trip) > 32:
            raise InvalidInput("bad migration id")
        local, for_criu = socket_pair(ahead=0 if lazy else AHEAD)
        if lazy:
            self._serve_lazy_pages(sock, trip, local, for_criu)
            return
        directory = os.path.join(self.host.layout.run, f"incoming-pages-{trip}")
        os.makedirs(directory, 0o700)
        try:
            proc = Criu(criu_binary()).page_server(directory, for_criu.fileno())
        except BaseException:
            local.close()
            for_criu.close()
            shutil.rmtree(directory, ignore_errors=True)
            raise
        for_criu.close()
        incoming = _IncomingPages(directory, proc)
        with self._guard:
            self._incoming[trip] = incoming
        try:
            wire.send(sock, {"ok": True})
            relay(sock, local)
        except OSError as exc:
            log.warning("the page stream of %s broke: %s", name, exc)
        finally:
            local.close()  # a page server still waiting reads the end and exits

    def _serve_lazy_pages(self, sock: ssl.SSLSocket, trip: str, local: socket.socket,
                          for_criu: socket.socket) -> None:
        """The page connection of a lazy migration: its CRIU end waits for the
        lazy-pages daemon; the stream survives the connection (see _resume_pages)."""
        entry = _PageStream(Stream(local))
        with self._guard:
            self._incoming[trip] = _IncomingPages(None, None, for_criu)
            self._streams[trip] = entry
        try:
            wire.send(sock, {"ok": True})
            entry.stream.run(sock, entry.renew)
        finally:
            local.close()  # the daemon, if still there, reads the end
            with self._guard:
                self._streams.pop(trip, None)
            entry.release()

    def _resume_pages(self, sock: ssl.SSLSocket, trip: str, received: int) -> None:
        """A new connection for a lazy page stream that broke: say how much arrived
        here, then lend the connection to the stream until it ends or breaks again."""
        with self._guard:
            entry = self._streams.get(trip)
        if entry is None:
            raise Conflict("no page stream of that migration is here")
        current = entry.stream.current
        if current is not None:  # this side may not have seen the break yet
            _break(current)
        if not entry.waiting.wait(10):
            raise KamraError("the page stream did not let go of its old connection")
        released = threading.Event()
        wire.send(sock, {"received": entry.stream.received})
        entry.offers.put((sock, received, released))
        released.wait()

    def _restore_lazy(self, name: str, trip: str) -> dict:
        """Restore with CRIU's lazy pages: a lazy-pages daemon on the page connection
        fetches the memory from the source while (and after) the tasks run."""
        with self._guard:
            incoming = self._incoming.pop(trip, None)
        if incoming is None or (incoming.criu_end is None and incoming.proc is None):
            raise Conflict(f"no page connection of {name!r} is open")
        directory = self.host.checkpoints.directory(name)
        try:
            # (Started as the images arrived, see _receive; else now.)
            daemon = incoming.proc or Criu(criu_binary()).lazy_pages(
                directory, incoming.criu_end.fileno())  # type: ignore[union-attr]
        finally:
            incoming.proc = None  # ours now
            incoming.discard()  # our copy of CRIU's end: the daemon holds its own
        listening = os.path.join(directory, "lazy-pages.socket")
        deadline = time.monotonic() + 10
        while not os.path.exists(listening) and daemon.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.002)
        try:
            if not os.path.exists(listening):
                raise KamraError("CRIU's lazy-pages daemon did not start: " + "; ".join(
                    log_errors(os.path.join(directory, "lazy-pages.log")) or ["no socket"]))
            status = self.host.checkpoints.restore(name, lazy=True)
        except BaseException:
            criu.end(daemon)
            raise
        threading.Thread(target=self._lazy_done, args=(name, daemon, directory),
                         name="kamra-lazy-pages", daemon=True).start()
        return status

    @staticmethod
    def _lazy_done(name: str, daemon: subprocess.Popen[bytes], directory: str) -> None:
        """The lazy-pages daemon exits once every page arrived (or the source is gone:
        then the tasks that fault on a missing page die)."""
        code = daemon.wait()
        if code == 0:
            log.info("lazy pages of %s: all arrived", name)
        else:
            log.error("lazy pages of %s failed: %s", name, "; ".join(
                log_errors(os.path.join(directory, "lazy-pages.log"))) or f"exit {code}")
        scratch.remove_tree(directory)  # the spent checkpoint

    def _attach_pages(self, name: str, trip: str) -> None:
        """Put the pages the page server wrote next to the checkpoint's other images."""
        with self._guard:
            incoming = self._incoming.pop(trip, None)
        if incoming is None or incoming.proc is None or incoming.directory is None:
            raise Conflict(f"no memory pages of {name!r} arrived")
        try:
            try:
                code = incoming.proc.wait(30)  # it flushes the images as it exits
            except subprocess.TimeoutExpired:
                raise KamraError("CRIU's page server did not finish") from None
            if code != 0:
                errors = log_errors(os.path.join(incoming.directory, "page-server.log"))
                raise KamraError("CRIU's page server failed: "
                                 + ("; ".join(errors) or f"exit status {code}"))
            directory = self.host.checkpoints.directory(name)
            for entry in os.listdir(incoming.directory):
                shutil.move(os.path.join(incoming.directory, entry),
                            os.path.join(directory, entry))
        finally:
            incoming.discard()

    def _pages_failure(self, trip: str) -> str:
        """What the page server of ``trip`` said when it failed (the source's dump
        only saw the stream break)."""
        with self._guard:
            incoming = self._incoming.get(trip)
        if incoming is None or incoming.proc is None or incoming.directory is None:
            return "no page stream of that migration is here"
        try:
            code = incoming.proc.wait(5)
        except subprocess.TimeoutExpired:
            return "the page server is still running"
        errors = log_errors(os.path.join(incoming.directory, "page-server.log"))
        said = "; ".join(errors) or f"exit status {code}"
        # A full disk cuts the log short too (it lies beside the pages): say it first.
        free = shutil.disk_usage(incoming.directory).free
        if free < 1 << 20:
            said = (f"No space left on device ({free >> 10} KiB free in "
                    f"{self.host.layout.run}); its log: {said}")
        return f"the target's CRIU page server failed: {said}"

    def _discard_pages(self, trip: str) -> None:
        with self._guard:
            incoming = self._incoming.pop(trip, None)
        if incoming is not None:
            incoming.discard()

    def _check(self, name: str, manifest: dict) -> dict:
        from kamra.names import check_name

        host = self.host
        check_name(name)
        saved = manifest["container"]
        if host.store.get(name) is not None:
            raise AlreadyExists(f"a container {name!r} exists on this host")
        need_template = not host.templates.exists(saved["template"])
        if not need_template:
            info = host.templates.get(saved["template"])
            if info.digest != saved["template_digest"]:
                raise Conflict(f"template {info.name!r} here is {info.digest}, not "
                               f"{saved['template_digest']}")
        held = host.store.addresses()
        for address in manifest.get("addresses", []):
            if address in held:
                raise Conflict(f"address {address} is held here by {held[address]!r}")
        if saved.get("plan"):
            host.resources.plans.get(saved["plan"])
        self._check_satisfiable(saved)
        host.network.warm()
        return {"ok": True, "need_template": need_template}

    def _check_satisfiable(self, saved: dict) -> None:
        """The container's limits (its plan here and its own overrides) must be ones
        this host can give: CPUs it has, memory and disk it holds."""
        from kamra.config.hostinfo import HostInfo
        from kamra.config.keys import format_value, get_key
        from kamra.config.units import BadValue
        from kamra.state import ContainerRecord

        record = ContainerRecord.from_json({**saved, "state": "stopped"})
        values = {key: value for key, (value, _) in
                  self.host.resources.effective(record).items() if value is not None}
        info = HostInfo.current()
        for key, value in values.items():
            check = get_key(key).host_check
            try:
                if check is not None:
                    check(value, info)
            except BadValue as exc:
                raise Conflict(f"this host cannot give {key}={format_value(key, value)}: "
                               f"{exc.problem}") from None
        memory = values.get("limits.memory")
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if isinstance(memory, int) and memory > total:
            raise Conflict(f"this host cannot give limits.memory="
                           f"{format_value('limits.memory', memory)}: it has "
                           f"{format_value('limits.memory', total)} of RAM")
        disk = values.get("limits.disk")
        free = shutil.disk_usage(self.host.layout.containers).free
        if isinstance(disk, int) and disk > free:
            raise Conflict(f"this host cannot give limits.disk="
                           f"{format_value('limits.disk', disk)}: "
                           f"{format_value('limits.disk', free)} free")

    def _receive_template(self, sock: ssl.SSLSocket, name: str, digest: str) -> None:
        path = os.path.join(self.host.layout.run, f"incoming-template-{os.urandom(3).hex()}")
        try:
            with open(path, "wb") as f:
                wire.recv_file(sock, f, MAX_ARCHIVE)
            info = self.host.templates.import_(path, name)  # checks, verifies its digest
        finally:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        if info.digest != digest:
            self.host.templates.remove(name, [])
            raise Conflict(f"template {name!r} arrived as {info.digest}, not {digest}")

    def _files_dir(self, trip: str) -> str:
        if not trip.isalnum() or len(trip) > 32:
            raise InvalidInput("bad migration id")
        return os.path.join(self.host.layout.run, f"incoming-files-{trip}")

    def _receive_files(self, sock: ssl.SSLSocket, trip: str) -> None:
        """A round of files: checked like an archive, unpacked on its own, then laid
        over the earlier rounds."""
        directory = self._files_dir(trip)
        os.makedirs(directory, 0o700, exist_ok=True)
        path = f"{directory}.tar.zst"
        unpacked = f"{directory}.round"
        try:
            with open(path, "wb") as f:
                wire.recv_file(sock, f, MAX_ARCHIVE)
            archive.read(path, manifest_needed=False)
            os.makedirs(unpacked, 0o700)
            archive.extract(path, unpacked)
            if os.path.isdir(os.path.join(directory, "upper")):
                archive.merge(os.path.join(unpacked, "upper"),
                              os.path.join(directory, "upper"))
            else:
                os.rename(os.path.join(unpacked, "upper"), os.path.join(directory, "upper"))
        finally:
            shutil.rmtree(unpacked, ignore_errors=True)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def _start_lazy_pages(self, trip: str, images: str) -> None:
        """A lazy migration's images are here: start CRIU's lazy-pages daemon on its page
        connection now, so that it is ready by the time the source has committed (it
        waits for the restore; a migration that goes no further ends it with the
        connection, see _IncomingPages.discard)."""
        with self._guard:
            incoming = self._incoming.get(trip)
            if incoming is None or incoming.criu_end is None or incoming.proc is not None:
                return
            incoming.proc = Criu(criu_binary()).lazy_pages(images, incoming.criu_end.fileno())
            incoming.criu_end.close()  # the daemon holds its own
            incoming.criu_end = None

    def _receive(self, sock: ssl.SSLSocket, name: str, pages: str | None,
                 files: str | None, source: str, images: bool = False,
                 trip: str | None = None) -> str:
        """The container's archive, and CRIU's images ahead of it if ``images``."""
        tag = f"{name}-{os.urandom(3).hex()}"
        path = os.path.join(self.host.layout.run, f"incoming-{tag}")
        staged = os.path.join(self.host.layout.run, f"incoming-images-{tag}")
        adopted = False
        began = time.perf_counter()
        try:
            if images:
                if pages:  # on disk: the pages, on disk too, are moved next to them
                    os.makedirs(staged, 0o700)
                else:
                    # A lazy arrival's, in memory: on this disk each new file can cost
                    # half a millisecond while the container is down.
                    staged = scratch.in_memory(self.host.layout.root_id, "arrival", staged)
                wire.recv_files(sock, staged, MAX_ARCHIVE)
                if not pages and trip is not None:
                    self._start_lazy_pages(trip, staged)
            with open(path, "wb") as f:
                wire.recv_file(sock, f, MAX_ARCHIVE)
            received = time.perf_counter()
            with self.host._lock(name):
                base = None
                if files:
                    base = os.path.join(self._files_dir(str(files)), "upper")
                    if not os.path.isdir(base):
                        raise Conflict(f"the earlier file rounds of {name!r} are missing")
                self.host.checkpoints._import(name, path, base, arriving_from=source,
                                              images=staged if images else None)
                adopted = images
                if pages:
                    try:
                        self._attach_pages(name, str(pages))
                    except BaseException:
                        self._drop(name)
                        raise
            log.info("received %s: archive %.1f ms, import %.1f ms", name,
                     (received - began) * 1000, (time.perf_counter() - received) * 1000)
        finally:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            if not adopted:
                shutil.rmtree(staged, ignore_errors=True)
        return name

    def _restore_here(self, sock: ssl.SSLSocket, name: str, committed: list[bool]) -> dict:
        """Restore what arrived; once it is restored, stopped, with its network locked,
        say so and wait for the source's commit before letting it run."""

        marks = [time.perf_counter()]

        def before_resume(record: ContainerRecord) -> None:
            marks.append(time.perf_counter())
            try:
                wire.send(sock, {"restored": True})
                sock.settimeout(COMMIT_TIMEOUT)
                try:
                    message, _ = wire.recv(sock)
                finally:
                    sock.settimeout(None)
            except (OSError, wire.WireError) as exc:
                raise KamraError(f"the source went away before committing: {exc}") \
                    from None
            if message.get("op") != "resume":
                raise KamraError(f"the source sent {message.get('op')!r}, not the commit")
            committed.append(True)
            marks.append(time.perf_counter())
            record.arriving = False  # committed: from here on a restarted kamrad keeps it
            self.host.store.update(record)

        status = self.host.checkpoints.restore(name, before_resume=before_resume)
        if len(marks) == 3:  # where the target's part of the downtime goes
            log.info("restored %s: %.1f ms to post-restore, %.1f ms waiting for the commit, "
                     "%.1f ms from the commit to running", name,
                     (marks[1] - marks[0]) * 1000, (marks[2] - marks[1]) * 1000,
                     (time.perf_counter() - marks[2]) * 1000)
        return status

    def _start_here(self, name: str, start: bool) -> dict:
        """Restart mode: the files arrived; start the container if it ran there."""
        host = self.host
        status = host.start(name) if start else host.status(name)
        host.network.announce(host.store.get(name))  # type: ignore[arg-type]
        return {"ok": True, "status": status}

    def _give_back(self, name: str) -> bool:
        """After a failed lazy restore: drop the container if none of it runs here
        (the restore undid its steps, CRIU killed what it restored); whether it did."""
        record = self.host.store.get(name)
        if record is not None and (record.state == "running"
                                   or self.host.cgroups.pids(name)):
            return False
        if record is not None:
            self._drop(name)
        return self.host.store.get(name) is None

    def _drop(self, name: str) -> None:
        try:
            self.host.destroy(name, force=True)
        except KamraError as exc:
            log.warning("dropping %s: %s", name, exc.message)


def _break(sock: socket.socket) -> None:
    """End a TLS connection another thread uses, without touching its TLS state (which
    ``SSLSocket.shutdown`` would drop under that thread)."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


class _PageStream:
    """The target's end of a lazy page stream: replacement connections arrive through
    ``offers`` while the stream ``waiting`` for one."""

    def __init__(self, stream: Stream):
        self.stream = stream
        self.offers: queue.Queue[tuple[ssl.SSLSocket, int, threading.Event]] = queue.Queue()
        self.waiting = threading.Event()
        self.released: threading.Event | None = None  # lets the lender of a link return

    def renew(self, received: int) -> tuple[ssl.SSLSocket, int] | None:
        self.release()
        self.waiting.set()
        try:
            sock, peer_received, released = self.offers.get(timeout=RESUME_FOR)
        except queue.Empty:
            return None
        self.waiting.clear()
        self.released = released
        return sock, peer_received

    def release(self) -> None:
        if self.released is not None:
            self.released.set()
            self.released = None


class _IncomingPages:
    """A page server receiving one live migration's memory, or (lazy) CRIU's end of
    the page connection kept for the lazy-pages daemon (see ``_serve_pages``)."""

    def __init__(self, directory: str | None, proc: subprocess.Popen[bytes] | None,
                 criu_end: socket.socket | None = None):
        self.directory = directory
        self.proc = proc
        self.criu_end = criu_end

    def discard(self) -> None:
        if self.criu_end is not None:
            self.criu_end.close()
        if self.proc is not None:
            criu.end(self.proc)
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


class _NotDumpable(Exception):
    """CRIU could not dump the container (it keeps running): restart mode can go on."""
