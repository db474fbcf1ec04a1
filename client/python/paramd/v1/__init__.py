"""The `paramd.v1` protocol: messages and stubs generated at build time."""
