"""The Trainer stages' memory plan (DPO family, reward, GRPO, classification: training/trl_stage.py): their passes are
their trainers' (padded rows through transformers + peft modules, the whole micro-batch at once), then the stage's
head; which rows a trainer leaves out. `RunPlan.with_trainer_memory` and `ayar plan` read it."""

from __future__ import annotations

from dataclasses import dataclass

from ayar.models.device import Placement
from ayar.training.memory import QUANTIZED, Layout, MemoryPlan, Shape, Sharding


@dataclass(frozen=True)
class TrainerPass:
    """A Trainer stage's largest forward: `rows` rows padded to `row_len` tokens, `trained` of them trained, and
    what the head computes from them (training/memory.py TRAINER_HEADS)."""

    rows: int
    row_len: int
    trained: int
    head: str


def trainer_head(cfg) -> str:
    """What the stage's trainer computes past the last hidden states (TRL's trainers as ayar builds them)."""
    if cfg.task == "classification" or cfg.stage == "reward":
        return "score"
    if cfg.stage == "dpo" and cfg.preference.loss in ("orpo", "simpo"):
        return "logits"
    return "fused"


def trainer_drops(cfg, tok, records, max_length: int | None = None) -> list[tuple[object, str]]:
    """The rows the stage's trainer leaves out, each with why (said before training: training/trl_stage.py): TRL's
    DPO, IPO and KTO drop a pair whose prompt alone fills max_length (nothing of its answers would be left to train
    on); its reward trainer drops a pair either of whose halves is longer than max_length, rather than cut it."""
    cap = max_length or cfg.data.max_length
    if tok is None or cfg.task == "classification" or cfg.stage not in ("dpo", "reward"):
        return []
    renderer = _renderer(cfg, tok, cap)
    found = ((r, _drop_reason(cfg, tok, renderer, r, cap)) for r in records)
    return [(r, why) for r, why in found if why]


def _drop_reason(cfg, tok, renderer, r, cap: int, halves: list | None = None) -> str | None:
    """Why the stage's trainer leaves the pair `r` out (None: it keeps it); `halves`: the pair already rendered."""
    if cfg.stage == "reward":
        n = max(e.full_length for e in halves or _halves(renderer, r))
        return f"its longer half is {n} tokens, over data.max_length={cap}" if n > cap else None
    if cfg.stage == "dpo" and cfg.preference.loss in ("dpo", "ipo", "kto"):
        n = len(tok(renderer.prompt_text(r.messages), add_special_tokens=False)["input_ids"])
        return (
            f"its prompt alone is {n} tokens, data.max_length={cap}: no answer token would be left"
            if n >= cap
            else None
        )
    return None


def _renderer(cfg, tok, cap: int):
    from ayar.data.render import Renderer

    renderer = Renderer.from_config(tok, cfg.data)
    renderer.max_length = cap
    return renderer


def _halves(renderer, r) -> list:
    """A preference pair as two rows: prompt + chosen, prompt + rejected."""
    from ayar.data.records import Record

    return [renderer.encode(Record(r.messages, r.where, chosen=c)) for c in (r.chosen, r.rejected)]


def trainer_pass(cfg, tok, records, batch_size: int | None = None, max_length: int | None = None) -> TrainerPass:
    """The worst micro-batch of a Trainer stage: its `batch_size` longest examples together, each as the stage feeds
    it (DPO, IPO, ORPO, SimPO, reward: prompt + chosen and prompt + rejected, both halves padded to the longest
    row; KTO: each pair as two rows, liked and disliked; GRPO: the rendered prompt and `grpo.max_completion_length`
    sampled tokens; classification: the text), cut at `max_length` (default data.max_length), of the rows the
    trainer keeps (`trainer_drops`). Without a tokenizer (`tok` None: a model folder holding its config alone) every
    row is as long as it may be."""
    n, cap = batch_size or cfg.training.batch_size, max_length or cfg.data.max_length
    head = trainer_head(cfg)
    if tok is None:  # no tokenizer to measure the data with: every row as long as it may be, the worst case
        pairs = cfg.task != "classification" and cfg.stage in ("dpo", "reward") and cfg.preference.loss != "kto"
        rows, budget = n * (2 if pairs else 1), cfg.grpo.max_completion_length if cfg.stage == "grpo" else 0
        return TrainerPass(rows, cap + budget, rows * (budget or cap), head)
    if cfg.task == "classification":
        lengths = sorted((min(len(tok(r.text)["input_ids"]), cap) for r in records), reverse=True)[:n]
        return TrainerPass(len(lengths), max(lengths, default=0), 0, head)
    renderer = _renderer(cfg, tok, cap)
    if cfg.stage == "grpo":
        budget = cfg.grpo.max_completion_length
        # the prompt GRPO samples from (the reference answer left out), uncut: TRL's GRPO has no prompt limit
        prompts = [len(tok(renderer.prompt_text(r.prompt_and_reference()[0]))["input_ids"]) for r in records]
        return TrainerPass(n, max(prompts, default=0) + budget, n * budget, head)
    rendered = ((r, _halves(renderer, r)) for r in records)  # each pair rendered once, for the check and the pass
    pairs = [h for r, h in rendered if not _drop_reason(cfg, tok, renderer, r, cap, h)]
    if cfg.stage == "dpo" and cfg.preference.loss == "kto":  # each completion its own row
        rows = sorted((e for p in pairs for e in p), key=lambda e: len(e.input_ids), reverse=True)[:n]
        return TrainerPass(len(rows), max((len(e.input_ids) for e in rows), default=0),
                           sum(e.n_trained for e in rows), head)  # fmt: skip
    pairs = sorted(pairs, key=lambda p: max(len(e.input_ids) for e in p), reverse=True)[:n]
    longest = max((len(e.input_ids) for p in pairs for e in p), default=0)
    return TrainerPass(2 * len(pairs), longest, sum(e.n_trained for p in pairs for e in p), head)


