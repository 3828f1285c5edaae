"""The fused LM head (plumbing/fused_head.py) gives the plain path's log-probs and gradients, and keeps no logits.

Plain path: logits = h @ Wᵀ (+ b), then log_softmax in fp32 and gather, differentiated by autograd.
"""

import pytest
import torch
import torch.nn.functional as F

import plumbing.fused_head as fused_head
from betadpo import sequence_logps


def plain_sequence_logps(model, batch, prompt_rows=0):  # train.logps: plain
    return sequence_logps(model, batch, "plain", prompt_rows)


def fused_sequence_logps(model, batch, prompt_rows=0):  # train.logps: fused
    return sequence_logps(model, batch, "fused", prompt_rows)


def count_fused_calls(monkeypatch, calls: list):
    """Append 1 to `calls` each time the fused LM head computes log-probs (once per forward that takes it)."""
    kernel = fused_head.fused_logps
    monkeypatch.setattr(fused_head, "fused_logps", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
from plumbing.data import collate_pairs, tokenize_pairs
from plumbing.fused_head import TILE_COLS, TILE_ROWS, fused_head_applies, fused_logps
from plumbing.sort_task import build_tokenizer
from test_perf import tiny_of


def plain_logps(h, weight, targets, bias=None):
    """The textbook computation: all logits, a full fp32 log-softmax, gather; 0 where the target is masked."""
    logits = F.linear(h, weight, bias)  # (n, V), in autocast's dtype when it is on
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
    return logp.gather(-1, targets.clamp(min=0)[:, None])[:, 0] * (targets >= 0)


def head_problem(V, H=8, n=200, dtype=torch.float32, tied=False, bias=False, seed=0):
    """Hidden states from a small computation on token ids (through the embedding, so that a tied W gets gradient
    from both of its uses), an LM-head weight, targets with masked ones, and per-position gradient weights g with
    zeros (positions with no gradient: filtered pairs, detached prompt tokens)."""
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(V, H, generator=g, dtype=dtype) * 0.7).requires_grad_()
    emb = W if tied else (torch.randn(V, H, generator=g, dtype=dtype) * 0.7).requires_grad_()
    A = torch.randn(H, H, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(V, generator=g, dtype=dtype).requires_grad_() if bias else None
    ids, targets = torch.randint(0, V, (n,), generator=g), torch.randint(0, V, (n,), generator=g)
    targets[::37] = -100
    weights = torch.randn(n, generator=g, dtype=dtype)
    weights[10:50] = 0
    params = [p for p in {id(t): t for t in (W, emb, A, b) if t is not None}.values()]

    def run(logps_fn, **kw):
        for p in params:
            p.grad = None
        h = torch.tanh(F.embedding(ids, emb) @ A)  # (n, H)
        out = logps_fn(h, W, targets, b, **kw)
        (out * weights).sum().backward()
        return out.detach(), [p.grad.clone() for p in params]

    return run


def rel_err(a, b):
    """max |a − b| / max |b|: relative to the tensor's scale (single elements near 0 have no useful relative error)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("V", [16384, 49152, 92544])
@pytest.mark.parametrize("tied", [False, True])
def test_values_and_gradients_equal_the_plain_path_fp32(V, tied):
    """fp32 to 1e-6 (relative to each tensor's largest value), with tiles of 64 positions × 5,000 vocabulary entries
    that split the 200 positions and the vocabulary unevenly; tied: W is also the input embedding, and gets both
    uses' gradient."""
    run = head_problem(V, tied=tied, bias=not tied)
    ours, ours_grads = run(fused_logps, tiles=(64, 5000))
    plain, plain_grads = run(plain_logps)
    assert ours.dtype == torch.float32 and (ours[::37] == 0).all() and (ours[1:37] < 0).all()
    assert rel_err(ours, plain) <= 1e-6
    for a, b in zip(ours_grads, plain_grads):
        assert b.abs().max() > 0 and rel_err(a, b) <= 1e-6


def test_float64_to_rounding_and_any_tile_size():
    run = head_problem(1000, dtype=torch.float64, tied=True, bias=True)
    plain, plain_grads = run(plain_logps)
    for tiles in ((1, 1000), (7, 333), (199, 1), (200, 64), (1000, 1000)):  # uneven, one row / column, all in one
        ours, grads = run(fused_logps, tiles=tiles)
        assert ours.dtype == torch.float64 and rel_err(ours, plain) <= 1e-14
        assert all(rel_err(a, b) <= 1e-13 for a, b in zip(grads, plain_grads))


def test_bf16_autocast_matches_the_plain_path_under_autocast():
    """Under bf16 autocast both paths run the LM-head matmuls in bf16 and the softmax in fp32. Stated tolerance:
    log-probs to 1e-5 relative (both round the same bf16 logits); gradients to 1e-2 relative, the precision of the
    bf16 matmuls (ours sums its gradients over tiles in fp32, the plain path's come from one bf16 matmul each)."""
    run = head_problem(16384, H=16, tied=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, grads = run(fused_logps, tiles=(64, 5000))
        plain, plain_grads = run(plain_logps)
    assert ours.dtype == torch.float32 and rel_err(ours, plain) <= 1e-5
    assert all(rel_err(a, b) <= 1e-2 for a, b in zip(grads, plain_grads))
    exact, _ = run(plain_logps)  # without autocast: fp32 logits differ from bf16 ones by far more than 1e-5
    assert rel_err(ours, exact) > 1e-4


def test_backward_keeps_no_logits_and_memory_is_flat_in_the_number_of_positions():
    """What forward saves for backward is h, W, targets and two (n,) vectors: nothing of size positions × V. The
    work space is one tile, 32 MiB of fp32 logits by default."""
    V, H = 16384, 8
    for n in (100, 1000):
        h, W = torch.randn(n, H, requires_grad=True), torch.randn(V, H, requires_grad=True)
        out = fused_logps(h, W, torch.randint(0, V, (n,)), tiles=(64, 1000))
        saved = out.grad_fn.next_functions[0][0].saved_tensors  # fused_logps = _FusedLinearLogProb(...) · valid
        assert max(t.numel() for t in saved if t is not None) == V * H
        assert sum(t.numel() for t in saved if t is not None) <= V * H + n * H + 3 * n
    assert TILE_ROWS * TILE_COLS * 4 == 32 * 2**20


def test_no_gradient_at_masked_targets_and_rows_without_gradient():
    h, W = torch.randn(6, 4, requires_grad=True), torch.randn(30, 4, requires_grad=True)
    targets = torch.tensor([3, -100, 5, 30, 7, 1])  # -100 and V (out of range) are masked
    out = fused_logps(h, W, targets, tiles=(4, 7))
    (out * torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 2.0])).sum().backward()
    assert out[1] == 0 and out[3] == 0
    assert (h.grad[[1, 3, 4]] == 0).all() and (h.grad[[0, 2, 5]] != 0).any(-1).all()


# ---- end to end: betadpo.sequence_logps through the fused head ----------------------------------------------
def pairs_batch():
    tok = build_tokenizer()
    digits = ["3120", "9", "41", "870215", "5", "62", "1", "9081726354"]
    rows = [{"prompt": f"sort {d}: ", "chosen": "".join(sorted(d)), "rejected": d} for d in digits]
    return tok, collate_pairs(tokenize_pairs(tok, rows, 64, 32), tok.pad_token_id)


def tiny_llama(vocab, tied, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied)
    return LlamaForCausalLM(config).to(dtype)


@pytest.mark.parametrize("arch, dtype, tol", [("llama-tied", torch.float64, 1e-12), ("llama-untied", torch.float64, 1e-12),
                                              ("llama-tied", torch.float32, 1e-5), ("gpt_neox", torch.float64, 1e-12)])
def test_sequence_logps_through_the_fused_head_equal_the_plain_path(monkeypatch, arch, dtype, tol):
    """betadpo.sequence_logps (packed, the LM head fused, tiles of 5 positions × 7 vocabulary entries, so that they
    split sequences, packed rows and the vocabulary) gives plain_sequence_logps' numbers and parameter gradients,
    prompt rows included."""
    tok, batch = pairs_batch()
    monkeypatch.setattr(fused_head, "TILE_ROWS", 5)
    monkeypatch.setattr(fused_head, "TILE_COLS", 7)
    calls = []
    count_fused_calls(monkeypatch, calls)

    def run(logps):
        torch.manual_seed(0)
        m = tiny_of("gpt_neox", len(tok), tok.pad_token_id, tok.eos_token_id).to(dtype) if arch == "gpt_neox" else \
            tiny_llama(len(tok), arch == "llama-tied", dtype)
        m.eval()  # no KV cache by default (packing needs none); no dropout either way
        out = logps(m, batch, prompt_rows=4)
        (out["sum"].sum() - 0.5 * out["avg"].sum() + out["prompt"].sum()).backward()
        return m, out, {n: p.grad for n, p in m.named_parameters()}

    m, plain, plain_grads = run(plain_sequence_logps)
    assert fused_head_applies(m) and not calls
    _, ours, grads = run(fused_sequence_logps)
    assert calls == [1]
    for k in ("sum", "avg", "prompt"):
        assert torch.allclose(ours[k], plain[k], rtol=0, atol=tol), k
    head = m.get_output_embeddings().weight
    assert (head is m.get_input_embeddings().weight) == (arch == "llama-tied")
    for name, g in grads.items():
        assert plain_grads[name].abs().max() > 0
        assert ((g - plain_grads[name]).abs().max() / plain_grads[name].abs().max()).item() <= tol, name


def test_lora_wrapped_models_take_the_fused_head_with_the_plain_paths_numbers(monkeypatch):
    """A peft LoRA policy (adapters moved off B = 0, so they matter) and its adapters-off reference view: both take
    the fused head, with plain_sequence_logps' log-probs and adapter gradients (fp64; tiles split everything)."""
    from plumbing import lora
    from plumbing.config import ModelArgs

    tok, batch = pairs_batch()
    monkeypatch.setattr(fused_head, "TILE_ROWS", 5)
    monkeypatch.setattr(fused_head, "TILE_COLS", 7)
    calls = []
    count_fused_calls(monkeypatch, calls)
    policy = lora.add_adapters(tiny_llama(len(tok), True, torch.float64), ModelArgs(lora_r=4, lora_alpha=8), "base")
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # B = 0 would make the adapters invisible
    reference = lora.AdaptersOff(policy)
    assert fused_head_applies(policy) and fused_head_applies(reference)

    def run(logps, model):
        policy.zero_grad(set_to_none=True)
        out = logps(model, batch, prompt_rows=4)
        if model is policy:
            (out["sum"].sum() - 0.5 * out["avg"].sum() + out["prompt"].sum()).backward()
        return out, {n: p.grad for n, p in policy.named_parameters() if p.requires_grad}

    for model, fused_calls in ((policy, [1]), (reference, [1, 1])):
        plain, plain_grads = run(plain_sequence_logps, model)
        ours, grads = run(fused_sequence_logps, model)
        assert calls == fused_calls
        for k in ("sum", "avg", "prompt"):
            assert torch.allclose(ours[k], plain[k], rtol=0, atol=1e-12), k
        if model is policy:
            assert plain_grads and all(g.abs().max() > 0 for g in plain_grads.values())
            for name, g in grads.items():
                assert ((g - plain_grads[name]).abs().max() / plain_grads[name].abs().max()).item() <= 1e-12, name
    with torch.no_grad():  # the adapters really move the policy: on ≠ off
        assert (fused_sequence_logps(policy, batch)["sum"] - fused_sequence_logps(reference, batch)["sum"]).abs().max() > 1e-3


def test_the_switch_and_other_architectures_keep_the_logits_path(monkeypatch):
    tok, batch = pairs_batch()
    calls = []
    count_fused_calls(monkeypatch, calls)
    m = tiny_llama(len(tok), True, torch.float32)
    for logps in ("plain", "fast"):  # train.logps without the fused head
        sequence_logps(m, batch, logps)
    assert not calls
    sequence_logps(m, batch, "fused")
    assert calls == [1]
    assert not any(h for h in (m.lm_head._forward_hooks, m.lm_head._forward_pre_hooks))  # installed for that forward only
    from transformers import Qwen2Config, Qwen2ForCausalLM  # not in FUSED_HEAD_MODEL_TYPES: never fused

    assert not fused_head_applies(Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)))


# The fused head under FSDP2 (2 CPU processes): tests/fused_head_fsdp_check.py, run inside
# tests/test_precision.py's launch.
