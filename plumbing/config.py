"""The config: dataclasses of sections (every field is a YAML key `section: {field: value}` and a command-line
flag `--section.field value`), read from YAML and the command line, checked before anything runs.

The β-DPO section (`LossArgs`) and the full `Config` of betadpo.py and eval.py live in betadpo.py, beside the
math they configure; sft.py uses `SFTConfig` below (the same sections without `loss`).
"""

import dataclasses
import difflib
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from plumbing.errors import UserError


@dataclass
class ModelArgs:
    """model.*: the policy's starting point and its reference."""

    name_or_path: str = "tiny"  # hub id, local dir or .gguf file of the policy's starting point; "smollm2-135m" = SmolLM2-135M-Instruct from pip; "tiny" = the built-in tiny Llama
    ref_name_or_path: str = ""  # reference model; "" = the policy's starting point (the usual DPO setup)
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = "float32"  # dtype the weights are loaded in (float64: exactness checks)
    trust_remote_code: bool = False  # run a hub model's own code (InternLM2 needs none: internlm2.py converts it)
    tiny_hidden_size: int = 128  # width of the "tiny" model (only used when name_or_path is "tiny")
    tiny_layers: int = 2  # depth of the "tiny" model (only used when name_or_path is "tiny")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"  # attention kernel; auto = transformers' choice for the model (sdpa, or eager where sdpa is unsupported, e.g. Gemma 2); flash_attention_2 needs the flash-attn package and a GPU
    # LoRA (plumbing/lora.py, through peft): train low-rank adapters instead of every weight; the reference is then
    # the policy with its adapters switched off (no second model). lora_r 0 = full fine-tuning.
    lora_r: int = 0  # rank r of each adapter; 0 = no LoRA
    lora_alpha: float = 16.0  # adapter scale α: the update is (α / r)·B·A
    lora_dropout: float = 0.0  # dropout on the adapters' input (sft.py only: β-DPO keeps dropout off, see plumbing/lora.py)
    lora_target_modules: str = "all-linear"  # comma-separated module names (e.g. "q_proj,v_proj"), or all-linear (every Linear but the LM head)
    lora_merge_final: bool = False  # also write final/merged/: the adapters folded into the weights, a plain transformers model

    def check(self, cfg):
        """Range checks of the model section (run by validate with the whole config)."""
        import importlib.util

        require(not self.attn_implementation.startswith("flash") or importlib.util.find_spec("flash_attn") is not None,
                "model.attn_implementation", f"{self.attn_implementation} needs the flash-attn package (and a CUDA GPU): "
                "pip install flash-attn --no-build-isolation; or use sdpa")
        require(self.lora_r >= 0, "model.lora_r", f"must be ≥ 0, got {self.lora_r}")
        require(self.lora_alpha > 0, "model.lora_alpha", f"must be > 0, got {self.lora_alpha}")
        require(0 <= self.lora_dropout < 1, "model.lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        require(self.lora_dropout == 0 or not hasattr(cfg, "loss"), "model.lora_dropout",
                "must be 0 in β-DPO: dropout noise would enter every margin (the policy's log-probs, not the "
                "reference's); it is for sft.py")
        require(self.lora_r == 0 or self.name_or_path != "tiny", "model.lora_r",
                "needs a pretrained starting point: the tiny model is built from scratch (train it fully)")
        require(bool(self.lora_target_modules.strip(", ")), "model.lora_target_modules", "must name modules, or be all-linear")
        require(self.lora_r > 0 or not self.lora_merge_final, "model.lora_merge_final", "needs LoRA: set model.lora_r > 0")


