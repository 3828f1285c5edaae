r"""Data for all three scripts: where pairs come from, how they are tokenized, how batches are padded, and
in which order they are trained on.

Sources behind `load_pairs` (preference pairs) and `load_sft` (prompt → response), for `data.dataset` and
`data.eval_dataset`:
    sort              the built-in task (sort_task.py), generated from `data.seed`
    hh                Anthropic HH through `datasets.load_dataset("Anthropic/hh-rlhf")` (`data.hh_subset`)
    org/name          a Hub dataset, `datasets.load_dataset(org/name, data.subset, split=data.split)`
    path/to/dir       a directory written by `datasets.save_to_disk` (a DatasetDict: its split `data.split`)
    path/to/file      .jsonl / .jsonl.gz / .json / .parquet
Held-out pairs: all of `data.eval_dataset`; else the first `data.eval_size` rows (0 = all) of split
`data.eval_split` of the same dataset (hh: its test split); else the last `data.eval_size` rows, never trained on.
The rows' shape (strings, messages, implicit prompt, UltraFeedback's, HH) and what text the model sees with or
without a chat template (`data.chat_template`) are data_shapes.py's. `training_pairs` / `training_examples` give
the scripts their token ids and print a one-line data summary first; with `data.preview N` they print the first N
training pairs as JSON lines instead, and the script stops before anything is written.

Tokenization (the rules of the original DPO code, https://github.com/eric-mitchell/direct-preference-optimization,
plus what a real tokenizer needs): prompt and response are
tokenized separately, without special tokens, and then
  - BOS: the prompt starts with the tokens the tokenizer itself puts before a text (its BOS for Llama-style
    tokenizers; none for GPT-2/NeoX-style ones or SmolLM2's), once: a chat template that writes BOS itself is not
    given a second one;
  - EOS: appended to the response, unless the response already contains EOS, i.e. a chat template that ends
    every turn with it (SmolLM2 and other ChatML templates: <|im_end|> is the EOS). Either way the response's
    last end-of-turn/EOS token is a label, scored like any response token, even where pad == EOS: padding is
    masked by length, never by token id.
So prompt + response ids are exactly what the tokenizer (or the chat template) gives for the whole
conversation, as long as nothing is cut. Truncation: a prompt longer than `max_prompt_length` keeps its
*last* tokens (the end of a dialogue is what the response answers), after its BOS if it has one. A
chat-rendered prompt therefore always keeps its generation prompt (the last tokens) and loses its oldest turns
first, the template's system turn included; its first kept turn may start mid-message. The response is then
cut, keeping its start, so that prompt + response ≤ `max_length`; a cut response loses its end-of-turn token
(the model is not taught to stop where the text was cut). Labels are -100 on prompt and padding, so only
response tokens are scored.
"""

import contextlib
import functools
import gzip
import json
import math
import re
import statistics
import sys
import zlib
from pathlib import Path

import torch

from plumbing import sort_task
from plumbing.data_shapes import DataError, hh_messages, split_hh, to_pairs  # noqa: F401 (hh_messages, split_hh: data's API)

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name
FILE_SUFFIXES = (".jsonl", ".json", ".gz", ".parquet", ".csv", ".txt", ".arrow")  # a path, not a Hub id, when missing


