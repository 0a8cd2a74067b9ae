"""The fused LoRA training path computes what the transformers + peft modules compute: loss, every
adapter gradient, and whole training runs, on tiny random models; and it steps aside where it can't."""

import pytest
import torch

from ayar.config import LoraConfig, TrainingConfig
from ayar.data.collate import collate
from ayar.kernels import fused_decoder
from ayar.kernels import ops as kernels
from ayar.kernels.dropout import (
    FastDropout,
    draw_seeds,
    dropped_each,
    dropped_each_and_masked_sum,
    keep_masks,
    masked_sum,
)
from ayar.models.adapters import apply_method
from ayar.training.loss import loss_sum
from tests.helpers import MATH_ROWS, examples, loop_plan, make_model, make_tokenizer


def lora_model(family, targets="all-linear", rslora=False, dropout=0.0, **overrides):
    tok = make_tokenizer(family)
    model = apply_method(
        make_model(family, tok, **overrides),
        "lora",
        LoraConfig(r=4, alpha=8, dropout=dropout, target_modules=targets, rslora=rslora),
    )
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapters something to contribute
            torch.nn.init.normal_(p, std=0.3)
    return model.train(), tok


def loss_and_grads(model, batch, fused):
    model.zero_grad(set_to_none=True)
    s, n = loss_sum(model, batch, fused=fused)
    s.backward()
    return float(s.detach()), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "family,targets,rslora",
    [
        ("llama", "all-linear", False),
        ("qwen2", "all-linear", True),
        ("llama", ["q_proj", "v_proj", "down_proj"], False),
    ],
)
def test_fused_loss_and_adapter_gradients_equal_the_module_path(family, targets, rslora):
    model, tok = lora_model(family, targets, rslora)
    assert fused_decoder.usable(model, "cpu"), fused_decoder.reason(model, "cpu")
    batch = collate(examples(tok)[:3], tok.pad_token_id, packing=True)
    ref_loss, ref_n, ref_grads = loss_and_grads(model, batch, fused=False)
    loss, n, grads = loss_and_grads(model, batch, fused=True)
    assert n == ref_n and loss == pytest.approx(ref_loss, rel=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(
            grads[name], ref_grads[name], rtol=1e-4, atol=1e-5 * float(ref_grads[name].abs().max())
        )


def test_fused_path_equals_separate_padded_examples():
    # the packed row's per-example attention: the same summed loss as the examples padded in a batch
    model, tok = lora_model("llama")
    exs = examples(tok)[:4]
    assert fused_decoder.usable(model, "cpu")
    packed, n1 = loss_sum(model.eval(), collate(exs, tok.pad_token_id, packing=True), fused=True)
    padded, n2 = loss_sum(model, collate(exs, tok.pad_token_id))
    assert n1 == n2 and float(packed.detach()) == pytest.approx(float(padded.detach()), rel=1e-5)


def test_long_segments_take_the_sdpa_branch(monkeypatch):
    from ayar.kernels import varlen

    model, tok = lora_model("qwen2")
    batch = collate(examples(tok)[:3], tok.pad_token_id, packing=True)
    _, _, short = loss_and_grads(model, batch, fused=True)
    monkeypatch.setattr(varlen, "MATMUL_MAX_LEN", 4)  # every segment is "long" now
    _, _, long = loss_and_grads(model, batch, fused=True)
    for name in short:
        torch.testing.assert_close(long[name], short[name], rtol=1e-3, atol=1e-4 * float(short[name].abs().max()))


def test_lora_linear_with_dropout_masks_equals_the_plain_formula():
    torch.manual_seed(0)
    T, K, n1, n2, r = 7, 12, 5, 3, 2
    x = torch.randn(T, K, requires_grad=True)
    w, bias = torch.randn(n1 + n2, K), torch.randn(n1 + n2)
    a1, b1, a2, b2 = (torch.randn(*s, requires_grad=True) for s in ((r, K), (n1, r), (r, K), (n2, r)))
    adapters = (kernels.Adapter(0, n1, 0.5, 0.3), kernels.Adapter(n1, n1 + n2, 2.0, 0.0))
    seeds = draw_seeds(2, "cpu")
    y = kernels.lora_linear(x, w, bias, adapters, seeds, (a1, b1, a2, b2))
    keep, keep2 = keep_masks(x, seeds, (0.3, 0.0))
    assert 0 < int((~keep).sum()) < keep.numel() and bool(keep2.all())
    inverted = x * keep / 0.7
    ref = x @ w.t() + bias + torch.cat([0.5 * inverted @ a1.t() @ b1.t(), 2.0 * x @ a2.t() @ b2.t()], dim=1)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, a1, b1, a2, b2), g)
    want = torch.autograd.grad(ref, (x, a1, b1, a2, b2), g)
    torch.testing.assert_close(y, ref)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dropout_masks_drop_p_independently():
    torch.manual_seed(0)
    x = torch.empty(400, 500)
    keep, other = keep_masks(x, draw_seeds(2, "cpu"), (0.1, 0.1))
    assert keep.dtype == torch.bool and float((~keep).float().mean()) == pytest.approx(0.1, abs=0.003)
    for a, b in (
        (keep[:, :-1], keep[:, 1:]),
        (keep[:-1], keep[1:]),
        (keep, other),
    ):  # row and column neighbours, two masks
        assert float((~a & ~b).float().mean()) == pytest.approx(0.01, abs=0.002)
    assert float((~keep_masks(x, draw_seeds(1, "cpu"), (0.1,))[0] & ~keep).float().mean()) == pytest.approx(
        0.01, abs=0.002
    )
    torch.manual_seed(0)
    assert torch.equal(keep, keep_masks(x, draw_seeds(2, "cpu"), (0.1, 0.1))[0])  # seeded


