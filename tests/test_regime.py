"""The regime study (experiments/regime.py, regime_report.py) and the optimizer switch it needs: SGD's step by hand,
the report's per-pair numbers, envelope and filter record by hand, a smoke run of `run.py regime` (tables =
report(CSV)), and the committed tables against the committed CSV."""

import json
import math
import sys

import pytest
import torch

from conftest import ROOT, run_here, save_tiny_model

sys.path.insert(0, str(ROOT / "experiments"))
import regime  # noqa: E402
import regime_report  # noqa: E402
import run as experiments  # noqa: E402
from test_experiments import run_in_process  # noqa: E402


def test_sgd_steps_by_the_gradient_alone():
    """train.optimizer sgd: θ ← θ − lr·g, whatever the gradient's scale (Adam's first step is ≈ lr·sign(g))."""
    from plumbing.config import SFTConfig, parse_config
    from plumbing.errors import UserError
    from plumbing.optim import make_optimizer

    cfg = parse_config(SFTConfig, ["--train.optimizer", "sgd", "--train.lr", "0.5"])
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = make_optimizer(cfg.train, [p], "cpu")
    p.grad = torch.tensor([1e-3, 4.0], dtype=torch.float64)
    opt.step()
    assert p.detach().tolist() == [1.0 - 0.5e-3, -4.0]
    with pytest.raises((UserError, SystemExit)):
        parse_config(SFTConfig, ["--train.optimizer", "sgdm"])


def test_point_numbers_and_bits_by_hand():
    scored = [{"policy_chosen": -2, "ref_chosen": -3, "policy_rejected": -5, "ref_rejected": -5, "len_chosen": 10, "len_rejected": 2,
               "kl_chosen": 0.2, "kl_rejected": 0.4},  # M = 1: right; per token 0.1 > 0: right
              {"policy_chosen": -5, "ref_chosen": -4, "policy_rejected": -4, "ref_rejected": -6, "len_chosen": 1, "len_rejected": 4},
              # M = −3: wrong; per token −1 < 0.5: wrong
              {"policy_chosen": -1, "ref_chosen": -3, "policy_rejected": -1, "ref_rejected": -4, "len_chosen": 2, "len_rejected": 6},
              # M = 2 − 3 = −1: wrong; per token 1 > 0.5: right
              {"policy_chosen": -1, "ref_chosen": -1, "policy_rejected": -1, "ref_rejected": -1, "len_chosen": 1, "len_rejected": 9}]  # tie
    n = regime_report.point_numbers(scored, beta0=0.5)
    assert (n["n"], n["acc"], n["nacc"]) == (4, 0.25, 0.5)
    assert n["margin"] == pytest.approx((1 - 3 - 1 + 0) / 4) and n["kl"] == pytest.approx(0.3)
    assert n["abs_bm"] == pytest.approx((0.5 * 1 + 0.5 * 1) / 2)  # |β₀M| = 0.5, 1.5, 0.5, 0 → median 0.5
    assert regime_report.unpack(n["bits_acc"], 4) == [True, False, False, False] and n["bits_acc"] == "8"
    bits = [bool(b) for b in (1, 0, 1, 1, 0, 0, 0, 1, 1)]
    assert regime_report.pack(bits) == "b18" and regime_report.unpack("b18", 9) == bits


def test_envelope_reads_each_path_at_the_kl_and_takes_the_best():
    a = [(0.1, 0.5), (0.3, 0.7)]  # KL 0.2 → 0.6
    b = [(0.15, 0.55), (0.25, 0.65), (0.5, 0.8)]  # KL 0.2 → 0.6 as well; 0.4 → 0.74
    assert regime_report.curve_at(a, 0.2) == pytest.approx(0.6) and math.isnan(regime_report.curve_at(a, 0.4))
    assert regime_report.envelope([a, b], 0.4) == pytest.approx(0.74)
    assert regime_report.envelope([a, [(0.1, 0.9), (0.3, 0.9)]], 0.2) == 0.9
    assert math.isnan(regime_report.envelope([a, b], 0.05))  # below every path: undefined, not extrapolated


