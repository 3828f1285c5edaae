"""betadpo.py end to end: metrics, process-count invariance, exact resume, learnable scale, bad configs."""

import json
import math
import shutil

import pytest
from safetensors.torch import load_file

from conftest import read_metrics, run_main, run_script

METRIC_KEYS = {  # every key docs/LAUNCHING.md's "Outputs of a run" promises
    "step", "lr", "loss", "beta", "beta_mean", "beta_scale", "M0", "sigma", "margin_mean", "margin_std",
    "kept_margin_mean", "kept", "pairs", "log_ppl", "rewards/chosen", "rewards/rejected", "rewards/margins",
    "rewards/accuracies", "logps/chosen", "logps/rejected", "grad_norm", "pairs_per_s", "tokens_per_s",
}
COMPARED = ["loss", "beta", "beta_mean", "beta_scale", "kept", "M0", "sigma", "margin_mean", "rewards/accuracies", "grad_norm"]


def flags(model, out, *extra):
    """Every β-DPO mechanism on (dynamic β, filtering, learnable perplexity-scaled β), 2 micro-batches/step."""
    return ["--model.name_or_path", model, "--train.output_dir", out, "--data.num_train", 256, "--data.eval_size", 8,
            "--train.batch_size", 8, "--train.grad_accum", 2, "--train.lr", 1e-2, "--train.warmup_steps", 1,
            "--loss.alpha", 0.6, "--loss.filter_ratio", 0.25, "--loss.learn_scale", "true", "--loss.ppl_scale", "true",
            "--loss.scale_lr", 0.05, "--train.save_every", 2, "--train.eval_every", 2, *extra]


def final_weights(run):
    return load_file(run / "final" / "model.safetensors")


def assert_close_rows(a, b, rel=1e-5, keys=COMPARED):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in keys:
            assert x[k] == pytest.approx(y[k], rel=rel, abs=1e-7), (x["step"], k)


def assert_same_weights(a, b, rel=1e-5):
    """‖a − b‖ / ‖a‖ per tensor. (Element-wise would be wrong: Adam turns float noise in a near-zero gradient
    element into an update of lr·g/(|g| + ε), so single elements can differ far more than the tensor does.)"""
    for name, tensor in a.items():
        assert ((tensor - b[name]).norm() / tensor.norm()).item() <= rel, name


def test_metrics_and_final_model(tmp_path, tiny_model):
    out = tmp_path / "run"
    result = run_script("betadpo.py", *flags(tiny_model, out, "--train.max_steps", 4, "--log.wandb", "true"))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert METRIC_KEYS <= set(r) and all(isinstance(v, (int, float)) for v in r.values())
        assert r["pairs"] == 8 and r["kept"] == 2 * 3  # two calibration batches of 4 pairs, ⌊4 · 0.75⌋ = 3 kept each
    assert rows[0]["M0"] == 0 and rows[0]["sigma"] == 0  # policy = reference at step 1: every margin is 0
    assert rows[-1]["sigma"] > 0 and rows[-1]["beta_scale"] != rows[0]["beta_scale"]  # c is learned
    evals = read_metrics(out, "eval")
    assert [r["step"] for r in evals] == [2, 4] and all(r["pairs"] == 8 for r in evals)
    scale = json.loads((out / "final" / "beta_scale.json").read_text())
    assert scale["learn_scale"] and scale["beta_scale"] == pytest.approx(math.log1p(math.exp(scale["c"])))
    assert scale["beta_scale"] != pytest.approx(1.0)  # metrics log the scale used in a step; final/ the one after it
    assert (out / "config.yaml").exists() and list((out / "wandb").glob("offline-run-*"))
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "final").config.vocab_size > 0
    assert f"model: {out / 'final'}" in result.stdout