@pytest.mark.parametrize("compiled", [True, False])
def test_dropout_kernels_apply_their_masks_compiled_or_not(compiled, monkeypatch):
    monkeypatch.setenv("AYAR_COMPILE", "1" if compiled else "0")
    x, seeds, ps = torch.randn(37, 53), draw_seeds(3, "cpu"), (0.2, 0.5, 0.0)
    keeps = keep_masks(x, seeds, ps)
    for got, keep in zip(dropped_each(x, seeds, ps), keeps):
        torch.testing.assert_close(got, torch.where(keep, x, 0.0))
    parts = [torch.randn(37, 53) for _ in ps]
    want = sum(torch.where(k, p * s, 0.0) for k, p, s in zip(keeps, parts, (1.0, 2.0, -0.5)))
    torch.testing.assert_close(masked_sum(parts, seeds, ps, (1.0, 2.0, -0.5)), want)
    xs, summed = dropped_each_and_masked_sum(x, parts, seeds, ps, (1.0, 2.0, -0.5))  # both from one pass
    torch.testing.assert_close(summed, want)
    for got, keep in zip(xs, keeps):
        torch.testing.assert_close(got, torch.where(keep, x, 0.0))
    # any rank: the masks follow the elements' order, so a [B, T, K] input gets the masks of its 2-D view
    x3 = x.view(1, 37, 53)
    assert all(torch.equal(a.view(37, 53), b) for a, b in zip(dropped_each(x3, seeds, ps), dropped_each(x, seeds, ps)))


def test_fast_dropout_backward_uses_the_forward_mask():
    x = torch.randn(20, 30, requires_grad=True)
    torch.manual_seed(3)
    y = FastDropout(0.25).train()(x)
    torch.manual_seed(3)
    (keep,) = keep_masks(x, draw_seeds(1, "cpu"), (0.25,))
    torch.testing.assert_close(y, torch.where(keep, x / 0.75, 0.0))
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.where(keep, g / 0.75, 0.0))


def test_fast_dropout_without_gradients_still_drops_as_torch_does():
    """GRPO samples its answers in training mode under no_grad: the dropout still applies there, as torch's (nothing
    is kept for a backward, and torch's is quicker on a token's few rows)."""
    x = torch.ones(400, 50)
    with torch.no_grad():
        torch.manual_seed(5)
        y = FastDropout(0.25).train()(x)
        torch.manual_seed(5)
        expected = torch.nn.functional.dropout(x, 0.25, True)
    torch.testing.assert_close(y, expected)
    assert 0.2 < (y == 0).float().mean() < 0.3
    assert torch.equal(FastDropout(0.25).eval()(x), x)


