"""`ayar rlaif`: synthesize -> sft -> label -> dpo, each step a file or a run directory under `out`:

    out/config.yaml           the loop's config (a rerun must match it where it shaped finished work)
    out/critiques.jsonl       synthesize: {id, prompt, answer, critique, revision, principle, judge}
    out/sft.jsonl             ... as SFT data: the prompt and the revision (messages format)
    out/sft/                  sft: a run directory (ayar train), the policy for the label step
    out/pairs.jsonl           label: preference pairs with provenance (ayar data lint and stage: dpo take them)
    out/dpo/                  dpo: a run directory, chained from out/sft
    out/reward/, out/grpo/    or instead: a reward model on the pairs, then GRPO with its score as the reward
    out/state.json            which steps finished, rows and skips per step

A rerun skips finished steps, finishes a half-done file from where it stopped, and resumes a half-done run.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from ayar.config import RlaifConfig, config_to_dict
from ayar.errors import AyarError, ConfigError, DataError
from ayar.fsutil import write_atomic
from ayar.rlaif.constitution import load_constitution
from ayar.rlaif.rowlog import RowLog
from ayar.rlaif.steps import Settings, label, synthesize

ORDER = ("synthesize", "sft", "label", "dpo", "reward", "grpo")
# what shaped finished work: a rerun with other values would mix two loops in one folder
BINDING = (
    "policy", "prompts", "max_prompts", "constitution", "seed", "max_new_tokens", "temperature", "top_p", "order_rule",
)  # fmt: skip


def run_rlaif(cfg: RlaifConfig, log=print, progress=None) -> dict:
    """Run the steps `cfg.steps` names, in the loop's order; returns state.json's contents. `progress(step,
    total)` returns a tick(n) callable (a progress bar); default: none."""
    out = Path(cfg.out)
    _check_same_loop(cfg, out)
    state_path = out / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"steps": {}}
    steps = [s for s in ORDER if s in cfg.steps]
    needs_data = [s for s in steps if s in ("synthesize", "label")]
    prompts = load_prompts(cfg) if needs_data else []
    principles = load_constitution(cfg.constitution) if needs_data else []
    settings = Settings(
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        judge_tokens=cfg.judge.max_tokens,
        concurrency=cfg.judge.concurrency,
        min_confidence=cfg.min_confidence,
        order_rule=cfg.order_rule,
    )
    judge = make_judge(cfg.judge, log) if needs_data else None
    try:
        for step in steps:
            if state["steps"].get(step, {}).get("status") == "done":
                log(f"rlaif  {step}: done earlier, skipped")
                continue
            started = time.perf_counter()
            if step in ("synthesize", "label"):
                file = out / ("critiques.jsonl" if step == "synthesize" else "pairs.jsonl")
                rows = RowLog(file)
                policy_source = _policy(cfg, out) if step == "label" else cfg.policy
                log(f"rlaif  {step}: {len(prompts)} prompts, policy {policy_source}, judge {judge.name} -> {file}")
                from ayar.infer.load import load_engine

                policy = load_engine(policy_source, log=lambda *_: None)
                tick = progress(step, len(prompts)) if progress else (lambda n: None)
                (synthesize if step == "synthesize" else label)(
                    prompts, policy, judge, principles, rows, settings, tick
                )
                result = {"rows": len(rows.rows), "skipped": rows.reasons(), "file": str(file)}
                if not rows.rows:
                    raise AyarError(
                        f"rlaif {step}: no rows were made from {len(prompts)} prompts (skipped: {rows.reasons()}); "
                        "check the judge first (`ayar rlaif agreement`); a judge that always names the first "
                        "answer makes only ties (order_rule: average uses its probabilities instead)"
                    )
                if step == "synthesize":
                    result["sft_data"] = str(_write_sft_data(rows, out / "sft.jsonl"))
            else:
                result = {"run": str(_train(cfg, step, out, log))}
            state["steps"][step] = {"status": "done", "seconds": round(time.perf_counter() - started, 1), **result}
            write_atomic(state_path, json.dumps(state, indent=1))
            log(f"rlaif  {step}: {_summary(state['steps'][step])}")
    finally:
        if judge is not None and hasattr(judge, "close"):
            judge.close()
    return state


def load_prompts(cfg: RlaifConfig) -> list[list[dict]]:
    """Each row's conversation up to its last answer (a preference row's prompt turns), ending with a user turn."""
    from ayar.data.dataset import load_records, parse_sources

    records = [r for src in parse_sources(cfg.prompts, field="prompts") for r in load_records(src)]
    prompts = []
    for rec in records:
        turns = list(rec.messages)
        if rec.kind == "chat" and turns and turns[-1]["role"] == "assistant":
            turns = turns[:-1]
        if rec.kind in ("text", "classification") or not turns or turns[-1]["role"] != "user":
            raise DataError(
                f"{rec.where}: not a prompt: rlaif takes conversations that end with a user turn, "
                "chat rows (their last answer is dropped) or preference rows"
            )
        prompts.append(turns)
    if cfg.max_prompts:
        prompts = prompts[: cfg.max_prompts]
    if not prompts:
        raise DataError(f"prompts: {cfg.prompts!r} has no rows")
    return prompts


def make_judge(judge_cfg, log=print):
    """The feedback model the config names: an endpoint (`url`) or a local model / run (`local`)."""
    from ayar.infer.feedback import EndpointFeedback, EngineFeedback

    if bool(judge_cfg.url) == bool(judge_cfg.local):
        raise ConfigError(
            "judge: give either judge.url (an OpenAI-compatible endpoint) or judge.local (a model or "
            "run directory), not both or neither"
        )
    if judge_cfg.url:
        return EndpointFeedback.from_settings(judge_cfg)
    from ayar.infer.load import load_engine

    return EngineFeedback(load_engine(judge_cfg.local, log=log), name=str(judge_cfg.local))


def _policy(cfg: RlaifConfig, out: Path) -> str:
    """The label step's policy: the SFT run when the loop trained one, else the given policy."""
    return str(out / "sft") if "sft" in cfg.steps else cfg.policy


