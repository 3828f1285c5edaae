"""LoRA (model.lora_r > 0, plumbing/lora.py): the adapters-off reference is the base model exactly; β-DPO with
LoRA resumes exactly, precomputes its reference, writes the adapter (+ a merged model plain transformers loads);
eval.py and sft.py take adapters; DDP and FSDP2 runs match one process. The tiny Llama throughout (SmolLM2's LoRA
run is in tests/test_real_model.py)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from betadpo import pair_logps, sequence_logps
from conftest import read_metrics, run_here, run_script
from plumbing import fast_logps, lora
from plumbing.fused_head import fused_head_applies
from plumbing.config import ModelArgs
from plumbing.data import collate_pairs, tokenize_pairs
from plumbing.models import load_model
from plumbing.sort_task import build_tokenizer
from test_fsdp import COMPARED, EVAL_COMPARED, LOADED, SHARDED, assert_rows_close, launch
from test_fsdp import flags as fsdp_flags

LORA = ["--model.lora_r", 4, "--model.lora_alpha", 8]


def batch_of(tok):
    rows = [{"prompt": "sort 3120: ", "chosen": "0123", "rejected": "3210"}, {"prompt": "sort 95: ", "chosen": "59", "rejected": "95"},
            {"prompt": "sort 7: ", "chosen": "7", "rejected": "77"}]
    return collate_pairs(tokenize_pairs(tok, rows, 64, 32), tok.pad_token_id)


def test_adapters_off_reference_is_the_base_model_exactly_and_merging_folds_the_adapters(tiny_model):
    """After a few updates of the adapters: adapters off = the untouched base model, bit for bit (packed, through
    the same fast path); adapters on = moved; merged_state_dict = peft's merge_and_unload, and W + (α/r)·B A."""
    tok = build_tokenizer()
    batch = batch_of(tok)
    base = load_model(str(tiny_model))
    policy = lora.add_adapters(load_model(str(tiny_model)), ModelArgs(name_or_path=str(tiny_model), lora_r=4, lora_alpha=8), "base")
    trained = [p for p in policy.parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n, p in policy.named_parameters() if p.requires_grad)
    optimizer = torch.optim.SGD(trained, lr=0.5)
    for _ in range(3):
        out = pair_logps(policy, None, batch, "fused")
        (out.policy_rejected - out.policy_chosen).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    reference = lora.AdaptersOff(policy)
    assert fast_logps.packs(reference) and fast_logps.packs(policy)  # the transformers model inside is found
    assert all(fused_head_applies(m) for m in (reference, base, policy))  # the same kernel for all three
    with torch.no_grad():
        off, plain, on = (sequence_logps(m, batch, "fused", prompt_rows=3) for m in (reference, base, policy))
        off_unpacked = sequence_logps(reference, batch, "plain", prompt_rows=3)
    for k in ("sum", "avg", "prompt"):
        assert torch.equal(off[k], plain[k]), k
        assert torch.allclose(off_unpacked[k], plain[k], rtol=0, atol=1e-5), k
    assert (on["sum"] - plain["sum"]).abs().max() > 1e-3  # the adapters did move the policy
    base_weights = dict(base.named_parameters())
    for name, p in policy.get_base_model().named_parameters():  # the frozen weights are untouched
        if "lora_" not in name:
            assert torch.equal(p, base_weights[name.replace(".base_layer.", ".")]), name
    # merged weights: the policy with adapters on, as one plain model
    merged = lora.merged_state_dict(policy, policy.state_dict())
    assert not any("lora_" in k or "base_layer" in k for k in merged) and merged.keys() == base.state_dict().keys()
    q = policy.get_base_model().model.layers[0].self_attn.q_proj
    by_hand = q.base_layer.weight + (8 / 4) * q.lora_B["default"].weight @ q.lora_A["default"].weight
    assert torch.allclose(merged["model.layers.0.self_attn.q_proj.weight"], by_hand, atol=1e-6)
    base.load_state_dict(merged)
    with torch.no_grad():
        folded = sequence_logps(base, batch, "fused")
    assert torch.allclose(folded["sum"], on["sum"], atol=1e-4)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model):
    """4 steps of β-DPO with LoRA, every mechanism on, float64 (test_fsdp.py's flags), merged final: the run the
    resumed, DDP and FSDP2 runs below must reproduce. In this process (conftest.run_here), as are the other
    one-process runs of this file: the launches under test are DDP's and FSDP2's."""
    out = tmp_path_factory.mktemp("lora") / "one"
    result = run_here("betadpo.py", *fsdp_flags(tiny_model, out, "--train.max_steps", 4, *LORA, "--model.lora_merge_final", "true"))
    return out, result


def without_timings(rows):
    return [{k: v for k, v in r.items() if not k.endswith("_per_s")} for r in rows]


