"""Checkpoint and restore of process trees with CRIU."""
