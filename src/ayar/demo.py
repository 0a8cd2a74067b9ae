"""`make demo`: fine-tune the default model on the bundled GSM8K sample and compare answers.

The base model answers a held-back question in free prose; after a few minutes of LoRA on CPU the
tuned model answers in GSM8K's format (calculator annotations and a final `#### N` line).
"""

from __future__ import annotations

import json
import sys
import time
from importlib import resources

from rich.console import Console
from rich.panel import Panel

from ayar.config import load_config

DEMO_OVERRIDES = [
    "model.name=default",
    "data.train=sample:gsm8k",
    "data.max_length=256",
    "data.val_ratio=0.05",
    "lora.r=16",
    "lora.alpha=32",
    "training.learning_rate=1e-3",
    "training.batch_size=8",
    "training.max_steps=24",
    "training.packing=true",
    "training.eval_steps=12",
    "training.save_steps=12",
    "output.name=demo",
]


def main(argv: list[str] | None = None) -> int:
    from ayar.infer.load import load_engine
    from ayar.quiet import quiet_libraries
    from ayar.training.sft import train_sft

    quiet_libraries()
    console = Console(stderr=True)
    t0 = time.time()
    cfg = load_config(None, DEMO_OVERRIDES + list(argv if argv is not None else sys.argv[1:]))
    held = json.loads((resources.files("ayar.data") / "samples" / "gsm8k_heldout.jsonl").read_text().splitlines()[0])
    question = [{"role": "user", "content": held["instruction"]}]
    console.rule("[bold]ayar demo: LoRA fine-tune of SmolLM2-135M-Instruct on 200 GSM8K problems")
    console.print(Panel(held["instruction"], title="held-back question (not in the training data)"))

    base = load_engine("default", cfg.generation, log=console.print)
    base_reply = base.generate(question, max_new_tokens=160)
    del base
    console.print(Panel(base_reply.text, title="base model"))

    run = train_sft(cfg, console=console)

    tuned = load_engine(run.path, log=console.print)
    console.print(Panel(held["output"], title="reference answer (GSM8K)"))
    console.print(Panel(base_reply.text, title="base model (before)"))
    tuned_reply = tuned.generate(question, max_new_tokens=160)
    console.print(Panel(tuned_reply.text, title="tuned model (after)", border_style="green"))

    meta = run.read_meta()
    fmt = lambda r: "ends with a '#### N' answer line" if "####" in r.text else "free-form (no '#### N' line)"
    console.print(
        f"base:  {fmt(base_reply)};  tuned: {fmt(tuned_reply)}"
        + ("" if tuned_reply.stopped else "  (tuned answer hit the token budget)")
    )
    console.print(
        f"training: {meta['steps']} steps, {meta['train_seconds']:.0f} s, {meta['tokens_per_s']:.0f} tokens/s, "
        f"peak RSS {meta['peak_rss_mb']:.0f} MB; demo wall time {time.time() - t0:.0f} s"
    )
    console.print(f"run directory: {run.path}\n  try: .venv/bin/ayar chat {run.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
