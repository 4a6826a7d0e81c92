"""halp: predict VLM hallucinations from internal states before a single token is generated."""

__version__ = "0.1.0"
