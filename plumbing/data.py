r"""Data for all three scripts: where pairs come from, how they are tokenized, how batches are padded, and
in which order they are trained on.

Three sources behind `load_pairs` (preference pairs) and `load_sft` (prompt → response):
    sort              the built-in task (sort_task.py), generated from `data.seed`
    hh                Anthropic HH through `datasets.load_dataset("Anthropic/hh-rlhf")`
    path/to/file      .jsonl / .jsonl.gz / .json / .parquet with `prompt`, `chosen`, `rejected`
                      (strings, or chat message lists rendered with the tokenizer's chat template),
                      or HH-style rows with only `chosen` / `rejected` dialogues, parsed like the hub data

HH dialogues ("\n\nHuman: … \n\nAssistant: …" turns) are split at the last "\n\nAssistant:". What the model then
sees depends on `data.chat_template`:
    off    the raw text: prompt = everything up to and including the last "\n\nAssistant:", response = the
           rest. The paper's setting, for base models (Pythia-2.8B).
    on     the turns become chat messages (Human → user, Assistant → assistant, text stripped) rendered by the
           tokenizer's chat template: prompt = every turn before the last assistant turn, rendered with the
           generation prompt ("<|im_start|>assistant\n" for SmolLM2); response = what the template adds after
           that prompt when the last assistant turn is appended: its text and the end-of-turn tokens
           ("…<|im_end|>\n"). A chat model sees HH the way it was tuned to see conversations. The template may
           add its own default system turn (SmolLM2's does).
    auto   (default) `on` when the tokenizer has a chat template, else `off`.

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

import functools
import gzip
import json
import re
import zlib
from pathlib import Path

import torch

from plumbing import sort_task
from plumbing.errors import UserError

HH_MARKER = "\n\nAssistant:"
HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")  # a turn starts at a blank line (or the text's start)
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
HH_MAX_SKIPPED = 0.01  # more than 1% malformed public rows means the parser (or the data) is wrong: stop,
HH_MAX_SKIPPED_ROWS = 5  # unless they are only a handful (real HH has single blemishes: a 96-row slice may hold one)


class DataError(UserError):
    pass


# --------------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------------
def load_pairs(data_cfg, split: str, tokenizer=None) -> list[dict]:
    """Rows {prompt, chosen, rejected} (strings) of the `train` or `eval` split."""
    if data_cfg.dataset == "sort":
        n = data_cfg.num_train if split == "train" else data_cfg.eval_size
        flip = data_cfg.flip_ratio if split == "train" else 0.0  # held-out labels stay clean
        return sort_task.preference_pairs(
            n, data_cfg.seed, data_cfg.high_gap_ratio, flip, data_cfg.sort_min_len, data_cfg.sort_max_len, split
        )
    if data_cfg.dataset == "hh":
        chat = _hh_template(data_cfg, tokenizer)
        rows = _parse_hh(_load_hh_hub(data_cfg, "train" if split == "train" else "test"), "Anthropic/hh-rlhf", chat)
        return rows if split == "train" or not data_cfg.eval_size else rows[: data_cfg.eval_size]
    if split == "eval" and data_cfg.eval_dataset:
        return _load_file_pairs(data_cfg.eval_dataset, tokenizer, data_cfg)
    rows = _load_file_pairs(data_cfg.dataset, tokenizer, data_cfg)
    if data_cfg.eval_dataset:
        return rows
    # No separate eval file: the last `eval_size` rows are held out and never trained on.
    if len(rows) <= data_cfg.eval_size:
        raise DataError(f"{data_cfg.dataset}: {len(rows)} rows leave none for training after holding out "
                        f"data.eval_size={data_cfg.eval_size} (set data.eval_dataset or a smaller data.eval_size)")
    n_train = len(rows) - data_cfg.eval_size  # (not rows[:-eval_size]: that is empty for eval_size 0)
    return rows[:n_train] if split == "train" else rows[n_train:]


def load_sft(data_cfg, split: str, tokenizer=None) -> list[dict]:
    """Rows {prompt, response}: the built-in task's imperfect demonstrations, else the pairs' chosen side."""
    if data_cfg.dataset == "sort":
        n = data_cfg.num_sft if split == "train" else data_cfg.eval_size
        noise = data_cfg.sft_noise if split == "train" else 0.0
        return sort_task.sft_examples(n, data_cfg.seed + (split != "train"), noise, data_cfg.sort_min_len, data_cfg.sort_max_len)
    return [{"prompt": r["prompt"], "response": r["chosen"]} for r in load_pairs(data_cfg, split, tokenizer)]


def _load_hh_hub(data_cfg, split):
    import datasets

    from plumbing.models import hub_reachable

    if not hub_reachable():  # the local datasets cache only: at once, instead of a minute of retries
        datasets.config.HF_HUB_OFFLINE = True
    try:
        ds = datasets.load_dataset("Anthropic/hh-rlhf", data_dir=data_cfg.hh_subset or None, split=split)
    except Exception as e:  # offline, hub down, unknown subset: all end the same way for the user
        raise DataError(
            f"could not load Anthropic/hh-rlhf ({type(e).__name__}: {str(e).splitlines()[0][:200]}). Without "
            "network, download it elsewhere and pass the local file, e.g. data.dataset: harmless-base/train.jsonl.gz"
        ) from None
    return [(i + 1, row) for i, row in enumerate(ds)]


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


def _load_file_pairs(path: str, tokenizer, data_cfg) -> list[dict]:
    rows = _read_rows(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    if not isinstance(rows[0][1], dict):
        raise DataError(f"{path} row {rows[0][0]}: expected an object with prompt/chosen/rejected")
    if "prompt" not in rows[0][1]:  # HH-style dialogues: parse exactly like the hub dataset
        return _parse_hh(rows, path, _hh_template(data_cfg, tokenizer))
    return [_user_row(path, i, row, tokenizer) for i, row in rows]


def _user_row(path, i, row, tokenizer) -> dict:
    """Validate one row of the user's own data; any problem stops the run naming file, row and field."""
    if not isinstance(row, dict):
        raise DataError(f"{path} row {i}: expected an object with prompt/chosen/rejected")
    for field in ("prompt", "chosen", "rejected"):
        if field not in row:
            raise DataError(f"{path} row {i}: field '{field}' is missing")
        value = row[field]
        if isinstance(value, list):
            if not all(isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m for m in value):
                raise DataError(f"{path} row {i}: field '{field}' must be a string or a list of {{role, content}} messages")
        elif not isinstance(value, str):
            raise DataError(f"{path} row {i}: field '{field}' must be a string, got {type(value).__name__}")
    if isinstance(row["prompt"], list):
        out = _render_chat(path, i, row, tokenizer)
    else:
        out = {k: row[k] if isinstance(row[k], str) else _message_text(row[k]) for k in ("prompt", "chosen", "rejected")}
    for field in ("chosen", "rejected"):
        if not out[field].strip():
            raise DataError(f"{path} row {i}: field '{field}' is an empty response")
    return out


