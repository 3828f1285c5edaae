"""Preference data in every row shape users bring (data_shapes.py), from real rows (tests/fixtures, see its README):
the same pairs in shapes (a)–(e) render identically; UltraFeedback-binarized rows (HuggingFaceH4's layout) train
with the prompt only in the prompt; mismatched leading turns are refused naming the row; column mapping, scores and
ties; save_to_disk directories; a Hub id without network; the data summary line and data.preview."""

import json
import time
from pathlib import Path

import pytest

from plumbing.config import DataArgs
from plumbing.errors import UserError
from plumbing.models import load_tokenizer
from conftest import read_metrics, run_main, run_here, run_script
from plumbing.data import data_summary, hh_messages, load_pairs, to_pairs, tokenize_pairs
from plumbing.sort_task import build_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def real_rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / name).read_text(encoding="utf-8").splitlines()]


UF = real_rows("ultrafeedback-binarized-8.jsonl")  # {prompt, chosen, rejected, source_index, metadata: {scores}}
HH = real_rows("hh-harmless-base-test-4.jsonl")  # {chosen, rejected} multi-turn dialogues; the last has an empty response
TIE = 7  # UF[7] has score_chosen == score_rejected; UF[:7] are the rows whose chosen and rejected differ in their first
# character, so that (c)'s shared-prefix prompt of prompt+chosen and prompt+rejected is exactly the prompt


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def shapes(row: dict) -> dict:
    """One real UltraFeedback pair in every shape, with the columns of the Hub datasets that use it."""
    p, c, r = row["prompt"], row["chosen"], row["rejected"]
    scores = {"score_chosen": row["metadata"]["score_chosen"], "score_rejected": row["metadata"]["score_rejected"]}
    return {
        "a": {"prompt": p, "chosen": c, "rejected": r},
        "a, HH-formatted": {"prompt": f"\n\nHuman: {p}\n\nAssistant:", "response": " " + c, "chosen": " " + c,  # Dahoas/rm-static
                            "rejected": " " + r},
        "b": {"prompt": [user(p)], "chosen": [assistant(c)], "rejected": [assistant(r)]},
        "c, conversations": {"chosen": [user(p), assistant(c)], "rejected": [user(p), assistant(r)], **scores},  # trl-lib/ultrafeedback_binarized
        "c, strings": {"chosen": p + c, "rejected": p + r},
        "d": {"prompt": p, "prompt_id": str(row["source_index"]), "chosen": [user(p), assistant(c)],  # HuggingFaceH4/ultrafeedback_binarized
              "rejected": [user(p), assistant(r)], "messages": [user(p), assistant(c)], **scores},
        "e": {"chosen": f"\n\nHuman: {p}\n\nAssistant: {c}", "rejected": f"\n\nHuman: {p}\n\nAssistant: {r}"},
    }


def rendered(shape: str, tokenizer, rows=UF[:TIE], **cfg) -> list[dict]:
    pairs = to_pairs([(i, shapes(row)[shape]) for i, row in enumerate(rows, 1)], shape, DataArgs(**cfg), tokenizer)
    return [{k: pair[k] for k in ("prompt", "chosen", "rejected")} for pair in pairs]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def smollm2():
    return load_tokenizer("smollm2-135m")


# ---- the same real pairs in every shape -------------------------------------------------------------------
def test_every_shape_renders_identically_with_smollm2s_template(smollm2):
    """Written out by hand from SmolLM2's ChatML template: system turn, user turn, generation prompt; a response
    is its text and <|im_end|>\\n."""
    expected = [{"prompt": f"{SMOL_SYSTEM}<|im_start|>user\n{r['prompt']}<|im_end|>\n<|im_start|>assistant\n",
                 "chosen": f"{r['chosen']}<|im_end|>\n", "rejected": f"{r['rejected']}<|im_end|>\n"} for r in UF[:TIE]]
    for shape in shapes(UF[0]):
        assert rendered(shape, smollm2) == expected, shape
    assert all(r["prompt"] not in pair["chosen"] + pair["rejected"] for r, pair in zip(UF, expected))