@dataclass
class DataArgs:
    """data.*: which pairs (or demonstrations), and how they are cut to length."""

    dataset: str = "sort"  # "sort" (built-in task), "hh" (Anthropic/hh-rlhf), a Hub id org/name, a save_to_disk dir or a .jsonl(.gz)/.json/.parquet file
    eval_dataset: str = ""  # held-out pairs (any source above, all its rows); "" = eval_split, else the last eval_size rows of dataset
    eval_size: int = 256  # held-out pairs (sort: generated; hh, eval_split: the first N, 0 = all; else: see eval_dataset)
    subset: str = ""  # Hub dataset: its subset (load_dataset's `name`); "" = the dataset's default
    split: str = "train"  # Hub dataset or save_to_disk DatasetDict: the training split, e.g. "train_prefs"
    eval_split: str = ""  # held-out split of the same dataset, e.g. "test_prefs" (its first eval_size rows)
    columns: str = ""  # other column names, ours=theirs: "prompt=question,chosen=response_j,rejected=response_k" (a.b = nested)
    drop_ties: bool = False  # drop pairs with score_chosen == score_rejected (they are counted either way)
    preview: int = 0  # N > 0: print the first N training pairs as JSON lines (exact text, token counts, cuts) and exit
    cache_dir: str = ""  # tokenized data cache: "" = $BETADPO_DATA_CACHE, else ~/.cache/betadpo/data; "off" = in memory
    hh_subset: str = ""  # Anthropic/hh-rlhf data_dir, e.g. "harmless-base"; "" = all of HH
    chat_template: Literal["auto", "on", "off"] = "auto"  # rows through the tokenizer's chat template: auto = if it has one; off = text as given (HH: raw "\n\nHuman: … \n\nAssistant:", the paper's)
    max_length: int = 64  # max tokens of prompt + response
    max_prompt_length: int = 32  # longer prompts keep their last max_prompt_length tokens
    seed: int = 0  # seed of the built-in task's data (fixed across training seeds)
    num_sft: int = 20000  # built-in task: SFT demonstrations
    num_train: int = 4096  # built-in task: training preference pairs
    sft_noise: float = 0.5  # built-in task: fraction of SFT targets with 1–2 wrong digits
    high_gap_ratio: float = 0.3  # built-in task: fraction of high-gap pairs (correct vs. random digits)
    flip_ratio: float = 0.0  # built-in task: fraction of training pairs with chosen/rejected swapped
    sort_min_len: int = 4  # built-in task: shortest list to sort
    sort_max_len: int = 12  # built-in task: longest list to sort


@dataclass
class TrainArgs:
    """train.*: optimisation, checkpoints and outputs (sft.py and betadpo.py)."""

    output_dir: str = "runs/betadpo"  # checkpoints, metrics.jsonl, config.yaml and final/ go here
    batch_size: int = 64  # pairs per optimizer step, over all processes and accumulation steps
    grad_accum: int = 1  # micro-batches per optimizer step; each is its own calibration batch
    lr: float = 5e-4  # peak learning rate
    # the original DPO code uses RMSprop; sgd (plain, no momentum) has no per-parameter normalisation (a control)
    optimizer: Literal["adamw", "rmsprop", "sgd"] = "adamw"
    weight_decay: float = 0.0  # decoupled weight decay of the model's parameters (never of c)
    warmup_steps: int = 10  # linear warm-up, then constant (the reference code's schedule)
    max_grad_norm: float = 10.0  # gradient clipping of the model's parameters
    max_steps: int = 100  # optimizer steps; 0 = `epochs` passes over the training pairs
    epochs: int = 1  # used when max_steps is 0
    seed: int = 0  # model init (tiny), filter generator
    save_every: int = 50  # checkpoint every N optimizer steps (and at the end)
    eval_every: int = 50  # held-out evaluation every N optimizer steps (and at the end); 0 = only at the end
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # autocast of the forward passes (accelerate)
    # How log-probs are computed, in all three scripts: the switch is betadpo.py's `logps_at` (LOG-PROBS section).
    # plain: the textbook full fp32 log-softmax; fast: plumbing/fast_logps.py (LM head where used, chunked kernel,
    # packing); fused: fast with the fused LM head (Llama, GPT-NeoX; other models: fast). Same numbers to ~1e-6.
    logps: Literal["fused", "fast", "plain"] = "fused"
    # fast and fused, on models that pack: each pair's prompt goes through the model once, followed by both responses
    # behind a mask that keeps them apart (plumbing/fast_logps.py, 4). Same numbers; false: a row per response.
    prefix_sharing: bool = True
    gradient_checkpointing: bool = False  # recompute activations in backward: far less memory, ~1/3 more compute
    precompute_ref: bool = False  # one no-grad reference pass over all pairs before training, then free the reference
    ref_cache_dir: str = "runs/ref_cache"  # precomputed reference log-probs, keyed by reference model and data
    group_by_length: bool = False  # batch pairs of similar length (less padding); changes which pairs calibrate together
    fsdp_reduce_dtype: Literal["fp32", "bf16"] = "fp32"  # FSDP2 with mixed precision: dtype of the gradient reduce-scatter (bf16 halves its traffic; docs/SCALING.md)
    dist_timeout_min: float = 60.0  # minutes a process waits in a collective (e.g. while rank 0 loads or saves) before the run stops
    allow_changed_inputs: bool = False  # resume even though data, model or tokenizer changed since the run started (inputs.json)
    memory_check: bool = True  # refuse a launch whose memory model (docs/SCALING.md) exceeds a device's memory; false: launch anyway


