"""The real-data study: its committed data (SHA-256, the fixed split), the split model (top blocks on cached
lower-block states) against the whole model, the endpoint's frontier envelope by hand, and a smoke run of
`experiments/run.py real` on a handful of real rows with a tiny model (tables = report(CSV))."""

import hashlib
import json
import math
import shutil
import sys

import pytest
import torch

from conftest import ROOT, save_tiny_model

sys.path.insert(0, str(ROOT / "experiments"))
import real  # noqa: E402
import real_data  # noqa: E402
import real_report  # noqa: E402
import run as experiments  # noqa: E402
from test_experiments import run_in_process  # noqa: E402


# ---- data ------------------------------------------------------------------------------------------------------
def test_a_changed_data_file_is_refused(tmp_path):
    for name, (file, _) in real_data.FILES.items():
        shutil.copy(real_data.DATA / file, tmp_path / file)
    assert len(real_data.read_checked("uf", tmp_path)) == 1000
    raw = bytearray((tmp_path / real_data.FILES["uf"][0]).read_bytes())
    raw[-9] ^= 1  # one bit of the gzip trailer
    (tmp_path / real_data.FILES["uf"][0]).write_bytes(bytes(raw))
    with pytest.raises(real_data.DataChanged, match="SHA-256"):
        real_data.read_checked("uf", tmp_path)
    (tmp_path / real_data.FILES["hh"][0]).unlink()
    with pytest.raises(real_data.DataChanged, match="missing"):
        real_data.read_checked("hh", tmp_path)


@pytest.mark.parametrize("name, skipped, fingerprint", [
    ("hh", [87, 517, 926, 1104, 1255, 1689, 1951, 1953, 2037], "350c7cfa55e1c1bdc44c352ea097e0cbb2a7dcf03d9dac68a1c25fbb7ba8e7b2"),
    ("uf", [307, 656, 911, 998], "ba3f43dbdf3d74a06450aa2948cb562c9629d77b26f50a90925db491a4e20a21"),
])
def test_the_split_is_fixed_disjoint_and_as_documented(name, skipped, fingerprint):
    """The rows skipped are the ones experiments/data/README.md lists; train and held-out share no prompt; the
    split's row numbers are pinned (a change to the split would change every result)."""
    d = real_data.prepare(name)
    assert d["skipped"] == skipped and (len(d["train"]), len(d["heldout"])) == real_data.SPLIT[name]
    prompts = {r["prompt"][0]["content"] for r in d["train"]}
    assert not any(r["prompt"][0]["content"] in prompts for r in d["heldout"])
    rows = json.dumps([[r["source_row"] for r in d["train"]], [r["source_row"] for r in d["heldout"]]])
    assert hashlib.sha256(rows.encode()).hexdigest() == fingerprint
    raw = real_data.read_checked(name)
    first = d["train"][0]
    source = raw[first["source_row"] - 1]
    if name == "uf":
        assert (first["chosen"], first["score_chosen"]) == (source["chosen"], source["metadata"]["score_chosen"])
    else:  # the last human turn and the last assistant turns of the dialogue
        assert source["chosen"].endswith(first["chosen"]) and f"Human: {first['prompt'][0]['content']}" in source["chosen"]
    readme = (real_data.DATA / "README.md").read_text()
    assert all(sha in readme for _, sha in real_data.FILES.values()) and ", ".join(map(str, skipped)) in readme


