"""The fast paths give the same numbers as the slow ones: chunked log-probs, precomputed reference, padding."""

import math

import pytest
import torch
import torch.nn.functional as F

from betadpo import BetaDPOState, Config, make_scale_optimizer, pair_logps, sequence_logps
from conftest import read_metrics, run_main, save_tiny_model
from plumbing.data import _epoch_order, collate_pairs, tokenize_pairs
from plumbing.fast_logps import PACK_ROW_WIDTH, PACKED_MODEL_TYPES, logps_at, pack_layout, token_logps
from plumbing.fast_logps import packs as _packs
from plumbing.fast_logps import takes_position_mask as _takes_position_mask
from plumbing.models import load_model
from plumbing.optim import make_optimizer
from plumbing.sort_task import build_tokenizer
from test_betadpo_train import flags


def plain_sequence_logps(model, batch, prompt_rows=0):  # train.logps: plain
    return sequence_logps(model, batch, "plain", prompt_rows)


def fast_sequence_logps(model, batch, prompt_rows=0):  # train.logps: fused (the default; fast where it does not apply)
    return sequence_logps(model, batch, "fused", prompt_rows)


def naive_token_logps(logits, targets):
    """The textbook version: full log-softmax over the vocabulary (in fp32, or fp64 for fp64 logits), then gather."""
    logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    return logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * (targets >= 0)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_chunked_logps_values_and_gradients_match_full_log_softmax(dtype, tol):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(5, 9, 50, generator=g)).to(dtype)
    targets = torch.randint(0, 50, (5, 9), generator=g)
    targets[:, :3] = -100  # masked prompt tokens
    targets[1, 6:] = -100  # padding
    weights = torch.randn(5, 9, generator=g, dtype=torch.float32)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    ours, naive = token_logps(a, targets, chunk_rows=2), naive_token_logps(b, targets)
    assert ours.dtype == naive.dtype and torch.allclose(ours, naive, rtol=0, atol=tol)
    (ours * weights).sum().backward()
    (naive * weights).sum().backward()
    assert torch.allclose(a.grad, b.grad, rtol=0, atol=tol)
    assert (a.grad[:, :3] == 0).all()  # no gradient through masked positions


