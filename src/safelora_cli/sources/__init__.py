"""Sources: where V = W_aligned - W_base comes from: the model pair (streamed) or a profile file."""
