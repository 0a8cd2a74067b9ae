"""Tokenized-data cache: a second run on unchanged data skips tokenization.

The key covers everything that changes the tokens: the records' content (after format conversion,
cleaning and splitting), the tokenizer (vocabulary, merges, special tokens, chat template), the template
choice, max_length, train_on_prompt, the system prompt and the renderer's version. Any change re-tokenizes.
Entries are written atomically, so an interrupted run never leaves a half-written cache behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from ayar.data.records import Record, content_hash
from ayar.data.render import Example, Renderer

RENDER_VERSION = 2  # bump when render.py changes what it produces for the same inputs


def cache_dir() -> Path:
    return Path(os.environ.get("AYAR_HOME", Path.home() / ".cache" / "ayar")).expanduser() / "tokenized"


def tokenizer_fingerprint(tok) -> str:
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # slow tokenizer: its vocabulary stands in for the model files
        h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    extra = [
        type(tok).__name__,
        tok.chat_template or "",
        tok.eos_token,
        tok.bos_token,
        str(tok.all_special_tokens),
        str(getattr(tok, "add_bos_token", None)),
    ]
    h.update(json.dumps(extra).encode())
    return h.hexdigest()


def cache_key(records: list[Record], renderer: Renderer) -> str:
    parts = {
        "data": content_hash(records),
        "tokenizer": tokenizer_fingerprint(renderer.tok),
        "template": renderer.template,
        "max_length": renderer.max_length,
        "train_on_prompt": renderer.train_on_prompt,
        "system_prompt": renderer.system_prompt,
        "version": RENDER_VERSION,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def encode_cached(
    records: list[Record], renderer: Renderer, enabled: bool = True, root: Path | None = None
) -> tuple[list[Example], bool]:
    """Examples for `records` (locations taken from the records), and whether they came from the cache."""
    if not enabled or not records:
        return [renderer.encode(r) for r in records], False
    path = (root or cache_dir()) / f"{cache_key(records, renderer)}.npz"
    if path.is_file():
        try:
            return _load(path, records), True
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            path.unlink(missing_ok=True)  # a damaged entry (truncated, not a zip) is rebuilt, never trusted
    examples = [renderer.encode(r) for r in records]
    _save(path, examples)
    return examples, False


def _save(path: Path, examples: list[Example]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lengths = np.array([len(e.input_ids) for e in examples], dtype=np.int64)
    arrays = {
        "ids": np.concatenate([np.asarray(e.input_ids, dtype=np.int64) for e in examples]),
        "labels": np.concatenate([np.asarray(e.labels, dtype=np.int64) for e in examples]),
        "lengths": lengths,
        "full_lengths": np.array([e.full_length for e in examples], dtype=np.int64),
        "truncated": np.array([e.truncated for e in examples], dtype=bool),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def _load(path: Path, records: list[Record]) -> list[Example]:
    with np.load(path) as z:
        ids, labels, lengths = z["ids"].tolist(), z["labels"].tolist(), z["lengths"].tolist()
        full, truncated = z["full_lengths"].tolist(), z["truncated"].tolist()
    if len(lengths) != len(records):
        raise ValueError("cache entry does not match the records")
    out, start = [], 0
    for rec, n, fl, tr in zip(records, lengths, full, truncated):
        out.append(Example(ids[start : start + n], labels[start : start + n], rec.where, bool(tr), fl))
        start += n
    return out
