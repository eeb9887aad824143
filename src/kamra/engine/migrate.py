"""Moving a container to another kamra host: ``kamra migrate NAME REMOTE``.

One authenticated TLS connection (kamra.remote) carries everything. The source drives:

  check    the target: name free, same template (digest), addresses free, plan known
  send     live: CRIU dumps the container and, while its tasks are still frozen
           (post-dump), the images and its files go over as one archive; the target
           imports them (checkpointed, not running). restart: the container is stopped
           and its files go over.
  resume   the target restores (live) or starts (restart) it, wires its address (routed
           with an uplink: host route, proxy ARP and a gratuitous ARP so neighbours
           update at once) and answers; the source then removes its copy.

Exactly one host runs the container. Until the source's tasks are gone (CRIU kills them
when post-dump returns) any failure resumes them on the source, and the target drops
what it imported when the connection closes before ``resume``. After that point the
source keeps a complete checkpoint until the target answers ``resume``: if the
connection breaks before ``resume`` reached the target, the container stays
checkpointed on the source ('kamra restore' resumes it there); if only the answer was
lost, the source marks it ``migrating`` and says so, since it may run on the target.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kamra.checkpoint import archive
from kamra.engine.checkpoint import DumpFailed
from kamra.errors import AlreadyExists, Conflict, InvalidInput, KamraError, NotFound
from kamra.remote import tls, wire
from kamra.remote.store import RemoteStore, parse_address
from kamra.templates.model import Progress, emit

if TYPE_CHECKING:
    from kamra.engine.host import Host
    from kamra.state import ContainerRecord

log = logging.getLogger("kamra.migrate")

MODES = ("auto", "live", "restart")
MAX_ARCHIVE = 1 << 40
OPERATION_TIMEOUT = 600.0  # seconds one request may take on the target


@dataclass
class _Trip:
    """One migration under way: its connection, the remote's name, progress reports."""

    sock: ssl.SSLSocket
    remote: str
    progress: Progress | None


class RemoteRefused(KamraError):
    """The target answered with an error."""


def _ask(sock: ssl.SSLSocket, message: dict) -> dict:
    wire.send(sock, message)
    reply, _ = wire.recv(sock)
    if "error" in reply:
        raise RemoteRefused(str(reply["error"]))
    return reply


