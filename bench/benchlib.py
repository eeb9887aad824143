"""benchlib: what bench/lifecycle, bench/network and bench/overhead share.

Each script puts its own directory on sys.path and imports this module. It holds the
helpers that were the same in all of them: logging; running commands in a process group
of their own (killed if we are interrupted); the re-run in a private network namespace
and the check that the machine's namespace came out unchanged; statistics and result
tables; cgroup helpers and the janitor that removes the cgroups LXC and crun made beneath
our own; and the frame of a benchmark run (BenchBase): measurement steps that record a
failure and go on, clean-up on success, failure and Ctrl-C, and the checks afterwards.
What differs between the scripts (their result rows and tables' columns, their set-up,
their JSON) stays in the scripts.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

if str(Path(__file__).resolve().parent.parent / "src") not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent.parent / "src"))  # kamra itself

from kamra.cgroups.base import detect_mode, own_cgroups  # noqa: E402
from kamra.cgroups.base import read_mounts as cgroup_mounts  # noqa: E402
from kamra.templates.fsutil import mounts_under as _mounts_under  # noqa: E402

# -- small utilities ------------------------------------------------------------------------

def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class CommandFailed(RuntimeError):
    pass


class Interrupted(BaseException):
    pass


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


# The main process runs every command in a process group of its own, so that an
# interruption can kill the command and whatever it started. bench/lifecycle's crun helper
# sets this to False to keep its commands in its own group instead, so that killing the
# helper's group kills them too.
NEW_SESSIONS = True


def _communicate(argv: list[str], *, capture_stdout: bool, timeout: float | None,
                 env: dict[str, str] | None, cwd: str | None) -> tuple[int, str, str]:
    """Run a command; if we are interrupted (Ctrl-C, SIGTERM, timeout), its process group
    (the command and whatever it started) is killed before we go on."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE if capture_stdout else subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                            start_new_session=NEW_SESSIONS)
    if not NEW_SESSIONS:
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        return proc.returncode, out or "", err or ""
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        wait_group_gone(proc.pid)
        raise
    return proc.returncode, out or "", err or ""


def _process_group(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[2])
    except (OSError, ValueError, IndexError):
        return None


def wait_group_gone(pgid: int, timeout: float = 5) -> None:
    """Wait until no process of the (killed) process group ``pgid`` remains."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_process_group(int(e)) == pgid for e in os.listdir("/proc") if e.isdigit()):
            return
        time.sleep(0.02)


def run(argv: list[str], *, timeout: float = 600, check: bool = True,
        env: dict[str, str] | None = None, cwd: str | None = None
        ) -> subprocess.CompletedProcess[str]:
    """Run a command with captured output; raise CommandFailed with its stderr on failure."""
    code, out, err = _communicate(argv, capture_stdout=True, timeout=timeout, env=env, cwd=cwd)
    if check and code != 0:
        detail = (err.strip() or out.strip())[-800:]
        raise CommandFailed(f"{' '.join(argv)} exited {code}: {detail}")
    return subprocess.CompletedProcess(argv, code, out, err)


def time_command(argv: list[str], env: dict[str, str] | None = None) -> float:
    """Wall time of one command in milliseconds (stdout discarded, stderr kept for errors)."""
    start = time.perf_counter()
    code, _, err = _communicate(argv, capture_stdout=False, timeout=600, env=env, cwd=None)
    elapsed = (time.perf_counter() - start) * 1000
    if code != 0:
        raise CommandFailed(f"{' '.join(argv)} exited {code}: {err.strip()[-800:]}")
    return elapsed


def read_pid_file(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def tool_version(argv: list[str]) -> str:
    try:
        out = run(argv, check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _cmdline_has(pid: int, text: str) -> bool:
    return any(text in arg for arg in _cmdline(pid))


def _processes_mentioning(needles: list[str]) -> list[int]:
    """Processes whose command line or cgroup mentions one of ``needles``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                cgroups = f.read()
        except OSError:
            continue
        text = cgroups + "\0".join(_cmdline(pid))
        if any(n in text for n in needles):
            found.append(pid)
    return found


