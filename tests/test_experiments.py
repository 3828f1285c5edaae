"""experiments/run.py: the confidence intervals against a hand computation, and a smoke run of every study."""

import math
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "experiments"))
import run as experiments  # noqa: E402


def test_mean_ci_by_hand():
    # x = 1, 2, 3, 4: mean 2.5; s² = (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3; t_{0.975, 3} = 3.182
    mean, half = experiments.mean_ci([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and half == pytest.approx(3.182 * math.sqrt(5 / 3) / 2)
    # two values 0.5, 0.7: s = 0.1414, t_{0.975, 1} = 12.706 → half-width 12.706 · 0.1414 / √2 = 1.2706
    assert experiments.mean_ci([0.5, 0.7]) == pytest.approx((0.6, 1.2706))
    mean, half = experiments.mean_ci([0.3])
    assert mean == 0.3 and math.isnan(half)
    assert experiments.fmt(0.6, 1.2706) == "0.600 ± 1.271" and experiments.fmt(0.3, math.nan) == "0.300"


def test_table_from_runs():
    runs = [{"eval": {"win_rate_vs_chosen@t0": w, "win_rate_vs_chosen@t1": 0.2, "pref_accuracy": 0.9, "kl_seq": 1.0},
             "train": [{"beta_scale": 1.0, "beta_mean": 0.1}]} for w in (0.4, 0.5, 0.6)]
    start = {"win_rate_vs_chosen@t0": 0.3, "win_rate_vs_chosen@t1": 0.1, "pref_accuracy": 0.0, "kl_seq": 0.0}
    lines = experiments.table("ablation", {"β-DPO": runs}, start).splitlines()
    assert lines[2] == "| *SFT start (π_ref)* | – | 0.300 | 0.100 | 0.000 | 0.000 |"
    # mean 0.5, s = 0.1, t_{0.975, 2} = 4.303 → 4.303 · 0.1 / √3 = 0.248
    assert lines[3] == "| β-DPO | 3 | 0.500 ± 0.248 | 0.200 ± 0.000 | 0.900 ± 0.000 | 1.000 ± 0.000 |"


def test_shared_variants_train_once():
    """DPO and β-DPO at the default data appear in several studies under one run directory."""
    dirs = {experiments.slug(o) for study in experiments.STUDIES.values() for o in study.values()}
    total = sum(len(study) for study in experiments.STUDIES.values())
    assert experiments.slug(experiments.STUDIES["ablation"]["β-DPO"]) == experiments.slug(experiments.STUDIES["sensitivity"]["ρ = 0.2"])
    assert experiments.slug(experiments.STUDIES["mixture"]["DPO, high-gap 30%"]) == experiments.slug(experiments.DPO)
    assert experiments.slug(experiments.STUDIES["noise"]["β-DPO, flipped 0%"]) == experiments.slug(experiments.BETA_DPO)
    assert len(dirs) == total - 5  # DPO: in 3 studies (2 repeats); β-DPO: in 4 (ablation, mixture, noise, ρ = 0.2)
    from common import DataArgs

    assert all(getattr(DataArgs(), k.split(".")[1]) == v for k, v in experiments.DATA_DEFAULTS.items())


def test_smoke_every_study(tmp_path):
    cmd = [sys.executable, str(ROOT / "experiments" / "run.py"), "all", "--smoke", "--out", str(tmp_path)]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for study, variants in experiments.SMOKE_STUDIES.items():
        table = (tmp_path / study / "table.md").read_text()
        assert all(f"| {name} | 1 |" in table for name in variants), table
        assert (tmp_path / study / "figure.png").stat().st_size > 10_000
    # Resumable: the same command again trains nothing.
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done earlier") == first.stdout.count("] runs/")
