"""experiments/run.py and experiments/stats.py: the statistics against hand computations, the frontier, the
tables from a CSV, the committed results against their CSV, and a smoke run of the pipeline (SFT → runs → CSV →
tables → figure)."""

import json
import math
import platform
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run_here

sys.path.insert(0, str(ROOT / "experiments"))
import run as experiments  # noqa: E402
import stats  # noqa: E402


# ---- statistics ---------------------------------------------------------------------------------------------
def test_incomplete_beta_against_the_binomial_sum():
    # For integers a, b: I_x(a, b) = Σ_{j=a}^{a+b−1} C(a+b−1, j) x^j (1−x)^{a+b−1−j}.
    for a, b in ((1, 1), (2, 3), (5, 2), (7, 7), (1, 9)):
        for x in (0.05, 0.3, 0.5, 0.77, 0.99):
            n = a + b - 1
            expected = sum(math.comb(n, j) * x**j * (1 - x) ** (n - j) for j in range(a, n + 1))
            assert stats.betainc(a, b, x) == pytest.approx(expected, rel=1e-10, abs=1e-14)
    assert stats.betainc(2, 3, 0.0) == 0.0 and stats.betainc(2, 3, 1.0) == 1.0


def test_student_t_against_tabulated_values():
    # t_{0.975, df} from any t table.
    for df, t in ((1, 12.7062), (2, 4.3027), (5, 2.5706), (10, 2.2281), (30, 2.0423)):
        assert stats.t_quantile(df) == pytest.approx(t, abs=1e-4)
        assert stats.t_pvalue(t, df) == pytest.approx(0.05, abs=1e-5)
    # df = 1 is the Cauchy distribution: P(|T| ≥ 1) = 1/2 exactly.
    assert stats.t_pvalue(1.0, 1) == pytest.approx(0.5, abs=1e-12)
    assert stats.t_pvalue(0.0, 4) == pytest.approx(1.0)


