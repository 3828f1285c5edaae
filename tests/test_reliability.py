"""Reliability of a training run (plumbing/'s checkpoints and metrics, used by sft.py and betadpo.py): NaN stops the run,
checkpoints survive damage, Ctrl-C and SIGKILL lose nothing, a finished run is not retrained, sft.py resumes
exactly and honours train.optimizer / gradient_checkpointing / wandb."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from plumbing.metrics import read_metrics as read_jsonl
from conftest import ROOT, read_metrics, run_script
from test_betadpo_train import assert_close_rows, assert_same_weights, final_weights, flags

SFT = ["--config", "configs/sort_sft.yaml", "--model.tiny_hidden_size", 32, "--data.num_sft", 512, "--data.eval_size", 4,
       "--train.batch_size", 16, "--train.warmup_steps", 2]


def strict_rows(path):
    """Every line of a metrics.jsonl parsed by a JSON reader that refuses NaN and Infinity."""
    def refuse(name):
        raise ValueError(f"{path}: {name} is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def last_line(result) -> str:
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("script", ["betadpo.py", "sft.py"])
def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model, script):
    out = tmp_path / "run"
    args = (flags(tiny_model, out, "--train.lr", 1e4, "--train.max_steps", 10, "--train.save_every", 1) if script == "betadpo.py"
            else [*SFT, "--train.output_dir", out, "--train.lr", 1e4, "--train.max_steps", 10, "--train.save_every", 1])
    result = run_script(script, *args, check=False)
    assert result.returncode == 3 and "Traceback" not in result.stderr
    message = last_line(result)
    step = len(strict_rows(out / "metrics.jsonl")) if script == "sft.py" else len(read_metrics(out))
    assert re.fullmatch(rf"error: step {step + 1}: .*(nan|inf).*: training stopped, nothing saved for this step; last good "
                        rf"checkpoint: {re.escape(str(out))}/checkpoints/step-{step:08d}\. .*train\.lr.*", message), message
    strict_rows(out / "metrics.jsonl")  # valid JSON lines, no NaN
    assert not (out / "final").exists()  # no NaN weights written for users to load
    newest = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert newest.name == f"step-{step:08d}"
    assert all(torch.isfinite(t).all() for t in load_file(newest / "model.safetensors").values())


def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, tiny_model):
    """Bytes flipped in the newest checkpoint's weights (same size: only the checksum can tell) and a torn last
    line in metrics.jsonl: the run resumes from the checkpoint before, and ends exactly where it ended before."""
    out = tmp_path / "run"
    run_script("betadpo.py", *flags(tiny_model, out, "--train.max_steps", 4))
    rows, weights = read_metrics(out), final_weights(out)
    shutil.rmtree(out / "final")
    damaged = out / "checkpoints" / "step-00000004" / "model.safetensors"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    torn = len((out / "metrics.jsonl").read_text().splitlines()) + 1
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 0.69')  # killed in the middle of a line
    result = run_script("betadpo.py", *flags(tiny_model, out, "--train.max_steps", 4))
    assert (f"warning: checkpoint {out}/checkpoints/step-00000004 is damaged (model.safetensors does not match its "
            "checksum); renamed damaged-step-00000004, resuming from the one before") in result.stderr
    assert f"line {torn} is incomplete" in result.stderr and "resumed from" in result.stdout and "(step 2)" in result.stdout
    assert_close_rows(rows, read_metrics(out), rel=1e-6)
    assert_same_weights(weights, final_weights(out), rel=1e-6)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["damaged-step-00000004", "step-00000002", "step-00000004"]


def test_sft_resume_is_exact_and_honours_optimizer_gradient_checkpointing_and_wandb(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = [*SFT, "--train.optimizer", "rmsprop", "--train.lr", 1e-3, "--train.save_every", 2]
    run_script("sft.py", *common, "--train.output_dir", full, "--train.max_steps", 4)
    run_script("sft.py", *common, "--train.output_dir", resumed, "--train.max_steps", 2, "--log.wandb", "true")
    # max_steps and gradient_checkpointing may change on resume; gradient checkpointing changes no number
    result = run_script("sft.py", *common, "--train.output_dir", resumed, "--train.max_steps", 4, "--log.wandb", "true",
                        "--train.gradient_checkpointing", "true")
    assert f"resumed from {resumed}/checkpoints/step-00000002 (step 2)" in result.stdout
    a, b = read_metrics(full), read_metrics(resumed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    assert_close_rows(a, b, rel=1e-6, keys=["loss", "grad_norm", "lr"])
    assert_same_weights(final_weights(full), final_weights(resumed), rel=1e-6)
    optimizer = torch.load(resumed / "checkpoints" / "step-00000004" / "optimizer.bin", weights_only=False)
    assert "square_avg" in next(iter(optimizer["state"].values()))  # RMSprop's state, not AdamW's exp_avg
    assert "max_steps: 4" in (resumed / "config.yaml").read_text() and "gradient_checkpointing: true" in (resumed / "config.yaml").read_text()
    assert list((resumed / "wandb").glob("offline-run-*"))


def test_ctrl_c_then_sigkill_in_the_final_save_then_finished(tmp_path):
    """Ctrl-C mid-run: one line, exit 130, resumable. SIGKILL in the middle of the final save: the next run
    writes final/ again from the last checkpoint without training. Then the run is finished: not retrained,
    even with its checkpoints deleted."""
    out = tmp_path / "run"
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "sft.py"), *map(str, SFT), "--train.output_dir", str(out), "--train.save_every", "2"]
    # 1. Ctrl-C (SIGINT) once 3 steps are logged, in a run that would go on for a long time
    proc = subprocess.Popen([*cmd, "--train.max_steps", "100000"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    while proc.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr
    line = stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"interrupted at step (\d+) \(last checkpoint: (.*)\); re-run the same command to resume", line)
    assert match, line
    stopped, checkpoint = int(match[1]) - 1, Path(match[2])
    saved = int(checkpoint.name.removeprefix("step-"))  # every 2 steps; the signal may land inside a save
    assert checkpoint.parent == out / "checkpoints" and checkpoint.is_dir() and stopped - 3 <= saved <= stopped
    # 2. the same command resumes (a longer max_steps may be asked); SIGKILL while it writes final/
    total = stopped + 3
    proc = subprocess.Popen([*cmd, "--train.max_steps", str(total)], cwd=ROOT, env={**env, "_TEST_PAUSE_IN_SAVE_FINAL": "600"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not (out / ".final-tmp" / "model.safetensors").exists():
        time.sleep(0.05)
    proc.kill()
    proc.communicate()
    assert not (out / "final" / "finished.json").exists()
    rows = read_jsonl(metrics)
    assert [r["step"] for r in rows] == list(range(1, total + 1))
    # 3. the same command: resumes at the last step, writes final/, trains nothing
    result = run_script("sft.py", *cmd[2:], "--train.max_steps", total)
    assert f"(step {total})" in result.stdout and "model:" in result.stdout
    assert json.loads((out / "final" / "finished.json").read_text()) == {"step": total}
    assert read_jsonl(metrics) == rows and not (out / ".final-tmp").exists()
    # 4. finished: nothing to do, even without checkpoints; metrics untouched
    shutil.rmtree(out / "checkpoints")
    result = run_script("sft.py", *cmd[2:], "--train.max_steps", total)
    assert f"already finished {total} steps" in result.stdout and read_jsonl(metrics) == rows


def test_read_metrics_skips_a_torn_last_line_and_names_a_damaged_one(tmp_path, capsys):
    from plumbing.errors import UserError

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    assert read_jsonl(path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}]
    assert f"warning: {path} line 4 is incomplete" in capsys.readouterr().err
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo\n{"step": 3, "loss": 0.4}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl line 2: not a JSON object"):
        read_jsonl(path)
    path.write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(UserError, match=r"metrics.jsonl line 2: not a JSON object"):
        read_jsonl(path)


def test_readme_names_the_keys_that_may_change_on_resume():
    from plumbing.checkpoints import RESUMABLE_KEYS

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## When something goes wrong") :][:3000]
    listed = set(re.findall(r"`((?:train|log|eval)\.[\w*]+)`", section[section.index("Only") : section.index("may change")]))
    assert listed == {k + "*" if k.endswith(".") else k for k in RESUMABLE_KEYS}
