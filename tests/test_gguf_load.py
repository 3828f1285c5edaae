"""The GGUF loader (plumbing/models.py) fills a plain model tensor by tensor: on a tiny Llama GGUF file written
here (Q8_0 matrices, F32 norms, grouped-query attention, a tied LM head) its weights equal, bit for bit, those of
transformers' own GGUF loading, which dequantises the whole file first and is independent of ours."""

import numpy as np
import torch

from plumbing.models import load_model


def write_tiny_llama(path, vocab=96, hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, seed=0):
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)  # ≠ heads: the k rows are un-permuted per key/value head
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(vocab)])
    w.add_token_types([1] * vocab)
    w.add_token_merges([])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)

    def add(name, shape):
        a = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if len(shape) == 1:
            w.add_tensor(name, a)
        else:
            w.add_tensor(name, quantize(a, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)

    kv = kv_heads * hidden // heads
    add("token_embd.weight", (vocab, hidden))  # no output.weight: the LM head is tied to it
    add("output_norm.weight", (hidden,))
    for i in range(layers):
        for name, shape in (("attn_norm", (hidden,)), ("attn_q", (hidden, hidden)), ("attn_k", (kv, hidden)),
                            ("attn_v", (kv, hidden)), ("attn_output", (hidden, hidden)), ("ffn_norm", (hidden,)),
                            ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)), ("ffn_down", (hidden, ffn))):
            add(f"blk.{i}.{name}.weight", shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_tensor_by_tensor_equals_transformers_whole_file_loading(tmp_path):
    from transformers import AutoModelForCausalLM

    path = write_tiny_llama(tmp_path / "tiny.gguf")
    ours = load_model(str(path))
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32)
    a, b = ours.state_dict(), theirs.state_dict()
    assert type(ours) is type(theirs) and sorted(a) == sorted(b) and len(a) == 2 + 9 * 2 + 1
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()  # tied, as the file says
    assert not hasattr(ours.config, "quantization_config")  # a plain model: save_pretrained works
