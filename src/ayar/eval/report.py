"""The evaluation report: eval/metrics.json (machine-readable), report.md and report.html (tables, loss
curves, metric bars, example generations), and the verdict per metric."""

from __future__ import annotations

import html
import json
from pathlib import Path

from ayar.fsutil import write_atomic

SAME = 0.01  # relative difference under which two values count as the same

LABELS = {
    "exact_match": "exact match",
    "extracted": "answer extracted",
    "rouge_l": "ROUGE-L F1",
    "bleu": "BLEU",
    "accuracy": "accuracy",
    "precision_macro": "precision (macro)",
    "recall_macro": "recall (macro)",
    "f1_macro": "F1 (macro)",
    "perplexity": "perplexity",
    "mean_loss": "mean loss",
    "stop_rate": "stop rate",
    "mean_new_tokens": "mean answer tokens",
    "tokens_per_s": "tokens/s",
    "generation_seconds": "generation s",
    "preference_accuracy": "preference accuracy",
    "reward_margin": "reward margin (log-prob)",
    "anchor_perplexity": "anchor perplexity",
    "peak_rss_mb": "peak RSS MB (process)",
    "peak_gpu_mb": "peak GPU MB",
}


def verdicts(tuned: dict, base: dict, direction: dict) -> dict:
    """Per metric: better / worse / same (within 1% relative); overall: better, worse, mixed or same."""
    per = {}
    for k, higher in direction.items():
        t, b = tuned.get(k), base.get(k)
        if t is None or b is None:
            continue
        if abs(t - b) <= SAME * max(abs(b), 1e-9):
            per[k] = "same"
        else:
            per[k] = "better" if (t > b) == higher else "worse"
    kinds = set(per.values()) - {"same"}
    overall = "same" if not kinds else kinds.pop() if len(kinds) == 1 else "mixed"
    return {"overall": overall, "per_metric": per}


def verdict_line(verdict: dict) -> str:
    per = verdict.get("per_metric", {})
    groups = {v: [LABELS.get(k, k) for k, x in per.items() if x == v] for v in ("better", "worse", "same")}
    parts = [f"{v}: {', '.join(names)}" for v, names in groups.items() if names]
    return f"verdict: {verdict.get('overall', 'n/a').upper()} ({'; '.join(parts)})"


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def metric_rows(result) -> tuple[list[str], list[list[str]]]:
    names = list(result.models)
    keys = [k for k in LABELS if any(k in m for m in result.models.values())]
    rows = []
    for k in keys:
        row = [LABELS[k]] + [_fmt(result.models[n].get(k)) for n in names]
        if result.verdict:
            row.append(result.verdict["per_metric"].get(k, ""))
        rows.append(row)
    header = ["metric"] + names + (["tuned vs base"] if result.verdict else [])
    return header, rows


def _md_table(header, rows) -> str:
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(esc, r)) + " |" for r in rows])


def _html_table(header, rows) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _bar_chart(result, path: Path) -> Path | None:
    keys = [
        k
        for k in ("exact_match", "rouge_l", "stop_rate", "accuracy", "f1_macro", "preference_accuracy")
        if any(m.get(k) is not None for m in result.models.values())
    ]
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(result.models)
    for i, (name, m) in enumerate(result.models.items()):
        ax.bar([x + i * width for x in range(len(keys))], [m.get(k) or 0 for k in keys], width, label=name)
    ax.set_xticks([x + width * (len(result.models) - 1) / 2 for x in range(len(keys))], [LABELS[k] for k in keys])
    ax.set_ylim(0, 1)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(result, out: Path, run=None) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header, rows = metric_rows(result)
    checks = result.checks
    loss_png = None
    if run is not None and run.read_metrics():
        from ayar.training.plots import plot_loss

        ov = checks.get("overfitting", {})
        mark = ov.get("turn_step") if ov.get("status") == "overfitting" else None
        loss_png = out / "loss.png"
        plot_loss(run.read_metrics(), loss_png, mark_step=mark, mark_label="eval loss turned up")
    bars = _bar_chart(result, out / "metrics.png")
    payload = {
        "info": result.info,
        "models": result.models,
        "verdict": result.verdict,
        "checks": checks,
        "samples": result.samples,
    }
    write_atomic(out / "metrics.json", json.dumps(payload, indent=2, default=str))

    title = f"Evaluation of {result.info.get('run') or result.info.get('model')}"
    check_lines = [f"- **{name}**: {c.get('message', '')}" for name, c in checks.items() if name != "judge"]
    if "judge" in checks:
        j = checks["judge"]
        check_lines.append(
            f"- **judge** ({j['judge']}, both answer orders): tuned wins {100 * j['win_rate']:.0f}%, "
            f"base wins {100 * j['loss_rate']:.0f}%, ties {100 * j['tie_rate']:.0f}%"
        )
    names = list(result.models)
    sample_md = "\n\n".join(
        f"**Prompt:** {s['prompt']}\n\n**Reference:** {s['reference']}\n\n"
        + "\n\n".join(f"**{n}:** {s.get(n, '')}" for n in names)
        for s in result.samples
    )
    md = [
        f"# {title}",
        "",
        f"Data: {result.info['data']} ({result.info['rows']} rows), greedy decoding, "
        f"max {result.info['max_new_tokens']} new tokens, batch {result.info['batch_size']}.",
        "",
    ]
    if result.verdict:
        md += [verdict_line(result.verdict), ""]
    md += [_md_table(header, rows), ""]
    if check_lines:
        md += ["## Checks", ""] + check_lines + [""]
    if loss_png:
        md += ["![loss curves](loss.png)", ""]
    if bars:
        md += ["![metrics](metrics.png)", ""]
    if sample_md:
        md += ["## Examples", "", sample_md, ""]
    write_atomic(out / "report.md", "\n".join(md))

    samples_html = "".join(
        "<div class=ex>"
        + f"<p><b>Prompt</b><pre>{html.escape(s['prompt'])}</pre></p>"
        + f"<p><b>Reference</b><pre>{html.escape(s['reference'])}</pre></p>"
        + "".join(f"<p><b>{html.escape(n)}</b><pre>{html.escape(s.get(n, ''))}</pre></p>" for n in names)
        + "</div>"
        for s in result.samples
    )
    checks_html = "".join(f"<li>{html.escape(line[2:].replace('**', ''))}</li>" for line in check_lines)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>
body{{font-family:sans-serif;max-width:62rem;margin:2rem auto}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3rem .6rem;text-align:left}}
pre{{white-space:pre-wrap;background:#f6f6f6;padding:.4rem}}
.ex{{border-top:1px solid #ddd;margin-top:1rem}}</style></head><body><h1>{html.escape(title)}</h1>
<p>Data: {html.escape(str(result.info["data"]))} ({result.info["rows"]} rows), greedy decoding.</p>
{f"<p><b>{html.escape(verdict_line(result.verdict))}</b></p>" if result.verdict else ""}
{_html_table(header, rows)}{f"<h2>Checks</h2><ul>{checks_html}</ul>" if checks_html else ""}
{'<img src="loss.png" alt="loss curves">' if loss_png else ""}{'<img src="metrics.png" alt="metrics">' if bars else ""}
{f"<h2>Examples</h2>{samples_html}" if samples_html else ""}</body></html>"""
    write_atomic(out / "report.html", page)
    return out