def test_without_a_template_conversations_are_hh_text_and_strings_stay_plain(smollm2):
    """No template (a template-less tokenizer, or data.chat_template off): every conversation is written as an HH
    dialogue, exactly what the HH shape is; plain strings stay the text they are."""
    no_template = build_tokenizer()
    no_template.chat_template = None
    hh = [{"prompt": f"\n\nHuman: {r['prompt']}\n\nAssistant:", "chosen": " " + r["chosen"], "rejected": " " + r["rejected"]} for r in UF[:TIE]]
    plain = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in UF[:TIE]]
    for tokenizer, cfg in ((no_template, {}), (None, {}), (smollm2, {"chat_template": "off"})):
        for shape in shapes(UF[0]):
            assert rendered(shape, tokenizer, **cfg) == (plain if shape in ("a", "c, strings") else hh), (shape, cfg)


def test_multi_turn_hh_dialogues_in_every_conversational_shape(smollm2):
    """Real multi-turn HH rows: the turns before the last answer are the prompt in every shape, incl. (d)'s
    prompt string (the first user turn) followed by whole conversations; HH's own parse is the reference."""
    conv = [(hh_messages(row["chosen"]), hh_messages(row["rejected"])) for row in HH[:3]]
    variants = {
        "b": [{"prompt": c[:-1], "chosen": c[-1:], "rejected": r[-1:]} for c, r in conv],
        "c": [{"chosen": c, "rejected": r} for c, r in conv],
        "d": [{"prompt": c[0]["content"], "chosen": c, "rejected": r} for c, r in conv],
    }
    for tokenizer in (smollm2, None):
        want = to_pairs(list(enumerate(HH[:3], 1)), "e", DataArgs(), tokenizer)
        for name, rows in variants.items():
            assert to_pairs(list(enumerate(rows, 1)), name, DataArgs(), tokenizer) == want, (name, tokenizer)
    assert want[0]["prompt"].count("\n\nHuman:") == 2 and "Human:" not in want[0]["chosen"] + want[0]["rejected"]


def test_real_hh_blemish_is_skipped_and_counted(capsys):
    report = {}
    pairs = to_pairs(list(enumerate(HH, 1)), "hh.jsonl", DataArgs(), None, report)  # row 4: an empty chosen response
    assert len(pairs) == 3 and report["skipped"] == {"an empty response": 1} and report["rows"] == 4
    assert "1 of 4 rows have an empty response (rows 4); skipped" in capsys.readouterr().out


# ---- UltraFeedback-binarized (HuggingFaceH4's layout): the bug this module fixes -----------------------------
def test_ultrafeedback_rows_train_with_the_prompt_only_in_the_prompt(tmp_path, tiny_model):
    """prompt string + whole conversations: the user turn is removed from the responses (it used to be joined into
    them: "What is 2+2?4"). The labels (response tokens) hold the answer alone; then a tiny run trains on them."""
    path = write_jsonl(tmp_path / "uf.jsonl", [shapes(r)["d"] for r in UF])
    tok = build_tokenizer()  # its template: "user: …\\nassistant: " + answer + "\\n"
    report = {}
    pairs = load_pairs(DataArgs(dataset=str(path), eval_size=2), "train", tok, report)
    assert report["shape"].startswith("(d)") and report["ties"] == 1
    for row, pair in zip(UF, pairs):
        assert pair["prompt"] == f"user: {row['prompt']}\nassistant: " and pair["chosen"] == row["chosen"] + "\n"
        assert row["prompt"] not in pair["chosen"] + pair["rejected"]
        assert (pair["score_chosen"], pair["score_rejected"]) == (row["metadata"]["score_chosen"], row["metadata"]["score_rejected"])
    (p, c, _), = tokenize_pairs(tok, pairs[:1], 512, 256)
    assert tok.decode(c) == (UF[0]["chosen"] + "\n<eos>") and tok.decode(p) == pairs[0]["prompt"]
    out = tmp_path / "run"
    result = run_here("betadpo.py", "--model.name_or_path", tiny_model, "--data.dataset", path, "--data.eval_size", 2,
                      "--train.batch_size", 2, "--train.max_steps", 2, "--train.output_dir", out)  # in this process
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    summary = [line for line in result.stdout.splitlines() if line.startswith("data: ")]
    assert len(summary) == 1 and "6 training pairs, 2 held out" in summary[0] and "(d) prompt string" in summary[0]