@dataclass
class EvalArgs:
    """eval.*: what eval.py evaluates, and how."""

    policy: str = ""  # eval.py: the trained policy (a final/ directory); "" = train.output_dir/final
    reference: str = ""  # eval.py: what it is compared with; "" = model.ref_name_or_path, else model.name_or_path
    output_dir: str = "runs/eval"  # eval.py: where eval.json and generations.jsonl go
    num_prompts: int = 128  # eval.py: held-out prompts to sample completions for
    samples_per_prompt: int = 4  # eval.py: completions per prompt at eval.temperature (for KL)
    max_new_tokens: int = 16  # eval.py: generation length limit
    batch_size: int = 32  # eval.py and held-out evaluation: pairs per scoring forward (2× as many sequences); at 2,048 tokens and 7B+ use 2–4 (docs/SCALING.md)
    seed: int = 0  # eval.py: sampling seed
    cache_reference: bool = False  # eval.py: keep the reference's completions in train.ref_cache_dir and reuse them (the same samples)
    temperature: float = 1.0  # eval.py: sampling temperature of the KL samples and the second set of gold metrics (> 0)
    generations_temperature: float = 0.0  # eval.py: temperature of the completions in generations.jsonl (0 = greedy)


@dataclass
class LogArgs:
    """log.*: progress on the terminal, and the Weights & Biases mirror of metrics.jsonl."""

    progress_every: int = 10  # when the output is not a terminal: one progress line every N steps (a terminal gets a bar)
    kept_pairs: bool = False  # betadpo.py: kept.jsonl, each calibration batch's training-pair indices and the filter's kept mask

    wandb: bool = False  # also log to Weights & Biases
    wandb_project: str = "betadpo"  # wandb project name
    wandb_mode: Literal["offline", "online"] = "offline"  # offline needs no network; `wandb sync` later


@dataclass
class SFTConfig:
    """sft.py's config: every section but β-DPO's `loss` (betadpo.py's Config adds it)."""

    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    log: LogArgs = field(default_factory=LogArgs)


