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
import dataclasses
import functools
import gzip
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import re
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from plumbing import sort_task, token_cache
from plumbing.errors import UserError
from plumbing.data_shapes import DataError, hh_messages, split_hh, to_pairs  # noqa: F401 (hh_messages, split_hh, to_pairs: data's API)
from plumbing.data_shapes import render_rows, warn_once

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name
FILE_SUFFIXES = (".jsonl", ".json", ".gz", ".parquet", ".csv", ".txt", ".arrow")  # a path, not a Hub id, when missing


# --------------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------------
def load_pairs(data_cfg, split: str, tokenizer=None, report: dict | None = None, render=None) -> list[dict]:
    """Rows {prompt, chosen, rejected} (strings, + score_chosen/score_rejected if the data has them) of the
    `train` or `eval` split. `report` (a dict) receives what the data summary says: source, shape, rows read,
    skipped (by reason), ties. `render`: data_shapes.to_pairs's (the tokenized cache's)."""
    return load_splits(data_cfg, tokenizer, report, render, (split,))[split]


def load_splits(data_cfg, tokenizer=None, report: dict | None = None, render=None, splits=("train", "eval")) -> dict:
    """{split: its pairs} for the `splits` asked (`report`: the training split's). A dataset whose last rows are
    held out is read (and rendered) once for both."""
    if set(splits) == {"train", "eval"} and _held_out_tail(data_cfg):
        rows = _load_split(data_cfg, "all", tokenizer, report, render)
        n_train = len(rows) - data_cfg.eval_size  # (not rows[:-eval_size]: that is empty for eval_size 0)
        return {"train": rows[:n_train], "eval": rows[n_train:]}
    return {split: _load_split(data_cfg, split, tokenizer, report if split == "train" or len(splits) == 1 else None, render)
            for split in splits}


def _held_out_tail(D) -> bool:
    """Whether the held-out pairs are the last data.eval_size rows of data.dataset (no separate held-out data)."""
    return D.dataset not in ("sort", "hh") and not D.eval_dataset and not D.eval_split


def _load_split(data_cfg, split: str, tokenizer, report: dict | None, render) -> list[dict]:
    D, report = data_cfg, {} if report is None else report
    rendered_pairs = functools.partial(to_pairs, render=render)  # to_pairs with the cache's render, if any
    if D.dataset == "sort":
        n = D.num_train if split == "train" else D.eval_size
        flip = D.flip_ratio if split == "train" else 0.0  # held-out labels stay clean
        report.update(source="the built-in sort task", rows=n)
        return sort_task.preference_pairs(n, D.seed, D.high_gap_ratio, flip, D.sort_min_len, D.sort_max_len, split)
    if D.dataset == "hh":
        rows = _hub_rows(*_hh_args(D, "train" if split == "train" else "test"))
        rows = rendered_pairs(rows, "Anthropic/hh-rlhf", D, tokenizer, report)
        return rows if split == "train" or not D.eval_size else rows[: D.eval_size]
    if split == "eval" and D.eval_dataset:
        return _source_pairs(D.eval_dataset, "data.eval_dataset", *_split(D, D.eval_split), D, tokenizer, report, rendered_pairs)
    if split == "eval" and D.eval_split:
        rows = _source_pairs(D.dataset, "data.dataset", D.eval_split, "data.eval_split", D, tokenizer, report, rendered_pairs)
        return rows[: D.eval_size] if D.eval_size else rows
    rows = _source_pairs(D.dataset, "data.dataset", D.split, "data.split", D, tokenizer, report, rendered_pairs)
    if D.eval_dataset or D.eval_split:
        return rows
    # No separate held-out data: the last `eval_size` rows are held out and never trained on.
    if len(rows) <= D.eval_size:
        raise DataError(f"{D.dataset}: {len(rows)} rows leave none for training after holding out "
                        f"data.eval_size={D.eval_size} (set data.eval_dataset or a smaller data.eval_size)")
    n_train = len(rows) - D.eval_size  # (not rows[:-eval_size]: that is empty for eval_size 0)
    return rows if split == "all" else rows[:n_train] if split == "train" else rows[n_train:]


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


