"""kamrad's HTTP API over the engine.

JSON in, JSON out; errors as ``{"error": {"type", "message"}}`` with the status the
exception class carries. Sessions (exec, console, run) upgrade the connection
(101 Switching Protocols) and continue with ``kamra.linux.fdpass`` messages: the
client passes its stdio descriptors, kamrad hands back the keeper's session socket,
so no byte of a session flows through kamrad.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import socketserver
import threading
import traceback
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import TypeVar
from urllib.parse import parse_qs, urlsplit

from kamra import __version__
from kamra.engine import Host
from kamra.errors import InvalidInput, KamraError, NotFound
from kamra.linux import fdpass
from kamra.paths import bind_unix

log = logging.getLogger("kamra.daemon")

Route = tuple[str, re.Pattern, Callable]
T = TypeVar("T")


class UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, path: str, host: Host):
        self.host = host
        self.shutdown_requested = threading.Event()
        super().__init__(path, Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = bind_unix(path)  # short-path safe bind

    def server_bind(self) -> None:  # already bound in __init__
        pass


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: UnixHTTPServer
    server_version = f"kamrad/{__version__}"

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s " + format, "api", *args)

    def address_string(self) -> str:
        return "unix"

    # -- plumbing -------------------------------------------------------------------------
    @property
    def host(self) -> Host:
        return self.server.host

    def _body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        if not length:
            return {}
        try:
            data = json.loads(self.rfile.read(length))
        except ValueError:
            raise InvalidInput("request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise InvalidInput("request body must be a JSON object")
        return data

    def _send(self, status: int, payload: object) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def _send_error(self, exc: KamraError) -> None:
        self._send(exc.http_status, {"error": exc.to_json()})

    def _upgrade(self) -> socket.socket:
        self.send_response(101)
        self.send_header("Upgrade", "kamra-session")
        self.send_header("Connection", "Upgrade")
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        return self.connection

    def _with_client_stdio(self, work: Callable[[list[int]], T]) -> tuple[socket.socket, T | None]:
        """Upgrade, take the client's stdio descriptors and run ``work`` with them.

        A KamraError goes back to the client as a session message (None is returned);
        our copies of the descriptors are closed either way: a pipe kept open here would
        never see its end of file."""
        conn = self._upgrade()
        _hello, fds = fdpass.recv(conn)
        try:
            return conn, work(fds)
        except KamraError as exc:
            fdpass.send(conn, {"error": exc.to_json()})
            return conn, None
        finally:
            for fd in fds:
                os.close(fd)

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        for route_method, pattern, func in ROUTES:
            if route_method != method:
                continue
            match = pattern.fullmatch(url.path)
            if match:
                try:
                    func(self, query, **match.groupdict())
                except KamraError as exc:
                    self._send_error(exc)
                except Exception as exc:  # noqa: BLE001
                    log.error("internal error on %s %s: %s", method, url.path,
                              traceback.format_exc())
                    self._send_error(KamraError(f"internal error: {exc}"))
                return
        self._send_error(NotFound(f"no API endpoint {method} {url.path}"))

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # -- endpoints ------------------------------------------------------------------------
    def ping(self, query: dict) -> None:
        self._send(200, {"ok": True, "version": __version__, "pid": os.getpid(),
                         "root": self.host.layout.root})

    def shutdown_daemon(self, query: dict) -> None:
        self._send(200, {"ok": True})
        self.server.shutdown_requested.set()

    def list_containers(self, query: dict) -> None:
        self._send(200, self.host.list())

    def create_container(self, query: dict) -> None:
        body = self._body()
        record = self.host.create(_str(body, "name"), _str(body, "template"),
                                  body.get("hostname"), plan=body.get("plan") or None,
                                  config=_dict(body, "config"))
        status = self.host.status(record.name)
        status["notes"] = self.host.resources.notes(record)
        self._send(201, status)

    def get_container(self, query: dict, name: str) -> None:
        self._send(200, self.host.status(name))

    def delete_container(self, query: dict, name: str) -> None:
        self.host.destroy(name, force=query.get("force") in ("1", "true"))
        self._send(200, {"ok": True})

    def start_container(self, query: dict, name: str) -> None:
        body = self._body()
        self._send(200, self.host.start(
            name, discard_checkpoint=bool(body.get("discard_checkpoint"))))

    def checkpoint_container(self, query: dict, name: str) -> None:
        body = self._body()
        self._send(200, self.host.checkpoints.checkpoint(
            name, leave_running=bool(body.get("leave_running")),
            export=body.get("export") or None))

    def restore_container(self, query: dict, name: str) -> None:
        body = self._body()
        self._send(200, self.host.checkpoints.restore(
            name, import_file=body.get("import") or None))

    def migrate_container(self, query: dict, name: str) -> None:
        body = self._body()
        remote, mode = _str(body, "remote"), str(body.get("mode") or "auto")
        lazy = bool(body.get("lazy"))
        self._stream(lambda emit: self.host.migrations.migrate(name, remote, mode, emit,
                                                               lazy=lazy))

    def remote_listen(self, query: dict) -> None:
        self._send(200, self.host.listen(_str(self._body(), "address")))

    def remote_token(self, query: dict) -> None:
        self._send(200, {"token": self.host.migrations.remotes.new_token()})

    def list_remotes(self, query: dict) -> None:
        store = self.host.migrations.remotes
        self._send(200, {"listen": store.listen_address(),
                         "remotes": [{"name": n, "address": r["address"],
                                      "fingerprint": r["fingerprint"]}
                                     for n, r in sorted(store.remotes().items())]})

    def add_remote(self, query: dict) -> None:
        body = self._body()
        self._send(201, self.host.migrations.add_remote(
            _str(body, "name"), _str(body, "address"), str(body.get("token") or "")))

    def remove_remote(self, query: dict, name: str) -> None:
        self.host.migrations.remotes.remove(name)
        self._send(200, {"ok": True})

    def stop_container(self, query: dict, name: str) -> None:
        body = self._body()
        self._send(200, self.host.stop(name, _timeout(body), force=bool(body.get("force"))))

    def restart_container(self, query: dict, name: str) -> None:
        self._send(200, self.host.restart(name, _timeout(self._body())))

    def ps_container(self, query: dict, name: str) -> None:
        self._send(200, self.host.ps(name))

    def exec_container(self, query: dict, name: str) -> None:
        body = self._body()
        argv = _argv(body, "kamra exec c1 -- ls")
        self.host._running(name)  # fail before upgrading when it cannot work
        conn, session = self._with_client_stdio(lambda fds: self.host.exec_session(
            name, argv, env=body.get("env") or {}, user=body.get("user"),
            cwd=body.get("cwd"), tty=bool(body.get("tty")),
            winsize=tuple(body["winsize"]) if body.get("winsize") else None,
            login=bool(body.get("login")), term=body.get("term"), fds=fds))
        if session is not None:
            with session:
                fdpass.send(conn, {"session": True}, [session.fileno()])

    def console_container(self, query: dict, name: str) -> None:
        self.host._running(name)
        conn = self._upgrade()
        try:
            session = self.host.console_session(name)
        except KamraError as exc:
            fdpass.send(conn, {"error": exc.to_json()})
            return
        with session:
            fdpass.send(conn, {"session": True}, [session.fileno()])

    def run_container(self, query: dict) -> None:
        body = self._body()
        template = _str(body, "template")
        argv = _argv(body, "kamra run busybox -- true")
        self.host.templates.get(template)  # fail before upgrading when it cannot work
        conn, result = self._with_client_stdio(lambda fds: self.host.run(
            template, argv, name=body.get("name"), remove=bool(body.get("rm")),
            stdio=fds or None))
        if result is not None:
            fdpass.send(conn, result)

    # -- configuration and plans ----------------------------------------------------------
    def get_config(self, query: dict, name: str) -> None:
        self._send(200, self.host.resources.show(name))

    def set_config(self, query: dict, name: str) -> None:
        body = self._body()
        self._send(200, self.host.resources.set(
            name, _dict(body, "set"), _list(body, "unset"), plan=body.get("plan") or None,
            clear_plan=bool(body.get("clear_plan")), save=body.get("save", True) is not False))

    def config_keys(self, query: dict) -> None:
        from kamra.config.keys import KEYS

        self._send(200, [KEYS[name].to_json() for name in sorted(KEYS)])

    def container_stats(self, query: dict, name: str) -> None:
        self._send(200, self.host.resources.stats(name))

    def beancounters(self, query: dict) -> None:
        names = [query["name"]] if query.get("name") else \
            [r.name for r in self.host.store.list() if r.state == "running"]
        rows: list[dict] = []
        for name in names:
            rows += self.host.resources.beancounters(name)
        self._send(200, rows)

    def network_show(self, query: dict) -> None:
        self._send(200, self.host.network.show())

    def network_check(self, query: dict) -> None:
        self._send(200, self.host.network.check())

    def list_ports(self, query: dict) -> None:
        self._send(200, self.host.network.port_list(query.get("name") or None))

    def add_port(self, query: dict, name: str) -> None:
        body = self._body()
        forward = self.host.network.port_add(name, _str(body, "spec"),
                                             body.get("host_ip") or None)
        self._send(201, forward.to_json())

    def remove_port(self, query: dict, name: str) -> None:
        body = self._body()
        self.host.network.port_remove(name, _str(body, "spec"), body.get("host_ip") or None)
        self._send(200, {"ok": True})

    def list_plans(self, query: dict) -> None:
        self._send(200, [p.to_json() for p in self.host.resources.plans.list()])

    def get_plan(self, query: dict, name: str) -> None:
        data = self.host.resources.plans.get(name).to_json()
        data["used_by"] = self.host.resources.plan_users(name)
        self._send(200, data)

    def create_plan(self, query: dict) -> None:
        body = self._body()
        plan = self.host.resources.plan_create(_str(body, "name"), _dict(body, "values"),
                                               body.get("description") or "")
        self._send(201, plan.to_json())

    def update_plan(self, query: dict, name: str) -> None:
        body = self._body()
        plan = self.host.resources.plan_update(name, _dict(body, "set"), _list(body, "unset"),
                                               body.get("description"))
        self._send(200, plan.to_json())

    def delete_plan(self, query: dict, name: str) -> None:
        self.host.resources.plan_remove(name)
        self._send(200, {"ok": True})

    # -- templates ------------------------------------------------------------------------
    def list_templates(self, query: dict) -> None:
        self._send(200, [t.to_json() for t in self.host.templates.list()])

    def get_template(self, query: dict, name: str) -> None:
        info = self.host.templates.get(name).to_json()
        info["used_by"] = self.host.template_users(name)
        self._send(200, info)

    def delete_template(self, query: dict, name: str) -> None:
        self.host.remove_template(name)
        self._send(200, {"ok": True})

    def _stream(self, work: Callable[[Callable[[dict], None]], object]) -> None:
        """Run a long action, streaming progress events as JSON lines, then the result."""
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        writing = threading.Lock()  # a migration reports from its page relay thread too

        def emit(event: dict) -> None:
            with writing:
                try:
                    self.wfile.write((json.dumps({"progress": event}) + "\n").encode())
                    self.wfile.flush()
                except OSError:
                    pass

        try:
            result = work(emit)
            line = {"result": result}
        except KamraError as exc:
            line = {"error": exc.to_json()}
        except Exception as exc:  # noqa: BLE001
            log.error("internal error: %s", traceback.format_exc())
            line = {"error": KamraError(f"internal error: {exc}").to_json()}
        try:
            with writing:
                self.wfile.write((json.dumps(line) + "\n").encode())
        except OSError:
            pass

    def build_template(self, query: dict) -> None:
        body = self._body()
        kind = _str(body, "kind")
        self._stream(lambda emit: self.host.templates.build(
            kind, body.get("name"), suite=body.get("suite") or "bookworm",
            mirror=body.get("mirror") or None, progress=emit).to_json())

    def export_template(self, query: dict, name: str) -> None:
        body = self._body()
        path = _str(body, "path")
        self._stream(lambda emit: (self.host.templates.export(name, path, progress=emit),
                                   {"path": path})[1])

    def import_template(self, query: dict) -> None:
        body = self._body()
        path, name = _str(body, "path"), _str(body, "name")
        self._stream(lambda emit: self.host.templates.import_(path, name, progress=emit).to_json())


def _str(body: dict, key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str):
        raise InvalidInput(f"missing {key!r}")
    return value


def _dict(body: dict, key: str) -> dict:
    value = body.get(key) or {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{key!r} must be an object of key: value")
    return value


def _list(body: dict, key: str) -> list:
    value = body.get(key) or []
    if not isinstance(value, list):
        raise InvalidInput(f"{key!r} must be a list")
    return value


def _argv(body: dict, example: str) -> list[str]:
    argv = body.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise InvalidInput(f"no command given: put it after '--', e.g. {example}")
    return argv


def _timeout(body: dict) -> float:
    value = body.get("timeout", 10)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"invalid timeout {value!r}: give seconds, e.g. 10") from None


_NAME = r"(?P<name>[^/]+)"
ROUTES: list[Route] = [
    (method, re.compile(path.replace("{name}", _NAME)), func)
    for method, path, func in [
        ("GET", "/v1/ping", Handler.ping),
        ("POST", "/v1/daemon/shutdown", Handler.shutdown_daemon),
        ("GET", "/v1/containers", Handler.list_containers),
        ("POST", "/v1/containers", Handler.create_container),
        ("GET", "/v1/containers/{name}", Handler.get_container),
        ("DELETE", "/v1/containers/{name}", Handler.delete_container),
        ("POST", "/v1/containers/{name}/start", Handler.start_container),
        ("POST", "/v1/containers/{name}/stop", Handler.stop_container),
        ("POST", "/v1/containers/{name}/restart", Handler.restart_container),
        ("POST", "/v1/containers/{name}/checkpoint", Handler.checkpoint_container),
        ("POST", "/v1/containers/{name}/restore", Handler.restore_container),
        ("POST", "/v1/containers/{name}/migrate", Handler.migrate_container),
        ("GET", "/v1/remotes", Handler.list_remotes),
        ("POST", "/v1/remotes", Handler.add_remote),
        ("DELETE", "/v1/remotes/{name}", Handler.remove_remote),
        ("POST", "/v1/remote/listen", Handler.remote_listen),
        ("POST", "/v1/remote/token", Handler.remote_token),
        ("GET", "/v1/containers/{name}/ps", Handler.ps_container),
        ("POST", "/v1/containers/{name}/exec", Handler.exec_container),
        ("POST", "/v1/containers/{name}/console", Handler.console_container),
        ("POST", "/v1/run", Handler.run_container),
        ("GET", "/v1/containers/{name}/config", Handler.get_config),
        ("POST", "/v1/containers/{name}/config", Handler.set_config),
        ("GET", "/v1/config/keys", Handler.config_keys),
        ("GET", "/v1/containers/{name}/stats", Handler.container_stats),
        ("GET", "/v1/beancounters", Handler.beancounters),
        ("GET", "/v1/network", Handler.network_show),
        ("GET", "/v1/network/check", Handler.network_check),
        ("GET", "/v1/ports", Handler.list_ports),
        ("POST", "/v1/containers/{name}/ports", Handler.add_port),
        ("POST", "/v1/containers/{name}/ports/remove", Handler.remove_port),
        ("GET", "/v1/plans", Handler.list_plans),
        ("POST", "/v1/plans", Handler.create_plan),
        ("GET", "/v1/plans/{name}", Handler.get_plan),
        ("POST", "/v1/plans/{name}", Handler.update_plan),
        ("DELETE", "/v1/plans/{name}", Handler.delete_plan),
        ("GET", "/v1/templates", Handler.list_templates),
        ("POST", "/v1/templates", Handler.build_template),
        ("POST", "/v1/templates/import", Handler.import_template),
        ("GET", "/v1/templates/{name}", Handler.get_template),
        ("DELETE", "/v1/templates/{name}", Handler.delete_template),
        ("POST", "/v1/templates/{name}/export", Handler.export_template),
    ]
]
