r"""Row shapes: what one row of preference data holds, and how it becomes the prompt and the two responses the
model sees. data.py reads the rows (files, `save_to_disk` directories, the Hub) and tokenizes what this returns.

The shape is detected once per dataset, from its first row (after `data.columns` renamed the user's columns);
a later row of another shape stops the run naming file, 1-based row and field. A message is {"role", "content"}.
    (a) {"prompt": str, "chosen": str, "rejected": str}
    (b) {"prompt": [messages], "chosen": [messages] or str, "rejected": ...}        TRL's conversational format
    (c) {"chosen": [messages], "rejected": [messages]}   implicit prompt: the leading turns both share, or
        {"chosen": str, "rejected": str}               the leading characters (TRL's maybe_extract_prompt)
    (d) {"prompt": str, "chosen": [user turn = prompt, assistant turn, ...], ...}   HuggingFaceH4/ultrafeedback_binarized
    (e) {"chosen": "\n\nHuman: … \n\nAssistant: …", "rejected": …}                 Anthropic HH dialogues
A response never contains its prompt: a response conversation that starts with a user (or system) turn must
start with exactly the row's prompt, which is removed, or the row is refused. Turns that chosen and rejected
still share after it (a multi-turn dialogue that differs only in its last answer) join the prompt, so a response
starts with the assistant's turn. Rows with an empty response, or identical chosen and rejected (no
preference), are skipped and counted, as HH's blemishes.

What the model sees (`data.chat_template`; auto = on when the tokenizer has a chat template):
    on    every shape becomes turns rendered by the chat template ((a)'s strings: one user and one assistant
          turn; HH: Human → user, Assistant → assistant, text stripped). The prompt is rendered with the generation
          prompt; a response is what the template adds after it when the response's turns are appended (its text
          and end-of-turn tokens). Strings that already hold the tokenizer's special tokens are used as they are.
    off   strings as they are: (a)'s and (c)'s text, HH's raw dialogue split at its last "\n\nAssistant:" (the
          paper's setting); conversations, which have no text of their own, written as HH dialogues.
So a pair renders the same in every shape, except that (a)'s plain strings stay plain text without a template.
"""

import re
from collections import Counter

from plumbing.errors import UserError

HH_MARKER = "\n\nAssistant:"
HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")  # a turn starts at a blank line (or the text's start)
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
HH_NAMES = {"user": "Human", "assistant": "Assistant"}  # other roles are written with their own name, capitalised
MAX_SKIPPED = 0.01  # more than 1% skipped rows means the parser (or the data) is wrong: stop,
MAX_SKIPPED_ROWS = 5  # unless they are only a handful (real HH has single blemishes: a 96-row slice may hold one)

SHAPES = {
    "text": "(a) prompt/chosen/rejected strings",
    "chat": "(b) prompt and responses as messages",
    "chat-full": "(d) prompt string, responses as whole conversations (their prompt turns removed)",
    "implicit-chat": "(c) chosen/rejected conversations, prompt = their shared leading turns",
    "implicit-text": "(c) chosen/rejected strings, prompt = their shared prefix",
    "hh": "(e) Anthropic HH dialogues",
}


class DataError(UserError):
    pass


# --------------------------------------------------------------------------------------------------------
# Columns and shapes
# --------------------------------------------------------------------------------------------------------
def parse_columns(spec: str) -> dict[str, str]:
    """data.columns "prompt=question,chosen=response_j" → {"prompt": "question", "chosen": "response_j"}.
    (Its syntax is checked with the rest of the config, in plumbing.config.validate.)"""
    return {ours.strip(): theirs.strip() for ours, theirs in (item.split("=", 1) for item in spec.split(",") if item.strip())}


def _column(row: dict, path: str):
    """row["a"]["b"] for the column path "a.b" (scores nested in a dict, e.g. metadata.score_chosen)."""
    for key in path.split("."):
        if not isinstance(row, dict) or key not in row:
            raise KeyError(path)
        row = row[key]
    return row


def map_columns(rows: list, spec: str, source: str) -> list:
    """The user's columns under our names (data.columns); a mapped column that a row lacks stops the run."""
    mapping = parse_columns(spec)
    if not mapping:
        return rows
    out = []
    for i, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{source} row {i}: expected an object with prompt/chosen/rejected")
        new = {k: v for k, v in row.items() if k not in mapping}
        for ours, theirs in mapping.items():
            try:
                new[ours] = _column(row, theirs)
            except KeyError:
                raise DataError(f"{source} row {i}: column '{theirs}' (data.columns: {ours}={theirs}) is missing; "
                                f"the row has {', '.join(map(str, row)) or 'no columns'}") from None
        out.append((i, new))
    return out


