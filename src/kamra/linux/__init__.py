"""Thin, typed layer over the Linux system calls kamra needs (no policy here)."""