def _message_text(messages) -> str:
    return "".join(m["content"] for m in messages)


def _render_chat(path, i, row, tokenizer) -> dict:
    """Chat rows: the prompt is rendered with the generation prompt; a response is whatever the template
    adds after it when the assistant turn is appended (so end-of-turn tokens are part of the response)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{path} row {i}: chat-format rows need a tokenizer with a chat template")
    prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    out = {"prompt": prompt}
    for field in ("chosen", "rejected"):
        turn = row[field] if isinstance(row[field], list) else [{"role": "assistant", "content": row[field]}]
        full = tokenizer.apply_chat_template(row["prompt"] + turn, tokenize=False)
        if not full.startswith(prompt):
            raise DataError(f"{path} row {i}: the chat template renders '{field}' without the prompt as its prefix")
        out[field] = full[len(prompt) :]
    return out


def split_hh(text: str) -> tuple[str, str]:
    """Split an HH dialogue at its last '\\n\\nAssistant:' into (prompt incl. the marker, response)."""
    cut = text.rfind(HH_MARKER) + len(HH_MARKER)
    return text[:cut], text[cut:]


def hh_messages(text: str) -> list[dict] | None:
    """An HH dialogue → chat messages [{role, content}], Human → user, Assistant → assistant, each turn's text
    stripped. None if text precedes the first turn (not an HH dialogue)."""
    parts = HH_TURN.split(text)  # [text before the first turn, role, text, role, text, ...]
    if parts[0].strip():
        return None
    return [{"role": HH_ROLES[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]


def _hh_template(data_cfg, tokenizer):
    """The tokenizer whose chat template renders HH dialogues, or None for the raw text (`data.chat_template`)."""
    has_template = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
    if data_cfg.chat_template == "on" and not has_template:
        raise DataError("data.chat_template is 'on' but the tokenizer has no chat template (use 'auto' or 'off')")
    return tokenizer if has_template and data_cfg.chat_template != "off" else None


def _render_hh(tokenizer, prompt: str, responses: tuple[str, ...], where: str) -> tuple[str, tuple[str, ...]] | None:
    """Raw HH prompt and responses → (chat-rendered prompt, rendered responses), or None if the template refuses
    the dialogue (e.g. one that insists on alternating roles)."""
    from jinja2 import TemplateError

    turns = hh_messages(prompt)
    if turns is None or not turns or turns[-1] != {"role": "assistant", "content": ""}:
        return None
    turns = turns[:-1]  # the prompt ends with the empty "\n\nAssistant:" the response is the text of
    try:
        rendered = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        out = []
        for response in responses:
            full = tokenizer.apply_chat_template(turns + [{"role": "assistant", "content": response.strip()}], tokenize=False)
            if not full.startswith(rendered):
                raise DataError(f"{where}: the chat template does not render the prompt as the start of the whole "
                                "dialogue, so the response cannot be cut off it; set data.chat_template: off")
            out.append(full[len(rendered) :])
    except TemplateError:
        return None
    return rendered, tuple(out)


def _parse_hh(rows, source: str, chat_tokenizer=None) -> list[dict]:
    """HH rows → pairs, as raw text or, with `chat_tokenizer`, rendered by its chat template. Rows with an empty
    response, chosen and rejected dialogues that do not share the prompt, or (chat) turns the template refuses,
    are skipped and counted (the original DPO code trained on them as if they were fine)."""
    pairs, skipped = [], []
    for i, row in rows:
        for field in ("chosen", "rejected"):
            if not isinstance(row, dict) or field not in row:
                raise DataError(f"{source} row {i}: field '{field}' is missing")
            if not isinstance(row[field], str):
                raise DataError(f"{source} row {i}: field '{field}' must be a string, got {type(row[field]).__name__}")
        prompt, chosen = split_hh(row["chosen"])
        rejected_prompt, rejected = split_hh(row["rejected"])
        if prompt != rejected_prompt or not chosen.strip() or not rejected.strip() or HH_MARKER not in prompt:
            skipped.append(i)
            continue
        if chat_tokenizer is not None:
            rendered = _render_hh(chat_tokenizer, prompt, (chosen, rejected), f"{source} row {i}")
            if rendered is None:
                skipped.append(i)
                continue
            prompt, (chosen, rejected) = rendered
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    if skipped:
        share = len(skipped) / len(rows)
        msg = (f"{source}: {len(skipped)} of {len(rows)} rows have an empty response or chosen/rejected "
               f"prompts that differ{' or turns the chat template refuses' if chat_tokenizer is not None else ''} "
               f"(rows {', '.join(map(str, skipped[:5]))}{', ...' if len(skipped) > 5 else ''})")
        if share > HH_MAX_SKIPPED and len(skipped) > HH_MAX_SKIPPED_ROWS:
            raise DataError(msg + f": more than {HH_MAX_SKIPPED:.0%}, is this really HH-format data?")
        _warn_once(f"warning: {msg}; skipped")
    return pairs


_warned = set()


def _warn_once(message: str):
    """The same file is parsed for the training and the held-out split: say what is wrong with it once."""
    if message not in _warned:
        _warned.add(message)
        print(message, flush=True)


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


def tokenize(tokenizer, prompts: list[str], responses: list[str], max_length: int, max_prompt_length: int):
    """→ list of (prompt_ids, response_ids) after the BOS/EOS and truncation rules in the module docstring."""
    if not prompts:  # e.g. no held-out pairs (data.eval_size 0): fast tokenizers fail on an empty batch
        return []
    bos, eos = special_prefix(tokenizer), tokenizer.eos_token_id
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    out = []
    for p, r in zip(p_ids, r_ids):
        if bos and p[: len(bos)] == bos:  # the text brings its own BOS (a chat template that writes it)
            p = p[len(bos) :]
        keep = max_prompt_length - len(bos)  # prompt tokens after the BOS
        p = bos + p[max(0, len(p) - keep) :]
        r = (r if eos in r else r + [eos])[: max_length - len(p)]
        out.append((p, r))
    return out


def tokenize_pairs(tokenizer, rows: list[dict], max_length: int, max_prompt_length: int) -> list[tuple]:
    """→ list of (prompt_ids, chosen_ids, rejected_ids)."""
    prompts = [r["prompt"] for r in rows]
    chosen = tokenize(tokenizer, prompts, [r["chosen"] for r in rows], max_length, max_prompt_length)
    rejected = tokenize(tokenizer, prompts, [r["rejected"] for r in rows], max_length, max_prompt_length)
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
