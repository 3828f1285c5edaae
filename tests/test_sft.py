"""sft.py: a tiny run lowers the loss and leaves a final/ that plain transformers loads."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import read_metrics, run_here, run_script


def test_sft_from_scratch_learns_and_saves(tmp_path):
    out = tmp_path / "sft"
    result = run_here("sft.py", "--config", "configs/sort_sft.yaml", "--train.output_dir", out, "--train.max_steps", 60,
                      "--model.tiny_hidden_size", 64, "--data.num_sft", 2000, "--data.eval_size", 16)
    losses = [r["loss"] for r in read_metrics(out)]
    assert len(losses) == 60
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:5]) / 5
    assert "held-out exact match (greedy, 16 prompts):" in result.stdout
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    ids = torch.tensor([tok("sort 312: ", add_special_tokens=False).input_ids + tok("123", add_special_tokens=False).input_ids])
    assert torch.isfinite(model(ids).logits).all() and model.config.hidden_size == 64


def test_sft_two_processes_match_one(tmp_path):
    """Same global batch on 1 and 2 processes: the loss is a token-mean over the global batch either way. (The one
    process: sft.py in this process, conftest.run_here; the launch under test is the 2 processes'.)"""
    common = ["--config", "configs/sort_sft.yaml", "--train.max_steps", 4, "--model.tiny_hidden_size", 32,
              "--data.num_sft", 512, "--data.eval_size", 4, "--train.batch_size", 16]
    run_here("sft.py", *common, "--train.output_dir", tmp_path / "p1")
    run_script("sft.py", *common, "--train.output_dir", tmp_path / "p2", processes=2)
    one, two = read_metrics(tmp_path / "p1"), read_metrics(tmp_path / "p2")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"])