# --------------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------------
def load_pairs(data_cfg, split: str, tokenizer=None, report: dict | None = None) -> list[dict]:
    """Rows {prompt, chosen, rejected} (strings, + score_chosen/score_rejected if the data has them) of the
    `train` or `eval` split. `report` (a dict) receives what the data summary says: source, shape, rows read,
    skipped (by reason), ties."""
    D, report = data_cfg, {} if report is None else report
    if D.dataset == "sort":
        n = D.num_train if split == "train" else D.eval_size
        flip = D.flip_ratio if split == "train" else 0.0  # held-out labels stay clean
        report.update(source="the built-in sort task", rows=n)
        return sort_task.preference_pairs(n, D.seed, D.high_gap_ratio, flip, D.sort_min_len, D.sort_max_len, split)
    if D.dataset == "hh":
        advice = "Without network, download it elsewhere and pass the local file, e.g. data.dataset: harmless-base/train.jsonl.gz"
        rows = _hub_rows("Anthropic/hh-rlhf", "could not load Anthropic/hh-rlhf", advice, data_dir=D.hh_subset or None,
                         split="train" if split == "train" else "test")
        rows = to_pairs(rows, "Anthropic/hh-rlhf", D, tokenizer, report)
        return rows if split == "train" or not D.eval_size else rows[: D.eval_size]
    if split == "eval" and D.eval_dataset:
        return _source_pairs(D.eval_dataset, "data.eval_dataset", *_split(D, D.eval_split), D, tokenizer, report)
    if split == "eval" and D.eval_split:
        rows = _source_pairs(D.dataset, "data.dataset", D.eval_split, "data.eval_split", D, tokenizer, report)
        return rows[: D.eval_size] if D.eval_size else rows
    rows = _source_pairs(D.dataset, "data.dataset", D.split, "data.split", D, tokenizer, report)
    if D.eval_dataset or D.eval_split:
        return rows
    # No separate held-out data: the last `eval_size` rows are held out and never trained on.
    if len(rows) <= D.eval_size:
        raise DataError(f"{D.dataset}: {len(rows)} rows leave none for training after holding out "
                        f"data.eval_size={D.eval_size} (set data.eval_dataset or a smaller data.eval_size)")
    n_train = len(rows) - D.eval_size  # (not rows[:-eval_size]: that is empty for eval_size 0)
    return rows[:n_train] if split == "train" else rows[n_train:]


def load_sft(data_cfg, split: str, tokenizer=None, report: dict | None = None) -> list[dict]:
    """Rows {prompt, response}: the built-in task's imperfect demonstrations, else the pairs' chosen side."""
    if data_cfg.dataset == "sort":
        n = data_cfg.num_sft if split == "train" else data_cfg.eval_size
        noise = data_cfg.sft_noise if split == "train" else 0.0
        if report is not None:
            report.update(source="the built-in sort task", rows=n)
        return sort_task.sft_examples(n, data_cfg.seed + (split != "train"), noise, data_cfg.sort_min_len, data_cfg.sort_max_len)
    return [{"prompt": r["prompt"], "response": r["chosen"]} for r in load_pairs(data_cfg, split, tokenizer, report)]


def _split(D, eval_split: str) -> tuple[str, str]:
    return (eval_split, "data.eval_split") if eval_split else (D.split, "data.split")


def _source_pairs(spec: str, key: str, split: str, split_key: str, data_cfg, tokenizer, report: dict) -> list[dict]:
    """One source (a Hub id, a save_to_disk directory or a file) → pairs; `split` (named `split_key` in the config)
    is the split of a Hub dataset or a saved DatasetDict."""
    path = Path(spec)
    if path.is_dir():
        return to_pairs(_disk_rows(spec, key, split, split_key), f"{spec} (split {split})", data_cfg, tokenizer, report)
    if not path.exists() and HUB_ID.fullmatch(spec) and not spec.lower().endswith(FILE_SUFFIXES):
        subset = f", '{data_cfg.subset}'" if data_cfg.subset else ""
        advice = (f"Where there is network, save it (datasets.load_dataset('{spec}'{subset}, split='{split}')"
                  f".save_to_disk('DIR')) and pass DIR as {key}; or pass a local .jsonl/.parquet file")
        rows = _hub_rows(spec, f"{key}: could not load '{spec}' from the Hugging Face Hub", advice,
                         name=data_cfg.subset or None, split=split)
        return to_pairs(rows, f"{spec} (split {split})", data_cfg, tokenizer, report)
    return to_pairs(_read_rows(spec), spec, data_cfg, tokenizer, report)


def _hub_rows(repo: str, failed: str, advice: str, **kwargs) -> list[tuple[int, dict]]:
    """(1-based row number, row) of a Hub dataset split. The main process downloads it while the others wait; they
    then read the cache it filled. Without network only the local cache is tried, at once (not a minute of
    retries): the Hub is asked once, with a timeout (plumbing.models.hub_reachable)."""
    import datasets
    from accelerate import PartialState

    from plumbing.models import hub_reachable

    offline = not hub_reachable()
    if offline:
        datasets.config.HF_HUB_OFFLINE = True
    failure = None
    with PartialState().main_process_first():
        try:
            ds = datasets.load_dataset(repo, **kwargs)
        except Exception as e:  # offline, unknown id or split, hub down: each ends in one line
            failure = e  # (raised after the barrier: the processes waiting for this one must not wait forever)
    if failure is not None:
        why = (f"{type(failure).__name__}: {str(failure).strip().splitlines()[0][:200]}" if str(failure).strip() else type(failure).__name__)
        if offline and isinstance(failure, ConnectionError):
            why = "the Hub cannot be reached (no network?) and it is not in the local cache"
        raise DataError(f"{failed} ({why}). {advice}")
    return list(enumerate(ds.to_list(), 1))


