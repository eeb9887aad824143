"""kamra: the command line. Parses arguments, speaks HTTP to kamrad, prints results.

It runs on every command, so it imports only the standard library pieces it needs
and kamra's client; anything heavier (the progress bar) is imported where used.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from kamra.client import Client
from kamra.errors import KamraError

# Exit codes of kamra's own failures inside exec/run/enter (the command's own code
# is passed through otherwise), as docker does.
SESSION_ERROR = 125


def _split_command(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """Split at the first '--': what follows is the command, kept verbatim."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, None


COMMAND_NAMES = ("template", "create", "start", "stop", "restart", "checkpoint", "restore",
                 "migrate", "remote", "destroy", "list", "status",
                 "ps", "exec", "enter", "console", "run", "daemon", "set", "config", "plan",
                 "beancounters", "stats", "network", "port")


def _command_word(argv: list[str]) -> str | None:
    """The subcommand in argv (after the global options), if it is one we know."""
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--root":
            i += 2
            continue
        if word.startswith("-"):
            i += 1
            continue
        return word if word in COMMAND_NAMES else None
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or (``only``) just one command's: building every subcommand's
    parser costs about 9 ms, paid on every command otherwise."""
    p = argparse.ArgumentParser(
        prog="kamra", description="System containers for Linux (OS-level virtualization).",
        epilog="Data lives under --root (default $KAMRA_ROOT or /var/lib/kamra). "
               "kamrad is started on demand.")
    p.add_argument("--root", default=os.environ.get("KAMRA_ROOT") or "/var/lib/kamra",
                   help="data root (default: $KAMRA_ROOT or /var/lib/kamra)")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def cmd(name: str, help: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, **kw)

    def fmt(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--format", choices=("table", "json"), default="table",
                            help="output format (default: table)")

    if only in (None, "template"):
        t = cmd("template", "build, list, show, remove, export and import templates")
        tsub = t.add_subparsers(dest="template_command", metavar="ACTION")
        tsub.required = True
        tb = tsub.add_parser("build", help="build a template: busybox (local, no network) or "
                                           "debian (debootstrap)")
        tb.add_argument("kind", help="busybox or debian")
        tb.add_argument("--name", help="template name (default: the kind)")
        tb.add_argument("--suite", default="bookworm", help="Debian suite (default: bookworm)")
        tb.add_argument("--mirror", help="Debian mirror URL (default: from the host's apt sources)")
        tl = tsub.add_parser("list", help="list templates")
        fmt(tl)
        ts = tsub.add_parser("show", help="show a template and its digest")
        ts.add_argument("name")
        fmt(ts)
        tr = tsub.add_parser("remove", help="remove a template no container uses")
        tr.add_argument("name")
        te = tsub.add_parser("export", help="export a template to FILE.tar.zst")
        te.add_argument("name")
        te.add_argument("file")
        ti = tsub.add_parser("import", help="import a template from FILE.tar.zst (verified)")
        ti.add_argument("file")
        ti.add_argument("--name", required=True, help="name of the imported template")

    if only in (None, "create"):
        c = cmd("create", "create a container from a template (copy-on-write, O(1))")
        c.add_argument("name")
        c.add_argument("--template", "-t", required=True, help="template name")
        c.add_argument("--hostname", help="hostname (default: the container's name)")
        c.add_argument("--plan", help="resource plan (see 'kamra plan list')")
        c.add_argument("-c", "--config", action="append", default=[], metavar="KEY=VALUE",
                       help="set a config key, e.g. -c limits.memory=512M (repeatable)")
        c.add_argument("--ip", metavar="ADDR",
                       help="a fixed IPv4 address from the pool (same as -c net.ipv4=ADDR; "
                            "default: the pool's next free address)")

    if only in (None, "set"):
        se = cmd("set", "change a container's config and limits; live on a running one")
        se.add_argument("name")
        se.add_argument("assignments", nargs="*", metavar="KEY=VALUE",
                        help="e.g. limits.memory=512M; KEY= (empty) removes the override")
        plan_group = se.add_mutually_exclusive_group()
        plan_group.add_argument("--plan", help="switch to this plan")
        plan_group.add_argument("--no-plan", action="store_true", help="use no plan")
        se.add_argument("--no-save", action="store_true",
                        help="apply to the running container only; keep the saved config")

    if only in (None, "config"):
        cf = cmd("config", "show config keys and a container's effective config")
        cfsub = cf.add_subparsers(dest="config_command", metavar="ACTION")
        cfsub.required = True
        ck = cfsub.add_parser("keys", help="every config key, its accepted form and default")
        fmt(ck)
        cs = cfsub.add_parser("show", help="a container's effective config and where each "
                                           "value comes from (default, plan, container)")
        cs.add_argument("name")
        fmt(cs)

    if only in (None, "beancounters"):
        bc = cmd("beancounters", "per-container held, maxheld, barrier, limit and failcnt "
                                 "of every resource (like /proc/user_beancounters)")
        bc.add_argument("name", nargs="?", help="one container (default: all running)")
        fmt(bc)
    if only in (None, "stats"):
        sa = cmd("stats", "a container's CPU, memory (with breakdown), processes, I/O, disk")
        sa.add_argument("name")
        sa.add_argument("--watch", action="store_true", help="refresh every second")
        fmt(sa)

    if only in (None, "plan"):
        pl = cmd("plan", "resource plans: named sets of limits (built-in and your own)")
        plsub = pl.add_subparsers(dest="plan_command", metavar="ACTION")
        plsub.required = True
        pll = plsub.add_parser("list", help="list plans")
        fmt(pll)
        pls = plsub.add_parser("show", help="show a plan and the containers using it")
        pls.add_argument("name")
        fmt(pls)
        plc = plsub.add_parser("create", help="create a plan: kamra plan create NAME KEY=VALUE...")
        plc.add_argument("name")
        plc.add_argument("assignments", nargs="*", metavar="KEY=VALUE")
        plc.add_argument("--description", default="", help="one line about the plan")
        ple = plsub.add_parser("edit", help="change a plan; running containers using it follow")
        ple.add_argument("name")
        ple.add_argument("assignments", nargs="*", metavar="KEY=VALUE",
                         help="KEY= (empty) removes the key from the plan")
        ple.add_argument("--description", help="new description")
        plr = plsub.add_parser("remove", help="remove a plan no container uses")
        plr.add_argument("name")

    if only in (None, "network"):
        nw = cmd("network", "the host's container network: pools, addresses, checks")
        nwsub = nw.add_subparsers(dest="network_command", metavar="ACTION")
        nwsub.required = True
        fmt(nwsub.add_parser("show", help="the address pools, the bridge and every "
                                          "container's addresses and port forwards"))
        fmt(nwsub.add_parser("check", help="look for another firewall on the host that "
                                           "drops containers' forwarded traffic"))
    if only in (None, "port"):
        po = cmd("port", "port forwards from the host to a container")
        posub = po.add_subparsers(dest="port_command", metavar="ACTION")
        posub.required = True
        pa = posub.add_parser("add", help="forward HOSTPORT on the host to CTPORT in the "
                                          "container: kamra port add web 8080:80/tcp")
        pa.add_argument("name")
        pa.add_argument("spec", metavar="HOSTPORT:CTPORT[/tcp|/udp]")
        pa.add_argument("--host-ip", help="only traffic to this host address (default: all)")
        pls_ = posub.add_parser("list", help="list port forwards (of one container or all)")
        pls_.add_argument("name", nargs="?")
        fmt(pls_)
        pr = posub.add_parser("remove", help="remove a port forward: kamra port remove web "
                                             "8080/tcp")
        pr.add_argument("name")
        pr.add_argument("spec", metavar="HOSTPORT[/tcp|/udp]")
        pr.add_argument("--host-ip", help="the host address the forward was added with")

    if only in (None, "start"):
        s = cmd("start", "start containers")
        s.add_argument("names", nargs="+", metavar="NAME")
        s.add_argument("--discard-checkpoint", action="store_true",
                       help="boot a checkpointed container afresh, dropping its checkpoint")
    if only in (None, "stop"):
        st = cmd("stop", "stop containers: their stop signal, then kill after --timeout")
        st.add_argument("names", nargs="+", metavar="NAME")
        st.add_argument("--timeout", type=float, default=10, help="seconds to wait (default 10)")
        st.add_argument("--force", action="store_true", help="kill at once")
    if only in (None, "restart"):
        r = cmd("restart", "stop and start containers")
        r.add_argument("names", nargs="+", metavar="NAME")
        r.add_argument("--timeout", type=float, default=10, help="seconds to wait (default 10)")
    if only in (None, "checkpoint"):
        ck = cmd("checkpoint", "save a running container's processes, memory, open files and "
                               "TCP connections with CRIU; it is stopped afterwards (like "
                               "vzctl suspend) unless --leave-running")
        ck.add_argument("name")
        ck.add_argument("--leave-running", action="store_true",
                        help="keep the container running after the checkpoint")
        ck.add_argument("--export", metavar="FILE",
                        help="also write the checkpoint and the container's files to FILE "
                             "(.tar.zst), to restore elsewhere with 'kamra restore --import'")
    if only in (None, "restore"):
        rs = cmd("restore", "bring a checkpointed container back: same processes, PIDs, "
                            "memory, files, address and TCP connections")
        rs.add_argument("name")
        rs.add_argument("--import", dest="import_file", metavar="FILE",
                        help="make the container NAME from a file written by 'kamra "
                             "checkpoint --export' (same template needed here)")
    if only in (None, "migrate"):
        mg = cmd("migrate", "move a container to another kamra host (see 'kamra remote'): "
                            "live with its processes and TCP connections when CRIU can, else "
                            "stopped here and started there; settles one left 'migrating'")
        mg.add_argument("name")
        mg.add_argument("remote")
        mg.add_argument("--mode", choices=("auto", "live", "restart"), default="auto",
                        help="auto (default): live when CRIU can dump it, else restart, "
                             "saying why; live: never falls back; restart: stop, copy, start")
        mg.add_argument("--lazy", action="store_true",
                        help="post-copy (CRIU lazy pages): the container resumes there "
                             "first and its memory follows; needs fs.pipe-max-size >= 4 MiB "
                             "or CAP_SYS_RESOURCE, see docs/migration.md")
        fmt(mg)
    if only in (None, "remote"):
        rm = cmd("remote", "other kamra hosts to migrate to, and listening for them")
        rmsub = rm.add_subparsers(dest="remote_command", metavar="ACTION")
        rmsub.required = True
        ra = rmsub.add_parser("add", help="add a remote: kamra remote add b 192.0.2.7:8443 "
                                          "--token T (its certificate is pinned now)")
        ra.add_argument("name")
        ra.add_argument("address", metavar="HOST[:PORT]")
        ra.add_argument("--token", required=True,
                        help="the token 'kamra remote token' printed on that host")
        rl = rmsub.add_parser("list", help="list remotes (and where this host listens)")
        fmt(rl)
        rr = rmsub.add_parser("remove", help="forget a remote")
        rr.add_argument("name")
        rli = rmsub.add_parser("listen", help="accept other hosts on HOST[:PORT] (TLS, "
                                              "default port 8443); kept across restarts")
        rli.add_argument("address", metavar="HOST[:PORT]")
        rmsub.add_parser("token", help="make a token another host needs to add this one")
    if only in (None, "destroy"):
        d = cmd("destroy", "destroy stopped containers and their files")
        d.add_argument("names", nargs="+", metavar="NAME")
        d.add_argument("--force", "-f", action="store_true", help="stop it first if running")

    if only in (None, "list"):
        ls = cmd("list", "list containers")
        fmt(ls)
    if only in (None, "status"):
        sts = cmd("status", "show a container's state")
        sts.add_argument("name")
        fmt(sts)
    if only in (None, "ps"):
        ps = cmd("ps", "a container's processes: host pid, container pid, user, command")
        ps.add_argument("name")
        fmt(ps)

    if only in (None, "exec"):
        e = cmd("exec", "run a command in a running container: kamra exec NAME -- CMD ...")
        e.add_argument("name")
        e.add_argument("-t", "--tty", action="store_true", help="allocate a pty")
        e.add_argument("-e", "--env", action="append", default=[], metavar="K=V",
                       help="set an environment variable (repeatable)")
        e.add_argument("-u", "--user", help="user (name, uid or user:group) inside the container")
        e.add_argument("-w", "--workdir", help="working directory inside the container")
        e.add_argument("cmd", nargs=argparse.REMAINDER, help="the command (after --)")
    if only in (None, "enter"):
        en = cmd("enter", "an interactive login shell in a running container")
        en.add_argument("name")
        en.add_argument("-u", "--user", help="user inside the container (default root)")
    if only in (None, "console"):
        co = cmd("console", "attach to a container's console (Ctrl-a q detaches)")
        co.add_argument("name")
    if only in (None, "run"):
        ru = cmd("run", "one-shot: create, start CMD as init, wait, return its exit code")
        ru.add_argument("--rm", action="store_true", help="destroy the container afterwards")
        ru.add_argument("--name", help="container name (default: generated)")
        ru.add_argument("template")
        ru.add_argument("cmd", nargs=argparse.REMAINDER, help="the command (after --)")

    if only in (None, "daemon"):
        dm = cmd("daemon", "start, stop or show kamrad (normally started on demand)")
        dm.add_argument("action", choices=("start", "stop", "status"))
        fmt(dm)
    return p


# -- output helpers ---------------------------------------------------------------------

def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _json(data: object) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


# Progress phases whose counts are bytes (the others count packages or steps).
BYTE_PHASES = ("export", "verify", "untar", "digest", "send", "template", "files", "pages")


def _progress_printer():
    """Render build/export/import progress with tqdm (imported only when needed)."""
    state: dict = {"bar": None, "phase": None}

    def on_progress(event: dict) -> None:
        from tqdm import tqdm

        phase = event.get("phase") or ""
        if phase != state["phase"]:
            if state["bar"] is not None:
                state["bar"].close()
            state["phase"] = phase
            in_bytes = phase in BYTE_PHASES
            state["bar"] = tqdm(total=event.get("total"), desc=f"{phase:>9}",
                                unit="B" if in_bytes else " items", unit_scale=in_bytes,
                                file=sys.stderr, leave=True, dynamic_ncols=True,
                                disable=None)
        bar = state["bar"]
        if event.get("total") and bar.total != event["total"]:
            bar.total = event["total"]
        current = event.get("current")
        if current is not None:
            bar.n = current
        if event.get("message"):
            bar.set_postfix_str(str(event["message"])[:40], refresh=False)
        bar.refresh()

    def close() -> None:
        if state["bar"] is not None:
            state["bar"].close()

    return on_progress, close


# -- commands ---------------------------------------------------------------------------

def cmd_template(client: Client, a: argparse.Namespace) -> int:
    action = a.template_command
    if action == "list":
        data = client.request("GET", "/v1/templates")
        if a.format == "json":
            _json(data)
        else:
            _table([[t["name"], t["os"], t["digest"][:19], _size(t.get("size")),
                     t["created"][:19]] for t in data],
                   ["NAME", "OS", "DIGEST", "SIZE", "CREATED"])
        return 0
    if action == "show":
        data = client.request("GET", f"/v1/templates/{a.name}")
        if a.format == "json":
            _json(data)
        else:
            for key in ("name", "digest", "os", "source", "created", "init", "stop_signal",
                        "size", "rootfs", "used_by"):
                value = data.get(key)
                if isinstance(value, list):
                    value = " ".join(value) if value else "-"
                print(f"{key + ':':14}{value}")
        return 0
    if action == "remove":
        client.request("DELETE", f"/v1/templates/{a.name}")
        return 0
    on_progress, close = _progress_printer()
    try:
        if action == "build":
            result = client.stream("/v1/templates", {"kind": a.kind, "name": a.name,
                                                     "suite": a.suite, "mirror": a.mirror},
                                   on_progress)
        elif action == "export":
            result = client.stream(f"/v1/templates/{a.name}/export",
                                   {"path": os.path.abspath(a.file)}, on_progress)
        else:
            result = client.stream("/v1/templates/import",
                                   {"path": os.path.abspath(a.file), "name": a.name},
                                   on_progress)
    finally:
        close()
    if action == "export":
        print(f"exported {a.name} to {result['path']}")
    else:
        print(f"template {result['name']} {result['digest']}")
    return 0


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "K", "M", "G"):
        if n < 1024:
            return f"{n:.0f}{unit}"
        n /= 1024
    return f"{n:.1f}T"


def _assignments(pairs: list[str]) -> tuple[dict[str, str], list[str]]:
    """KEY=VALUE items into (values to set, keys to unset for KEY=)."""
    values: dict[str, str] = {}
    unset: list[str] = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            from kamra.errors import InvalidInput

            raise InvalidInput(f"invalid assignment {pair!r}: write KEY=VALUE, "
                               "e.g. limits.memory=512M")
        if value:
            values[key] = value
        else:
            unset.append(key)
    return values, unset


def cmd_create(client: Client, a: argparse.Namespace) -> int:
    values, unset = _assignments(a.config + ([f"net.ipv4={a.ip}"] if a.ip else []))
    data = client.request("POST", "/v1/containers", {"name": a.name, "template": a.template,
                                                     "hostname": a.hostname, "plan": a.plan,
                                                     "config": values})
    _print_notes(data)
    return 0


def _print_notes(data: dict) -> None:
    """Settings saved but not honoured by this host: said, never silently ignored."""
    for note in data.get("notes") or ():
        print(f"kamra: note: {note}", file=sys.stderr)


def _print_config(data: dict) -> None:
    print(f"plan: {data.get('plan') or '-'}")
    _table([[row["key"], row["display"], row["source"]] for row in data["config"]],
           ["KEY", "VALUE", "SOURCE"])
    _print_notes(data)


def cmd_set(client: Client, a: argparse.Namespace) -> int:
    values, unset = _assignments(a.assignments)
    if not values and not unset and not a.plan and not a.no_plan:
        from kamra.errors import InvalidInput

        raise InvalidInput("nothing to set: give KEY=VALUE items or --plan P, "
                           "e.g. kamra set c1 limits.memory=512M")
    data = client.request("POST", f"/v1/containers/{a.name}/config",
                          {"set": values, "unset": unset, "plan": a.plan,
                           "clear_plan": a.no_plan, "save": not a.no_save})
    _print_notes(data)
    return 0


def cmd_config(client: Client, a: argparse.Namespace) -> int:
    if a.config_command == "keys":
        data = client.request("GET", "/v1/config/keys")
        if a.format == "json":
            _json(data)
        else:
            _table([[k["key"], k["default"] or k["unset"], k["form"], k["doc"]]
                    for k in data], ["KEY", "DEFAULT", "FORM", "MEANING"])
        return 0
    data = client.request("GET", f"/v1/containers/{a.name}/config")
    if a.format == "json":
        _json(data)
    else:
        _print_config(data)
    return 0


def _human(value: object, unit: str = "bytes") -> str:
    if value is None:
        return "n/a"
    if not isinstance(value, int):
        return str(value)
    if unit != "bytes":
        return str(value)
    return _size(value)


def cmd_beancounters(client: Client, a: argparse.Namespace) -> int:
    path = "/v1/beancounters" + (f"?name={a.name}" if a.name else "")
    rows = client.request("GET", path)
    if a.format == "json":
        _json(rows)
        return 0
    _table([[r["container"], r["resource"]] +
            [_human(r[k], r["unit"]) for k in ("held", "maxheld", "barrier", "limit")] +
            [_human(r["failcnt"], "count")] for r in rows],
           ["CONTAINER", "RESOURCE", "HELD", "MAXHELD", "BARRIER", "LIMIT", "FAILCNT"])
    return 0


def _print_stats(s: dict, cpu_percent: float | None) -> None:
    cpu, mem, pids, io = (s.get(k) or {} for k in ("cpu", "memory", "pids", "io"))
    print(f"container {s['name']} ({s['state']})")
    if cpu_percent is not None:
        print(f"  cpu      {cpu_percent:6.1f}% of one core")
    if cpu.get("usage_ns") is not None:
        print(f"  cpu time {cpu['usage_ns'] / 1e9:.2f} s")
    if mem:
        print(f"  memory   {_human(mem.get('current'))} of {_human(mem.get('limit'))}  "
              f"(anon {_human(mem.get('anon'))}, page cache {_human(mem.get('file'))}, "
              f"kernel {_human(mem.get('kernel'))}, sockets {_human(mem.get('sock'))}, "
              f"shm {_human(mem.get('shmem'))})")
    if pids:
        print(f"  pids     {pids.get('current')} of {pids.get('limit')}")
    if io:
        print(f"  io       read {_human(io.get('read_bytes'))} in {io.get('read_ops')} ops, "
              f"written {_human(io.get('write_bytes'))} in {io.get('write_ops')} ops")
    print(f"  disk     {_human(s['disk']['used'])} in {s['disk']['inodes']} inodes")


def cmd_stats(client: Client, a: argparse.Namespace) -> int:
    previous: tuple[float, int] | None = None
    while True:
        data = client.request("GET", f"/v1/containers/{a.name}/stats")
        if a.format == "json":
            _json(data)
            if not a.watch:
                return 0
        else:
            usage = (data.get("cpu") or {}).get("usage_ns")
            now = time.monotonic()
            percent = None
            if previous and usage is not None:
                percent = (usage - previous[1]) / 1e7 / max(now - previous[0], 1e-3)
            if usage is not None:
                previous = (now, usage)
            if a.watch:
                print("\033[H\033[J", end="")
            _print_stats(data, percent)
        if not a.watch:
            return 0
        time.sleep(1)


def cmd_plan(client: Client, a: argparse.Namespace) -> int:
    action = a.plan_command
    if action == "list":
        data = client.request("GET", "/v1/plans")
        if a.format == "json":
            _json(data)
        else:
            _table([[p["name"], "built-in" if p["builtin"] else "user",
                     " ".join(f"{k.removeprefix('limits.')}={v}"
                              for k, v in sorted(p["display"].items())) or "-",
                     p["description"]] for p in data],
                   ["NAME", "KIND", "LIMITS", "DESCRIPTION"])
        return 0
    if action == "show":
        data = client.request("GET", f"/v1/plans/{a.name}")
        if a.format == "json":
            _json(data)
        else:
            print(f"name:        {data['name']} ({'built-in' if data['builtin'] else 'user'})")
            print(f"description: {data['description'] or '-'}")
            print(f"used by:     {', '.join(data['used_by']) or '-'}")
            for key, value in sorted(data["display"].items()):
                print(f"  {key} = {value}")
        return 0
    if action == "remove":
        client.request("DELETE", f"/v1/plans/{a.name}")
        return 0
    values, unset = _assignments(a.assignments)
    if action == "create":
        if unset:
            from kamra.errors import InvalidInput

            raise InvalidInput(f"empty value for {unset[0]}: give KEY=VALUE")
        client.request("POST", "/v1/plans", {"name": a.name, "values": values,
                                             "description": a.description})
    else:
        client.request("POST", f"/v1/plans/{a.name}", {"set": values, "unset": unset,
                                                       "description": a.description})
    return 0


def _each(names: list[str], action) -> int:
    """Apply ``action`` to every name; report each failure on its own line and go on.

    Returns the exit code of the first failure (0 when all succeeded)."""
    code = 0
    for name in names:
        try:
            action(name)
        except KamraError as exc:
            if len(names) == 1:
                raise
            print(f"kamra: {exc.message}", file=sys.stderr)
            code = code or exc.exit_code
    return code


def cmd_start(client: Client, a: argparse.Namespace) -> int:
    said: set[str] = set()

    body = {"discard_checkpoint": True} if a.discard_checkpoint else None

    def start(name: str) -> None:
        data = client.request("POST", f"/v1/containers/{name}/start", body)
        _print_notes({"notes": [n for n in data.get("notes") or () if n not in said]})
        said.update(data.get("notes") or ())

    return _each(a.names, start)


def cmd_stop(client: Client, a: argparse.Namespace) -> int:
    body = {"timeout": a.timeout, "force": a.force}
    return _each(a.names, lambda n: client.request("POST", f"/v1/containers/{n}/stop", body))


def cmd_checkpoint(client: Client, a: argparse.Namespace) -> int:
    export = os.path.abspath(a.export) if a.export else None
    data = client.request("POST", f"/v1/containers/{a.name}/checkpoint",
                          {"leave_running": a.leave_running, "export": export})
    took = (data.get("checkpoint") or {}).get("checkpoint_ms", "?")
    if a.export:
        print(f"wrote {a.export} ({(data.get('checkpoint') or {}).get('export', {}).get('bytes', 0) / 1e6:.1f} MB)")
    if a.leave_running:
        print(f"checkpointed {a.name} in {took} ms (still running)")
    else:
        print(f"checkpointed {a.name} in {took} ms (stopped); resume it with "
              f"'kamra restore {a.name}'")
    return 0


def cmd_restore(client: Client, a: argparse.Namespace) -> int:
    body = {"import": os.path.abspath(a.import_file)} if a.import_file else {}
    data = client.request("POST", f"/v1/containers/{a.name}/restore", body)
    print(f"restored {a.name} in {data.get('restore_ms', '?')} ms (pid {data.get('init_pid')})")
    return 0


def cmd_migrate(client: Client, a: argparse.Namespace) -> int:
    on_progress, close = _progress_printer()
    try:
        data = client.stream(f"/v1/containers/{a.name}/migrate",
                             {"remote": a.remote, "mode": a.mode, "lazy": a.lazy},
                             on_progress if a.format != "json" else None)
    finally:
        close()
    if a.format == "json":
        _json(data)
        return 0
    if data.get("settled"):
        print(f"settled the migration of {a.name} to {a.remote}: {data['settled']}")
        return 0
    if data.get("reason"):
        print(f"live migration not possible ({data['reason']}): used restart mode")
    detail = []
    if data.get("pages_bytes"):
        detail.append(f"{data['pages_bytes'] / 1e6:.1f} MB of memory")
    if data.get("lazy"):
        detail.append(f"{data['pages_after_resume_bytes'] / 1e6:.1f} MB of it after the "
                      f"resume, all there after {data['pages_ms']:.0f} ms")
    if data.get("rounds"):
        detail.append(f"{len(data['rounds'])} file round(s) while running")
    print(f"migrated {a.name} to {a.remote} ({data['mode']}): {data['bytes'] / 1e6:.1f} MB "
          f"sent{' (' + ', '.join(detail) + ')' if detail else ''}, downtime "
          f"{data['downtime_ms']:.0f} ms, total {data['total_ms']:.0f} ms")
    return 0


def cmd_remote(client: Client, a: argparse.Namespace) -> int:
    action = a.remote_command
    if action == "list":
        data = client.request("GET", "/v1/remotes")
        if a.format == "json":
            _json(data)
            return 0
        print(f"listening on {data['listen'] or '- (kamra remote listen HOST[:PORT])'}")
        _table([[r["name"], r["address"], r["fingerprint"][:23] + "..."]
                for r in data["remotes"]], ["NAME", "ADDRESS", "FINGERPRINT"])
    elif action == "add":
        data = client.request("POST", "/v1/remotes",
                              {"name": a.name, "address": a.address, "token": a.token})
        print(f"added remote {a.name} at {a.address}; its certificate {data['fingerprint']} "
              "is pinned")
    elif action == "remove":
        client.request("DELETE", f"/v1/remotes/{a.name}")
    elif action == "listen":
        data = client.request("POST", "/v1/remote/listen", {"address": a.address})
        print(f"listening on {data['address']}; certificate {data['fingerprint']}")
    else:
        print(client.request("POST", "/v1/remote/token")["token"])
    return 0


def cmd_restart(client: Client, a: argparse.Namespace) -> int:
    body = {"timeout": a.timeout}
    return _each(a.names, lambda n: client.request("POST", f"/v1/containers/{n}/restart", body))


def cmd_destroy(client: Client, a: argparse.Namespace) -> int:
    query = "?force=1" if a.force else ""
    return _each(a.names, lambda n: client.request("DELETE", f"/v1/containers/{n}{query}"))


def cmd_list(client: Client, a: argparse.Namespace) -> int:
    data = client.request("GET", "/v1/containers")
    if a.format == "json":
        _json(data)
        return 0
    _table([[c["name"], c["state"], c["template"], _ipv4(c), str(c["init_pid"] or "-"),
             _when(c["created_at"]), _when(c["started_at"])] for c in data],
           ["NAME", "STATE", "TEMPLATE", "IPV4", "PID", "CREATED", "STARTED"])


def _ipv4(container: dict) -> str:
    return ",".join(a for a in container.get("addresses") or () if ":" not in a) or "-"
    return 0


def cmd_status(client: Client, a: argparse.Namespace) -> int:
    data = client.request("GET", f"/v1/containers/{a.name}")
    if a.format == "json":
        _json(data)
        return 0
    last = data.get("last_exit") or {}
    rows = [("name", data["name"]), ("state", data["state"]), ("template", data["template"]),
            ("hostname", data["hostname"]), ("init pid", data["init_pid"] or "-"),
            ("addresses", ", ".join(data.get("addresses") or ()) or "-"),
            ("created", _when(data["created_at"])), ("started", _when(data["started_at"])),
            ("console", "yes" if data["console"] else "no (stdio of the client)")]
    if last:
        rows.append(("last exit", f"{last.get('reason')} (code {last.get('code')})"))
    if data.get("migrating_from"):
        rows.append(("migrating", f"from {data['migrating_from']}, which has not confirmed "
                                  "it heard the end yet ("
                                  + ("running here" if data.get("running") else "not running")
                                  + ")"))
    if data.get("migrating_to"):
        rows.append(("migrating", f"to {data['migrating_to']}: 'kamra migrate {a.name} "
                                  f"{data['migrating_to']}' settles it"))
    for key, value in rows:
        print(f"{key + ':':11}{value}")
    return 0


def cmd_ps(client: Client, a: argparse.Namespace) -> int:
    data = client.request("GET", f"/v1/containers/{a.name}/ps")
    if a.format == "json":
        _json(data)
        return 0
    _table([[str(p["pid"]), str(p["container_pid"]), p["user"], " ".join(p["command"])]
            for p in data], ["PID", "CPID", "USER", "COMMAND"])
    return 0


def _session(client: Client, path: str, body: dict, tty: bool) -> int:
    """Upgrade to a session, pass our stdio (unless a pty), then follow the session."""
    from kamra.linux import fdpass

    conn = client.upgrade(path, body)
    with conn:
        fdpass.send(conn, {"stdio": not tty}, [] if tty else [0, 1, 2])
        reply, fds = fdpass.recv(conn)
    if reply is None:
        raise KamraError("kamrad closed the session")
    if "error" in reply:
        from kamra.errors import from_json

        raise from_json(reply["error"])
    if "exit_code" in reply:  # kamra run: the result comes straight back
        return int(reply["exit_code"])
    import socket

    session = socket.socket(fileno=fds[0])
    with session:
        if tty:
            message, pty_fds = fdpass.recv(session)
            if message is None or "error" in (message or {}):
                raise KamraError((message or {}).get("error", "exec session closed"))
            from kamra.cli import terminal

            master = pty_fds[0]
            try:
                return terminal.exec_pty(session, master)
            finally:
                os.close(master)
        code = SESSION_ERROR
        while True:
            message, extra = fdpass.recv(session)
            for fd in extra:
                os.close(fd)
            if message is None:
                return code
            if "error" in message:
                print(f"kamra: {message['error']}", file=sys.stderr)
                code = int(message.get("exit", SESSION_ERROR))
            if "exit" in message:
                return int(message["exit"])


def _env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            from kamra.errors import InvalidInput

            raise InvalidInput(f"invalid -e {pair!r}: write KEY=VALUE")
        env[key] = value
    return env


def _command(a: argparse.Namespace, usage: str) -> list[str]:
    argv = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not argv:
        from kamra.errors import InvalidInput

        raise InvalidInput(f"no command given: {usage}")
    return argv


def cmd_exec(client: Client, a: argparse.Namespace) -> int:
    argv = _command(a, "kamra exec NAME -- CMD [ARGS...]")
    body = {"argv": argv, "env": _env(a.env), "user": a.user, "cwd": a.workdir,
            "tty": a.tty}
    if a.tty:
        from kamra.cli.terminal import terminal_size

        body["winsize"] = list(terminal_size())
        body["term"] = os.environ.get("TERM", "xterm")
    return _session(client, f"/v1/containers/{a.name}/exec", body, a.tty)


def cmd_enter(client: Client, a: argparse.Namespace) -> int:
    from kamra.cli.terminal import terminal_size

    body = {"argv": ["/bin/sh", "-c", 'exec "${SHELL:-/bin/sh}" -l'], "user": a.user,
            "tty": True, "login": True, "winsize": list(terminal_size()),
            "term": os.environ.get("TERM", "xterm")}
    return _session(client, f"/v1/containers/{a.name}/exec", body, True)


def cmd_console(client: Client, a: argparse.Namespace) -> int:
    import socket

    from kamra.cli import terminal
    from kamra.errors import from_json
    from kamra.linux import fdpass

    conn = client.upgrade(f"/v1/containers/{a.name}/console", {})
    with conn:
        reply, fds = fdpass.recv(conn)
    if reply is None or "error" in reply:
        raise from_json((reply or {}).get("error", {"message": "kamrad closed the session"}))
    with socket.socket(fileno=fds[0]) as session:
        return terminal.console(session, a.name)


def cmd_run(client: Client, a: argparse.Namespace) -> int:
    argv = _command(a, "kamra run [--rm] TEMPLATE -- CMD [ARGS...]")
    return _session(client, "/v1/run", {"template": a.template, "argv": argv, "rm": a.rm,
                                        "name": a.name}, False)


def cmd_daemon(client: Client, a: argparse.Namespace) -> int:
    info = client.ping()
    if a.action == "status":
        if a.format == "json":
            _json({"running": bool(info), **(info or {})})
        elif info:
            print(f"kamrad {info['version']} running (pid {info['pid']}) for {info['root']}")
        else:
            print(f"kamrad is not running for {client.root}")
        return 0 if info else 3
    if a.action == "start":
        if not info:
            client.start_daemon()
            info = client.ping() or {}
        print(f"kamrad running (pid {info.get('pid')}) for {client.root}")
        return 0
    if info:
        client.request("POST", "/v1/daemon/shutdown")
        pid = info["pid"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
            time.sleep(0.02)
    return 0


def cmd_network(client: Client, a: argparse.Namespace) -> int:
    if a.network_command == "check":
        problems = client.request("GET", "/v1/network/check")
        if a.format == "json":
            _json(problems)
        elif not problems:
            print("no other firewall on this host drops containers' forwarded traffic")
        for line in problems if a.format != "json" else ():
            print(line)
        return 1 if problems else 0
    data = client.request("GET", "/v1/network")
    if a.format == "json":
        _json(data)
        return 0
    config = data["config"]
    print(f"ipv4 pool: {config['ipv4_pool']} (gateway {config['ipv4_gateway']})")
    print(f"ipv6 pool: {config['ipv6_pool'] or '-'}")
    print(f"bridge: {config['bridge']}    uplink: {config['uplink'] or '-'}    "
          f"nameservers: {', '.join(config['nameservers']) or 'the host' + chr(39) + 's'}")
    print()
    _table([[row["address"], row["container"]] for row in data["allocations"]],
           ["ADDRESS", "CONTAINER"])
    if data["forwards"]:
        print()
        _print_forwards(data["forwards"])
    return 0


def _print_forwards(rows: list[dict]) -> None:
    _table([[f"{r['host_ip'] or '*'}:{r['host_port']}", r["proto"], r["container"],
             str(r["ct_port"])] for r in rows], ["HOST", "PROTO", "CONTAINER", "PORT"])


def cmd_port(client: Client, a: argparse.Namespace) -> int:
    if a.port_command == "list":
        path = "/v1/ports" + (f"?name={a.name}" if a.name else "")
        rows = client.request("GET", path)
        if a.format == "json":
            _json(rows)
        else:
            _print_forwards(rows)
        return 0
    body = {"spec": a.spec, "host_ip": a.host_ip}
    if a.port_command == "add":
        client.request("POST", f"/v1/containers/{a.name}/ports", body)
    else:
        client.request("POST", f"/v1/containers/{a.name}/ports/remove", body)
    return 0


COMMANDS = {
    "template": cmd_template, "create": cmd_create, "start": cmd_start, "stop": cmd_stop,
    "checkpoint": cmd_checkpoint, "restore": cmd_restore, "migrate": cmd_migrate,
    "remote": cmd_remote,
    "restart": cmd_restart, "destroy": cmd_destroy, "list": cmd_list, "status": cmd_status,
    "ps": cmd_ps, "exec": cmd_exec, "enter": cmd_enter, "console": cmd_console,
    "run": cmd_run, "daemon": cmd_daemon, "set": cmd_set, "config": cmd_config,
    "plan": cmd_plan, "beancounters": cmd_beancounters, "stats": cmd_stats,
    "network": cmd_network, "port": cmd_port,
}
SESSION_COMMANDS = ("exec", "enter", "run")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    head, command = _split_command(argv)
    args = build_parser(_command_word(head)).parse_args(head)
    if command is not None:
        if args.command not in ("exec", "run"):
            build_parser().error(f"'--' is only for 'exec' and 'run', not {args.command!r}")
        args.cmd = command
    client = Client(args.root)
    try:
        return COMMANDS[args.command](client, args)
    except KamraError as exc:
        if args.debug:
            raise
        print(f"kamra: {exc.message}", file=sys.stderr)
        return SESSION_ERROR if args.command in SESSION_COMMANDS else exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1
    except OSError as exc:
        if args.debug:
            raise
        print(f"kamra: {exc.strerror or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
