"""Turning debootstrap's "I: <verb> <package>" lines into progress events.

debootstrap never prints how many packages it will fetch, so the download phase has
no total; every later phase (extract, unpack, configure) works on a subset of the
downloaded packages, so that count is their total. The bars are approximate, the
phases exact.
"""

from __future__ import annotations

from collections import deque

from kamra.templates.model import Progress, emit

_VERB_PHASE = {
    "Retrieving": "download",
    "Validating": "download",
    "Extracting": "extract",
    "Unpacking": "unpack",
    "Configuring": "configure",
}
# Stage headers that carry no package name but do announce a phase.
_HEADER_PHASE = {
    "Chosen extractor": "extract",
    "Installing core packages": "unpack",
}


class DebootstrapProgress:
    def __init__(self, progress: Progress | None):
        self._progress = progress
        self.phase = "prepare"
        self._counts: dict[str, int] = {}
        self._seen: dict[str, set[str]] = {}
        self.packages = 0  # packages downloaded so far
        self.tail: deque[str] = deque(maxlen=6)
        self.errors: list[str] = []

    def feed(self, line: str) -> None:
        line = line.rstrip()
        if not line:
            return
        self.tail.append(line)
        if line.startswith(("E: ", "W: ")):
            self.errors.append(line[3:].strip())
        if not line.startswith("I: "):
            return
        text = line[3:].strip()
        verb, _, rest = text.partition(" ")
        words = rest.split()
        phase = _VERB_PHASE.get(verb)
        package = None
        if verb in ("Retrieving", "Validating"):
            if len(words) == 2:  # "Retrieving adduser 3.134"
                package = words[0]
            else:  # "Retrieving InRelease", "Retrieving Packages": the indices
                phase = "prepare"
        elif phase is not None and len(words) == 1:  # "Unpacking adduser..."
            package = words[0].rstrip(".")
        # Else a stage header such as "Unpacking the base system...": a phase, no package.
        if phase is None:
            phase = next((p for h, p in _HEADER_PHASE.items() if text.startswith(h)), self.phase)
        self.phase = phase
        if package is not None and package not in self._seen.setdefault(phase, set()):
            # Counted once per phase: Validating repeats Retrieving's package, and dpkg
            # may unpack a core package twice.
            self._seen[phase].add(package)
            self._counts[phase] = self._counts.get(phase, 0) + 1
            if phase == "download":
                self.packages += 1
        self._emit(text)

    def _emit(self, message: str) -> None:
        current = self._counts.get(self.phase, 0)
        total = None
        if self.phase in ("extract", "unpack", "configure") and self.packages:
            total = max(self.packages, current)
        emit(self._progress, self.phase, current, total, message)

    def summary(self) -> str:
        """One line for an error message: the last errors and warnings debootstrap
        reported or, if it reported none, its last lines."""
        parts = self.errors[-2:] or list(self.tail)[-3:]
        return " | ".join(parts) or "no output"
