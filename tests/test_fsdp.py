"""FSDP2 run for real on 2 CPU processes, bf16 on CPU, and the launches accelerate gets wrong silently.

accelerate uses FSDP only on GPUs; tests/fsdp_launch.py (test-only) makes its own FSDP2 code path run on gloo CPU
processes, so that sharding, sharded checkpoints, resume, gathering final/ and evaluation are exercised without a
GPU. Launches are few and tiny: each costs a process start-up of several seconds.
"""

import json
import os
import re
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from plumbing.fast_logps import token_logps
from conftest import ROOT, _free_port, read_metrics, run_command, run_main
from test_betadpo_train import train_in_process

COMPARED = ["loss", "beta", "beta_mean", "beta_scale", "kept", "M0", "sigma", "margin_mean", "rewards/accuracies", "grad_norm"]
EVAL_COMPARED = ["loss", "margin_mean", "rewards/accuracies", "logps/chosen"]
SHARDED = re.compile(r"fsdp2_prepare_model rank (\d): (\w+) (\d+)/(\d+) parameters are DTensors, (\d+) trainable")
LOADED = re.compile(r"fsdp2_prepare_model rank (\d): .*, loaded on (\w+)")  # where its weights were before sharding


def launch(script, *args, fsdp=True, cpu=True, check=True):
    """`accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2` of `script`, as users type
    it; fsdp: through tests/fsdp_launch.py (real FSDP2 on CPU); cpu: ACCELERATE_USE_CPU=true."""
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    if cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    target = [str(ROOT / "tests" / "fsdp_launch.py")] if fsdp else []
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate/fsdp.yaml"),
           "--num_processes", "2", "--main_process_port", str(_free_port()), *target, str(ROOT / script), *map(str, args)]
    return run_command(cmd, env, check=check)  # a hang fails there, with every process's stack


def flags(model, out, *extra):
    """Every β-DPO mechanism on; 2 micro-batches per step; held-out evaluation every step in 3 chunks of 2 pairs
    (uneven over 2 processes: one runs a padding forward)."""
    return ["--model.name_or_path", model, "--train.output_dir", out, "--data.num_train", 64, "--data.eval_size", 5,
            "--eval.batch_size", 2, "--train.batch_size", 8, "--train.grad_accum", 2, "--train.lr", 1e-2,
            "--train.warmup_steps", 1, "--loss.alpha", 0.6, "--loss.filter_ratio", 0.25, "--loss.learn_scale", "true",
            "--loss.ppl_scale", "true", "--loss.scale_lr", 0.05, "--train.save_every", 2, "--train.eval_every", 1, "--model.dtype",
            "float64", *extra]


def assert_rows_close(a, b, keys, rel):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for k in keys:
            assert x[k] == pytest.approx(y[k], rel=rel, abs=1e-6), (x["step"], k, x[k], y[k])


def assert_weights_close(a, b, rel):
    """‖a − b‖ / ‖a‖ per tensor (fp32 sums in another order move single elements far more than whole tensors)."""
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        assert ((tensor - b[name]).norm() / tensor.norm()).item() <= rel, name


def final_weights(final) -> dict:
    """final/'s tensors, from model.safetensors or from the files its model.safetensors.index.json lists."""
    index = final / "model.safetensors.index.json"
    if not index.exists():
        return load_file(final / "model.safetensors")
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return {k: v for name in files for k, v in load_file(final / name).items()}