def _write_sft_data(rows: RowLog, path: Path) -> Path:
    lines = [
        json.dumps({"messages": [*r["prompt"], {"role": "assistant", "content": r["revision"]}]}, ensure_ascii=False)
        for r in sorted(rows.rows, key=lambda r: r["id"])
    ]
    if not lines:
        raise AyarError(f"{rows.path}: no revisions were made (all skipped: {rows.reasons()}); check the judge")
    write_atomic(path, "\n".join(lines) + "\n")
    return path


def _train(cfg: RlaifConfig, step: str, out: Path, log) -> Path:
    """A training step as an ordinary run at out/<step> (resumed when a kill left it half done): sft on the
    revisions; dpo, or reward then grpo (with that reward model's score as the reward), on the pairs."""
    from ayar.config.loader import from_dict
    from ayar.config.schema import TrainConfig
    from ayar.rundir import RunDir
    from ayar.training.dispatch import train

    run_dir = out / step
    if (run_dir / "run.json").is_file():
        if RunDir.open(run_dir).read_meta().get("status") == "completed":
            return run_dir
        log(f"rlaif  {step}: resuming {run_dir}")
        return train(resume=run_dir).path
    raw = copy.deepcopy(getattr(cfg, step) or {})
    for key in ("model", "data", "output"):
        if not isinstance(raw.setdefault(key, {}), dict):
            raise ConfigError(f"{step}.{key}: expected a mapping")
    taken = [
        f"{step}.{k}" for k in ("model.name", "data.train", "output.path") if k.split(".")[1] in raw[k.split(".")[0]]
    ]
    if step == "grpo" and not (out / "reward" / "adapter").is_dir():
        raise AyarError(f"rlaif grpo: {out / 'reward'} has no reward model yet: run the reward step first")
    if taken or raw.get("stage") not in (None, step):
        raise ConfigError(
            f"{', '.join(taken) or step + '.stage'}: set by the rlaif loop (policy, its data, out/{step}); leave it out"
        )
    data = out / ("sft.jsonl" if step == "sft" else "pairs.jsonl")
    if not data.is_file():
        raise AyarError(f"rlaif {step}: {data} does not exist yet: run the step that writes it first")
    # the reward model starts from the given policy (a scorer, not a chained policy)
    raw["model"]["name"] = cfg.policy if step in ("sft", "reward") else _policy(cfg, out)
    raw["data"]["train"] = str(data)
    raw["output"]["path"] = str(run_dir)
    raw["stage"] = step
    if step == "grpo":
        g = raw.setdefault("grpo", {})
        g["rewards"] = [*(g.get("rewards") or []), f"model:{out / 'reward'}"]  # with any the config names
    return train(from_dict(TrainConfig, raw, where=f"rlaif {step} settings")).path


def _check_same_loop(cfg: RlaifConfig, out: Path) -> None:
    import yaml

    saved_path = out / "config.yaml"
    now = config_to_dict(cfg)
    if saved_path.is_file():
        saved = yaml.safe_load(saved_path.read_text()) or {}
        changed = [k for k in BINDING if saved.get(k) != now.get(k)]
        if changed:
            was = ", ".join(f"{k}: {saved.get(k)!r}" for k in changed)
            raise ConfigError(
                f"{out} holds a loop made with other {', '.join(changed)} ({was}): use a new `out` folder, or the "
                "same settings to continue it"
            )
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(saved_path, yaml.safe_dump(now, sort_keys=False, allow_unicode=True))


def _summary(entry: dict) -> str:
    if "run" in entry:
        return f"{entry['run']} ({entry['seconds']:.0f}s)"
    skipped = ", ".join(f"{n} {k}" for k, n in sorted(entry["skipped"].items())) or "none"
    return f"{entry['rows']} rows in {entry['file']} ({entry['seconds']:.0f}s; skipped: {skipped})"