def _source_pairs(spec: str, key: str, split: str, split_key: str, data_cfg, tokenizer, report: dict, rendered_pairs) -> list[dict]:
    """One source (a Hub id, a save_to_disk directory or a file) → pairs; `split` (named `split_key` in the config)
    is the split of a Hub dataset or a saved DatasetDict."""
    path = Path(spec)
    if path.is_dir():
        return rendered_pairs(_disk_rows(spec, key, split, split_key), f"{spec} (split {split})", data_cfg, tokenizer, report)
    if not path.exists() and HUB_ID.fullmatch(spec) and not spec.lower().endswith(FILE_SUFFIXES):
        rows = _hub_rows(*_hub_args(spec, key, split, data_cfg))
        return rendered_pairs(rows, f"{spec} (split {split})", data_cfg, tokenizer, report)
    return rendered_pairs(_read_rows(spec), spec, data_cfg, tokenizer, report)


def _hh_args(D, split: str) -> tuple:
    advice = "Without network, download it elsewhere and pass the local file, e.g. data.dataset: harmless-base/train.jsonl.gz"
    return "Anthropic/hh-rlhf", "could not load Anthropic/hh-rlhf", advice, {"data_dir": D.hh_subset or None, "split": split}


def _hub_args(spec: str, key: str, split: str, data_cfg) -> tuple:
    """_hub_dataset's arguments for a Hub id: what a failure says, and the advice."""
    subset = f", '{data_cfg.subset}'" if data_cfg.subset else ""
    advice = (f"Where there is network, save it (datasets.load_dataset('{spec}'{subset}, split='{split}')"
              f".save_to_disk('DIR')) and pass DIR as {key}; or pass a local .jsonl/.parquet file")
    return spec, f"{key}: could not load '{spec}' from the Hugging Face Hub", advice, {"name": data_cfg.subset or None, "split": split}


def _hub_rows(repo: str, failed: str, advice: str, kwargs: dict) -> list[tuple[int, dict]]:
    """(1-based row number, row) of a Hub dataset split."""
    return list(enumerate(_hub_dataset(repo, failed, advice, kwargs).to_list(), 1))


def _hub_dataset(repo: str, failed: str, advice: str, kwargs: dict):
    """A Hub dataset split (datasets.Dataset). The main process downloads it while the others wait; they
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
    return ds


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
        ids, full = fit(p, [r], bos, eos, max_length, max_prompt_length)
        if untruncated is not None:
            untruncated.append(full)
        out.append(ids)
    return out


def fit(prompt: list, responses: list, bos: list, eos: int, max_length: int, max_prompt_length: int) -> tuple:
    """A prompt's ids and its responses' (each tokenized alone, without special tokens) → ((prompt, *responses)
    after the BOS/EOS and truncation rules, their token counts before truncation). The prompt is cut the same
    way for every response (it depends on the prompt alone), so a pair's prompt is tokenized once."""
    if bos and prompt[: len(bos)] == bos:  # the text brings its own BOS (a chat template that writes it)
        prompt = prompt[len(bos) :]
    responses = [r if eos in r else r + [eos] for r in responses]
    full = (len(bos) + len(prompt), *map(len, responses))
    keep = max_prompt_length - len(bos)  # prompt tokens after the BOS
    prompt = bos + prompt[max(0, len(prompt) - keep) :]
    return (prompt, *(r[: max_length - len(prompt)] for r in responses)), full


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
# Tokenized once: rendered and tokenized in worker processes, into token_cache.py's arrays
# --------------------------------------------------------------------------------------------------------
CHUNK = 1024  # rows per unit of work
PARALLEL_FROM = 4 * CHUNK  # fewer rows are tokenized in this process: starting workers would cost more
PROGRESS_FROM = 20000  # rows: a progress bar from here (a few seconds of work)
_JOB: tuple = ()  # what every chunk needs (tokenizer, template, ...), set before the workers are forked


