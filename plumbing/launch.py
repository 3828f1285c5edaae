"""The first step of every training run: the Accelerator, launch checks, the config checked for this launch,
the resume preflight, seeds."""

import dataclasses
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

from plumbing import run_lock
from plumbing.checkpoints import RESUMABLE_KEYS, finished_steps, list_checkpoints
from plumbing.config import read_yaml, validate
from plumbing.distributed import check_shared_output_dir, main_decides, make_accelerator
from plumbing.errors import UserError
from plumbing.memory_model import check_fits
from plumbing.metrics import wandb_logged_in


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


def start_run(cfg):
    """The first step of sft.py's and betadpo.py's training: the Accelerator (train.mixed_precision), the launch
    checks, the config checked for this process count, preflight (before anything is loaded or written: wandb
    login, a resumed run's config), and every random generator seeded from train.seed. → the accelerator."""
    from transformers.utils import logging

    logging.disable_progress_bar()  # transformers' per-file bars ("Writing model shards") would redraw in log files
    accelerator = make_accelerator(cfg)  # mixed precision, process-group timeout, FSDP2 reduce dtype
    check_launch(accelerator)
    # The main process checks (it reads the filesystem) and every process gets its verdict; then every process
    # must see the output directory the main process writes into.
    main_decides(accelerator, lambda: preflight(cfg, accelerator.num_processes))  # validates the config first
    main_decides(accelerator, lambda: check_fits(cfg, accelerator))  # the launch guard: the memory model vs the device
    check_shared_output_dir(accelerator, Path(cfg.train.output_dir))
    lock_output_dir(accelerator, Path(cfg.train.output_dir))  # one job per output directory
    seed_everything(cfg.train.seed)
    return accelerator


def lock_output_dir(accelerator, out: Path):
    """One job per output directory (plumbing/run_lock.py): the main process takes out/lock.json, the others
    follow its verdict. A refusal is one line from the main process; the others exit quietly."""
    from accelerate.utils import broadcast_object_list

    verdict = [None]
    if accelerator.is_main_process:
        try:
            run_lock.acquire(out)
        except UserError as e:
            verdict[0] = str(e)
        except OSError as e:
            verdict[0] = (f"train.output_dir: cannot write its lock {out / run_lock.LOCK} ({e.strerror}); "
                          "choose another train.output_dir")
    broadcast_object_list(verdict)
    if verdict[0] is not None:
        if not accelerator.is_main_process:
            sys.exit(2)
        raise UserError(verdict[0])


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)



def _flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def preflight(cfg, num_processes: int):
    """Checks that need neither data nor model, before anything is loaded or written (each a UserError): the
    config for this number of processes; an output directory that cannot be one; a run that would resume with
    a config it was not started with; wandb online without a login."""
    validate(cfg, num_processes)
    if cfg.log.wandb and cfg.log.wandb_mode == "online" and not wandb_logged_in():
        raise UserError("log.wandb_mode: online needs a W&B login (`wandb login`, or WANDB_API_KEY); or use "
                        "log.wandb_mode: offline and `wandb sync` later")
    out = Path(cfg.train.output_dir)
    existing = next(p for p in (out, *out.parents) if p.exists())  # out itself, or the directory it will be made in
    if not existing.is_dir():
        raise UserError(f"train.output_dir: '{existing}' is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"train.output_dir: '{existing}' is not writable; choose another train.output_dir")
    if not list_checkpoints(out) and finished_steps(out) is None:
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
