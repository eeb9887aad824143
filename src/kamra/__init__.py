"""kamra: system containers for Linux (OS-level virtualization in the line of OpenVZ and LXC)."""

__version__ = "0.1.0"
