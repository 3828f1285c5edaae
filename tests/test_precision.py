"""Log-prob precision on every launch: the per-sequence log-prob sums are fp32 in every cell of {one process, DDP × 2,
FSDP2 × 2} × {fp32, bf16}, on a tiny Llama and on SmolLM2 (its first 2 blocks) with real UltraFeedback rows; bf16 agrees with fp32
within the budget docs/ALGORITHM.md (Precision) derives; activation checkpointing under FSDP2 changes no loss; a
bf16 FSDP2 betadpo.py run matches a bf16 one-process run;
eval.py under DDP and FSDP2 gives one process's metrics. The multi-process cells share one 2-process launch
(tests/precision_check.py), whose SmolLM2 is the first 2 blocks of the session's SmolLM2 run's final/ (the
GGUF file is read once)."""

import json
import re

import pytest
import torch

import betadpo
from conftest import ROOT, read_metrics, save_tiny_model
from plumbing.config import parse_config
from test_fsdp import launch
from test_real_model import first_blocks, hh_file, smollm2_run  # noqa: F401  (fixtures)

ROWS = ROOT / "tests" / "fixtures" / "ultrafeedback-binarized-8.jsonl"
U = 2.0 ** -8  # bf16's unit roundoff: 8 significant bits


def run_flags(model, out, *extra):
    """3 bf16 optimizer steps of β-DPO with every mechanism on (2 micro-batches a step, held-out pairs at the end)."""
    return [str(a) for a in ["--model.name_or_path", model, "--train.output_dir", out, "--data.num_train", 32, "--data.eval_size", 4,
            "--eval.batch_size", 2, "--train.batch_size", 8, "--train.grad_accum", 2, "--train.lr", 1e-2,
            "--train.warmup_steps", 1, "--loss.alpha", 0.6, "--loss.filter_ratio", 0.25, "--train.max_steps", 3,
            "--train.save_every", 3, "--train.mixed_precision", "bf16", *extra]]


def eval_flags(reference, policy, out):
    """eval.py on 5 held-out sort pairs (3 chunks: uneven over 2 processes, one runs a padding forward) and 3
    prompts, a policy against another model (margins are not all 0)."""
    return [str(a) for a in ["--model.name_or_path", reference, "--eval.policy", policy, "--data.eval_size", 5,
                             "--eval.batch_size", 2, "--eval.num_prompts", 3, "--eval.samples_per_prompt", 2,
                             "--eval.max_new_tokens", 4, "--eval.output_dir", out]]


