"""Prefix sharing (train.prefix_sharing; plumbing/fast_logps.py, 4): each pair's prompt goes through the model once,
followed by its chosen and its rejected response behind a mask that keeps them apart. Everything here is checked
against the unshared paths: the plain padded rows (betadpo.plain_logps_at) and the packed rows without sharing."""

import pytest
import torch

from betadpo import pair_logps, sequence_logps
from plumbing import fast_logps, lora
from plumbing.config import ModelArgs
from plumbing.data import collate, collate_pairs, tokenize_pairs
from plumbing.fast_logps import pack_plan, prefix_sharing_mask, shares_prefixes
from plumbing.models import load_model
from plumbing.sort_task import build_tokenizer
from test_perf import tiny_of


def mixed_pairs(tok):
    """(prompt, chosen, rejected) id lists of every shape the layout must handle: prompts cut by max_prompt_length
    (the first two: their prompts are longer than 8 tokens), responses cut by max_length, a one-token prompt,
    responses of different lengths (1 token to 10), a rejected response longer than the chosen one and the reverse,
    and an empty chosen response (its prompt fills the row)."""
    rows = [{"prompt": "sort 9081726354 then 12: ", "chosen": "0123456789", "rejected": "9081726354"},
            {"prompt": "sort 870215 and 3: ", "chosen": "012578", "rejected": "87"},
            {"prompt": "sort 41: ", "chosen": "14", "rejected": "41411"},
            {"prompt": "sort 5: ", "chosen": "5", "rejected": "55"}]
    pairs = tokenize_pairs(tok, rows, 18, 8)
    assert [len(p) for p, _, _ in pairs][:2] == [8, 8] and len(pairs[0][1]) < 11  # truncated prompts and responses
    digit = tok.convert_tokens_to_ids("7")
    return pairs + [([digit], [digit, tok.eos_token_id], [tok.eos_token_id]),  # a one-token prompt
                    (pairs[2][0] + [digit] * 3, [], pairs[2][2])]  # an empty chosen response


def norms_in_their_dtype(model):
    """The model with its RMSNorms computed in the weights' dtype. transformers' RMSNorms (Llama, Qwen2, Mistral,
    Gemma, Phi-3) compute in fp32 whatever the weights: with prefix sharing the gradient reaching a prompt token is
    the sum of both responses' before it passes back through them once, where unshared each response's passes
    alone, and fp32 rounds the two orders apart (~1e-8 of gradients ~5 in fp64). In fp64 throughout, the
    comparison isolates the layout and the mask; the fp32 test keeps transformers' own norms."""
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            offset = 1.0 if "Gemma" in type(module).__name__ else 0.0  # Gemma scales by (1 + w)
            eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
            module.forward = lambda x, m=module, e=eps, o=offset: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + e) * (o + m.weight)
    return model


def score(model, batch, logps, sharing, prompt_rows):
    out = sequence_logps(model, batch, logps, prompt_rows, sharing)
    (out["sum"].sum() + 0.5 * out["avg"].sum() + out["prompt"].sum()).backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_the_mask_lets_each_response_see_its_prompt_and_itself_only():
    """One pair, prompt x0 x1, chosen w2 w3, rejected l2 l3 l4, as one sequence (docs/ALGORITHM.md's picture),
    then a two-token sequence of its own and a padding slot, all in one row: the mask written out by hand."""
    positions = torch.tensor([[0, 1, 2, 3, 2, 3, 4, 0, 1, 0]])
    sequence = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 1, 1, -1]])
    branch = torch.tensor([[0, 0, 1, 1, 2, 2, 2, 0, 0, 0]])
    model = tiny_of("gpt_neox", 20, 0, 1)  # sdpa, no sliding window: the boolean mask itself
    expected = torch.tensor([  # row q: the keys k it sees
        # x0 x1 w2 w3 l2 l3 l4 a0 a1 pad
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # x0
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],  # x1
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],  # w2
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],  # w3
        [1, 1, 0, 0, 1, 0, 0, 0, 0, 0],  # l2: the prompt, not w2 (same position)
        [1, 1, 0, 0, 1, 1, 0, 0, 0, 0],  # l3
        [1, 1, 0, 0, 1, 1, 1, 0, 0, 0],  # l4
        [0, 0, 0, 0, 0, 0, 0, 1, 0, 0],  # a0: another sequence
        [0, 0, 0, 0, 0, 0, 0, 1, 1, 0],  # a1
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 1]], dtype=torch.bool)  # padding: itself only (no row of -inf)
    assert torch.equal(prefix_sharing_mask(model, positions, sequence, branch), expected[None, None])
    # A model-wide sliding window of 5 (Mistral) counts positions, not columns: with the rejected branch one
    # position further on, l4 (column 6, position 5) sees positions 1…5: x1 (column 1) but not x0.
    mistral = tiny_of("mistral", 20, 0, 1)
    windowed = prefix_sharing_mask(mistral, positions + torch.tensor([[0, 0, 0, 0, 1, 1, 1, 0, 0, 0]]), sequence, branch)
    assert torch.equal(windowed[0, 0, 6], torch.tensor([0, 1, 0, 0, 1, 1, 1, 0, 0, 0], dtype=torch.bool))
    gemma2 = tiny_of("gemma2", 20, 0, 1)  # eager attention, one sliding and one full layer: a dict of additive masks
    masks = prefix_sharing_mask(gemma2.double(), positions, sequence, branch)
    assert masks.keys() == {"sliding_attention", "full_attention"}
    assert torch.equal(masks["full_attention"] == 0, expected[None, None])
    assert masks["full_attention"].dtype == torch.float64 and masks["full_attention"].min() == torch.finfo(torch.float64).min


