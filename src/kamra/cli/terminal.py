"""Interactive sessions on the user's terminal: exec -t, enter, console."""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import socket
import sys
import termios
import tty
from collections.abc import Iterator

from kamra.linux import fdpass, libc
from kamra.runtime import console as framing

DETACH_PREFIX = 0x01  # Ctrl-a
DETACH_KEY = ord("q")


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[bool]:
    if not os.isatty(fd):
        yield False
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def terminal_size() -> tuple[int, int]:
    for fd in (0, 1, 2):
        try:
            rows, cols = libc.get_winsize(fd)
            if rows and cols:
                return rows, cols
        except OSError:
            continue
    return 24, 80


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except InterruptedError:
            continue
        view = view[written:]


def exec_pty(session: socket.socket, master: int) -> int:
    """Proxy the user's terminal and a pty master until the command exits."""
    resized = [False]

    def on_winch(*_: object) -> None:
        resized[0] = True

    old = signal.signal(signal.SIGWINCH, on_winch)
    stdin_open = True
    master_open = True
    code = None
    try:
        with raw_terminal(0):
            while True:
                if resized[0]:
                    resized[0] = False
                    libc.set_winsize(master, *terminal_size())
                watch = [session] + ([master] if master_open else []) + \
                    ([0] if stdin_open else [])
                try:
                    ready, _, _ = select.select(watch, [], [])
                except InterruptedError:
                    continue
                if master in ready:
                    try:
                        data = os.read(master, 65536)
                    except OSError as exc:
                        if exc.errno != errno.EIO:
                            raise
                        data = b""
                    if data:
                        _write_all(1, data)
                    else:
                        master_open = False  # the command closed its terminal; await exit
                if 0 in ready:
                    data = os.read(0, 65536)
                    if data and master_open:
                        _write_all(master, data)
                    elif not data:
                        stdin_open = False
                if session in ready:
                    message, fds = fdpass.recv(session)
                    for fd in fds:
                        os.close(fd)
                    if message is None:
                        break
                    if "exit" in message:
                        code = int(message["exit"])
                        _drain(master)
                        break
                    if "error" in message:
                        print(f"kamra: {message['error']}", file=sys.stderr)
    finally:
        signal.signal(signal.SIGWINCH, old)
    return 125 if code is None else code


def _drain(master: int) -> None:
    os.set_blocking(master, False)
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            return
        if not data:
            return
        _write_all(1, data)


def console(session: socket.socket, name: str) -> int:
    """Attach the user's terminal to a container console until Ctrl-a q or the init exits."""
    interactive = os.isatty(0)
    if interactive:
        sys.stderr.write(f"Connected to the console of {name}. Type Ctrl-a q to detach.\r\n")
        sys.stderr.flush()
    resized = [True]

    def on_winch(*_: object) -> None:
        resized[0] = True

    old = signal.signal(signal.SIGWINCH, on_winch)
    prefix = False
    stdin_open = True
    try:
        with raw_terminal(0):
            while True:
                if resized[0] and interactive:
                    resized[0] = False
                    session.sendall(framing.frame_winsize(*terminal_size()))
                watch = [session] + ([0] if stdin_open else [])
                try:
                    ready, _, _ = select.select(watch, [], [])
                except InterruptedError:
                    continue
                if session in ready:
                    data = session.recv(65536)
                    if not data:
                        if interactive:
                            sys.stderr.write("\r\nThe container's init exited.\r\n")
                        return 0
                    _write_all(1, data)
                if 0 in ready:
                    data = os.read(0, 65536)
                    if not data:
                        stdin_open = False
                        continue
                    out = bytearray()
                    for byte in data:
                        if prefix:
                            prefix = False
                            if byte == DETACH_KEY:
                                if out:
                                    session.sendall(framing.frame_data(bytes(out)))
                                if interactive:
                                    sys.stderr.write("\r\nDetached.\r\n")
                                return 0
                            out.append(byte if byte == DETACH_PREFIX else DETACH_PREFIX)
                            if byte != DETACH_PREFIX:
                                out.append(byte)
                        elif byte == DETACH_PREFIX:
                            prefix = True
                        else:
                            out.append(byte)
                    if out:
                        session.sendall(framing.frame_data(bytes(out)))
    finally:
        signal.signal(signal.SIGWINCH, old)
