"""The tokenized data cache (plumbing/token_cache.py, data.tokenized_data): the cached arrays hold exactly the ids
of the list path; every key invalidates; a damaged or partial entry is rebuilt; two processes filling it at once
both get the data; a cache that cannot be written stops with one line; a run resumes exactly from cached data."""

import errno
import json
import multiprocessing
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import read_jsonl, run_here
from plumbing import data, sort_task, token_cache
from plumbing.config import DataArgs
from plumbing.errors import UserError
from plumbing.scoring import token_hash

ROWS = [{"prompt": f"sort {n}: ", "chosen": "".join(sorted(str(n))), "rejected": "9" + str(n)} for n in range(31, 31 + 40 * 97, 97)]


def write_rows(path: Path, rows=ROWS) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def data_cfg(tmp_path, **changes) -> DataArgs:
    D = DataArgs(dataset=str(tmp_path / "pairs.jsonl"), eval_size=4, max_length=20, max_prompt_length=12,
                 cache_dir=str(tmp_path / "cache"))
    for k, v in changes.items():
        setattr(D, k, v)
    return D


def by_lists(D, tok):
    """The ids as the list path computes them (load_pairs, then tokenize_pairs), independently of the cache."""
    return [data.tokenize_pairs(tok, data.load_pairs(D, split, tok), D.max_length, D.max_prompt_length) for split in ("train", "eval")]


def entries(D) -> list[Path]:
    return sorted(p for p in Path(D.cache_dir).iterdir() if not p.name.startswith("."))


def test_cached_ids_equal_the_lists_and_a_second_load_reads_them(tmp_path, capsys):
    tok = sort_task.build_tokenizer()
    write_rows(tmp_path / "pairs.jsonl")
    D = data_cfg(tmp_path)
    train, held_out = data.training_pairs(D, tok)
    first = capsys.readouterr().out
    want_train, want_eval = by_lists(D, tok)
    assert list(train) == want_train and list(held_out) == want_eval and len(train) == 36
    # inputs.json's and the reference cache's key: the arrays hash to the lists' hash (a resume keeps its inputs)
    assert token_hash(train) == token_hash(want_train) and token_hash(held_out) == token_hash(want_eval)
    assert token_hash(token_cache.TokenizedRows(train.store, train.index)) == token_hash(want_train)  # recomputed
    assert token_hash(train[3:7]) == token_hash(want_train[3:7])
    (entry,) = entries(D)
    stamp = (entry / "meta.json").stat().st_mtime_ns
    again, _ = data.training_pairs(D, tok)
    assert list(again) == want_train and capsys.readouterr().out == first  # the same summary line, from the cache
    assert isinstance(again.store.ids, __import__("numpy").memmap) and (entry / "meta.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("change", ["file content", "chat template", "vocabulary", "max_length", "max_prompt_length",
                                    "columns", "chat_template option", "eval_size"])
def test_every_key_invalidates(tmp_path, change):
    tok = sort_task.build_tokenizer()
    path = write_rows(tmp_path / "pairs.jsonl")
    D = data_cfg(tmp_path)
    data.training_pairs(D, tok)
    if change == "file content":  # same size, same modification time: only the content tells
        stat = path.stat()
        write_rows(path, [{**ROWS[0], "chosen": ROWS[0]["chosen"][::-1]}] + ROWS[1:])
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert path.stat().st_size == stat.st_size
    elif change == "chat template":
        tok.chat_template = tok.chat_template.replace("\n{% endfor %}", "\n\n{% endfor %}")  # a blank line after each turn
    elif change == "vocabulary":
        tok.add_tokens(["12"])
    elif change == "columns":
        write_rows(path, [{"question": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in ROWS])
        data.training_pairs(D := data_cfg(tmp_path, columns="prompt=question"), tok)  # (its own first entry)
        D = data_cfg(tmp_path, columns="prompt=question,chosen=rejected,rejected=chosen")
    else:
        field = {"chat_template option": "chat_template"}.get(change, change)
        D = data_cfg(tmp_path, **{field: {"max_length": 18, "max_prompt_length": 10, "chat_template": "off", "eval_size": 6}[field]})
    before = len(entries(D))
    train, held_out = data.training_pairs(D, tok)
    assert len(entries(D)) == before + 1  # a new entry, never the old one
    assert [list(train), list(held_out)] == by_lists(D, tok)


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "no meta.json"])
def test_a_damaged_or_partial_entry_is_rebuilt(tmp_path, capfd, damage):
    tok = sort_task.build_tokenizer()
    write_rows(tmp_path / "pairs.jsonl")
    D = data_cfg(tmp_path)
    data.training_pairs(D, tok)
    (entry,) = entries(D)
    ids = entry / "store0.ids.i32"
    if damage == "flipped byte":
        raw = bytearray(ids.read_bytes())
        raw[5] ^= 0x01  # the same size: only the hash tells
        ids.write_bytes(bytes(raw))
    elif damage == "truncated":
        ids.write_bytes(ids.read_bytes()[:-4])
    else:
        (entry / "meta.json").unlink()  # as a build killed before its last file (it renames first, so never seen)
    capfd.readouterr()
    train, held_out = data.training_pairs(D, tok)
    assert [list(train), list(held_out)] == by_lists(D, tok)
    assert f"the tokenized data cache {entry} is damaged" in capfd.readouterr().err
    assert token_cache.check(entry) is None and len(entries(D)) == 1