def test_lora_betadpo_resumes_exactly_and_saves_adapter_and_merged_model(tmp_path, tiny_model, lora_run):
    from transformers import AutoModelForCausalLM

    full, first = lora_run
    assert "LoRA: " in first.stdout and "parameters trainable" in first.stdout
    resumed = tmp_path / "resumed"
    run_here("betadpo.py", *fsdp_flags(tiny_model, resumed, "--train.max_steps", 2, *LORA, "--model.lora_merge_final", "true"))
    second = run_here("betadpo.py", *fsdp_flags(tiny_model, resumed, "--train.max_steps", 4, *LORA, "--model.lora_merge_final", "true"))
    assert "resumed from" in second.stdout and "(step 2)" in second.stdout
    rows = read_metrics(full)
    assert rows[0]["rewards/margins"] == 0.0 != rows[-1]["rewards/margins"] and rows[-1]["sigma"] > 0  # B = 0 at the start
    assert without_timings(read_metrics(full)) == without_timings(read_metrics(resumed))  # exactly
    assert without_timings(read_metrics(full, "eval")) == without_timings(read_metrics(resumed, "eval"))
    # final/: the adapter only (a few tensors), the tokenizer, β-scale; merged/: a plain model
    final = full / "final"
    adapter, again = load_file(final / "adapter_model.safetensors"), load_file(resumed / "final" / "adapter_model.safetensors")
    assert adapter and all("lora_A" in k or "lora_B" in k for k in adapter) and not (final / "model.safetensors").exists()
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model)
    assert adapter.keys() == again.keys() and all(torch.equal(v, again[k]) for k, v in adapter.items())
    merged = AutoModelForCausalLM.from_pretrained(final / "merged")  # plain transformers, no peft
    assert type(merged).__name__ == "LlamaForCausalLM" and merged.dtype == torch.float64
    batch = batch_of(build_tokenizer())
    with torch.no_grad():
        a = sequence_logps(merged, batch, "fused")["sum"]
        b = sequence_logps(lora.load_trained(str(final), "float64", False, "final"), batch, "fused")["sum"]  # peft's merge
        c = sequence_logps(load_model(str(tiny_model), "float64"), batch, "fused")["sum"]
    assert torch.allclose(a, b, rtol=0, atol=1e-10) and (a - c).abs().max() > 1e-3


def test_eval_takes_an_adapter_and_compares_it_with_its_base_and_sft_trains_adapters(tmp_path, tiny_model):
    """sft.py with LoRA from the tiny model's directory writes an adapter; eval.py given it as eval.policy loads it
    on its base and, by default, uses that base as the reference (its adapter_config.json names it)."""
    sft = tmp_path / "sft"
    result = run_here("sft.py", "--config", "configs/sort_sft.yaml", "--model.name_or_path", tiny_model, *LORA,
                      "--data.num_sft", 64, "--data.eval_size", 4, "--train.batch_size", 16, "--train.max_steps", 2,
                      "--train.lr", 1e-2, "--train.output_dir", sft)
    assert "held-out exact match" in result.stdout and (sft / "final" / "adapter_config.json").is_file()
    assert len(read_metrics(sft)) == 2
    report = tmp_path / "eval"
    run_here("eval.py", "--model.name_or_path", "not-used-when-the-adapter-names-its-base", "--eval.policy", sft / "final",
             "--data.eval_size", 4, "--eval.batch_size", 4, "--eval.num_prompts", 2, "--eval.samples_per_prompt", 2,
             "--eval.max_new_tokens", 4, "--eval.output_dir", report)
    out = json.loads((report / "eval.json").read_text())
    assert out["reference"] == str(tiny_model) and out["metrics"]["kl_seq"] > 0  # the base; the SFT adapters moved it


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_lora_two_processes_match_one(tmp_path, tiny_model, lora_run, kind):
    """float64 (test_fsdp.py explains why): DDP and FSDP2 LoRA runs give the one-process numbers and adapter. The DDP
    run also precomputes its reference (train.precompute_ref): one adapters-off pass before step 1."""
    one, two = lora_run[0], tmp_path / kind
    if kind == "ddp":
        result = run_script("betadpo.py", *fsdp_flags(tiny_model, two, "--train.max_steps", 4, *LORA, "--train.precompute_ref", "true",
                                                      "--train.ref_cache_dir", tmp_path / "cache"), processes=2)
        assert "reference log-probs: one pass over 64 train pairs" in result.stdout
    else:
        result = launch("betadpo.py", *fsdp_flags(tiny_model, two, "--train.max_steps", 4, *LORA))
        prepared = [m.groups() for m in SHARDED.finditer(result.stdout)]
        assert len(prepared) == 2 and all(sharded == total and int(trainable) > 0 for _, _, sharded, total, trainable in prepared)
        assert sorted(LOADED.findall(result.stdout)) == [("0", "cpu"), ("1", "meta")]  # only the main process read the weights
    assert read_metrics(one)[-1]["sigma"] > 0
    # (The precomputed reference scores pairs in other batches, so other padding: log-probs equal to ~1e-15, which
    # can flip rewards/accuracies at step 1, where every margin is 0 up to rounding.)
    ties = ("rewards/accuracies",) if kind == "ddp" else ()
    assert_rows_close(read_metrics(one), read_metrics(two), [k for k in COMPARED if k not in ties], rel=1e-6)
    assert_rows_close(read_metrics(one, "eval"), read_metrics(two, "eval"), [k for k in EVAL_COMPARED if k not in ties], rel=1e-6)
    a, b = load_file(one / "final" / "adapter_model.safetensors"), load_file(two / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-8, atol=1e-10) for k in a)
