"""The memory model of docs/SCALING.md (plumbing/memory_model.py) against hand counts, and the launch guard built
on it: a launch that cannot fit stops with one line, exit 2, before anything is read; train.memory_check false
lets it through."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from betadpo import Config
from conftest import ROOT
from plumbing import memory_model
from plumbing.config import parse_config
from plumbing.errors import UserError

GB = 1e9


def config(path: str, *flags) -> Config:
    return parse_config(Config, ["--config", str(ROOT / path), *map(str, flags)])


def accelerator(processes: int = 1, fsdp: bool = False):
    return SimpleNamespace(num_processes=processes, is_fsdp2=fsdp, device=torch.device("cpu"), parallelism_config=None)


def internlm2_7b_count() -> int:
    """InternLM2.5-7B's parameters by hand: 32 layers of q, k, v, o, gate/up/down and two norms; embedding, untied
    LM head, final norm."""
    h, L, H, KV, I, V = 4096, 32, 32, 8, 14336, 92544
    kv = h // H * KV
    return L * (h * h + 2 * h * kv + h * h + 3 * h * I + 2 * h) + 2 * V * h + h


def test_the_7b_shape_and_its_terms_are_the_hand_counts():
    shape = memory_model.shape_of(memory_model.known_config("internlm/internlm2_5-7b-chat"))
    N = internlm2_7b_count()
    assert shape.params == N == 7_737_708_544
    assert shape.embed_head == 2 * 92544 * 4096 + 4096
    # One process, fp32, RMSprop, fp32 reference: 16 bytes per parameter (docs/SCALING.md: 123.8 GB).
    one = memory_model.launch_of(config("configs/internlm2_7b.yaml"), accelerator(1))
    terms = memory_model.estimate(shape, one)
    assert (terms["weights"], terms["gradients"], terms["optimizer"], terms["reference"]) == (4 * N, 4 * N, 4 * N, 4 * N)
    assert one.tokens == 64 // 2 * 2 * 512 and one.checkpointing and one.autocast and one.compute_bytes == 4
    n, h = one.tokens, 4096
    saved = 2 * (7 * h + 2 * 1024 + 4 * 14336) + 8 * h  # bf16 tensors a layer saves + fp32 residual/norm inputs, per token
    assert terms["activations"] == n * (32 * 4 * h + saved)  # checkpointed: each layer's input + one layer
    assert terms["head_backward"] == 4 * 92544 * h + 4 * n * h + 48 * 2**20  # fp32 ∂W, ∂h, one tile (no bf16 cast)
    assert terms["fsdp_unsharded"] == terms["fsdp_reduce_staging"] == 0
    assert terms["peak"] == 16 * N + terms["activations"] + terms["head_backward"]
    # FSDP2 over 8, bf16: fp32 states, bf16 reference, sharded; 4 pairs per GPU; staging of the embedding/head group.
    eight = memory_model.launch_of(config("configs/internlm2_7b.yaml"), accelerator(8, fsdp=True))
    terms = memory_model.estimate(shape, eight)
    assert terms["reference"] == 2 * N / 8 and terms["weights"] == 4 * N / 8 and eight.tokens == 4096
    layer = (N - shape.embed_head) / 32
    assert terms["fsdp_unsharded"] == 2 * (2 * layer + shape.embed_head)
    assert terms["fsdp_reduce_staging"] == (2 + 4) * shape.embed_head  # bf16 gradient + its fp32 copy
    assert terms["head_backward"] == 6 * 92544 * h + 4 * 4096 * h + 48 * 2**20
    assert 13.4 * GB < 14 * N / 8 < 13.6 * GB  # docs/SCALING.md's 13.5 GB
    # Without checkpointing at 512 tokens per sequence the step still fits an 80 GB GPU (docs/SCALING.md).
    plain = memory_model.estimate(shape, memory_model.launch_of(
        config("configs/internlm2_7b.yaml", "--train.gradient_checkpointing", "false"), accelerator(8, fsdp=True)))
    assert plain["activations"] == 4096 * 32 * saved and plain["peak"] < 80 * GB


def test_the_guard_refuses_what_cannot_fit_and_its_flag_overrides_it(monkeypatch, tiny_model):
    monkeypatch.setattr(memory_model, "device_memory", lambda acc: (80 * GB, "on a test GPU"))
    cfg = config("configs/internlm2_7b.yaml")
    with pytest.raises(UserError) as refused:
        memory_model.check_fits(cfg, accelerator(8))  # DDP over 8: whole models on every GPU
    message = str(refused.value)
    assert "\n" not in message and "8 processes, not sharded (no FSDP)" in message and "against 80.0 GB on a test GPU" in message
    assert "under FSDP over 8 processes" in message and "train.memory_check false" in message
    memory_model.check_fits(cfg, accelerator(8, fsdp=True))  # sharded over 8: fits
    memory_model.check_fits(config("configs/internlm2_7b.yaml", "--train.memory_check", "false"), accelerator(8))
    memory_model.check_fits(config("configs/sort.yaml", "--model.name_or_path", tiny_model), accelerator(1))  # a tiny model fits
    # LoRA on the 7B model, one process: no gradients or optimizer state beyond the adapters, no second model.
    lora = memory_model.launch_of(config("configs/internlm2_7b_lora.yaml"), accelerator(1))
    assert lora.trained_fraction == 0 and lora.reference_bytes == 0


def test_models_without_a_readable_config_are_left_to_the_loader(tmp_path):
    """No estimate (and no traceback) where the loader has the better message: a path that is not there, a damaged
    config.json, a name that is no hub id, a GGUF/packaged model."""
    (tmp_path / "config.json").write_text("{not json")
    for name in ("./nothere", str(tmp_path), "other..repo..id/x", "smollm2-135m", "model.gguf"):
        assert memory_model.known_config(name) is None, name


def test_the_7b_config_in_one_process_is_refused_in_one_line(tmp_path):
    """As a user launches it, offline: one line naming FSDP and the memory per device, exit 2, nothing written."""
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "betadpo.py", "--config", "configs/internlm2_7b.yaml", "--train.output_dir", out],
                            cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: this launch does not fit"), result.stderr[-2000:]
    assert "149.9 GB per device" in lines[0] and "not sharded (no FSDP)" in lines[0] and "GB available on this host" in lines[0]
    assert not out.exists()