def validate(cfg, num_processes: int = 1):
    """Out-of-range values stop the run before anything is loaded, naming the key. `cfg`: SFTConfig, or
    betadpo.py's Config; a section with a `check(cfg)` method runs it too."""
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            value = getattr(getattr(cfg, section.name), f.name)
            if isinstance(value, float):
                require(math.isfinite(value), f"{section.name}.{f.name}", f"must be a finite number, got {value}")
    for section in dataclasses.fields(cfg):  # a section's own range checks (betadpo.py's LossArgs has some)
        check = getattr(getattr(cfg, section.name), "check", None)
        if check is not None:
            check(cfg)
    T, D = cfg.train, cfg.data
    require(T.lr > 0, "train.lr", f"must be > 0, got {T.lr}")
    require(T.batch_size > 0, "train.batch_size", f"must be > 0, got {T.batch_size}")
    require(T.grad_accum > 0, "train.grad_accum", f"must be > 0, got {T.grad_accum}")
    require(T.max_steps >= 0, "train.max_steps", f"must be ≥ 0, got {T.max_steps}")
    require(T.max_steps > 0 or T.epochs > 0, "train.epochs", "must be > 0 when train.max_steps is 0")
    require(T.warmup_steps >= 0, "train.warmup_steps", f"must be ≥ 0, got {T.warmup_steps}")
    require(T.save_every > 0, "train.save_every", f"must be > 0, got {T.save_every}")
    require(T.eval_every >= 0, "train.eval_every", f"must be ≥ 0, got {T.eval_every}")
    require(T.max_grad_norm >= 0, "train.max_grad_norm", f"must be ≥ 0, got {T.max_grad_norm}")
    require(T.weight_decay >= 0, "train.weight_decay", f"must be ≥ 0, got {T.weight_decay}")
    require(T.dist_timeout_min > 0, "train.dist_timeout_min", f"must be > 0, got {T.dist_timeout_min}")
    require(
        T.batch_size % (num_processes * T.grad_accum) == 0,
        "train.batch_size",
        f"({T.batch_size}) must be divisible by processes × grad_accum ({num_processes} × {T.grad_accum})",
    )
    require(0 < D.max_prompt_length < D.max_length, "data.max_prompt_length", f"must be in (0, data.max_length), got {D.max_prompt_length}")
    require(0 <= D.high_gap_ratio <= 1, "data.high_gap_ratio", f"must be in [0, 1], got {D.high_gap_ratio}")
    require(0 <= D.flip_ratio <= 1, "data.flip_ratio", f"must be in [0, 1], got {D.flip_ratio}")
    require(0 <= D.sft_noise <= 1, "data.sft_noise", f"must be in [0, 1], got {D.sft_noise}")
    require(D.eval_size >= 0, "data.eval_size", f"must be ≥ 0, got {D.eval_size}")
    require(1 <= D.sort_min_len <= D.sort_max_len, "data.sort_min_len", "must be in [1, data.sort_max_len]")
    require(D.preview >= 0, "data.preview", f"must be ≥ 0, got {D.preview}")
    columns = [item.split("=") for item in D.columns.split(",") if item.strip()]
    require(all(len(c) == 2 and c[0].strip() in ("prompt", "chosen", "rejected", "score_chosen", "score_rejected") and c[1].strip()
                for c in columns) and len({c[0].strip() for c in columns}) == len(columns), "data.columns",
            f"must be like 'prompt=question,chosen=response_j,rejected=response_k' (ours: prompt, chosen, rejected, "
            f"score_chosen, score_rejected; each once), got {D.columns!r}")
    require(cfg.log.progress_every > 0, "log.progress_every", f"must be > 0, got {cfg.log.progress_every}")
    E = cfg.eval
    for key in ("num_prompts", "samples_per_prompt", "max_new_tokens", "batch_size"):
        require(getattr(E, key) > 0, f"eval.{key}", f"must be > 0, got {getattr(E, key)}")
    require(E.temperature > 0, "eval.temperature", f"must be > 0 (the KL needs samples; greedy metrics are always computed), got {E.temperature}")
    require(E.generations_temperature >= 0, "eval.generations_temperature", f"must be ≥ 0, got {E.generations_temperature}")