def test_chunked_logps_bf16_logits_keep_their_dtype_for_the_gradient():
    logits = torch.randn(3, 4, 20).bfloat16().requires_grad_(True)
    targets = torch.randint(0, 20, (3, 4))
    out = token_logps(logits, targets)
    assert out.dtype == torch.float32
    assert torch.allclose(out, naive_token_logps(logits.detach(), targets), atol=1e-6)
    out.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def test_chunked_logps_bf16_gradient_is_accurate_where_the_model_is_confident():
    """At the target the gradient is (1 − p(y))·g: from bf16 p it would be off by tens of percent when p(y) ≈ 1."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, generator=g)
    targets = torch.randint(0, 40, (6,), generator=g)
    logits[torch.arange(6), targets] += torch.linspace(2, 9, 6)  # p(y) from ≈ 0.2 to ≈ 0.9995
    ours = logits.bfloat16().requires_grad_(True)
    exact = ours.detach().float().requires_grad_(True)  # the same bf16 values, differentiated in fp32
    token_logps(ours, targets, chunk_rows=4).sum().backward()
    naive_token_logps(exact, targets).sum().backward()
    assert torch.allclose(ours.grad.float(), exact.grad, rtol=1e-2, atol=1e-6)


def test_chunked_logps_refuse_a_second_backward_instead_of_giving_wrong_gradients():
    """Backward overwrites the saved softmax with the gradient: a second pass through it must fail, not mislead."""
    logits = torch.randn(3, 4, 10, requires_grad=True)
    total = token_logps(logits, torch.randint(0, 10, (3, 4))).sum()
    total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        total.backward()


def test_fused_adamw_takes_the_same_steps_as_the_textbook_one():
    cfg = Config()
    cfg.train.lr, cfg.train.weight_decay, cfg.loss.learn_scale, cfg.loss.scale_lr = 1e-2, 0.1, True, 3e-2
    cfg.train.warmup_steps = 0  # c's optimizer comes with its schedule: full lr from the first step
    torch.manual_seed(0)
    model, state = torch.nn.Linear(7, 5), BetaDPOState(cfg.loss, 0, "cpu")
    twin, twin_c = torch.nn.Linear(7, 5), torch.nn.Parameter(state.c.detach().clone())
    twin.load_state_dict(model.state_dict())
    # betadpo.py's two optimizers: the policy's, and c's own (its lr, no weight decay)
    ours = [make_optimizer(cfg.train, model.parameters(), "cpu"), make_scale_optimizer(cfg, state, "cpu")[0]]
    assert all(o.defaults["fused"] for o in ours)
    plain = [torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1),
             torch.optim.AdamW([twin_c], lr=3e-2, weight_decay=0.0)]
    pairs = list(zip([*model.parameters(), state.c], [*twin.parameters(), twin_c]))
    start = [a.detach().clone() for a, _ in pairs]
    for _ in range(3):
        for a, b in pairs:
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        for o in (*ours, *plain):
            o.step()
    for (a, b), a0 in zip(pairs, start):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7) and not torch.allclose(a, a0)  # moved, and alike


def test_results_do_not_depend_on_padding_length(tiny_model):
    tok, model = build_tokenizer(), load_model(str(tiny_model))
    rows = [{"prompt": "sort 312: ", "chosen": "123", "rejected": "321"}, {"prompt": "sort 9: ", "chosen": "9", "rejected": "99"}]
    pairs = tokenize_pairs(tok, rows, 64, 32)
    together = pair_logps(model, model, collate_pairs(pairs, tok.pad_token_id), "fused")
    alone = pair_logps(model, model, collate_pairs(pairs[1:], tok.pad_token_id), "fused")  # shorter batch: less padding
    padded = collate_pairs(pairs, tok.pad_token_id)
    extra = {k: F.pad(v, (0, 7), value=tok.pad_token_id if k == "input_ids" else -100 if k == "labels" else 0)
             for k, v in padded.items() if v.dim() == 2}
    wider = pair_logps(model, model, {**padded, **extra}, "fused")  # 7 more padding columns
    together, alone, wider = together.tensors(), alone.tensors(), wider.tensors()
    for k in together:
        assert torch.allclose(together[k][1], alone[k][0], atol=1e-5), k
        assert torch.allclose(together[k], wider[k], atol=1e-5), k


class RemoteCodeLike(torch.nn.Module):
    """A model class from outside transformers (like `trust_remote_code` models): no position-mask logits."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, input_ids, attention_mask):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_fast_sequence_logps_equal_the_plain_ones_with_and_without_position_mask(tiny_model, dtype, tol):
    """The APPENDIX's sequence_logps (logits only where needed: transformers' bool `logits_to_keep`, or full
    logits indexed for other models; the token_logps kernel) gives plain_sequence_logps' numbers and gradients
    (full (B, T−1, V) log-softmax, masked sums): fp64 to rounding, fp32 close."""
    tok = build_tokenizer()
    rows = [{"prompt": "sort 3120: ", "chosen": "0123", "rejected": "3210"}, {"prompt": "sort 9: ", "chosen": "9", "rejected": "99"}]
    batch = collate_pairs(tokenize_pairs(tok, rows, 64, 32), tok.pad_token_id)

    def run(score, wrap=lambda m: m):
        model = load_model(str(tiny_model)).to(dtype)
        wrapped = wrap(model)
        out = score(wrapped, batch, prompt_rows=2)
        (out["sum"].sum() + out["avg"].sum() + out["prompt"].sum()).backward()
        return out, _takes_position_mask(wrapped), {n: p.grad for n, p in model.named_parameters()}

    plain, _, plain_grads = run(plain_sequence_logps)
    assert plain["sum"].dtype == dtype and (plain["sum"] < 0).all() and plain["prompt"][2:].eq(0).all()
    assert all(g is not None and g.abs().sum() > 0 for g in plain_grads.values())
    for wrap, position_mask in ((lambda m: m, True), (RemoteCodeLike, False)):
        fast, used_position_mask, grads = run(fast_sequence_logps, wrap)
        assert used_position_mask == position_mask
        for k in ("sum", "avg", "prompt"):
            assert torch.allclose(fast[k], plain[k], rtol=0, atol=tol), k
        for name, g in grads.items():
            assert torch.allclose(g, plain_grads[name], rtol=0, atol=tol), name
    # The plain path itself, one position at a time: row 0's response log-prob sum.
    model = load_model(str(tiny_model)).to(dtype)
    ids, labels = batch["input_ids"], batch["labels"]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    by_hand = sum(torch.log_softmax(logits[0, t], -1)[ids[0, t + 1]] for t in range(ids.shape[1] - 1) if labels[0, t + 1] != -100)
    assert plain["sum"][0].item() == pytest.approx(by_hand.item(), abs=tol)


