"""Checkpoint and restore with real CRIU: processes, memory, files and TCP survive."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from conftest import unique

STREAM = ("i=0; while :; do echo $i; i=$((i+1)); sleep 0.01; done | nc -l -p 5000")


class SequenceReader(threading.Thread):
    """Reads the container's increasing sequence; remembers every number and how it ended."""

    def __init__(self, address: str, port: int = 5000):
        super().__init__(daemon=True)
        self.sock = socket.create_connection((address, port), timeout=60)
        self.numbers: list[int] = []
        self.end: str | None = None
        self.stop_reading = False

    def run(self) -> None:
        buffer = b""
        try:
            while not self.stop_reading:
                data = self.sock.recv(4096)
                if not data:
                    self.end = "EOF"
                    return
                buffer += data
                *lines, buffer = buffer.split(b"\n")
                self.numbers.extend(int(line) for line in lines)
        except OSError as exc:
            self.end = repr(exc)

    def wait_for_more(self, than: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.numbers) <= than and time.monotonic() < deadline and self.end is None:
            time.sleep(0.02)
        assert len(self.numbers) > than, f"the stream stalled ({self.end})"

    def close(self) -> None:
        self.stop_reading = True
        self.sock.close()


def connect_when_listening(address: str) -> SequenceReader:
    deadline = time.monotonic() + 10
    while True:
        try:
            return SequenceReader(address)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_checkpoint_and_restore_keep_an_established_tcp_stream(host):
    name = unique()
    host.create(name, "busybox", init=["/bin/sh", "-c", STREAM])
    status = host.start(name)
    address = status["addresses"][0]
    reader = connect_when_listening(address)
    reader.start()
    try:
        reader.wait_for_more(20)
        done = host.checkpoints.checkpoint(name)
        assert done["state"] == "checkpointed", done
        assert not os.path.exists(f"/proc/{status['init_pid']}")
        seen = len(reader.numbers)
        time.sleep(0.5)
        assert len(reader.numbers) <= seen + 5  # nothing flows while it is checkpointed
        restored = host.checkpoints.restore(name)
        assert restored["state"] == "running", restored
        reader.wait_for_more(len(reader.numbers) + 50)
        numbers = list(reader.numbers)
        assert numbers == list(range(len(numbers))), "gap or duplicate in the stream"
        assert reader.end is None
    finally:
        reader.close()