# --------------------------------------------------------------------------------------------------------
# Config: dataclasses ← YAML file ← command line (`--section.field value`)
# --------------------------------------------------------------------------------------------------------
def _check_keys(cls, values: dict, prefix: str = ""):
    """Reject YAML keys that are not fields of the dataclass `cls` (recursively), naming the bad key."""
    if not isinstance(values, dict):
        raise UserError(f"config: '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"known: {', '.join(fields)}"
            raise UserError(f"config: unknown key '{prefix}{key}' ({hint})")
        if dataclasses.is_dataclass(hints[key]):
            _check_keys(hints[key], value, f"{prefix}{key}.")


def _from_dict(cls, values: dict):
    hints = typing.get_type_hints(cls)
    kwargs = {k: _from_dict(hints[k], v) if dataclasses.is_dataclass(hints[k]) else v for k, v in values.items()}
    return cls(**kwargs)


def parse_config(cls, argv=None, description: str = ""):
    """`--config FILE.yaml` sets defaults; any `--section.field value` on the command line overrides them.

    Returns an instance of `cls` (a dataclass of dataclasses). Unknown keys in the file are rejected here;
    simple-parsing rejects unknown command-line flags and values outside a `Literal`'s choices.
    """
    import argparse

    import simple_parsing
    from simple_parsing import ArgumentGenerationMode, NestedMode

    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    values = {}
    if known.config:
        values = read_yaml(known.config, "config file")
        _check_keys(cls, values)
    try:
        defaults = _from_dict(cls, values)
    except (TypeError, ValueError) as e:
        raise UserError(f"config file '{known.config}': {e}") from None
    _check_types(defaults)  # before argparse sees them: it would choke on a bad YAML value with no key name
    parser = simple_parsing.ArgumentParser(
        argument_generation_mode=ArgumentGenerationMode.NESTED,
        nested_mode=NestedMode.WITHOUT_ROOT,
        add_config_path_arg=False,
        description=(description + "\n\n" if description else "") + "Every field below can also be set in the YAML file passed with --config FILE.",
    )
    parser.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE", help="YAML file whose values override the defaults")
    parser.add_arguments(cls, dest="cfg", default=defaults)
    return parser.parse_args(argv).cfg


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the
    last value silently, so a forgotten earlier line would quietly win or lose)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' appears twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _StrictLoader.construct_mapping)


def read_yaml(path, what: str) -> dict:
    """A YAML file → its mapping ({} when empty); any problem is a UserError naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} '{path}' {'is not a file' if path.exists() else 'does not exist'}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} '{path}' is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"{what} '{path}' cannot be read ({e.strerror})") from None
    try:
        values = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        if problem.endswith("appears twice"):
            raise UserError(f"{what} '{path}'{where}: {problem}; keep one of them") from None
        raise UserError(f"{what} '{path}'{where}: not valid YAML ({problem})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"{what} '{path}': expected a mapping of sections (model:, data:, ...), got {type(values).__name__}")
    return values


def _check_types(cfg, prefix=""):
    """YAML can put a string where a number belongs; catch that here with the key's name."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, hint = getattr(cfg, f.name), hints[f.name]
        if dataclasses.is_dataclass(hint):
            _check_types(value, f"{prefix}{f.name}.")
        elif typing.get_origin(hint) is typing.Literal:
            if isinstance(value, bool) and {"on", "off"} <= set(typing.get_args(hint)):  # YAML reads on/off as true/false
                value = "on" if value else "off"
                setattr(cfg, f.name, value)
            if value not in typing.get_args(hint):
                raise UserError(f"config: {prefix}{f.name} must be one of {typing.get_args(hint)}, got {value!r}")
        elif hint is bool and not isinstance(value, bool):
            raise UserError(f"config: {prefix}{f.name} must be true or false, got {value!r}")
        elif hint is float and isinstance(value, int) and not isinstance(value, bool):
            setattr(cfg, f.name, float(value))
        elif hint is float and isinstance(value, str) and _is_number(value):
            setattr(cfg, f.name, float(value))  # YAML 1.1 reads 1e-4 (no dot) as a string; the command line does not
        elif hint in (int, float, str) and not isinstance(value, hint):
            kind = {int: "an integer", float: "a number", str: "a string"}[hint]
            raise UserError(f"config: {prefix}{f.name} must be {kind}, got {value!r}")


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def require(ok: bool, key: str, message: str):
    """Config validation: raise a UserError naming the key when `ok` is false."""
    if not ok:
        raise UserError(f"config: {key} {message}")


def save_config(cfg, path: Path):
    path.write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
