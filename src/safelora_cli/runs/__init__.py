"""Runs: what is patched x where V comes from x what is written; prepare, score, select, write."""
