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
    train_in_process(*flags(tiny_model, out, "--train.max_steps", 2, "--loss.learn_scale", "false",
                            "--loss.beta_scale_init", 0.7))
    assert [r["beta_scale"] for r in read_metrics(out)] == pytest.approx([0.7, 0.7])
    assert json.loads((out / "final" / "beta_scale.json").read_text())["beta_scale"] == pytest.approx(0.7)


def test_two_processes_match_one(tmp_path, tiny_model):
    """The same global batch on 1 and 2 CPU processes: same β, kept count, loss, M₀, σ, scale and weights.

    In float64, so that a logic error (a per-rank normalisation, an unsynchronised mask) cannot hide in float
    noise: in fp32 the two runs sum gradients in a different order (one GEMM vs two halves + all-reduce), and
    Adam's g/√v turns that ~1e-7 into weight differences of ~2e-5 after 4 steps at lr 1e-2. In float64 the
    weights agree to ~1e-14; the metrics to ~1e-7 (M₀, σ and c are kept in fp32). The one-process run is
    train_policy in this process, the same function `python betadpo.py` runs (the launch under test is the 2's)."""
    run = ["--train.max_steps", 4, "--model.dtype", "float64"]
    train_in_process(*flags(tiny_model, tmp_path / "p1", *run))
    run_script("betadpo.py", *flags(tiny_model, tmp_path / "p2", *run), processes=2)
    one, two = read_metrics(tmp_path / "p1"), read_metrics(tmp_path / "p2")
    assert one[-1]["sigma"] > 0 and any(r["beta"] != 0.1 for r in one)  # the mechanisms really ran
    assert_close_rows(one, two, rel=1e-6)
    assert_close_rows(read_metrics(tmp_path / "p1", "eval"), read_metrics(tmp_path / "p2", "eval"), keys=["loss", "rewards/accuracies", "margin_mean"])
    assert_same_weights(final_weights(tmp_path / "p1"), final_weights(tmp_path / "p2"), rel=1e-10)


def test_resume_is_exact(tmp_path, tiny_model, capsys):
    """Every run is `python betadpo.py` in this process (conftest.run_main): what carries over from one run to the
    next is only what is on disk, as after a crash (accelerate's state is reset between runs; seeds are set by each
    run). Resume in new processes: tests/test_reliability.py (damaged checkpoint, full disk, Ctrl-C) and the FSDP2
    launches of tests/test_fsdp.py."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert run_main("betadpo.py", *flags(tiny_model, full, "--train.max_steps", 6), capsys=capsys)[0] == 0
    # A run that stopped after its step-4 checkpoint, having logged a step 5 it never saved ("killed").
    assert run_main("betadpo.py", *flags(tiny_model, resumed, "--train.max_steps", 4), capsys=capsys)[0] == 0
    with (resumed / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 5, "loss": 123.0}) + "\n")
    shutil.rmtree(resumed / "final")
    code, stdout, stderr = run_main("betadpo.py", *flags(tiny_model, resumed, "--train.max_steps", 6), capsys=capsys)
    assert code == 0 and "resumed from" in stdout and "step 4" in stdout, stderr[-2000:]
    assert_close_rows(read_metrics(full), read_metrics(resumed), rel=1e-6)
    assert_same_weights(final_weights(full), final_weights(resumed), rel=1e-6)
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]  # the two newest
    # The same command again: a finished run is not retrained.
    code, stdout, _ = run_main("betadpo.py", *flags(tiny_model, resumed, "--train.max_steps", 6), capsys=capsys)
    assert code == 0 and "already finished" in stdout and len(read_metrics(resumed)) == 6


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


# ---- train.logps: the one log-prob switch, end to end --------------------------------------------------------
def train_in_process(*args):
    """betadpo.py on these flags, in this process (no interpreter start-up and imports: seconds less per run)."""
    from accelerate.state import AcceleratorState, GradientState

    import betadpo
    from plumbing.config import parse_config

    try:
        return betadpo.train_policy(parse_config(betadpo.Config, [str(a) for a in args]))
    finally:  # accelerate's process-wide state: the next run builds its own Accelerator
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def paths_taken(monkeypatch) -> list:
    """Record which log-prob computation each forward takes: plain, fast (plumbing/fast_logps.py), fused (its head)."""
    import betadpo
    import plumbing.fused_head as fused_head

    taken = []
    for module, name, label in ((betadpo, "plain_logps_at", "plain"), (betadpo.fast_logps, "logps_at", "fast"),
                                (fused_head, "fused_logps", "fused")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _l=label, **kw: taken.append(_l) or _f(*a, **kw))
    return taken


def assert_the_same_run(runs: dict, tol: float):
    """Every run's metrics (train and held-out rows, all but throughput) within tol of the first's, relative or
    absolute (margins and rewards are differences of log-probs near 0: fp32 paths that sum in another order differ
    there by ~1e-6 absolute, a wrong token's log-prob by ~1e-1), and its weights. margin_skew within 100·tol: a
    ratio of the centred margins' third and second moments, it magnifies their rounding. Weights within 10·tol:
    Adam's g/√v turns float noise in small gradients into whole updates (test_two_processes_match_one)."""
    (_, base), *others = runs.items()
    for split in ("train", "eval"):
        rows = read_metrics(base, split)
        for name, out in others:
            for x, y in zip(rows, read_metrics(out, split), strict=True):
                for k in x.keys() - {"step", "split", "pairs_per_s", "tokens_per_s"}:
                    t = 100 * tol if k == "margin_skew" else tol
                    assert y[k] == pytest.approx(x[k], rel=t, abs=t), (name, split, x["step"], k)
    for name, out in others:
        assert_same_weights(final_weights(base), final_weights(out), rel=10 * tol)


def test_each_logps_value_trains_alike(tmp_path, tiny_model, monkeypatch):
    """train.logps plain | fast | fused, 3 steps of the built-in task with every β-DPO mechanism on: each takes its
    own path (plain never reaches the kernels, fast never the fused head), the same metrics and weights (1e-5), and
    config.yaml records the value."""
    taken, runs = paths_taken(monkeypatch), {}
    for logps in ("plain", "fast", "fused"):
        taken.clear()
        runs[logps] = train_in_process(*flags(tiny_model, tmp_path / logps, "--train.max_steps", 3, "--train.logps", logps))
        assert set(taken) == {"plain": {"plain"}, "fast": {"fast"}, "fused": {"fast", "fused"}}[logps]
        assert f"logps: {logps}" in (runs[logps] / "config.yaml").read_text()
    assert read_metrics(runs["plain"])[-1]["sigma"] > 0  # the margins moved: the comparison has something to compare
    assert_the_same_run(runs, tol=1e-5)