def test_pack_plan_puts_each_pair_in_one_sequence_and_predicts_twice_from_the_prompts_last_token(tiny_model):
    tok, model = build_tokenizer(), load_model(str(tiny_model))
    pairs = mixed_pairs(tok)
    batch = collate_pairs(pairs, tok.pad_token_id)
    needed = batch["labels"][:, 1:] != -100  # response tokens only
    plan, unshared = (pack_plan(model, batch, needed, sharing) for sharing in (True, False))
    assert unshared["shared"] is None
    grid, positions = plan["inputs"]["input_ids"], plan["inputs"]["position_ids"]
    sequence, branch = plan["shared"]
    assert int((sequence >= 0).sum()) == sum(len(p) + len(c) + len(r) for p, c, r in pairs)  # each prompt once
    # Pair 0 written out: x then y_w then y_l, the rejected branch's positions restarting at |x|.
    (p, c, r), k = pairs[0], int(sequence[sequence >= 0][0])
    at = sequence == k
    assert grid[at].tolist() == p + c + r
    assert positions[at].tolist() == [*range(len(p) + len(c)), *range(len(p), len(p) + len(r))]
    assert branch[at].tolist() == [0] * len(p) + [1] * len(c) + [2] * len(r)
    # Every response token is predicted once; the kept positions are fewer by one per pair with two non-empty
    # responses: the prompt's last position predicts both first tokens (it appears twice in `rows`).
    assert sorted(plan["index"].tolist()) == sorted(unshared["index"].tolist()) == needed.reshape(-1).nonzero()[:, 0].tolist()
    both = sum(1 for _, c, r in pairs if c and r)
    assert len(plan["rows"]) - len(set(plan["rows"].tolist())) == both == 5
    assert torch.equal(plan["targets"], batch["input_ids"][:, 1:].reshape(-1)[plan["index"]])
    # A batch whose rows i and B + i do not share a prompt (a caller's own, not collate_pairs'): two sequences.
    odd = collate([(pairs[2][0], pairs[2][1]), (pairs[3][0], pairs[3][2])], tok.pad_token_id)
    assert (pack_plan(model, odd, odd["labels"][:, 1:] != -100, True)["shared"][0] >= 0).sum() == odd["attention_mask"].sum()