def _fill(D, tok, start, results):
    start.wait()  # both processes build at the same moment
    train, held_out = data.training_pairs(D, tok)
    results.put((token_hash(train), token_hash(held_out)))


def test_two_processes_filling_the_cache_at_once_both_get_the_data(tmp_path):
    tok = sort_task.build_tokenizer()
    write_rows(tmp_path / "pairs.jsonl")
    D = data_cfg(tmp_path)
    fork = multiprocessing.get_context("fork")
    start, results = fork.Barrier(2), fork.Queue()
    workers = [fork.Process(target=_fill, args=(D, tok, start, results)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0, 0]
    want = tuple(token_hash(ids) for ids in by_lists(D, tok))
    assert [results.get(timeout=5) for _ in workers] == [want, want]
    assert len(entries(D)) == 1 and not [p for p in Path(D.cache_dir).iterdir() if p.name.startswith(".")]  # nothing left over
    assert token_cache.check(entries(D)[0]) is None


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC])
def test_a_cache_that_cannot_be_written_stops_with_one_line(tmp_path, monkeypatch, code):
    tok = sort_task.build_tokenizer()
    write_rows(tmp_path / "pairs.jsonl")
    D = data_cfg(tmp_path)

    def refuse(self, *args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(token_cache.StoreWriter, "append", refuse)
    with pytest.raises(UserError) as caught:
        data.training_pairs(D, tok)
    line = str(caught.value)
    assert "\n" not in line and os.strerror(code).lower() in line and "data.cache_dir" in line and "tokenized data cache" in line
    assert not list(Path(D.cache_dir).iterdir())  # the partial entry is gone
    monkeypatch.undo()
    assert [list(x) for x in data.training_pairs(data_cfg(tmp_path, cache_dir="off"), tok)] == by_lists(D, tok)


def test_a_run_resumes_exactly_from_cached_data(tmp_path, tiny_model):
    """betadpo.py on a file: 4 steps at once, against 2 steps then a resume to 4 that reads the cache the first
    launch wrote (not rebuilt); inputs.json pins the lists' token hash. Each run is betadpo.py in this process
    (conftest.run_here): the cache is read from disk either way (its entry's meta.json is not rewritten)."""
    path = write_rows(tmp_path / "pairs.jsonl", ROWS * 2)
    cache = tmp_path / "cache"
    args = ["--model.name_or_path", tiny_model, "--data.dataset", path, "--data.eval_size", 8, "--data.max_length", 24,
            "--data.max_prompt_length", 12, "--data.cache_dir", cache, "--train.batch_size", 8, "--train.lr", 1e-2,
            "--train.warmup_steps", 1, "--train.save_every", 2, "--train.eval_every", 0, "--loss.alpha", 0.6]
    run_here("betadpo.py", *args, "--train.output_dir", tmp_path / "full", "--train.max_steps", 4)
    (entry,) = [p for p in cache.iterdir()]
    stamp = (entry / "meta.json").stat().st_mtime_ns
    run_here("betadpo.py", *args, "--train.output_dir", tmp_path / "resumed", "--train.max_steps", 2)
    resumed = run_here("betadpo.py", *args, "--train.output_dir", tmp_path / "resumed", "--train.max_steps", 4)
    assert "resumed from" in resumed.stdout and (entry / "meta.json").stat().st_mtime_ns == stamp
    def logged(run):  # every training step's metrics but the timings (the 2-step launch also evaluated at its end)
        rows = read_jsonl(run / "metrics.jsonl")
        return [{k: v for k, v in row.items() if not k.endswith("_per_s")} for row in rows if "split" not in row]

    full, again = logged(tmp_path / "full"), logged(tmp_path / "resumed")
    assert [row["step"] for row in full] == [1, 2, 3, 4] and [row.keys() for row in again] == [row.keys() for row in full]
    assert [row == pytest.approx(want, rel=1e-6) for row, want in zip(again, full)] == [True] * len(full)
    weights = [load_file(tmp_path / run / "final" / "model.safetensors") for run in ("full", "resumed")]
    assert all(torch.allclose(weights[0][k], weights[1][k], rtol=1e-6, atol=1e-7) for k in weights[0])
    tok = sort_task.build_tokenizer()
    D = DataArgs(dataset=str(path), eval_size=8, max_length=24, max_prompt_length=12)
    inputs = json.loads((tmp_path / "resumed" / "inputs.json").read_text())
    assert inputs["train data"]["sha256"] == token_hash(by_lists(D, tok)[0])


def test_bad_data_stops_as_before_and_leaves_no_partial_entry(tmp_path):
    tok = sort_task.build_tokenizer()
    write_rows(tmp_path / "pairs.jsonl", ROWS[:5] + [{"prompt": "sort 3: ", "chosen": 3, "rejected": "3"}] + ROWS[5:])
    with pytest.raises(UserError, match=r"pairs.jsonl row 6: field 'chosen'"):
        data.training_pairs(data_cfg(tmp_path), tok)
    assert list((tmp_path / "cache").iterdir()) == []
