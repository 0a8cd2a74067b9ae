"""Data: files -> rows -> conversations (one internal form) -> token ids + label masks -> batches."""
