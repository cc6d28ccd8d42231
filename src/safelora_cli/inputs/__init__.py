"""Inputs: references and the hub, safetensors index and reader, small files, patterns,
adapters, pairing, full fine-tune targets, provenance, run files. Reads and checks; never writes."""