def apt_install(apt_tools: dict[str, str], problems: list[str]) -> None:
    """Install from Debian the package (``apt_tools``: tool -> package) of every tool that
    is missing, in the machine's network namespace (only the download goes there);
    ``apt-get update`` only if the install fails. A failure goes in ``problems``."""
    missing = sorted({pkg for tool, pkg in apt_tools.items() if shutil.which(tool) is None})
    if not missing:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = in_machine_netns(["apt-get", "install", "-y", *missing])
    log(f"installing {' '.join(missing)}")
    if run(install, check=False, env=env, timeout=1800).returncode != 0:
        run(in_machine_netns(["apt-get", "update"]), check=False, env=env, timeout=1800)
        result = run(install, check=False, env=env, timeout=1800)
        if result.returncode != 0:
            problems.append(f"apt-get install {' '.join(missing)} failed: "
                            f"{result.stderr.strip()[-500:]}")


# -- a network namespace of our own ---------------------------------------------------------
# kamra containers are networked by default (net.mode=routed): kamrad makes veths and host
# routes, sets net.ipv4.ip_forward=1 and adds an nftables table in whatever network
# namespace it runs in. So a benchmark re-runs itself in a fresh one (unshare --net),
# where it starts kamrad; the parent stays in the machine's namespace, changes nothing
# there, waits, and checks afterwards that its forwarding sysctls, interfaces and nftables
# tables are as they were.

NETNS_ENV = "KAMRA_BENCH_MACHINE_NETNS"
MACHINE_FD_ENV = "KAMRA_BENCH_MACHINE_NETNS_FD"


def _netns_id(pid: int | str = "self") -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def network_state() -> dict[str, object]:
    """What kamra or LXC would change in a network namespace: the forwarding sysctls, the
    interfaces, the nftables tables (of the calling process's namespace; read only)."""
    state: dict[str, object] = {}
    for path in ("/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"):
        try:
            with open(path) as f:
                state[path] = f.read().strip()
        except OSError:
            state[path] = None
    state["interfaces"] = sorted(name for _, name in socket.if_nameindex())
    if shutil.which("nft"):
        result = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True,
                                check=False)
        state["nft_tables"] = sorted(t for t in result.stdout.split("\n") if t) \
            if result.returncode == 0 \
            else f"nft list tables failed: {result.stderr.strip()[:200]}"
    return state


def describe_network_state(state: dict[str, object]) -> str:
    return (f"ip_forward {state['/proc/sys/net/ipv4/ip_forward']}, interfaces "
            f"{' '.join(state['interfaces'])}, nftables tables "  # type: ignore[arg-type]
            f"{state.get('nft_tables') or 'none'}")


def say_network_state_changed(prog: str, before: dict[str, object],
                              after: dict[str, object]) -> None:
    print(f"{prog}: THE MACHINE'S NETWORK NAMESPACE CHANGED during the run:\n"
          f"  before {before}\n  after  {after}", file=sys.stderr)


def in_private_netns() -> bool:
    """True in the copy of a script that runs in the namespace its parent made."""
    machine = os.environ.get(NETNS_ENV)
    if not machine or _netns_id() == machine:
        return False
    try:  # PID 1's may be unreadable (a sandbox); the parent's word is the check then
        return _netns_id() != _netns_id(1)
    except OSError:
        return True


