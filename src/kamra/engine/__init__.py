"""The engine: kamra as a plain Python library (``Host(root=...)``)."""

from kamra.engine.host import Host

__all__ = ["Host"]
