"""Process side of containers: the keeper (fork server, subreaper, console holder),
the in-container setup of a new init, and the exec helper."""