def rerun_in_private_netns(prog: str, script: str | Path, argv: list[str],
                           env: dict[str, str] | None = None
                           ) -> tuple[int, dict[str, object], dict[str, object]]:
    """Re-run ``script`` (with ``argv``, ``env`` added to ours) in a fresh network
    namespace and wait for it. Returns its exit status (as a shell gives it) and the state
    of the machine's namespace before and after. Exits 2 unless we are root and have
    unshare."""
    if os.geteuid() != 0:
        print(f"{prog}: run as root", file=sys.stderr)
        raise SystemExit(2)
    if shutil.which("unshare") is None:
        print(f"{prog}: unshare (util-linux) is missing: it keeps the benchmark out of the "
              "machine's network namespace", file=sys.stderr)
        raise SystemExit(2)
    before = network_state()
    # The child may come back to this namespace only to download (in_machine_netns).
    machine = os.open("/proc/self/ns/net", os.O_RDONLY)
    child_env = dict(os.environ, **(env or {}),
                     **{NETNS_ENV: _netns_id(), MACHINE_FD_ENV: str(machine)})
    proc = subprocess.Popen(["unshare", "--net", "--", sys.executable,
                             str(Path(script).resolve()), *argv], env=child_env,
                            pass_fds=(machine,))
    os.close(machine)

    def forward(signum: int, frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    # Ctrl-C reaches the child from the terminal; SIGTERM or SIGHUP sent to us are passed on.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGHUP, forward)
    code = proc.wait()
    after = network_state()
    return (code if code >= 0 else 128 - code), before, after


def run_in_private_netns(prog: str, script: str | Path, argv: list[str]) -> int:
    """Re-run ``script`` in a fresh network namespace and wait for it; then check that
    the machine's own namespace came out as it went in (exit status 1 if not)."""
    code, before, after = rerun_in_private_netns(prog, script, argv)
    if before != after:
        say_network_state_changed(prog, before, after)
        return 1
    print(f"{prog}: the machine's network namespace is unchanged "
          f"({describe_network_state(after)})", file=sys.stderr)
    return code


def enter_private_netns(loopback: bool = True) -> None:
    """In the re-run copy: loopback up (a new namespace has it down; ``loopback=False``
    leaves that to the caller); the descriptor of the machine's namespace is not handed
    on to anything we start."""
    if loopback:
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    with contextlib.suppress(KeyError, ValueError, OSError):
        os.set_inheritable(int(os.environ[MACHINE_FD_ENV]), False)


def in_machine_netns(argv: list[str]) -> list[str]:
    """``argv`` run in the machine's network namespace: only to download (apt-get,
    debootstrap), never to route or filter."""
    fd = os.environ.get(MACHINE_FD_ENV)
    if not fd or not in_private_netns():
        return argv
    return ["nsenter", f"--net=/proc/{os.getpid()}/fd/{fd}", *argv]


# -- statistics and result tables -----------------------------------------------------------

@dataclass
class Stats:
    """Summary of samples (milliseconds unless the row says otherwise)."""

    n: int
    median: float
    min: float
    max: float
    p90: float
    mean: float
    samples: list[float] = field(repr=False, default_factory=list)

    @classmethod
    def of(cls, samples: list[float]) -> Stats:
        if not samples:
            raise ValueError("no samples")
        ordered = sorted(samples)
        return cls(n=len(samples), median=statistics.median(samples), min=ordered[0],
                   max=ordered[-1], p90=percentile(ordered, 90),
                   mean=statistics.fmean(samples), samples=list(samples))

    def to_json(self) -> dict:
        return {"n": self.n, "median": round(self.median, 3), "min": round(self.min, 3),
                "max": round(self.max, 3), "p90": round(self.p90, 3),
                "mean": round(self.mean, 3), "samples": [round(s, 3) for s in self.samples]}

    def cell(self) -> str:
        return f"{_num(self.median)} ({_num(self.min)}-{_num(self.max)})"


def percentile(ordered: list[float], p: float) -> float:
    """Nearest-rank percentile of sorted samples."""
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


Value = Stats | float | int | str | None


def _num(x: float) -> str:
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def numeric(value: Value) -> float | None:
    if isinstance(value, Stats):
        return value.median
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def cell(value: Value) -> str:
    if value is None:
        return "-"
    if isinstance(value, Stats):
        return value.cell()
    if isinstance(value, (int, float)):
        return _num(float(value)) if isinstance(value, float) else str(value)  # counts
    return value


def json_value(value: Value) -> object:
    if isinstance(value, Stats):
        return value.to_json()
    if isinstance(value, float):
        return round(value, 3)
    return value


def _ratio(a: Value, b: Value, digits: int | None = None) -> float | None:
    """a/b of two values' medians (None if either has none), rounded to ``digits``."""
    x, y = numeric(a), numeric(b)
    if x is None or y is None or y == 0:
        return None
    return x / y if digits is None else round(x / y, digits)


def _short(text: str, width: int = 40) -> str:
    """Table cells stay narrow; the whole message is in the problems list and the JSON."""
    return text if len(text) <= width else text[:width - 3] + "..."


def print_table(header: list[str], body: list[list[str]]) -> None:
    """Columns as wide as their widest cell, between two rules (the caller adds notes)."""
    widths = [max(len(line[i]) for line in body + [header]) for i in range(len(header))]
    rule = "  ".join("-" * w for w in widths)
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print(rule)
    for line in body:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())
    print(rule)


