"""The training config: one dataclass per section, every field typed and documented.

docs/config.md's config reference is generated from these definitions (`ayar config reference`), so the
help text here is the documentation. `choices` in a field's metadata is enforced by the loader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union


def _f(default, help: str, choices: tuple | None = None, ge=None, gt=None, lt=None, le=None, **kw):
    """A documented field. `choices` and the bounds (`ge` >=, `gt` >, `lt` <, `le` <=) are enforced by the loader."""
    meta = {"help": help}
    if choices:
        meta["choices"] = choices
    meta.update({k: v for k, v in (("ge", ge), ("gt", gt), ("lt", lt), ("le", le)) if v is not None})
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class ModelConfig:
    name: str = _f(
        "default",
        "`default` (SmolLM2-135M-Instruct, bundled), a local HF model directory, a hub id (needs network), or "
        "an ayar run directory: start from that run's model (its adapter merged into its base), e.g. DPO after SFT.",
    )
    dtype: str = _f(
        "auto",
        "Weights/compute dtype. `auto`: bf16 on GPUs and CPUs that support it (AVX512-BF16/AMX), else fp16 on GPU, "
        "fp32 on CPU.",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    device: str = _f("auto", "`auto` picks cuda, then mps, then cpu.", choices=("auto", "cpu", "cuda", "mps"))
    attn_implementation: str = _f(
        "sdpa", "Attention kernel passed to transformers.", choices=("sdpa", "eager", "flash_attention_2")
    )
    trust_remote_code: bool = _f(False, "Allow custom modelling code from the model directory.")


@dataclass
class DataConfig:
    train: Union[str, list] = _f(
        "",
        "Training data: a .jsonl/.json/.csv/.parquet/.txt file, a folder, a glob, a `datasets.save_to_disk` "
        "folder, `sample:gsm8k` (bundled), or a hub dataset `owner/name` (where there is network). A list mixes "
        "several: items are paths or `{path, weight, format, columns}`; `weight` is a source's share of the mixed "
        "training set. A hub dataset's subset, split and commit: `{path: openai/gsm8k, name: main, split: train, "
        "revision: <tag or sha>}`.",
    )
    format: str = _f(
        "auto",
        "Row schema (`auto` detects it from the fields).",
        choices=("auto", "alpaca", "messages", "sharegpt", "completion", "preference", "hh", "text", "classification"),
    )
    columns: dict = _f(
        {}, "Rename fields to a format's names, ours: theirs, e.g. `{instruction: question, output: answer}` for GSM8K."
    )
    validation: Union[str, dict, list, None] = _f(
        None, "Validation data (same forms as `train`). When unset, `val_ratio` of the training rows are held out."
    )
    val_ratio: float = _f(
        0.05,
        "Share of each training source held out for validation when no `validation` is given (0 disables).",
        ge=0.0,
        lt=1.0,
    )
    test: Union[str, dict, list, None] = _f(
        None,
        "Test data (same forms as `train`), kept out of training (for `ayar eval`). When unset, `test_ratio` of "
        "the rows are held out.",
    )
    test_ratio: float = _f(
        0.0, "Share of each training source held out as a test split when no `test` is given.", ge=0.0, lt=1.0
    )
    template: str = _f(
        "chat",
        "`chat`: the model's own chat template. `alpaca`: the Alpaca text template (for base models without one).",
        choices=("chat", "alpaca"),
    )
    system_prompt: Optional[str] = _f(None, "System message added to every conversation that has none.")
    max_length: int = _f(1024, "Tokens per example; longer examples are truncated (counted and reported).", ge=1)
    train_on_prompt: bool = _f(
        False, "Also train on prompt (system/user) tokens. Default: loss on assistant tokens only."
    )
    max_rows: Optional[int] = _f(None, "Use only the first N rows of each training source.", ge=1)
    lint: str = _f(
        "strict",
        "Data lint before training: `strict` refuses to train on errors, `warn` reports them, `off` skips it.",
        choices=("strict", "warn", "off"),
    )
    cache: bool = _f(
        True, "Cache tokenized data under $AYAR_HOME/tokenized, so an unchanged second run skips tokenization."
    )


@dataclass
class LoraConfig:
    r: int = _f(16, "LoRA rank.", ge=1)
    alpha: int = _f(32, "LoRA scaling numerator (scale = alpha / r); usually 2 x r.", gt=0)
    dropout: float = _f(0.05, "Dropout on the LoRA input.", ge=0.0, lt=1.0)
    target_modules: Union[str, list] = _f(
        "all-linear", "`all-linear`, or a list of module names (e.g. [q_proj, v_proj]), or a regex string."
    )
    rslora: bool = _f(False, "Rank-stabilized LoRA: scale by alpha / sqrt(r) instead of alpha / r (helps at large r).")
    modules_to_save: Optional[list] = _f(
        None,
        "Modules trained in full and saved with the adapter (e.g. [lm_head] for new tokens, [score] for a "
        "classifier head).",
    )
    freeze_first_layers: int = _f(
        0, "Leave the first N transformer layers without adapters (frozen); adapters go to the layers above.", ge=0
    )
    init: str = _f(
        "default",
        "Adapter initialisation: `default` (B = 0), `gaussian`, `pissa` (principal singular vectors of each weight, "
        "full SVD), `pissa_fast` (randomized SVD, 4 iterations: for large models), `olora` (QR). PiSSA/OLoRA adapters "
        "are saved converted, so they apply to the original base model.",
        choices=("default", "gaussian", "pissa", "pissa_fast", "olora"),
    )


@dataclass
class TrainingConfig:
    learning_rate: float = _f(2e-4, "Peak learning rate.", gt=0.0)
    lr_scheduler: str = _f("linear", "Learning-rate schedule after warmup.", choices=("linear", "cosine", "constant"))
    warmup_ratio: float = _f(0.03, "Share of total steps spent warming up linearly from 0.", ge=0.0, lt=1.0)
    batch_size: int = _f(4, "Examples per micro-batch.", ge=1)
    grad_accum: int = _f(1, "Micro-batches per optimizer step (effective batch = batch_size x grad_accum).", ge=1)
    epochs: float = _f(1.0, "Passes over the training data (ignored when max_steps > 0).", gt=0.0)
    max_steps: int = _f(0, "Optimizer steps to run; 0 means use `epochs`.", ge=0)
    rows_per_pass: int = _f(
        0,
        "Run each micro-batch as forward/backward passes of this many rows of similar length "
        "(same gradient; less padding and peak memory). 0: auto (on CPU 4 with the fused decoder, else 2; the whole "
        "micro-batch on GPU).",
        ge=0,
    )
    fused: bool = _f(
        True,
        "On CPU, train Llama-family models with LoRA through ayar's fused kernels (the same computation "
        "as the transformers + peft modules, in fewer and larger operations); false keeps the module path.",
    )
    gradient_checkpointing: Optional[bool] = _f(
        None,
        "Recompute each layer's forward during backward: a fraction of the "
        "activation memory for ~30% more compute. Unset (auto): on only when the "
        "memory plan does not fit without it.",
    )
    return_memory: Optional[bool] = _f(
        None,
        "On Linux CPUs, hand freed memory back to the system at once (glibc's mmap "
        "threshold held fixed): peak RSS then follows what training holds (it ran up to 2x "
        "above it), at a speed cost (0.6-0.7x the tokens/s measured: benchmarks/README.md). Unset (auto): on only when "
        "the memory plan leaves less than its own size free (1.5x its size under FSDP).",
    )
    packing: bool = _f(
        False,
        "Pack the examples of a micro-batch into one padding-free row; attention never crosses example boundaries.",
    )
    optimizer: str = _f(
        "adamw",
        "`adamw` (torch), or `adamw_8bit` (bitsandbytes, CUDA; falls back to adamw elsewhere, with a warning).",
        choices=("adamw", "adamw_8bit"),
    )
    weight_decay: float = _f(0.0, "AdamW weight decay.", ge=0.0)
    loraplus_lr_ratio: Optional[float] = _f(
        None, "LoRA+: the B matrices learn this many times faster than A (e.g. 16); unset = plain LoRA.", gt=0.0
    )
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables).", ge=0.0)
    eval_steps: int = _f(0, "Evaluate on the validation split every N steps (0: only at the end).", ge=0)
    early_stopping_patience: int = _f(
        0, "Stop after this many evaluations without a lower eval loss, keeping the best adapter (0 disables).", ge=0
    )
    save_steps: int = _f(0, "Write a resumable checkpoint every N steps (0: only at the end).", ge=0)
    save_total_limit: int = _f(2, "Keep at most this many checkpoints (oldest removed first).", ge=1)
    logging_steps: int = _f(1, "Log metrics every N steps.", ge=1)
    seed: int = _f(42, "Seed for data split, data order, LoRA init and dropout.")
    tracker: Union[str, list] = _f(
        "tensorboard",
        "Where metrics go besides metrics.jsonl: one name or a list (several at once), `none` for none.",
        choices=("tensorboard", "mlflow", "wandb", "none"),
    )
    project: str = _f("ayar", "The W&B project / MLflow experiment the run is logged under.")
    run_name: Optional[str] = _f(None, "The run's name in W&B / MLflow (default: the run directory's name).")
    threads: int = _f(0, "CPU threads for torch (0: torch's default, one per core).", ge=0)
    loss: Optional[str] = _f(
        None,
        "Custom loss, `module:function` or `path/to/file.py:function`: called as fn(logits [N, vocab] "
        "float32, targets [N]) for the N trained positions of a batch, returns the loss of each "
        "position ([N]); ayar averages over the step's trained tokens. Eval loss stays cross-entropy.",
    )
    memory_check: str = _f(
        "strict",
        "Before training, predict peak memory (as `ayar plan`): `strict` stops when it cannot fit, "
        "`warn` only warns, `off` skips it.",
        choices=("strict", "warn", "off"),
    )


@dataclass
class PreferenceConfig:
    loss: str = _f(
        "dpo",
        "Preference objective (TRL): `dpo`, `ipo`, `kto` (pairs split into liked/disliked answers), "
        "`orpo` and `simpo` (reference-free).",
        choices=("dpo", "ipo", "kto", "orpo", "simpo"),
    )
    beta: float = _f(
        0.1, "Strength of the pull toward the reference model (dpo/ipo/kto), or the ORPO/SimPO scale.", ge=0.0
    )
    simpo_gamma: float = _f(0.5, "SimPO's target reward margin.")


@dataclass
class GrpoConfig:
    rewards: list = _f(
        ["gsm8k_answer", "format"],
        "Reward functions, summed: built-ins `gsm8k_answer` (the number after "
        "`####` or the last number equals the reference), `format` (the answer ends with `#### <number>`), "
        "`length` (penalty for answers over `target_length` tokens), `model:RUN_DIR` (an ayar reward model's score: "
        "a learned reward model in the loop), or `module:function` / `file.py:function` "
        "called as TRL reward functions fn(completions, **columns) -> list[float].",
    )
    num_generations: int = _f(4, "Answers sampled per prompt (the group whose rewards are compared).", ge=2)
    max_completion_length: int = _f(128, "Token budget of each sampled answer.", ge=1)
    temperature: float = _f(1.0, "Sampling temperature of the answers.", gt=0.0)
    beta: float = _f(0.0, "KL penalty toward the starting model (0: none, TRL's default; no reference pass).", ge=0.0)
    target_length: int = _f(200, "The `length` reward's budget in tokens.", ge=1)


@dataclass
class GenerationConfig:
    preset: str = _f(
        "deterministic", "`deterministic` (greedy) or `creative` (sampling).", choices=("deterministic", "creative")
    )
    max_new_tokens: int = _f(256, "Token budget of an answer.", ge=1)
    temperature: Optional[float] = _f(None, "Sampling temperature (overrides the preset).", ge=0.0)
    top_p: Optional[float] = _f(None, "Nucleus sampling threshold (overrides the preset).", gt=0.0, le=1.0)
    top_k: Optional[int] = _f(None, "Top-k sampling (overrides the preset).", ge=0)
    repetition_penalty: Optional[float] = _f(None, "Penalty > 1 discourages repeats (overrides the preset).", gt=0.0)


@dataclass
class OutputConfig:
    dir: str = _f("runs", "Parent directory of run directories.")
    name: str = _f("run", "Run name; the run directory is <dir>/<name>-<timestamp>.")
    path: Optional[str] = _f(
        None,
        "The exact run directory (instead of <dir>/<name>-<timestamp>), for scripts that must know where the run "
        "goes; it must not exist yet or be empty.",
    )


@dataclass
class DistributedConfig:
    """How several processes share the training (`ayar train --nproc N`, torchrun, accelerate launch)."""

    strategy: str = _f(
        "ddp",
        "`ddp`: every process holds the whole model and the gradients are summed once per optimizer step. `fsdp`: "
        "torch's FSDP2 (`fully_shard`; the TRL stages through accelerate's FSDP plugin), weights, gradients and "
        "optimizer states split across the processes, each decoder layer gathered whole only while it computes; "
        "checkpoints sharded (torch.distributed.checkpoint). `deepspeed`: ZeRO (stage `zero_stage`; `ayar train` "
        "writes the DeepSpeed config): ayar's own loop (stage sft) on a DeepSpeed engine, the TRL stages through "
        "accelerate's DeepSpeed plugin; checkpoints DeepSpeed's own (see docs/training.md).",
        choices=("ddp", "fsdp", "deepspeed"),
    )
    shard: str = _f(
        "full",
        "FSDP: `full` (split across every process) or `hybrid` (split within a node, replicated across nodes: "
        "less traffic between nodes; ayar's own loop, stage sft).",
        choices=("full", "hybrid"),
    )
    offload: bool = _f(
        False,
        "Keep what is split in CPU RAM between uses (FSDP: weights, gradients, optimizer states; DeepSpeed: optimizer "
        "states, stepped by DeepSpeed's CPU Adam, and weights with ZeRO-3). For GPUs: on a CPU it is there already, "
        "so a run asking for it goes the same way and saves nothing.",
    )
    zero_stage: int = _f(
        2, "DeepSpeed ZeRO stage: 2 (gradients + optimizer states split) or 3 (weights too).", ge=2, le=3
    )
    timeout: int = _f(
        1800,
        "Seconds a process waits in a collective of training (gradients, the Trainer stages' own waits such as TRL "
        "tokenizing on rank 0 first) before the run stops: transformers' `ddp_timeout` (NCCL's own default is 600). "
        "Where ayar's own steps have rank 0 work alone (converting and loading the model, tokenizing into the "
        "shared cache, writing checkpoints and the final model) the others wait up to 24 hours whatever this says.",
        ge=1,
    )
    loading: str = _f(
        "auto",
        "FSDP and DeepSpeed ZeRO-3: which processes read the model's weights. FSDP: `rank0`: rank 0 alone, the others"
        " receive their parts as the model is split (none but rank 0 holds the whole model; in ayar's own loop rank 0"
        " frees each layer's whole weights as it sends them, on the Trainer stages accelerate keeps them beside rank"
        " 0's part until all are sent). `every_rank`: each process reads the file and keeps its part (the processes"
        " of a machine share the file's pages where it is stored in the loaded dtype). `parts` (ayar's own loop, LoRA,"
        " DoRA or full): each process reads only its own parts of the weights from the model folder's safetensors"
        " files; none holds the whole model (a full fine-tune is then saved by parts too). `auto`: for ayar's own loop "
        "`parts` where the files hold every weight by name, else `rank0`; for the Trainer stages `rank0` where "
        "loading converts the weights' dtype, `every_rank` otherwise (benchmarks/README.md). DeepSpeed ZeRO-3: "
        "`rank0` (`auto` on GPUs): the model is built split (DeepSpeed's zero.Init, through transformers) and rank 0 "
        "reads the files (into CPU RAM), each process keeping its part a layer at a time: no GPU holds the whole "
        "model; `every_rank` (`auto` on a CPU, where the processes share the file's pages and split-built runs "
        "peaked no lower: benchmarks/README.md): each process loads the whole model, DeepSpeed splits it as its "
        "engine starts. QLoRA/QDoRA under FSDP in ayar's own loop: `rank0` (`auto`'s choice): rank 0 quantizes the "
        "base to 4 bits as it loads it and sends the others their parts and the quant states, or `every_rank`. "
        "QLoRA/QDoRA under ZeRO-3 and on the Trainer stages: `every_rank` (`auto`'s choice; the others are refused), "
        "each process quantizing the base as it loads it.",
        choices=("auto", "rank0", "every_rank", "parts"),
    )


@dataclass
class TrainConfig:
    """Everything `ayar train` needs. YAML sections map to the fields below."""

    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "Base model."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Training data and rendering."})
    stage: str = _f(
        "sft",
        "`sft` (supervised), `dpo` (preference pairs; see `preference`), `reward` (a reward model on preference "
        "pairs), `grpo` (RL with reward functions; see `grpo`).",
        choices=("sft", "dpo", "reward", "grpo"),
    )
    task: str = _f(
        "causal_lm",
        "`causal_lm` (generate text), or `classification` (a sequence-classification head on the model; "
        "data.format: classification, metrics: accuracy, precision, recall, F1).",
        choices=("causal_lm", "classification"),
    )
    method: str = _f(
        "lora",
        "Fine-tuning method: `lora`, `dora` (weight-decomposed LoRA), `full` (every weight; fp32 master weights), "
        "`qlora` / `qdora` (LoRA / DoRA over a 4-bit NF4 base from bitsandbytes, the `qlora` extra: CUDA, or CPU "
        "with its slower kernels; every stage, every distributed strategy).",
        choices=("lora", "dora", "full", "qlora", "qdora"),
    )
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "LoRA adapter."})
    training: TrainingConfig = field(default_factory=TrainingConfig, metadata={"help": "Optimisation and schedule."})
    preference: PreferenceConfig = field(
        default_factory=PreferenceConfig, metadata={"help": "Preference alignment (`stage: dpo`)."}
    )
    grpo: GrpoConfig = field(
        default_factory=GrpoConfig, metadata={"help": "RL with verifiable rewards (`stage: grpo`)."}
    )
    generation: GenerationConfig = field(
        default_factory=GenerationConfig, metadata={"help": "Defaults for `ayar chat` on this run."}
    )
    output: OutputConfig = field(default_factory=OutputConfig, metadata={"help": "Where the run directory goes."})
    distributed: DistributedConfig = field(
        default_factory=DistributedConfig,
        metadata={"help": "Several processes: data parallel, FSDP or DeepSpeed (`ayar train --nproc N`)."},
    )


@dataclass
class EvalConfig:
    """What `ayar eval` runs: a run directory against its base (or `base`), or one model alone (`baseline`)."""

    run: Optional[str] = _f(None, "Run directory to evaluate (tuned = base + its adapter).")
    baseline: Optional[str] = _f(None, "Evaluate this model alone, without a run (zero-shot baseline); needs `data`.")
    base: Optional[str] = _f(None, "Compare against this model instead of the run's own base model.")
    data: Optional[str] = _f(
        None, "Evaluation data (any `ayar data` source). Default: the run's test split, else its validation split."
    )
    format: str = _f("auto", "Row format of `data`.")
    columns: dict = _f({}, "Field renames for `data`, as in data.columns.")
    max_rows: int = _f(100, "Evaluate on the first N rows (0: all).", ge=0)
    batch_size: int = _f(8, "Prompts generated together (left-padded, KV cache).", ge=1)
    max_new_tokens: int = _f(256, "Token budget of each answer; answers that hit it count as not stopped.", ge=1)
    extract: str = _f("auto", "Answer extraction for exact match: auto, gsm8k, last_number, none, or regex:PATTERN.")
    anchor: Optional[str] = _f(
        "sample:anchor", "General data the run did not train on, for the forgetting check (null disables)."
    )
    forgetting_threshold: float = _f(
        0.05, "Flag forgetting when the tuned model's anchor loss exceeds the base's by this share.", ge=0.0
    )
    judge_url: Optional[str] = _f(None, "OpenAI-compatible base URL (…/v1) for an LLM-as-judge comparison.")
    judge_model: str = _f("gpt-4o-mini", "Model name sent to the judge endpoint.")
    judge_key_env: str = _f("OPENAI_API_KEY", "Environment variable holding the judge's API key.")
    examples: int = _f(5, "Example generations shown in the report.", ge=0)
    out: Optional[str] = _f(None, "Report directory (default: RUN/eval, or ./eval-<model> for a baseline).")


@dataclass
class HpoConfig:
    """`ayar hpo`: the `hpo:` section of a training YAML (the rest of the file is the training config searched
    around)."""

    trials: int = _f(8, "Trials to run in total; a study that already has some (same `out`) runs only the rest.", ge=1)
    space: dict = _f(
        {},
        "Search space: dotted training-config keys mapped to `{low, high}` (float; add `log: true` for "
        "log-uniform, ints give an int range) or `{choices: [...]}`, e.g. `training.learning_rate: {low: 1e-5, "
        "high: 1e-3, log: true}`, `lora.r: {choices: [8, 16, 32]}`.",
    )
    out: str = _f(
        "runs/hpo", "Folder of the study: study.db (SQLite, resumable), trials/, trials.md, best.yaml, plots/."
    )
    study: str = _f("ayar-hpo", "Study name inside study.db.")
    sampler: str = _f("tpe", "Optuna sampler.", choices=("tpe", "random"))
    pruner: str = _f(
        "median",
        "Stop a trial whose eval loss is worse than the median of earlier trials at the same step "
        "(needs training.eval_steps); `none` runs every trial to the end.",
        choices=("median", "none"),
    )
    seed: int = _f(42, "Sampler seed.")


@dataclass
class JudgeConfig:
    """The feedback model: an OpenAI-compatible endpoint (`url`) or a local model / run directory (`local`)."""

    url: Optional[str] = _f(None, "OpenAI-compatible base URL ending in /v1 (another run's `ayar serve` works).")
    model: str = _f("gpt-4o-mini", "Model name sent to the endpoint.")
    key_env: Optional[str] = _f("OPENAI_API_KEY", "Environment variable holding the endpoint's API key (if any).")
    local: Optional[str] = _f(None, "A model or run directory to judge with locally, instead of an endpoint.")
    timeout: float = _f(60.0, "Seconds to wait for one answer from the endpoint.", gt=0)
    retries: int = _f(3, "Retries of a failed request (429, 5xx, timeout, a malformed answer), then skipped.", ge=0)
    backoff: float = _f(1.0, "Seconds before the first retry, doubled each time.", ge=0)
    concurrency: int = _f(4, "Requests in flight at once to the endpoint.", ge=1)
    max_tokens: int = _f(256, "Token budget of a critique or a revision.", ge=1)


@dataclass
class RlaifConfig:
    """`ayar rlaif`: preference data from AI feedback under a written constitution, then SFT and DPO. Each step
    writes a file or a run directory under `out`; a rerun skips finished steps and finishes a half-done file."""

    policy: str = _f("default", "The model being improved: `default`, a local model directory or a run directory.")
    prompts: Union[str, dict, list] = _f(
        "sample:hh", "Prompts (any `data.train` source): each row's conversation up to its last answer."
    )
    max_prompts: int = _f(0, "Use the first N prompts (0: all).", ge=0)
    constitution: Optional[str] = _f(
        None, "Constitution YAML (principles); default: ayar's own (harmless, helpful, ...)."
    )
    out: str = _f("rlaif", "Folder of the loop's files and runs.")
    steps: list = _f(
        ["synthesize", "sft", "label", "dpo"],
        "Steps to run, in this order: synthesize (critique -> revision), sft (on the revisions), label (AI "
        "preference pairs), dpo (on the pairs); or, instead of dpo, reward (a reward model on the pairs) and grpo "
        "(the policy trained with that reward model's score as its reward).",
        choices=("synthesize", "sft", "label", "dpo", "reward", "grpo"),
    )
    seed: int = _f(42, "Seed for principle sampling and the policy's samples.")
    max_new_tokens: int = _f(128, "Token budget of the policy's answers.", ge=1)
    temperature: float = _f(0.8, "Sampling temperature of the policy's two answers per prompt (label step).", gt=0)
    top_p: float = _f(0.95, "Nucleus sampling of the policy's answers (label step).", gt=0, le=1)
    batch_size: int = _f(8, "Prompts the policy answers together.", ge=1)
    min_confidence: float = _f(
        0.0, "Drop pairs whose judge confidence (from its probabilities, where known) is below this.", ge=0, le=1
    )
    order_rule: str = _f(
        "strict",
        "How the two orders' verdicts make a label: `strict` keeps a pair only when both orders pick the same "
        "answer (a flip is a tie, dropped); `average` picks by the mean of both orders' probabilities (RLAIF's "
        "position debiasing; needs a judge that exposes them, else strict).",
        choices=("strict", "average"),
    )
    judge: JudgeConfig = field(default_factory=JudgeConfig, metadata={"help": "The feedback model."})
    sft: dict = _f({}, "Training config of the sft step (as in a training YAML), e.g. `{training: {max_steps: 30}}`.")
    dpo: dict = _f({}, "Training config of the dpo step, e.g. `{training: {max_steps: 50}, preference: {beta: 0.1}}`.")
    reward: dict = _f({}, "Training config of the reward step (a reward model on the pairs, from `policy`).")
    grpo: dict = _f(
        {}, "Training config of the grpo step, e.g. `{grpo: {num_generations: 4}, training: {max_steps: 30}}`."
    )