def test_filter_record_and_wilson(tmp_path):
    (tmp_path / "kept.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "micro": 0, "pairs": [0, 1, 2, 3], "kept": [1, 0, 1, 0]},
        {"step": 2, "micro": 0, "pairs": [4, 5, 6, 7], "kept": [0, 0, 0, 0]},  # replaced by the resumed row below
        {"step": 2, "micro": 0, "pairs": [4, 5, 6, 7], "kept": [1, 1, 0, 1]}]))
    counts = regime_report.filter_record(tmp_path, flipped={1, 2, 6})
    assert counts == {"flip_dropped": 2, "flip_kept": 1, "clean_dropped": 1, "clean_kept": 4}
    lo, hi = regime_report.wilson(3, 10)  # the textbook value: [0.108, 0.603]
    assert (round(lo, 3), round(hi, 3)) == (0.108, 0.603)


def test_paired_differences_use_the_pairs_both_runs_scored():
    """An arm scored on 4 pairs against one scored on 8: accuracy compared on the first 4 of both."""
    a = {"arm": "a", "seed": 0, "step_1": 16, "n_1": 4, "bits_acc_1": regime_report.pack([1, 1, 0, 0]), "acc_1": 0.5, "kl_1": 1.0}
    b = {"arm": "b", "seed": 0, "step_1": 16, "n_1": 8, "bits_acc_1": regime_report.pack([1, 0, 0, 0, 1, 1, 1, 1]), "acc_1": 0.625,
         "kl_1": 3.0}
    assert regime_report.paired([a, b], "a", "b", "acc")[0] == pytest.approx(0.5 - 0.25)  # not 0.5 − 0.625
    assert regime_report.paired([a, b], "a", "b", "kl")[0] == -2.0


def test_flip_list_is_the_committed_one():
    """The positive control's flipped pairs: 30% of the 512 training pairs, the committed list (and its recipe)."""
    flips = regime.flip_list(512)
    assert flips == json.loads(regime.FLIPS.read_text())["flipped"] and len(set(flips)) == 154 and max(flips) < 512
    assert flips == sorted(__import__("random").Random("regime-flips-512").sample(range(512), 154))


def test_regime_smoke(tmp_path, capsys, monkeypatch):
    """`run.py regime --smoke`: 16 + 8 real HH rows, a tiny 3-block model: the split, the flipped file, betadpo.py runs
    with their path weights kept, scoring at each point, the CSV; tables.md is exactly report(CSV)."""
    model = save_tiny_model(tmp_path / "tiny", hidden=32, layers=3)
    stdout = run_in_process(["regime", "--smoke", "--out", str(tmp_path / "out"), "--real_model", str(model)], capsys, monkeypatch)
    out = tmp_path / "out" / "regime"
    rows = experiments.read_csv(out / "runs.csv")
    assert [(r["arm"], r["flip"], r["optimizer"]) for r in rows] == [("DPO β₀ 0.1", 0.0, "adamw"), ("flip: β-DPO", 0.3125, "adamw")]
    assert "[regime 2/2] flip: β-DPO seed 0" in stdout
    assert (out / "tables.md").read_text() == regime_report.report(rows)
    # path_pairs 4, then all 8 for the frontier's arm (ALL_PAIRS_ARMS), 4 again for the others
    assert [(r["step_1"], r["n_1"], r["step_2"], r["n_2"]) for r in rows] == [(2, 4, 4, 8), (2, 4, 4, 4)]
    flip = rows[1]
    assert flip["flip_dropped"] + flip["flip_kept"] + flip["clean_dropped"] + flip["clean_kept"] == 4 * 16  # 4 steps of 16
    assert flip["flip_dropped"] + flip["clean_dropped"] == 4 * 4  # ⌊16·0.8⌋ = 12 kept of each batch of 16
    assert flip["flip_dropped"] + flip["flip_kept"] == 4 * 5  # every step sees all 16 pairs, 5 of them flipped
    lines = (out / "hh" / "train_flipped.jsonl").read_text().splitlines()
    clean = (out / "hh" / "train.jsonl").read_text().splitlines()
    swapped = [i for i, (a, b) in enumerate(zip(lines, clean)) if a != b]
    assert swapped == regime.flip_list(16) and json.loads(lines[swapped[0]])["chosen"] == json.loads(clean[swapped[0]])["rejected"]


def launch_here(cmd: list[str], log, env: dict, path_dir):
    """regime.launch with betadpo.py run in this process (conftest.run_here; 1 thread): the same run without a new
    interpreter's seconds of imports. Its checkpoints are kept once, at the end: betadpo.py keeps the newest two,
    which at these 2 steps are all of them. (test_regime_smoke launches its runs as the study does; no test has a
    checkpoint deleted before regime.launch links it: the paths' 4 points did, and a point missing stops scoring.)"""
    _python, script, *flags = cmd
    result = run_here(script, *flags)
    log.write_text(result.stdout + result.stderr)
    regime.keep_path_weights(path_dir)


