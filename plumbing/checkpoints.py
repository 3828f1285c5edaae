"""The run directory's checkpoints and final/: atomic saves, manifests with checksums, resume from the newest
intact checkpoint."""

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from plumbing import lora
from plumbing.distributed import main_decides, spread
from plumbing.errors import STATUS, TrainingStopped, UserError
from plumbing.inputs import changed_inputs
from plumbing.models import gathered_state_dict
from plumbing.storage import attempt, settle


class _TiedWeightNotice(logging.Filter):
    """accelerate's save_state warns "Removed shared tensor {'lm_head.weight'} while saving" at every checkpoint
    of a model with tied embeddings (SmolLM2, the tiny Llama): the tied copy is stored once and re-tied on load
    (tests/test_reliability.py resumes such runs exactly), so the warning says nothing; it is dropped."""

    def filter(self, record):
        return "Removed shared tensor" not in record.getMessage()


logging.getLogger("accelerate.utils.other").addFilter(_TiedWeightNotice())


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
                  "train.ref_cache_dir", "train.gradient_checkpointing", "train.dist_timeout_min", "train.allow_changed_inputs",
                  "train.memory_check",
                  "log.", "eval.", "data.preview", "data.cache_dir")


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_problem(ckpt: Path, checksums: bool | dict = True) -> str | None:
    """None if every file of the checkpoint is present with the size (and SHA-256) its manifest lists;
    otherwise what is wrong, in a few words. checksums: a dict {file path: SHA-256} already computed (spread
    over the processes) is used instead of reading the files again."""
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
        if checksums and (checksums[str(path)] if isinstance(checksums, dict) and str(path) in checksums else _sha256(path)) != meta["sha256"]:
            return f"{name} does not match its checksum"
    return None


def list_checkpoints(output_dir: Path) -> list[Path]:
    return sorted((output_dir / "checkpoints").glob("step-*"))


def checkpoint_bytes(output_dir: Path, tensors) -> int:
    """About how much a checkpoint needs: the newest one's size, or before the first, 3× the weights (weights
    and two optimizer moments, as AdamW keeps). Said in the message of a full disk."""
    for ckpt in reversed(list_checkpoints(output_dir)):
        try:
            return sum(f["bytes"] for f in json.loads((ckpt / MANIFEST).read_text())["files"].values())
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return 3 * sum(t.numel() * t.element_size() for t in tensors)


def save_checkpoint(accelerator, output_dir: Path, step: int, tensors):
    """accelerator.save_state (model, optimizer, schedule, registered state, random generators) + a manifest,
    in a temporary directory renamed into place; then all but the newest CHECKPOINTS_KEPT are deleted, once
    the new one is verified. `tensors`: the weights (and extra trained tensors), checked finite first.

    Verification is cheap: every file is read back once to compute its SHA-256 for the manifest (the files spread
    over the processes, so that no process waits in a collective while one hashes everything), and after the
    rename every size is checked against it. (On resume the checksums are checked too.)
    A failed write (disk full, ...) on any process: the temporary directory is removed and every process stops
    with one line (plumbing/storage.py); the older checkpoints are untouched."""
    tensors = list(tensors)
    check_finite_weights(accelerator, tensors, step)
    root = output_dir / "checkpoints"
    tmp, final = root / f".tmp-step-{step:08d}", root / f"step-{step:08d}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    # every process writes (its random generators; under FSDP its shards): all learn whether all succeeded
    error = attempt(lambda: accelerator.save_state(str(tmp)), "checkpoint", final, checkpoint_bytes(output_dir, tensors))
    settle(accelerator, error, tmp, "checkpoint")
    names = main_decides(accelerator, lambda: [str(f.relative_to(tmp)) for f in sorted(tmp.rglob("*")) if f.is_file()])
    checksums = spread(accelerator, names, lambda name: _sha256(tmp / name))  # each process hashes its share

    def manifest_and_rename():
        files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": checksums[name]} for name in names}
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1) + "\n")
        if final.exists():  # left by an earlier attempt at this step
            shutil.rmtree(final)
        os.replace(tmp, final)  # atomic on POSIX

    error = attempt(manifest_and_rename, "checkpoint", final) if accelerator.is_main_process else None
    settle(accelerator, error, tmp, "checkpoint")
    if accelerator.is_main_process:
        problem = checkpoint_problem(final, checksums=False)
        if problem is not None:
            print(f"warning: the new checkpoint {final} is damaged ({problem}); the older ones are kept", file=sys.stderr)
        else:
            STATUS.checkpoint = str(final)
            for old in list_checkpoints(output_dir)[:-CHECKPOINTS_KEPT]:
                shutil.rmtree(old)
    else:
        STATUS.checkpoint = str(final)
    accelerator.wait_for_everyone()