ARCHS = ["llama", "gpt_neox", "qwen2", "mistral", "gemma", "gemma2", "phi3"]


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prompts_give_the_padded_log_probs_and_gradients(tiny_model, arch):
    """Every architecture that packs (fast_logps.PACKED_MODEL_TYPES), with β(x)'s prompt log-probs: the prefix-shared
    forward (fused: Llama and GPT-NeoX through the fused LM head, the others through the logits) gives the plain
    padded rows' sums, means, prompt means and gradients, fp64 to 1e-10 (so no token sees the other response), and
    the unshared packed rows' as well (norms_in_their_dtype says why the norms compute in fp64 here). Gemma 2 in
    fp32, to 1e-5: its padded batch is NaN in fp64 (tests/test_perf.py)."""
    tok = build_tokenizer()
    pairs = mixed_pairs(tok)
    batch = collate_pairs(pairs, tok.pad_token_id)
    dtype, tol = (torch.float32, 1e-5) if arch == "gemma2" else (torch.float64, 1e-10)

    def model():
        m = load_model(str(tiny_model)) if arch == "llama" else tiny_of(arch, len(tok), tok.pad_token_id, tok.eos_token_id)
        return norms_in_their_dtype(m.to(dtype).eval())

    runs = {}
    for name, logps, sharing in (("plain", "plain", False), ("unshared", "fused", False), ("shared", "fused", True)):
        m = model()
        runs[name] = score(m, batch, logps, sharing, prompt_rows=len(pairs))
    assert shares_prefixes(m)
    for name in ("unshared", "shared"):
        for k in ("sum", "avg", "prompt"):
            assert torch.allclose(runs[name][0][k], runs["plain"][0][k], rtol=0, atol=tol), (name, k)
        assert runs[name][1].keys() == runs["plain"][1].keys()
        for p, g in runs[name][1].items():
            assert torch.allclose(g, runs["plain"][1][p], rtol=tol if dtype == torch.float32 else 0, atol=tol), (name, p)
    prompt = runs["plain"][0]["prompt"][: len(pairs)]  # β(x)'s prompt log-probs were compared, not zeros: all but
    assert (prompt != 0).tolist() == [len(p) > 1 for p, _, _ in pairs] == [True] * 4 + [False, True]  # 1-token prompt


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_shared_prompts_in_fp32_and_through_the_fused_head(tiny_model, arch, monkeypatch):
    """fp32, 1e-5 (relative for the gradients, which are ~5): both fast paths, the logits one and the fused head's
    (which really ran, once per forward)."""
    import plumbing.fused_head as fused_head

    calls, kernel = [], fused_head.fused_logps
    monkeypatch.setattr(fused_head, "fused_logps", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    tok = build_tokenizer()
    batch = collate_pairs(mixed_pairs(tok), tok.pad_token_id)

    def model():
        return (load_model(str(tiny_model)) if arch == "llama" else tiny_of(arch, len(tok), tok.pad_token_id, tok.eos_token_id)).eval()

    plain = score(model(), batch, "plain", False, 3)
    for logps in ("fast", "fused"):
        calls.clear()
        out, grads = score(model(), batch, logps, True, 3)
        assert len(calls) == (logps == "fused")
        for k in ("sum", "avg", "prompt"):
            assert torch.allclose(out[k], plain[0][k], rtol=0, atol=1e-5), (logps, k)
        for p, g in grads.items():
            assert torch.allclose(g, plain[1][p], rtol=1e-5, atol=1e-5), (logps, p)


def test_lora_policy_and_its_adapters_off_reference_share_prompts_exactly(tiny_model):
    """pair_logps with LoRA (peft's wrapper passes the mask through): policy and adapters-off reference, with and
    without prefix sharing, fp64 (norms too: norms_in_their_dtype): the same log-probs and adapter gradients to
    1e-10."""
    tok = build_tokenizer()
    batch = collate_pairs(mixed_pairs(tok), tok.pad_token_id)
    cfg = ModelArgs(name_or_path=str(tiny_model), lora_r=4, lora_alpha=8)
    results = {}
    for sharing in (False, True):
        torch.manual_seed(1)  # the same adapters both times
        policy = lora.add_adapters(norms_in_their_dtype(load_model(str(tiny_model), "float64")), cfg, "base")
        with torch.no_grad():  # adapters that do something (peft starts B at 0)
            for n, p in policy.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
        out = pair_logps(policy, lora.AdaptersOff(policy), batch, "fused", with_ppl=True, prefix_sharing=sharing)
        (out.policy_chosen - out.policy_rejected).sum().backward()
        results[sharing] = out.tensors(), {n: p.grad for n, p in policy.named_parameters() if p.requires_grad}
    (values, grads), (shared_values, shared_grads) = results[False], results[True]
    assert (values["policy_chosen"] - values["ref_chosen"]).abs().max() > 1e-3  # the adapters act
    for k, v in values.items():
        assert torch.allclose(shared_values[k], v, rtol=0, atol=1e-10), k
    assert grads.keys() == shared_grads.keys() and grads
    for n, g in grads.items():
        assert torch.allclose(shared_grads[n], g, rtol=0, atol=1e-10), n


def test_flash_attention_and_unchecked_architectures_do_not_share(tiny_model):
    """No explicit mask reaches flash attention (packed into one row, unshared), nor a model that does not pack."""
    from transformers import GPT2Config, GPT2LMHeadModel

    llama = load_model(str(tiny_model))
    assert shares_prefixes(llama)
    llama.config._attn_implementation = "flash_attention_2"  # (not run: flash-attn needs a GPU)
    assert fast_logps.packs(llama) and not shares_prefixes(llama)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=20, n_embd=8, n_layer=1, n_head=2, n_positions=16))
    assert not shares_prefixes(gpt2)