def _is_messages(value) -> bool:
    return (isinstance(value, list) and len(value) > 0
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value))


def _found(value) -> str:
    """What a field holds, for error messages."""
    if isinstance(value, str) or _is_messages(value):
        return "a string" if isinstance(value, str) else f"a list of {len(value)} messages"
    return f"a list ({value[0]!r:.40})" if isinstance(value, list) and value else type(value).__name__


def _shape_of(row: dict) -> str | None:
    c, r = row.get("chosen"), row.get("rejected")
    if isinstance(c, str) and isinstance(r, str) and "prompt" not in row:
        return "hh" if HH_MARKER in c else "implicit-text"
    if _is_messages(c) and _is_messages(r) and "prompt" not in row:
        return "implicit-chat"
    p, either = row.get("prompt"), (str, list)
    if isinstance(p, str) and isinstance(c, str) and isinstance(r, str):
        return "text"
    if (isinstance(p, str) or _is_messages(p)) and isinstance(c, either) and isinstance(r, either):
        return "chat"  # (b), or (d) once a response turns out to start with its prompt
    return None


def _check_row(i, row, shape: str, source: str):
    """Every field the dataset's shape needs, with the right type; else one line naming row and field."""
    if not isinstance(row, dict):
        raise DataError(f"{source} row {i}: expected an object with prompt/chosen/rejected")
    ok, kind = {"implicit-chat": (_is_messages, "a list of {role, content} messages"),
                "chat": (lambda v: isinstance(v, str) or _is_messages(v), "a string or a list of {role, content} messages"),
                }.get(shape, (lambda v: isinstance(v, str), "a string"))
    for field in ("prompt", "chosen", "rejected")[shape not in ("text", "chat") :]:
        if field not in row:
            raise DataError(f"{source} row {i}: field '{field}' is missing")
        if not ok(row[field]):
            raise DataError(f"{source} row {i}: field '{field}' must be {kind}, got {_found(row[field])}")


# --------------------------------------------------------------------------------------------------------
# Rows → (kind, prompt, chosen, rejected): "text" (strings), "hh" (HH text) or "chat" (lists of turns)
# --------------------------------------------------------------------------------------------------------
def _turn(role: str, text: str) -> dict:
    return {"role": role, "content": text}


def _same(a: dict, b: dict) -> bool:
    return a["role"] == b["role"] and a["content"].strip() == b["content"].strip()


