"""CRIU as `make setup` installs it (scripts/install_criu.py), and that script's pure logic.

The first test checks the installed binary itself: no network needed (the session runs in
a private network namespace with its loopback up, which is all `criu check` needs).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "scripts", "install_criu.py")


def _load():
    spec = importlib.util.spec_from_file_location("install_criu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


ic = _load()


def _installed_criu() -> str:
    if os.path.exists(ic.INSTALLED):
        return ic.INSTALLED
    found = shutil.which("criu", path=ic.SEARCH_PATH)
    if not found:
        pytest.fail("no criu installed: run `make setup`")
    return found


def test_installed_criu_is_new_enough_and_passes_check():
    criu = _installed_criu()
    version = subprocess.run([criu, "--version"], capture_output=True, text=True, check=True)
    parsed = ic.parse_criu_version(version.stdout)
    assert parsed is not None, version.stdout
    assert ic.compare_versions(parsed, "4.2") >= 0, f"{criu} is CRIU {parsed}, need >= 4.2"
    check = subprocess.run([criu, "check"], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, f"{criu} check:\n{check.stdout}{check.stderr}"
    assert "Looks good" in check.stdout + check.stderr


@pytest.mark.parametrize("a, b, expected", [
    ("4.2", "4.2", 0),
    ("4.2.1", "4.2", 1),
    ("4.1.1", "4.2", -1),
    ("3.17.1-2+deb12u2", "4.2", -1),
    ("4.10", "4.2", 1),            # numerically, not as text
    ("4.2~rc1", "4.2", -1),        # a release candidate comes before the release
    ("4.2-1", "4.2", 1),           # any revision sorts after none
    ("4.2.1-1", "4.2.1-1~bpo12+1", 1),  # the backport is older than what it backports
    ("1:3.0", "4.2", 1),           # the epoch wins
    ("4.2.1-1", "4.2.1-1", 0),
    ("4.2a", "4.2", 1),
    ("4.2.0", "4.2", 1),
])
def test_debian_version_order(a, b, expected):
    assert ic.compare_versions(a, b) == expected
    assert ic.compare_versions(b, a) == -expected


def test_new_enough():
    assert ic.new_enough("4.2.1")
    assert ic.new_enough("4.2")
    assert not ic.new_enough("4.1.1")
    assert not ic.new_enough("3.17.1-2+deb12u2")
    assert not ic.new_enough(None)
    assert not ic.new_enough("")


def test_parse_criu_version():
    assert ic.parse_criu_version("Version: 4.2.1\n") == "4.2.1"
    assert ic.parse_criu_version("Version: 4.2\nGitID: v4.2-12-gabcdef\n") == "4.2"
    assert ic.parse_criu_version("criu: command not found") is None


POLICY = """\
criu:
  Installed: (none)
  Candidate: 3.17.1-2+deb12u2
  Version table:
     3.17.1-2+deb12u2 500
        500 http://mirror.invalid/debian bookworm/main amd64 Packages
"""


def test_parse_policy_candidate():
    assert ic.parse_policy_candidate(POLICY) == "3.17.1-2+deb12u2"
    assert not ic.new_enough(ic.parse_policy_candidate(POLICY))
    assert ic.parse_policy_candidate("criu:\n  Installed: (none)\n  Candidate: (none)\n") is None
    assert ic.parse_policy_candidate("") is None


SHOWSRC = """\
Package: criu
Binary: criu, libcompel1, libcompel-dev, libcriu2, libcriu-dev, python3-pycriu
Version: 4.2.1-1
Directory: pool/main/c/criu
Files:
 680c50418f796b55464947dc117a7cf4 2901 criu_4.2.1-1.dsc
 15af4ed4460591e31fc5be6cab994ac9 1038700 criu_4.2.1.orig.tar.xz
 fa44a793db247d17dce76d0cf84033b9 12964 criu_4.2.1-1.debian.tar.xz
Checksums-Sha256:
 9286c86e5adfd70b97a68e117c2905d91bf9e31132296e7ebf57066189a2f0b0 2901 criu_4.2.1-1.dsc
 29ec0ee09e296479fe7048c80980e8ef1d0684d0b0204c2b101dfea19f6725b9 1038700 criu_4.2.1.orig.tar.xz
 e9f797a19f0e7dd66d480bea47f2ef261b3d9aee6bab5059882c0074b1b84d2d 12964 criu_4.2.1-1.debian.tar.xz
Package-List:
 criu deb admin optional arch=amd64,arm64,ppc64el,riscv64,s390x

Package: criu
Version: 4.1.1-1
Directory: pool/main/c/criu
Checksums-Sha256:
 12206f74ab852907156db8fdf1fb2a40ebbc897d28c133a2cbe804fab13f8b62 2806 criu_4.1.1-1.dsc
 f80a66cb3726bb2116266d4759ce3bcbfab7abdb6b6d430bf20dd41911717afe 1021136 criu_4.1.1.orig.tar.xz
 103855d69544c3417abdb5b309c1773db98af2293c4dc48bba39e244b85c778e 12368 criu_4.1.1-1.debian.tar.xz

Package: criu-other
Version: 9.9-1
Directory: pool/main/c/criu-other
Checksums-Sha256:
 aaaa 10 criu-other_9.9.orig.tar.xz
"""

MADISON = """\
      criu |    4.2.1-1 | http://mirror.invalid/debian sid/main Sources
      criu |    4.1.1-1 | http://mirror.invalid/debian trixie/main Sources
      criu | 3.17.1-2+deb12u2 | http://mirror.invalid/debian bookworm/main amd64 Packages