def test_mean_ci_and_t_test_by_hand():
    # x = 1, 2, 3, 4: mean 2.5; s² = 5/3; t_{0.975, 3} = 3.1824
    mean, half = stats.mean_ci([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and half == pytest.approx(3.18245 * math.sqrt(5 / 3) / 2, rel=1e-5)
    mean, half = stats.mean_ci([0.3])
    assert mean == 0.3 and math.isnan(half)
    # differences 0.1, 0.3, 0.2: mean 0.2, s = 0.1, t = 0.2 / (0.1/√3) = 3.464 on 2 df → p = 0.0742
    mean, half, p = stats.t_test([0.1, 0.3, 0.2])
    assert mean == pytest.approx(0.2) and p == pytest.approx(0.0742, abs=2e-4)
    assert stats.t_test([0.0, 0.0, 0.0])[2] == 1.0 and stats.t_test([0.1, 0.1])[2] == 0.0
    assert stats.fmt(0.6, 1.2706) == "0.600 ± 1.271" and stats.fmt(0.3) == "0.300"


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 → 3·0.01 = 0.03, 2·0.03 = 0.06, max(0.06, 1·0.04) = 0.06; nan untouched
    adjusted = stats.holm([0.01, 0.04, 0.03, math.nan])
    assert adjusted[:3] == pytest.approx([0.03, 0.06, 0.06]) and math.isnan(adjusted[3])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


# ---- the frontier --------------------------------------------------------------------------------------------
def synthetic_rows(offset=0.02):
    """Frontier runs (at LR) exactly on win = 0.3 + 0.1·seed − 0.05·x + 0.01·x² (x = ln KL), gold = 0.9 − 0.02·x,
    for two starts, and DPO runs at LR_LOW far below (left out of the fit); a variant `offset` above the win
    curve and 0.01 below the gold curve."""
    rows = []
    for seed in (0, 1):
        for i, kl in enumerate((0.3, 0.8, 1.5, 3.0, 6.0)):
            x = math.log(kl)
            for lr, shift in ((experiments.LR, 0.0), (experiments.LR_LOW, -0.2)):
                rows.append({"study": "frontier", "variant": f"DPO {i}, lr {lr}", "run": f"d{i}{lr}", "sft_seed": seed,
                             "train_seed": 0, "lr": lr, "kl_seq": kl, "beta_floor_rate": 0.0,
                             "win_rate_vs_chosen@t1": 0.3 + 0.1 * seed - 0.05 * x + 0.01 * x * x + shift, "gold_reward@t1": 0.9 - 0.02 * x})
        for t, kl in enumerate((1.0, 2.0, 9.0)):  # the last outside the fitted KL range
            x = math.log(kl)
            rows.append({"study": "ablation", "variant": "V", "run": "v", "sft_seed": seed, "train_seed": t, "kl_seq": kl, "lr": experiments.LR,
                         "win_rate_vs_chosen@t1": 0.3 + 0.1 * seed - 0.05 * x + 0.01 * x * x + offset + 0.001 * t,
                         "gold_reward@t1": 0.9 - 0.02 * x - 0.01, "beta_floor_rate": 0.25})
    return rows


def test_frontier_fit_recovers_the_curve_and_the_distance_above_it():
    rows = synthetic_rows()
    fronts = experiments.frontiers(rows)
    for seed in (0, 1):
        coef, (lo, hi), sd = fronts[seed, "win"]
        assert coef == pytest.approx((0.3 + 0.1 * seed, -0.05, 0.01), abs=1e-9) and sd == pytest.approx(0, abs=1e-9)
        assert (math.exp(lo), math.exp(hi)) == pytest.approx((0.3, 6.0))
        assert fronts[seed, "gold"][0] == pytest.approx((0.9, -0.02, 0.0), abs=1e-9)
    variant = [r for r in rows if r["study"] == "ablation"]
    assert [experiments.above_frontier(r, fronts, "win") for r in variant] == pytest.approx([0.02, 0.021, 0.022] * 2)
    assert [experiments.above_frontier(r, fronts, "gold") for r in variant] == pytest.approx([-0.01] * 6)
    low = [r for r in rows if r["study"] == "frontier" and r["lr"] == experiments.LR_LOW]
    assert [experiments.above_frontier(r, fronts, "win") for r in low] == pytest.approx([-0.2] * 10)
    assert experiments.inside_frontier(variant, fronts) == "4/6"
    line = [ln for ln in experiments.frontier_table("ablation", rows, fronts).splitlines() if ln.startswith("| V |")][0]
    cells = [c.strip() for c in line.split("|")[1:-1]]
    assert cells[1] == "6" and cells[5].startswith("0.021 ± ") and cells[7].startswith("-0.010 ± 0.000") and cells[9:] == ["4/6", "25%"]


def test_paired_table_pairs_units_and_refuses_mismatched_ones():
    rows = synthetic_rows()
    for t, kl in enumerate((1.0, 2.0, 9.0)):
        for seed in (0, 1):
            rows.append({"study": "ablation", "variant": "W", "run": "w", "sft_seed": seed, "train_seed": t, "kl_seq": kl, "lr": experiments.LR,
                         "win_rate_vs_chosen@t1": 0.5, "gold_reward@t1": 0.8, "beta_floor_rate": 0.0})
    fronts = experiments.frontiers(rows)
    table = experiments.paired_table("ablation", rows, [("V", "W")], fronts)
    # Same KL per unit, so Δ KL = 0 and Δ win = Δ (win − frontier) = V's distance − W's distance, unit by unit.
    assert "| V − W | 6 | 0.00 ± 0.00 |" in table
    rows = [r for r in rows if not (r["variant"] == "W" and r["train_seed"] == 2)]
    with pytest.raises(AssertionError):
        experiments.paired_table("ablation", rows, [("V", "W")], fronts)


def test_tables_survive_the_csv_round_trip(tmp_path):
    rows = synthetic_rows() + [{"study": "start", "variant": "SFT", "run": f"sft{s}", "sft_seed": s, "train_seed": -1, "commit": "",
                                "pairs": 256, "win_rate_vs_chosen@t0": 0.4, "win_rate_vs_chosen@t1": 0.3, "gold_reward@t0": 0.9,
                                "gold_reward@t1": 0.8, "exact_match@t0": 0.7} for s in (0, 1)]
    for r in rows:
        r.setdefault("commit", "abc1234")
    experiments.write_csv(rows, tmp_path / "runs.csv")
    again = experiments.read_csv(tmp_path / "runs.csv")
    assert experiments.report(again) == experiments.report(rows)
    assert "| V | 6 |" in experiments.report(again) and "| seed 1 | 256 | 0.400 |" in experiments.report(again)


# ---- the committed results -----------------------------------------------------------------------------------
@pytest.mark.parametrize("results", ["docs/results", "docs/results/avx512"])
def test_committed_tables_come_from_the_committed_csv(results):
    """tables.md is exactly what `run.py report` makes of runs.csv: the main results (AVX2 kernels) and the
    replication on AVX-512 kernels."""
    csv_path, tables = ROOT / results / "runs.csv", ROOT / results / "tables.md"
    assert experiments.report(experiments.read_csv(csv_path)) == tables.read_text()
    rows = experiments.read_csv(csv_path)
    runs = [r for r in rows if r["study"] not in ("start", "realtext")]
    for study, variants in experiments.STUDIES.items():  # every variant, with 2 starts × 3 seeds
        for name in variants:
            units = {(r["sft_seed"], r["train_seed"]) for r in runs if r["study"] == study and r["variant"] == name}
            assert units == {(s, t) for s in experiments.SFT_SEEDS for t in experiments.TRAIN_SEEDS}, (study, name)
    assert all(isinstance(r["commit"], str) and len(r["commit"]) >= 7 for r in runs)


def test_every_table_row_of_the_results_page_is_generated():
    """docs/RESULTS.md shows tables copied from the tables.md files of the studies, never typed by hand."""
    generated = {line for results in ("docs/results", "docs/results/avx512", "docs/results/real", "docs/results/regime")
                 for line in (ROOT / results / "tables.md").read_text().splitlines()}
    generated |= {line for name in ("pilot.md", "first_run.md", "paths.md")
                  for line in (ROOT / "docs" / "results" / "regime" / name).read_text().splitlines()}
    rows = [line for line in (ROOT / "docs" / "RESULTS.md").read_text().splitlines() if line.startswith("| ")]
    assert len(rows) > 50 and [r for r in rows if r not in generated] == []


# ---- settings ------------------------------------------------------------------------------------------------
def test_defaults_left_out_of_run_names_are_the_real_defaults():
    from betadpo import LossArgs
    from plumbing.config import DataArgs

    sort = yaml.safe_load((ROOT / "configs" / "sort.yaml").read_text())
    defaults = {"data": DataArgs(), "loss": LossArgs()}
    for key, value in experiments.DEFAULTS.items():
        section, name = key.split(".")
        if section in sort and name in sort[section]:
            assert sort[section][name] == value, key
        else:
            assert getattr(defaults[section], name) == value, key
    # Shared variants are one directory: the ablation's DPO is the frontier's β₀ 0.1 at LR and the mixture's 30%.
    slugs = {name: experiments.slug(o) for study in experiments.STUDIES.values() for name, o in study.items()}
    assert slugs["DPO (β₀ 0.1)"] == slugs["DPO β₀ 0.1, lr 3e-05"] == slugs["DPO, high-gap 30%"]
    assert slugs["batch-level β, high-gap 30%"] == slugs["DPO + dynamic β"]
    assert slugs["DPO fed β-DPO's own βs, shuffled"] != slugs["DPO (β₀ 0.1)"]


def test_realtext_pairs_are_hh_dialogues_with_the_right_answer_chosen():
    from plumbing.config import DataArgs
    from plumbing.data import to_pairs

    rows = experiments.realtext_pairs(60, seed=3)
    assert rows == experiments.realtext_pairs(60, seed=3) and rows != experiments.realtext_pairs(60, seed=4)
    pairs = to_pairs(list(enumerate(rows, 1)), "generated", DataArgs())  # HH dialogues, raw (no tokenizer)
    assert len(pairs) == 60 and all(p["chosen"] != p["rejected"] for p in pairs)
    for p in pairs:
        if " plus " in p["prompt"]:
            a, b = [int(w.strip("?")) for w in p["prompt"].split() if w.strip("?").isdigit()]
            assert p["chosen"].strip().endswith(f"is {a + b}.") and not p["rejected"].strip().endswith(f"is {a + b}.")
    capitals = dict(experiments.COUNTRIES)
    for p in pairs:
        if "capital of" in p["prompt"]:
            country = p["prompt"].split("capital of ")[1].split("?")[0]
            assert p["chosen"].strip().endswith(capitals[country] + ".")


def test_bootstrap_interval_contains_the_statistic_and_is_reproducible():
    values = [float(i % 3 == 0) for i in range(90)]  # mean 1/3
    stat, lo, hi = experiments.bootstrap_ci(values, lambda v: sum(v) / len(v))
    assert stat == pytest.approx(1 / 3) and lo < stat < hi and (lo, hi) == experiments.bootstrap_ci(values, lambda v: sum(v) / len(v))[1:]
    # the normal approximation: ±1.96 · √(p(1−p)/n) = ±0.097
    assert hi - lo == pytest.approx(2 * 1.96 * math.sqrt(1 / 3 * 2 / 3 / 90), rel=0.2)


def test_cpu_kernels_are_pinned_for_every_child_run(capsys):
    """--cpu_kernels avx2 reaches the scripts' torch (x86); 'default' leaves the choice to torch."""
    experiments.pin_cpu_kernels("avx2")
    try:
        if platform.machine().lower() in ("x86_64", "amd64"):
            assert experiments.KERNEL_ENV == {"ATEN_CPU_CAPABILITY": "avx2"}
            assert "CPU kernels of every run: AVX2 " in capsys.readouterr().out
        experiments.pin_cpu_kernels("default")
        assert experiments.KERNEL_ENV == {}
    finally:
        experiments.KERNEL_ENV.clear()


# ---- the pipeline --------------------------------------------------------------------------------------------
def run_in_process(argv: list[str], capsys, monkeypatch) -> str:
    """`python experiments/run.py ARGV --jobs 1` as run.main in this process → its stdout. The scripts it runs
    (sft.py, betadpo.py, eval.py) run in this process too (run_script_here): what is tested is the pipeline (which
    run, from which start, with which flags, in which phase, into which CSV and tables), not how a script is
    launched; each launch would cost seconds of interpreter start-up and imports. One job at a time (--jobs 1):
    two runs in one process at once would share sys.argv, sys.stdout and accelerate's state. A failed run fails
    the test with its output."""
    monkeypatch.setattr(experiments, "run", run_script_here)  # (real.py gets run.py's `run` passed in: the same stand-in)
    monkeypatch.setenv("TQDM_DISABLE", "1")  # as run.run sets it for a launched script
    try:
        experiments.main([*argv, "--jobs", "1"])
    finally:
        experiments.KERNEL_ENV.clear()  # main pins the children's CPU kernels in this module: leave it as found
    return capsys.readouterr().out


def run_script_here(cmd: list[str], log, threads: int = 1):
    """Stands in for run.run(cmd = [python, script, *flags], log): conftest.run_here (the script's __main__ in this
    process; a failure fails the test with its output), the output written to the log. `threads` is left as it
    is: this process has 1 (conftest). The CPU kernels run.py pins for its children (KERNEL_ENV) are this
    machine's own here; test_cpu_kernels_are_pinned_for_every_child_run checks the pinning."""
    _python, script, *flags = cmd
    result = run_here(script, *flags)
    Path(log).write_text(result.stdout + result.stderr)


def test_smoke_controls_and_frontier(tmp_path, capsys, monkeypatch):
    """The control that replays β-DPO's βs runs after β-DPO, with the shuffled sequence; the CSV and the
    tables come out; re-running trains nothing."""
    argv = ["controls", "--smoke", "--out", str(tmp_path)]
    first = run_in_process(argv, capsys, monkeypatch)
    rows = experiments.read_csv(tmp_path / "runs.csv")
    assert {r["study"] for r in rows} == {"start", "frontier", "controls"}
    assert (tmp_path / "tables.md").read_text() == experiments.report(rows)
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
    replay_dir = experiments.run_dir(tmp_path, experiments.STUDIES["controls"]["DPO fed β-DPO's own βs, shuffled"], 0, 0)
    source_dir = experiments.run_dir(tmp_path, experiments.BETA_DPO, 0, 0)
    source = [r["beta"] for r in experiments.read_metrics(source_dir / "metrics.jsonl") if r.get("split") != "eval"]
    replayed = json.loads((replay_dir / "beta_sequence.json").read_text())
    trained = [r["beta"] for r in experiments.read_metrics(replay_dir / "metrics.jsonl") if r.get("split") != "eval"]
    assert sorted(replayed) == sorted(source) and trained == pytest.approx(replayed, rel=1e-6)
    again = run_in_process(argv, capsys, monkeypatch)
    assert again.count("done earlier") == first.count("] runs/") == 4  # 2 frontier, β-DPO, its replay