def _shared(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and _same(a[n], b[n]):
        n += 1
    return n


def _prompt_turns(prompt, turns: list) -> int:
    """How many leading turns of a response conversation are the prompt: a string prompt is the first user turn
    (after any system turns, which stay with it); a message-list prompt must come first, turn for turn. 0 = none."""
    if isinstance(prompt, str):
        k = next((k for k, t in enumerate(turns) if t["role"] != "system"), len(turns))
        ok = k < len(turns) and turns[k]["role"] == "user" and turns[k]["content"].strip() == prompt.strip()
        return k + 1 if ok else 0
    return len(prompt) if len(turns) >= len(prompt) and all(map(_same, turns, prompt)) else 0


def _chat_row(row, where):
    """(b), (d) and (c)-conversations → ("chat", prompt turns, chosen turns, rejected turns, prompt removed?), or
    why the row is skipped."""
    c, r = ([_turn("assistant", v)] if isinstance(v, str) else list(v) for v in (row["chosen"], row["rejected"]))
    if "prompt" not in row:  # (c): the shared leading turns are the prompt
        n = _shared(c, r)
        if n == 0:
            raise DataError(f"{where}: 'chosen' and 'rejected' share no leading turn, so there is no prompt to train on")
        prompt, removed = c[:n], False
    else:
        p, leads = row["prompt"], {}
        for field, turns in (("chosen", c), ("rejected", r)):
            if turns[0]["role"] == "assistant":
                continue  # a response alone
            n = _prompt_turns(p, turns)
            if n == 0:  # a conversation that starts with another prompt: training on it would teach that prompt
                first = next((t for t in turns if t["role"] != "system"), turns[0])
                ours = p if isinstance(p, str) else p[-1]["content"]
                raise DataError(f"{where}: field '{field}' starts with a {first['role']} turn ({first['content'][:40]!r}) "
                                f"that is not the row's prompt ({ours[:40]!r}); a response must not contain a prompt: "
                                "fix the row, or map the right columns with data.columns")
            leads[field] = turns[:n]
        if len(leads) == 2 and not (len(leads["chosen"]) == len(leads["rejected"]) and all(map(_same, *leads.values()))):
            raise DataError(f"{where}: fields 'chosen' and 'rejected' start with different prompt turns")
        # (d): the conversation's own prompt turns (with its system turn, if any), removed from the responses
        prompt = next(iter(leads.values()), None) or ([_turn("user", p)] if isinstance(p, str) else list(p))
        c, r, removed = c[len(leads.get("chosen", [])) :], r[len(leads.get("rejected", [])) :], bool(leads)
        n = _shared(c, r)  # a multi-turn conversation: the turns before the answers differ belong to the prompt
        prompt = prompt + c[:n]
    c, r = c[n:], r[n:]
    for field, turns in (("chosen", c), ("rejected", r)):
        if not turns or not "".join(t["content"] for t in turns).strip():
            return "an empty response"
        if turns[0]["role"] != "assistant":
            raise DataError(f"{where}: field '{field}': after the prompt, the response starts with a {turns[0]['role']} "
                            "turn; a response starts with the assistant's turn")
    return ("chat", prompt, c, r, removed)


def _text_row(row, shape, where):
    """(a) and (c)-strings → ("text", prompt, chosen, rejected) (an HH dialogue as the prompt: "hh"), or why the
    row is skipped."""
    c, r = row["chosen"], row["rejected"]
    if shape == "implicit-text":  # TRL's extract_prompt: the shared prefix, a space before the cut goes to the responses
        n = 0
        while n < min(len(c), len(r)) and c[n] == r[n]:
            n += 1
        n -= n > 0 and c[n - 1] == " "
        if n == 0:
            raise DataError(f"{where}: 'chosen' and 'rejected' share no prefix, so there is no prompt to train on")
        p, c, r = c[:n], c[n:], r[n:]
    else:
        p = row["prompt"]
    if not c.strip() or not r.strip():
        return "an empty response"
    return ("hh" if is_hh_prompt(p) else "text", p, c, r, False)


def is_hh_prompt(text: str) -> bool:
    """An HH dialogue cut before its last answer ("\\n\\nHuman: …\\n\\nAssistant:"), as some datasets' prompt column holds."""
    return text.endswith(HH_MARKER) and hh_messages(text) is not None


# --------------------------------------------------------------------------------------------------------
# Rendering: the chat template, or text
# --------------------------------------------------------------------------------------------------------
def chat_tokenizer(data_cfg, tokenizer):
    """The tokenizer whose chat template renders the rows, or None for text (`data.chat_template`)."""
    has_template = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
    if data_cfg.chat_template == "on" and not has_template:
        raise DataError("data.chat_template is 'on' but the tokenizer has no chat template (use 'auto' or 'off')")
    return tokenizer if has_template and data_cfg.chat_template != "off" else None


def render_chat(tokenizer, prompt: list, responses: list, where: str) -> tuple[str, list[str]] | None:
    """Prompt turns and response turns → (prompt rendered with the generation prompt, what the template adds after
    it for each response), or None if the template refuses the turns (e.g. one that insists on alternating roles)."""
    from jinja2 import TemplateError

    try:
        rendered = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        out = []
        for response in responses:
            full = tokenizer.apply_chat_template(prompt + response, tokenize=False)
            if not full.startswith(rendered):
                raise DataError(f"{where}: the chat template does not render the prompt as the start of the whole "
                                "dialogue, so the response cannot be cut off it; set data.chat_template: off")
            out.append(full[len(rendered) :])
    except TemplateError:
        return None
    return rendered, out


def hh_text(turns: list) -> str:
    """Turns written as an HH dialogue: "\\n\\nHuman: …\\n\\nAssistant: …"."""
    return "".join(f"\n\n{HH_NAMES.get(t['role'], t['role'].capitalize())}: {t['content']}" for t in turns)


def _render(kind, p, c, r, tokenizer, raw: bool, where):
    """One normalised row → (prompt, chosen, rejected) text, or None if the chat template refuses it."""
    if tokenizer is None or (kind == "text" and raw):
        if kind == "chat":  # conversations have no text of their own: written as HH dialogues
            return hh_text(p) + HH_MARKER, hh_text(c)[len(HH_MARKER) :], hh_text(r)[len(HH_MARKER) :]
        return p, c, r
    if kind == "hh":  # the empty "\n\nAssistant:" that ends the prompt is where the response goes
        turns = hh_messages(p)
        if not turns or turns[-1] != {"role": "assistant", "content": ""}:
            return None  # text before the first turn: no dialogue to render
        p, c, r = turns[:-1], [_turn("assistant", c.strip())], [_turn("assistant", r.strip())]
    elif kind == "text":
        p, c, r = [_turn("user", p)], [_turn("assistant", c)], [_turn("assistant", r)]
    rendered = render_chat(tokenizer, p, [c, r], where)
    return None if rendered is None else (rendered[0], *rendered[1])


def _prerendered(tokenizer, text: str) -> bool:
    """Text that already holds the tokenizer's special tokens (e.g. "<|im_start|>") was rendered before."""
    return tokenizer is not None and any(len(t) > 1 and t in text for t in tokenizer.all_special_tokens)


# --------------------------------------------------------------------------------------------------------
# The whole dataset
# --------------------------------------------------------------------------------------------------------
def to_pairs(rows: list, source: str, data_cfg, tokenizer=None, report: dict | None = None, render=None) -> list[dict]:
    """(1-based row number, row) → {prompt, chosen, rejected} text (+ score_chosen/score_rejected when the data has
    scores), rendered as the module docstring says. Skipped rows are counted in `report` (and a warning), as are
    ties (equal scores), which `data.drop_ties` drops.

    render(normalised, template, raw, source) → ([(row number, pair dict)], [(row number, why skipped)]) turns the
    normalised rows (row number, kind, prompt, chosen, rejected, _) into pairs; by default `render_rows`, here.
    The tokenized cache (token_cache.py) passes one that renders and tokenizes in worker processes, and whose pair
    dicts point into its arrays: whatever it returns is counted, scored and split exactly as text pairs are."""
    report = {} if report is None else report
    rows = map_columns(rows, data_cfg.columns, source)
    if not rows:
        raise DataError(f"{source}: no rows")
    i0, first = rows[0]
    if not isinstance(first, dict):
        raise DataError(f"{source} row {i0}: expected an object with prompt/chosen/rejected")
    shape = _shape_of(first)
    if shape is None:
        found = ", ".join(f"{k}: {_found(v)}" for k, v in first.items()) or "no columns"
        raise DataError(f"{source} row {i0}: no known row shape; found {found}. Expected prompt/chosen/rejected (strings "
                        "or message lists) or chosen/rejected alone; name other columns with data.columns, e.g. "
                        "prompt=question,chosen=response_j,rejected=response_k")
    template = chat_tokenizer(data_cfg, tokenizer)
    if shape == "hh":
        normalised, skipped = _hh_rows(rows, source)
    else:
        normalised, skipped = [], []
        for i, row in rows:
            _check_row(i, row, shape, source)
            if row["chosen"] == row["rejected"]:
                skipped.append((i, "chosen = rejected"))
                continue
            where = f"{source} row {i}"
            out = _chat_row(row, where) if shape in ("chat", "implicit-chat") else _text_row(row, shape, where)
            if isinstance(out, str):  # why it is skipped: an empty response, as HH's
                skipped.append((i, out))
            else:
                normalised.append((i, *out))
        if shape == "text":
            _remove_repeated_prompt(normalised, source, report)
        shape = "chat-full" if shape == "chat" and any(n[5] for n in normalised) else shape
    raw = template is not None and shape in ("text", "implicit-text") and _prerendered(template, first.get("prompt", "") + first["chosen"])
    if raw and data_cfg.chat_template == "on":
        raise DataError(f"{source} row {i0}: the text already holds the tokenizer's special tokens (it was rendered "
                        "before), and data.chat_template 'on' would render it again; use 'auto' or 'off'")
    pairs, refused = (render or render_rows)(normalised, template, raw, source)
    skipped += refused
    _count_skipped(skipped, len(rows), source, shape == "hh", report)
    removed = "; the prompt cut off the responses, which repeated it" if report.pop("prompt_removed", False) else ""
    report.update(source=source, shape=SHAPES[shape] + removed, rows=len(rows), skipped=Counter(reason for _, reason in skipped),
                  rendering=("rendered by the chat template" if template is not None and not raw
                             else "written as HH text" if shape in ("chat", "chat-full", "implicit-chat") else "text as given"))
    return _scores(pairs, dict(rows), source, data_cfg.drop_ties, report)


def render_rows(normalised: list, template, raw: bool, source: str) -> tuple[list, list]:
    """Normalised rows → ([(row number, {prompt, chosen, rejected} text)], [(row number, why skipped)])."""
    pairs, refused = [], []
    for i, kind, p, c, r, _ in normalised:
        rendered = _render(kind, p, c, r, template, raw, f"{source} row {i}")
        if rendered is None:
            refused.append((i, "turns the chat template refuses"))
        else:
            pairs.append((i, dict(zip(("prompt", "chosen", "rejected"), rendered))))
    return pairs, refused


def _remove_repeated_prompt(normalised: list, source: str, report: dict):
    """(a) rows whose responses repeat their prompt (a prompt column next to whole-text columns): when every row's
    chosen and rejected start with its prompt, the prompt is cut off them (a response never contains its prompt)."""
    if normalised and all(p.strip() and c.startswith(p) and r.startswith(p) for _, _, p, c, r, _ in normalised):
        for i, _, p, c, r, _ in normalised:
            if not c[len(p) :].strip() or not r[len(p) :].strip():
                raise DataError(f"{source} row {i}: a response is only its prompt")
        normalised[:] = [(i, kind, p, c[len(p) :], r[len(p) :], True) for i, kind, p, c, r, _ in normalised]
        report["prompt_removed"] = True


def _scores(pairs: list, rows: dict, source: str, drop_ties: bool, report: dict) -> list[dict]:
    """score_chosen/score_rejected, when the data has them, kept on each pair; ties counted (and dropped)."""
    has = ["score_chosen" in rows[i] or "score_rejected" in rows[i] for i, _ in pairs]
    if drop_ties and not any(has):
        raise DataError(f"data.drop_ties: {source} has no score_chosen/score_rejected columns (name them with data.columns)")
    if not any(has):
        report.update(ties=None, dropped_ties=0)
        return [pair for _, pair in pairs]
    out, ties = [], 0
    for i, pair in pairs:
        for field in ("score_chosen", "score_rejected"):
            value = rows[i].get(field)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DataError(f"{source} row {i}: field '{field}' must be a number, got {_found(value) if field in rows[i] else 'nothing'}")
            pair[field] = float(value)
        tie = pair["score_chosen"] == pair["score_rejected"]
        ties += tie
        if not (tie and drop_ties):
            out.append(pair)
    report.update(ties=ties, dropped_ties=ties if drop_ties else 0)
    return out


def _count_skipped(skipped: list, total: int, source: str, hh: bool, report: dict):
    if not skipped:
        return
    rows = sorted(i for i, _ in skipped)
    reasons = " or ".join(sorted({reason for _, reason in skipped}))
    msg = f"{source}: {len(rows)} of {total} rows have {reasons} (rows {', '.join(map(str, rows[:5]))}{', ...' if len(rows) > 5 else ''})"
    if len(rows) / total > MAX_SKIPPED and len(rows) > MAX_SKIPPED_ROWS:
        raise DataError(msg + f": more than {MAX_SKIPPED:.0%}, {'is this really HH-format data?' if hh else 'check the data and data.columns'}")
    report.setdefault("warnings", []).append(f"warning: {msg}; skipped")  # (said again when the tokenized cache is read)
    warn_once(f"warning: {msg}; skipped")


_warned = set()


def warn_once(message: str):
    """The same file is parsed for the training and the held-out split: say what is wrong with it once."""
    if message not in _warned:
        _warned.add(message)
        print(message, flush=True)


# --------------------------------------------------------------------------------------------------------
# (e) Anthropic HH dialogues
# --------------------------------------------------------------------------------------------------------
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


def _hh_rows(rows: list, source: str) -> tuple[list, list]:
    """HH rows split at their last "\\n\\nAssistant:". Rows with an empty response, or chosen and rejected dialogues
    that do not share the prompt, are skipped (the original DPO code trained on them as if they were fine)."""
    normalised, skipped = [], []
    for i, row in rows:
        _check_row(i, row, "hh", source)
        prompt, chosen = split_hh(row["chosen"])
        rejected_prompt, rejected = split_hh(row["rejected"])
        if prompt != rejected_prompt or HH_MARKER not in prompt:
            skipped.append((i, "chosen/rejected prompts that differ"))
        elif not chosen.strip() or not rejected.strip():
            skipped.append((i, "an empty response"))
        elif chosen == rejected:
            skipped.append((i, "chosen = rejected"))
        else:
            normalised.append((i, "hh", prompt, chosen, rejected, False))
    return normalised, skipped
