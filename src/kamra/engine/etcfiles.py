"""Files kamra writes into a container's /etc at start: hostname, hosts, resolv.conf.

Written from the host into the mounted root filesystem before the init runs, so no
container process can race the write; a path the container made a symlink is left
alone (never followed out of its root).
"""

from __future__ import annotations

import os

HOSTS_HEADER = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
MARK = "# written by kamra at start; net.nameservers changes it\n"


def write_etc(rootfs: str, name: str, content: str) -> bool:
    """Replace ``/etc/<name>`` with ``content`` unless it already holds it; False when
    /etc or the file is a symlink (the container's choice, not followed)."""
    etc = os.path.join(rootfs, "etc")
    path = os.path.join(etc, name)
    if not os.path.isdir(etc) or os.path.islink(etc) or os.path.islink(path):
        return False
    try:
        with open(path) as f:
            if f.read() == content:
                return True
    except OSError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(content)
    return True


def write_hostname(rootfs: str, hostname: str) -> None:
    """Give the container its name in /etc/hostname, as LXC does: an OS init (systemd,
    an rcS script) sets the hostname from it and would otherwise undo ours."""
    write_etc(rootfs, "hostname", hostname + "\n")


def hosts_text(hostname: str, addresses: list[str]) -> str:
    lines = [HOSTS_HEADER]
    for address in addresses:
        lines.append(f"{address}\t{hostname}\n")
    if not addresses:
        lines.append(f"127.0.1.1\t{hostname}\n")
    return "".join(lines)


def resolv_text(nameservers: list[str]) -> str:
    return MARK + "".join(f"nameserver {server}\n" for server in nameservers)
