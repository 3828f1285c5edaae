"""What a training step stores for backward (plumbing/models.py's store_less_for_backward): the SwiGLU product
saves gate and up but not silu(gate), and on a CPU SDPA takes grouped key/value heads without repeat_kv copies.
Checked on a tiny grouped-query Llama with LoRA adapters, packed as betadpo.py runs it: the same log-probs and
gradients as transformers' own modules, and exactly the expected bytes fewer stored."""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from betadpo import sequence_logps
from plumbing import lora
from plumbing.config import ModelArgs
from plumbing.data import collate_pairs, tokenize_pairs
from plumbing.models import _SiluTimesUp, disable_dropout, load_model
from plumbing.sort_task import build_tokenizer

HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE, LAYERS = 4, 2, 8, 48, 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_times_up_is_autograds_product_bit_for_bit(dtype):
    torch.manual_seed(0)
    gate, up = (torch.randn(5, 7, 48, dtype=dtype, requires_grad=True) for _ in range(2))
    g = torch.randn(5, 7, 48, dtype=dtype)
    ours = _SiluTimesUp.apply(gate, up)
    theirs = torch.nn.functional.silu(gate) * up
    assert torch.equal(ours, theirs)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(ours, (gate, up), g),
                                                  torch.autograd.grad(theirs, (gate, up), g)))


def stored_bytes(model, batch) -> tuple[dict, int]:
    """sequence_logps' forward and backward → its log-probs, the LoRA gradients, the bytes autograd stored for
    backward (distinct storages, the parameters' own excluded), and the positions the model ran on (packed rows)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    stored, positions = {}, []
    embed = model.get_input_embeddings().register_forward_hook(lambda m, a, out: positions.append(out.shape[:-1].numel()))

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            stored[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = sequence_logps(model, batch, "fused", prompt_rows=2)
    (out["sum"].sum() + out["prompt"].sum()).backward()
    embed.remove()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach() for k, v in out.items()}, grads, sum(stored.values()), positions


def adapted(model, lora_cfg):
    """LoRA adapters with the same A and a nonzero B (peft starts B at 0, which would leave A without gradient)."""
    torch.manual_seed(1)
    model = lora.add_adapters(model, lora_cfg, "base")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    return model


def test_stores_no_silu_output_and_no_repeated_kv_heads_with_the_same_logps_and_gradients(tmp_path, monkeypatch):
    tok = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=HEADS * HEAD_DIM, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         max_position_embeddings=256, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    rows = [{"prompt": "sort 3120: ", "chosen": "0123", "rejected": "3210"}, {"prompt": "sort 95: ", "chosen": "59", "rejected": "95"}]
    batch = collate_pairs(tokenize_pairs(tok, rows, 64, 32), tok.pad_token_id)
    lora_cfg = ModelArgs(name_or_path=str(tmp_path), lora_r=4, lora_alpha=8)

    monkeypatch.delenv("TRANSFORMERS_SDPA_FORCE_GQA", raising=False)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)  # transformers' own modules: repeat_kv, autograd's SwiGLU
    disable_dropout(plain)
    old = stored_bytes(adapted(plain, lora_cfg), batch)
    ours = adapted(load_model(str(tmp_path)), lora_cfg)
    import os
    assert os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] == "1"  # no CUDA here: the CPU kernel takes grouped heads
    new = stored_bytes(ours, batch)

    for k in old[0]:
        assert torch.equal(old[0][k], new[0][k]), k  # the forward: bit for bit
    assert all(g.abs().max() > 0 for g in old[1].values())
    assert old[1].keys() == new[1].keys() and len(old[1]) == 2 * 7 * LAYERS  # A and B of q,k,v,o,gate,up,down
    for name in old[1]:  # key/value gradients summed over the 2 query heads of each group in another order
        torch.testing.assert_close(new[1][name], old[1][name], rtol=1e-5, atol=1e-6, msg=name)  # ≈1e-7 relative
    # per position of the packed rows and layer: silu(gate), INTERMEDIATE floats; keys and values at HEADS
    # instead of KV_HEADS heads, 2·(HEADS − KV_HEADS)·HEAD_DIM floats
    assert old[3] == new[3] and len(new[3]) == 1
    assert old[2] - new[2] == new[3][0] * LAYERS * (INTERMEDIATE + 2 * (HEADS - KV_HEADS) * HEAD_DIM) * 4
