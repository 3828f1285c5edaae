"""Data: every source, prompt masking, truncation, HH blemishes, and one clear message per bad input."""

import gzip
import json

import pytest

from plumbing.config import DataArgs
from plumbing.errors import UserError
from plumbing.models import load_model
from conftest import run_main, run_script
from plumbing.data import collate, collate_pairs, hh_messages, load_pairs, load_sft, special_prefix, split_hh, tokenize, tokenize_pairs
from plumbing.sort_task import build_tokenizer


def hh_row(human: str, chosen: str, rejected: str, rejected_human: str | None = None) -> dict:
    """A row in Anthropic HH's exact text format: whole dialogues, each turn after a blank line."""
    def dialogue(h, answer):
        return f"\n\nHuman: {h}\n\nAssistant: Sure.\n\nHuman: and then?\n\nAssistant:{answer}"
    return {"chosen": dialogue(human, chosen), "rejected": dialogue(rejected_human or human, rejected)}


def write_jsonl(path, rows, gz=False):
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def file_cfg(path, **kw):
    return DataArgs(dataset=str(path), eval_size=kw.pop("eval_size", 2), **kw)


# ---- sources ----------------------------------------------------------------------------------------------
def test_hh_format_file_skips_and_counts_blemishes(tmp_path, capsys):
    """A local file of HH dialogues (no prompt field) parses exactly like the hub dataset."""
    rows = [hh_row(f"question {i}?", f" answer {i}.", f" bad answer {i}.") for i in range(298)]
    rows.insert(10, hh_row("empty one?", " ", " something"))  # row 11: empty chosen response
    rows.insert(20, hh_row("original?", " fine", " other", rejected_human="a different prompt?"))  # row 21
    path = write_jsonl(tmp_path / "hh.jsonl.gz", rows, gz=True)
    pairs = load_pairs(file_cfg(path, eval_size=8), "train")
    out = capsys.readouterr().out
    assert "2 of 300 rows" in out and "(rows 11, 21)" in out and "skipped" in out
    assert len(pairs) == 298 - 8  # the last eval_size rows are held out
    first = pairs[0]
    assert first["prompt"] == "\n\nHuman: question 0?\n\nAssistant: Sure.\n\nHuman: and then?\n\nAssistant:"
    assert first["chosen"] == " answer 0." and first["rejected"] == " bad answer 0."


def test_hh_warning_names_count_and_rows(tmp_path, capsys):
    rows = [hh_row(f"q{i}?", " a", " b") for i in range(199)]
    rows.insert(4, hh_row("q?", "", " b"))
    load_pairs(file_cfg(write_jsonl(tmp_path / "hh.jsonl", rows)), "train")
    out = capsys.readouterr().out
    assert "1 of 200 rows" in out and "rows 5)" in out


def test_hh_too_many_blemishes_is_an_error(tmp_path):
    rows = [hh_row(f"q{i}?", " a", " b") for i in range(100)] + [hh_row("q?", " ", " b")] * 6
    with pytest.raises(UserError, match="6 of 106 rows.*more than 1%"):
        load_pairs(file_cfg(write_jsonl(tmp_path / "hh.jsonl", rows)), "train")


def test_hh_one_blemish_in_a_small_slice_is_only_a_warning_printed_once(tmp_path, capsys):
    """Rows 1–96 of real HH harmless-base test hold one row with an empty response (row 87): 1% of a sample is
    a single row, so the threshold is > 1% *and* more than a handful (5) rows."""
    rows = [hh_row(f"q{i}?", " a", " b") for i in range(95)]
    rows.insert(86, hh_row("q?", " ", " b"))
    cfg = file_cfg(write_jsonl(tmp_path / "hh.jsonl", rows), eval_size=8)
    assert len(load_pairs(cfg, "train")) == 95 - 8 and len(load_pairs(cfg, "eval")) == 8
    out = capsys.readouterr().out
    assert out.count("warning: ") == 1 and "1 of 96 rows" in out and "(rows 87)" in out


