#!/usr/bin/python3
"""Install CRIU >= 4.2 and prove it with ``criu check``. Run by scripts/setup.sh as root.

Seen on the development machines (kernel 6.18): Debian 12's CRIU 3.17 fails ``criu check``
("Unexpected rt vDSO area bounds"); CRIU 4.1.1 passes it but cannot dump a process holding
a TCP or UDP socket on kernels from 6.16 on; CRIU 4.2.1 works. So:

1. a criu that is already installed (/usr/local/sbin/criu first, then PATH), is >= 4.2 and
   passes ``criu check``: nothing to do (the path every re-run takes, in well under a second);
2. a build cached by an earlier run (/var/cache/kamra/criu/<version>/criu, from this or
   another checkout) that runs and passes: copied to /usr/local/sbin/criu, no network;
3. the distribution's criu when its candidate version is >= 4.2 and it passes ``criu check``;
4. otherwise CRIU is built from source: the ``orig`` tarball of Debian's newest criu source
   package is the upstream source release. It is found with a *private* apt configuration
   (its own sources list with ``deb-src`` lines for the host's mirror, its own lists and
   cache directories), because an ``apt-get update`` restricted to one extra source would
   delete the host's other package lists. The tarball is fetched by apt's own downloader
   (the host's proxy and auth settings apply) and checked against the SHA256 from the
   signed index, built with Debian 12's build dependencies (``make criu``: the binary only,
   no docs or Python bindings), installed as /usr/local/sbin/criu and cached. Its RUNDIR
   is KDAT_DIR, a tmpfs on every host, so CRIU keeps its kernel probes across runs (see
   src/kamra/checkpoint/kdat.py); a build of ours made without it is made again.

The mirror is the host's (read from /etc/apt by kamra.templates.aptsources); no host name
is written here. Any failure ends setup with the failing command's output.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

MINIMUM = "4.2"
INSTALLED = "/usr/local/sbin/criu"
# CRIU's RUNDIR, where it caches its kernel probes: a tmpfs it is on every host, kept
# safe by kamra before each run (src/kamra/checkpoint/kdat.py, KDAT_DIR: the same path).
KDAT_DIR = "/dev/shm/kamra-criu"
SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CACHE = "/var/cache/kamra/criu"
APT_DIR = "/etc/apt"
# Debian suites searched for the source package, newest first. Backports carry nothing
# newer than unstable; they are there for mirrors that do not carry sid.
SOURCE_SUITES = ("sid", "{codename}-backports")
# What Debian's criu package builds with, minus docs (asciidoc, xmlto) and the Python
# bindings (dh-python, python3-*): the criu binary needs no more (checked on Debian 12).
BUILD_DEPENDS = ("gcc", "make", "pkg-config", "protobuf-compiler", "protobuf-c-compiler",
                 "libprotobuf-dev", "libprotobuf-c-dev", "libnl-3-dev", "libnet1-dev",
                 "libcap-dev", "libbsd-dev", "libnftables-dev", "libgnutls28-dev", "uuid-dev",
                 "xz-utils")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SetupError(Exception):
    pass


# ---------------------------------------------------------------- pure logic (unit tested)

def _split_version(version: str) -> tuple[int, str, str]:
    """[epoch:]upstream[-revision]: the epoch ends at the first colon, the revision starts
    after the last hyphen."""
    version = version.strip()
    epoch, rest = version.split(":", 1) if ":" in version else ("0", version)
    upstream, revision = rest.rsplit("-", 1) if "-" in rest else (rest, "")
    return int(epoch or 0), upstream, revision


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as Debian version ``a`` sorts before, with or after ``b``: dpkg's own
    rules, from dpkg itself."""
    for result, relation in ((-1, "lt"), (0, "eq")):
        if subprocess.run(["dpkg", "--compare-versions", a, relation, b],
                          check=False).returncode == 0:
            return result
    return 1


def new_enough(version: str | None, minimum: str = MINIMUM) -> bool:
    return bool(version) and compare_versions(version, minimum) >= 0


def upstream_version(version: str) -> str:
    return _split_version(version)[1]


def parse_criu_version(output: str) -> str | None:
    """``criu --version`` prints ``Version: 4.2.1`` (and a ``GitID:`` line on git builds)."""
    match = re.search(r"^Version:\s*(\S+)", output, re.MULTILINE)
    return match.group(1) if match else None


