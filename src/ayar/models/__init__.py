"""Models: resolve a model source, choose device and dtype, load model + tokenizer, apply adapters."""