def test_betadpo_trains_alike_with_and_without_prefix_sharing(tmp_path, tiny_model, monkeypatch):
    """betadpo.py on the built-in task with every β-DPO mechanism on (β(x) included), in this process:
    train.prefix_sharing false, true (the default), and true with gradient checkpointing, 3 steps each: the same
    train and held-out metrics and weights (1e-5, test_betadpo_train's comparison); config.yaml records the switch;
    the shared runs' forwards really got the explicit mask. And train.precompute_ref with and without sharing (one
    step each): the cached reference log-probs of all 256 + 8 pairs agree to 1e-5.
    (A 3-step run on a precomputed reference is no exact comparison here: at step 1 policy = reference, and the
    reference scored in other batches than training's rounds its ~0 margins differently, ~1e-8; learn_scale's
    Adam turns that noise into a whole step of c in either direction.)"""
    from conftest import read_metrics
    from test_betadpo_train import assert_the_same_run, flags, train_in_process

    masks, build = [], fast_logps.prefix_sharing_mask
    monkeypatch.setattr(fast_logps, "prefix_sharing_mask", lambda *a: masks.append(1) or build(*a))
    runs, built = {}, {}
    for name, extra in (("off", ["--train.prefix_sharing", "false"]), ("on", []),
                        ("on_checkpointed", ["--train.gradient_checkpointing", "true"]),
                        ("off_precomputed", ["--train.prefix_sharing", "false", "--train.max_steps", 1,
                                             "--train.precompute_ref", "true", "--train.ref_cache_dir", tmp_path / "off_cache"]),
                        ("on_precomputed", ["--train.max_steps", 1, "--train.precompute_ref", "true",
                                            "--train.ref_cache_dir", tmp_path / "on_cache"])):
        masks.clear()
        runs[name] = train_in_process(*flags(tiny_model, tmp_path / name, "--train.max_steps", 3, *extra))
        built[name] = len(masks)
        assert f"prefix_sharing: {'false' if name.startswith('off') else 'true'}" in (runs[name] / "config.yaml").read_text()
    # 3 steps × 2 micro-batches × (policy, live reference) = 12 forwards, + the held-out pass (8 pairs, 2 models) at
    # steps 2 and 3; precomputed: the reference's one pass (256 + 8 pairs in chunks of eval.batch_size = 32: 8 + 1),
    # then the policy's 2 forwards and its held-out pass.
    assert built == {"off": 0, "on": 16, "on_checkpointed": 16, "off_precomputed": 0, "on_precomputed": 9 + 2 + 1}
    assert read_metrics(runs["off"])[-1]["sigma"] > 0  # the policy moved: the comparison has something to compare
    assert_the_same_run({k: runs[k] for k in ("off", "on", "on_checkpointed")}, tol=1e-5)
    for split in ("train", "eval"):
        (unshared,), (shared,) = (list((tmp_path / f"{k}_cache").glob(f"{split}-*.pt")) for k in ("off", "on"))
        unshared, shared = torch.load(unshared), torch.load(shared)
        assert unshared.keys() == shared.keys() == {"ref_chosen", "ref_rejected", "ref_chosen_avg", "ref_rejected_avg"}
        for k, v in unshared.items():
            assert v.shape == (256 if split == "train" else 8,) and (v < 0).all(), (split, k)
            assert torch.allclose(shared[k], v, rtol=0, atol=1e-5), (split, k)


def test_a_prefix_shared_micro_batch_has_no_host_sync_at_all(tiny_model):
    """Packing without sharing leaves one host sync per forward inside transformers (test_host_sync: its
    find_packed_sequence_indices reads whether rows hold several sequences). With the explicit mask transformers
    takes the mask as prepared and looks for nothing: policy and reference forward, loss and backward, no sync."""
    from plumbing.host_sync import host_syncs

    tok = build_tokenizer()
    batch = fast_logps.to_device(collate_pairs(mixed_pairs(tok), tok.pad_token_id), "cpu")
    policy, reference = load_model(str(tiny_model)).train(), load_model(str(tiny_model)).eval().requires_grad_(False)
    found = {}
    for sharing in (False, True):
        with host_syncs() as found[sharing]:
            s = pair_logps(policy, reference, batch, "fused", with_ppl=True, prefix_sharing=sharing)
            ((s.policy_chosen - s.ref_chosen) - (s.policy_rejected - s.ref_rejected)).sum().backward()
    assert len(found[False]) == 2 and all("transformers/masking_utils.py" in where for _, where in found[False])
    assert found[True] == []