def test_split_hh_uses_last_assistant_marker():
    prompt, response = split_hh("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: see you")
    assert prompt.endswith("bye\n\nAssistant:") and response == " see you"


def test_local_jsonl_and_held_out_rows(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(10)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    train, held_out = load_pairs(file_cfg(path, eval_size=3), "train"), load_pairs(file_cfg(path, eval_size=3), "eval")
    assert [r["prompt"] for r in train] == [f"p{i}" for i in range(7)]
    assert [r["prompt"] for r in held_out] == ["p7", "p8", "p9"]
    assert load_sft(file_cfg(path, eval_size=3), "train")[0] == {"prompt": "p0", "response": "c0"}
    # eval_size 0: every row trains, none is held out
    assert len(load_pairs(file_cfg(path, eval_size=0), "train")) == 10 and load_pairs(file_cfg(path, eval_size=0), "eval") == []


def test_local_json_and_parquet(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(5)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.json", "d.parquet"):
        assert load_pairs(file_cfg(tmp_path / name, eval_size=1), "train") == rows[:4]


def test_chat_format_rows_use_the_chat_template(tmp_path):
    tok = build_tokenizer()
    rows = [{"prompt": [{"role": "user", "content": "sort 21"}], "chosen": [{"role": "assistant", "content": "12"}],
             "rejected": "21"}] * 3
    pairs = load_pairs(file_cfg(write_jsonl(tmp_path / "chat.jsonl", rows), eval_size=1), "train", tok)
    # the generation prompt ends in "assistant: ", so a response is the assistant's text and the turn's end
    assert pairs[0] == {"prompt": "user: sort 21\nassistant: ", "chosen": "12\n", "rejected": "21\n"}


def test_hh_messages_parses_turns():
    text = "\n\nHuman: hi \n\nAssistant: hello\n\nthere\n\nHuman: bye\n\nAssistant:"
    assert hh_messages(text) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello\n\nthere"},
                                 {"role": "user", "content": "bye"}, {"role": "assistant", "content": ""}]
    assert hh_messages("Human: hi\n\nAssistant: yo")[0] == {"role": "user", "content": "hi"}  # no leading blank line
    assert hh_messages("preamble\n\nHuman: hi") is None


def test_chat_template_switch_for_hh_dialogues(tmp_path):
    """auto: the template when the tokenizer has one; off: the raw text; on: an error without a template."""
    tok, no_template = build_tokenizer(), build_tokenizer()
    no_template.chat_template = None
    path = write_jsonl(tmp_path / "hh.jsonl", [hh_row(f"q{i}?", " yes", " no") for i in range(4)])
    raw = {"prompt": "\n\nHuman: q0?\n\nAssistant: Sure.\n\nHuman: and then?\n\nAssistant:", "chosen": " yes", "rejected": " no"}
    chat = {"prompt": "user: q0?\nassistant: Sure.\nuser: and then?\nassistant: ", "chosen": "yes\n", "rejected": "no\n"}
    assert load_pairs(file_cfg(path), "train", tok)[0] == chat
    assert load_pairs(file_cfg(path, chat_template="on"), "train", tok)[0] == chat
    assert load_pairs(file_cfg(path, chat_template="off"), "train", tok)[0] == raw
    assert load_pairs(file_cfg(path), "train", no_template)[0] == raw
    assert load_pairs(file_cfg(path), "train")[0] == raw  # no tokenizer
    with pytest.raises(UserError, match="data.chat_template is 'on' but the tokenizer has no chat template"):
        load_pairs(file_cfg(path, chat_template="on"), "train", no_template)


def test_dialogues_the_template_refuses_are_skipped_and_counted(tmp_path, capsys):
    tok = build_tokenizer()  # a template that, like Llama-2's, insists on alternating roles
    tok.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                         "{{ raise_exception('roles must alternate') }}{% endif %}{{ m['content'] }}\n{% endfor %}")
    rows = [hh_row(f"q{i}?", " yes", " no") for i in range(199)]
    rows.insert(3, {"chosen": "\n\nHuman: a\n\nHuman: b\n\nAssistant: yes", "rejected": "\n\nHuman: a\n\nHuman: b\n\nAssistant: no"})
    pairs = load_pairs(file_cfg(write_jsonl(tmp_path / "hh.jsonl", rows)), "train", tok)
    assert len(pairs) == 199 - 2 and "1 of 200 rows" in capsys.readouterr().out


