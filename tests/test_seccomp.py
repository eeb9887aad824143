"""The seccomp filter that refuses bpf(2): its logic, and the kernel enforcing it."""

from __future__ import annotations

import ctypes
import errno
import os
import struct

import pytest

from kamra.linux import seccomp

BPF_SYSCALL = {"x86_64": 321, "aarch64": 280}


def run_filter(program: bytes, arch: int, nr: int) -> int:
    """A classic-BPF interpreter for the few instructions the filter uses."""
    insns = [struct.unpack("HBBI", program[i:i + 8]) for i in range(0, len(program), 8)]
    data = {0: nr, 4: arch}
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        if code == 0x20:
            acc = data[k]
            pc += 1
        elif code == 0x15:
            pc += 1 + (jt if acc == k else jf)
        elif code == 0x06:
            return k
        else:
            raise AssertionError(f"unexpected instruction {code:#x}")


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_filter_denies_bpf_on_every_abi_and_allows_the_rest(machine):
    program = seccomp.deny_bpf_program(machine)
    deny = seccomp.SECCOMP_RET_ERRNO | errno.EPERM
    for arch, number, x32 in seccomp._ARCHES[machine]:
        assert run_filter(program, arch, number) == deny
        if x32:
            assert run_filter(program, arch, number | seccomp._X32_BIT) == deny
        for other in (0, 1, 59, number - 1, number + 1, 500):
            assert run_filter(program, arch, other) == seccomp.SECCOMP_RET_ALLOW
    assert run_filter(program, 0x12345678, 321) == seccomp.SECCOMP_RET_ALLOW


def test_the_kernel_refuses_bpf_after_install():
    import platform

    number = BPF_SYSCALL[platform.machine()]
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.syscall(number, 0, 0, 0)
            if ctypes.get_errno() == errno.EPERM:  # as root: EINVAL or EFAULT, not EPERM
                os._exit(4)
            seccomp.install(seccomp.deny_bpf_program())
            result = libc.syscall(number, 0, 0, 0)  # BPF_MAP_CREATE with no attributes
            code = 0 if result == -1 and ctypes.get_errno() == errno.EPERM else 2
            if code == 0 and os.getpid() <= 0:  # other syscalls still work
                code = 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