def _tokenize_chunk(chunk: list) -> tuple:
    """Normalised rows (row number, kind, prompt, chosen, rejected, _) → (kept row numbers, refused rows, ids,
    (b, k) lengths, (b, k) untruncated counts, the texts as UTF-8, (b, k) their byte lengths)."""
    tokenizer, template, raw, source, k, max_length, max_prompt_length, bos = _JOB
    pairs, refused = render_rows(chunk, template, raw, source)
    columns = [[pair[f] for _, pair in pairs] for f in ("prompt", "chosen", "rejected")[:k]]
    encoded = [tokenizer(col, add_special_tokens=False)["input_ids"] if col else [] for col in columns]
    fitted = [fit(parts[0], parts[1:], bos, tokenizer.eos_token_id, max_length, max_prompt_length) for parts in zip(*encoded)]
    lengths = np.array([[len(x) for x in ids] for ids, _ in fitted], np.int64).reshape(-1, k)
    ids = np.fromiter(itertools.chain.from_iterable(x for row, _ in fitted for x in row), np.int32, count=int(lengths.sum()))
    texts = [t.encode("utf-8") for row in zip(*columns) for t in row]
    return ([i for i, _ in pairs], refused, ids, lengths, np.array([f for _, f in fitted], np.int64).reshape(-1, k),
            b"".join(texts), np.array([len(t) for t in texts], np.int64).reshape(-1, k))


