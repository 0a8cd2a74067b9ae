"""TRL's fused LM head in narrower tiles on a CPU (kernels/trl_head.py): the same log-probabilities and gradients as
TRL's own tiles, where it applies and where it does not. Its memory and speed: benchmarks/trl_head.py."""

import pytest
import torch

from ayar.kernels import trl_head


@pytest.fixture
def trl_width():
    """TRL's tile width as TRL sets it (a Trainer stage run before in this process put it back)."""
    import trl.trainer.utils as trl_utils

    return trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE


def _log_probs(model, ids, labels, widths):
    """The fused head's per-token log-probabilities and the gradient they give the embeddings; the tile widths the
    head ran with appended to `widths`."""
    import trl.trainer.utils as trl_utils

    model.zero_grad()
    out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    widths.append(trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE)
    out.log_probs.sum().backward()
    return out.log_probs.detach(), model.get_input_embeddings().weight.grad.clone()


def test_on_a_cpu_the_head_runs_narrower_tiles_to_the_same_log_probs(trl_width, monkeypatch):
    """A vocabulary of 5,000 (three tiles of 2,048, one of TRL's): the log-probabilities and gradients agree to
    float32 rounding, and the head runs in tiles of 2,048."""
    import trl.trainer.utils as trl_utils
    from trl.trainer.utils import add_fused_lm_head

    from tests.helpers import make_model, make_tokenizer

    tok = make_tokenizer()
    model = make_model("qwen2", tok, vocab_size=5000)
    add_fused_lm_head(model)
    ids = torch.randint(0, 5000, (3, 24), generator=torch.Generator().manual_seed(0))
    labels = ids.masked_fill(torch.arange(24) < 6, -100)  # the prompt's positions unscored
    seen = []
    calls = []
    real = trl_utils._ChunkedLogProbFunction

    class Spy(real):
        @staticmethod
        def apply(*args):
            calls.append(args[5])  # the vocabulary width of its tiles
            return real.apply(*args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Spy)
    before, grad_before = _log_probs(model, ids, labels, seen)
    with trl_head.narrow_tiles("cpu") as narrowed:
        after, grad_after = _log_probs(model, ids, labels, seen)
    assert narrowed and calls == seen == [trl_width, trl_head.CPU_VOCAB_CHUNK] and trl_width > 5000
    assert trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE == trl_width  # TRL's again after the block
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    # sums over the tiles in another order: terms larger than the sum cancel (1.2e-5 apart on a Sapphire Rapids CPU)
    torch.testing.assert_close(grad_after, grad_before, atol=5e-5, rtol=1e-4)
    assert float(grad_before.abs().max()) > 1e-3  # a gradient that could differ


def test_on_a_gpu_the_head_is_trls(trl_width):
    import trl.trainer.utils as trl_utils

    assert trl_head.applies("cpu") and not trl_head.applies("cuda")
    with trl_head.narrow_tiles("cuda") as narrowed:
        assert not narrowed and trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE == trl_width
    assert trl_head.vocab_chunk("cuda") == trl_width and trl_head.vocab_chunk("cpu") == trl_head.CPU_VOCAB_CHUNK
    # its planned scratch: the tile in place on a GPU, fp32 copies of a far narrower tile on a CPU
    assert trl_head.scratch_bytes(3000, 49152, "cuda") == 3000 * trl_width * 2
    assert trl_head.scratch_bytes(3000, 49152, "cpu") == int(trl_head.FP32_COPIES * 3000 * 2048 * 4)
    assert trl_head.scratch_bytes(9000, 49152, "cpu") == trl_head.scratch_bytes(4096, 49152, "cpu")