def test_sort_source_sizes():
    cfg = DataArgs(dataset="sort", num_train=40, eval_size=12, num_sft=30)
    assert len(load_pairs(cfg, "train")) == 40 and len(load_pairs(cfg, "eval")) == 12
    assert len(load_sft(cfg, "train")) == 30


# ---- tokenization -----------------------------------------------------------------------------------------
def test_prompt_tokens_are_masked_and_eos_appended():
    tok = build_tokenizer()
    (p, r), = tokenize(tok, ["sort 31: "], ["13"], max_length=64, max_prompt_length=32)
    assert r[-1] == tok.eos_token_id and tok.decode(r[:-1]) == "13"
    batch = collate([(p, r), (p[:3], r)], pad_id=tok.pad_token_id)
    labels, ids = batch["labels"], batch["input_ids"]
    assert (labels[0, : len(p)] == -100).all()  # prompt
    assert labels[0, len(p) : len(p) + len(r)].tolist() == r  # response
    assert (labels[1, 3 + len(r) :] == -100).all() and (ids[1, 3 + len(r) :] == tok.pad_token_id).all()  # padding
    assert batch["attention_mask"][1].sum() == 3 + len(r) and batch["prompt_lens"].tolist() == [len(p), 3]
    assert ids.shape[1] == len(p) + len(r)  # padded to the longest row, not to max_length


def test_truncation_keeps_the_end_of_the_prompt_then_cuts_responses():
    tok = build_tokenizer()
    (p, r), = tokenize(tok, ["abcdefghij"], ["0123456789"], max_length=12, max_prompt_length=4)
    assert tok.decode(p) == "ghij"  # last max_prompt_length tokens
    assert tok.decode(r) == "01234567" and len(p) + len(r) == 12  # response keeps its start


def with_bos(tok):
    """The character tokenizer, made to put <bos> before every text the way Llama's tokenizer does."""
    from tokenizers import processors

    tok.add_special_tokens({"bos_token": "<bos>"})
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)])
    return tok


def test_bos_where_the_tokenizer_adds_one_and_only_once():
    tok = with_bos(build_tokenizer())
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert special_prefix(tok) == [bos] and special_prefix(build_tokenizer()) == []
    (p, r), = tokenize(tok, ["ab: "], ["cd"], max_length=16, max_prompt_length=8)
    assert p + r == tok("ab: cd")["input_ids"] + [eos] and p[0] == bos  # what the tokenizer gives for the whole text
    (p, r), = tokenize(tok, ["<bos>ab: "], ["cd"], max_length=16, max_prompt_length=8)  # a template that writes BOS
    assert p.count(bos) == 1 and p[0] == bos
    (p, r), = tokenize(tok, ["abcdefghij"], ["xy"], max_length=8, max_prompt_length=4)
    assert p[0] == bos and tok.decode(p[1:]) == "hij" and len(p) == 4  # truncated prompts keep their BOS
    (p, r), = tokenize(build_tokenizer(), ["p"], ["x<eos>\n"], max_length=16, max_prompt_length=8)
    assert r.count(build_tokenizer().eos_token_id) == 1  # a response that already contains EOS gets no second one