def test_a_conversation_that_starts_with_another_prompt_is_refused(tmp_path):
    rows = [shapes(r)["d"] for r in UF]
    rows[2]["rejected"][0] = user(UF[3]["prompt"])  # row 3's rejected conversation answers row 4's prompt
    with pytest.raises(UserError, match=r"uf\.jsonl row 3: field 'rejected' starts with a user turn \('Change the format"):
        load_pairs(DataArgs(dataset=str(write_jsonl(tmp_path / "uf.jsonl", rows)), eval_size=2), "train")
    rows = [shapes(r)["b"] for r in UF]
    rows[4]["chosen"] = [user("another question"), assistant("x")]  # (b): responses may repeat the prompt, not another
    with pytest.raises(UserError, match=r"row 5: field 'chosen' starts with a user turn \('another question'\) that is not"):
        to_pairs(list(enumerate(rows, 1)), "b", DataArgs())


def test_no_known_shape_says_what_it_found():
    with pytest.raises(UserError, match=r"x\.jsonl row 1: no known row shape; found question: a string, answers: a list "
                                        r"\(1\), score: int\. Expected .* data\.columns"):
        to_pairs([(1, {"question": "q", "answers": [1], "score": 3})], "x.jsonl", DataArgs())


# ---- other column names, scores and ties ---------------------------------------------------------------------
def test_columns_scores_and_ties(tmp_path):
    """The fixture file as it is (scores nested in metadata), and the stack-exchange-paired layout."""
    path = FIXTURES / "ultrafeedback-binarized-8.jsonl"
    nested = "score_chosen=metadata.score_chosen,score_rejected=metadata.score_rejected"
    report = {}
    pairs = load_pairs(DataArgs(dataset=str(path), eval_size=0, columns=nested), "train", None, report)
    assert [(p["score_chosen"], p["score_rejected"]) for p in pairs] == [tuple(r["metadata"].values()) for r in UF]
    assert report["ties"] == 1 and len(pairs) == 8
    kept = load_pairs(DataArgs(dataset=str(path), eval_size=0, columns=nested, drop_ties=True), "train")
    assert kept == [p for i, p in enumerate(pairs) if i != TIE]
    paired = [{"question": r["prompt"], "response_j": r["chosen"], "response_k": r["rejected"]} for r in UF]
    mapped = to_pairs(list(enumerate(paired, 1)), "se", DataArgs(columns="prompt=question, chosen=response_j,rejected=response_k"))
    assert mapped == [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in UF]
    with pytest.raises(UserError, match=r"se row 1: column 'response_x' \(data.columns: chosen=response_x\) is missing; the row has question"):
        to_pairs(list(enumerate(paired, 1)), "se", DataArgs(columns="prompt=question,chosen=response_x,rejected=response_k"))
    with pytest.raises(UserError, match="data.drop_ties: .* has no score_chosen/score_rejected columns"):
        load_pairs(DataArgs(dataset=str(path), eval_size=0, drop_ties=True), "train")