# -- cgroups --------------------------------------------------------------------------------

def own_path_for(fstype: str, opts: list[str], own: dict[str, str]) -> str:
    if fstype == "cgroup2":
        return own.get("", "/")
    for key, path in own.items():
        if key and all(c in opts for c in key.split(",")):
            return path
    return "/"


def cgroup_mode() -> str:
    """kamra's own detection ("v2", "v1", "hybrid"), or "none" without cgroups."""
    try:
        return detect_mode()
    except RuntimeError:
        return "none"


def rmdir_tree(path: str) -> None:
    """Remove a cgroup directory and its children, deepest first."""
    if not os.path.isdir(path):
        return
    for dirpath, dirnames, _ in os.walk(path, topdown=False):
        for d in dirnames:
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(os.path.join(dirpath, d))
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(path)


def cgroup_pids(path: str) -> list[int]:
    pids: set[int] = set()
    for dirpath, _, files in os.walk(path):
        if "cgroup.procs" in files:
            with contextlib.suppress(OSError), open(os.path.join(dirpath, "cgroup.procs")) as f:
                pids.update(int(x) for x in f.read().split())
    return sorted(pids)


def find_cgroups(names: set[str]) -> list[str]:
    """Every cgroup directory (any hierarchy) whose base name is in ``names``."""
    found = []
    for mountpoint, _, _ in cgroup_mounts():
        for dirpath, dirnames, _ in os.walk(mountpoint):
            found += [os.path.join(dirpath, d) for d in dirnames if d in names]
    return found