def test_pack_layout_places_every_sequence_once_within_its_row():
    lengths = [9, 2, 7, 3, 3, 1, 10, 4]
    place = pack_layout(lengths, 10)
    rows = {}
    for (r, o), L in zip(place, lengths):
        rows.setdefault(r, []).append((o, o + L))
    for spans in rows.values():
        spans.sort()
        assert spans[0][0] == 0 and spans[-1][1] <= 10
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # end to end, no overlap, no gap
    assert len(rows) == 4  # 39 tokens in rows of 10: first-fit, longest first, needs the minimum, 4
    assert pack_layout([5, 5, 5], 5) == [(0, 0), (1, 0), (2, 0)]  # nothing fits beside a full-width sequence


def tiny_of(arch: str, vocab: int, pad: int, eos: int):
    """A tiny random model of architecture `arch` (transformers' own classes). The sliding windows (Mistral, Gemma 2,
    Phi-3) are 5 tokens, shorter than the sequences, so that packing must keep each window inside its sequence;
    Gemma 2 also soft-caps attention and final logits (its eager attention applies the cap)."""
    import transformers

    common = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=128, pad_token_id=pad, eos_token_id=eos, bos_token_id=eos, attention_dropout=0.0)
    configs = {
        "gpt_neox": ("GPTNeoX", dict(hidden_dropout=0.0)),
        "qwen2": ("Qwen2", dict(num_key_value_heads=2)),
        "mistral": ("Mistral", dict(num_key_value_heads=2, sliding_window=5)),
        "gemma": ("Gemma", dict(num_key_value_heads=1, head_dim=8)),
        "gemma2": ("Gemma2", dict(num_key_value_heads=2, head_dim=8, sliding_window=5, attn_logit_softcapping=5.0,
                                  final_logit_softcapping=3.0, attn_implementation="eager")),
        "phi3": ("Phi3", dict(num_key_value_heads=2, sliding_window=5, resid_pdrop=0.0, embd_pdrop=0.0)),
    }
    name, extra = configs[arch]
    torch.manual_seed(0)
    config = getattr(transformers, f"{name}Config")(**common, **extra)
    return getattr(transformers, f"{name}ForCausalLM")(config)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "qwen2", "mistral", "gemma", "gemma2", "phi3"])
def test_packed_sequences_give_the_padded_log_probs_and_gradients(tiny_model, arch):
    """OPTIMISATION 3: sequences of mixed lengths packed into fewer rows (position ids restart per sequence, no
    mask) give the padded batch's log-probs and gradients, fp64 to rounding — so no token attends across — for every
    architecture in PACKED_MODEL_TYPES (InternLM2 loads as llama)."""
    tok = build_tokenizer()
    digits = ["3120", "9", "41", "870215", "5", "62", "1", "9081726354"]
    rows = [{"prompt": f"sort {d}: ", "chosen": "".join(sorted(d)), "rejected": d} for d in digits]
    batch = collate_pairs(tokenize_pairs(tok, rows, 64, 32), tok.pad_token_id)

    # fp64, so that any cross-sequence attention would show far above rounding; except: Gemma's RMSNorm computes in
    # fp32 whatever the weights (so 1e-6), and Gemma 2's padded batch is NaN in fp64 (its eager attention's padding +
    # sliding-window mask overflows), so it is compared in fp32, to the 1e-5 of any fp32 comparison here.
    dtype, tol = {"gemma": (torch.float64, 1e-6), "gemma2": (torch.float32, 1e-5)}.get(arch, (torch.float64, 1e-10))

    def model():
        m = load_model(str(tiny_model)) if arch == "llama" else tiny_of(arch, len(tok), tok.pad_token_id, tok.eos_token_id)
        return m.to(dtype).eval()  # eval(): a KV cache would be on by default, which packing must turn off

    runs = {}
    for name, score in (("plain", plain_sequence_logps), ("packed", fast_sequence_logps)):
        m = model()
        out = score(m, batch, prompt_rows=len(rows))
        (out["sum"].sum() + out["avg"].sum() + out["prompt"].sum()).backward()
        runs[name] = out, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert _packs(m) and m.config.model_type in PACKED_MODEL_TYPES
    lengths = batch["attention_mask"].sum(-1).tolist()
    place = pack_layout(lengths, PACK_ROW_WIDTH * batch["input_ids"].shape[1])
    packed_rows, width = 1 + max(r for r, _ in place), max(o + L for (_, o), L in zip(place, lengths))
    assert packed_rows <= 5 and width <= 2 * batch["input_ids"].shape[1]  # it did pack: 16 sequences in 5 rows
    for k in ("sum", "avg", "prompt"):
        assert torch.allclose(runs["packed"][0][k], runs["plain"][0][k], rtol=0, atol=tol), k
    assert runs["packed"][1].keys() == runs["plain"][1].keys()
    for name, g in runs["packed"][1].items():
        assert torch.allclose(g, runs["plain"][1][name], rtol=tol if dtype == torch.float32 else 0, atol=tol), name  # fp32: gradients ≈ 5
    # The model body really sees the packed batch: (R, W) = (packed_rows, the fullest row's length).
    seen = []
    hook = m.get_input_embeddings().register_forward_hook(lambda mod, args, out: seen.append(tuple(out.shape[:2])))
    with torch.no_grad():
        logps_at(m, batch, torch.ones_like(batch["input_ids"][:, 1:], dtype=torch.bool))
    hook.remove()
    assert seen == [(packed_rows, width)]


