"""Show examples exactly as the model sees them, trained tokens highlighted (terminal and HTML)."""

from __future__ import annotations

import html
from pathlib import Path

from rich.text import Text

from ayar.data.render import IGNORE, Example
from ayar.fsutil import write_atomic


def token_pieces(tok, ex: Example) -> list[tuple[int, str, bool]]:
    """(token id, its text, trained?) for every token of the example."""
    return [(tid, tok.decode([tid]), label != IGNORE) for tid, label in zip(ex.input_ids, ex.labels)]


def boundaries(ex: Example, context: int = 3) -> list[dict]:
    """Every place where masking switches (prompt -> answer, answer -> prompt), with the ids around it."""
    out = []
    trained = [label != IGNORE for label in ex.labels]
    for i in range(1, len(trained)):
        if trained[i] != trained[i - 1]:
            out.append(
                {
                    "position": i,
                    "kind": "answer starts" if trained[i] else "answer ends",
                    "before": ex.input_ids[max(0, i - context) : i],
                    "after": ex.input_ids[i : i + context],
                }
            )
    return out


def rich_text(tok, ex: Example) -> Text:
    text = Text()
    for _, piece, trained in token_pieces(tok, ex):
        text.append(piece, style="bold black on green" if trained else "dim")
    return text


def boundary_lines(tok, ex: Example) -> list[str]:
    show = lambda ids: " ".join(f"{i}:{tok.decode([i])!r}" for i in ids)
    return [
        f"  {b['kind']} at token {b['position']}:  {show(b['before'])}  |  {show(b['after'])}" for b in boundaries(ex)
    ]


STYLE = """pre{white-space:pre-wrap;border:1px solid #ccc;padding:.6rem}
.t{background:#b6e3b6;color:#000} .p{color:#777} .meta{color:#555;font-size:.85rem}"""


def html_sections(tok, examples: list[Example]) -> str:
    """One <section> per example: its tokens, the trained ones (class t) highlighted, and the role boundaries."""
    blocks = []
    for ex in examples:
        spans = "".join(
            f'<span class="{"t" if trained else "p"}" title="{tid}">{html.escape(piece)}</span>'
            for tid, piece, trained in token_pieces(tok, ex)
        )
        bounds = "<br>".join(html.escape(line.strip()) for line in boundary_lines(tok, ex))
        n_trained = ex.n_trained
        blocks.append(
            f"<section><h3>{html.escape(ex.where)}</h3><p class=meta>{len(ex.input_ids)} tokens, {n_trained} trained"
            f"{' (truncated)' if ex.truncated else ''}</p><pre>{spans}</pre><p class=meta>{bounds}</p></section>"
        )
    return "".join(blocks)


def html_page(tok, examples: list[Example], title: str = "ayar data preview") -> str:
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>
body{{font-family:sans-serif;max-width:60rem;margin:2rem auto}}
{STYLE}</style></head><body>
<h1>{html.escape(title)}</h1><p>Green: tokens the loss is computed on. Grey: context only (masked, label -100).
Hover a token for its id.</p>{html_sections(tok, examples)}</body></html>"""


def write_html(tok, examples: list[Example], path: str | Path) -> Path:
    path = Path(path)
    write_atomic(path, html_page(tok, examples))
    return path
