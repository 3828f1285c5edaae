"""plumbing/plots.py and the metrics.jsonl reader: eval.py --plot / --compare as a user runs them, a study figure, and
what a torn or damaged metrics.jsonl does."""

import json
import math
from pathlib import Path

import pytest

from plumbing import plots
from plumbing.errors import UserError
from plumbing.metrics import read_metrics
from conftest import run_main

PNG = b"\x89PNG\r\n\x1a\n"


def fake_run(path: Path, beta: float) -> Path:
    path.mkdir()
    rows = [{"step": s, "loss": 0.7 - 0.01 * s, "beta": beta * (1 + 0.01 * s), "M0": 0.1 * s, "sigma": 0.05 * s,
             "kept": 51.0, "pairs": 64.0, "rewards/accuracies": 0.5 + 0.02 * s, "beta_scale": 1.0} for s in range(1, 11)]
    rows.append({"step": 10, "split": "eval", "loss": 0.6, "rewards/accuracies": 0.7, "beta": beta})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def fake_eval(path: Path, metrics: dict) -> Path:
    path.mkdir()
    (path / "eval.json").write_text(json.dumps({"metrics": metrics}))
    return path


def test_plot_two_runs(tmp_path, capsys):
    a, b = fake_run(tmp_path / "dpo", 0.1), fake_run(tmp_path / "betadpo", 0.2)
    out = tmp_path / "fig" / "curves.png"
    code, _, stderr = run_main("eval.py", "--plot", a, b, "--plot_out", out, capsys=capsys)  # in this process
    assert code == 0, stderr
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 20_000
    with pytest.raises(UserError, match="metrics.jsonl"):
        plots.plot_runs([str(a), str(tmp_path / "nothing")], tmp_path / "x.png")


def test_compare_puts_evaluations_side_by_side(tmp_path, capsys):
    a = fake_eval(tmp_path / "sort_dpo", {"pref_accuracy": 0.5, "kl_seq": 2.0, "kl_seq_se": 0.1, "only_here": 1.0})
    b = fake_eval(tmp_path / "sort_betadpo", {"pref_accuracy": 0.75, "kl_seq": 1.25, "kl_seq_se": 0.1})
    code, stdout, stderr = run_main("eval.py", "--compare", a, b, capsys=capsys)  # in this process
    assert code == 0, stderr
    header, *rows = stdout.splitlines()
    assert header.split() == ["sort_dpo", "sort_betadpo"]
    assert [r.split() for r in rows] == [["pref_accuracy", "0.5000", "0.7500"], ["kl_seq", "2.0000", "1.2500"]]
    code, _, stderr = run_main("eval.py", "--compare", a, tmp_path / "nothing", capsys=capsys)
    assert code == 2 and stderr.count("\n") == 1 and "eval.json" in stderr


def test_study_figure(tmp_path):
    curves = {name: [{"step": s, "beta": 0.1 * k, "M0": s * k, "sigma": 0.5, "kept": 51.0, "pairs": 64.0, "beta_scale": 1.0}
                     for s in range(1, 6)] for k, name in enumerate(("DPO", "β-DPO"), 1)}
    bars = [("win", [(0.4, 0.05), (0.5, math.nan)]), ("KL", [(3.0, 1.0), (2.0, 0.5)])]
    out = plots.plot_study("ablation", curves, bars, tmp_path / "study" / "figure.png")
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 10_000


def test_read_metrics_ignores_a_torn_last_line_with_a_warning(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.7}\n{"step": 2, "loss": 0.6}\n{"step": 3, "lo')  # killed mid-write
    assert read_metrics(path) == [{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.6}]
    assert "line 3" in capsys.readouterr().err
    path.write_text('{"step": 1}\n{"step": 2}\n')
    assert read_metrics(path) == [{"step": 1}, {"step": 2}] and capsys.readouterr().err == ""


def test_read_metrics_refuses_a_damaged_line_elsewhere(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(UserError, match=r"metrics\.jsonl line 2: "):
        read_metrics(path)