def test_unchecked_architectures_run_padded_and_say_so_once_and_flash_attention_packs_one_row(tiny_model, capsys):
    """GPT-2 is not in PACKED_MODEL_TYPES: it runs padded (the plain path's numbers), with one line saying why, once
    per process. Flash attention separates packed sequences by position ids only in a batch of one row."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from plumbing import fast_logps

    tok = build_tokenizer()
    batch = collate_pairs(tokenize_pairs(tok, [{"prompt": "sort 31: ", "chosen": "13", "rejected": "31"}] * 2, 64, 32), tok.pad_token_id)
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=4, n_positions=64)).eval()
    fast_logps._SAID.clear()
    fast, again = fast_sequence_logps(gpt2, batch), fast_sequence_logps(gpt2, batch)
    lines = [line for line in capsys.readouterr().out.splitlines() if "run padded" in line]
    assert lines == ["note: sequences run padded, not packed: architecture 'gpt2' is not among those checked for packing "
                     f"({', '.join(PACKED_MODEL_TYPES)})"]
    assert torch.allclose(fast["sum"], plain_sequence_logps(gpt2, batch)["sum"], atol=1e-5) and torch.equal(fast["sum"], again["sum"])
    llama = load_model(str(tiny_model))
    assert fast_logps.row_width(llama, 10, [4, 7, 9]) == PACK_ROW_WIDTH * 10
    llama.config._attn_implementation = "flash_attention_2"  # (not run: flash-attn needs a GPU)
    assert fast_logps.row_width(llama, 10, [4, 7, 9]) == 20 and pack_layout([4, 7, 9], 20) == [(0, 16), (0, 9), (0, 0)]


def test_prompt_rows_reach_the_lm_head_only_when_beta_x_needs_the_perplexity(tiny_model):
    """OPTIMISATION 1: without loss.ppl_scale the policy's LM head runs on response tokens only (no log_ppl);
    with it, also on the chosen rows' prompt tokens 1…|x|−1, and log_ppl is their negative mean log-prob."""
    tok, model = build_tokenizer(), load_model(str(tiny_model))
    rows = [{"prompt": "sort 312: ", "chosen": "123", "rejected": "321"}, {"prompt": "sort 95: ", "chosen": "59", "rejected": "95"}]
    batch = collate_pairs(tokenize_pairs(tok, rows, 64, 32), tok.pad_token_id)
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda mod, args, out: seen.append(out.shape[0]))
    without, with_ppl = pair_logps(model, None, batch, "fused"), pair_logps(model, None, batch, "fused", with_ppl=True)
    hook.remove()
    response = int((batch["labels"] != -100).sum())
    prompt = int(batch["prompt_lens"][:2].sum()) - 2  # chosen rows' prompt tokens after the first
    assert seen == [response, response + prompt]
    assert without.log_ppl is None and without.policy_chosen.tolist() == pytest.approx(with_ppl.policy_chosen.tolist(), abs=1e-5)
    plain = plain_sequence_logps(model, batch, prompt_rows=2)
    assert with_ppl.log_ppl.tolist() == pytest.approx((-plain["prompt"][:2]).tolist(), abs=1e-5)


