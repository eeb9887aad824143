"""Importing untrusted template archives: every hostile member is refused, nothing lands."""

from __future__ import annotations

import io
import os
import tarfile

import pytest
import zstandard

from kamra.errors import InvalidInput, KamraError, NotFound
from kamra.paths import Layout
from kamra.templates import TemplateInfo, TemplateStore, tree_digest
from kamra.templates.archive import audit_tree
from kamra.templates.tarcheck import symlink_escapes

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="imports run as root")

GOOD_TOML = (b'format = 1\nname = "evil"\n'
             b'digest = "sha256:' + b"0" * 64 + b'"\n'
             b'created = "2024-01-01T00:00:00Z"\nsource = "test"\nos = "test"\n'
             b'init = ["/sbin/init"]\nstop_signal = "SIGTERM"\nsize = 0\n')


@pytest.fixture
def store(tmp_path) -> TemplateStore:
    s = TemplateStore(Layout.at(str(tmp_path / "root")))
    os.makedirs(s.directory)
    return s


def entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", linkname: str = "",
          mode: int = 0o644, pax: dict | None = None) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.linkname = linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    if kind == tarfile.DIRTYPE:
        info.mode = 0o755
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    if pax:
        info.pax_headers = pax
    return info, data


def zstd_tar(path, members, prologue: bool = True) -> str:
    """A .tar.zst with template.toml and rootfs/ first (unless prologue=False)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        head = [entry("template.toml", data=GOOD_TOML), entry("rootfs", tarfile.DIRTYPE)]
        for info, data in (head if prologue else []) + members:
            tar.addfile(info, io.BytesIO(data) if info.type == tarfile.REGTYPE else None)
    with open(path, "wb") as f:
        f.write(zstandard.ZstdCompressor().compress(raw.getvalue()))
    return str(path)


D = tarfile.DIRTYPE
MALICIOUS = {
    "absolute path": ([entry("/etc/kamra-pwned", data=b"x")], "absolute path"),
    "absolute rootfs path": ([entry("/rootfs/x", data=b"x")], "absolute path"),
    "dotdot": ([entry("rootfs/../../kamra-pwned", data=b"x")], "'..' component"),
    "dotdot at end": ([entry("rootfs/..", D)], "'..' component"),
    "dot component": ([entry("rootfs/./x", data=b"x")], "'.' component"),
    "hardlink absolute": ([entry("rootfs/shadow", tarfile.LNKTYPE, linkname="/etc/shadow")],
                          "absolute path"),
    "hardlink dotdot": ([entry("rootfs/shadow", tarfile.LNKTYPE,
                               linkname="rootfs/../../../etc/shadow")], "'..' component"),
    "hardlink outside rootfs": ([entry("rootfs/t", tarfile.LNKTYPE, linkname="template.toml")],
                                "not an earlier regular file"),
    "hardlink to later member": ([entry("rootfs/a", tarfile.LNKTYPE, linkname="rootfs/b"),
                                  entry("rootfs/b", data=b"b")], "not an earlier regular file"),
    "symlink escape": ([entry("rootfs/etc", D),
                        entry("rootfs/etc/evil", tarfile.SYMTYPE, linkname="../../../etc")],
                       "escapes rootfs/"),
    "symlink to template dir": ([entry("rootfs/up", tarfile.SYMTYPE, linkname="..")],
                                "escapes rootfs/"),
    "symlink hidden climb": ([entry("rootfs/a", tarfile.SYMTYPE, linkname="x/../../..")],
                             "escapes rootfs/"),
    "write through symlinked dir": ([entry("rootfs/etc", tarfile.SYMTYPE, linkname="/etc"),
                                     entry("rootfs/etc/cron.d/pwn", data=b"* * * * * root x")],
                                    "goes through the symlink member 'rootfs/etc'"),
    "write through relative symlink": ([entry("rootfs/real", D),
                                        entry("rootfs/l", tarfile.SYMTYPE, linkname="real"),
                                        entry("rootfs/l/f", data=b"x")],
                                       "goes through the symlink"),
    "symlink replaces filled dir": ([entry("rootfs/d/f", data=b"x"),
                                     entry("rootfs/d", tarfile.SYMTYPE, linkname="/etc")],
                                    "lies beneath it"),
    "char device": ([entry("rootfs/dev", D), entry("rootfs/dev/mem", tarfile.CHRTYPE)],
                    "device node"),
    "block device": ([entry("rootfs/sda", tarfile.BLKTYPE)], "device node"),
    "fifo": ([entry("rootfs/fifo", tarfile.FIFOTYPE)], "FIFO"),
    "file with trailing slash": ([entry("rootfs/x/", data=b"")], "ends with '/'"),
    "outside rootfs": ([entry("evil.sh", data=b"x")], "outside rootfs/"),
    "prefix lookalike": ([entry("rootfs-evil/x", data=b"x")], "outside rootfs/"),
    "duplicate member": ([entry("rootfs/x", data=b"1"), entry("rootfs/x", data=b"2")],
                         "appears twice"),
    "overlay xattr": ([entry("rootfs/d", D, pax={"SCHILY.xattr.trusted.overlay.redirect":
                                                 "/etc"})], "overlayfs xattr"),
}


@pytest.mark.parametrize("case", sorted(MALICIOUS))
def test_malicious_member_is_refused(store, tmp_path, case):
    members, reason = MALICIOUS[case]
    path = zstd_tar(tmp_path / "evil.tar.zst", members)
    with pytest.raises(InvalidInput) as err:
        store.import_(path, "evil")
    message = err.value.message
    assert reason in message and "\n" not in message
    assert "archive member" in message
    assert os.listdir(store.directory) == []
    assert not os.path.exists("/etc/kamra-pwned") and not os.path.exists("/kamra-pwned")


@pytest.mark.parametrize("members,reason", [
    ([entry("rootfs", D)], "no template.toml"),
    ([entry("template.toml", data=GOOD_TOML)], "no rootfs/"),
    ([entry("template.toml", tarfile.SYMTYPE, linkname="/etc/passwd"), entry("rootfs", D)],
     "regular file named template.toml"),
    ([entry("template.toml", data=GOOD_TOML), entry("rootfs", tarfile.SYMTYPE, linkname="/")],
     "must be a directory"),
])
def test_archive_shape_is_enforced(store, tmp_path, members, reason):
    path = zstd_tar(tmp_path / "bad.tar.zst", members, prologue=False)
    with pytest.raises(InvalidInput, match=reason):
        store.import_(path, "evil")
    assert os.listdir(store.directory) == []


def _exported(store, tmp_path, mutate=None, digest=None) -> str:
    """Export a small real template; ``mutate`` changes its rootfs after the digest."""
    src = tmp_path / "src"
    (src / "rootfs" / "etc").mkdir(parents=True)
    (src / "rootfs" / "etc" / "hostname").write_text("x\n")
    (src / "rootfs" / "big").write_bytes(os.urandom(3 << 20))
    info = TemplateInfo(name="src", path=str(src), rootfs=str(src / "rootfs"),
                        digest=digest or tree_digest(str(src / "rootfs")), created="now",
                        source="test", os="test", init=["/sbin/init"], stop_signal="SIGTERM")
    info.save()
    if mutate:
        mutate(src / "rootfs")
    from kamra.templates.archive import export_template
    out = str(tmp_path / "t.tar.zst")
    export_template(info, out)
    return out


def test_wrong_digest_is_refused(store, tmp_path):
    path = _exported(store, tmp_path, digest="sha256:" + "ab" * 32)
    with pytest.raises(InvalidInput, match="archive digest mismatch"):
        store.import_(path, "evil")
    assert os.listdir(store.directory) == []


def test_tampered_content_is_refused(store, tmp_path):
    path = _exported(store, tmp_path,
                     mutate=lambda rootfs: (rootfs / "etc" / "hostname").write_text("y\n"))
    with pytest.raises(InvalidInput, match="archive digest mismatch"):
        store.import_(path, "evil")
    assert os.listdir(store.directory) == []


def test_untouched_export_imports(store, tmp_path):
    path = _exported(store, tmp_path)
    info = store.import_(path, "fine")
    assert info.digest == tree_digest(info.rootfs) and info.name == "fine"


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.9, -8])
def test_truncated_archive_is_refused(store, tmp_path, cut):
    path = _exported(store, tmp_path)
    with open(path, "rb") as f:
        data = f.read()
    end = len(data) + cut if cut < 0 else int(len(data) * cut)
    with open(path, "wb") as f:
        f.write(data[:end])
    with pytest.raises(InvalidInput) as err:
        store.import_(path, "evil")
    assert "\n" not in err.value.message
    assert os.listdir(store.directory) == []


@pytest.mark.parametrize("content,reason", [
    (b"", "empty"),
    (b"plain text, not an archive\n" * 10, "not a zstd-compressed archive"),
    (b"\x28\xb5\x2f\xfd" + b"\x00garbage" * 50, "corrupt"),
    (zstandard.ZstdCompressor().compress(b"not a tar" * 200), "not a valid tar archive"),
])
def test_non_archives_are_refused(store, tmp_path, content, reason):
    path = tmp_path / "junk.tar.zst"
    path.write_bytes(content)
    with pytest.raises(InvalidInput, match=reason):
        store.import_(str(path), "junk")
    assert os.listdir(store.directory) == []


def test_uncompressed_tar_is_refused(store, tmp_path):
    raw = tmp_path / "plain.tar"
    with tarfile.open(raw, "w") as tar:
        tar.addfile(*_regular("template.toml", GOOD_TOML))
    with pytest.raises(InvalidInput, match="not a zstd-compressed archive"):
        store.import_(str(raw), "plain")


def _regular(name: str, data: bytes):
    info, data = entry(name, data=data)
    return info, io.BytesIO(data)


def test_missing_file_and_directory(store, tmp_path):
    with pytest.raises(NotFound, match="not found"):
        store.import_(str(tmp_path / "nope.tar.zst"), "x")
    with pytest.raises(InvalidInput, match="is a directory"):
        store.import_(str(tmp_path), "x")


def test_size_cap(store, tmp_path, monkeypatch):
    import kamra.templates.tarcheck as tarcheck
    monkeypatch.setattr(tarcheck, "MAX_TOTAL", 1000)
    monkeypatch.setattr(tarcheck, "MAX_MEMBERS", 10)
    path = zstd_tar(tmp_path / "big.tar.zst", [entry("rootfs/a", data=b"x" * 600),
                                               entry("rootfs/b", data=b"x" * 600)])
    with pytest.raises(InvalidInput, match="more than"):
        store.import_(path, "big")
    many = zstd_tar(tmp_path / "many.tar.zst", [entry(f"rootfs/f{i}") for i in range(20)])
    with pytest.raises(InvalidInput, match="more than 10 members"):
        store.import_(many, "many")
    assert os.listdir(store.directory) == []


def test_symlink_escape_rule():
    assert not symlink_escapes(["etc", "localtime"], "/usr/share/zoneinfo/UTC")
    assert not symlink_escapes(["etc", "x"], "../usr/bin/su")
    assert not symlink_escapes(["a", "b", "c"], "../../x")
    assert symlink_escapes(["a", "b", "c"], "../../../x")
    assert symlink_escapes(["x"], "..")
    assert not symlink_escapes(["x"], "./y/./../z")
    assert symlink_escapes(["x"], "y/../../z")


def test_audit_catches_what_tar_wrote(tmp_path):
    top = tmp_path / "t"
    (top / "rootfs").mkdir(parents=True)
    (top / "template.toml").write_bytes(GOOD_TOML)
    audit_tree(str(top))
    os.mkfifo(top / "rootfs" / "fifo")
    with pytest.raises(InvalidInput, match="special file"):
        audit_tree(str(top))
    os.unlink(top / "rootfs" / "fifo")
    os.symlink("../../..", top / "rootfs" / "up")
    with pytest.raises(InvalidInput, match="escaping"):
        audit_tree(str(top))
    os.unlink(top / "rootfs" / "up")
    (top / "extra").write_text("x")
    with pytest.raises(InvalidInput, match="unexpected entries: extra"):
        audit_tree(str(top))


def test_export_to_missing_directory(store, tmp_path):
    store.build("busybox")
    with pytest.raises(KamraError, match="does not exist"):
        store.export("busybox", str(tmp_path / "no" / "dir" / "x.tar.zst"))