def test_small_rules_of_the_shapes(smollm2, capsys):
    """TRL's space rule for string prefixes; identical responses skipped; responses that repeat their prompt in
    every row lose it; text already rendered with the tokenizer's special tokens is not rendered again."""
    rows = [{"chosen": "Q: hi? A: yes", "rejected": "Q: hi? A: no"}, {"chosen": "Q: ho? A: a", "rejected": "Q: ho? A: a"}]
    report = {}
    assert to_pairs(list(enumerate(rows, 1)), "s", DataArgs(), None, report) == [{"prompt": "Q: hi? A:", "chosen": " yes", "rejected": " no"}]
    assert report["skipped"] == {"chosen = rejected": 1} and "1 of 2 rows have chosen = rejected (rows 2)" in capsys.readouterr().out
    repeated = [{"prompt": r["prompt"], "chosen": r["prompt"] + " " + r["chosen"], "rejected": r["prompt"] + " " + r["rejected"]} for r in UF]
    assert to_pairs(list(enumerate(repeated, 1)), "s", DataArgs()) == [{k: (" " if k != "prompt" else "") + r[k] for k in ("prompt", "chosen", "rejected")} for r in UF]
    done = [{"prompt": f"<|im_start|>user\n{r['prompt']}<|im_end|>\n<|im_start|>assistant\n", "chosen": r["chosen"], "rejected": r["rejected"]} for r in UF]
    assert to_pairs(list(enumerate(done, 1)), "s", DataArgs(), smollm2) == done
    with pytest.raises(UserError, match="already holds the tokenizer's special tokens"):
        to_pairs(list(enumerate(done, 1)), "s", DataArgs(chat_template="on"), smollm2)


# ---- sources: save_to_disk, the Hub without network -----------------------------------------------------------
def test_save_to_disk_directory_with_splits(tmp_path):
    import datasets

    rows = [shapes(r)["d"] for r in UF]
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(rows[:6]), "test_prefs": datasets.Dataset.from_list(rows[6:])}).save_to_disk(tmp_path / "uf")
    cfg = DataArgs(dataset=str(tmp_path / "uf"), split="train_prefs", eval_split="test_prefs", eval_size=0)
    from_file = load_pairs(DataArgs(dataset=str(write_jsonl(tmp_path / "uf.jsonl", rows)), eval_size=2), "train")
    assert load_pairs(cfg, "train") == from_file and len(load_pairs(cfg, "eval")) == 2
    with pytest.raises(UserError, match=r"data.split: .*uf has no split 'train' \(it has train_prefs, test_prefs\)"):
        load_pairs(DataArgs(dataset=str(tmp_path / "uf")), "train")


def test_a_hub_id_without_network_fails_in_one_line_within_seconds(tmp_path, tiny_model):
    """A hub endpoint that refuses connections, an empty cache: one line naming the id and what to do, at once. "At
    once" is measured against the same command stopping at the same point for a missing local file (the machine
    may be loaded): the Hub is asked once, with a 3-second timeout; its retries would add about a minute."""
    import os

    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": ""}
    env = {**{k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}, **env}
    out, seconds, results = tmp_path / "run", [], []
    for dataset in (tmp_path / "missing.jsonl", "HuggingFaceH4/ultrafeedback_binarized"):
        start = time.perf_counter()
        results.append(run_script("betadpo.py", "--model.name_or_path", tiny_model, "--data.dataset", dataset, "--data.split",
                                  "train_prefs", "--train.output_dir", out, check=False, env=env))
        seconds.append(time.perf_counter() - start)
    result, lines = results[1], results[1].stderr.strip().splitlines()
    assert results[0].returncode == result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("error: data.dataset: could not load 'HuggingFaceH4/ultrafeedback_binarized' from the Hugging Face Hub")
    assert "save_to_disk" in lines[0] and seconds[1] < seconds[0] + 20 and not out.exists(), seconds


