"""Templates: busybox and Debian builds, digests, the store, export/import round trips."""

from __future__ import annotations

import os
import stat
import struct
import subprocess
import time

import pytest

from kamra.errors import AlreadyExists, InvalidInput, KamraError, NotFound, ResourceBusy
from kamra.paths import Layout
from kamra.templates import BUILDERS, BuildResult, TemplateInfo, TemplateStore, tree_digest
from kamra.templates.aptsources import find_mirror, read_sources
from kamra.templates.busybox import check_host_busybox
from kamra.templates.debprogress import DebootstrapProgress

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="templates are built as root")
pytestmark = needs_root


@pytest.fixture
def store(tmp_path) -> TemplateStore:
    return TemplateStore(Layout.at(str(tmp_path / "root")))


def scratch_left(store: TemplateStore) -> list[str]:
    return [e for e in os.listdir(store.directory) if e.startswith(".")]


# ---------------------------------------------------------------- busybox

def test_busybox_layout(store):
    events = []
    info = store.build("busybox", progress=events.append)
    rootfs = info.rootfs
    assert info.name == "busybox" and info.path == store.layout.template_dir("busybox")
    assert info.init == ["/sbin/init"] and info.stop_signal == "SIGUSR2"
    assert info.os.startswith("busybox 1.") and info.source == info.os
    assert info.digest.startswith("sha256:") and info.digest == tree_digest(rootfs)
    assert info.size > 500_000

    modes = {"bin": 0o755, "sbin": 0o755, "usr/bin": 0o755, "usr/sbin": 0o755, "etc": 0o755,
             "dev": 0o755, "proc": 0o555, "sys": 0o555, "run": 0o755, "tmp": 0o1777,
             "root": 0o700, "home": 0o755, "var/log": 0o755, "var/tmp": 0o1777}
    for rel, mode in modes.items():
        st = os.lstat(os.path.join(rootfs, rel))
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == mode, rel
    assert os.listdir(os.path.join(rootfs, "dev")) == []  # kamra builds /dev at start
    assert os.access(os.path.join(rootfs, "bin/busybox"), os.X_OK)
    for applet in ("bin/sh", "sbin/init", "usr/bin/env"):
        link = os.path.join(rootfs, applet)
        assert os.path.islink(link)
        assert os.path.realpath(link) == os.path.join(rootfs, "bin/busybox")

    def read(rel: str) -> str:
        with open(os.path.join(rootfs, rel)) as f:
            return f.read()

    assert read("etc/passwd").startswith("root:x:0:0:root:/root:/bin/sh\n")
    assert "nobody:x:65534:" in read("etc/passwd")
    assert "tty:x:5:" in read("etc/group") and "nogroup:x:65534:" in read("etc/group")
    assert read("etc/shadow").startswith("root:*:")
    assert stat.S_IMODE(os.stat(os.path.join(rootfs, "etc/shadow")).st_mode) == 0o600
    assert "127.0.0.1" in read("etc/hosts") and "localhost" in read("etc/hosts")
    assert "ID=busybox" in read("etc/os-release")
    assert "VERSION_ID=" + info.os.split()[1] in read("etc/os-release")
    assert "PATH=" in read("etc/profile") and "PS1=" in read("etc/profile")
    inittab = read("etc/inittab")
    assert "::sysinit:/etc/init.d/rcS" in inittab and "console::respawn:-/bin/sh" in inittab
    assert "::shutdown:/bin/sync" in inittab and "ctrlaltdel" not in inittab
    assert os.access(os.path.join(rootfs, "etc/init.d/rcS"), os.X_OK)

    # rcS sets the hostname: run it in a UTS namespace of its own, never the host's.
    host_name = os.uname().nodename
    out = subprocess.run(["unshare", "--uts", "chroot", rootfs, "/bin/sh", "-c",
                          "echo ok; /etc/init.d/rcS && hostname"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout == "ok\nbusybox\n", out.stderr
    assert os.uname().nodename == host_name

    phases = [e["phase"] for e in events]
    assert "build" in phases and phases[-1] == "digest"
    assert scratch_left(store) == []


def test_busybox_build_is_reproducible(store):
    a = store.build("busybox")
    b = store.build("busybox", name="busybox2")
    assert a.digest == b.digest and a.size == b.size


def test_busybox_refuses_missing_or_dynamic_binary(tmp_path):
    with pytest.raises(InvalidInput, match="busybox-static is not installed: apt-get install"):
        check_host_busybox(str(tmp_path / "no-busybox"))
    with pytest.raises(InvalidInput, match="dynamically linked.*busybox-static"):
        check_host_busybox("/bin/true")


# ---------------------------------------------------------------- digest

def test_digest_is_stable_and_covers_content_mode_owner_xattrs(tmp_path):
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    f = tree / "d" / "file"
    f.write_bytes(b"hello")
    os.symlink("d/file", tree / "link")
    first = tree_digest(str(tree))
    assert first.startswith("sha256:") and len(first) == 7 + 64
    assert tree_digest(str(tree)) == first

    os.utime(f, (1, 1))  # times are not content
    assert tree_digest(str(tree)) == first

    def changed(mutate, undo) -> None:
        mutate()
        assert tree_digest(str(tree)) != first
        undo()
        assert tree_digest(str(tree)) == first

    changed(lambda: f.write_bytes(b"hellO"), lambda: f.write_bytes(b"hello"))
    changed(lambda: f.write_bytes(b"hello!"), lambda: f.write_bytes(b"hello"))
    changed(lambda: os.chmod(f, 0o4755), lambda: os.chmod(f, 0o644))
    changed(lambda: os.chown(f, 1234, 0), lambda: os.chown(f, 0, 0))
    changed(lambda: os.chown(f, 0, 4321), lambda: os.chown(f, 0, 0))
    changed(lambda: os.setxattr(f, "user.test", b"v"), lambda: os.removexattr(f, "user.test"))
    changed(lambda: os.rename(f, tree / "d" / "other"), lambda: os.rename(tree / "d" / "other", f))

    def retarget(target: str) -> None:
        os.unlink(tree / "link")
        os.symlink(target, tree / "link")

    changed(lambda: retarget("d/other"), lambda: retarget("d/file"))
    changed(lambda: (tree / "d" / "new").mkdir(), lambda: (tree / "d" / "new").rmdir())


def test_digest_is_fast_enough(tmp_path):
    tree = tmp_path / "big"
    tree.mkdir()
    block = os.urandom(1 << 20)
    with open(tree / "blob", "wb") as f:
        for _ in range(64):
            f.write(block)
    for i in range(2000):
        (tree / f"small{i}").write_bytes(b"x" * i)
    start = time.monotonic()
    tree_digest(str(tree))
    assert time.monotonic() - start < 5


# ---------------------------------------------------------------- store

def test_list_get_exists_and_not_found(store):
    assert store.list() == []
    with pytest.raises(NotFound, match="template 'busybox' not found.*kamra template build"):
        store.get("busybox")
    store.build("busybox", name="zeta")
    store.build("busybox", name="alpha")
    os.mkdir(os.path.join(store.directory, ".build-leftover"))
    assert [i.name for i in store.list()] == ["alpha", "zeta"]
    assert store.exists("alpha") and not store.exists("beta")
    with pytest.raises(NotFound, match=r"available: alpha, zeta"):
        store.get("beta")
    assert store.get("alpha").to_json()["name"] == "alpha"
    assert set(store.get("alpha").to_json()) == {"name", "path", "rootfs", "digest", "created",
                                                 "source", "os", "init", "stop_signal", "size"}
    assert store.cleanup_scratch() == [".build-leftover"]


def test_already_exists_and_invalid_names(store):
    info = store.build("busybox")
    with pytest.raises(AlreadyExists, match=rf"template 'busybox' already exists \({info.digest}\)"
                                            r": remove it first or choose --name"):
        store.build("busybox")
    for bad in ("Busybox", "../x", "a/b", "", "-x", "x" * 64, ".hidden"):
        with pytest.raises(InvalidInput):
            store.build("busybox", name=bad)
        with pytest.raises(InvalidInput):
            store.get(bad)
    with pytest.raises(InvalidInput, match="unknown template kind 'centos': use one of busybox, "
                                           "debian"):
        store.build("centos")
    assert scratch_left(store) == []


def test_remove_refuses_when_used_then_removes(store):
    store.build("busybox")
    with pytest.raises(ResourceBusy, match="template 'busybox' is used by containers: c1, c2"):
        store.remove("busybox", ["c2", "c1"])
    assert store.exists("busybox")
    store.remove("busybox", [])
    assert not store.exists("busybox") and os.listdir(store.directory) == []
    with pytest.raises(NotFound):
        store.remove("busybox", [])


def test_failed_build_leaves_nothing(store, monkeypatch):
    def broken(rootfs, options, progress):
        os.mkdir(os.path.join(rootfs, "half"))
        raise KamraError("builder broke")

    monkeypatch.setitem(BUILDERS, "broken", broken)
    with pytest.raises(KamraError, match="builder broke"):
        store.build("broken")
    assert os.listdir(store.directory) == []


# vfs_cap_data revision 2, effective, permitted = cap_net_raw (13): what ping carries.
_CAP_NET_RAW = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)
# A POSIX ACL (version 2): user::rw- user:1234:r-- group::r-- mask::r-- other::---
_ACL_USER_1234 = struct.pack("<I", 2) + b"".join(
    struct.pack("<HHI", tag, perm, ident) for tag, perm, ident in
    [(0x01, 6, 0xFFFFFFFF), (0x02, 4, 1234), (0x04, 4, 0xFFFFFFFF), (0x10, 4, 0xFFFFFFFF),
     (0x20, 0, 0xFFFFFFFF)])


def _custom_builder(rootfs, options, progress):
    """A rootfs with everything a tar round trip can lose."""
    for rel in ("usr/bin", "etc", "home/user", "tmp"):
        os.makedirs(os.path.join(rootfs, rel), exist_ok=True)
    os.chmod(os.path.join(rootfs, "tmp"), 0o1777)
    su = os.path.join(rootfs, "usr/bin/su")
    with open(su, "wb") as f:
        f.write(b"\x7fELF fake su")
    os.chmod(su, 0o4755)
    owned = os.path.join(rootfs, "home/user/notes")
    with open(owned, "w") as f:
        f.write("mine\n")
    os.chown(owned, 1234, 5678)
    os.chown(os.path.join(rootfs, "home/user"), 1234, 5678)
    os.setxattr(owned, "user.test", b"\x00binary\xffvalue")
    os.link(owned, os.path.join(rootfs, "home/user/notes.hardlink"))
    os.setxattr(su, "security.capability", _CAP_NET_RAW)
    os.setxattr(owned, "system.posix_acl_access", _ACL_USER_1234)
    os.symlink("/usr/share/zoneinfo/UTC", os.path.join(rootfs, "etc/localtime"))  # absolute: ok
    os.symlink("../usr/bin/su", os.path.join(rootfs, "etc/su-link"))
    with open(os.path.join(rootfs, "sparse"), "wb") as f:
        f.truncate(64 << 20)
        f.seek(32 << 20)
        f.write(b"middle")
    return BuildResult(source="test", os="Test OS", init=["/bin/init", "--x"],
                       stop_signal="SIGRTMIN+3")


def test_export_import_round_trip_keeps_everything(store, tmp_path, monkeypatch):
    monkeypatch.setitem(BUILDERS, "custom", _custom_builder)
    info = store.build("custom", name="orig")
    archive = str(tmp_path / "orig.tar.zst")
    events = []
    store.export("orig", archive, progress=events.append)
    assert os.path.isfile(archive) and events and events[-1]["phase"] == "export"
    assert [e for e in os.listdir(tmp_path) if e.startswith(".")] == []  # temp file renamed

    events.clear()
    copy = store.import_(archive, "copy", progress=events.append)
    assert copy.name == "copy" and copy.digest == info.digest and copy.size == info.size
    assert TemplateInfo.load(copy.path).name == "copy"
    assert (copy.init, copy.stop_signal, copy.os) == (["/bin/init", "--x"], "SIGRTMIN+3",
                                                     "Test OS")
    assert tree_digest(copy.rootfs) == info.digest
    su = os.stat(os.path.join(copy.rootfs, "usr/bin/su"))
    assert stat.S_IMODE(su.st_mode) == 0o4755 and su.st_uid == 0
    notes = os.path.join(copy.rootfs, "home/user/notes")
    assert (os.stat(notes).st_uid, os.stat(notes).st_gid) == (1234, 5678)
    assert os.getxattr(notes, "user.test") == b"\x00binary\xffvalue"
    assert os.getxattr(notes, "system.posix_acl_access") == _ACL_USER_1234
    assert os.getxattr(os.path.join(copy.rootfs, "usr/bin/su"),
                       "security.capability") == _CAP_NET_RAW
    assert os.stat(notes).st_ino == os.stat(notes + ".hardlink").st_ino
    assert os.readlink(os.path.join(copy.rootfs, "etc/localtime")) == "/usr/share/zoneinfo/UTC"
    assert stat.S_IMODE(os.stat(os.path.join(copy.rootfs, "tmp")).st_mode) == 0o1777
    sparse = os.stat(os.path.join(copy.rootfs, "sparse"))
    assert sparse.st_size == 64 << 20 and sparse.st_blocks * 512 < 1 << 20  # holes kept
    assert {"verify", "untar", "digest"} <= {e["phase"] for e in events}
    assert scratch_left(store) == []

    # The same template exports to the same bytes.
    again = str(tmp_path / "again.tar.zst")
    store.export("orig", again)
    with open(archive, "rb") as a, open(again, "rb") as b:
        assert a.read() == b.read()

    with pytest.raises(AlreadyExists):
        store.import_(archive, "copy")
    with pytest.raises(NotFound, match="not found"):
        store.import_(str(tmp_path / "missing.tar.zst"), "other")
    with pytest.raises(InvalidInput):
        store.import_(archive, "Bad Name")
    assert scratch_left(store) == []


# ---------------------------------------------------------------- debian helpers

def _write(path, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def test_mirror_from_apt_sources(tmp_path):
    apt = str(tmp_path / "apt")
    _write(f"{apt}/sources.list", "# comment\n"
           "deb [arch=amd64 signed-by=/k.gpg] http://security.example/debian-security "
           "bookworm-security main\n"
           "deb-src http://src.example/debian bookworm main\n")
    _write(f"{apt}/sources.list.d/a.sources",
           "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nEnabled: no\n\n"
           "# a comment\n"
           "Types: deb deb-src\nURIs: http://mirror.example/debian\n"
           "  http://second.example/debian\nSuites: bookworm bookworm-updates\n"
           "Components: main\n")
    _write(f"{apt}/sources.list.d/z.list.disabled", "deb http://ignored.example/ bookworm main\n")
    assert find_mirror("bookworm", apt) == "http://mirror.example/debian"
    # No source names trixie: fall back to the first plain release suite.
    assert find_mirror("trixie", apt) == "http://mirror.example/debian"
    assert len(read_sources(apt)) == 3

    only_security = str(tmp_path / "apt2")
    _write(f"{only_security}/sources.list",
           "deb http://security.example/debian-security bookworm-security main\n")
    with pytest.raises(InvalidInput, match="no Debian mirror found"):
        find_mirror("bookworm", only_security)


def test_mirror_from_one_line_sources(tmp_path):
    apt = str(tmp_path / "apt")
    _write(f"{apt}/sources.list", "deb [ trusted=yes ] http://one.example/debian bookworm main\n")
    assert find_mirror("bookworm", apt) == "http://one.example/debian"


def test_debootstrap_progress_phases():
    events = []
    parser = DebootstrapProgress(events.append)
    lines = ["I: Retrieving InRelease ", "I: Checking Release signature",
             "I: Retrieving Packages ", "I: Validating Packages ",
             "I: Resolving dependencies of required packages...",
             "I: Checking component main on http://mirror.example/debian...",
             "I: Retrieving adduser 3.134", "I: Validating adduser 3.134",
             "I: Retrieving apt 2.6.1", "I: Validating apt 2.6.1",
             "I: Chosen extractor for .deb packages: dpkg-deb", "I: Extracting adduser...",
             "I: Installing core packages...", "I: Unpacking required packages...",
             "I: Unpacking adduser...", "I: Configuring required packages...",
             "I: Configuring adduser...", "I: Unpacking the base system...",
             "I: Unpacking apt...", "I: Configuring the base system...",
             "I: Configuring apt...", "I: Base system installed successfully."]
    for line in lines:
        parser.feed(line + "\n")
    phases = []
    for e in events:
        if not phases or phases[-1] != e["phase"]:
            phases.append(e["phase"])
    assert phases == ["prepare", "download", "extract", "unpack", "configure", "unpack",
                      "configure"]
    downloads = [e for e in events if e["phase"] == "download"]
    assert downloads[-1]["current"] == 2 and downloads[-1]["total"] is None
    last = events[-1]
    assert (last["phase"], last["current"], last["total"]) == ("configure", 2, 2)
    assert all(e["current"] <= (e["total"] or e["current"]) for e in events)
    parser.feed("E: Couldn't download packages: foo\n")
    assert "Couldn't download packages: foo" in parser.summary()


def test_debian_build_failure_leaves_nothing(store):
    # A file: mirror that does not exist fails at once, with no network involved.
    with pytest.raises(KamraError, match="debootstrap failed") as err:
        store.build("debian", mirror="file:///nonexistent-kamra-mirror")
    assert "\n" not in err.value.message
    assert os.listdir(store.directory) == []
    with pytest.raises(InvalidInput, match="invalid Debian suite"):
        store.build("debian", suite="../etc")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("KAMRA_TEST_DEBIAN") != "1",
                    reason="downloads Debian (minutes): set KAMRA_TEST_DEBIAN=1")
def test_debian_build(debian_build):
    info, events, elapsed, store = debian_build
    rootfs = info.rootfs
    assert (info.name, info.os, info.source) == ("debian", "Debian bookworm", "debian bookworm")
    assert info.init == ["/sbin/init"] and info.stop_signal == "SIGRTMIN+3"
    assert os.path.realpath(os.path.join(rootfs, "sbin/init")).endswith("/systemd")
    for tool in ("usr/bin/ps", "usr/sbin/ip", "usr/bin/apt"):
        assert os.path.exists(os.path.join(rootfs, tool)), tool
    assert os.listdir(os.path.join(rootfs, "dev")) == []
    archives = os.path.join(rootfs, "var/cache/apt/archives")
    assert not [f for f in os.listdir(archives) if f.endswith(".deb")]
    with open(os.path.join(rootfs, "etc/hostname")) as f:
        assert f.read() == "debian\n"
    assert os.path.getsize(os.path.join(rootfs, "etc/machine-id")) == 0
    assert tree_digest(rootfs) == info.digest
    order = []
    for e in events:
        if e["phase"] not in order:
            order.append(e["phase"])
    assert order == ["prepare", "download", "extract", "unpack", "configure", "finish", "digest"]
    out = subprocess.run(["chroot", rootfs, "/usr/bin/dpkg-query", "-W", "systemd-sysv"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "systemd-sysv" in out.stdout
    print(f"\ndebian template: {elapsed:.0f}s, {info.size / 1e6:.0f} MB, {info.digest}")
    assert scratch_left(store) == []


def test_remove_never_reaches_into_a_mount(store):
    info = store.build("busybox")
    target = os.path.join(info.rootfs, "proc")
    subprocess.run(["mount", "-t", "tmpfs", "kamra-test", target], check=True)
    try:
        with open(os.path.join(target, "precious"), "w") as f:
            f.write("x")
        with pytest.raises(ResourceBusy, match="is mounted inside it"):
            store.remove("busybox", [])
        assert store.exists("busybox")
        assert os.path.exists(os.path.join(target, "precious"))
    finally:
        subprocess.run(["umount", target], check=True)
    store.remove("busybox", [])
    assert os.listdir(store.directory) == []