"""


def test_parse_showsrc_and_pick_the_newest():
    releases = ic.parse_showsrc(SHOWSRC)
    assert [(r.version, r.filename, r.size) for r in releases] == [
        ("4.2.1-1", "criu_4.2.1.orig.tar.xz", 1038700),
        ("4.1.1-1", "criu_4.1.1.orig.tar.xz", 1021136),
    ]
    best = ic.newest_release(list(reversed(releases)))
    assert best.version == "4.2.1-1" and best.upstream == "4.2.1"
    assert best.sha256 == "29ec0ee09e296479fe7048c80980e8ef1d0684d0b0204c2b101dfea19f6725b9"
    assert (best.url("http://mirror.invalid/debian/")
            == "http://mirror.invalid/debian/pool/main/c/criu/criu_4.2.1.orig.tar.xz")
    # Only 4.1.1 on offer: nothing new enough.
    assert ic.newest_release([r for r in releases if r.version.startswith("4.1")]) is None
    assert ic.parse_madison_suites(MADISON) == {"4.2.1-1": "sid", "4.1.1-1": "trixie"}


def _apt_dir(tmp_path, files: dict[str, str]) -> str:
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    for name, text in files.items():
        (apt / name).write_text(text)
    return str(apt)


def test_mirror_and_keyring_come_from_the_host_sources(tmp_path):
    apt = _apt_dir(tmp_path, {
        "sources.list": "deb [arch=amd64] https://vendor.invalid/apt vendor-bookworm main\n",
        "sources.list.d/debian.sources": (
            "Types: deb\n"
            "# a comment inside the stanza\n"
            "URIs: http://mirror.invalid/debian\n"
            "Suites: bookworm bookworm-updates\n"
            "Components: main\n"
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
            "\n"
            "Types: deb\n"
            "URIs: http://mirror.invalid/debian-security\n"
            "Suites: bookworm-security\n"
            "Components: main\n"
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"),
    })
    mirror, keyring = ic.host_mirror(apt, "bookworm")
    assert mirror == "http://mirror.invalid/debian"
    assert keyring == "/usr/share/keyrings/debian-archive-keyring.gpg"
    listing = ic.private_sources_list(mirror, ["sid", "bookworm-backports"], keyring)
    assert listing == (
        "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
        "http://mirror.invalid/debian sid main\n"
        "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
        "http://mirror.invalid/debian bookworm-backports main\n")


def test_one_line_sources_and_no_keyring(tmp_path):
    apt = _apt_dir(tmp_path, {
        "sources.list": ("deb http://mirror.invalid/debian-security bookworm-security main\n"
                         "deb [signed-by=/etc/apt/keyrings/local.gpg] http://local.invalid/debian/"
                         " bookworm main\n"),
    })
    assert ic.host_mirror(apt, "bookworm") == ("http://local.invalid/debian/",
                                               "/etc/apt/keyrings/local.gpg")
    apt2 = _apt_dir(tmp_path / "two", {"sources.list": "deb http://m.invalid/debian bookworm main\n"})
    mirror, keyring = ic.host_mirror(apt2, "bookworm")
    assert (mirror, keyring) == ("http://m.invalid/debian", None)
    assert ic.private_sources_list(mirror, ["sid"], keyring) == (
        "deb-src http://m.invalid/debian sid main\n")


def test_no_debian_source_is_a_clear_error(tmp_path):
    apt = _apt_dir(tmp_path, {"sources.list": "# nothing\n"})
    with pytest.raises(ic.SetupError, match="no Debian mirror"):
        ic.host_mirror(apt, "bookworm")


def test_check_verdict_is_picked_out_of_warnings():
    output = ("Warn  (criu/kerndat.c:1290): Can't keep kdat cache on non-tempfs\n"
              "Looks good.\n")
    assert ic.first_line(output) == "Looks good."
    assert ic.first_line("Error: something\n") == "Error: something"
    assert ic.first_line("") == ""


def test_our_criu_keeps_its_kernel_probes_in_kamras_tmpfs_dir():
    """The CRIU setup installs caches its kernel probes where kamra keeps them safe (the
    two agree on the path), and really writes the cache there on a run."""
    from kamra.checkpoint import kdat
    from kamra.checkpoint.criu import Criu

    assert ic.KDAT_DIR == kdat.KDAT_DIR
    if not os.path.exists(ic.INSTALLED):
        pytest.skip("no CRIU built by setup here (a distribution's is used)")
    assert ic.caches_kdat(ic.INSTALLED), f"{ic.INSTALLED} was built without RUNDIR"
    Criu(ic.INSTALLED)  # makes the directory safe, as before every run
    subprocess.run([ic.INSTALLED, "check"], capture_output=True, timeout=120, check=False)
    cache = os.path.join(kdat.KDAT_DIR, "criu.kdat")
    assert os.path.isfile(cache) and os.stat(cache).st_uid == 0


def test_the_kdat_dir_is_taken_back_from_anyone_else(tmp_path):
    """/dev/shm is everyone's: a directory another user made, a symlink or a file under
    the cache's name is moved away and the directory made again, root's and 0700."""
    import stat

    from kamra.checkpoint import kdat

    path = str(tmp_path / "kamra-criu")
    os.mkdir(path, 0o777)
    os.chown(path, 65534, 65534)
    with open(os.path.join(path, "criu.kdat"), "w") as f:
        f.write("forged")
    assert kdat.ensure_dir(path)
    st = os.lstat(path)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o700
    assert os.listdir(path) == []
    os.rmdir(path)
    os.symlink(str(tmp_path), path)
    assert kdat.ensure_dir(path) and not os.path.islink(path)
    os.rmdir(path)
    with open(path, "w") as f:
        f.write("x")
    assert kdat.ensure_dir(path) and os.path.isdir(path)
    assert sorted(os.listdir(tmp_path)) == ["kamra-criu"]  # nothing left aside
