"""The kamra command line end to end, as a user runs it."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

from conftest import SRC, unique

from kamra.linux import libc


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kamra: ")
    return lines[0]


def test_everyday_commands(cli):
    name = unique()
    assert cli.run("create", name, "--template", "busybox", "--hostname", "web").returncode == 0
    listing = cli.json("list")
    assert [(c["name"], c["state"], c["template"]) for c in listing] == \
        [(name, "stopped", "busybox")]
    assert cli.run("start", name).returncode == 0
    status = cli.json("status", name)
    for key in ("name", "state", "template", "init_pid", "created_at", "started_at"):
        assert key in status
    assert status["state"] == "running" and status["init_pid"] > 0
    assert cli.run("exec", name, "--", "hostname").stdout == "web\n"
    table = cli.run("list").stdout
    assert name in table and "running" in table
    address = status["addresses"][0]  # routed by default: an address from the pool
    assert address.startswith("10.73.") and address in table.splitlines()[1]
    assert f"addresses: {address}" in cli.run("status", name).stdout
    ps = cli.run("ps", name).stdout
    assert "init" in ps and "CPID" in ps
    assert cli.run("restart", name, "--timeout", "10").returncode == 0
    assert cli.json("status", name)["init_pid"] != status["init_pid"]
    assert cli.run("stop", name).returncode == 0
    assert cli.run("destroy", name).returncode == 0
    assert cli.json("list") == []


def test_exec_streams_pipes_env_user_workdir(cli):
    name = unique()
    cli.run("create", name, "--template", "busybox", check=True)
    cli.run("start", name, check=True)
    assert cli.run("exec", name, "--", "cat", input="hi\n").stdout == "hi\n"
    big = "x" * 300000
    assert cli.run("exec", name, "--", "wc", "-c", input=big).stdout.strip() == "300000"
    result = cli.run("exec", "-e", "GREETING=hello", "-u", "nobody", "-w", "/tmp", name, "--",
                     "sh", "-c", 'echo "$GREETING $(id -u) $(pwd)"; echo err >&2; exit 7')
    assert result.returncode == 7
    assert result.stdout == "hello 65534 /tmp\n"
    assert result.stderr == "err\n"
    missing = cli.run("exec", name, "--", "no-such-command")
    assert missing.returncode == 127
    assert "not found" in missing.stderr


def test_run_one_shot(cli, root):
    result = cli.run("run", "--rm", "busybox", "--", "sh", "-c", "cat; exit 3", input="piped\n")
    assert result.returncode == 3
    assert result.stdout == "piped\n"
    assert cli.json("list") == []
    kept = cli.run("run", "--name", "keep1", "busybox", "--", "true")
    assert kept.returncode == 0
    assert [c["name"] for c in cli.json("list")] == ["keep1"]
    assert cli.json("status", "keep1")["last_exit"]["code"] == 0


def test_bad_input_gives_one_line_errors(cli):
    name = unique()
    for bad in ("../x", "A B", "a" * 64, ""):
        line = one_line_error(cli.run("create", bad, "--template", "busybox"))
        assert "name" in line
    assert "not found" in one_line_error(cli.run("create", name, "--template", "nosuch"))
    cli.run("create", name, "--template", "busybox", check=True)
    assert "already exists" in one_line_error(cli.run("create", name, "--template", "busybox"))
    assert "not running" in one_line_error(cli.run("stop", name))
    assert "not running" in one_line_error(cli.run("exec", name, "--", "true"))
    assert "not found" in one_line_error(cli.run("start", "nosuch"))
    cli.run("start", name, check=True)
    assert "already running" in one_line_error(cli.run("start", name))
    assert "running" in one_line_error(cli.run("destroy", name))
    assert "used by" in one_line_error(cli.run("template", "remove", "busybox"))
    assert name in cli.run("template", "remove", "busybox").stderr
    assert one_line_error(cli.run("exec", name))
    assert cli.run("destroy", "--force", name).returncode == 0
    assert cli.json("list") == []
    # argparse's own usage errors exit 2 and name the problem.
    usage = cli.run("stop")
    assert usage.returncode == 2 and "Traceback" not in usage.stderr


def test_concurrent_cli_commands_are_serialised(cli):
    name = unique()
    cli.run("create", name, "--template", "busybox", check=True)
    cli.run("daemon", "start", check=True)
    procs = [subprocess.Popen([sys.executable, "-m", "kamra.cli.main", "start", name],
                              env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outcomes = [(p.wait(60), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    codes = sorted(code for code, _ in outcomes)
    assert codes[0] == 0 and all(code != 0 for code in codes[1:])
    assert all("already running" in err for code, err in outcomes if code)


def test_debug_shows_a_traceback(cli):
    result = cli.run("--debug", "start", "nosuch")
    assert result.returncode != 0
    assert "Traceback" in result.stderr


class PtySession:
    """Runs the kamra CLI on a pseudo-terminal, the way a person at a terminal would."""

    def __init__(self, env: dict, *args: str, rows: int = 30, cols: int = 100):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.execve(sys.executable, [sys.executable, "-m", "kamra.cli.main", *args],
                      dict(env, PYTHONPATH=SRC, TERM="xterm"))
        libc.set_winsize(self.fd, rows, cols)
        self.output = b""
        self.answered = 0  # cursor position queries answered so far

    def read_until(self, needle: bytes, timeout: float = 20, required: bool = True) -> bytes:
        deadline = time.monotonic() + timeout
        while needle not in self.output and time.monotonic() < deadline:
            ready, _, _ = select.select([self.fd], [], [], 0.2)
            if ready:
                try:
                    data = os.read(self.fd, 65536)
                except OSError:
                    break
                if not data:
                    break
                self.output += data
        if required:
            assert needle in self.output, self.output.decode(errors="replace")
        return self.output

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wait(self, timeout: float = 20) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            try:
                ready, _, _ = select.select([self.fd], [], [], 0.1)
                if ready:
                    self.output += os.read(self.fd, 65536)
            except OSError:
                time.sleep(0.05)
        os.kill(self.pid, 9)
        os.waitpid(self.pid, 0)
        os.close(self.fd)
        raise AssertionError("the CLI did not exit")


def answer_cursor_query(session: PtySession) -> None:
    """busybox's line editor asks the terminal where the cursor is (ESC [ 6 n) after each
    prompt and takes what is typed next as the answer; a real terminal answers at once."""
    session.read_until(b"\x1b[6n", timeout=2, required=False)
    unanswered = session.output.count(b"\x1b[6n") - session.answered
    for _ in range(unanswered):
        session.send(b"\x1b[1;1R")
    session.answered += unanswered


def test_exec_with_a_tty(cli):
    name = unique()
    cli.run("create", name, "--template", "busybox", check=True)
    cli.run("start", name, check=True)
    session = PtySession(cli.env, "exec", "-t", name, "--", "sh", "-c",
                         "tty; stty size; echo done-$((6*7)); exit 4", rows=33, cols=111)
    out = session.read_until(b"done-42")
    assert session.wait() == 4
    # A pty from the container's own devpts, where the console holds /dev/pts/0.
    assert b"/dev/pts/1" in out
    assert b"33 111" in out


def test_enter_gives_a_login_shell(cli):
    name = unique()
    cli.run("create", name, "--template", "busybox", check=True)
    cli.run("start", name, check=True)
    session = PtySession(cli.env, "enter", name)
    session.read_until(b"# ")
    answer_cursor_query(session)
    session.send(b"echo inside-$((2+3)) $(hostname) $(pwd)\r")
    session.read_until(f"inside-5 {name} /root".encode())
    session.send(b"exit 0\r")
    assert session.wait() == 0


def test_console_attach_detach_and_log(cli, root):
    name = unique()
    cli.run("create", name, "--template", "busybox", check=True)
    cli.run("start", name, check=True)
    session = PtySession(cli.env, "console", name)
    session.read_until(b"Ctrl-a q")
    session.send(b"\r")
    answer_cursor_query(session)
    session.send(b"echo console-$((40+2)); tty\r")
    out = session.read_until(b"console-42")
    session.read_until(b"/dev/console")
    session.send(b"\x01q")
    assert session.wait() == 0
    assert b"Detached" in session.output
    assert b"console-42" in out
    log = os.path.join(root, "containers", name, "console.log")
    with open(log, "rb") as f:
        assert b"console-42" in f.read()
    # The console survives a kamrad restart: attach again through a new kamrad.
    with open(os.path.join(root, "run", "kamrad.pid")) as f:
        os.kill(int(f.read()), 9)
    time.sleep(0.2)
    again = PtySession(cli.env, "console", name)
    again.read_until(b"Ctrl-a q")
    again.send(b"\r")
    answer_cursor_query(again)
    again.send(b"echo again-$((1+1))\r")
    again.read_until(b"again-2")
    again.send(b"\x01q")
    assert again.wait() == 0


def test_several_containers_in_one_command(cli):
    names = [unique() for _ in range(3)]
    for name in names:
        cli.run("create", name, "--template", "busybox", check=True)
    assert cli.run("start", *names).returncode == 0
    assert {c["name"]: c["state"] for c in cli.json("list")} == dict.fromkeys(names, "running")
    # One failure is reported on its own line; the others still happen.
    result = cli.run("stop", names[0], "nosuch", names[1])
    assert result.returncode == 3 and "nosuch" in result.stderr
    states = {c["name"]: c["state"] for c in cli.json("list")}
    assert states == {names[0]: "stopped", names[1]: "stopped", names[2]: "running"}
    assert cli.run("destroy", "--force", *names).returncode == 0
    assert cli.json("list") == []


def test_template_export_import_round_trip(cli, tmp_path):
    archive = str(tmp_path / "bb.tar.zst")
    assert cli.run("template", "export", "busybox", archive).returncode == 0
    imported = cli.run("template", "import", archive, "--name", "bb2")
    assert imported.returncode == 0, imported.stderr
    original = cli.json("template", "show", "busybox")
    copy = cli.json("template", "show", "bb2")
    assert copy["digest"] == original["digest"]
    assert {t["name"] for t in cli.json("template", "list")} == {"busybox", "bb2"}
    result = cli.run("run", "--rm", "bb2", "--", "sh", "-c", "echo from-import")
    assert result.returncode == 0 and result.stdout == "from-import\n"
    assert "already exists" in one_line_error(cli.run("template", "import", archive,
                                                      "--name", "bb2"))
    assert cli.run("template", "remove", "bb2").returncode == 0
    assert "not found" in one_line_error(cli.run("template", "show", "bb2"))


def test_a_deep_data_root_works(busybox_cache):
    """Unix socket paths hold 108 bytes; kamra reaches deeper roots through a short path."""
    import shutil
    import tempfile

    from conftest import Cli, force_cleanup, install_template, leftovers

    from kamra.paths import Layout

    base = tempfile.mkdtemp(prefix="kamra-deep-")
    root = os.path.join(base, *(["a-rather-long-directory-name"] * 6))
    os.makedirs(root)
    assert len(os.path.join(root, "run", "kamrad.sock")) > 108
    install_template(root, busybox_cache)
    deep = Cli(root)
    try:
        name = unique()
        deep.run("create", name, "--template", "busybox", check=True)
        deep.run("start", name, check=True)
        assert deep.run("exec", name, "--", "hostname").stdout == f"{name}\n"
        deep.run("destroy", "--force", name, check=True)
        deep.run("daemon", "stop", check=True)
        deadline = time.monotonic() + 10
        while leftovers(Layout.at(root)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not leftovers(Layout.at(root))
    finally:
        if leftovers(Layout.at(root)):
            force_cleanup(Layout.at(root))
        shutil.rmtree(base, ignore_errors=True)


def test_a_setting_the_host_does_not_honour_is_said(cli, root):
    """limits.io.weight works only under BFQ: kamra saves it and says so, not silently."""
    from kamra.cgroups.limits import bfq_active, block_device_of, io_scheduler

    device = block_device_of(root)
    name = unique()
    created = cli.run("create", name, "--template", "busybox", "-c", "limits.io.weight=500")
    assert created.returncode == 0, created.stderr
    shown = cli.json("config", "show", name)
    if bfq_active(device):
        assert shown["notes"] == [] and "note:" not in created.stderr
    else:
        assert "note: limits.io.weight has no effect" in created.stderr
        assert repr(io_scheduler(device) or "unknown") in created.stderr
        assert len(shown["notes"]) == 1 and "BFQ" in shown["notes"][0]
        assert "note:" in cli.run("set", name, "limits.io.weight=300").stderr
    assert "note:" not in cli.run("set", name, "limits.io.weight=").stderr  # unset: no note
    cli.run("destroy", name, check=True)
