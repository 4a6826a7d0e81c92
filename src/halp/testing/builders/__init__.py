"""One module per family: `FAMILY` (or `FAMILIES`) and `build(path, family=..., **sizes) -> Path`."""
