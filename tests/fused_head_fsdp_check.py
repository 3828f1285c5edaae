"""Test-only: betadpo's sequence_logps through the fused LM head, on a model accelerate has sharded with FSDP2,
against one unsharded copy's plain_sequence_logps (the tied model with prefix sharing). Both ranks score the same
batch, so FSDP's averaged gradients are that batch's gradients. `check` runs inside tests/precision_check.py's
2-process launch (tests/test_precision.py); by itself: accelerate launch ... tests/fsdp_launch.py this file.
Prints one line per rank and model: "fused-head-fsdp2 rank R tied T ok|MISMATCH ... fused calls N"."""

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: betadpo, plumbing

import torch
from accelerate import Accelerator
from torch.distributed.tensor import DTensor

import betadpo  # noqa: E402,F401  (importable as the scripts see it)
import plumbing.fused_head as fused_head
from plumbing import fast_logps
from betadpo import sequence_logps
from plumbing.distributed import end_processes
from test_fused_head import pairs_batch, tiny_llama
from test_prefix_sharing import norms_in_their_dtype



def check(accelerator):
    """Both models (tied, untied) on `accelerator` (FSDP2): one line each on stdout. The counting wrappers below are
    undone afterwards (the launch goes on to other checks)."""
    assert accelerator.is_fsdp2, accelerator.distributed_type
    kernel, build = fused_head.fused_logps, fast_logps.prefix_sharing_mask
    try:
        compare(accelerator, kernel, build)
    finally:
        fused_head.fused_logps, fast_logps.prefix_sharing_mask = kernel, build


def compare(accelerator, kernel, build):
    tok, batch = pairs_batch()
    calls = []
    fused_head.fused_logps = lambda *a, **kw: calls.append(1) or kernel(*a, **kw)  # count the fused head's forwards
    masks = []
    fast_logps.prefix_sharing_mask = lambda *a: masks.append(1) or build(*a)  # count the prefix-shared forwards
    for tied in (True, False):
        calls.clear()
        model = tiny_llama(len(tok), tied, torch.float64).train()
        unsharded = norms_in_their_dtype(copy.deepcopy(model))  # fp64 norms: test_prefix_sharing.norms_in_their_dtype
        norms_in_their_dtype(model)  # (after the copy: each model's norms read their own weights)
        plain = sequence_logps(unsharded, batch, "plain", prompt_rows=4)
        (plain["sum"].sum() - 0.5 * plain["avg"].sum()).backward()
        sharded, _ = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.0))
        assert all(isinstance(p, DTensor) for p in sharded.parameters())
        # the hook installed around the sharded forward; the tied model's pairs with prefix sharing (one sequence per
        # pair behind an explicit mask: plumbing/fast_logps.py), the untied one's unshared
        ours = sequence_logps(sharded, batch, "fused", prompt_rows=4, prefix_sharing=tied)
        (ours["sum"].sum() - 0.5 * ours["avg"].sum()).backward()
        assert len(masks) == tied, "prefix sharing ran on the tied model's forward only"
        masks.clear()
        value_err = max((ours[k] - plain[k]).abs().max().item() for k in ("sum", "avg", "prompt"))
        expected = dict(unsharded.named_parameters())
        grad_err = max(((p.grad.full_tensor() - expected[n].grad).abs().max() / expected[n].grad.abs().max()).item()
                       for n, p in sharded.named_parameters())
        ok = value_err <= 1e-10 and grad_err <= 1e-10
        # one write per line: the two processes share the pipe, and print's separate "\n" write can interleave
        sys.stdout.write(f"fused-head-fsdp2 rank {accelerator.process_index} tied {tied} {'ok' if ok else 'MISMATCH'} log-prob "
                         f"error {value_err:.1e} gradient error {grad_err:.1e} fused calls {len(calls)}\n")
        sys.stdout.flush()


if __name__ == "__main__":
    accelerator = Accelerator()
    check(accelerator)
    end_processes(accelerator)  # wait, settle gloo's threads (plumbing/distributed.py), destroy the group