def test_group_by_length_covers_every_pair_once_and_pads_less():
    lengths = tuple((i * 7919) % 97 + 3 for i in range(1024))
    plain, grouped = _epoch_order(1024, 0, 0, 8, None), _epoch_order(1024, 0, 0, 8, lengths)
    assert sorted(grouped) == list(range(1024))
    def padding(order):
        return sum(max(lengths[i] for i in order[b : b + 8]) * 8 - sum(lengths[i] for i in order[b : b + 8]) for b in range(0, 1024, 8))
    assert padding(grouped) < 0.2 * padding(plain)


def test_precomputed_reference_gives_the_live_losses(tmp_path, tiny_model, capsys):
    """Every run is `python betadpo.py` in this process (conftest.run_main): the precomputed reference is about what
    is computed and cached, not how the script is launched."""
    def betadpo(out, *extra) -> str:  # → the run's stdout
        code, stdout, stderr = run_main("betadpo.py", *flags(tiny_model, out, *extra), capsys=capsys)
        assert code == 0, stderr[-3000:]
        return stdout

    def assert_same(live, pre, steps):  # the first `steps` training steps, and held out at those steps
        for split, keys in (("train", ("loss", "beta", "kept", "M0", "sigma", "rewards/margins")), ("eval", ("loss", "rewards/margins"))):
            a_rows, b_rows = ([r for r in read_metrics(run, split) if r["step"] <= steps] for run in (live, pre))
            assert len(a_rows) == len(b_rows) > 0 or split == "eval" and steps == 1  # eval_every 2
            for a, b in zip(a_rows, b_rows):
                # abs: one fp32 ulp of a response's log-prob sum (2⁻¹⁸ ≈ 3.8e-6 for 32–64 nats). The scoring pass
                # puts its chunk's pairs in other packed rows than a training batch does, and with prefix sharing
                # (a pair's rows are one sequence) a sum may round differently there.
                ulp = torch.finfo(torch.float32).eps * 2 ** math.floor(math.log2(abs(b["logps/chosen"])))
                for k in keys:
                    assert a[k] == pytest.approx(b[k], rel=1e-5, abs=ulp), (split, a["step"], k)

    # The policy scores itself before step 1 (no second model is loaded). Every margin at step 1 is then 0 up to
    # rounding, so β-guided filtering picks its pairs by rounding noise: only step 1 can agree, to an ulp
    # (held out: first at step 2).
    cache = tmp_path / "cache"
    live, pre = tmp_path / "live", tmp_path / "pre"
    betadpo(live, "--train.max_steps", 2)
    stdout = betadpo(pre, "--train.max_steps", 2, "--train.precompute_ref", "true", "--train.ref_cache_dir", cache)
    assert "one pass over 256 train pairs" in stdout and len(list(cache.glob("*.pt"))) == 2
    assert_same(live, pre, steps=1)
    stdout = betadpo(tmp_path / "again", "--train.max_steps", 1, "--train.precompute_ref", "true", "--train.ref_cache_dir", cache)
    assert "(cached)" in stdout
    # A separately named reference (another model: margins far from 0, filtering by margin, not by noise) is
    # loaded and scored instead: live and precomputed agree at every step, in training and held out.
    reference = save_tiny_model(tmp_path / "reference", seed=1)
    separate = ("--train.max_steps", 4, "--model.ref_name_or_path", reference)
    betadpo(tmp_path / "separate_live", *separate)
    betadpo(tmp_path / "separate_pre", *separate, "--train.precompute_ref", "true", "--train.ref_cache_dir", tmp_path / "cache2")
    assert_same(tmp_path / "separate_live", tmp_path / "separate_pre", steps=4)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model):
    tok = build_tokenizer()
    batch = collate_pairs(tokenize_pairs(tok, [{"prompt": "sort 52: ", "chosen": "25", "rejected": "52"}] * 2, 64, 32), tok.pad_token_id)
    grads = []
    for checkpointing in (False, True):
        model = load_model(str(tiny_model))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        out = pair_logps(model, None, batch, "fused")
        (out.policy_chosen - out.policy_rejected).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
