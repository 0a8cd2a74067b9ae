"""TRL's fused LM head on a CPU, in narrower vocabulary tiles.

TRL's DPO, KTO and GRPO trainers compute per-token log-probabilities through a fused head (`trl.kernels.
ChunkedLogProbFunction`) that never holds the whole [tokens, vocabulary] logits: tiles of up to 4,096 positions by
32,768 vocabulary entries. On a GPU a Triton kernel folds each tile in place; on a CPU the tile is folded by torch
operations, each making an fp32 copy of it, and its backward holds about eight at once: gigabytes at a few thousand
positions, more than a small model and its activations. Tiles 2,048 entries wide hold 1/16 of that, and DPO ran
faster with them on a CPU (measured: benchmarks/README.md, "TRL's fused head"), with the same log-probabilities to
rounding. The width is TRL's module constant, read each time the head runs; ayar sets it while a Trainer stage
trains and evaluates on a CPU, and leaves TRL's on GPUs.
"""

from __future__ import annotations

from contextlib import contextmanager

CPU_VOCAB_CHUNK = 2048  # vocabulary entries per tile on a CPU (TRL's own: 32,768, for cuBLAS and Triton)
TOKEN_CHUNK = 4096  # positions per tile (TRL's `TOKEN_CHUNK_SIZE`, which ayar leaves)
FP32_COPIES = 8.3  # fp32 copies of a tile its torch backward holds at its peak (measured: benchmarks/README.md)


def applies(device: str) -> bool:
    """Where TRL folds the tiles with torch operations: devices without its Triton kernels (a CPU)."""
    return device == "cpu"


def vocab_chunk(device: str) -> int:
    """The tile's vocabulary width the head runs with on `device`."""
    if applies(device):
        return CPU_VOCAB_CHUNK
    import trl.trainer.utils as trl_utils

    return trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE


@contextmanager
def narrow_tiles(device: str):
    """TRL's head in CPU_VOCAB_CHUNK-wide tiles inside the block, on a device where that applies; TRL's own width
    again after it (a process may train on a GPU next). TRL reads the constant at every call (`add_fused_lm_head`);
    a TRL without it is left as it is."""
    import trl.trainer.utils as trl_utils

    if not applies(device) or not hasattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE"):
        yield False
        return
    own = trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE
    trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = CPU_VOCAB_CHUNK
    try:
        yield True
    finally:
        trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = own


def scratch_bytes(positions: int, vocab: int, device: str) -> int:
    """The head's peak scratch: on a CPU, FP32_COPIES fp32 copies of one tile; on a GPU the tile itself (folded in
    place by Triton, in the compute dtype: 2 bytes)."""
    rows = min(positions, TOKEN_CHUNK)
    width = min(vocab, vocab_chunk(device))
    if applies(device):
        return int(FP32_COPIES * rows * width * 4)
    return rows * width * 2
