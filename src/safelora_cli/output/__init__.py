"""Output: the output folder and atomic writes, sidecars, shards, merges, the card, the report."""