def _disk_rows(path: str, key: str, split: str, split_key: str) -> list[tuple[int, dict]]:
    """(1-based row number, row) of a directory written by `datasets.save_to_disk` (a Dataset, or a DatasetDict's
    split `split`)."""
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError:
        raise DataError(f"{key}: '{path}' is a directory, but not one written by datasets' save_to_disk "
                        "(pass a .jsonl/.parquet file, or such a directory)") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{split_key}: {path} has no split '{split}' (it has {', '.join(ds)}); set {split_key}")
        ds = ds[split]
    return list(enumerate(ds.to_list(), 1))


def _read_rows(path: str) -> list[tuple[int, object]]:
    """(1-based row number, row) for every row of a .jsonl(.gz) / .json / .parquet file. A file that cannot
    be read as such (truncated or corrupt gzip, not UTF-8, not parquet) stops with one line naming it."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file '{path}' does not exist")
    if not p.is_file():
        raise DataError(f"data file '{path}' is not a file")
    name = p.name.lower()
    if not name.endswith((".jsonl", ".jsonl.gz", ".json", ".parquet")):
        raise DataError(f"data file '{path}': unsupported format (use .jsonl, .jsonl.gz, .json or .parquet)")
    try:
        if name.endswith(".parquet"):
            return _read_parquet(p)
        with gzip.open(p, "rb") if name.endswith(".gz") else p.open("rb") as f:
            if name.endswith(".json"):
                data = json.loads(_utf8(f.read(), path, None))
                if not isinstance(data, list):
                    raise DataError(f"{path}: expected a JSON list of rows")
                return list(enumerate(data, 1))
            rows = []
            for i, raw in enumerate(f, 1):  # lines as bytes, decoded one by one: an encoding error names its row
                line = _utf8(raw, path, i)
                if line.strip():
                    try:
                        rows.append((i, json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path} row {i}: not valid JSON ({e.msg})") from None
            return rows
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: not a complete gzip file ({e}); download or compress it again") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None


def _utf8(raw: bytes, path: str, row: int | None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        where = f" row {row}" if row is not None else ""
        raise DataError(f"{path}{where}: not UTF-8 text (byte {e.start}{' of the row' if row else ''}); "
                        "convert the file to UTF-8") from None


def _read_parquet(p: Path) -> list[tuple[int, object]]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        return list(enumerate(pq.read_table(p).to_pylist(), 1))
    except (pyarrow.ArrowException, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DataError(f"{p}: not a readable parquet file ({first})") from None


# --------------------------------------------------------------------------------------------------------
# Tokenization and padding
# --------------------------------------------------------------------------------------------------------
def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer itself puts before a text when asked for special tokens: [BOS] for Llama-style
    tokenizers, [] for GPT-2/NeoX-style ones and SmolLM2's."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    special = tokenizer("x", add_special_tokens=True)["input_ids"]
    for start in range(len(special) - len(plain) + 1):
        if special[start : start + len(plain)] == plain:
            return special[:start]
    return []


def tokenize(tokenizer, prompts: list[str], responses: list[str], max_length: int, max_prompt_length: int,
             untruncated: list | None = None):
    """→ list of (prompt_ids, response_ids) after the BOS/EOS and truncation rules in the module docstring.
    `untruncated` (a list) receives each (prompt, response) token count before truncation (the data summary's)."""
    if not prompts:  # e.g. no held-out pairs (data.eval_size 0): fast tokenizers fail on an empty batch
        return []
    bos, eos = special_prefix(tokenizer), tokenizer.eos_token_id
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    out = []
    for p, r in zip(p_ids, r_ids):
        if bos and p[: len(bos)] == bos:  # the text brings its own BOS (a chat template that writes it)
            p = p[len(bos) :]
        r = r if eos in r else r + [eos]
        if untruncated is not None:
            untruncated.append((len(bos) + len(p), len(r)))
        keep = max_prompt_length - len(bos)  # prompt tokens after the BOS
        p = bos + p[max(0, len(p) - keep) :]
        out.append((p, r[: max_length - len(p)]))
    return out


def tokenize_pairs(tokenizer, rows: list[dict], max_length: int, max_prompt_length: int, untruncated: list | None = None) -> list[tuple]:
    """→ list of (prompt_ids, chosen_ids, rejected_ids); `untruncated` receives their token counts before truncation."""
    prompts, n_c, n_r = [r["prompt"] for r in rows], [], []
    chosen = tokenize(tokenizer, prompts, [r["chosen"] for r in rows], max_length, max_prompt_length, n_c)
    rejected = tokenize(tokenizer, prompts, [r["rejected"] for r in rows], max_length, max_prompt_length, n_r)
    if untruncated is not None:
        untruncated.extend((p, c, r) for (p, c), (_, r) in zip(n_c, n_r))
    return [(p, c, r) for (p, c), (_, r) in zip(chosen, rejected)]


def collate(sequences: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    """Right-pad (prompt, response) id lists to the longest in the batch (never to max_length).

    input_ids, attention_mask, labels: (B, T); prompt_lens: (B,). labels = input_ids on response tokens,
    -100 on prompt and padding.
    """
    T = max(len(p) + len(r) for p, r in sequences)
    input_ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), T), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), T), dtype=torch.long)
    for i, (p, r) in enumerate(sequences):
        ids = torch.tensor(p + r, dtype=torch.long)
        input_ids[i, : len(ids)] = ids
        labels[i, len(p) : len(ids)] = ids[len(p) :]
        attention_mask[i, : len(ids)] = 1
    prompt_lens = torch.tensor([len(p) for p, _ in sequences], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "prompt_lens": prompt_lens}


