"""One module per family: `FAMILY` (or `FAMILIES`) and `build(path, family=..., **sizes) -> Path`.

What all builders share (toy decoder and tower sizes, tokenizer, ChatML template, save steps) is in
`common`, which defines no family; a builder states only what is specific to its family.
"""