class Migrations:
    """Both sides of a migration for one Host."""

    def __init__(self, host: Host):
        self.host = host
        self.remotes = RemoteStore(host.layout.root)

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
                progress: Progress | None = None) -> dict:
        if mode not in MODES:
            raise InvalidInput(f"unknown mode {mode!r}: use auto, live or restart")
        host = self.host
        remote = self.remotes.get(remote_name)
        began = time.perf_counter()
        with host._lock(name):
            record = host._record(name)
            if record.state not in ("running", "stopped"):
                raise Conflict(f"container {name!r} is {record.state}: only a running or "
                               "stopped container can migrate")
            if mode == "live" and record.state != "running":
                raise Conflict(f"container {name!r} is not running: live migration needs "
                               "a running container (use --mode restart)")
            emit(progress, "check", message=remote_name)
            with self.connect(remote) as sock:
                trip = _Trip(sock, remote_name, progress)
                checked = _ask(sock, {"op": "check", "name": name,
                                      "manifest": host.checkpoints._manifest(record, None)})
                if checked.get("need_template"):
                    self._send_template(trip, record.template)
                reason = None
                result: dict[str, Any] | None = None
                if record.state == "running" and mode in ("auto", "live"):
                    try:
                        result = self._live(record, trip)
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
                      images: str | None) -> int:
        """Pack and send the container (its images, if any, and its files) as it is
        packed: no file on the source."""
        host = self.host
        sock = trip.sock
        upper = host.storage(record).upper_dir(host.layout.container_dir(record.name))
        try:
            wire.send(sock, {"op": "send", "name": record.name})
            sender = wire.FileSender(sock, lambda n: emit(trip.progress, "send", n))
            archive.stream(sender, host.checkpoints._manifest(record, meta), images, upper)
            sender.close()
            reply, _ = wire.recv(sock)
        except (OSError, wire.WireError) as exc:
            raise KamraError(f"sending {record.name!r} to the target failed: "
                             f"{exc or type(exc).__name__}") from None
        if "error" in reply:
            raise RemoteRefused(str(reply["error"]))
        return sender.sent

    def _send_template(self, trip: _Trip, name: str) -> None:
        """The target lacks the template: send it (it verifies the digest)."""
        from kamra.templates.archive import stream_template

        info = self.host.templates.get(name)
        sock = trip.sock
        try:
            wire.send(sock, {"op": "template", "name": name, "digest": info.digest})
            sender = wire.FileSender(sock, lambda n: emit(trip.progress, "template", n,
                                                          message=name))
            stream_template(info, sender)
            sender.close()
            reply, _ = wire.recv(sock)
        except (OSError, wire.WireError) as exc:
            raise KamraError(f"sending template {name!r} failed: {exc}") from None
        if "error" in reply:
            raise RemoteRefused(f"the target refused template {name!r}: {reply['error']}")

    def _live(self, record: ContainerRecord, trip: _Trip) -> dict:
        host = self.host
        name = record.name
        sent: list[int] = []

        def post_dump(images: str, meta: dict) -> None:
            # The tasks are frozen and the network locked: ship everything.
            sent.append(self._send_archive(trip, record, meta, images))

        try:
            host.checkpoints._check_dumpable(record)
        except Conflict as exc:
            raise _NotDumpable(exc.message) from None
        frozen = time.perf_counter()
        emit(trip.progress, "dump", message=name)
        try:
            host.checkpoints._dump(record, False, post_dump=post_dump)
        except DumpFailed as exc:
            raise _NotDumpable(exc.message) from None
        # The source's tasks are gone; its checkpoint stays until the target confirms.
        host.wait_exit(name, record.init_pid, 10)
        host._finish_stop(record, {"status": None, "code": None, "signal": None,
                                   "reason": f"migrated to {trip.remote}"}, state="checkpointed")
        status = self._resume(record, trip)
        downtime = (time.perf_counter() - frozen) * 1000
        self._forget(record)
        return {"mode": "live", "bytes": sent[0] if sent else 0,
                "downtime_ms": round(downtime, 1), "status": status}

    def _restart(self, record: ContainerRecord, trip: _Trip) -> dict:
        host = self.host
        was_running = record.state == "running"
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
        self._forget(record)
        return {"mode": "restart", "bytes": sent, "downtime_ms": round(downtime, 1),
                "status": status}

    def _resume(self, record: ContainerRecord, trip: _Trip, start: bool = True) -> dict:
        name = record.name
        sock, remote = trip.sock, trip.remote
        emit(trip.progress, "resume", message=remote)
        try:
            wire.send(sock, {"op": "resume", "name": name, "start": start})
        except (OSError, wire.WireError) as exc:
            raise KamraError(f"migrating {name!r} to {remote} failed before the target "
                             f"resumed it ({exc}); it is {record.state} here: "
                             f"'kamra {'restore' if record.state == 'checkpointed' else 'start'}"
                             f" {name}' resumes it") from None
        try:
            reply, _ = wire.recv(sock)
        except (OSError, wire.WireError) as exc:
            record.state = "migrating"
            self.host.store.update(record)
            raise KamraError(f"lost {remote} while it resumed {name!r} ({exc}): it may run "
                             f"there now; check with the remote before resuming it here") \
                from None
        if "error" in reply:
            raise RemoteRefused(f"{remote} could not resume {name!r}: {reply['error']}; it "
                                f"stays there ({reply.get('state', 'checkpointed')})")
        return reply.get("status") or {}

    def _forget(self, record: ContainerRecord) -> None:
        """The target runs it: remove the source's copy (files, checkpoint, addresses)."""
        self.host._destroy_locked(record)

    # -- target -------------------------------------------------------------------------
    def serve(self, sock: ssl.SSLSocket, peer: str) -> None:
        """Requests from one authenticated source host (see the module docstring)."""
        imported: str | None = None
        try:
            while True:
                try:
                    message, _ = wire.recv(sock)
                except (OSError, wire.WireError):
                    return
                op = message.get("op")
                try:
                    if op == "check":
                        wire.send(sock, self._check(message["name"], message["manifest"]))
                    elif op == "template":
                        self._receive_template(sock, str(message["name"]),
                                               str(message["digest"]))
                        wire.send(sock, {"ok": True})
                    elif op == "send":
                        imported = self._receive(sock, str(message["name"]),
                                                 int(message.get("bytes", 0)))
                        wire.send(sock, {"ok": True})
                    elif op == "resume":
                        name = str(message["name"])
                        if name != imported:
                            raise Conflict(f"nothing of {name!r} was received")
                        imported = None  # from here on the container is ours
                        wire.send(sock, self._resume_here(name, bool(message.get("start"))))
                    else:
                        wire.send(sock, {"error": f"unknown request {op!r}"})
                except KamraError as exc:
                    wire.send(sock, {"error": exc.message})
        finally:
            if imported is not None:
                log.warning("%s went away before resuming %s: dropping what it sent",
                            peer, imported)
                self._drop(imported)

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
        return {"ok": True, "need_template": need_template}

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

    def _receive(self, sock: ssl.SSLSocket, name: str, size: int) -> str:
        path = os.path.join(self.host.layout.run, f"incoming-{name}-{os.urandom(3).hex()}")
        try:
            with open(path, "wb") as f:
                wire.recv_file(sock, f, MAX_ARCHIVE)
            with self.host._lock(name):
                self.host.checkpoints._import(name, path)
        finally:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        return name

    def _resume_here(self, name: str, start: bool) -> dict:
        host = self.host
        record = host.store.get(name)
        if record is None:
            raise NotFound(f"container {name!r} was not received")
        if record.state == "checkpointed":
            status = host.checkpoints.restore(name)
        elif start:
            status = host.start(name)
        else:
            status = host.status(name)
        host.network.announce(host.store.get(name))  # type: ignore[arg-type]
        return {"ok": True, "status": status}

    def _drop(self, name: str) -> None:
        try:
            self.host.destroy(name, force=True)
        except KamraError as exc:
            log.warning("dropping %s: %s", name, exc.message)


class _NotDumpable(Exception):
    """CRIU could not dump the container (it keeps running): restart mode can go on."""