def test_regime_from_nothing_pilot_then_study(tmp_path, capsys, monkeypatch):
    """The study regenerated from nothing with docs/RESULTS.md's commands, at toy sizes (16 + 8 real HH rows, a
    tiny 3-block model, 2 steps): `run.py regime --regime_pilot` trains the gate's DPO runs, then β-DPO and DPO seeds
    at the setting that passes; `run.py regime` adopts the pilot's runs at its setting (hard links, CSV column
    `pilot`), scores the gate's runs again on every held-out pair, and trains nothing it already has; then
    `run.py regime --regime_paths` trains two of them again with more points kept, and ends where they did."""
    model = save_tiny_model(tmp_path / "tiny", hidden=32, layers=3)
    monkeypatch.setattr(regime, "SIZES", {"hh": (16, 8)})
    monkeypatch.setattr(regime, "KL_PAIRS", 4)
    monkeypatch.setattr(regime, "PATH_PAIRS", 4)
    monkeypatch.setattr(regime, "PILOT", [("lr 1e-3, 2 steps", 1e-3, 2, (2,))])
    monkeypatch.setattr(regime, "SETUP", {"lr": 1e-3, "steps": 2, "path": (2,), "path_pairs": 4, "pilot": "lr 1e-3, 2 steps"})
    monkeypatch.setattr(regime, "PLAN", [(["β-DPO", "DPO β₀ 0.1"], range(2)), (["DPO β₀ 0.03", "DPO β₀ 1"], range(1))])
    monkeypatch.setattr(regime, "launch", launch_here)  # 8 trainings: the launch is test_regime_smoke's to test
    real_gate = regime_report.gate
    monkeypatch.setattr(regime_report, "gate", lambda rows: {**real_gate(rows), "passes": True})  # a toy need not pass
    out = tmp_path / "out" / "regime"
    run_in_process(["regime", "--regime_pilot", "--out", str(tmp_path / "out"), "--real_model", str(model)], capsys, monkeypatch)
    pilot = experiments.read_csv(out / "pilot.csv")
    assert [(r["arm"], r["seed"], r["n_1"]) for r in pilot] == [("DPO β₀ 0.03", 0, 4), ("DPO β₀ 0.1", 0, 4), ("DPO β₀ 1", 0, 4),
                                                                ("β-DPO", 0, 8), ("β-DPO", 1, 8), ("DPO β₀ 0.1", 1, 8)]
    g = real_gate(pilot[:3])  # the gate's two numbers, from the runs they name
    assert g["ratio"] == pilot[0]["kl_1"] / pilot[2]["kl_1"] and g["abs_bm"] == pilot[1]["abs_bm_1"]
    assert (out / "pilot.md").read_text() == regime_report.report(pilot)

    stdout = run_in_process(["regime", "--out", str(tmp_path / "out"), "--real_model", str(model)], capsys, monkeypatch)
    rows = experiments.read_csv(out / "runs.csv")
    assert [(r["arm"], r["seed"], r["pilot"], r["n_1"]) for r in rows] == [
        ("β-DPO", 0, 1, 8), ("DPO β₀ 0.1", 0, 1, 8), ("β-DPO", 1, 1, 8), ("DPO β₀ 0.1", 1, 1, 8), ("DPO β₀ 0.03", 0, 1, 8),
        ("DPO β₀ 1", 0, 1, 8)]  # every run adopted; the gate's, scored on 4 pairs, now on all 8
    assert "[regime 6/6] DPO β₀ 1 seed 0" in stdout
    for r in rows:
        src, dst = regime.run_dir(out / "pilot" / "lr_1e-3_2_steps", r["arm"], r["seed"]), regime.run_dir(out, r["arm"], r["seed"])
        assert (dst / "final" / "model.safetensors").samefile(src / "final" / "model.safetensors")  # the same file
        before = next(p for p in pilot if (p["arm"], p["seed"]) == (r["arm"], r["seed"]))
        n = int(before["n_1"])  # the pilot's pairs are the first of the study's: the same outcomes on them
        assert regime_report.unpack(r["bits_acc_1"], n) == regime_report.unpack(before["bits_acc_1"], n)
        if n == 8:  # scored on every pair already: the same row
            assert r["acc_1"] == before["acc_1"] and r["kl_1"] == before["kl_1"]
    assert (out / "tables.md").read_text() == regime_report.report(rows)

    # `--regime_paths`: the same runs trained again in paths/, their weights kept and scored at every point
    monkeypatch.setattr(regime, "PATHS", {"setup": {"lr": 1e-3, "steps": 2, "path": (1, 2)}, "plan": [(["β-DPO", "DPO β₀ 0.03"], range(1))]})
    run_in_process(["regime", "--regime_paths", "--out", str(tmp_path / "out"), "--real_model", str(model)], capsys, monkeypatch)
    paths = experiments.read_csv(out / "paths.csv")
    assert [(r["arm"], r["step_1"], r["n_1"], r["step_2"], r["n_2"]) for r in paths] == [("β-DPO", 1, 4, 2, 4), ("DPO β₀ 0.03", 1, 4, 2, 4)]
    assert (out / "paths.md").read_text() == regime_report.report(paths)
    for r in paths:  # keeping more checkpoints changes nothing: the end is the study's run, on the pairs both scored
        study = next(q for q in rows if (q["arm"], q["seed"]) == (r["arm"], r["seed"]))
        assert r["kl_2"] == study["kl_1"] and regime_report.unpack(r["bits_acc_2"], 4) == regime_report.unpack(study["bits_acc_1"], 4)