def test_pairs_are_concatenated_chosen_first():
    tok = build_tokenizer()
    pairs = tokenize_pairs(tok, [{"prompt": "x", "chosen": "aa", "rejected": "b"}], 16, 8)
    batch = collate_pairs(pairs, tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 2
    assert tok.decode(batch["input_ids"][0, :3]) == "xaa" and tok.decode(batch["input_ids"][1, :2]) == "xb"


# ---- bad input: one readable message naming file, row and field ----------------------------------------------
@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "p", "rejected": "r"}, "row 2: field 'chosen' is missing"),
        ({"prompt": "p", "chosen": 3, "rejected": "r"}, "row 2: field 'chosen' must be a string, got int"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}, row, {"prompt": "p", "chosen": "c", "rejected": "r"}])
    with pytest.raises(UserError, match=f"bad.jsonl {message}"):
        load_pairs(file_cfg(path, eval_size=1), "train")


def test_empty_responses_are_skipped_and_counted_like_hh_blemishes(tmp_path, capsys):
    """Real UltraFeedback has them (2 rows in 1,000): skipped with a warning naming the rows; too many stop the run."""
    good = {"prompt": "p", "chosen": "c", "rejected": "r"}
    path = write_jsonl(tmp_path / "empty.jsonl", [good, {"prompt": "p", "chosen": "c", "rejected": "  "}, good])
    assert load_pairs(file_cfg(path, eval_size=0), "train") == [good, good]
    assert "empty.jsonl: 1 of 3 rows have an empty response (rows 2); skipped" in capsys.readouterr().out
    path = write_jsonl(tmp_path / "empties.jsonl", [good] * 10 + [{"prompt": "p", "chosen": "", "rejected": "r"}] * 6)
    with pytest.raises(UserError, match="empties.jsonl: 6 of 16 rows have an empty response .*more than 1%"):
        load_pairs(file_cfg(path, eval_size=0), "train")


def test_missing_data_file():
    with pytest.raises(UserError, match="data file 'no/such.jsonl' does not exist"):
        load_pairs(file_cfg("no/such.jsonl"), "train")


def test_missing_model_path(tmp_path):
    with pytest.raises(UserError, match="model.name_or_path: '.*nothing' does not exist"):
        load_model(str(tmp_path / "nothing"))


def test_hub_unreachable_gives_one_clear_message(tmp_path, tiny_model):
    """HF_HUB_OFFLINE makes the Hub unreachable at once (without it, the same happens after retries)."""
    offline, out = {"HF_HUB_OFFLINE": "1"}, tmp_path / "out"
    result = run_script("sft.py", "--model.name_or_path", "some-org/some-model", "--data.dataset", "hh",
                        "--train.output_dir", out, check=False, env=offline)
    assert result.returncode == 2 and "could not load the tokenizer 'some-org/some-model' from the Hugging Face Hub" in result.stderr
    result = run_script("betadpo.py", "--model.name_or_path", tiny_model, "--data.dataset", "hh",
                        "--train.output_dir", out, check=False, env=offline)
    assert result.returncode == 2 and "error: could not load Anthropic/hh-rlhf" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


@pytest.mark.parametrize("script", ["sft.py", "betadpo.py"])
def test_scripts_stop_before_writing_anything(tmp_path, tiny_model, script, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}] * 3 + [{"prompt": "p", "chosen": "c"}])
    out = tmp_path / "out"
    code, _, stderr = run_main(script, "--model.name_or_path", tiny_model, "--data.dataset", bad, "--data.eval_size", 1,
                            "--train.output_dir", out, "--train.batch_size", 2, capsys=capsys)  # in this process
    assert code == 2
    assert stderr.strip().splitlines()[-1] == f"error: {bad} row 4: field 'rejected' is missing"
    assert "Traceback" not in stderr and not out.exists()
    code, _, stderr = run_main(script, "--model.name_or_path", tmp_path / "no_model", "--train.output_dir", out, capsys=capsys)
    assert code == 2 and "does not exist" in stderr and not out.exists()
