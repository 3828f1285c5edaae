"""Boilerplate shared by sft.py, betadpo.py and eval.py: config parsing, model loading, seeding, logging.

Nothing in here is β-DPO: the algorithm lives in betadpo.py. This file only keeps the three scripts from
repeating the plumbing around it.
"""

import dataclasses
import functools
import json
import os
import random
import sys
import typing
from pathlib import Path

import numpy as np
import torch
import yaml

import internlm2


class UserError(Exception):
    """A mistake in the user's config, data or paths: printed as one line, no traceback."""


def main_guard(main):
    """Run `main()`; turn a UserError into one readable line on stderr and exit code 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


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
            raise UserError(f"config: unknown key '{prefix}{key}' (known: {', '.join(fields)})")
        if dataclasses.is_dataclass(hints[key]):
            _check_keys(hints[key], value, f"{prefix}{key}.")


def _from_dict(cls, values: dict):
    hints = typing.get_type_hints(cls)
    kwargs = {k: _from_dict(hints[k], v) if dataclasses.is_dataclass(hints[k]) else v for k, v in values.items()}
    return cls(**kwargs)


def parse_config(cls, argv=None):
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
        if not Path(known.config).is_file():
            raise UserError(f"config file '{known.config}' does not exist")
        values = yaml.safe_load(Path(known.config).read_text()) or {}
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
        description="Every field below can also be set in the YAML file passed with --config FILE.",
    )
    parser.add_argument("--config", default=None, help="YAML file whose values override the defaults")
    parser.add_arguments(cls, dest="cfg", default=defaults)
    return parser.parse_args(argv).cfg


def _check_types(cfg, prefix=""):
    """YAML can put a string where a number belongs; catch that here with the key's name."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, hint = getattr(cfg, f.name), hints[f.name]
        if dataclasses.is_dataclass(hint):
            _check_types(value, f"{prefix}{f.name}.")
        elif typing.get_origin(hint) is typing.Literal:
            if value not in typing.get_args(hint):
                raise UserError(f"config: {prefix}{f.name} must be one of {typing.get_args(hint)}, got {value!r}")
        elif hint is bool and not isinstance(value, bool):
            raise UserError(f"config: {prefix}{f.name} must be true or false, got {value!r}")
        elif hint is float and isinstance(value, int) and not isinstance(value, bool):
            setattr(cfg, f.name, float(value))
        elif hint in (int, float, str) and not isinstance(value, hint):
            raise UserError(f"config: {prefix}{f.name} must be a {hint.__name__}, got {value!r}")


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


# --------------------------------------------------------------------------------------------------------
# Seeding, models, tokenizers
# --------------------------------------------------------------------------------------------------------
def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def _load(loader, name: str, what: str, **kwargs):
    """Call `loader.from_pretrained` and turn the usual failures into one clear sentence."""
    if _is_local(name) and not Path(name).expanduser().exists():
        raise UserError(f"{what} path '{name}' does not exist")
    online = _is_local(name) or hub_reachable()
    try:
        return loader.from_pretrained(name, local_files_only=not online, **kwargs)
    except OSError as e:
        if _is_local(name):
            raise UserError(f"could not load {what} from '{name}': {str(e).splitlines()[0]}") from None
        why = "(no network here?)" if online else "(it does not answer: no network?), nor from the local cache"
        raise UserError(
            f"could not load {what} '{name}' from the Hugging Face Hub {why}. Download it on a "
            f"machine with network (`hf download {name}`) and pass the local directory instead."
        ) from None


def _internlm2_dir(name: str):
    """The local directory of an InternLM2 checkpoint (see internlm2.py), or None for any other model."""
    if _is_local(name) and not Path(name).expanduser().exists():
        raise UserError(f"model path '{name}' does not exist")
    return internlm2.checkpoint_dir(name, _is_local(name), local_files_only=not _is_local(name) and not hub_reachable())


def _convert(load, name: str):
    try:
        return load()
    except internlm2.ConversionError as e:
        raise UserError(f"InternLM2 checkpoint '{name}': {e}") from None


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    if (internlm2_dir := _internlm2_dir(name)) is not None:  # InternLM2: converted, no remote code
        tok = _convert(lambda: internlm2.load_tokenizer(internlm2_dir), name)
    else:
        tok = _load(AutoTokenizer, name, "tokenizer", trust_remote_code=trust_remote_code)
    if tok.eos_token_id is None:
        raise UserError(f"tokenizer '{name}' has no EOS token; responses must end with one")
    if tok.pad_token_id is None:  # padding is always masked out, so any id will do
        tok.pad_token = tok.eos_token
    return tok


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def load_model(name: str, dtype: str = "float32", trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # the per-tensor "Loading weights" bar is noise next to ours
    if (internlm2_dir := _internlm2_dir(name)) is not None:  # InternLM2: loaded as transformers' Llama
        model = _convert(lambda: internlm2.load_model(internlm2_dir, DTYPES[dtype]), name)
    else:
        model = _load(AutoModelForCausalLM, name, "model", dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
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
# Logging
# --------------------------------------------------------------------------------------------------------
class MetricsLog:
    """Appends one JSON object per line to `metrics.jsonl` (main process only) and mirrors it to wandb."""

    def __init__(self, path: Path, enabled: bool, wandb_run=None):
        self.path, self.enabled, self.wandb_run = path, enabled, wandb_run

    def truncate_after(self, step: int):
        """On resume, drop rows a crashed run wrote after its last checkpoint, so each step appears once."""
        if self.enabled and self.path.exists():
            rows = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= step]
            self.path.write_text("".join(r + "\n" for r in rows))

    def write(self, row: dict):
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb_run is not None:
            prefix = "eval/" if row.get("split") == "eval" else "train/"
            self.wandb_run.log({prefix + k: v for k, v in row.items() if k not in ("step", "split")}, step=row["step"])


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
