"""The inputs a run was started with, pinned in train.output_dir/inputs.json: a resume with other data, another
model or another tokenizer under the same output_dir and config would silently mix two runs in one.

What is fingerprinted is content, cheaply:
- data: the SHA-256 of the tokenized ids (scoring.token_hash), computed from the token arrays when they are
  built (token_cache.py) and kept with them, so a resume from the tokenized cache costs nothing; a moved or
  re-downloaded file with the same rows is the same data;
- a model (and a separate reference): per weight file its size and the SHA-256 of its first, middle and last
  MiB (retraining changes every tensor; a copy with new modification times is the same model); a Hub id that
  is no local path is its name;
- the tokenizer: its class, vocabulary (with added tokens), special tokens and chat template.

On resume a difference stops the run with one line naming what changed. `--train.allow_changed_inputs true`
goes on anyway (with a warning), and inputs.json keeps the earlier fingerprints under "earlier" with the step
where they stopped applying.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

from plumbing.models import model_identity
from plumbing.scoring import token_hash
from plumbing.storage import remove_quietly
from plumbing.token_cache import tokenizer_fingerprint

INPUTS = "inputs.json"
SAMPLE = 1 << 20  # bytes read at each of a weight file's start, middle and end


def _file_sample(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        for offset in sorted({0, max(0, size // 2 - SAMPLE // 2), max(0, size - SAMPLE)}):
            f.seek(offset)
            digest.update(f.read(SAMPLE))
    return digest.hexdigest()


def model_fingerprint(name: str) -> dict:
    identity = model_identity(name)  # resolved path + weight files
    root = Path(identity["model"])
    files = {f: _file_sample(root if root.is_file() else root / f) for f, _, _ in identity["files"]}
    return {"files": files} if files else {"name": identity["model"]}


def fingerprint_inputs(cfg, tokenizer, **data) -> dict:
    """{what: fingerprint} of this run's inputs; `data`: name → tokenized rows (train=..., eval=...)."""
    inputs = {f"{name} data": {"rows": len(rows), "sha256": token_hash(rows)} for name, rows in data.items()}
    if cfg.model.name_or_path != "tiny":  # "tiny" is built from the config (sft.py)
        inputs["model"] = model_fingerprint(cfg.model.name_or_path)
    if getattr(cfg.model, "ref_name_or_path", ""):
        inputs["reference"] = model_fingerprint(cfg.model.ref_name_or_path)
    inputs["tokenizer"] = tokenizer_fingerprint(tokenizer)
    return inputs


WHERE = {"train data": "data.dataset", "eval data": "data.dataset / data.eval_size", "model": "model.name_or_path",
         "reference": "model.ref_name_or_path", "tokenizer": "model.name_or_path's tokenizer"}


def changed_inputs(output_dir: Path, inputs: dict) -> str | None:
    """What differs from the run's inputs.json, in words (e.g. "train data (data.dataset: 40 → 41 rows)");
    None if nothing; None also for a run without inputs.json (started before this existed: a warning)."""
    path = output_dir / INPUTS
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        print(f"warning: {path} is missing; resuming without checking that data, model and tokenizer are the same",
              file=sys.stderr)
        return None
    except ValueError:
        saved = {}
    changes = []
    keys = (set(saved) | set(inputs)) - {"earlier"}
    for key in [k for k in WHERE if k in keys] + sorted(keys - set(WHERE)):
        if saved.get(key) == inputs.get(key):
            continue
        was, now = saved.get(key), inputs.get(key)
        detail = ": other content"
        if was is None or now is None:
            detail = ": not used before" if was is None else ": no longer used"
        elif isinstance(was, dict) and isinstance(now, dict) and "rows" in was and was.get("rows") != now.get("rows"):
            detail = f": {was['rows']} → {now['rows']} rows"
        elif isinstance(was, dict) and isinstance(now, dict) and "files" in was and "files" in now:
            differ = sorted(f for f in set(was["files"]) | set(now["files"]) if was["files"].get(f) != now["files"].get(f))
            detail = f": other {', '.join(differ[:3])}{' ...' if len(differ) > 3 else ''}"
        changes.append(f"{key} ({WHERE.get(key, key)}{detail})")
    return ", ".join(changes) or None


def save_inputs(output_dir: Path, inputs: dict, step: int):
    """Write inputs.json (through a temporary file); fingerprints that a resume with allow_changed_inputs replaces
    are kept under "earlier", with the step until which they applied."""
    path = output_dir / INPUTS
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = {}
    earlier = saved.pop("earlier", []) if isinstance(saved, dict) else []
    if saved and saved != inputs and step > 0:  # (at step 0 nothing was trained on the old inputs)
        earlier.append({"until_step": step, **saved})
    tmp = path.with_name(f".{INPUTS}.tmp")
    try:
        tmp.write_text(json.dumps({**inputs, **({"earlier": earlier} if earlier else {})}, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError:
        remove_quietly(tmp)  # no partial file left behind (the error itself is reported by the caller)
        raise