def test_committed_regime_tables_come_from_the_committed_csv():
    """docs/results/regime/tables.md, first_run.md and pilot.md are exactly what `run.py report` makes of the
    committed CSVs; the study's CSV holds every (arm, seed) of the plan, each run from a named commit, and the
    first run's rows (before the extension) unchanged."""
    csv_path = ROOT / "docs" / "results" / "regime" / "runs.csv"
    rows = experiments.read_csv(csv_path)
    assert regime_report.report(rows) == (csv_path.parent / "tables.md").read_text()
    pilot, first = (experiments.read_csv(csv_path.parent / name) for name in ("pilot.csv", "first_run.csv"))
    assert regime_report.report(pilot) == (csv_path.parent / "pilot.md").read_text()
    assert regime_report.report(first) == (csv_path.parent / "first_run.md").read_text()
    assert all(isinstance(r["commit"], str) and len(r["commit"]) >= 7 for r in rows + pilot)
    assert sorted((r["arm"], r["seed"]) for r in rows) == sorted((a, s) for arms, seeds in regime.PLAN for s in seeds for a in arms)
    assert all(r in rows for r in first) and len(first) == 13


def test_committed_regime_paths_come_from_the_committed_csv_and_end_where_the_study_did():
    """docs/results/regime/paths.md is `run.py report` of paths.csv; the CSV holds PATHS's plan, each run with its
    four points on the first PATH_PAIRS held-out pairs; and DPO β₀ 0.03's ends are the study's runs of the same
    seeds on those pairs: every outcome the same, the KL to rounding (not bit for bit, cause not isolated:
    docs/RESULTS.md, "Paths"). β-DPO's ends are not: its first step's filter ranks margins that are
    rounding noise (policy = reference), so other rounding trains other pairs from step 1 on."""
    results = ROOT / "docs" / "results" / "regime"
    paths, rows = experiments.read_csv(results / "paths.csv"), experiments.read_csv(results / "runs.csv")
    assert regime_report.report(paths) == (results / "paths.md").read_text()
    plan = [(a, s) for arms, seeds in regime.PATHS["plan"] for s in seeds for a in arms]
    assert sorted((r["arm"], r["seed"]) for r in paths) == sorted(plan) and len(plan) == 6
    for r in paths:
        assert [(r[f"step_{i}"], r[f"n_{i}"]) for i in range(1, 5)] == [(s, regime.PATH_PAIRS) for s in regime.PATHS["setup"]["path"]]
        study = next(q for q in rows if (q["arm"], q["seed"]) == (r["arm"], r["seed"]))
        same = [regime_report.unpack(r[f"bits_{k}_4"], regime.PATH_PAIRS) == regime_report.unpack(study[f"bits_{k}_1"], regime.PATH_PAIRS)
                for k in ("acc", "nacc")]
        if r["arm"] == "DPO β₀ 0.03":
            assert same == [True, True] and math.isclose(r["kl_4"], study["kl_1"], rel_tol=1e-5)
        else:
            assert not any(same)
