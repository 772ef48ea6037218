"""The package version (one place; the package root, the CLI and the server read it here)."""

__version__ = "0.1.0"
