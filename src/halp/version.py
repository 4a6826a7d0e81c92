"""halp's version: one home, read by the package root, run records and embedding manifests."""

__version__ = "0.1.0"