def plan_trainer(
    shape: Shape,
    cfg,
    p: TrainerPass,
    placement: Placement,
    available: int | None = None,
    sharding: Sharding | None = None,
    checkpointing: bool | None = None,
) -> MemoryPlan:
    """The memory plan of a Trainer stage's pass `p` (`trainer_pass`), per rank under `sharding`; gradient
    checkpointing as configured unless `checkpointing` says."""
    from ayar.training.memory import per_rank, plan_trainer_memory, zero3_linear_inputs

    ckpt = bool(cfg.training.gradient_checkpointing) if checkpointing is None else checkpointing
    # what LoRA's dropout keeps for backward: nothing for TRL's preference and reward trainers, which ayar builds
    # with `disable_dropout` (every dropout at p=0, which torch skips); for GRPO and classification each adapter's
    # dropped-out input, as in ayar's own loop, whose way of computing adapters these stages take under every
    # strategy (trl_stage.compute_as_own_loop)
    dropout = cfg.lora.dropout > 0 and (cfg.stage == "grpo" or cfg.task == "classification")
    plan = plan_trainer_memory(
        shape, weight_dtype=placement.dtype_name, device=placement.device, rows=p.rows, row_len=p.row_len,
        trained=p.trained, head=p.head, method=cfg.method, available=available, dropout=dropout,
        checkpointing=ckpt,
    )  # fmt: skip
    if not sharding:
        return plan
    kept = zero3_linear_inputs(shape, p.rows * p.row_len, placement.dtype_name, dropout, ckpt)
    return per_rank(plan, shape, sharding, kept, cfg.method in QUANTIZED)


def plan_trainer_for(
    shape: Shape, cfg, tok, records, placement: Placement, available: int | None = None, sharding=None
) -> tuple[MemoryPlan, list[str], Layout]:
    """(memory plan, settings that would fit, layout) of a Trainer stage, as `plan_memory_for` is for ayar's own loop:
    gradient checkpointing as configured, or left to auto, on only when the run cannot fit without it."""
    passes = {}  # (batch size, max length) -> its pass: the data is rendered once for each

    def ask(checkpointing=None, batch_size=None, max_length=None):
        key = (batch_size, max_length)
        if key not in passes:
            passes[key] = trainer_pass(cfg, tok, records, batch_size, max_length)
        return plan_trainer(shape, cfg, passes[key], placement, available, sharding, checkpointing)

    choice = cfg.training.gradient_checkpointing
    plan = ask()
    layout = Layout(0, False, False, bool(choice))
    if choice is None and not plan.fits and ask(checkpointing=True).fits:
        return ask(checkpointing=True), [], Layout(0, False, False, True)
    if plan.fits:
        return plan, [], layout
    fixes = []
    if not choice and ask(checkpointing=True).fits:
        fixes.append("training.gradient_checkpointing=true (recomputes each layer's forward in backward: ~30% slower)")
    bs, ga = cfg.training.batch_size, cfg.training.grad_accum
    b = bs
    while b > 1:
        b //= 2
        if ask(batch_size=b).fits:
            fixes.append(f"training.batch_size={b} training.grad_accum={ga * bs // b} (same effective batch)")
            break
    for max_len in (cfg.data.max_length // 2, cfg.data.max_length // 4):
        if max_len >= 64 and ask(max_length=max_len).fits:
            fixes.append(f"data.max_length={max_len} (longer rows are truncated)")
            break
    if placement.dtype_name == "float32":
        fixes.append("model.dtype=bfloat16 (halves weights and activations; on CPU only fast with AVX512-BF16/AMX)")
    return plan, fixes, layout