def finished_steps(output_dir: Path) -> int | None:
    """The step count a finished run recorded in final/finished.json; None if the run has not finished."""
    try:
        return int(json.loads((output_dir / "final" / FINISHED).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# final/'s weights under FSDP2 are written in files of at most this many bytes (a tensor larger than that: a file
# of its own), each gathered, written and freed before the next: the main process holds its shard plus one file's
# tensors, never the whole model (docs/SCALING.md). Tests set _TEST_FINAL_FILE_BYTES to split a tiny model.
FINAL_FILE_BYTES = 256 << 20


def _streams_weights(model) -> bool:
    """Whether final/'s weights can be written a file at a time: FSDP2 (DTensor parameters), not peft (its
    save_pretrained filters the adapter out of the whole state dict; adapters are small, merged/ needs all), and
    no transformers weight conversion to revert on save (it may need tensors from several files; Llama has none)."""
    from torch.distributed.tensor import DTensor
    from transformers.conversion_mapping import get_model_conversion_mapping

    return (any(isinstance(p, DTensor) for p in model.parameters()) and not hasattr(model, "peft_config")
            and not getattr(model, "_weight_conversions", None)
            and not get_model_conversion_mapping(model, add_legacy=False))


def _write_weights_streamed(accelerator, model, directory: Path, final: Path) -> str | None:
    """FSDP2: the full weights into `directory` as save_pretrained lays out a big model (model.safetensors, or
    model-0000k-of-0000n.safetensors + model.safetensors.index.json), gathering one file's tensors at a time.

    Every process walks the same state dict in the same order and takes part in each tensor's all-gather
    (DTensor.full_tensor); only the main process keeps the result, writes the file and frees it. Tied weights
    (lm_head = embed_tokens) are stored once, as save_pretrained does. → the main process's storage fault, if any
    (it stops writing but keeps gathering, so that no process waits alone in a collective)."""
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor

    tied = getattr(model, "all_tied_weights_keys", None) or {}
    state = {k: v for k, v in model.state_dict().items() if k not in tied}  # DTensors: shapes are the whole tensors'
    limit = int(os.environ.get("_TEST_FINAL_FILE_BYTES", FINAL_FILE_BYTES))
    files: list[list[str]] = [[]]
    size = 0
    for name, value in state.items():  # in order, a new file when this tensor would pass the limit
        nbytes = value.numel() * value.element_size()
        if files[-1] and size + nbytes > limit:
            files.append([])
            size = 0
        files[-1].append(name)
        size += nbytes
    total = sum(v.numel() * v.element_size() for v in state.values())
    names = ["model.safetensors"] if len(files) == 1 else [f"model-{k:05d}-of-{len(files):05d}.safetensors"
                                                          for k in range(1, len(files) + 1)]
    error = None
    for file_name, keys in zip(names, files):
        tensors = {}
        for key in keys:
            full = state[key].full_tensor() if isinstance(state[key], DTensor) else state[key]  # collective: all ranks
            if accelerator.is_main_process:
                tensors[key] = full.contiguous()
            del full
        if accelerator.is_main_process and error is None:
            error = attempt(lambda: save_file(tensors, directory / file_name, metadata={"format": "pt"}),
                            "final model", final, total)
        del tensors  # freed before the next file is gathered
    if accelerator.is_main_process and error is None and len(files) > 1:
        index = {"metadata": {"total_parameters": model.num_parameters(), "total_size": total},
                 "weight_map": {key: name for name, keys in zip(names, files) for key in keys}}
        index_text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        index_file = directory / "model.safetensors.index.json"
        error = attempt(lambda: index_file.write_text(index_text), "final model", final)
    return error


def save_final(accelerator, model, tokenizer, output_dir: Path, step: int, extra_files: dict | None = None, merge_lora: bool = False):
    """final/: `save_pretrained` model + tokenizer (plain transformers can load them), {file name: JSON object}
    extras, and finished.json last. Written in .final-tmp/ and renamed; a crash at any point leaves either
    the previous final/ or none, and the next run (whose last checkpoint is at the last step) writes it again.

    Under FSDP2 the weights are gathered and written a file at a time (_write_weights_streamed); otherwise
    (one process, DDP, LoRA) the whole state dict is gathered on the main process and save_pretrained writes it.
    Test-only: the environment variable _TEST_PAUSE_IN_SAVE_FINAL=SECONDS sleeps before finished.json is
    written, so that a test can kill the process in the middle of a final save.
    With LoRA the model is peft's: save_pretrained writes the adapter only; merge_lora adds final/merged/
    (plumbing/lora.py)."""
    check_finite_weights(accelerator, model.parameters(), step)
    unwrapped = accelerator.unwrap_model(model)
    streamed = _streams_weights(unwrapped)
    state_dict = {} if streamed else gathered_state_dict(accelerator, model)  # gathers FSDP shards
    tmp, final, old = output_dir / ".final-tmp", output_dir / "final", output_dir / ".final-old"

    def clear():
        for stale in (tmp, old):
            if stale.exists():
                shutil.rmtree(stale)
        if streamed:  # save_pretrained with no state dict writes the rest (config.json with the dtype and class,
            # generation_config.json, a remote-code model's code): first, as it deletes model-0000k-of-0000n files
            # that are not its own
            unwrapped.save_pretrained(tmp, state_dict={})

    error = attempt(clear, "final model", final) if accelerator.is_main_process else None
    if streamed:
        error = _write_weights_streamed(accelerator, unwrapped, tmp, final) or error

    def write():
        if not streamed:
            unwrapped.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        if merge_lora:
            lora.save_merged(unwrapped, tmp / "merged", state_dict, tokenizer)
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

    needed = sum(t.numel() * t.element_size() for t in state_dict.values()) if state_dict else None
    if accelerator.is_main_process and error is None:
        error = attempt(write, "final model", final, needed)
    STATUS.defer_interrupt = False  # training is over: from here on Ctrl-C stops at once
    if settle(accelerator, error, tmp, "final/", interrupted=STATUS.interrupted):
        raise KeyboardInterrupt  # Ctrl-C came during the final save, which was completed first
    accelerator.wait_for_everyone()


def resume_point(accelerator, output_dir: Path, total_steps: int, inputs: dict | None = None,
                 allow_changed_inputs: bool = False) -> tuple[Path | None, bool]:
    """Where this run starts → (the newest intact checkpoint or None, whether the run is already finished).

    Damaged checkpoints newer than it are renamed damaged-step-N with a warning (kept for inspection, never
    resumed from). A resume whose `inputs` (plumbing/inputs.py) differ from the run's inputs.json stops with
    one line naming what changed, unless allow_changed_inputs. Every process gets the same answer (the main
    process checks, then broadcasts)."""
    from accelerate.utils import broadcast_object_list

    done, newest = main_decides(accelerator, lambda: (finished_steps(output_dir), [str(p) for p in list_checkpoints(output_dir)[-1:]]))
    if done is not None and done >= total_steps:
        accelerator.print(f"{output_dir} already finished {done} steps (this config asks for {total_steps}); nothing to do")
        return None, True
    # The newest checkpoint's checksums, its files spread over the processes (older ones: main alone, if needed).
    listed = main_decides(accelerator, lambda: [str(f) for c in newest for f in sorted(Path(c).rglob("*")) if f.is_file()])
    checksums = spread(accelerator, listed, lambda f: _sha256(Path(f)))
    answer = [None, None]  # [checkpoint, error]
    if accelerator.is_main_process:
        damaged = []
        for ckpt in reversed(list_checkpoints(output_dir)):
            problem = checkpoint_problem(ckpt, checksums)
            if problem is None:
                answer[0] = str(ckpt)
                break
            damaged.append((ckpt, problem))
        changed = changed_inputs(output_dir, inputs) if answer[0] is not None and inputs is not None else None
        if damaged and answer[0] is None:
            answer[1] = (f"every checkpoint in {output_dir / 'checkpoints'} is damaged ({damaged[0][0].name}: "
                         f"{damaged[0][1]}); delete {output_dir} (or use another train.output_dir) to start over")
        elif answer[0] is None and done is not None:
            answer[1] = (f"{output_dir} finished {done} steps but has no checkpoint to continue from to {total_steps}; "
                         "use another train.output_dir")
        elif changed and not allow_changed_inputs:
            answer[1] = (f"{output_dir} was started on other inputs: {changed} changed since; to resume anyway (the run "
                         "then mixes both) add --train.allow_changed_inputs true, or start fresh in another train.output_dir")
        else:
            if changed:
                print(f"warning: {output_dir}: {changed} changed since the run started; resuming anyway "
                      "(train.allow_changed_inputs); the earlier fingerprints stay in inputs.json", file=sys.stderr)
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