# ---- the data summary and data.preview ---------------------------------------------------------------------
def test_summary_line_counts_lengths_and_truncation(capsys):
    """The character tokenizer (one token per character, no BOS, EOS appended) makes every length known."""
    tok = build_tokenizer()
    rows = [{"prompt": "p" * n, "chosen": "c" * (n + 1), "rejected": "r" * 2} for n in (1, 2, 3, 4, 5, 6, 7, 30)]
    full = []
    ids = tokenize_pairs(tok, rows, 14, 8, full)
    assert full == [(n, n + 2, 3) for n in (1, 2, 3, 4, 5, 6, 7, 30)]
    line = data_summary({"source": "x", "rows": 10, "skipped": {"chosen = rejected": 2}, "ties": 3}, ids, full, ("prompt", "chosen", "rejected"), 4)
    # medians of (1..7, 30) = 4.5, of (3..9, 32) = 6.5; nearest-rank p95 of 8 values = the largest. Cut: n = 7
    # (7 + 9 > 14: its chosen) and n = 30 (its prompt, to 8); n = 6 fits exactly (6 + 8 = 14).
    assert line == ("data: 8 training pairs, 4 held out, from x; rows: 10 read, 2 skipped (chosen = rejected: 2), 3 ties "
                    "(kept; data.drop_ties drops them); tokens median/p95: prompt 4.5/30, chosen 6.5/32, rejected 3/3; "
                    "truncated: 25.0% of pairs")


@pytest.mark.parametrize("script", ["betadpo.py", "sft.py"])
def test_preview_prints_what_the_model_sees_and_writes_nothing(tmp_path, tiny_model, script, capsys):
    """--data.preview 2: two JSON lines on stdout (the exact text after the template, token counts before and after
    truncation, where it cuts), the summary on stderr, exit 0, no output directory. The character tokenizer has one
    token per character, no BOS, and EOS appended to responses, so every count is a length."""
    path = write_jsonl(tmp_path / "uf.jsonl", [shapes(r)["d"] for r in UF])
    out = tmp_path / "run"
    code, stdout, stderr = run_main(script, "--model.name_or_path", tiny_model, "--data.dataset", path, "--data.eval_size", 2,
                                    "--data.max_length", 64, "--data.max_prompt_length", 48, "--data.preview", 2,
                                    "--train.output_dir", out, capsys=capsys)  # in this process
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert code == 0 and len(lines) == 2 and not out.exists() and stderr.strip().splitlines()[-1].startswith("data: 6 training ")
    fields = ("prompt", "chosen", "rejected") if script == "betadpo.py" else ("prompt", "response")
    for row, line in zip(UF, lines):
        prompt, response = f"user: {row['prompt']}\nassistant: ", row["chosen"] + "\n"
        assert line["prompt"] == prompt and line[fields[1]] == response
        assert line["tokens"][fields[1]] == len(response) + 1 and line["tokens"]["prompt"] == len(prompt)
        kept_prompt = min(len(prompt), 48)
        assert line["kept"] == {"prompt": kept_prompt, fields[1]: min(len(response) + 1, 64 - kept_prompt),
                                **({"rejected": min(len(row["rejected"]) + 2, 64 - kept_prompt)} if len(fields) == 3 else {})}
        assert line["cut"]["prompt"] == {"dropped_tokens": len(prompt) - 48, "kept_starts": prompt[len(prompt) - 48 :][:8]}
        cut = len(response) + 1 > 64 - 48  # the second pair's answer ("A). negative.") fits
        assert line["cut"].get(fields[1]) == ({"dropped_tokens": len(response) + 1 - 16, "kept_ends": response[:16][-8:]} if cut else None)
    assert (lines[0].get("score_chosen"), lines[0].get("score_rejected")) == ((7.5, 5.0) if script == "betadpo.py" else (None, None))


def test_preview_of_a_started_run_is_not_a_config_change(tmp_path):
    """data.preview may be added to the command of a run that has checkpoints (it writes nothing), unlike data keys."""
    from betadpo import Config
    from plumbing.config import save_config
    from plumbing.launch import preflight

    cfg = Config()
    cfg.train.output_dir = str(tmp_path / "out")
    (tmp_path / "out" / "checkpoints" / "step-00000002").mkdir(parents=True)
    save_config(cfg, tmp_path / "out" / "config.yaml")
    cfg.data.preview = 3
    preflight(cfg, 1)
    cfg.data.drop_ties = True
    with pytest.raises(UserError, match="data.drop_ties False → True"):
        preflight(cfg, 1)