def test_log_prob_sums_are_fp32_and_bf16_within_budget_on_every_launch(tmp_path, tiny_model, smollm2_run, monkeypatch):
    import precision_check

    # SmolLM2's first 2 of 30 blocks: its real vocabulary, tied head and logit scale on real rows, which is what the
    # log-prob sums' precision depends on (the budget is per token, from the logits); 30 blocks cost ~25 CPU-s more
    smollm2 = first_blocks(smollm2_run[0] / "final", tmp_path / "smollm2_2_blocks")
    other = save_tiny_model(tmp_path / "other", seed=1)
    fsdp_run, one_run = tmp_path / "fsdp", tmp_path / "one"
    evaluated = eval_flags(tiny_model, other, tmp_path / "eval")
    result = launch("tests/precision_check.py", tiny_model, smollm2, ROWS, "--eval", *evaluated, "--fused-head", "--gc",
                    "--run", *run_flags(tiny_model, fsdp_run, "--train.gradient_checkpointing", "true"))
    # This launch also carries test_fused_head's FSDP2 case (a launch of its own would cost ~13 CPU-s): under FSDP2
    # (accelerate shards every decoder layer, the final norm + LM head + tied embedding as one unit, and the root)
    # the fused head's log-probs and gathered gradients equal one unsharded process's plain path, to 1e-10 in fp64.
    lines = re.findall(r"fused-head-fsdp2 rank \d tied \w+ \w+ log-prob error \S+ gradient error \S+ fused calls \d+", result.stdout)
    assert len(lines) == 4, result.stdout[-3000:]  # tied and untied, on both ranks
    assert all(" ok " in line and "fused calls 1" in line for line in lines), lines
    found = {row["cell"]: row for row in map(json.loads, (line for line in result.stdout.splitlines() if line.startswith('{"cell"')))}
    # The one-process cells here, with the same functions; and each model's logit scale, from fp32 logits.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    models = {name: (torch_model(path), batch) for name, (path, batch) in precision_check.batches(tiny_model, smollm2, str(ROWS)).items()}
    found.update(precision_check.cells("one", False, models))
    scale = {name: torch.tensor(precision_check.logit_scale(model, batch)) for name, (model, batch) in models.items()}
    found.update(precision_check.eval_cells("one", False, evaluated))
    cells = [f"{layout}/{precision}/{name}/{role}" for layout in ("one", "ddp", "fsdp2") for precision in ("fp32", "bf16")
             for name, role in (("tiny", "policy"), ("tiny", "reference"), ("smollm2", "policy"))
             if not (name == "smollm2" and precision == "fp32" and layout != "one")]  # (fp32 as one process: precision_check.cells)
    assert sorted(c for c in found if not c.startswith(("gc/", "eval/"))) == sorted(cells)
    for cell in cells:
        assert found[cell]["dtype"] == "torch.float32", (cell, found[cell]["dtype"])  # bf16 under FSDP2 before the fix
        layout, precision, name, role = cell.split("/")
        ours, exact = torch.tensor(found[cell]["sum"]), torch.tensor(found[f"one/fp32/{name}/policy"]["sum"])
        if precision == "fp32" or layout == "ddp":  # the same arithmetic as one process: equal up to fp32 summation order
            torch.testing.assert_close(ours, torch.tensor(found[f"one/{precision}/{name}/policy"]["sum"]), rtol=1e-5, atol=1e-5)
        budget = 2 * U * scale[name]  # per sequence: Σ_t 2u·max_v|z_t,v| (docs/ALGORITHM.md, Precision)
        assert ((ours - exact).abs() <= budget).all(), (cell, (ours - exact).tolist(), budget.tolist())
    assert any(found[f"one/bf16/{name}/policy"]["sum"] != found[f"one/fp32/{name}/policy"]["sum"] for name in models)  # bf16 ran
    # eval.py honours train.mixed_precision in one process, under DDP and under FSDP2: bf16 moves its log-prob
    # metrics, by the same amounts in one process and under DDP (the same arithmetic); FSDP2 gives one process's
    # fp32 metrics, and in bf16 (its parameters in bf16, not autocast) the same to bf16 precision.
    for precision in ("fp32", "bf16"):
        one, ddp = found[f"eval/one/{precision}"]["metrics"], found[f"eval/ddp/{precision}"]["metrics"]
        assert one.keys() == ddp.keys() and all(one[k] == pytest.approx(ddp[k], rel=1e-5, abs=1e-6) for k in one), (one, ddp)
    one, fsdp2 = found["eval/one/fp32"]["metrics"], found["eval/fsdp2/fp32"]["metrics"]
    assert one.keys() == fsdp2.keys() and all(one[k] == pytest.approx(fsdp2[k], rel=1e-5, abs=1e-6) for k in one), (one, fsdp2)
    fp32, bf16 = found["eval/one/fp32"]["metrics"], found["eval/one/bf16"]["metrics"]
    assert fp32["reward_margin"] != bf16["reward_margin"] and fp32["reward_margin"] == pytest.approx(bf16["reward_margin"], rel=0.05)
    assert found["eval/fsdp2/bf16"]["metrics"]["reward_margin"] == pytest.approx(fp32["reward_margin"], rel=0.05)
    # Activation checkpointing under FSDP2 × 2 (bf16): the same losses, bit for bit (it recomputes the same ops).
    assert found["gc/on"]["losses"] == found["gc/off"]["losses"] and len(set(found["gc/on"]["losses"])) == 3
    # 3 bf16 steps under FSDP2 × 2 (with checkpointing) against one process: the same run to bf16 precision.
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    betadpo.train_policy(parse_config(betadpo.Config, run_flags(tiny_model, one_run)))
    one, fsdp = read_metrics(one_run), read_metrics(fsdp_run)
    assert [r["step"] for r in one] == [r["step"] for r in fsdp] == [1, 2, 3] and one[-1]["sigma"] > 0
    for a, b in zip(one, fsdp):
        for key in ("loss", "margin_mean", "M0", "sigma"):
            assert a[key] == pytest.approx(b[key], rel=4 * U, abs=4 * U), (a["step"], key, a[key], b[key])


def torch_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
