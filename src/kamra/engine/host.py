"""The engine: one Host per data root. Containers, their lifecycle, and reconciliation.

The Host is a plain library (tests drive it directly); kamrad is a thin HTTP layer
over it. It talks to the kernel only through drivers (storage, cgroups) and the
keeper, which forks every container process from a clean single-threaded context.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable

from kamra.cgroups import CgroupDriver, driver_for_host
from kamra.engine.etcfiles import write_hostname
from kamra.engine.locks import locked
from kamra.engine.revert import Revert
from kamra.errors import Conflict, InvalidInput, KamraError, NotFound, ResourceBusy
from kamra.linux import caps, fdpass, proc
from kamra.names import check_hostname, check_name
from kamra.paths import Layout
from kamra.runtime.execute import exit_code
from kamra.runtime.keeper_client import KeeperClient, KeeperError
from kamra.signals import parse_signal, signal_name
from kamra.state import ContainerRecord, StateStore, open_store
from kamra.storage import StorageBackend, get_backend
from kamra.templates.store import TemplateStore

log = logging.getLogger("kamra.engine")

RUNNING_STATES = ("starting", "running", "stopping")
# Spare launchers kept ready (cgroup v1): enough for a burst of starts while they refill.
STANDBY_POOL = 3


def describe_exit(status: int, stopping: bool = False) -> dict:
    """Turn a wait status into what a user wants to know about an init's end.

    In a child pid namespace, reboot(2) ends the init with SIGHUP (restart) or SIGINT
    (power off, halt): that is how a reboot inside a container is told from a poweroff.
    """
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        reason = {signal.SIGHUP: "reboot", signal.SIGINT: "poweroff"}.get(sig, "killed")
        if stopping and reason == "killed":
            reason = "stopped"
        return {"status": status, "code": 128 + sig, "signal": signal_name(sig), "reason": reason}
    return {"status": status, "code": os.waitstatus_to_exitcode(status), "signal": None,
            "reason": "stopped" if stopping else "exited"}


class Host:
    """Everything kamra manages under one data root."""

    def __init__(self, root: str, *, watch: bool = True):
        self.layout = Layout.at(root)
        self.layout.ensure()
        self.store: StateStore = open_store("sqlite", self.layout.db)
        self.templates = TemplateStore(self.layout)
        from kamra.engine.resources import Resources

        self.resources = Resources(self)
        from kamra.engine.network import Networking

        self.network = Networking(self)
        from kamra.engine.checkpoint import Checkpoints

        self.checkpoints = Checkpoints(self)
        from kamra.engine.migrate import Migrations

        self.migrations = Migrations(self)
        self.remote_listener = None  # kamra.remote.listener.RemoteListener, see listen()
        self.cgroups: CgroupDriver = driver_for_host(self.layout.root_id)
        self.keeper = KeeperClient(self.layout)
        self.keeper.ensure_running()
        from kamra.runtime.lxcfs import Lxcfs

        self.lxcfs = Lxcfs(self.layout)
        self.lxcfs.ensure()
        self._exits: dict[str, tuple[int, int]] = {}  # name -> (pid, wait status)
        self._exit_cond = threading.Condition()
        self._cleanups: queue.Queue[str | None] = queue.Queue()
        self._closed = False
        self._watch_sock: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._standbys: list[str] = []  # spare cgroups, each holding a ready launcher
        self._standby_lock = threading.Lock()
        self._refill: threading.Thread | None = None
        if watch:
            self._start_watcher()
        self.reconcile()
        self.network.reconcile()
        self._drop_stale_standbys()
        self._refill_standby()

    # -- plumbing -------------------------------------------------------------------------
    def storage(self, record: ContainerRecord) -> StorageBackend:
        return get_backend(record.storage, self.layout.root)

    def _record(self, name: str) -> ContainerRecord:
        check_name(name)
        record = self.store.get(name)
        if record is None:
            raise NotFound(f"container {name!r} not found (see 'kamra list')")
        return record

    def _lock(self, name: str):
        return locked(self.layout.locks, name)

    def _start_watcher(self) -> None:
        self._watch_sock = self.keeper.session({"op": "watch"})
        reply, _ = fdpass.recv(self._watch_sock)
        if not reply or not reply.get("ok"):
            raise KamraError("the keeper refused to report container exits")
        for target, name in ((self._watch_loop, "kamra-watch"),
                             (self._cleanup_loop, "kamra-cleanup")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _watch_loop(self) -> None:
        sock = self._watch_sock
        assert sock is not None
        while not self._closed:
            try:
                event, fds = fdpass.recv(sock)
            except OSError:
                event, fds = None, []
            for fd in fds:
                os.close(fd)
            if event is None:
                if not self._closed:
                    log.error("lost the keeper's exit reports")
                return
            if event.get("event") == "exit":
                self._note_exit(event["name"], event["pid"], event["status"])
                self._cleanups.put(event["name"])

    def _note_exit(self, name: str, pid: int, status: int) -> None:
        with self._exit_cond:
            self._exits[name] = (pid, status)
            self._exit_cond.notify_all()

    def _cleanup_loop(self) -> None:
        while True:
            name = self._cleanups.get()
            if name is None:
                return
            try:
                self._after_exit(name)
            except Exception:  # noqa: BLE001 - keep serving other containers
                log.exception("cleaning up after %s exited", name)

    def _after_exit(self, name: str) -> None:
        """An init exited on its own: record it, release resources, maybe restart."""
        with self._lock(name):
            record = self.store.get(name)
            if record is None or record.state not in RUNNING_STATES:
                return
            with self._exit_cond:
                pid, status = self._exits.get(name, (0, 0))
            if pid != record.init_pid:
                return
            self._finish_stop(record, describe_exit(status))
            reboot = record.last_exit and record.last_exit["reason"] == "reboot"
            if record.ephemeral:
                self._destroy_locked(record)
                return
        if reboot:
            log.info("%s rebooted itself: starting it again", name)
            self.start(name)

    # -- standby launchers (cgroup v1) ---------------------------------------------------
    def _refill_standby(self) -> None:
        """Top the pool of spare launchers up in the background (one thread at a time)."""
        if not self.cgroups.supports_rename or self._closed:
            return
        with self._standby_lock:
            if len(self._standbys) >= STANDBY_POOL or (self._refill and self._refill.is_alive()):
                return
            self._refill = threading.Thread(target=self._prepare_standbys,
                                            name="kamra-standby", daemon=True)
            self._refill.start()

    def _prepare_standbys(self) -> None:
        # Migrations right after one another are cheap (the grace period is paid once),
        # so the pool refills in about the time one spare takes.
        while not self._closed:
            with self._standby_lock:
                if len(self._standbys) >= STANDBY_POOL:
                    return
            sid = ".standby-" + os.urandom(4).hex()  # never a valid container name
            try:
                self.cgroups.create(sid)
                self.keeper.request({"op": "prepare", "id": sid,
                                     "cgroup_procs": self.cgroups.procs_files(sid)})
            except (OSError, KamraError) as exc:
                log.warning("no standby launcher: %s", exc)
                self._remove_cgroup(sid)
                return
            with self._standby_lock:
                if not self._closed:
                    self._standbys.append(sid)
                    continue
            self._release_standby(sid)
            return

    def _take_standby(self, name: str) -> str | None:
        """Rename a spare cgroup (with its launcher inside) to ``name``'s cgroup."""
        with self._standby_lock:
            sid = self._standbys.pop(0) if self._standbys else None
        if sid is None:
            return None
        try:
            self.cgroups.rename(sid, name)
        except OSError as exc:
            log.warning("could not use the standby launcher for %s: %s", name, exc)
            self._release_standby(sid)
            return None
        return sid

    def _release_standby(self, sid: str) -> None:
        try:
            self.keeper.request({"op": "release", "id": sid}, timeout=5)
        except (OSError, KamraError):
            pass
        self._remove_cgroup(sid)

    def release_standby(self) -> None:
        """Give back the spare launcher and its cgroup (kamrad stopping, tests ending)."""
        with self._standby_lock:
            refill = self._refill
        if refill is not None:
            refill.join(timeout=10)
        with self._standby_lock:
            spares, self._standbys = self._standbys, []
        for sid in spares:
            self._release_standby(sid)

    def _drop_stale_standbys(self) -> None:
        """Standbys of an earlier kamrad: the keeper ends them, we remove their cgroups."""
        if not self.cgroups.supports_rename:
            return
        try:
            self.keeper.request({"op": "release", "id": "*"}, timeout=5)
        except (OSError, KamraError):
            pass
        for sid in self.cgroups.spares():
            self._remove_cgroup(sid)

    def wait_exit(self, name: str, pid: int, timeout: float | None = None) -> int | None:
        """Wait for the init ``pid`` of ``name`` to exit; its wait status, or None on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._exit_cond:
            while True:
                seen = self._exits.get(name)
                if seen and seen[0] == pid:
                    return seen[1]
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._exit_cond.wait(remaining if remaining is not None else 1.0)

    def listen(self, address: str | None = None) -> dict:
        """Listen for other kamra hosts on ``address`` (saved), or on the saved one."""
        from kamra.remote.listener import RemoteListener

        store = self.migrations.remotes
        if address is None:
            address = store.listen_address()
            if address is None:
                return {"address": None}
        if self.remote_listener is not None:  # (the new one may want the same port)
            self.remote_listener.close()
            self.remote_listener = None
        try:
            listener = RemoteListener(store, address, self.migrations.serve)
        except OSError as exc:
            raise KamraError(f"cannot listen on {address}: {exc.strerror or exc}") from None
        self.remote_listener = listener
        store.set_listen_address(address)
        return {"address": address, "fingerprint": listener.fingerprint}

    def shutting_down(self) -> None:
        """From now on a closed keeper connection is expected, not an error."""
        if self.remote_listener is not None:
            self.remote_listener.close()
            self.remote_listener = None
        self._closed = True
        self.release_standby()

    def close(self) -> None:
        self._closed = True
        self.release_standby()
        self._cleanups.put(None)
        if self._watch_sock is not None:
            try:
                self._watch_sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._watch_sock.close()
        for thread in self._threads:
            thread.join(timeout=5)
        self.network.close()
        if not any(r.state in RUNNING_STATES for r in self.store.list()):
            self.lxcfs.stop()  # containers use it; an idle root needs none
        self.cgroups.cleanup()  # removes kamra's per-root cgroup only if nothing uses it
        self.store.close()

    # -- reconciliation -------------------------------------------------------------------
    def reconcile(self) -> None:
        """Re-adopt running containers after a (re)start of kamrad; clean up the dead."""
        try:
            inits = self.keeper.request({"op": "list"})["inits"]
        except (OSError, KamraError):
            inits = {}
        for record in self.store.list():
            if record.state in ("checkpointing", "checkpointed"):
                self._reconcile_checkpoint(record, inits.get(record.name))
                continue
            if record.state == "migrating":
                self._reconcile_migrating(record)
                continue
            if record.state not in RUNNING_STATES:
                continue
            known = inits.get(record.name)
            if known and known["pid"] == record.init_pid:
                if known["status"] is None:
                    if record.state != "running":
                        record.state = "running"
                        self.store.update(record)
                    continue
                self._note_exit(record.name, known["pid"], known["status"])
                self._cleanups.put(record.name)
                continue
            if record.init_pid and proc.alive(record.init_pid, record.init_start):
                # Running, but the keeper that held its console is gone.
                record.state = "running"
                record.console = False
                self.store.update(record)
                continue
            with self._lock(record.name):
                self._finish_stop(record, {"status": None, "code": None, "signal": None,
                                           "reason": "lost"})

    def _reconcile_migrating(self, record: ContainerRecord) -> None:
        """A kamrad that died after committing a live migration: the remote owns the
        container, so tasks CRIU resumed here when kamrad went away must not run on."""
        if record.init_pid and proc.alive(record.init_pid, record.init_start):
            log.warning("%s was committed to %s: ending its processes here", record.name,
                        record.migrating_to)
            try:
                os.kill(record.init_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 10
            while proc.alive(record.init_pid, record.init_start) and \
                    time.monotonic() < deadline:
                time.sleep(0.05)
        if record.init_pid:
            with self._lock(record.name):
                self._finish_stop(record, {"status": None, "code": None, "signal": None,
                                           "reason": f"migrated to {record.migrating_to}"},
                                  state="migrating")

    def _reconcile_checkpoint(self, record: ContainerRecord, known: dict | None) -> None:
        """A kamrad that died during a checkpoint or a restore: settle what CRIU did."""
        if known and known["status"] is None and record.state == "checkpointed":
            # The restore got as far as the keeper adopting the init.
            record.state, record.init_pid, record.init_start = "running", known["pid"], \
                known["start"]
            self.store.update(record)
            return
        if record.state != "checkpointing":
            return
        if record.init_pid and proc.alive(record.init_pid, record.init_start):
            record.state = "running"  # the dump failed (CRIU resumed it) or left it running
            self.store.update(record)
            return
        done = self.checkpoints.meta(record.name) is not None
        with self._lock(record.name):
            self._finish_stop(record, {"status": None, "code": None, "signal": None,
                                       "reason": "checkpointed" if done else "lost"},
                              state="checkpointed" if done else "stopped")

    # -- containers -----------------------------------------------------------------------
    def create(self, name: str, template: str, hostname: str | None = None, *,
               init: list[str] | None = None, console: bool = True,
               ephemeral: bool = False, plan: str | None = None,
               config: dict[str, object] | None = None) -> ContainerRecord:
        check_name(name)
        check_name(template, "template")
        if hostname is not None:
            check_hostname(hostname)
        info = self.templates.get(template)
        overrides = self.resources.parse(config or {})
        if plan is not None:
            check_name(plan, "plan")
            self.resources.plans.get(plan)
        self.resources.validate(plan, overrides)
        record = ContainerRecord(
            name=name, template=info.name, template_digest=info.digest,
            hostname=hostname or name, created_at=time.time(), init=list(init or []),
            stop_signal=info.stop_signal, console=console, ephemeral=ephemeral,
            plan=plan, config=overrides)
        with self._lock(name):
            if self.store.get(name) is not None:
                raise_exists(name)
            container_dir = self.layout.container_dir(name)
            if os.path.exists(container_dir):
                raise ResourceBusy(f"{container_dir} exists but no container {name!r} is "
                                   "recorded: move it away first")
            with Revert() as revert:
                revert.add("remove container dir", self.storage(record).destroy, container_dir)
                self.storage(record).create(  # with limits.disk: makes its image
                    container_dir, info.rootfs,
                    quota=self.resources.limits(record).get("limits.disk"))  # type: ignore[arg-type]
                self.store.insert(record)
                revert.add("forget the container", self.store.delete, name)
                revert.add("release addresses", self.network.release, name)
                self.network.assign(record)
                revert.success()
        return record

    def start(self, name: str, *, stdio: list[int] | None = None,
              discard_checkpoint: bool = False) -> dict:
        """Start a stopped container; returns its status plus ``start_ms``."""
        received = time.perf_counter()
        with self._lock(name):
            record = self._record(name)
            if record.state in RUNNING_STATES:
                raise Conflict(f"container {name!r} is already running (pid {record.init_pid})")
            if record.state == "checkpointed" and not discard_checkpoint:
                raise Conflict(f"container {name!r} is checkpointed: resume it with 'kamra "
                               f"restore {name}', or boot it afresh (dropping the "
                               f"checkpoint) with 'kamra start {name} --discard-checkpoint'")
            if record.state in ("checkpointing", "migrating"):
                raise Conflict(f"container {name!r} is {record.state}: see 'kamra status "
                               f"{name}'")
            if record.state == "checkpointed":
                self.checkpoints.discard(name)
            via_standby = self._start_locked(record, stdio)
        result = self._status(record)
        result["start_ms"] = round((time.perf_counter() - received) * 1000, 3)
        result["via_standby"] = via_standby
        result["notes"] = self.network.start_notes(record)
        return result

    def _start_locked(self, record: ContainerRecord, stdio: list[int] | None) -> bool:
        """Start the init; True when a standby launcher was used."""
        name = record.name
        info = self.templates.get(record.template)
        if info.digest != record.template_digest:
            raise Conflict(f"template {record.template!r} changed since {name!r} was created "
                           f"({record.template_digest} -> {info.digest})")
        container_dir = self.layout.container_dir(name)
        storage = self.storage(record)
        argv = record.init or info.init
        console = record.console and stdio is None
        step = "mount storage"
        try:
            with Revert() as revert:
                step = "size disk image"  # limits.disk changed by a plan while stopped
                self.resources.apply_disk(record)
                step = "mount storage"
                rootfs = storage.mount(container_dir, info.rootfs)
                revert.add("unmount storage", storage.unmount, container_dir)
                step = "write /etc/hostname"
                write_hostname(rootfs, record.hostname)
                step = "write /etc/hosts and /etc/resolv.conf"
                self.network.write_files(record, rootfs)
                step = "create cgroup"
                standby = self._take_standby(name)
                if standby is None:
                    self.cgroups.create(name)
                revert.add("remove cgroup", self._remove_cgroup, name)
                step = "apply limits"
                self.resources.apply(record)
                step = "set up the network"
                netns_fd = self.network.prepare(record)
                revert.add("remove the network", self.network.teardown, record)
                step = "start init"
                with self._exit_cond:
                    self._exits.pop(name, None)
                fds = list(stdio or ())
                if netns_fd is not None:
                    fds.append(netns_fd)
                try:
                    reply = self.keeper.request({
                        "op": "spawn", "name": name, "rootfs": rootfs,
                        "hostname": record.hostname, "argv": argv, "console": console,
                        "console_log": os.path.join(container_dir, "console.log"),
                        "cgroup_procs": self.cgroups.procs_files(name),
                        "drop_caps": list(caps.DEFAULT_DROP), "standby": standby,
                        "lxcfs": self.lxcfs.ensure(), "netns": netns_fd is not None,
                        # The template's own init (an OS init) writes to a pipe, leaving
                        # the console to its getty or shell (see initproc._hand_console).
                        "output_pipe": console and not record.init,
                    }, fds=fds)
                finally:
                    if netns_fd is not None:
                        os.close(netns_fd)  # the init holds the namespace now
                record.state = "running"
                record.init_pid = reply["pid"]
                record.init_start = reply["start"]
                record.started_at = time.time()
                record.console = console
                self.store.update(record)
                revert.success()
                return standby is not None
        except KeeperError as exc:
            raise KamraError(f"starting {name!r} failed at step '{exc.message}'; "
                             "every earlier step was undone") from None
        except KamraError as exc:
            exc.message = (f"starting {name!r} failed at step '{step}': {exc.message}; "
                           "every earlier step was undone")
            exc.args = (exc.message,)
            raise
        except OSError as exc:
            raise KamraError(f"starting {name!r} failed at step '{step}': "
                             f"{exc.strerror or exc}; every earlier step was undone") from None
        finally:
            self._refill_standby()

    def _remove_cgroup(self, name: str) -> None:
        from kamra.cgroups.base import wait_empty

        self.cgroups.kill(name)
        # A killed process leaves its cgroup only once the kernel has reaped it.
        wait_empty(self.cgroups.procs_files(name), 10)
        self.cgroups.remove(name)

    def _signal(self, record: ContainerRecord, signum: int) -> bool:
        try:
            self.keeper.request({"op": "signal", "name": record.name, "signal": signum})
            return True
        except KeeperError:
            # Not the keeper's child (the keeper was restarted): signal by verified pid.
            if proc.alive(record.init_pid, record.init_start):
                os.kill(record.init_pid, signum)
                return True
            return False

    def _wait_gone(self, record: ContainerRecord, timeout: float) -> bool:
        if self.wait_exit(record.name, record.init_pid, timeout) is not None:
            return True
        # The keeper may not be this init's parent (re-adopted after a keeper restart).
        return not proc.alive(record.init_pid, record.init_start)

    def stop(self, name: str, timeout: float = 10, *, force: bool = False) -> dict:
        if timeout < 0:
            raise InvalidInput("--timeout must be zero or more seconds")
        with self._lock(name):
            record = self._record(name)
            if record.state not in RUNNING_STATES:
                raise Conflict(f"container {name!r} is not running")
            self._stop_locked(record, timeout, force)
            return self._status(record)

    def _stop_locked(self, record: ContainerRecord, timeout: float, force: bool) -> None:
        record.state = "stopping"
        self.store.update(record)
        gone = False
        if not force and timeout > 0:
            self._signal(record, parse_signal(record.stop_signal))
            gone = self._wait_gone(record, timeout)
        if not gone:
            # SIGKILL to a pid namespace's init kills every process in it; the cgroup kill
            # catches anything else that joined the cgroup (exec helpers).
            self._signal(record, signal.SIGKILL)
            self.cgroups.kill(record.name)
            self._wait_gone(record, 10)
        with self._exit_cond:
            pid, status = self._exits.get(record.name, (0, None))
        if pid == record.init_pid and status is not None:
            last = describe_exit(status, stopping=True)
        else:
            last = {"status": None, "code": None, "signal": None, "reason": "stopped"}
        self._finish_stop(record, last)

    def _finish_stop(self, record: ContainerRecord, last_exit: dict,
                     state: str = "stopped") -> None:
        """Release a stopped container's resources. Idempotent."""
        name = record.name
        self._remove_cgroup(name)
        try:
            self.network.teardown(record)
        except KamraError as exc:  # the rest of the stop must still happen
            log.warning("removing the network of %s: %s", name, exc.message)
        self.storage(record).unmount(self.layout.container_dir(name))
        try:
            self.keeper.request({"op": "forget", "name": name})
        except (KeeperError, OSError):
            pass
        record.state = state
        record.stopped_at = time.time()
        record.last_exit = last_exit
        record.init_pid = 0
        record.init_start = None
        self.store.update(record)

    def restart(self, name: str, timeout: float = 10) -> dict:
        with self._lock(name):
            record = self._record(name)
            if record.state in RUNNING_STATES:
                self._stop_locked(record, timeout, False)
            self._start_locked(record, None)
            return self._status(record)

    def destroy(self, name: str, *, force: bool = False) -> None:
        with self._lock(name):
            record = self._record(name)
            # Processes in its cgroup in another state (a checkpoint that was cut short)
            # are running all the same: left there, they would keep cgroups alive.
            if record.state in RUNNING_STATES or self.cgroups.pids(name):
                if not force:
                    raise Conflict(f"container {name!r} is running: stop it first or use --force")
                self._stop_locked(record, 0, True)
            self._destroy_locked(record)

    def _destroy_locked(self, record: ContainerRecord) -> None:
        self.checkpoints.discard(record.name)  # (its images may be in memory: a symlink)
        self.storage(record).destroy(self.layout.container_dir(record.name))
        self.network.release(record.name)
        self.store.delete(record.name)

    # -- queries --------------------------------------------------------------------------
    def _status(self, record: ContainerRecord, addresses: dict[str, str] | None = None) -> dict:
        if addresses is None:
            addresses = self.store.addresses()
        # A container that arrived by migration shows "migrating" until its source
        # confirms (it runs, and may be used, once the source committed).
        state = "migrating" if record.migrating_from else record.state
        return {
            "name": record.name, "state": state, "template": record.template,
            "template_digest": record.template_digest, "hostname": record.hostname,
            "init_pid": record.init_pid or None, "created_at": record.created_at,
            "started_at": record.started_at if record.state in RUNNING_STATES else None,
            "stopped_at": record.stopped_at, "last_exit": record.last_exit,
            "console": record.console, "storage": record.storage,
            "init": record.init or None, "plan": record.plan,
            "addresses": [a for a, holder in addresses.items() if holder == record.name],
            "migrating_to": record.migrating_to if record.state == "migrating" else None,
            "migrating_from": record.migrating_from,
            "running": record.state in RUNNING_STATES,
        }

    def status(self, name: str) -> dict:
        return self._status(self._record(name))

    def list(self) -> list[dict]:
        addresses = self.store.addresses()
        return [self._status(r, addresses) for r in self.store.list()]

    def template_users(self, template: str) -> list[str]:
        return [r.name for r in self.store.list() if r.template == template]

    def ps(self, name: str) -> list[dict]:
        record = self._record(name)
        if record.state not in RUNNING_STATES:
            raise Conflict(f"container {name!r} is not running")
        init_ns = proc.ns_inode(record.init_pid, "pid")
        users = _passwd_names(os.path.join(self.layout.container_dir(name), "rootfs",
                                           "etc", "passwd"))
        rows = []
        for pid in self.cgroups.pids(name):
            if proc.ns_inode(pid, "pid") != init_ns:
                continue  # kamra's own exec helpers sit in the cgroup but not in the container
            fields = proc.status_fields(pid)
            nspid = fields.get("NSpid", "").split()
            uid = int(fields.get("Uid", "0").split()[0] or 0)
            cmd = proc.cmdline(pid) or [f"[{fields.get('Name', '?')}]"]
            rows.append({"pid": pid, "container_pid": int(nspid[-1]) if nspid else None,
                         "user": users.get(uid, str(uid)), "uid": uid, "command": cmd})
        rows.sort(key=lambda r: r["container_pid"] or 0)
        return rows

    # -- sessions -------------------------------------------------------------------------
    def _running(self, name: str) -> ContainerRecord:
        record = self._record(name)
        if record.state != "running":
            raise Conflict(f"container {name!r} is not running: start it with "
                           f"'kamra start {name}'")
        return record

    def exec_session(self, name: str, argv: list[str], *, env: dict[str, str] | None = None,
                     user: str | None = None, cwd: str | None = None, tty: bool = False,
                     winsize: tuple[int, int] | None = None, login: bool = False,
                     term: str | None = None, fds: list[int] | None = None) -> socket.socket:
        """Start ``argv`` in a running container; returns the session socket.

        The session then reports ``{"pty": true}`` (with the master fd, for a tty),
        ``{"started": pid}`` or ``{"error": ...}``, and ``{"exit": code}``.
        """
        if not argv:
            raise InvalidInput("no command given: put it after '--', e.g. kamra exec c1 -- ls")
        for key in env or {}:
            if not key or "=" in key or "\0" in key:
                raise InvalidInput(f"invalid environment variable name {key!r}")
        with self._lock(name):
            record = self._running(name)
            return self.keeper.session({
                "op": "exec", "init_pid": record.init_pid, "init_start": record.init_start,
                "cgroup_procs": self.cgroups.procs_files(name), "argv": argv,
                "env": env or {}, "user": user, "cwd": cwd, "tty": tty,
                "winsize": list(winsize) if winsize else None, "login": login, "term": term,
                "drop_caps": list(caps.DEFAULT_DROP),
            }, fds or ())

    def console_session(self, name: str) -> socket.socket:
        with self._lock(name):
            self._running(name)
            sock = self.keeper.session({"op": "attach", "name": name})
        reply, fds = fdpass.recv(sock)
        for fd in fds:
            os.close(fd)
        if not reply or "error" in reply:
            sock.close()
            raise Conflict((reply or {}).get("error", f"no console for {name!r}"))
        return sock

    def run(self, template: str, argv: list[str], *, name: str | None = None,
            remove: bool = False, stdio: list[int] | None = None,
            on_started: Callable[[dict], None] | None = None) -> dict:
        """Create, start with ``argv`` as init, wait for it, destroy if ``remove``."""
        if not argv:
            raise InvalidInput("no command given: put it after '--', e.g. kamra run busybox -- true")
        name = name or _generated_name()
        self.create(name, template, init=argv, console=stdio is None, ephemeral=remove)
        try:
            started = self.start(name, stdio=stdio)
        except KamraError:
            if remove:
                self.destroy(name, force=True)
            raise
        if on_started:
            on_started(started)
        status = self.wait_exit(name, started["init_pid"])
        assert status is not None
        if remove:
            # The cleanup thread destroys an ephemeral container after its exit; wait for it
            # so that when run returns, nothing of the container is left.
            deadline = time.monotonic() + 30
            while self.store.get(name) is not None and time.monotonic() < deadline:
                time.sleep(0.002)
        return {"name": name, "exit_code": exit_code(status), "start_ms": started["start_ms"]}

    # -- templates ------------------------------------------------------------------------
    def remove_template(self, name: str) -> None:
        check_name(name, "template")
        self.templates.remove(name, self.template_users(name))


def raise_exists(name: str) -> None:
    from kamra.errors import AlreadyExists

    raise AlreadyExists(f"container {name!r} already exists")


def _generated_name() -> str:
    return "run-" + os.urandom(4).hex()


def _passwd_names(path: str) -> dict[int, str]:
    names: dict[int, str] = {}
    try:
        with open(path, errors="replace") as f:
            for line in f:
                parts = line.split(":")
                if len(parts) > 3 and parts[2].isdigit():
                    names.setdefault(int(parts[2]), parts[0])
    except OSError:
        pass
    return names
