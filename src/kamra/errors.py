"""One exception tree for every foreseeable failure.

The engine raises these; kamrad maps them to HTTP statuses once (``http_status``),
the CLI maps them to a one-line message and a distinct exit code (``exit_code``).
Raw ``OSError``s are translated at the boundary where they happen (``KernelError``).
"""

from __future__ import annotations

import errno as _errno
import os


class KamraError(Exception):
    """Base of every error kamra reports to a user."""

    http_status = 500
    exit_code = 1

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def to_json(self) -> dict:
        return {"type": type(self).__name__, "message": self.message}


class InvalidInput(KamraError):
    http_status = 400
    exit_code = 2


class NotFound(KamraError):
    http_status = 404
    exit_code = 3


class AlreadyExists(KamraError):
    http_status = 409
    exit_code = 4


class Conflict(KamraError):
    """An illegal state transition (start a running container, exec into a stopped one)."""

    http_status = 409
    exit_code = 5


class ResourceBusy(KamraError):
    http_status = 423
    exit_code = 6


class KernelError(KamraError):
    """A system call failed; carries the errno and the operation that failed."""

    http_status = 500
    exit_code = 7

    def __init__(self, operation: str, err: int, detail: str = ""):
        text = f"{operation}: {os.strerror(err)}"
        if detail:
            text += f" ({detail})"
        super().__init__(text)
        self.operation = operation
        self.errno = err

    @classmethod
    def from_oserror(cls, operation: str, exc: OSError) -> KernelError:
        return cls(operation, exc.errno or _errno.EIO, exc.filename and str(exc.filename) or "")

    def to_json(self) -> dict:
        data = super().to_json()
        data["errno"] = self.errno
        data["operation"] = self.operation
        return data


class DaemonUnavailable(KamraError):
    exit_code = 8


ERROR_TYPES: dict[str, type[KamraError]] = {
    cls.__name__: cls
    for cls in (KamraError, InvalidInput, NotFound, AlreadyExists, Conflict, ResourceBusy,
                KernelError, DaemonUnavailable)
}


def from_json(data: dict) -> KamraError:
    """Rebuild an error sent by kamrad (the client side of ``to_json``)."""
    cls = ERROR_TYPES.get(data.get("type", ""), KamraError)
    message = data.get("message", "unknown error")
    if cls is KernelError:
        err = KamraError.__new__(KernelError)
        KamraError.__init__(err, message)
        err.operation = data.get("operation", "")
        err.errno = data.get("errno", 0)
        return err
    return cls(message)