def test_betadpo_fsdp2_shards_checkpoints_resumes_and_matches_one_process(tmp_path, tiny_model, monkeypatch):
    """In float64, so that a logic error cannot hide in float noise: in fp32, Adam's g/√v turns the ~1e-7 of
    gradients summed in another order into ~1e-4 differences of the margins after one step at lr 1e-2.
    final/ under FSDP2 is gathered and written a file at a time; files of 20 kB split the tiny model into several."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("_TEST_FINAL_FILE_BYTES", "20000")
    one, two = tmp_path / "one", tmp_path / "fsdp"
    train_in_process(*flags(tiny_model, one, "--train.max_steps", 3))  # the same train_policy as `python betadpo.py`
    first = launch("betadpo.py", *flags(tiny_model, two, "--train.max_steps", 2))
    # Policy and reference both sharded: every parameter a DTensor, on both ranks.
    prepared = [m.groups() for m in SHARDED.finditer(first.stdout)]
    assert len(prepared) == 4, first.stdout
    for rank, cls, sharded, total, trainable in prepared:
        assert cls == "FSDPLlamaForCausalLM" and sharded == total and trainable in (total, "0")
    assert sorted((rank, trainable == "0") for rank, *_, trainable in prepared) == [("0", False), ("0", True), ("1", False), ("1", True)]
    # Memory-safe loading: only the main process read the weights; rank 1 built both models on the meta device.
    assert sorted(LOADED.findall(first.stdout)) == [("0", "cpu"), ("0", "cpu"), ("1", "meta"), ("1", "meta")]
    # The sharded checkpoint: the policy (one shard per rank) and its optimizer, no reference.
    ckpt = two / "checkpoints" / "step-00000002"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["optimizer_0", "pytorch_model_fsdp_0"]
    assert sorted(f.name for f in (ckpt / "pytorch_model_fsdp_0").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    # Stopped after its step-2 checkpoint; the same command with max_steps 3 resumes and runs step 3.
    shutil.rmtree(two / "final")
    second = launch("betadpo.py", *flags(tiny_model, two, "--train.max_steps", 3))
    assert "resumed from" in second.stdout and "step 2" in second.stdout
    assert read_metrics(one)[-1]["sigma"] > 0  # the β-DPO mechanisms really ran
    assert_rows_close(read_metrics(one), read_metrics(two), COMPARED, rel=1e-6)  # (M₀, σ and c are kept in fp32)
    assert_rows_close(read_metrics(one, "eval"), read_metrics(two, "eval"), EVAL_COMPARED, rel=1e-6)
    # final/: gathered into one plain checkpoint that transformers loads.
    assert json.loads((two / "final" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    streamed = final_weights(two / "final")
    assert_weights_close(load_file(one / "final" / "model.safetensors"), streamed, rel=1e-10)  # one process: one file
    # Written a file at a time, in save_pretrained's layout for big models; every file at most 20 kB or one tensor.
    index = json.loads((two / "final" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(index["weight_map"]) == sorted(streamed)
    for name in files:
        assert (two / "final" / name).stat().st_size <= 20000 + 1000 or len(load_file(two / "final" / name)) == 1, name
    # Bit for bit the weights of the last sharded checkpoint (step 3, the same weights, consolidated by torch).
    dcp_to_torch_save(two / "checkpoints" / "step-00000003" / "pytorch_model_fsdp_0", tmp_path / "step3.pt")
    saved = torch.load(tmp_path / "step3.pt", weights_only=False)["model"]
    assert {k: v for k, v in saved.items() if k != "lm_head.weight"}.keys() == streamed.keys()  # tied: stored once
    assert all(torch.equal(saved[k], v) for k, v in streamed.items())
    loaded = AutoModelForCausalLM.from_pretrained(two / "final", dtype=torch.float64).state_dict()  # transformers reads it
    assert all(torch.equal(loaded[k], v) for k, v in streamed.items())
    # (eval.py under FSDP2 × 2, uneven chunks and prompts, against one process: tests/test_precision.py's launch)


def test_sft_fsdp2_bf16_matches_one_process(tmp_path, tiny_model, capsys):
    """sft.py under FSDP2 with bf16 (the headline's setting), from a saved model as at scale (only the main process
    reads the weights), against one process with bf16 autocast."""
    from transformers import AutoModelForCausalLM

    args = ["--config", "configs/sort_sft.yaml", "--model.name_or_path", tiny_model, "--train.max_steps", 3, "--data.num_sft", 256,
            "--data.eval_size", 4, "--train.batch_size", 16, "--train.lr", 1e-2, "--train.mixed_precision", "bf16"]
    code, _, stderr = run_main("sft.py", *args, "--train.output_dir", tmp_path / "one", capsys=capsys)  # in this process
    assert code == 0, stderr[-3000:]
    result = launch("sft.py", *args, "--train.output_dir", tmp_path / "fsdp")
    assert len([m for m in SHARDED.finditer(result.stdout)]) == 2  # one model, both ranks
    assert sorted(LOADED.findall(result.stdout)) == [("0", "cpu"), ("1", "meta")]
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "fsdp")
    assert len(two) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in two)
    assert_rows_close(one, two, ["loss"], rel=2e-2)  # bf16 matmuls: the same numbers to bf16 precision
    AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "final")


def test_fsdp_config_on_cpu_warns_once_and_runs_ddp_bf16(tmp_path, tiny_model):
    """Without the test launcher accelerate falls back to DDP on CPUs: one warning line, then a normal bf16 run."""
    out = tmp_path / "run"
    result = launch("betadpo.py", *flags(tiny_model, out, "--train.max_steps", 1, "--train.mixed_precision", "bf16"), fsdp=False)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: the accelerate config asks for FSDP, but on CPUs accelerate runs DDP: nothing is sharded, "
                        "every process holds whole models"]
    assert "fsdp2_prepare_model" not in result.stdout and torch.isfinite(torch.tensor(read_metrics(out)[0]["loss"]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="with GPUs the processes do form a group")
def test_processes_that_form_no_group_stop_before_writing(tmp_path, tiny_model):
    """`accelerate launch --num_processes 2` without GPUs or ACCELERATE_USE_CPU: two single-process runs otherwise."""
    out = tmp_path / "run"
    result = launch("betadpo.py", *flags(tiny_model, out, "--train.max_steps", 1), fsdp=False, cpu=False, check=False)
    ours = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0 and len(ours) == 1 and "did not form one process group" in ours[0], result.stderr[-3000:]
    assert not out.exists()


def test_log_prob_step_keeps_softmax_in_the_autocast_dtype():
    """Under accelerate's bf16 the prepared policy's logits arrive in fp32 (its forward upcasts outputs); the
    log-prob step keeps its softmax for backward in bf16 anyway, and the gradient reaches the model."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers import LlamaConfig, LlamaForCausalLM

    try:
        accelerator = Accelerator(mixed_precision="bf16", cpu=True)
        model = accelerator.prepare_model(LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                                       num_hidden_layers=1, num_attention_heads=2)))
        ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
        with accelerator.autocast():
            logits = model(input_ids=ids).logits  # (2, 6, 64)
            logps = token_logps(logits[:, :-1], ids[:, 1:])
        assert logits.dtype == torch.float32 and logps.dtype == torch.float32
        kept = logps.grad_fn.next_functions[0][0].saved_tensors[0]  # token_logps = _LabelLogProb(...) · valid
        assert kept.dtype == torch.bfloat16 and kept.shape == logits[:, :-1].shape
        expected = torch.log_softmax(logits[:, :-1].detach().float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        assert torch.allclose(logps.detach(), expected, atol=1e-5)  # log-probs themselves stay fp32
        logps.sum().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_two_machine_config_gives_torchrun_two_nodes_of_eight():
    """configs/accelerate/fsdp_2machines.yaml as accelerate launch reads it on machine 1 (nothing is started)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    argv = ["--config_file", str(ROOT / "configs/accelerate/fsdp_2machines.yaml"), "--machine_rank", "1", "betadpo.py"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    env = prepare_multi_gpu_env(args)
    assert (args.nnodes, args.node_rank, args.nproc_per_node, args.main_process_ip) == ("2", 1, "8", "10.0.0.1")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2" and env["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT"