def collate_pairs(pairs: list[tuple], pad_id: int) -> dict:
    """B pairs → one batch of 2B rows: chosen responses in rows [0, B), rejected in [B, 2B), so that both go
    through the model in one forward pass."""
    return collate([(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs], pad_id)


# --------------------------------------------------------------------------------------------------------
# What a run trains on: the one-line data summary, and data.preview
# --------------------------------------------------------------------------------------------------------
def training_pairs(data_cfg, tokenizer, main_process: bool = True) -> tuple[list, list] | None:
    """betadpo.py's data: (training, held-out) token ids (prompt, chosen, rejected), after the data summary line.
    With data.preview N the first N training pairs are printed instead and None is returned (the run stops)."""
    report, untruncated = {}, []
    with contextlib.redirect_stdout(sys.stderr) if data_cfg.preview else contextlib.nullcontext():  # stdout: JSON only
        rows = load_pairs(data_cfg, "train", tokenizer, report)
        held_out = load_pairs(data_cfg, "eval", tokenizer)
    ids = tokenize_pairs(tokenizer, rows, data_cfg.max_length, data_cfg.max_prompt_length, untruncated)
    if not _announce(data_cfg, tokenizer, report, rows, ids, untruncated, ("prompt", "chosen", "rejected"), len(held_out), main_process):
        return None
    return ids, tokenize_pairs(tokenizer, held_out, data_cfg.max_length, data_cfg.max_prompt_length)


def training_examples(data_cfg, tokenizer, main_process: bool = True) -> list | None:
    """sft.py's data: token ids (prompt, response) of the training examples, as training_pairs."""
    report, untruncated = {}, []
    with contextlib.redirect_stdout(sys.stderr) if data_cfg.preview else contextlib.nullcontext():
        rows = load_sft(data_cfg, "train", tokenizer, report)
    ids = tokenize(tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows], data_cfg.max_length,
                   data_cfg.max_prompt_length, untruncated)
    return ids if _announce(data_cfg, tokenizer, report, rows, ids, untruncated, ("prompt", "response"), None, main_process) else None


def _announce(data_cfg, tokenizer, report, rows, ids, untruncated, fields, n_held_out, main_process) -> bool:
    """Print the summary line (stdout), or, with data.preview N, N JSON lines (stdout) and the summary (stderr).
    → whether the run goes on."""
    if main_process:
        summary = data_summary(report, ids, untruncated, fields, n_held_out)
        if data_cfg.preview:
            bos = special_prefix(tokenizer)
            for k in range(min(data_cfg.preview, len(rows))):
                print(json.dumps(_preview(tokenizer, bos, k, rows[k], ids[k], untruncated[k], fields), ensure_ascii=False))
        print(summary, file=sys.stderr if data_cfg.preview else sys.stdout, flush=True)
    return not data_cfg.preview


