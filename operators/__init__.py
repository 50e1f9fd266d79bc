"""Ray-agnostic operators: plain callables on numpy/torch batches (decode, tile, encode, reduce)."""
