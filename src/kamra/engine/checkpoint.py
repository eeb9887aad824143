"""Checkpoint and restore of a container's processes with CRIU.

A checkpoint lives in ``<container>/checkpoint/``: CRIU's images, ``dump.log`` and
``restore.log`` (one log per operation, next to the images) and ``checkpoint.json``,
written last, which makes the directory a complete checkpoint. The container's
filesystem is its own upper dir, left untouched while it is checkpointed, so images
and files stay consistent.

What kamra does around CRIU, and why:
- The console is a pty of the container's own devpts whose master the keeper holds:
  dumped with ``orphan_pts_master``, CRIU hands a new master back on restore, which the
  keeper adopts (kamra.runtime.restorer).
- LXCFS's files bound over /proc are external mounts, named at dump and bound again
  from the running LXCFS on restore.
- The network namespace is restored empty (``empty_ns``) and wired by kamra exactly as
  at a start, once CRIU has locked it (``post-setup-namespaces``): so the host side,
  firewall and addresses come from kamra's own records, on this host or another. The
  dump leaves its configuration out too (``empty_ns`` again) unless a task sits in
  another network namespace; its sockets are dumped either way. (Firewall rules made
  inside the container are not carried.)
- Restored tasks stay in the cgroup the restore helper joined (``manage_cgroups``
  off): kamra made that cgroup and set its limits, as for a start.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kamra import scratch
from kamra.atomic import write_file
from kamra.checkpoint import tmpfs
from kamra.checkpoint.criu import Criu, CriuError
from kamra.checkpoint.netlock import RestoreLock
from kamra.engine.revert import Revert
from kamra.errors import Conflict, InvalidInput, KamraError, NotFound
from kamra.linux import fdpass, libc, proc
from kamra.runtime.keeper_client import KeeperError
from kamra.state.base import Forward

if TYPE_CHECKING:
    from kamra.engine.host import Host
    from kamra.state import ContainerRecord

log = logging.getLogger("kamra.checkpoint")

CHECKPOINT = "checkpoint"
META = "checkpoint.json"
NFTABLES, SKIP = 2, 3  # criu_network_lock_method
CG_IGNORE = 0  # criu_cg_mode


class DumpFailed(KamraError):
    """CRIU could not dump the container, which keeps running."""


def criu_binary() -> str:
    found = shutil.which("criu", path=os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin")
    if not found:
        raise KamraError("CRIU is not installed: run 'make setup' (it builds CRIU 4.2)")
    return found


def lxcfs_mounts(pid: int) -> list[str]:
    """The /proc files LXCFS serves inside the container (as the container sees them)."""
    found = []
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1].startswith("fuse") and fields[4].startswith("/proc/"):
                found.append(fields[4])
    return found


def _remove_later(path: str) -> None:
    """Move ``path`` aside and remove it in the background (a gigabyte of images takes a
    while to unlink, and nobody needs to wait for it). A symlink (an arrival's images,
    in memory) goes with what it points to."""
    old = f"{path}.old-{os.urandom(3).hex()}"
    try:
        os.rename(path, old)
    except FileNotFoundError:
        return
    threading.Thread(target=scratch.remove_tree, args=(old,), daemon=True,
                     name="kamra-rm-checkpoint").start()


def _drop_network_lock() -> list[str]:
    """In the calling thread's network namespace: delete the tables of CRIU's nftables
    network lock (``inet CRIU-<run id>``); returns their names."""
    from kamra.network.nft import open_backend

    backend = open_backend()
    try:
        _, listing, _ = backend.run("list tables")
        tables = [line.split()[-1] for line in listing.splitlines()
                  if line.startswith("table inet CRIU-")]
        for table in tables:
            backend.run(f"delete table inet {table}")
        return tables
    finally:
        backend.close()


def release_network_lock(pid: int) -> list[str]:
    """Unlock the network of the container whose init is ``pid`` after a CRIU dump that
    resumed its tasks without doing so itself (a lazy dump whose page transfer failed)."""
    from kamra.network import netns

    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return netns.run_in_netns(fd, _drop_network_lock)
    finally:
        os.close(fd)


def _drop_cached(directory: str) -> None:
    """Drop the page cache of the files in ``directory`` (a checkpoint about to be
    replaced, nobody reads it again): seen here, a gigabyte of them cached made the next
    dump's writes crawl at disk speed (3.7-5.0 s against 0.6-1.2 s for 1 GB)."""
    try:
        entries = os.listdir(directory)
    except OSError:
        return
    for entry in entries:
        try:
            fd = os.open(os.path.join(directory, entry), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue  # a directory (tmpfs contents) or gone
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _replace_dir(new: str, final: str) -> None:
    """Put ``new`` in place of ``final``; the old one goes in the background."""
    _remove_later(final)
    os.rename(new, final)


def _output_pipe(pid: int) -> str | None:
    """``pipe:[inode]`` of the init's output pipe to the keeper, if it writes to one."""
    try:
        target = os.readlink(f"/proc/{pid}/fd/1")
    except OSError:
        return None
    return target if target.startswith("pipe:") else None


class Checkpoints:
    """kamra checkpoint / kamra restore for one Host."""

    def __init__(self, host: Host):
        self.host = host

    def directory(self, name: str) -> str:
        return os.path.join(self.host.layout.container_dir(name), CHECKPOINT)

    def meta(self, name: str) -> dict | None:
        try:
            with open(os.path.join(self.directory(name), META)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    # -- checkpoint ---------------------------------------------------------------------
    def checkpoint(self, name: str, *, leave_running: bool = False,
                   export: str | None = None) -> dict:
        host = self.host
        with host._lock(name):
            record = host._record(name)
            if record.state != "running":
                raise Conflict(f"container {name!r} is not running: only a running container "
                               "can be checkpointed")
            self._check_dumpable(record)
            if export is not None:
                target = os.path.abspath(export)
                if not os.path.isdir(os.path.dirname(target)) or os.path.isdir(target):
                    raise NotFound(f"cannot export to {export}: give a file in an "
                                   "existing directory")
            started = time.perf_counter()
            meta = self._dump(record, leave_running, export)
            meta["checkpoint_ms"] = round((time.perf_counter() - started) * 1000, 1)
            if not leave_running:
                # CRIU killed the tasks; the keeper reports the init's end.
                host.wait_exit(name, record.init_pid, 10)
                host._finish_stop(record, {"status": None, "code": None, "signal": None,
                                           "reason": "checkpointed"}, state="checkpointed")
            else:
                record.state = "running"
                host.store.update(record)
            result = host._status(record)
            result["checkpoint"] = meta
            return result

    def _check_dumpable(self, record: ContainerRecord) -> None:
        name = record.name
        if not record.console:
            raise Conflict(f"container {name!r} cannot be checkpointed: its init uses the "
                           "stdio of the client that started it (kamra run)")
        # An exec session's helper sits in the cgroup but outside the container's pid
        # namespace: fewer levels of pids than the init (a nested namespace has more).
        depth = len(proc.status_fields(record.init_pid).get("NSpid", "").split())
        for pid in self.host.cgroups.pids(name):
            fields = proc.status_fields(pid)
            levels = fields.get("NSpid", "").split()
            # (The restore helper of a restore just done may still be on its way out.)
            if levels and len(levels) < depth and fields.get("Name") != "kamra-restore":
                raise Conflict(f"container {name!r} cannot be checkpointed while a "
                               f"'kamra exec' session runs in it (host pid {pid}): end "
                               "the session first")

    def _one_netns(self, record: ContainerRecord) -> bool:
        """Whether every task of the container is in its init's network namespace (CRIU
        can leave out only that one namespace's configuration)."""
        try:
            init = os.stat(f"/proc/{record.init_pid}/ns/net").st_ino
        except OSError:
            return False
        for pid in self.host.cgroups.pids(record.name):
            try:
                if os.stat(f"/proc/{pid}/ns/net").st_ino != init:
                    return False
            except OSError:
                continue  # exited meanwhile
        return True

    def _manifest(self, record: ContainerRecord, meta: dict) -> dict:
        container = {k: v for k, v in record.to_json().items()
                     if k in ("name", "template", "template_digest", "hostname", "storage",
                              "created_at", "init", "stop_signal", "console", "plan",
                              "config")}
        return {"container": container, "addresses": self.host.network.addresses(record.name),
                "forwards": [f.to_json() for f in self.host.store.forwards(record.name)],
                "checkpoint": meta}

    def _dump(self, record: ContainerRecord, leave_running: bool,
              export: str | None = None,
              post_dump: Callable[[str, dict], None] | None = None,
              page_server: socket.socket | None = None, lazy: bool = False) -> dict:
        """CRIU's dump into the checkpoint directory. ``post_dump(images, meta)`` runs
        while the tasks are still frozen; if it raises, CRIU resumes them. With
        ``page_server`` (a connected socket) the memory pages go to the CRIU page server
        at its other end instead of the directory; with ``lazy`` too, they stay here
        and, once post-dump returned, CRIU serves them over that socket to a
        ``criu lazy-pages`` until all went, and only then returns.

        A record whose state post-dump set to "migrating" (a committed migration) is not
        set back to running when the dump fails afterwards: the caller decides."""
        host = self.host
        name = record.name
        final = self.directory(name)
        # A migration's images are sent from post-dump and then spent: in memory, each
        # of CRIU's files costs the frozen tasks less (kamra.scratch).
        transient = page_server is not None
        work = (scratch.in_memory(host.layout.root_id, "dump", final + ".new") if transient
                else final + ".new")
        if not transient:
            shutil.rmtree(work, ignore_errors=True)
            os.makedirs(work, 0o700)
            _drop_cached(final)
        record.state = "checkpointing"
        host.store.update(record)
        lxcfs = lxcfs_mounts(record.init_pid)
        carried = tmpfs.own_mounts(record.init_pid)
        output = _output_pipe(record.init_pid)
        opts: dict[str, Any] = {
            "pid": record.init_pid, "log_file": "dump.log", "log_level": 4,
            "leave_running": leave_running, "tcp_established": True,
            "tcp_skip_in_flight": True, "file_locks": True, "link_remap": True,
            "orphan_pts_master": True, "network_lock": NFTABLES,
            "external": [*(f"mnt[{path}]:lx{os.path.basename(path)}" for path in lxcfs),
                         *tmpfs.externals(carried)],
            # Mounted by systemd at /dev/hugepages; empty (no container uses huge pages
            # unasked), so mounting it anew on restore is all CRIU needs to do.
            "enable_fs": ["hugetlbfs"],
            # The restore ignores CRIU's cgroup images (kamra makes the cgroup): without
            # this the dump walks and saves the whole host's cgroup2 tree, frozen.
            "manage_cgroups_mode": CG_IGNORE,
        }
        if host.network.mode(record) != "none" and self._one_netns(record):
            # Restored empty and wired by kamra (see the module docstring): the dump
            # need not save links, addresses, routes and firewall tables (8 programs
            # run and every link's sysctls read, with the tasks frozen).
            opts["empty_ns"] = libc.CLONE_NEWNET
        config = None
        if page_server is not None and lazy:
            # CRIU's RPC ignores ps.fd with lazy pages; its configuration file does not.
            config = os.path.join(host.layout.run, f"criu-lazy-{os.urandom(4).hex()}.conf")
            write_file(config, f"ps-socket {page_server.fileno()}\n")
            opts["lazy_pages"] = True
            opts["config_file"] = config
        elif page_server is not None:
            opts["ps"] = {"fd": page_server.fileno()}
        meta = {"name": name, "created_at": time.time(), "lxcfs": lxcfs, "output": output,
                "net_mode": host.network.mode(record), "hostname": record.hostname,
                "leave_running": leave_running, "template_digest": record.template_digest}
        exported: list[int] = []

        def notify(script: str, pid: int, fds: list[int]) -> None:
            for fd in fds:
                os.close(fd)
            if script == "post-dump":
                meta["tmpfs"] = tmpfs.save(record.init_pid, carried, work)
            if script == "post-dump" and post_dump is not None:
                write_file(os.path.join(work, META), json.dumps(meta))
                post_dump(work, meta)
            if script == "post-dump" and export:
                # The tasks are still frozen: files and images agree in the archive.
                from kamra.checkpoint import archive

                write_file(os.path.join(work, META), json.dumps(meta))
                upper = host.storage(record).upper_dir(host.layout.container_dir(name))
                exported.append(archive.write(export, self._manifest(record, meta), work,
                                              upper))

        images = os.open(work, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            opts["images_dir_fd"] = images
            Criu(criu_binary()).run("DUMP", opts, log_path=os.path.join(work, "dump.log"),
                                    notify=notify,
                                    pass_fds=[page_server.fileno()] if page_server else [])
        except CriuError as exc:
            # CRIU resumes the tasks and unlocks the network when a dump fails.
            if record.state != "migrating":
                self._back_to_running(record)
            kept = os.path.join(host.layout.container_dir(name), "dump-failed.log")
            try:
                shutil.move(os.path.join(work, "dump.log"), kept)  # (work may be in memory)
            except OSError:
                kept = exc.log_path or kept
            shutil.rmtree(work, ignore_errors=True)
            raise DumpFailed(f"checkpoint of {name!r} failed: {exc.message} (CRIU's log: "
                             f"{kept}); the container keeps running") from None
        except BaseException:
            if record.state != "migrating":
                self._back_to_running(record)
            shutil.rmtree(work, ignore_errors=True)
            raise
        finally:
            os.close(images)
            if config is not None:
                os.unlink(config)
        if transient:  # the target has it all now
            shutil.rmtree(work, ignore_errors=True)
            return meta
        write_file(os.path.join(work, META), json.dumps(meta))
        _replace_dir(work, final)
        if exported:
            meta = {**meta, "export": {"file": os.path.abspath(export or ""),
                                       "bytes": exported[0]}}
        return meta

    def _back_to_running(self, record: ContainerRecord) -> None:
        if proc.alive(record.init_pid, record.init_start):
            record.state = "running"
            self.host.store.update(record)

    # -- restore ------------------------------------------------------------------------
    def restore(self, name: str, *, import_file: str | None = None,
                before_resume: Callable[[ContainerRecord], None] | None = None,
                lazy: bool = False) -> dict:
        """Restore the checkpoint. ``before_resume(record)`` runs once the processes
        are restored, still stopped and with the network locked (a migration's target
        waits there for the source's commit; changes it makes to the record are kept);
        if it raises, CRIU kills them and the restore is undone. ``lazy``: memory comes
        from the ``criu lazy-pages`` already listening in the checkpoint directory,
        which is then left for the caller to remove."""
        host = self.host
        with host._lock(name):
            if import_file is not None:
                self._import(name, import_file)
            record = host._record(name)
            if record.state != "checkpointed":
                raise Conflict(f"container {name!r} has no checkpoint to restore (it is "
                               f"{record.state}): make one with 'kamra checkpoint {name}'")
            meta = self.meta(name)
            if meta is None:
                raise NotFound(f"the checkpoint of {name!r} is missing or incomplete "
                               f"({self.directory(name)}): boot it afresh with "
                               f"'kamra start {name} --discard-checkpoint'")
            started = time.perf_counter()
            self._restore_locked(record, meta, before_resume, lazy)
            if not lazy:  # (lazy-pages still reads it)
                _remove_later(self.directory(name))  # spent: the next start boots afresh
            result = host._status(record)
            result["restore_ms"] = round((time.perf_counter() - started) * 1000, 1)
            return result

    def _restore_locked(self, record: ContainerRecord, meta: dict,
                        before_resume: Callable[[ContainerRecord], None] | None = None,
                        lazy: bool = False) -> None:
        host = self.host
        name = record.name
        info = host.templates.get(record.template)
        if info.digest != record.template_digest:
            raise Conflict(f"template {record.template!r} changed since {name!r} was "
                           "checkpointed: its files would not match the checkpoint")
        directory = self.directory(name)
        container_dir = host.layout.container_dir(name)
        storage = host.storage(record)
        step = "mount storage"
        try:
            with Revert() as revert:
                rootfs = storage.mount(container_dir, info.rootfs)
                revert.add("unmount storage", storage.unmount, container_dir)
                step = "create cgroup"
                # A spare cgroup with a process in it (cgroup v1): it becomes the restore
                # helper, so nothing pays a cgroup migration here (host._take_standby).
                standby = host._take_standby(name)
                if standby is None:
                    host.cgroups.create(name)
                revert.add("remove cgroup", host._remove_cgroup, name)
                step = "apply limits"
                host.resources.apply(record)
                step = "restore processes"
                lxcfs = host.lxcfs.ensure() if meta.get("lxcfs") else None
                if meta.get("lxcfs") and not lxcfs:
                    raise KamraError("LXCFS is not running, and the checkpoint's /proc "
                                     "files come from it")
                networked = host.network.mode(record) != "none"
                revert.add("remove the network", host.network.teardown, record)
                reply = self._run_restore(record, directory, rootfs, meta, lxcfs, networked,
                                          before_resume, lazy, standby)
                record.state = "running"
                record.init_pid = reply["pid"]
                record.init_start = reply["start"]
                record.started_at = time.time()
                host.store.update(record)
                revert.success()
        except KeeperError as exc:
            raise KamraError(f"restoring {name!r} failed: {exc.message}; the checkpoint "
                             "is kept, every other step was undone") from None
        except KamraError as exc:
            exc.message = (f"restoring {name!r} failed at step '{step}': {exc.message}; "
                           "the checkpoint is kept, every other step was undone")
            exc.args = (exc.message,)
            raise
        except OSError as exc:
            raise KamraError(f"restoring {name!r} failed at step '{step}': "
                             f"{exc.strerror or exc}; the checkpoint is kept") from None
        finally:
            host._refill_standby()

    def _run_restore(self, record: ContainerRecord, directory: str, rootfs: str,
                     meta: dict, lxcfs: str | None, networked: bool,
                     before_resume: Callable[[ContainerRecord], None] | None,
                     lazy: bool = False, standby: str | None = None) -> dict:
        host = self.host
        name = record.name
        opts: dict[str, Any] = {
            "log_file": "restore.log", "log_level": 4, "root": rootfs,
            "rst_sibling": True, "tcp_established": True, "file_locks": True,
            "orphan_pts_master": True, "network_lock": NFTABLES,
            # A console no session holds as its terminal (an init's plain stdio) is
            # restored by CRIU only as an "inherited" one; orphan_pts_master then makes
            # it a new pty pair instead of taking CRIU's own stdin.
            "shell_job": True,
            "manage_cgroups_mode": CG_IGNORE,
            "external": [f"mnt[lx{os.path.basename(p)}]:{lxcfs}{p}"
                         for p in meta.get("lxcfs", [])],
        }
        if networked:
            opts["empty_ns"] = libc.CLONE_NEWNET
            opts["network_lock"] = SKIP  # kamra's own, lifted faster (kamra.checkpoint.netlock)
        if lazy:
            opts["lazy_pages"] = True
        staging = os.path.join(host.layout.run, f"tmpfs-{name}-{os.urandom(3).hex()}")
        try:
            opts["external"] += tmpfs.stage(meta.get("tmpfs", []), directory, staging)
            forward = ((["post-setup-namespaces", "network-unlock"] if networked else [])
                       + (["post-restore"] if before_resume else []))
            return self._restore_with(record, directory, opts, meta, before_resume,
                                      standby, forward)
        finally:
            tmpfs.unstage(staging)

    def _restore_with(self, record: ContainerRecord, directory: str, opts: dict[str, Any],
                      meta: dict, before_resume: Callable[[ContainerRecord], None] | None,
                      standby: str | None, forward: list[str]) -> dict:
        host = self.host
        name = record.name
        images = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            sock = host.keeper.session({
                "op": "restore", "name": name, "opts": opts, "criu": criu_binary(),
                "standby": standby,  # in the cgroup already: no need to join it
                "cgroup_procs": [] if standby else host.cgroups.procs_files(name),
                "console_log": os.path.join(host.layout.container_dir(name), "console.log"),
                "log_path": os.path.join(directory, "restore.log"),
                "forward": forward,
                "output_key": meta.get("output"),
            }, [images])
        finally:
            os.close(images)
        locks: list[RestoreLock] = []
        with sock:
            try:
                message = self._converse(sock, record, directory, before_resume, locks)
            finally:
                for lock in locks:
                    lock.close()
        if "error" in message:
            raise KamraError(f"{message['error']} (CRIU's log: "
                             f"{message.get('log') or directory + '/restore.log'})")
        return message

    def _converse(self, sock: socket.socket, record: ContainerRecord, directory: str,
                  before_resume: Callable[[ContainerRecord], None] | None,
                  locks: list[RestoreLock]) -> dict:
        """Answer CRIU's notifications until the restore helper's result comes."""
        while True:
            message, fds = fdpass.recv(sock)
            for fd in fds:
                os.close(fd)
            if message is None:
                raise KamraError("the restore helper ended without an answer; see "
                                 f"{directory}/restore.log")
            if "notify" not in message:
                return message
            fdpass.send(sock, self._on_notify(record, message, before_resume, locks))

    def _on_notify(self, record: ContainerRecord, message: dict,
                   before_resume: Callable[[ContainerRecord], None] | None,
                   locks: list[RestoreLock]) -> dict:
        """post-setup-namespaces: CRIU made the container's (empty) network namespace:
        lock it (``locks``) and wire it. post-restore: everything is restored but not yet
        running. network-unlock: the sockets are restored, let traffic through."""
        if message["notify"] == "network-unlock":
            while locks:
                try:
                    locks.pop().release()
                except KamraError as exc:
                    return {"error": exc.message}
            return {"ok": True}
        if message["notify"] == "post-restore" and before_resume is not None:
            try:
                before_resume(record)
            except KamraError as exc:
                return {"error": exc.message}
            except (OSError, ValueError) as exc:
                return {"error": f"before resuming: {exc}"}
            self.host.network.announce(record)
            return {"ok": True}
        if message["notify"] != "post-setup-namespaces":
            return {"ok": True}
        try:
            ns_fd = os.open(f"/proc/{int(message['pid'])}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            return {"error": f"open the restored network namespace: {exc.strerror}"}
        try:
            locks.append(RestoreLock(ns_fd))
            self.host.network.prepare(record, ns_fd)
        except KamraError as exc:
            return {"error": f"set up the network: {exc.message}"}
        finally:
            os.close(ns_fd)
        # Before the tasks resume: a peer's first answer to them must already come here
        # (routed with an uplink; a bridged container announces itself once running).
        # A migration announces only after the source committed (post-restore).
        if before_resume is None:
            self.host.network.announce(record)
        return {"ok": True}

    def _import(self, name: str, path: str, base_upper: str | None = None,
                arriving_from: str | None = None, images: str | None = None) -> None:
        """Make container ``name`` from an exported checkpoint, in state checkpointed.
        ``base_upper``: the files copied in earlier rounds of a migration, which the
        archive's upper/ (a delta, with ``upper_paths`` in the manifest) completes.
        ``arriving_from``: the source host of a migration not yet committed (the record
        says so from its first write, so a crash of kamrad cannot leave a copy).
        ``images``: a directory of CRIU's images that came beside the archive (a
        migration's, maybe in memory: kamra.scratch); it becomes the checkpoint
        directory."""
        from kamra.checkpoint import archive
        from kamra.engine.host import raise_exists
        from kamra.names import check_name
        from kamra.state import ContainerRecord

        check_name(name)
        host = self.host
        manifest = archive.read(path)
        if host.store.get(name) is not None:
            raise_exists(name)
        saved = manifest.get("container")
        if not isinstance(saved, dict) or not all(
                isinstance(saved.get(key), str) for key in ("template", "template_digest")):
            raise InvalidInput(f"archive {path} is not a kamra checkpoint archive: its "
                               "manifest names no container and template")
        info = host.templates.get(saved["template"])
        if info.digest != saved["template_digest"]:
            raise Conflict(f"template {info.name!r} here is {info.digest}, the checkpoint "
                           f"needs {saved['template_digest']}: import that template first")
        state = "checkpointed" if manifest.get("checkpoint") else "stopped"
        record = ContainerRecord.from_json({**saved, "name": name, "state": state,
                                            "migrating_from": arriving_from,
                                            "arriving": arriving_from is not None})
        container_dir = host.layout.container_dir(name)
        if os.path.exists(container_dir):
            raise Conflict(f"{container_dir} exists but no container {name!r} is recorded: "
                           "move it away first")
        storage = host.storage(record)
        with Revert() as revert:
            revert.add("remove container dir", storage.destroy, container_dir)
            storage.create(container_dir, info.rootfs)
            host.store.insert(record)
            revert.add("forget the container", host.store.delete, name)
            revert.add("release addresses", host.network.release, name)
            # The same addresses: the restored TCP connections are bound to them.
            wanted = dict(record.config)
            for address in manifest.get("addresses", []):
                wanted["net.ipv6" if ":" in address else "net.ipv4"] = address
            host.network.assign(ContainerRecord.from_json({**record.to_json(),
                                                           "config": wanted}))
            for forward in manifest.get("forwards", []):
                host.store.add_forward(Forward(**{**forward, "container": name}))
            archive.extract(path, container_dir)
            if base_upper is not None:
                # The archive's upper/ is the last delta: lay it over the earlier rounds.
                upper = os.path.join(container_dir, "upper")
                archive.merge(upper, base_upper)
                shutil.rmtree(upper)
                os.rename(base_upper, upper)
            if "upper_paths" in manifest:
                archive.prune(os.path.join(container_dir, "upper"), manifest["upper_paths"])
            if images is not None:
                checkpoint = os.path.join(container_dir, CHECKPOINT)
                if os.path.lexists(checkpoint):
                    raise InvalidInput(f"archive {path} holds a checkpoint beside the one "
                                       "sent with it")
                scratch.adopt(images, checkpoint)
                revert.add("remove the images", scratch.remove_tree, checkpoint)
            quota = host.resources.limits(record).get("limits.disk")
            if quota:
                storage.set_quota(container_dir, quota)  # type: ignore[arg-type]
            revert.success()

    def discard(self, name: str) -> None:
        """Remove the checkpoint and whatever an interrupted one left."""
        base = self.directory(name)
        parent = os.path.dirname(base)
        try:
            leftovers = [e for e in os.listdir(parent) if e.startswith(CHECKPOINT + ".")]
        except FileNotFoundError:
            return
        for entry in [CHECKPOINT, *leftovers]:
            scratch.remove_tree(os.path.join(parent, entry))
