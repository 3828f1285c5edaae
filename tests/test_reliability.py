"""Reliability of a training run (plumbing/'s checkpoints and metrics, used by sft.py and betadpo.py): NaN stops the run,
checkpoints survive damage, Ctrl-C and SIGKILL lose nothing, a finished run is not retrained, sft.py resumes
exactly and honours train.optimizer / gradient_checkpointing / wandb; a full disk ends every process in one
line and the rerun resumes exactly; changed inputs are refused on resume; one job per output directory."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from plumbing.checkpoints import checkpoint_problem
from plumbing.metrics import read_metrics as read_jsonl
from conftest import ROOT, read_metrics, run_here, run_script
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
            else [*SFT, "--train.output_dir", out, "--train.lr", 1e20, "--train.max_steps", 10, "--train.save_every", 1])
    # (sft.py: lr 1e4 diverged to NaN on AVX2 kernels but to a saturated, finite network on AVX-512 ones; at 1e20 the
    # first update already overflows the next forward pass, on every kernel set)
    result = run_here(script, *args, check=False)  # in this process (conftest.run_here): main_guard's exit code
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
    run_here("betadpo.py", *flags(tiny_model, out, "--train.max_steps", 4))  # both runs in this process: damage is on disk
    rows, weights = read_metrics(out), final_weights(out)
    shutil.rmtree(out / "final")
    damaged = out / "checkpoints" / "step-00000004" / "model.safetensors"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    torn = len((out / "metrics.jsonl").read_text().splitlines()) + 1
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 0.69')  # killed in the middle of a line
    result = run_here("betadpo.py", *flags(tiny_model, out, "--train.max_steps", 4))
    assert (f"warning: checkpoint {out}/checkpoints/step-00000004 is damaged (model.safetensors does not match its "
            "checksum); renamed damaged-step-00000004, resuming from the one before") in result.stderr
    assert f"line {torn} is incomplete" in result.stderr and "resumed from" in result.stdout and "(step 2)" in result.stdout
    assert_close_rows(rows, read_metrics(out), rel=1e-6)
    assert_same_weights(weights, final_weights(out), rel=1e-6)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["damaged-step-00000004", "step-00000002", "step-00000004"]


def test_sft_resume_is_exact_and_honours_optimizer_gradient_checkpointing_and_wandb(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = [*SFT, "--train.optimizer", "rmsprop", "--train.lr", 1e-3, "--train.save_every", 2]
    run_here("sft.py", *common, "--train.output_dir", full, "--train.max_steps", 4)  # in this process; wandb's runs launched
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
    # 3. the same command: resumes at the last step, writes final/, trains nothing (3 and 4 in this process: what
    # they read is on disk)
    result = run_here("sft.py", *cmd[2:], "--train.max_steps", total)
    assert f"(step {total})" in result.stdout and "model:" in result.stdout
    assert json.loads((out / "final" / "finished.json").read_text()) == {"step": total}
    assert read_jsonl(metrics) == rows and not (out / ".final-tmp").exists()
    # 4. finished: nothing to do, even without checkpoints; metrics untouched
    shutil.rmtree(out / "checkpoints")
    result = run_here("sft.py", *cmd[2:], "--train.max_steps", total)
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


def test_the_docs_name_the_keys_that_may_change_on_resume():
    from plumbing.checkpoints import RESUMABLE_KEYS

    text = (ROOT / "docs" / "ERRORS.md").read_text()
    section = text[text.index("## When something goes wrong") :][:3000]
    listed = set(re.findall(r"`((?:train|log|eval|data)\.[\w*]+)`", section[section.index("Only") : section.index("may change")]))
    assert listed == {k + "*" if k.endswith(".") else k for k in RESUMABLE_KEYS}


# ---- storage faults ------------------------------------------------------------------------------------
def test_full_disk_on_another_process_stops_every_process_with_one_line(tmp_path):
    """2 processes; the write that fails is process 1's own file of the step-4 checkpoint (its random generators):
    process 0 can only name it if the processes agreed on it, and no process waits forever for the other."""
    out = tmp_path / "run"
    result = run_script("tests/storage_fault.py", "tmp-step-00000004/random_states_1", "sft.py", *SFT, "--train.output_dir", out,
                        "--train.max_steps", 6, "--train.save_every", 2, processes=2, check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    ours = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert ours == [f"error: no space left on device while writing checkpoint {out}/checkpoints/step-00000004 (it needs about "
                    f"{ours[0].split('needs about ')[1].split(',')[0]}, 0 bytes free): the partial checkpoint was removed; the last "
                    f"good checkpoint, {out}/checkpoints/step-00000002, is intact. Fix the storage (free space, permissions) "
                    "and re-run the same command to resume"], result.stderr[-3000:]
    before = result.stderr[: result.stderr.index(ours[0])]
    assert "Traceback" not in before  # (what follows is accelerate launch's own report of a process's exit code 1)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]  # the partial one removed
    assert checkpoint_problem(out / "checkpoints" / "step-00000002") is None and not (out / "lock.json").exists()


def test_full_disk_in_a_checkpoint_then_the_rerun_resumes_exactly(tmp_path):
    out = tmp_path / "run"
    args = [*SFT, "--train.output_dir", out, "--train.max_steps", 6, "--train.save_every", 2]
    result = run_script("tests/storage_fault.py", "tmp-step-00000004/model.safetensors", "sft.py", *args, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert re.fullmatch(rf"error: no space left on device while writing checkpoint {re.escape(str(out))}/checkpoints/step-00000004 "
                        r"\(it needs about [\d.]+ KB, 0 bytes free\): the partial checkpoint was removed; the last good checkpoint, "
                        rf"{re.escape(str(out))}/checkpoints/step-00000002, is intact\. .*re-run the same command to resume",
                        last_line(result)), last_line(result)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    faulted = read_jsonl(out / "metrics.jsonl")  # steps 3 and 4 were logged before their checkpoint failed
    result = run_here("sft.py", *args)  # the rerun, in this process (conftest.run_here)
    assert f"resumed from {out}/checkpoints/step-00000002 (step 2)" in result.stdout
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in faulted] == [1, 2, 3, 4] and [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert_close_rows(faulted, rows[:4], rel=1e-6, keys=["loss", "grad_norm", "lr"])  # steps 3, 4 computed again, the same
    assert json.loads((out / "final" / "finished.json").read_text()) == {"step": 6}


# ---- inputs pinned per run -----------------------------------------------------------------------------
def test_changed_data_is_refused_on_resume_unless_allowed(tmp_path):
    from test_user_errors import DPO, make_template, other_rejections, run_in

    d = make_template(tmp_path)
    assert run_in(d, "betadpo.py", DPO)[0] == 0
    first = json.loads((d / "out" / "inputs.json").read_text())
    assert set(first) == {"train data", "eval data", "model", "tokenizer"} and first["train data"]["rows"] == 36
    other_rejections(d)
    code, stderr = run_in(d, "betadpo.py", [*DPO, "--train.max_steps", 4])
    assert code == 2 and stderr.strip().splitlines()[-1].startswith("error: out was started on other inputs: train data")
    assert [r["step"] for r in read_metrics(d / "out")] == [1, 2]  # untouched
    code, stderr = run_in(d, "betadpo.py", [*DPO, "--train.max_steps", 4, "--train.allow_changed_inputs", "true"])
    assert code == 0, stderr[-2000:]
    assert "warning: out: train data (data.dataset: other content), eval data (data.dataset / data.eval_size: other content) " \
           "changed since the run started; resuming anyway" in stderr
    assert [r["step"] for r in read_metrics(d / "out")] == [1, 2, 3, 4]
    pinned = json.loads((d / "out" / "inputs.json").read_text())
    assert pinned["earlier"] == [{"until_step": 2, **first}] and pinned["train data"] != first["train data"]
    assert pinned["model"] == first["model"] and pinned["tokenizer"] == first["tokenizer"]


def test_fingerprints_see_content_not_paths_or_times(tmp_path, tiny_model):
    from plumbing.inputs import model_fingerprint, tokenizer_fingerprint
    from plumbing.models import load_tokenizer
    from conftest import save_tiny_model

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)  # another path, other modification times: the same model
    os.utime(copy / "model.safetensors", (0, 0))
    assert model_fingerprint(str(copy)) == model_fingerprint(str(tiny_model))
    save_tiny_model(copy, seed=1)
    assert model_fingerprint(str(copy)) != model_fingerprint(str(tiny_model))
    tokenizer = load_tokenizer(str(tiny_model), False)
    before = tokenizer_fingerprint(tokenizer)
    tokenizer.chat_template = "{{ messages }}"
    assert tokenizer_fingerprint(tokenizer) != before


# ---- one job per output directory ----------------------------------------------------------------------
def test_a_second_job_on_a_live_directory_is_refused_and_a_killed_jobs_lock_is_taken_over(tmp_path, capsys):
    from plumbing import run_lock

    out = tmp_path / "run"
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "sft.py"), *map(str, SFT), "--train.output_dir", str(out), "--train.max_steps", "100000"]
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while first.poll() is None and not (out / "metrics.jsonl").exists():
            time.sleep(0.05)
        result = run_here("sft.py", *cmd[2:], check=False)  # the second job, in this process: refused before any work
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert re.fullmatch(rf"error: train\.output_dir: {re.escape(str(out))} is in use by another job \(host "
                            rf"{re.escape(socket.gethostname())}, pid {first.pid}, started .* UTC, last heartbeat less than a minute "
                            rf"ago\); wait for it to end, or use another train\.output_dir \(if that job is gone, delete "
                            rf"{re.escape(str(out))}/lock\.json\)", last_line(result)), last_line(result)
        assert json.loads((out / "lock.json").read_text())["pid"] == first.pid  # still the first job's
    finally:
        first.kill()
        first.wait()
    # killed: its lock stays behind, and is taken over (its pid is gone on this host)
    run_lock.acquire(out)
    try:
        warning = capsys.readouterr().err
        assert f"warning: {out}/lock.json: taking over the lock of a job that is gone (host {socket.gethostname()}, pid " \
               f"{first.pid}, " in warning and f": its process {first.pid} is gone)" in warning, warning
        assert json.loads((out / "lock.json").read_text())["pid"] == os.getpid()
    finally:
        run_lock.release()
    assert not (out / "lock.json").exists() and out.is_dir()  # released; the run's directory stays


def test_stale_locks_by_host_pid_and_heartbeat(tmp_path):
    from plumbing.errors import UserError
    from plumbing.run_lock import STALE_AFTER_S, _proc_start, acquire, release, stale_reason

    here = socket.gethostname()
    me = {"host": here, "pid": os.getpid(), "proc_start": _proc_start(os.getpid())}
    assert stale_reason(me, 10 * STALE_AFTER_S) is None  # alive on this host: never stale, whatever the heartbeat
    assert "now belongs to another process" in stale_reason({**me, "proc_start": me["proc_start"] + 1}, 0)  # pid reused
    assert stale_reason({"host": "node17", "pid": 1}, STALE_AFTER_S - 1) is None  # another host: its heartbeat decides
    assert "no heartbeat from host node17" in stale_reason({"host": "node17", "pid": 1}, STALE_AFTER_S + 1)
    lock = tmp_path / "lock.json"
    lock.write_text(json.dumps({"host": "node17", "pid": 1, "started": "then"}))
    with pytest.raises(UserError, match="in use by another job .host node17, pid 1, started then"):
        acquire(tmp_path)
    os.utime(lock, (time.time() - STALE_AFTER_S - 60,) * 2)  # its heartbeat stopped 11 minutes ago
    acquire(tmp_path)
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    release()
    assert not lock.exists()