@pytest.mark.parametrize("compiled", [True, False])
def test_pointwise_kernels_match_their_modules(compiled, monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    monkeypatch.setenv("AYAR_COMPILE", "1" if compiled else "0")
    torch.manual_seed(0)
    x = torch.randn(9, 16, requires_grad=True)
    norm = LlamaRMSNorm(16, eps=1e-5)
    torch.nn.init.normal_(norm.weight)
    g = torch.randn(9, 16)
    want = torch.autograd.grad(norm(x), x, g)[0]
    got = torch.autograd.grad(kernels.rms_norm(x, norm.weight.detach(), 1e-5), x, g)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    qkv = torch.randn(9, 4 * 8, requires_grad=True)  # [T, (3 rotated + 1 copied heads) * d]
    q = qkv[:, :24].view(9, 3, 8)
    angles = torch.randn(9, 1, 4)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    ref, _ = apply_rotary_pos_emb(
        q.transpose(0, 1)[None], q.transpose(0, 1)[None], cos.transpose(0, 1), sin.transpose(0, 1)
    )
    gq, gv = torch.randn(9, 3, 8), torch.randn(9, 1, 8)
    want = torch.autograd.grad(ref[0].transpose(0, 1), qkv, gq)[0] + torch.cat([torch.zeros(9, 24), gv.view(9, 8)], 1)
    out, v = kernels.rope_split(qkv, cos, sin, 3)
    torch.testing.assert_close(out, ref[0].transpose(0, 1))
    torch.testing.assert_close(v, qkv[:, 24:].view(9, 1, 8))
    torch.testing.assert_close(torch.autograd.grad((out, v), qkv, (gq, gv))[0], want)

    gu = torch.randn(9, 2 * 16, requires_grad=True)
    gate, up = gu[:, :16], gu[:, 16:]
    ref = torch.nn.functional.silu(gate) * up
    want = torch.autograd.grad(ref, gu, g)[0]
    out = kernels.swiglu(gu)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(torch.autograd.grad(out, gu, g)[0], want, rtol=1e-5, atol=1e-5)


def test_training_with_fused_kernels_follows_the_module_path(tmp_path):
    from ayar.training.loop import run_loop

    losses = {}
    for fused in (True, False):
        model, tok = lora_model("llama")
        tcfg = TrainingConfig(
            learning_rate=3e-2, batch_size=4, max_steps=5, warmup_ratio=0, tracker="none", fused=fused
        )
        logs = []
        exs = examples(tok)
        run_loop(
            model,
            exs,
            [],
            tcfg,
            plan=loop_plan(model, tcfg, exs),
            pad_id=tok.pad_token_id,
            ckpt_root=tmp_path / str(fused),
            on_log=logs.append,
        )
        losses[fused] = [r["loss"] for r in logs]
        # after the loop every projection owns its weight again (a merged model could be saved whole)
        base = model.get_base_model()
        ptrs = [p.untyped_storage().data_ptr() for n, p in base.named_parameters() if "base_layer.weight" in n]
        assert len(set(ptrs)) == len(ptrs)
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    assert losses[True][-1] < losses[True][0]


def test_fused_adapter_saves_and_reloads_onto_a_fresh_base(tmp_path):
    from ayar.models.adapters import load_adapter

    model, tok = lora_model("qwen2")
    batch = collate(examples(tok)[:2], tok.pad_token_id)
    assert fused_decoder.usable(model, "cpu")  # restacks q/k/v and gate/up weights
    model.eval()
    with torch.no_grad():
        want = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    model.save_pretrained(tmp_path / "adapter")
    fresh = load_adapter(make_model("qwen2", tok), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        got = fresh(**{k: v for k, v in batch.items() if k != "labels"}).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "case,expected",
    [
        ("gemma", "model type 'gemma'"),
        ("mistral-sliding", "sliding-window"),
        ("dora", "DoRA"),
        ("full", "trainable weights besides LoRA"),
        ("cuda", "CPU only"),
    ],
)
def test_fused_path_names_why_it_does_not_apply(case, expected):
    if case in ("gemma", "mistral-sliding"):
        family = "gemma" if case == "gemma" else "mistral"
        model, _ = lora_model(family, **({"sliding_window": 16} if family == "mistral" else {}))
    elif case == "dora":
        tok = make_tokenizer("llama")
        model = apply_method(make_model("llama", tok), "dora", LoraConfig(r=4, alpha=8, dropout=0.0))
    elif case == "full":
        tok = make_tokenizer("llama")
        model = apply_method(make_model("llama", tok), "full", LoraConfig())
    else:
        model, _ = lora_model("llama")
    device = "cuda" if case == "cuda" else "cpu"
    assert expected in (fused_decoder.reason(model, device) or "")
    assert not fused_decoder.usable(model, device)


def system_examples(tok, n=4):
    from ayar.data.records import Record
    from ayar.data.render import Renderer

    r = Renderer(tok, max_length=128)
    system = {"role": "system", "content": "You are a careful math tutor: show each step, then the answer."}
    return [
        r.render(
            Record(
                [system, {"role": "user", "content": x["instruction"]}, {"role": "assistant", "content": x["output"]}],
                f"mem:{i}",
            )
        )
        for i, x in enumerate(MATH_ROWS[:n])
    ]


@pytest.mark.parametrize("long_segments", [False, True])
def test_a_shared_prefix_gives_the_same_loss_and_gradients(long_segments, monkeypatch):
    from ayar.data.collate import MIN_SHARED_PREFIX, shared_prefix_length
    from ayar.kernels import varlen
    from ayar.training.loop import example_tokens

    if long_segments:
        monkeypatch.setattr(varlen, "MATMUL_MAX_LEN", 4)  # torch's kernel with an explicit mask
    model, tok = lora_model("llama", dropout=0.0)
    exs = system_examples(tok)
    n = shared_prefix_length(exs)
    assert n >= MIN_SHARED_PREFIX
    shared = collate(exs, tok.pad_token_id, packing=True, share_prefix=True)
    plain = collate(exs, tok.pad_token_id, packing=True)
    assert int(shared["shared_prefix"]) == n and shared["input_ids"].shape[1] == plain["input_ids"].shape[1] - 3 * n
    assert example_tokens(shared) == example_tokens(plain) == sum(len(e.input_ids) for e in exs)
    ref_loss, ref_n, ref_grads = loss_and_grads(model, plain, fused=False)
    loss, n_trained, grads = loss_and_grads(model, shared, fused=True)
    assert n_trained == ref_n and loss == pytest.approx(ref_loss, rel=1e-5)
    for name in grads:
        torch.testing.assert_close(
            grads[name], ref_grads[name], rtol=1e-4, atol=1e-4 * float(ref_grads[name].abs().max())
        )


def test_a_trained_opening_is_not_shared():
    from ayar.data.collate import shared_prefix_length
    from ayar.data.render import Example

    prompt_only = [
        Example([5, 6, 7, 8, 9, 1], [-100] * 4 + [9, 1], "a"),
        Example([5, 6, 7, 8, 2, 3], [-100] * 4 + [2, 3], "b"),
    ]
    assert shared_prefix_length(prompt_only) == 3  # token 4 is trained: the opening stops before its predictor
    all_trained = [Example(e.input_ids, e.input_ids, e.where) for e in prompt_only]  # train_on_prompt
    assert shared_prefix_length(all_trained) == 0
    assert shared_prefix_length(prompt_only[:1]) == 0


@pytest.mark.parametrize("block", [7, 50, 1024])  # online softmax over 8 blocks (the last one short), one, the default
def test_chunked_linear_cross_entropy_equals_the_plain_loss_and_gradient(block, monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(kernels, "VOCAB_BLOCK", block)
    h, w, t = torch.randn(23, 16, requires_grad=True), 3 * torch.randn(50, 16), torch.randint(0, 50, (23,))
    t[:4] = torch.tensor([0, 6, 7, 49])  # targets at the blocks' edges
    got = kernels.linear_cross_entropy(h, w, t, chunk=5)  # 5 chunks, the last one short
    want = torch.nn.functional.cross_entropy(h @ w.t(), t, reduction="sum")
    torch.testing.assert_close(got, want)
    # softmax @ W summed in another order (online: block by block, rescaled): rounding, within 1e-5 relative
    torch.testing.assert_close(
        torch.autograd.grad(2 * got, h)[0], torch.autograd.grad(2 * want, h)[0], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_online_and_whole_vocabulary_chunks_agree(dtype):
    """The CPU path (online softmax over vocabulary blocks) against the GPU one (a chunk's whole logits)."""
    torch.manual_seed(0)
    h, w, t = torch.randn(9, 16).to(dtype), (3 * torch.randn(50, 16)).to(dtype), torch.randint(0, 50, (9,))
    grads = [torch.empty_like(h), torch.empty_like(h)]
    losses = [kernels._chunk_online(h, w, t, grads[0], block=8), kernels._chunk_whole(h, w, t, grads[1])]
    tol = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(losses[0], losses[1], **tol)
    torch.testing.assert_close(grads[0], grads[1], **tol)
    assert kernels._chunk_online(h, w, t, None, block=8) == losses[0]  # no gradient wanted: the same loss


def test_dropout_kernels_compile_once_for_any_probability_and_scale(monkeypatch):
    import warnings

    from ayar.kernels import dropout

    monkeypatch.setenv("AYAR_COMPILE", "1")
    x, seeds = torch.randn(8, 12), draw_seeds(2, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a compile failure (e.g. torch's recompile limit) warns
        # but not torch's own deprecation notices: the first compile in a process imports torch.jit's (seen failing
        # the compile where this test was the first of its pytest worker to compile)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        for k in range(12):
            p = 0.01 + 0.03 * k
            masked_sum([x, x], seeds, (p, p / 2), (1 / (1 - p), k))
            dropped_each(x, seeds, (p, p / 3))
    assert not dropout._masked_sum.failed and not dropout._dropped_each.failed


@pytest.mark.parametrize(
    "dtype,prefix,block",
    [(torch.float32, 0, 128), (torch.float32, 3, 128), (torch.float32, 3, 2), (torch.bfloat16, 3, 3)],
)
def test_packed_attention_node_equals_autograd_through_the_segments(dtype, prefix, block, monkeypatch):
    # the one-node attention (PackedAttention; segments' queries in blocks of about `block` rows) against the
    # per-segment ops run by autograd: outputs and the gradient reaching the q/k/v projection's output
    monkeypatch.setattr(fused_decoder, "QUERY_BLOCK", block)
    torch.manual_seed(0)
    H, G, d = 4, 2, 8
    bounds = [0, prefix, prefix + 5, prefix + 12, prefix + 13] if prefix else [0, 5, 12, 13]
    T = bounds[-1]
    qkv = torch.randn(T, (H + 2 * G) * d, dtype=dtype)
    angles = torch.randn(T, 1, d // 2)
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)
    g = torch.randn(T, H * d, dtype=dtype)

    def run(node):
        x = qkv.clone().requires_grad_()
        qk, v = kernels.rope_split(x, cos, sin, H + G)
        if node:
            out = fused_decoder.PackedAttention.apply(qk, v, H, tuple(bounds), 0.3, prefix)
        else:
            out = fused_decoder.attention(qk[:, :H], qk[:, H:], v, bounds, 0.3, prefix)
        return out, torch.autograd.grad(out, x, g)[0]

    (out, grad), (ref, ref_grad) = run(True), run(False)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(grad, ref_grad, **tol)
    assert float(grad[:, (H + G) * d :].abs().sum()) > 0 and float(grad[:, H * d : (H + G) * d].abs().sum()) > 0


def test_pointwise_kernels_compile_one_variant_whatever_the_grad_mode():
    # they run inside autograd Functions; a variant per grad mode / requires_grad / rank used to add up to
    # torch's recompile limit in one process (then eager ops, with a warning)
    from torch._dynamo.utils import counters

    from ayar.kernels.compiled import pointwise

    def twice_plus(a, b):
        return a * 2 + b

    f = pointwise(twice_plus)
    x = torch.randn(5, 3)
    f(x, x)
    graphs = counters["stats"]["unique_graphs"]
    out = f(torch.randn(5, 3, requires_grad=True), x)
    with torch.no_grad():
        f(x, x)
    f(torch.randn(7, 3, requires_grad=True), torch.randn(7, 3))
    assert counters["stats"]["unique_graphs"] == graphs and not f.failed and not out.requires_grad