def parse_policy_candidate(output: str) -> str | None:
    """The candidate version in ``apt-cache policy PKG`` output (None when there is none)."""
    match = re.search(r"^\s*Candidate:\s*(\S+)", output, re.MULTILINE)
    if not match or match.group(1) == "(none)":
        return None
    return match.group(1)


@dataclass
class SourceRelease:
    version: str          # the Debian source version, e.g. 4.2.1-1
    directory: str        # pool directory relative to the mirror, e.g. pool/main/c/criu
    filename: str         # the orig tarball, e.g. criu_4.2.1.orig.tar.xz
    sha256: str
    size: int
    suite: str = ""       # where apt-cache madison saw it, for the summary

    @property
    def upstream(self) -> str:
        return upstream_version(self.version)

    def url(self, mirror: str) -> str:
        return f"{mirror.rstrip('/')}/{self.directory.strip('/')}/{self.filename}"


def _fields(stanza: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    key = ""
    for line in stanza.splitlines():
        if line[:1] in (" ", "\t") and key:
            fields[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
    return fields


def parse_showsrc(output: str, package: str = "criu") -> list[SourceRelease]:
    """Every version of ``package`` in ``apt-cache showsrc`` output that has an orig tarball
    with a SHA256 (a native package has none and cannot be used)."""
    releases = []
    for stanza in re.split(r"\n\s*\n", output):
        fields = _fields(stanza)
        if fields.get("package") != package or "version" not in fields:
            continue
        upstream = upstream_version(fields["version"])
        orig = re.compile(rf"^{re.escape(package)}_{re.escape(upstream)}\.orig\.tar\.(xz|gz|bz2)$")
        for line in fields.get("checksums-sha256", "").splitlines():
            words = line.split()
            if len(words) == 3 and orig.match(words[2]):
                releases.append(SourceRelease(fields["version"], fields.get("directory", ""),
                                              words[2], words[0].lower(), int(words[1])))
    return releases


def parse_madison_suites(output: str) -> dict[str, str]:
    """Version -> suite for the source entries of ``apt-cache madison`` output, e.g.
    ``criu | 4.2.1-1 | http://mirror/debian sid/main Sources``."""
    suites: dict[str, str] = {}
    for line in output.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) == 3 and parts[2].endswith(" Sources"):
            words = parts[2].split()
            if len(words) >= 3:
                suites.setdefault(parts[1], words[-2].split("/")[0])
    return suites


def newest_release(releases: list[SourceRelease],
                   minimum: str = MINIMUM) -> SourceRelease | None:
    """The newest release whose upstream version is at least ``minimum``."""
    best = None
    for release in releases:
        if not new_enough(release.upstream, minimum):
            continue
        if best is None or compare_versions(release.version, best.version) > 0:
            best = release
    return best


def signed_by(uri: str, files: dict[str, str]) -> str | None:
    """The Signed-By keyring file the host's apt sources give ``uri`` (None if none, or if it
    is an inline key): ``files`` maps each sources file's path to its text."""
    want = uri.rstrip("/")
    for path, text in files.items():
        if path.endswith(".sources"):
            for stanza in re.split(r"\n\s*\n", text):
                lines = [ln for ln in stanza.splitlines() if not ln.lstrip().startswith("#")]
                fields = _fields("\n".join(lines))
                uris = [u.rstrip("/") for u in fields.get("uris", "").split()]
                key = fields.get("signed-by", "").strip()
                if want in uris and key.startswith("/") and "\n" not in key:
                    return key.split()[0]
        else:
            for line in text.splitlines():
                line = line.split("#", 1)[0]
                words = re.sub(r"\[[^\]]*\]", " ", line).split()
                if len(words) >= 2 and words[1].rstrip("/") == want:
                    match = re.search(r"signed-by=([^\s\]]+)", line)
                    if match and match.group(1).startswith("/"):
                        return match.group(1).split(",")[0]
    return None


def private_sources_list(mirror: str, suites: list[str], keyring: str | None) -> str:
    options = f"[signed-by={keyring}] " if keyring else ""
    return "".join(f"deb-src {options}{mirror} {suite} main\n" for suite in suites)


# ---------------------------------------------------------------- the host

def log(message: str) -> None:
    print(f"setup: {message}", flush=True)


def run(argv: list[str], *, check: bool = True, env: dict | None = None,
        cwd: str | None = None, timeout: float | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, cwd=cwd, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise SetupError(f"{' '.join(argv)} failed (exit {proc.returncode}):\n"
                         f"{proc.stdout.rstrip()}")
    return proc


def criu_version(binary: str) -> str | None:
    try:
        proc = run([binary, "--version"], check=False, timeout=30)
    except OSError:
        return None
    return parse_criu_version(proc.stdout) if proc.returncode == 0 else None


def criu_check(binary: str) -> tuple[bool, str]:
    proc = run([binary, "check"], check=False, timeout=120)
    return proc.returncode == 0, proc.stdout.strip()


def assess(binary: str) -> tuple[str | None, bool, str]:
    """(version, usable, why): usable when ``binary`` runs, is new enough and passes
    ``criu check``; ``why`` is the check's verdict, or why it is not usable."""
    if not os.access(binary, os.X_OK):
        return None, False, "not executable"
    version = criu_version(binary)
    if not new_enough(version):
        return version, False, f"version {version or 'unknown'}, need >= {MINIMUM}"
    ok, output = criu_check(binary)
    return version, ok, first_line(output) if ok else f"criu check failed:\n{output}"


def _aptsources():
    """kamra.templates.aptsources, loaded by file: the kamra.templates package imports
    modules (zstandard, ...) that Debian's python3 outside the venv does not have."""
    src = os.path.join(REPO, "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    path = os.path.join(src, "kamra", "templates", "aptsources.py")
    spec = importlib.util.spec_from_file_location("_kamra_aptsources", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def host_codename() -> str:
    try:
        with open("/etc/os-release") as f:
            match = re.search(r"^VERSION_CODENAME=\"?([^\"\n]+)", f.read(), re.MULTILINE)
    except OSError:
        match = None
    return match.group(1) if match else "bookworm"


def host_mirror(apt_dir: str = APT_DIR, codename: str | None = None) -> tuple[str, str | None]:
    """The host's Debian mirror (the URI serving its own release) and that source's keyring."""
    aptsources = _aptsources()
    try:
        mirror = aptsources.find_mirror(codename or host_codename(), apt_dir)
    except Exception as e:  # kamra's InvalidInput, with a message that says what to add
        raise SetupError(getattr(e, "message", str(e))) from e
    files = {}
    for source in aptsources.read_sources(apt_dir):
        if source.origin not in files:
            with open(source.origin, encoding="utf-8", errors="replace") as f:
                files[source.origin] = f.read()
    return mirror, signed_by(mirror, files)


def apt_env() -> dict:
    return {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}


def apt_install(packages: list[str]) -> None:
    missing = [p for p in packages
               if "install ok installed" not in run(["dpkg-query", "-W", "-f=${Status}", p],
                                                    check=False).stdout]
    if not missing:
        return
    log(f"installing {' '.join(missing)}")
    argv = ["apt-get", "install", "-y", "-q", "--no-install-recommends",
            "-o", "DPkg::Lock::Timeout=300", *missing]
    if run(argv, check=False, env=apt_env()).returncode != 0:
        run(["apt-get", "update", "-q", "-o", "DPkg::Lock::Timeout=300"], env=apt_env())
        run(argv, env=apt_env())


class PrivateApt:
    """An apt configuration of its own: sources list, lists, cache; the host's untouched."""

    def __init__(self, workdir: str, sources_list: str):
        self.dir = os.path.join(workdir, "apt")
        for sub in ("lists/partial", "cache/archives/partial", "sources.list.d"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        os.chmod(workdir, 0o755)  # apt fetches as the _apt user
        os.chmod(self.dir, 0o755)
        with open(os.path.join(self.dir, "sources.list"), "w") as f:
            f.write(sources_list)
        self.options = [
            "-o", f"Dir::Etc::SourceList={self.dir}/sources.list",
            "-o", f"Dir::Etc::SourceParts={self.dir}/sources.list.d",
            "-o", f"Dir::State::Lists={self.dir}/lists",
            "-o", f"Dir::Cache={self.dir}/cache",
            "-o", "Dir::State::Status=/dev/null",
        ]

    def run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run([tool, *self.options, *args], check=check, env=apt_env())


def find_source(workdir: str) -> tuple[SourceRelease, str, str]:
    """The newest criu source release >= MINIMUM on the host's mirror; and the mirror."""
    mirror, keyring = host_mirror()
    suites = [s.format(codename=host_codename()) for s in SOURCE_SUITES]
    apt = PrivateApt(workdir, private_sources_list(mirror, suites, keyring))
    update = apt.run("apt-get", "update", "-q", check=False)
    showsrc = apt.run("apt-cache", "showsrc", "criu", check=False).stdout
    release = newest_release(parse_showsrc(showsrc))
    if release is None:
        found = ", ".join(r.version for r in parse_showsrc(showsrc)) or "none"
        raise SetupError(f"no criu source >= {MINIMUM} in {', '.join(suites)} on {mirror} "
                         f"(found: {found}); apt-get update said:\n{update.stdout.rstrip()}")
    madison = apt.run("apt-cache", "madison", "criu", check=False).stdout
    release.suite = parse_madison_suites(madison).get(release.version, "")
    return release, mirror, keyring or ""


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_tarball(release: SourceRelease, mirror: str, workdir: str, dest: str) -> None:
    """apt's own downloader (host proxy/auth settings apply; it checks the hash too)."""
    download = os.path.join(workdir, "download")
    os.makedirs(download, exist_ok=True)
    try:
        shutil.chown(download, user="_apt")  # so apt need not fetch unsandboxed as root
    except (LookupError, OSError):
        pass
    target = os.path.join(download, release.filename)
    run(["/usr/lib/apt/apt-helper", "download-file", release.url(mirror), target,
         f"SHA256:{release.sha256}"], env=apt_env())
    if sha256_of(target) != release.sha256:
        raise SetupError(f"{release.url(mirror)}: SHA256 does not match the signed index")
    shutil.move(target, dest)


def build(tarball: str, workdir: str, log_path: str) -> str:
    """Unpack and ``make criu``; returns the built binary's path."""
    tree = os.path.join(workdir, "build")
    os.makedirs(tree)
    run(["tar", "-xf", tarball, "-C", tree])
    (top,) = os.listdir(tree)
    top = os.path.join(tree, top)
    jobs = str(max(1, len(os.sched_getaffinity(0))))
    env = {k: v for k, v in os.environ.items()
           if k not in ("CFLAGS", "LDFLAGS", "CPPFLAGS", "MAKEFLAGS", "MFLAGS")}
    with open(log_path, "w") as logf:
        proc = subprocess.run(["make", f"-j{jobs}", f"RUNDIR={KDAT_DIR}", "criu"], cwd=top,
                              env=env, stdout=logf,
                              stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = "".join(f.readlines()[-40:])
        raise SetupError(f"building CRIU failed (exit {proc.returncode}; full log in "
                         f"{log_path}):\n{tail.rstrip()}")
    return os.path.join(top, "criu", "criu")


def caches_kdat(binary: str) -> bool:
    """Whether ``binary`` was built by this script: it keeps its kernel probes in
    KDAT_DIR (an earlier build kept them in /run, not a tmpfs on every host)."""
    try:
        with open(binary, "rb") as f:
            return f"{KDAT_DIR}/criu.kdat".encode() in f.read()
    except OSError:
        return False


def install(binary: str) -> None:
    os.makedirs(os.path.dirname(INSTALLED), exist_ok=True)
    tmp = f"{INSTALLED}.kamra-tmp"
    shutil.copyfile(binary, tmp)
    os.chmod(tmp, 0o755)
    os.replace(tmp, INSTALLED)


def cached_builds() -> list[tuple[str, str]]:
    """(version, binary) of cached builds, newest first."""
    builds = []
    try:
        names = os.listdir(CACHE)
    except FileNotFoundError:
        return []
    for name in names:
        if name.startswith("."):
            continue  # the lock file
        binary = os.path.join(CACHE, name, "criu")
        if new_enough(name) and os.path.isfile(binary):
            builds.append((name, binary))
    builds.sort(key=functools.cmp_to_key(lambda x, y: compare_versions(x[0], y[0])),
                reverse=True)
    return builds


def first_line(text: str) -> str:
    """The verdict of ``criu check`` ("Looks good."), not one of the warnings around it."""
    lines = [line for line in text.splitlines() if line.strip()]
    verdict = [line for line in lines if line.startswith("Looks good")]
    return (verdict or lines or [""])[0]


def ensure_criu() -> str:
    # 1. Installed already: /usr/local/sbin/criu (it comes first on root's PATH), else PATH's.
    present = INSTALLED if os.path.exists(INSTALLED) else shutil.which("criu", path=SEARCH_PATH)
    if present:
        version, ok, why = assess(present)
        if ok and present == INSTALLED and not caches_kdat(present):
            ok, why = False, f"built without RUNDIR={KDAT_DIR}: building it again"
        if ok:
            return f"criu {version} at {present}; criu check: {why}"
        log(f"{present}: {why}")

    # 2. Built by an earlier run (this checkout or another): no network needed.
    for _version, binary in cached_builds():
        version, ok, why = assess(binary)
        if ok and not caches_kdat(binary):
            ok, why = False, f"built without RUNDIR={KDAT_DIR}"
        if not ok:
            log(f"cached {binary}: {why}")
            continue
        install(binary)
        version, ok, why = assess(INSTALLED)
        if ok:
            return (f"criu {version} at {INSTALLED} (from the build cached in "
                    f"{os.path.dirname(binary)}); criu check: {why}")

    # 3. The distribution's, if new enough (Debian 12 has 3.17: normally skipped).
    candidate = parse_policy_candidate(run(["apt-cache", "policy", "criu"], check=False).stdout)
    if new_enough(candidate) and not os.path.exists(INSTALLED):
        apt_install(["criu"])
        binary = shutil.which("criu", path=SEARCH_PATH) or "/usr/sbin/criu"
        version, ok, why = assess(binary)
        if ok:
            return f"criu {version} at {binary} (Debian package); criu check: {why}"
        log(f"Debian's criu {candidate} is not usable ({why}): building from source")

    # 4. Build from the source release.
    with tempfile.TemporaryDirectory(prefix="kamra-criu-") as workdir:
        release, mirror, _ = find_source(workdir)
        cache = os.path.join(CACHE, release.upstream)
        os.makedirs(cache, exist_ok=True)
        tarball = os.path.join(cache, release.filename)
        if not (os.path.exists(tarball) and sha256_of(tarball) == release.sha256):
            fetch_tarball(release, mirror, workdir, tarball)
        cached = os.path.join(cache, "criu")
        version = criu_version(cached) if os.path.isfile(cached) else None
        if version == release.upstream and caches_kdat(cached):
            # Built from this very tarball, runs, but failed its check above: building it
            # again would not help; the check below says why.
            how = f"cached in {cache}"
        else:
            apt_install(list(BUILD_DEPENDS))
            log(f"building CRIU {release.upstream} from {release.filename} "
                f"({release.suite or 'Debian'} source package {release.version})")
            started = time.monotonic()
            built = build(tarball, workdir, os.path.join(cache, "build.log"))
            seconds = time.monotonic() - started
            version = criu_version(built)
            if not new_enough(version):
                raise SetupError(f"the CRIU built from {release.filename} reports "
                                 f"version {version}")
            tmp = os.path.join(cache, "criu.tmp")
            shutil.copyfile(built, tmp)
            os.chmod(tmp, 0o755)
            os.replace(tmp, cached)
            how = (f"built in {seconds:.0f} s from {release.filename}, "
                   f"{release.suite or 'Debian'} source {release.version}; cached in {cache}")
    install(cached)
    ok, output = criu_check(INSTALLED)
    if not ok:
        raise SetupError(f"{INSTALLED} ({how}): criu check failed:\n{output}")
    return f"criu {version} at {INSTALLED} ({how}); criu check: {first_line(output)}"


def main() -> int:
    if os.geteuid() != 0:
        print("install_criu: run as root", file=sys.stderr)
        return 1
    os.makedirs(CACHE, exist_ok=True)
    # One installer at a time (two checkouts running setup at once share the cache).
    with open(os.path.join(CACHE, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            summary = ensure_criu()
        except (SetupError, subprocess.TimeoutExpired) as e:
            print(f"setup: CRIU >= {MINIMUM} could not be installed: {e}", file=sys.stderr)
            return 1
    log(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
