"""The real-data study's data: the two committed files (experiments/data/README.md), checked by SHA-256, cut into
prompt / chosen / rejected rows and split into training and held-out pairs, deterministically.

    HH   Anthropic HH-RLHF harmless-base test split (2,312 dialogues). Last turn only: the prompt is the last human
         turn, the responses the last assistant turns (earlier turns are dropped: prompts stay short). Rows whose
         chosen and rejected dialogues do not share the prompt, or have an empty response, are skipped (9 rows).
    UF   UltraFeedback binarized (1,000 rows, GPT-4 scores). Rows whose chosen and rejected texts are identical are
         skipped (4 rows: no preference to learn). Ties in score are kept (111 rows): they are what the data holds,
         and what β-DPO's filter sees; the held-out accuracy on UF counts only pairs with score_chosen > score_rejected.

The split: rows ordered by SHA-256 of their prompt (then of the whole row), so that pairs sharing a prompt sit
together (HH repeats some prompts): the first n_heldout rows are held out, rows that share a prompt with the last
held-out one are dropped, and the next n_train rows are the training pairs. No RNG: the same on every machine
and Python version.

Rows are written as chat messages ({"prompt": [{"role": "user", ...}], "chosen": "...", "rejected": "..."}), so
plumbing/data.py renders them with the model's chat template; extra keys (scores, the source row) ride along for
the analyses and are ignored by the loader.
"""

import gzip
import hashlib
import json
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
FILES = {  # name → (file, SHA-256): experiments/data/README.md says where they come from
    "hh": ("hh-harmless-base-test.jsonl.gz", "ebfaaed21162a4de120ae85366075b34425e2a6303fac59b99555002f7016f03"),
    "uf": ("ultrafeedback-binarized-1000.jsonl.gz", "92e5c1a95b21ecfe31ccebd84b38a38058430ae369bc75c7b34e1f616cdd8832"),
}
SPLIT = {"hh": (1300, 1000), "uf": (600, 396)}  # (training, held-out) pairs of each file, after skipping


class DataChanged(Exception):
    pass


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_checked(name: str, data_dir: Path = DATA) -> list[dict]:
    """The rows of one committed file, after checking its SHA-256 (a changed file would change every result)."""
    file, expected = FILES[name]
    path = data_dir / file
    if not path.is_file():
        raise DataChanged(f"{path} is missing (it is committed with the repository)")
    if sha256(path) != expected:
        raise DataChanged(f"{path}: SHA-256 {sha256(path)} is not the committed file's {expected}")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def hh_rows(raw: list[dict]) -> tuple[list[dict], list[int]]:
    """HH dialogues → last-turn rows, and the 1-based numbers of the rows skipped."""
    from plumbing.data_shapes import HH_MARKER, hh_messages, split_hh

    rows, skipped = [], []
    for i, r in enumerate(raw, 1):
        prompt, chosen = split_hh(r["chosen"])
        rejected_prompt, rejected = split_hh(r["rejected"])
        turns = hh_messages(prompt) if prompt == rejected_prompt and HH_MARKER in prompt else None
        if (not turns or len(turns) < 2 or turns[-1] != {"role": "assistant", "content": ""} or turns[-2]["role"] != "user"
                or not turns[-2]["content"] or not chosen.strip() or not rejected.strip()):
            skipped.append(i)
            continue
        rows.append({"prompt": [turns[-2]], "chosen": chosen.strip(), "rejected": rejected.strip(), "source_row": i,
                     "turns": (len(turns) - 1 + 1) // 2})  # human turns in the whole dialogue
    return rows, skipped


def uf_rows(raw: list[dict]) -> tuple[list[dict], list[int]]:
    """UltraFeedback rows → chat rows with their GPT-4 scores, and the rows skipped (chosen text = rejected text)."""
    rows, skipped = [], []
    for i, r in enumerate(raw, 1):
        if r["chosen"].strip() == r["rejected"].strip():
            skipped.append(i)
            continue
        rows.append({"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": r["chosen"], "rejected": r["rejected"],
                     "source_row": i, "source_index": r["source_index"],
                     "score_chosen": r["metadata"]["score_chosen"], "score_rejected": r["metadata"]["score_rejected"]})
    return rows, skipped


def split(rows: list[dict], n_train: int, n_heldout: int) -> tuple[list[dict], list[dict], int]:
    """→ (training rows, held-out rows, rows dropped at the boundary), in the hash order of the module docstring."""
    digest = lambda text: hashlib.sha256(text.encode()).hexdigest()  # noqa: E731
    order = sorted(rows, key=lambda r: (digest(r["prompt"][0]["content"]), digest(json.dumps(r, sort_keys=True))))
    heldout = order[:n_heldout]
    rest = order[n_heldout:]
    boundary = 0
    while boundary < len(rest) and rest[boundary]["prompt"] == heldout[-1]["prompt"]:
        boundary += 1
    train = rest[boundary : boundary + n_train]
    if len(train) < n_train:
        raise DataChanged(f"only {len(train)} training rows left for {n_train}")
    return train, heldout, boundary


def prepare(name: str, data_dir: Path = DATA, sizes: tuple[int, int] | None = None) -> dict:
    """→ {"train": rows, "heldout": rows, "skipped": [...], "dropped": n}: one data set, checked and split."""
    raw = read_checked(name, data_dir)
    rows, skipped = (hh_rows if name == "hh" else uf_rows)(raw)
    train, heldout, dropped = split(rows, *(sizes or SPLIT[name]))
    return {"train": train, "heldout": heldout, "skipped": skipped, "dropped": dropped, "rows": len(raw)}


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path
