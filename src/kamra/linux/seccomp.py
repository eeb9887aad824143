"""A seccomp filter that refuses bpf(2) inside containers.

Why: a privileged container with bpf() can load programs that see the whole host
kernel (tracing, sockets of other containers), and the programs an OS init loads for
itself (systemd's per-unit IP firewall, IPAddressDeny=) are descriptors CRIU cannot
checkpoint ("anon_inode:bpf-prog"), which makes such containers impossible to
checkpoint or migrate. Without bpf() systemd says "BPF firewalling not supported" and
runs the units anyway, as it does in Docker, whose default profile blocks bpf too.

The filter is classic BPF, written out here: load the architecture, then the syscall
number; EPERM for bpf on the native ABI (and i386 and x32 on x86-64), allow the rest.
It is installed as root with CAP_SYS_ADMIN (no no_new_privs needed), inherited by every
process of the container, and checkpointed and restored by CRIU with them.
"""

from __future__ import annotations

import ctypes
import errno
import platform
import struct

from kamra.linux import libc

PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000

# BPF instruction classes and fields (linux/filter.h)
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_RET_K = 0x06

_X32_BIT = 0x40000000
# machine -> [(audit arch, bpf syscall number, also x32)]
_ARCHES: dict[str, list[tuple[int, int, bool]]] = {
    "x86_64": [(0xC000003E, 321, True), (0x40000003, 357, False)],
    "aarch64": [(0xC00000B7, 280, False), (0x40000028, 386, False)],
}


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def deny_bpf_program(machine: str | None = None) -> bytes:
    """The filter for ``machine`` (default: this one), as packed sock_filter entries."""
    arches = _ARCHES.get(machine or platform.machine())
    if arches is None:
        raise OSError(errno.ENOSYS, f"no seccomp filter for {machine or platform.machine()}")
    deny = SECCOMP_RET_ERRNO | errno.EPERM
    body: list[bytes] = []
    # Per architecture: [arch != A ? skip] [ld nr] [nr == bpf ? deny] ([nr == x32 bpf ? deny])
    blocks = []
    for arch, number, x32 in arches:
        checks = [number] + ([number | _X32_BIT] if x32 else [])
        blocks.append((arch, checks))
    # Layout: ld arch; then each block; then allow; then deny.
    body.append(_insn(_LD_W_ABS, 0, 0, 4))  # seccomp_data.arch
    block_insns: list[list[tuple[int, int, int, int]]] = []
    for arch, checks in blocks:
        insns = [(_JEQ_K, 0, 1 + len(checks), arch),  # placeholder jf fixed below
                 (_LD_W_ABS, 0, 0, 0)]  # seccomp_data.nr
        insns += [(_JEQ_K, 0, 0, n) for n in checks]  # jt fixed below
        insns.append((_LD_W_ABS, 0, 0, 4))  # reload arch for the next block
        block_insns.append(insns)
    total = sum(len(b) for b in block_insns)
    position = 1
    for insns in block_insns:
        end = position + len(insns)
        code, _, _, arch = insns[0]
        insns[0] = (code, 0, len(insns) - 1, arch)  # not this arch: to the next block
        for i in range(2, len(insns) - 1):
            code, _, _, k = insns[i]
            # to the deny, which follows the allow after the last block
            insns[i] = (code, (1 + total + 1) - (position + i) - 1, 0, k)
        body.extend(_insn(*insn) for insn in insns)
        position = end
    body.append(_insn(_RET_K, 0, 0, SECCOMP_RET_ALLOW))
    body.append(_insn(_RET_K, 0, 0, deny))
    return b"".join(body)


try:
    # Built once at import (in the keeper), not in every forked init.
    DENY_BPF: bytes | None = deny_bpf_program()
except OSError:
    DENY_BPF = None  # an architecture without a table: no filter


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install(program: bytes) -> None:
    """Install ``program`` on the calling thread (inherited across fork and exec)."""
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p).value)
    libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog))
