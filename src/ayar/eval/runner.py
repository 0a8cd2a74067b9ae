"""`ayar eval`: base vs tuned on the same prompts, metrics, overfitting and forgetting checks, a report.

    ayar eval runs/quickstart-20261125-101500
    ayar eval runs/quickstart-... --data heldout.jsonl --base /models/other
    ayar eval --baseline default --data questions.jsonl        (no run: measure before you train)

Read top to bottom: load -> prepare -> run each model -> checks -> report.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from ayar.config import EvalConfig
from ayar.config.validate import validate
from ayar.data.dataset import load_records, load_splits
from ayar.data.records import Record
from ayar.errors import AyarError
from ayar.eval.overfit import overfitting
from ayar.eval.report import verdicts, write_report
from ayar.metrics import scores as M
from ayar.metrics.extract import make_extractor
from ayar.training.allocator import peak_rss_mb

# metric -> does higher mean better? (metrics not listed are informational: length, speed, memory)
DIRECTION = {
    "exact_match": True,
    "rouge_l": True,
    "bleu": True,
    "accuracy": True,
    "f1_macro": True,
    "perplexity": False,
    "stop_rate": True,
    "preference_accuracy": True,
    "reward_margin": True,
    "anchor_perplexity": False,
}


@dataclass
class EvalResult:
    models: dict = field(default_factory=dict)  # "tuned"/"base"/"baseline" -> {metric: value}
    samples: list = field(default_factory=list)  # a few {prompt, reference, <model>: answer}
    checks: dict = field(default_factory=dict)  # overfitting, forgetting, judge
    verdict: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    out: Path | None = None


def evaluate_run(cfg: EvalConfig, console: Console | None = None) -> EvalResult:
    console = console or Console(stderr=True)
    say = lambda text: console.print(text, soft_wrap=True, highlight=False)
    from ayar.infer.load import load_engine

    # --- load ------------------------------------------------------------------------------------
    validate(cfg)
    run = train_cfg = None
    if cfg.run:
        from ayar.rundir import RunDir

        run = RunDir.open(cfg.run)
        train_cfg = run.read_config()
        engine = load_engine(run.path, log=say)
        base = cfg.base or (
            run.read_meta()["base_model"] if run.full_model.is_dir() else None
        )  # full FT: no adapter to disable
        other = load_engine(base, log=say) if base else None
    else:
        engine, other = load_engine(cfg.baseline, log=say), None
    say(f"model  {engine.source} ({engine.device})" + (f" vs {cfg.base}" if cfg.base else ""))

    # --- prepare ---------------------------------------------------------------------------------
    records, data_name = _eval_records(cfg, run, train_cfg)
    gen = [
        r for r in records if r.kind == "classification" or (r.kind == "chat" and r.messages[-1]["role"] == "assistant")
    ]
    prefs = [r for r in records if r.kind == "preference"]
    anchor = load_records(cfg.anchor)[:40] if cfg.anchor and run else []
    say(
        f"data   {len(records)} rows from {data_name}"
        + (f"; anchor {len(anchor)} rows from {cfg.anchor}" if anchor else "")
    )

    # --- run each model on the same prompts --------------------------------------------------------
    result = EvalResult(
        info={
            "data": data_name,
            "rows": len(records),
            "max_new_tokens": cfg.max_new_tokens,
            "batch_size": cfg.batch_size,
            "run": str(run.path) if run else None,
            "model": engine.source,
        }
    )
    variants = {"baseline": (engine, None)} if not run else {"tuned": (engine, None)}
    if run:
        variants["base"] = (other, None) if other else (engine, "disable_adapter")
    answers = {}
    for name, (eng, mode) in variants.items():
        say(f"eval   {name}: {len(gen)} generations, {len(prefs)} preference pairs" + (", anchor" if anchor else ""))
        ctx = eng.base_model() if mode else contextlib.nullcontext()
        with ctx:
            result.models[name], answers[name] = _measure(eng, cfg, gen, prefs, records, anchor)
    pair_logps = {name: m.pop("pair_logps") for name, m in result.models.items() if "pair_logps" in m}
    prompts = [r.conversation()[:-1] for r in gen]
    refs = [r.conversation()[-1]["content"] for r in gen]
    result.samples = [
        {"prompt": p[-1]["content"], "reference": ref, **{n: answers[n][i] for n in answers}}
        for i, (p, ref) in enumerate(zip(prompts, refs))
        if i < cfg.examples
    ]

    # --- checks ----------------------------------------------------------------------------------
    if run:
        meta = run.read_meta()
        result.checks["overfitting"] = overfitting(
            run.read_metrics(),
            patience=train_cfg.training.early_stopping_patience,
            best_step_kept=meta.get("best_step") if meta.get("steps") != meta.get("best_step") else None,
        )
        if anchor:
            t, b = result.models["tuned"]["anchor_perplexity"], result.models["base"]["anchor_perplexity"]
            change = t / b - 1
            result.checks["forgetting"] = {
                "anchor": cfg.anchor,
                "base_perplexity": b,
                "tuned_perplexity": t,
                "relative_change": change,
                "threshold": cfg.forgetting_threshold,
                "flagged": change > cfg.forgetting_threshold,
                "message": (
                    f"forgetting: anchor perplexity {b:.2f} -> {t:.2f} ({100 * change:+.1f}%, threshold "
                    f"{100 * cfg.forgetting_threshold:.0f}%)"
                )
                if change > cfg.forgetting_threshold
                else f"no forgetting flagged: anchor perplexity {b:.2f} -> {t:.2f} ({100 * change:+.1f}%)",
            }
        if "tuned" in pair_logps and "base" in pair_logps:
            shift = M.preference_shift(*pair_logps["tuned"], *pair_logps["base"])
            result.checks["preference_shift"] = {
                **shift,
                "message": (
                    f"relative to the base, the tuned model raised the chosen answer over the rejected one on "
                    f"{100 * shift['implicit_accuracy']:.0f}% of {len(prefs)} pairs (DPO's implicit-reward "
                    "accuracy; 50% = no "
                    f"preference learned), mean log-ratio margin {shift['implicit_margin']:+.3f}"
                ),
            }
        if cfg.judge_url and gen:
            from ayar.eval.judge import pairwise

            say(f"judge  {len(gen)} pairs x 2 orders via {cfg.judge_url}")
            result.checks["judge"] = pairwise(
                [p[-1]["content"] for p in prompts],
                answers["tuned"],
                answers["base"],
                cfg.judge_url,
                cfg.judge_model,
                cfg.judge_key_env,
            )
        result.verdict = verdicts(result.models["tuned"], result.models["base"], DIRECTION)

    # --- report ----------------------------------------------------------------------------------
    out = Path(cfg.out) if cfg.out else (run.path / "eval" if run else Path(f"eval-{Path(str(cfg.baseline)).name}"))
    result.out = write_report(result, out, run)
    return result


def _eval_records(cfg: EvalConfig, run, train_cfg) -> tuple[list[Record], str]:
    if cfg.data:
        records, name = load_records(cfg.data, cfg.format, cfg.columns or None), cfg.data
    else:
        splits = load_splits(train_cfg.data, train_cfg.training.seed)
        records, name = (
            (splits.test, "the run's test split") if splits.test else (splits.val, "the run's validation split")
        )
        if not records:
            raise AyarError(f"{run.path} has no held-out split (data.val_ratio was 0): pass --data FILE")
    if cfg.max_rows:
        records = records[: cfg.max_rows]
    if not records:
        raise AyarError(f"{name}: no rows to evaluate")
    return records, name


def _measure(
    engine, cfg: EvalConfig, gen: list[Record], prefs: list[Record], records: list[Record], anchor: list[Record]
):
    """All metrics of one model on the eval rows, and its answers."""
    from ayar.training.loop import evaluate

    out, answers = {}, []
    if gen:
        t0 = time.perf_counter()
        replies = engine.generate_batch(
            [r.conversation()[:-1] for r in gen],
            batch_size=cfg.batch_size,
            max_new_tokens=cfg.max_new_tokens,
            preset="deterministic",
        )
        seconds = time.perf_counter() - t0
        answers = [r.text for r in replies]
        out.update(M.generation_stats([r.new_tokens for r in replies], [r.stopped for r in replies], seconds))
        out["generation_seconds"] = seconds
        chat = [(a, r) for a, r in zip(answers, gen) if r.kind == "chat"]
        if chat:
            preds, refs = [a for a, _ in chat], [r.conversation()[-1]["content"] for _, r in chat]
            em = M.exact_match(preds, refs, make_extractor(cfg.extract, refs))
            out.update(
                exact_match=em["exact_match"],
                extracted=em["extracted"],
                rouge_l=M.rouge_l(preds, refs),
                bleu=M.bleu(preds, refs),
            )
        labelled = [(a, r.label) for a, r in zip(answers, gen) if r.kind == "classification"]
        if labelled:
            cls = M.classification([a for a, _ in labelled], [g for _, g in labelled])
            out.update({k: v for k, v in cls.items() if k != "per_class"}, per_class=cls["per_class"])
    scored = [r for r in records if r.kind != "preference"]
    if scored:
        loss = evaluate(
            engine.model,
            [engine.renderer.encode(r) for r in scored],
            cfg.batch_size,
            engine.tok.pad_token_id,
            engine.device,
        )
        out.update(mean_loss=loss, perplexity=M.perplexity(loss))
    if prefs:
        chosen = [_logp(engine, Record(r.messages, r.where), r.chosen) for r in prefs]
        rejected = [_logp(engine, Record(r.messages, r.where), r.rejected) for r in prefs]
        out.update(M.preference(chosen, rejected))
        out["pair_logps"] = (chosen, rejected)  # taken out by the caller for the tuned-vs-base shift
    if anchor:
        loss = evaluate(
            engine.model,
            [engine.renderer.encode(r) for r in anchor],
            cfg.batch_size,
            engine.tok.pad_token_id,
            engine.device,
        )
        out["anchor_perplexity"] = M.perplexity(loss)
    out["peak_rss_mb"] = peak_rss_mb()
    if torch.cuda.is_available():
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out, answers


def _logp(engine, prompt: Record, answer: list[dict]) -> float:
    """Summed log-probability of the answer turns given the prompt (trained positions of the rendered pair)."""
    from ayar.data.collate import collate
    from ayar.training.loss import loss_sum

    ex = engine.renderer.encode(Record(prompt.messages + answer, prompt.where))
    batch = {k: v.to(engine.device) for k, v in collate([ex], engine.tok.pad_token_id).items()}
    with torch.no_grad():
        s, _ = loss_sum(engine.model, batch)
    return -float(s)