# ---- the split model -------------------------------------------------------------------------------------------
def test_split_model_scores_like_the_whole_model(tmp_path):
    """Top block on the cached output of the block below = the whole 2-block model: log-probs padded and packed,
    after a save/reload; a sequence not in the cache stops with a UserError."""
    import betadpo
    import lower_cache
    from plumbing.data import collate_pairs
    from plumbing.errors import UserError
    from plumbing.models import load_model, load_tokenizer

    path = save_tiny_model(tmp_path / "tiny", hidden=32, layers=2)
    tok, full = load_tokenizer(str(path)), load_model(str(path)).eval()
    g = torch.Generator().manual_seed(0)
    pairs = [([3 + i], torch.randint(3, 90, (5 + i,), generator=g).tolist(), torch.randint(3, 90, (2 + 2 * i,), generator=g).tolist())
             for i in range(4)]
    lower_cache.make_split(full, tok, [p + y for p, c, r in pairs for y in (c, r)], 1, tmp_path / "split")
    top = load_model(str(tmp_path / "split"), trust_remote_code=True)  # as betadpo.py loads it (real.py's flag)
    assert type(top).__name__ == lower_cache.CLASS and type(top) is not lower_cache.LowerCachedLlama  # the directory's copy
    assert top.config.num_hidden_layers == 1 and not top.get_input_embeddings().weight.requires_grad
    batch = collate_pairs(pairs, tok.pad_token_id)
    with torch.no_grad():
        expected = betadpo.sequence_logps(full, batch, "plain")["sum"]
        for logps in ("plain", "fused"):  # padded, and packed (the fused head)
            assert betadpo.sequence_logps(top, batch, logps)["sum"] == pytest.approx(expected.tolist(), abs=1e-5)
    top.save_pretrained(tmp_path / "again")
    again = load_model(str(tmp_path / "again"), trust_remote_code=True)
    with torch.no_grad():
        assert betadpo.sequence_logps(again, batch, "fused")["sum"] == pytest.approx(expected.tolist(), abs=1e-5)
    with pytest.raises(UserError, match="not in the cached"):
        top(input_ids=torch.tensor([[5, 6, 7]]))
    # experiments/real.py's held-out scoring: the same sums; KL(π‖π) = 0; the reference's sums cached per data set
    # give the same numbers; against another policy, the KL by hand (full log-softmax at the response positions).
    pad = tok.pad_token_id
    scored = real.score_heldout(top, top, pairs, pad, kl_pairs=len(pairs), batch_size=3)
    assert [s["policy_chosen"] for s in scored] == pytest.approx(expected[:4].tolist(), abs=1e-5)
    assert all(s["kl_chosen"] == 0 and s["kl_rejected"] == 0 for s in scored)
    cached = real.score_heldout(top, top, pairs, pad, kl_pairs=2, ref_sums=real.reference_sums(top, pairs, pad), batch_size=2)
    assert [s[k] for s in cached for k in ("ref_chosen", "ref_rejected")] == pytest.approx([s[k] for s in scored for k in ("ref_chosen", "ref_rejected")])
    assert ["kl_chosen" in s for s in cached] == [True, True, False, False]
    other = load_model(str(save_tiny_model(tmp_path / "other", seed=1, hidden=32, layers=2))).eval()
    scored = real.score_heldout(other, top, pairs, pad, kl_pairs=len(pairs))
    with torch.no_grad():
        lp, lq = (m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].log_softmax(-1) for m in (other, full))
    response = batch["labels"][:, 1:] != -100
    by_hand = ((lp.exp() * (lp - lq)).sum(-1) * response).sum(-1)  # (2B,)
    assert [s["kl_chosen"] for s in scored] + [s["kl_rejected"] for s in scored] == pytest.approx(by_hand.tolist(), rel=1e-4)
    assert min(by_hand.tolist()) > 0


# ---- the endpoint -----------------------------------------------------------------------------------------------
def rows_for(points: dict) -> list[dict]:
    """{variant: [(kl, accuracy) per seed]} → CSV-like rows."""
    return [{"dataset": "hh", "variant": v, "seed": s, "kl": kl, "accuracy": acc} for v, runs in points.items()
            for s, (kl, acc) in enumerate(runs)]


def test_the_frontier_is_the_best_dpo_at_or_below_the_kl():
    points = [(0.1, 0.55), (0.5, 0.60), (1.0, 0.58), (2.0, 0.62)]
    assert math.isnan(real_report.envelope(points, 0.05))
    assert [real_report.envelope(points, k) for k in (0.1, 0.7, 1.5, 9.0)] == [0.55, 0.60, 0.60, 0.62]
    # Seeds identical across runs: every bootstrap draw gives the same Δ, CI = the point.
    rows = rows_for({"DPO β₀ 1": [(0.1, 0.55)] * 3, "DPO β₀ 0.1": [(0.5, 0.60)] * 3, "β-DPO": [(0.7, 0.65)] * 3})
    e = real_report.endpoint(rows, "hh", "β-DPO")
    assert e["delta"] == pytest.approx(0.05) and e["lo"] == pytest.approx(0.05) and e["hi"] == pytest.approx(0.05)
    assert real_report.verdict(e) == "better"
    # The frontier is recomputed from the resampled seeds: by hand, seed means of DPO β₀ 0.1 are 0.58 (KL 0.5).
    rows = rows_for({"DPO β₀ 1": [(0.1, 0.55)] * 3, "DPO β₀ 0.1": [(0.5, 0.56), (0.5, 0.58), (0.5, 0.60)], "β-DPO": [(0.7, 0.59)] * 3})
    e = real_report.endpoint(rows, "hh", "β-DPO")
    assert e["delta"] == pytest.approx(0.01) and e["lo"] < 0.01 < e["hi"] and e["lo"] >= -0.01 - 1e-12 and e["hi"] <= 0.03 + 1e-12
    assert real_report.verdict({"lo": -0.01, "hi": 0.015}) == "equivalent"
    assert real_report.verdict({"lo": -0.03, "hi": 0.015}) == "inconclusive"
    below = real_report.endpoint(rows_for({"DPO β₀ 1": [(0.1, 0.55)] * 3, "β-DPO": [(0.05, 0.6)] * 3}), "hh", "β-DPO")
    assert math.isnan(below["lo"]) and real_report.verdict(below).startswith("undefined")