def test_fixed_scale_never_changes(tmp_path, tiny_model):
    out = tmp_path / "run"
    run_script("betadpo.py", *flags(tiny_model, out, "--train.max_steps", 2, "--loss.learn_scale", "false",
                                    "--loss.beta_scale_init", 0.7))
    assert [r["beta_scale"] for r in read_metrics(out)] == pytest.approx([0.7, 0.7])
    assert json.loads((out / "final" / "beta_scale.json").read_text())["beta_scale"] == pytest.approx(0.7)


def test_two_processes_match_one(tmp_path, tiny_model):
    """The same global batch on 1 and 2 CPU processes: same β, kept count, loss, M₀, σ, scale and weights.

    In float64, so that a logic error (a per-rank normalisation, an unsynchronised mask) cannot hide in float
    noise: in fp32 the two runs sum gradients in a different order (one GEMM vs two halves + all-reduce), and
    Adam's g/√v turns that ~1e-7 into weight differences of ~2e-5 after 4 steps at lr 1e-2. In float64 the
    weights agree to ~1e-14; the metrics to ~1e-7 (M₀, σ and c are kept in fp32)."""
    run = ["--train.max_steps", 4, "--model.dtype", "float64"]
    run_script("betadpo.py", *flags(tiny_model, tmp_path / "p1", *run))
    run_script("betadpo.py", *flags(tiny_model, tmp_path / "p2", *run), processes=2)
    one, two = read_metrics(tmp_path / "p1"), read_metrics(tmp_path / "p2")
    assert one[-1]["sigma"] > 0 and any(r["beta"] != 0.1 for r in one)  # the mechanisms really ran
    assert_close_rows(one, two, rel=1e-6)
    assert_close_rows(read_metrics(tmp_path / "p1", "eval"), read_metrics(tmp_path / "p2", "eval"), keys=["loss", "rewards/accuracies", "margin_mean"])
    assert_same_weights(final_weights(tmp_path / "p1"), final_weights(tmp_path / "p2"), rel=1e-10)


def test_resume_is_exact(tmp_path, tiny_model):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_script("betadpo.py", *flags(tiny_model, full, "--train.max_steps", 6))
    # A run that stopped after its step-4 checkpoint, having logged a step 5 it never saved ("killed").
    run_script("betadpo.py", *flags(tiny_model, resumed, "--train.max_steps", 4))
    with (resumed / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 5, "loss": 123.0}) + "\n")
    shutil.rmtree(resumed / "final")
    result = run_script("betadpo.py", *flags(tiny_model, resumed, "--train.max_steps", 6))
    assert "resumed from" in result.stdout and "step 4" in result.stdout
    assert_close_rows(read_metrics(full), read_metrics(resumed), rel=1e-6)
    assert_same_weights(final_weights(full), final_weights(resumed), rel=1e-6)
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]  # the two newest
    # The same command again: a finished run is not retrained.
    again = run_script("betadpo.py", *flags(tiny_model, resumed, "--train.max_steps", 6))
    assert "already finished" in again.stdout and len(read_metrics(resumed)) == 6


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--loss.beta", "-0.1"], "error: config: loss.beta must be > 0"),
        (["--loss.filter_ratio", "1"], "error: config: loss.filter_ratio must be in [0, 1)"),
        (["--loss.type", "kto"], "invalid choice: 'kto'"),
    ],
)
def test_bad_config_fails_before_training(tmp_path, tiny_model, extra, message, capsys):
    out = tmp_path / "run"
    code, _, stderr = run_main("betadpo.py", *flags(tiny_model, out, *extra), capsys=capsys)  # in this process
    assert code == 2 and message in stderr and not out.exists()


def test_batch_not_divisible_by_processes_times_accumulation(tmp_path, tiny_model):
    out = tmp_path / "run"
    result = run_script("betadpo.py", *flags(tiny_model, out, "--train.batch_size", 6), processes=2, check=False)
    assert result.returncode != 0 and "train.batch_size (6) must be divisible by processes × grad_accum (2 × 2)" in result.stderr
    assert not out.exists()
