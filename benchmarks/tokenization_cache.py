"""Tokenization time, cold vs cached, on a data file with the default model's tokenizer and chat template.

    python benchmarks/tokenization_cache.py ../shared/data/gsm8k/train.jsonl \
        --columns instruction=question,output=answer

Each measurement uses a fresh, empty cache directory for the cold run, then repeats with the entry in place.
"""

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("data")
    p.add_argument("--columns", default="")
    p.add_argument("--model", default="default")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    from ayar.data.cache import encode_cached
    from ayar.data.dataset import load_records
    from ayar.data.render import Renderer
    from ayar.models.load import load_tokenizer, resolve_model_path

    columns = dict(kv.split("=") for kv in args.columns.split(",") if kv)
    t = time.perf_counter()
    records = load_records(args.data, columns=columns)
    read_s = time.perf_counter() - t
    renderer = Renderer(load_tokenizer(resolve_model_path(args.model)), max_length=args.max_length)
    cold, warm = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            _, hit = encode_cached(records, renderer, root=Path(d))
            cold.append(time.perf_counter() - t)
            assert not hit
            t = time.perf_counter()
            _, hit = encode_cached(records, renderer, root=Path(d))
            warm.append(time.perf_counter() - t)
            assert hit
    med = lambda xs: sorted(xs)[len(xs) // 2]
    print(
        f"{len(records)} rows; read+convert {read_s:.2f}s; tokenize cold {med(cold):.2f}s, "
        f"from cache {med(warm):.2f}s (median of {args.repeats}); saved {med(cold) - med(warm):.2f}s "
        f"({med(cold) / med(warm):.1f}x)"
    )


if __name__ == "__main__":
    main()