def test_heldout_numbers_by_hand():
    scored = [{"policy_chosen": -1, "ref_chosen": -2, "policy_rejected": -3, "ref_rejected": -3, "len_chosen": 10, "len_rejected": 2,
               "kl_chosen": 0.2, "kl_rejected": 0.4},  # right, chosen longer
              {"policy_chosen": -5, "ref_chosen": -4, "policy_rejected": -3, "ref_rejected": -3, "len_chosen": 3, "len_rejected": 3},  # wrong, similar
              {"policy_chosen": -1, "ref_chosen": -1, "policy_rejected": -1, "ref_rejected": -1, "len_chosen": 1, "len_rejected": 9}]  # tie: wrong, shorter
    n = real_report.heldout_numbers(scored, [{}, {}, {}])
    assert n["accuracy"] == pytest.approx(1 / 3) and n["length_baseline"] == pytest.approx(1 / 3)
    assert (n["acc_longer"], n["acc_similar"], n["acc_shorter"], n["balanced_accuracy"]) == (1.0, 0.0, 0.0, pytest.approx(1 / 3))
    assert n["kl"] == pytest.approx(0.3) and n["reward_margin"] == pytest.approx((1 - 1 + 0) / 3)
    # UF: a tie in score is left out of the accuracy
    uf = real_report.heldout_numbers(scored, [{"score_chosen": 8, "score_rejected": 7}, {"score_chosen": 7, "score_rejected": 7}, {"score_chosen": 9, "score_rejected": 2}])
    assert uf["pairs"] == 2 and uf["accuracy"] == 0.5


# ---- the pipeline ---------------------------------------------------------------------------------------------------
def test_real_smoke(tmp_path, capsys, monkeypatch):
    """`run.py real --smoke` on 8 + 8 real rows of each data set, a tiny model: split models, betadpo.py runs,
    held-out scoring, the kept-pair log, the CSV; tables.md is exactly report(CSV). run.py's main and its
    betadpo.py runs run in this process (test_experiments.run_in_process)."""
    model = save_tiny_model(tmp_path / "tiny", hidden=32, layers=2)
    stdout = run_in_process(["real", "--smoke", "--out", str(tmp_path / "out"), "--real_model", str(model),
                             "--real_top_layers", "1"], capsys, monkeypatch)
    assert "[3/3] uf β-DPO seed 0" in stdout
    out = tmp_path / "out" / "real"
    rows = experiments.read_csv(out / "runs.csv")
    assert [(r["dataset"], r["variant"]) for r in rows] == [("hh", "DPO β₀ 0.1"), ("hh", "β-DPO"), ("uf", "β-DPO")]
    assert (out / "tables.md").read_text() == real_report.report(rows)
    assert all(r["pairs"] == 8 for r in rows if r["dataset"] == "hh") and not math.isnan(rows[2]["kept_gap_corr"])
    run = real.run_dir(out, "uf", real.BETA_DPO, 0)
    kept = [json.loads(line) for line in (run / "kept.jsonl").read_text().splitlines()]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [sum(k["kept"]) for k in kept] == [m["kept"] for m in metrics] == [3, 3]  # ⌊4 · 0.8⌋ of each batch of 4
    scored = [json.loads(line) for line in (run / "heldout.jsonl").read_text().splitlines()]
    assert len(scored) == 8 and all(s["kl_chosen"] > -1e-6 for s in scored[: real.SMOKE["kl_pairs"]])  # ≥ 0 up to rounding
    assert "kl_chosen" not in scored[real.SMOKE["kl_pairs"]]


# ---- the committed results -------------------------------------------------------------------------------------
def test_committed_real_tables_come_from_the_committed_csv():
    """docs/results/real/tables.md is exactly what `run.py report` makes of docs/results/real/runs.csv, and the CSV
    holds every (data set, variant, seed) of the plan that was run, each run from a named commit."""
    csv_path = ROOT / "docs" / "results" / "real" / "runs.csv"
    rows = experiments.read_csv(csv_path)
    assert real.is_real(rows) and real_report.report(rows) == (csv_path.parent / "tables.md").read_text()
    ran = {(r["dataset"], r["variant"], r["seed"]) for r in rows}
    planned = {(d, name, s) for d, variants, seeds in real.PLANS["primary"] for name in variants for s in seeds}
    assert planned <= ran <= {(d, name, s) for d, variants, seeds in real.PLANS["all"] for name in variants for s in seeds}
    assert all(isinstance(r["commit"], str) and len(r["commit"]) >= 7 for r in rows)