def _chunks_done(normalised: list):
    """_tokenize_chunk over the rows in chunks, in order: in forked worker processes, one per core, for large
    data (the chat template is Python and runs on one core), with a progress bar."""
    chunks = (normalised[s : s + CHUNK] for s in range(0, len(normalised), CHUNK))
    workers = min(len(os.sched_getaffinity(0)), -(-len(normalised) // CHUNK))
    bar = tqdm(total=len(normalised), desc="tokenizing", unit=" rows", file=sys.stderr, disable=len(normalised) < PROGRESS_FROM)
    if workers < 2 or len(normalised) < PARALLEL_FROM:
        for chunk in chunks:
            yield _tokenize_chunk(chunk)
            bar.update(len(chunk))
        bar.close()
        return
    # Each worker tokenizes serially (tokenizers' own threads would fight the workers for the cores, and after
    # a fork they are disabled with a warning).
    parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for done in pool.imap(_tokenize_chunk, chunks):
                yield done
                bar.update(len(done[3]) + len(done[1]))
    finally:
        bar.close()
        if parallelism is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = parallelism


def _tokenized_splits(data_cfg, tokenizer, k: int, directory, report: dict) -> dict:
    """{split: TokenizedRows} of the training and (for pairs) held-out data, rendered and tokenized once each,
    written into `directory` (a cache entry under construction), or kept in memory (None). `k`: 3 parts
    (prompt, chosen, rejected) for betadpo.py, 2 (prompt, response) for sft.py."""
    stores = {}

    def render(normalised, template, raw, source):  # data_shapes.to_pairs's render: into a store of its own
        global _JOB
        _JOB = (tokenizer, template, raw, source, k, data_cfg.max_length, data_cfg.max_prompt_length, special_prefix(tokenizer))
        writer = token_cache.StoreWriter(directory, f"store{len(stores)}", k)
        pairs, refused = [], []
        for rows, chunk_refused, *arrays in _chunks_done(normalised):
            pairs += [(i, {"store": writer.name, "index": writer.n + j}) for j, i in enumerate(rows)]
            refused += chunk_refused
            writer.append(*arrays)
        stores[writer.name] = writer.finish()
        return pairs, refused

    splits = ("train", "eval") if k == 3 else ("train",)
    if data_cfg.dataset == "sort":  # generated text: only tokenized
        texts = {split: (load_pairs if k == 3 else load_sft)(data_cfg, split, tokenizer, report if split == "train" else None)
                 for split in splits}
        loaded = {split: render([(n, "text", t["prompt"], t.get("chosen", t.get("response")), t.get("rejected", ""), False)
                                 for n, t in enumerate(rows, 1)], None, False, "sort")[0] for split, rows in texts.items()}
        loaded = {split: [pair for _, pair in pairs] for split, pairs in loaded.items()}
    else:
        loaded = load_splits(data_cfg, tokenizer, report, render, splits)
    out = {}
    for split, pairs in loaded.items():
        store = pairs[0]["store"] if pairs else next(iter(stores))  # (an empty split: any store)
        has_scores = k == 3 and bool(pairs) and "score_chosen" in pairs[0]  # (an SFT example has no scores)
        scores = np.array([[p["score_chosen"], p["score_rejected"]] for p in pairs], np.float64) if has_scores else None
        out[split] = token_cache.TokenizedRows(stores[store], np.array([p["index"] for p in pairs], np.int64), scores)
        out[split].store_name = store
    return out


def _code_fingerprint() -> str:
    """The source of the code that reads, renders and tokenizes: a change to it is a new cache (never stale)."""
    digest = hashlib.sha256()
    for module in ("data.py", "data_shapes.py", "token_cache.py"):
        digest.update((Path(__file__).parent / module).read_bytes())
    return digest.hexdigest()


def _source_fingerprint(spec: str, key: str, data_cfg) -> str:
    """What a source holds: a file's bytes, a save_to_disk directory's files, a Hub dataset's fingerprint (which
    datasets derives from its revision); the built-in task is its data.* options."""
    path = Path(spec)
    if path.is_file():
        return token_cache.file_sha256(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(f.relative_to(path)).encode())
            token_cache.file_sha256(f, digest)
        return digest.hexdigest()
    if spec == "hh":
        return "+".join(_hub_dataset(*_hh_args(data_cfg, split))._fingerprint for split in ("train", "test"))
    if HUB_ID.fullmatch(spec) and not spec.lower().endswith(FILE_SUFFIXES):
        return "+".join(_hub_dataset(*_hub_args(spec, key, split, data_cfg))._fingerprint
                        for split in sorted({data_cfg.split, data_cfg.eval_split} - {""}))
    return "missing"  # (reading it stops with the right message)


def _cache_key(data_cfg, tokenizer, k: int) -> str:
    options = {f.name: getattr(data_cfg, f.name) for f in dataclasses.fields(data_cfg) if f.name not in ("preview", "cache_dir")}
    identity = {"format": token_cache.FORMAT, "parts": k, "options": options, "code": _code_fingerprint(),
                "sources": {spec: _source_fingerprint(spec, key, data_cfg)
                            for spec, key in ((data_cfg.dataset, "data.dataset"), (data_cfg.eval_dataset, "data.eval_dataset")) if spec},
                "tokenizer": token_cache.tokenizer_fingerprint(tokenizer)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def tokenized_data(data_cfg, tokenizer, k: int) -> tuple[dict, dict]:
    """(report, {split: TokenizedRows}): from the cache (data.cache_dir, token_cache.py), built there first by
    the node's main process while the node's other processes wait, then memory-mapped by all of them. The
    built-in task and data.cache_dir "off" are tokenized in memory by every process."""
    from accelerate import PartialState

    root = token_cache.cache_root(data_cfg.cache_dir)
    if root is None or data_cfg.dataset == "sort":
        report = {}
        return report, _tokenized_splits(data_cfg, tokenizer, k, None, report)

    def build(directory: Path) -> dict:
        report = {}
        splits = _tokenized_splits(data_cfg, tokenizer, k, directory, report)
        return {"format": token_cache.FORMAT, "k": k, "report": report, "stores": sorted({s.store_name for s in splits.values()}),
                "splits": {name: {"store": rows.store_name, **token_cache.write_split(directory, name, rows)}
                           for name, rows in splits.items()}}

    state = PartialState()
    if state.num_processes == 1:
        meta, splits = token_cache.build_or_open(root, _cache_key(data_cfg, tokenizer, k), build)
        return meta["report"], splits
    from accelerate.utils import gather_object

    # The node's main process builds (or checks) the entry; every process learns its path, or the first error.
    path, error = None, None
    if state.is_local_main_process:
        try:
            key = _cache_key(data_cfg, tokenizer, k)
            token_cache.build_or_open(root, key, build)
            path = str(root / key)
        except UserError as e:
            error = str(e)
    outcomes = gather_object([(path, error)])
    error = next((e for _, e in outcomes if e), None)
    if error is not None:
        if state.is_main_process:
            raise UserError(error)
        sys.exit(2)  # (the main process says why, once)
    meta, splits = token_cache.open_entry(Path(outcomes[state.process_index - state.local_process_index][0]))
    return meta["report"], splits


# --------------------------------------------------------------------------------------------------------
# What a run trains on: the one-line data summary, and data.preview
# --------------------------------------------------------------------------------------------------------
def training_pairs(data_cfg, tokenizer, main_process: bool = True) -> tuple | None:
    """betadpo.py's data: (training, held-out) token ids, TokenizedRows (rows[i] = (prompt, chosen, rejected) id
    lists), after the data summary line. With data.preview N the first N training pairs are printed instead and
    None is returned (the run stops)."""
    with contextlib.redirect_stdout(sys.stderr) if data_cfg.preview else contextlib.nullcontext():  # stdout: JSON only
        report, splits = tokenized_data(data_cfg, tokenizer, 3)
    if not _announce(data_cfg, tokenizer, report, splits["train"], ("prompt", "chosen", "rejected"), len(splits["eval"]), main_process):
        return None
    return splits["train"], splits["eval"]


def training_examples(data_cfg, tokenizer, main_process: bool = True):
    """sft.py's data: token ids (prompt, response) of the training examples (TokenizedRows), as training_pairs."""
    with contextlib.redirect_stdout(sys.stderr) if data_cfg.preview else contextlib.nullcontext():
        report, splits = tokenized_data(data_cfg, tokenizer, 2)
    return splits["train"] if _announce(data_cfg, tokenizer, report, splits["train"], ("prompt", "response"), None, main_process) else None


def _announce(data_cfg, tokenizer, report, rows, fields, n_held_out, main_process) -> bool:
    """Print the summary line (stdout), or, with data.preview N, N JSON lines (stdout) and the summary (stderr).
    → whether the run goes on. Warnings about the data are said again when it comes from the cache."""
    if main_process:
        with contextlib.redirect_stdout(sys.stderr) if data_cfg.preview else contextlib.nullcontext():
            for warning in report.get("warnings", []):
                warn_once(warning)
        summary = data_summary(report, rows, None, fields, n_held_out)
        if data_cfg.preview:
            bos, full = special_prefix(tokenizer), rows.untruncated()
            for k in range(min(data_cfg.preview, len(rows))):
                row = dict(zip(fields, rows.texts(k)))
                if rows.scores is not None:
                    row.update(score_chosen=float(rows.scores[k, 0]), score_rejected=float(rows.scores[k, 1]))
                print(json.dumps(_preview(tokenizer, bos, k, row, rows[k], tuple(int(n) for n in full[k]), fields), ensure_ascii=False))
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


def data_summary(report: dict, ids, untruncated, fields: tuple, n_held_out: int | None) -> str:
    """One line: what was read and kept (skipped rows by reason, ties), token lengths (median / 95th percentile,
    before truncation) and the share of training pairs (or examples) that truncation cuts. `ids`: TokenizedRows
    (its own untruncated counts; `untruncated` None), or id lists with their `untruncated` counts."""
    kind = "pairs" if len(fields) == 3 else "examples"
    line = f"data: {len(ids)} training {kind}" + (f", {n_held_out} held out" if n_held_out is not None else "")
    line += f", from {report.get('source', '?')}" + (f" ({report['shape']}; {report['rendering']})" if "shape" in report else "")
    skipped, ties = report.get("skipped") or {}, report.get("ties")
    reasons = ", ".join(f"{why}: {n}" for why, n in sorted(skipped.items()))
    line += f"; rows: {report.get('rows', len(ids))} read, " + (f"{sum(skipped.values())} skipped ({reasons})" if skipped else "none skipped")
    if ties is not None:
        line += f", {ties} tie{'s' * (ties != 1)} " + ("(dropped)" if report.get("dropped_ties") else "(kept; data.drop_ties drops them)")
    if len(ids):
        if untruncated is None:  # (m, k) arrays: no pass over Python lists
            kept, full = ids.kept(), ids.untruncated()
        else:
            kept, full = np.array([[len(x) for x in row] for row in ids]), np.array(untruncated)
        n = len(full)
        rank = max(0, math.ceil(0.95 * n) - 1)  # nearest-rank percentile
        lengths = [f"{f} {float(np.median(col)):g}/{int(np.partition(col, rank)[rank])}" for f, col in zip(fields, full.T)]
        cut = int((full > kept).any(axis=1).sum())
        line += f"; tokens median/p95: {', '.join(lengths)}; truncated: {cut / n:.1%} of {kind}"
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