def _preview(tokenizer, bos, k, row, ids, full, fields) -> dict:
    """One training pair as the model sees it: the exact text that is tokenized (after the chat template), token
    counts before ("tokens") and after ("kept") truncation, and where truncation cuts: how many tokens a prompt
    loses at its start (and the text its kept part starts with), or a response at its end (and where it now ends)."""
    out = {"pair": k + 1, **{f: row[f] for f in fields}, **{f: row[f] for f in ("score_chosen", "score_rejected") if f in row}}
    out["tokens"] = dict(zip(fields, full))
    out["kept"] = {f: len(x) for f, x in zip(fields, ids)}
    out["cut"] = {}
    if full[0] > len(ids[0]):
        out["cut"]["prompt"] = {"dropped_tokens": full[0] - len(ids[0]), "kept_starts": tokenizer.decode(ids[0][len(bos) :][:8])}
    for f, x, n in zip(fields[1:], ids[1:], full[1:]):
        if n > len(x):
            out["cut"][f] = {"dropped_tokens": n - len(x), "kept_ends": tokenizer.decode(x[-8:]) if x else ""}
    return out


def data_summary(report: dict, ids: list, untruncated: list, fields: tuple, n_held_out: int | None) -> str:
    """One line: what was read and kept (skipped rows by reason, ties), token lengths (median / 95th percentile,
    before truncation) and the share of training pairs (or examples) that truncation cuts."""
    kind = "pairs" if len(fields) == 3 else "examples"
    line = f"data: {len(ids)} training {kind}" + (f", {n_held_out} held out" if n_held_out is not None else "")
    line += f", from {report.get('source', '?')}" + (f" ({report['shape']}; {report['rendering']})" if "shape" in report else "")
    skipped, ties = report.get("skipped") or {}, report.get("ties")
    reasons = ", ".join(f"{why}: {n}" for why, n in sorted(skipped.items()))
    line += f"; rows: {report.get('rows', len(ids))} read, " + (f"{sum(skipped.values())} skipped ({reasons})" if skipped else "none skipped")
    if ties is not None:
        line += f", {ties} tie{'s' * (ties != 1)} " + ("(dropped)" if report.get("dropped_ties") else "(kept; data.drop_ties drops them)")
    if ids:
        def q(values, share):  # nearest-rank percentile
            return sorted(values)[max(0, math.ceil(share * len(values)) - 1)]
        lengths = [f"{f} {statistics.median(col):g}/{q(col, 0.95)}" for f, col in zip(fields, zip(*untruncated))]
        cut = sum(any(n > len(x) for n, x in zip(full, kept)) for full, kept in zip(untruncated, ids))
        line += f"; tokens median/p95: {', '.join(lengths)}; truncated: {cut / len(ids):.1%} of {kind}"
    return line


# --------------------------------------------------------------------------------------------------------
# Data order: which pairs (or SFT examples) form global micro-batch j
# --------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _epoch_order(num_pairs: int, seed: int, epoch: int, micro: int, lengths: tuple | None) -> tuple:
    """A seeded shuffle of the pairs. With `lengths` (group_by_length): within windows of 64 micro-batches,
    pairs are sorted by length and cut into micro-batches, whose order is then shuffled — far less padding,
    but pairs of similar length now share a calibration batch (their M₀, σ, β and filter)."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    order = torch.randperm(num_pairs, generator=g).tolist()
    if lengths is None:
        return tuple(order)
    window = 64 * micro
    order = [i for w in range(0, num_pairs, window) for i in sorted(order[w : w + window], key=lambda i: lengths[i])]
    batches = [order[i : i + micro] for i in range(0, num_pairs, micro)]
    return tuple(i for b in torch.randperm(len(batches), generator=g).tolist() for i in batches[b])


def micro_batch_indices(j: int, num_pairs: int, micro: int, per_epoch: int, seed: int, lengths: tuple | None = None) -> list[int]:
    """Pairs of global micro-batch j: a pure function of (j, seed), so the data position is just the step
    count (exact resume) and the global batch does not depend on the number of processes."""
    epoch, pos = divmod(j, per_epoch)
    return list(_epoch_order(num_pairs, seed, epoch, micro, lengths)[pos * micro : (pos + 1) * micro])
