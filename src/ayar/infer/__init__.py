"""Inference: load a run directory or model, generate with presets, stream tokens."""
