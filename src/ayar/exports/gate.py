"""The release gate: an exported artifact, loaded in its own runtime (transformers for merged models,
onnxruntime-genai for ONNX, llama.cpp for GGUF), must behave like the run's PEFT model.

For each fixed prompt:
- prompt tokens: the artifact's tokenizer and chat template render the same token ids as training did;
- stops: when the run's model ends its greedy answer with an end-of-turn token, the artifact's greedy
  answer (with the artifact's own stop settings) ends too, so the export does not ramble past its turn;
- agreement: teacher-forced on the run's greedy answer, the share of positions where the artifact's top-1
  token equals the run's (a quantized artifact may flip near-ties and then drift, so string equality
  would be the wrong test), its first divergence, and the largest log-probability error.
Tolerances depend on what the export is: exact-ish for fp32, looser for 16-bit and quantized weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ayar.errors import DataError

PROMPTS = [
    [
        {
            "role": "user",
            "content": "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
            "clips in May. How many clips did Natalia sell altogether in April and May?",
        }
    ],
    [{"role": "user", "content": "Give three tips for staying healthy."}],
    [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    [
        {"role": "user", "content": "Write a haiku about autumn."},
        {"role": "assistant", "content": "Leaves drift, red and gold."},
        {"role": "user", "content": "Now one about winter."},
    ],
]

# minimum teacher-forced top-1 agreement by export kind
TOLERANCE = {
    "fp32": 0.99,
    "lora": 0.99,  # vLLM export, checked as base + adapter in fp32
    "merged": 0.95,  # vLLM export, merged in fp16
    "bf16": 0.90,
    "fp16": 0.95,
    "f16": 0.95,
    "q8_0": 0.90,
    "lora-f16": 0.95,  # GGUF base + GGUF LoRA, applied unmerged by llama.cpp
    "lora-q8_0": 0.90,
    "q4_k_m": 0.75,
    "q4_0": 0.75,
    "int8": 0.85,
    "int4": 0.75,
}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class GateReport:
    artifact: str
    kind: str
    checks: list[Check] = field(default_factory=list)
    prompts: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def write(self, path: Path) -> None:
        path.write_text(json.dumps({"ok": self.ok, **asdict(self)}, indent=1))


class MergedArtifact:
    """A merged export, loaded with transformers as a user would: its own tokenizer, template, generation config
    (not through ayar's transformers engine, which renders with the run's settings: the gate must see what a
    user of the folder gets). The part of the Engine protocol (infer/base.py) the gate reads."""

    def __init__(self, path: str | Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()
        eos = self.model.generation_config.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, list) else [eos])

    def token_name(self, i: int) -> str:
        return self.tok.convert_ids_to_tokens(i)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        out = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(out["input_ids"])

    def greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        with torch.no_grad():  # the artifact's own generation config: its stop tokens, greedy
            out = self.model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, len(ids) :].tolist()

    def logprobs(self, ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(self.model(torch.tensor([ids])).logits[0].float(), -1)


def verify(engine, artifact, kind: str, where: str, max_new_tokens: int = 48, prompts=None, log=print) -> GateReport:
    """Compare `artifact` (an engine of the export's runtime) with the run's model (`engine`, the PEFT model
    in fp32) on fixed prompts."""
    report = GateReport(where, kind)
    tolerance = TOLERANCE.get(kind, 0.75)
    agreements, mismatched, runaway = [], [], []
    for n, messages in enumerate(prompts or PROMPTS):
        try:
            expected = engine.prompt_ids(messages)
        except DataError:  # a multi-turn prompt for an alpaca-template run
            continue
        got = artifact.prompt_ids(messages)
        row = {"prompt": n}
        if got != expected:
            at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
            mismatched.append(
                f"prompt {n}: token {at} is {_show(artifact.token_name, got, at)} in the export but "
                f"{_show(engine.token_name, expected, at)} in training "
                f"({len(got)} vs {len(expected)} tokens)"
            )
        reference = engine.greedy(expected, max_new_tokens)
        stopped = bool(reference) and reference[-1] in engine.stop_ids
        ref_lp = engine.logprobs(expected + reference)
        art_lp = artifact.logprobs(expected + reference)
        span = slice(len(expected) - 1, len(expected) - 1 + len(reference))
        top1 = art_lp[span].argmax(-1).tolist()
        agree = sum(a == b for a, b in zip(top1, reference)) / max(1, len(reference))
        first = next((i for i, (a, b) in enumerate(zip(top1, reference)) if a != b), None)
        err = float((art_lp[span] - ref_lp[span]).abs().max()) if len(reference) else 0.0
        agreements.append(agree)
        row.update(
            reference_tokens=len(reference),
            reference_stopped=stopped,
            top1_agreement=round(agree, 4),
            first_divergence=first,
            max_logprob_error=round(err, 4),
        )
        if stopped:
            answer = artifact.greedy(expected, max_new_tokens + 16)
            row["export_stopped"] = bool(answer) and answer[-1] in artifact.stop_ids
            if not row["export_stopped"]:
                runaway.append(
                    f"prompt {n}: the run's model ends its answer after {len(reference)} tokens; the export "
                    f"did not stop within {len(answer)} (its stop tokens: {sorted(artifact.stop_ids)})"
                )
        report.prompts.append(row)
        log(f"  prompt {n}: top-1 agreement {agree:.3f}, first divergence {first}, max log-prob error {err:.3g}")
    report.checks.append(
        Check(
            "prompt tokens",
            not mismatched,
            "; ".join(mismatched) or f"identical on {len(report.prompts)} prompts (tokenizer + chat template)",
        )
    )
    report.checks.append(
        Check(
            "stops at end of turn",
            not runaway,
            "; ".join(runaway) or "every answer the run's model ends, the export ends too",
        )
    )
    mean = sum(agreements) / len(agreements)
    report.checks.append(
        Check(
            "top-1 agreement",
            mean >= tolerance,
            f"mean {mean:.3f} (per prompt {', '.join(f'{a:.2f}' for a in agreements)}); needs >= {tolerance} for "
            f"{kind}",
        )
    )
    return report


def _show(name, ids: list[int], at: int) -> str:
    return repr(name(ids[at])) if at < len(ids) else "(end)"
