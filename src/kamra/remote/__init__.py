"""Other kamra hosts: TLS with pinned certificates, token authentication, a framed wire."""
