"""No-grad scoring of many pairs over any number of processes, and the cache of the reference's log-probs
(train.precompute_ref). The scoring function itself is betadpo.py's `pair_logps`, passed in."""

import array
import hashlib
import json
import os
from pathlib import Path

import torch

from plumbing.data import collate_pairs
from plumbing.distributed import main_decides
from plumbing.models import model_identity
from plumbing.storage import attempt, settle


def score_in_chunks(accelerator, model, score, pairs, pad_id, batch_size: int, extra: dict | None = None) -> dict:
    """`score(batch)` → dict of (b,) tensors, over a list of tokenized pairs without gradients → (num_pairs,)
    tensors in order, on every process. `model` is put in eval mode meanwhile (no dropout).

    Pairs go through the model in fixed chunks of `batch_size`, dealt out to processes and gathered: the
    same chunks (so the same padding and the same floating-point results) on any number of processes.
    Every process runs the same number of forwards, repeating chunk 0 where it has run out: a DDP forward
    broadcasts buffers and an FSDP forward gathers shards, so a process that skipped one would hang the rest.
    extra: (num_pairs,) tensors put into each chunk's batch (e.g. precomputed reference log-probs).
    """
    from accelerate.utils import gather_object

    chunks = [list(range(s, min(s + batch_size, len(pairs)))) for s in range(0, len(pairs), batch_size)]
    P = accelerator.num_processes
    was_training = model.training
    model.eval()
    my_chunks = []  # (chunk number, its scores on the CPU)
    with torch.no_grad(), accelerator.autocast():
        for chunk in range(accelerator.process_index, -(-len(chunks) // P) * P, P):
            rows = chunks[chunk] if chunk < len(chunks) else chunks[0]  # a padding forward, result dropped below
            batch = collate_pairs([pairs[j] for j in rows], pad_id)
            batch.update({k: v[rows] for k, v in (extra or {}).items()})
            scores = score({k: v.to(accelerator.device) for k, v in batch.items()})
            if chunk < len(chunks):
                my_chunks.append((chunk, {k: v.to(torch.promote_types(v.dtype, torch.float32)).cpu() for k, v in scores.items()}))  # fp64 stays fp64
    model.train(was_training)
    gathered = [scores for _, scores in sorted(gather_object(my_chunks), key=lambda item: item[0])]  # every chunk, in order
    return {k: torch.cat([s[k] for s in gathered]).to(accelerator.device) for k in gathered[0]}


def token_hash(rows) -> str:
    """SHA-256 of tokenized rows, each a tuple of id lists ((prompt, chosen, rejected) pairs, (prompt, response)
    SFT examples): a key of the exact data, as cheap as reading the ids once. Part i of a row ends with −(i+1).
    Token arrays (data.TokenizedRows) hash themselves, to the same value, without lists."""
    if hasattr(rows, "token_hash"):
        return rows.token_hash()
    h = hashlib.sha256()
    for row in rows:
        h.update(array.array("q", [t for i, part in enumerate(row) for t in (*part, -(i + 1))]).tobytes())
    return h.hexdigest()


def reference_cache_file(cfg, pairs, name: str) -> Path:
    """Where train.precompute_ref keeps the reference's log-probs of `pairs`: train.ref_cache_dir, under a key of
    the reference model's files, the dtypes and the tokenized pairs (another model or data is another file)."""
    ref_id = model_identity(cfg.model.ref_name_or_path or cfg.model.name_or_path)  # its path and weight files
    identity = {"reference": ref_id["model"], "files": ref_id["files"],
                "dtype": cfg.model.dtype, "mixed_precision": cfg.train.mixed_precision, "pairs": token_hash(pairs)}
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
    return Path(cfg.train.ref_cache_dir) / f"{name}-{key}.pt"


def cached(accelerator, path: Path, compute, what: str, work: str) -> dict:
    """torch.load(path) if it exists; else compute() on every process, saved by the main process through a
    temporary file (a crash never leaves half a cache). The main process alone looks and reads, and sends the
    values (a few floats per pair) to the others: they take the same branch even where they do not see the
    same train.ref_cache_dir (another machine, NFS delay). what, work: printed, e.g. "reference log-probs",
    "one pass over 256 train pairs"."""
    values = main_decides(accelerator, lambda: torch.load(path) if path.exists() else None)
    if values is not None:
        accelerator.print(f"{what}: {path} (cached)")
        return values
    accelerator.print(f"{what}: {work} → {path}")
    values = compute()
    tmp = path.with_suffix(f".{os.getpid()}.tmp")

    def write():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(values, tmp)
        os.replace(tmp, path)

    needed = sum(v.numel() * v.element_size() for v in values.values())
    settle(accelerator, attempt(write, "the reference cache", path, needed) if accelerator.is_main_process else None,
           tmp, "cache file")
    return values