class CgroupJanitor:
    """Knows every cgroup directory LXC (and, given ``crun_base``, crun) may create for
    us, and which of them existed before we started, so it can remove exactly what we
    made: the ``tag`` directory beneath our own cgroup in each hierarchy (and beneath
    ``crun_base``), the intermediate directories of crun's absolute path, and the
    ``lxc.pivot`` LXC leaves beneath our own cgroup."""

    def __init__(self, tag: str, crun_base: str | None = None):
        self.tag = tag
        own = own_cgroups()
        self.tag_dirs: list[str] = []
        self.maybe_created: list[str] = []
        for mountpoint, fstype, opts in cgroup_mounts():
            mine = own_path_for(fstype, opts, own)
            for base in {mine, crun_base or mine}:
                self.tag_dirs.append(os.path.join(mountpoint, base.lstrip("/"), tag))
                # crun creates the intermediate directories of its absolute path too.
                parts = [p for p in base.split("/") if p]
                for i in range(1, len(parts) + 1):
                    self.maybe_created.append(os.path.join(mountpoint, *parts[:i]))
            # LXC moves its monitor to "lxc.pivot" under our own cgroup and leaves it there.
            self.maybe_created.append(os.path.join(mountpoint, mine.lstrip("/"), "lxc.pivot"))
        self.tag_dirs = sorted(set(self.tag_dirs))
        self.preexisting = {p for p in self.maybe_created if os.path.isdir(p)}

    def clean(self) -> list[str]:
        problems: list[str] = []
        killed: set[int] = set()
        for attempt in range(3):
            present = [p for p in self.tag_dirs if os.path.isdir(p)]
            pids = sorted({pid for p in present for pid in cgroup_pids(p)})
            for pid in pids:  # ours: they sit in our own benchmark cgroup
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            killed.update(pids)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(cgroup_pids(p) for p in present):
                time.sleep(0.02)
            errors = []
            for path in present:
                try:
                    rmdir_tree(path)
                except OSError as exc:
                    errors.append(f"could not remove cgroup {path}: {exc.strerror}")
            if not errors and not any(os.path.isdir(p) for p in self.tag_dirs):
                break
            if attempt == 2:
                problems += errors
            time.sleep(0.5)
        if killed:
            problems.append(f"killed {len(killed)} leftover process(es) in our cgroups: "
                            f"{sorted(killed)[:20]}")
        created = sorted(set(self.maybe_created) - self.preexisting, key=len, reverse=True)
        for path in created:
            try:
                os.rmdir(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                problems.append(f"could not remove cgroup {path}: {exc.strerror}")
        return problems


# -- LXC ------------------------------------------------------------------------------------

def lxc_lock_to_create(lxc_path: Path) -> Path | None:
    """LXC keeps lock files under /run/lxc/lock/<lxcpath>: the first directory of that
    path that does not exist yet, which LXC will create and we remove at the end."""
    lock = Path("/run/lxc/lock") / str(lxc_path).lstrip("/")
    for parent in [*reversed(lock.parents), lock]:
        if not parent.exists():
            return parent
    return None


def lxc_config(name: str, rootfs: str | Path, tag: str, net: list[str]) -> str:
    """An LXC container's config: its network as ``net`` says, its cgroups beneath our own
    in each hierarchy (under ``tag``), no console."""
    return "\n".join([
        f"lxc.uts.name = {name}",
        f"lxc.rootfs.path = dir:{rootfs}",
        *net,
        # Stay beneath our own cgroup in each hierarchy (no escape to the root).
        "lxc.cgroup.relative = 1",
        f"lxc.cgroup.dir.monitor = {tag}/lxc.monitor.{name}",
        f"lxc.cgroup.dir.container = {tag}/lxc.payload.{name}",
        "lxc.apparmor.profile = unconfined",
        "lxc.mount.auto = proc:mixed sys:ro",
        "lxc.autodev = 1",
        "lxc.tty.max = 0",
        "lxc.pty.max = 16",
        "lxc.console.path = none",
        "",
    ])


# -- the frame of a benchmark run -----------------------------------------------------------

# Error lines in kamrad.log and keeper.log; the keeper reports a failed event handler as
# "keeper: <event>: <exception>" (and logs init exits as "keeper: <name> init ...": fine).
_LOG_TROUBLE = re.compile(r"ERROR|WARNING|CRITICAL|Traceback|Error\b|^keeper: [a-z_]+: ")


class BenchBase:
    """What bench/lifecycle's and bench/network's Bench share: a temporary directory, the
    kamra CLI and API of a data root, measurement steps that record a failure and go on,
    the clean-up steps both take, and ``run_to_end``, which runs the benchmark, cleans up
    however it ended and writes the report. A subclass sets ``root``, ``env`` and
    ``kamra_exe`` after calling ``__init__``, and defines ``cleanup`` and
    ``write_report``."""

    root: Path
    env: dict[str, str]
    kamra_exe: str

    def __init__(self, args: argparse.Namespace, prefix: str):
        self.args = args
        self.tag = f"kamra-bench-{os.getpid()}"
        self.prefix = prefix  # names of our kamra containers
        self.raw: dict[str, object] = {}
        self.problems: list[str] = []
        self.cleanup_report: dict[str, object] = {}
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.tag}-"))
        self.own_root = True  # False: a data root given to us, which others may use
        self.client = None  # kamra.client.Client once kamrad runs
        self.kamra_names: set[str] = set()
        self.started_daemon = False
        self.daemon_pids: dict[str, int] = {}
        self.tools: dict[str, bool] = {}
        self.janitor: CgroupJanitor | None = None
        self.lxc_lock_created: Path | None = None
        self.log_offsets: dict[str, int] = {}  # where our part of kamrad's logs begins

    # -- helpers ------------------------------------------------------------------------
    def kamra(self, *args: str) -> list[str]:
        return [self.kamra_exe, "--root", str(self.root), *args]

    def api(self, method: str, path: str, body: object = None) -> object:
        assert self.client is not None
        return self.client.request(method, path, body)

    @contextlib.contextmanager
    def step(self, name: str, on_fail: Callable[[str], None] | None = None) -> Iterator[None]:
        """Run one measurement; a failure is recorded and the benchmark goes on."""
        log(f"== {name}")
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - report it, then measure the rest
            message = f"{name}: {type(exc).__name__}: {getattr(exc, 'message', None) or exc}"
            self.problems.append(message)
            self.raw.setdefault("tracebacks", {})[name] = traceback.format_exc()  # type: ignore[index]
            log(f"  FAILED {message}")
            if on_fail is not None:
                on_fail(f"failed: {exc}")

    # -- running it ---------------------------------------------------------------------
    def run_to_end(self, body: Callable[[], None]) -> int:
        """Run ``body`` (set-up and measurements); whatever happens, clean up (Ctrl-C is
        ignored meanwhile) and write the report. Exit status 130 if interrupted, 1 if
        something was left behind."""
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _raise_interrupted)
        interrupted = False
        try:
            body()
        except (Interrupted, KeyboardInterrupt) as exc:
            interrupted = True
            self.problems.append(f"interrupted ({exc or 'SIGINT'}): results are partial")
            log("interrupted: cleaning up")
        except SystemExit as exc:
            self.problems.append(f"aborted: {exc}")
            log(f"aborted: {exc}")
        except Exception as exc:  # noqa: BLE001 - always clean up and report
            self.problems.append(f"aborted: {type(exc).__name__}: "
                                 f"{getattr(exc, 'message', None) or exc}")
            self.raw["traceback"] = traceback.format_exc()
            log(f"aborted: {exc}")
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not stop the clean-up
            log("cleaning up (Ctrl-C is ignored until done)")
            self.cleanup()
            log("clean" if self.cleanup_report.get("clean") else "NOT clean: see problems")
        self.write_report(interrupted)
        return 130 if interrupted else (0 if self.cleanup_report.get("clean") else 1)

    def cleanup(self) -> None:
        raise NotImplementedError

    def write_report(self, interrupted: bool) -> Path:
        raise NotImplementedError

    # -- clean-up -----------------------------------------------------------------------
    def _attempt(self, what: str, action: Callable[[], object]) -> None:
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - clean up as much as possible
            self.problems.append(f"cleanup of {what}: {type(exc).__name__}: "
                                 f"{getattr(exc, 'message', None) or exc}")

    def stop_daemon(self) -> None:
        if not self.started_daemon:
            return
        result = run(self.kamra("daemon", "stop"), env=self.env, check=False, timeout=120)
        if result.returncode != 0:
            self.problems.append(f"kamra daemon stop exited {result.returncode}: "
                                 f"{result.stderr.strip()[-500:]}")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(pid_alive(p) for p in
                                                  self.daemon_pids.values()):
            time.sleep(0.05)
        for name, pid in self.daemon_pids.items():
            if pid_alive(pid) and _cmdline_has(pid, str(self.root)):
                self.problems.append(f"{name} (pid {pid}) still ran after 'kamra daemon "
                                     "stop': sent SIGTERM")
                os.kill(pid, signal.SIGTERM)

    def scan_kamra_logs(self) -> None:
        """Keep what kamrad and the keeper logged as errors (their logs go with the root)."""
        found: dict[str, list[str]] = {}
        for name in ("kamrad.log", "keeper.log"):
            path = self.root / "run" / name
            with contextlib.suppress(OSError):
                offset = self.log_offsets.get(name, 0)
                with open(path, errors="replace") as f:
                    f.seek(offset)
                    lines = [line.rstrip() for line in f if _LOG_TROUBLE.search(line)]
                if lines:
                    found[name] = lines[:100]
                    self.problems.append(f"{name} has {len(lines)} error/warning line(s), e.g. "
                                         f"{lines[0][:300]}")
        self.raw["kamra_log_errors"] = found

    def our_marks(self) -> list[str]:
        """Strings in a command line or cgroup path that only our processes carry."""
        from kamra.paths import Layout

        marks = [str(self.tmp), self.tag]
        if self.own_root:  # a --root given to us may hold someone else's containers
            marks.append(f"/kamra-{Layout.at(str(self.root)).root_id}/")
        return marks

    def cleanup_processes(self) -> None:
        for pid in _processes_mentioning(self.our_marks()):
            if pid == os.getpid():
                continue
            self.problems.append(f"cleanup: killed leftover process {pid}: "
                                 f"{' '.join(_cmdline(pid))[:200]}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def cleanup_mounts(self) -> None:
        for point in reversed(_mounts_under(str(self.tmp))):
            self.problems.append(f"cleanup: {point} was still mounted: unmounted")
            run(["umount", "-l", point], check=False)

    def remove_tmp(self) -> None:
        if _mounts_under(str(self.tmp)):
            raise RuntimeError(f"{self.tmp} still has mounts under it; left in place")
        shutil.rmtree(self.tmp)
