"""plumbing/internlm2.py: an InternLM2 checkpoint loads as transformers' Llama with the same logits and token ids.

No real weights: the test writes a tiny random checkpoint in InternLM2's layout (config.json with
model_type internlm2, safetensors with InternLM2's names and fused wqkv, a sentencepiece tokenizer.model
trained here, tokenizer_config.json as InternLM2 ships it) and checks the native load against an InternLM2
forward pass written here in plain torch from the layout, and against InternLM2's tokenizer rules applied
with sentencepiece itself. Then betadpo.py trains on it and eval.py generates from its final/.
"""

import io
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from plumbing.models import load_model, load_tokenizer
from conftest import read_metrics, run_here, run_script

SPECIAL = ["<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>", "<|im_start|>"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
                 " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXT = ["Human: What is the capital of France?", "Assistant: The capital of France is Paris.",
        "The quick brown fox jumps over the lazy dog 12345.", "def f(x):\n    return x + 1  # code",
        "你好，世界", "Hello   world\twith tabs and  double  spaces.", "I think so. I don't know!"]
# H = 4 query heads, KV = 2 key/value heads (GQA, G = 2), head size d = 8; max_position_embeddings 16, so that
# a 20-token input also exercises the dynamic NTK rope.
CONFIG = {"model_type": "internlm2", "architectures": ["InternLM2ForCausalLM"], "auto_map": {"AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
          "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "hidden_act": "silu", "max_position_embeddings": 16, "rms_norm_eps": 1e-5, "rope_theta": 1000000,
          "rope_scaling": {"type": "dynamic", "factor": 2.0}, "bias": False, "tie_word_embeddings": False,
          "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "torch_dtype": "float32", "initializer_range": 0.02}


def write_internlm2_checkpoint(path: Path, seed: int = 0, bias: bool = False) -> dict:
    """A random InternLM2-layout checkpoint in `path`; → its weights (InternLM2 names), for the reference forward.
    bias: InternLM2's `bias` option, biases on wqkv and wo (no released model has them)."""
    import sentencepiece as spm
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    model = io.BytesIO()  # a byte-fallback BPE with InternLM2's special tokens, identity normalisation, dummy prefix
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT * 10), model_writer=model, model_type="bpe", vocab_size=320, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
        allow_whitespace_only_pieces=True, user_defined_symbols=SPECIAL, hard_vocab_limit=False, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (path / "tokenizer.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    cfg = {**CONFIG, "vocab_size": sp.get_piece_size(), "bias": bias}
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, sp.piece_to_id("<|im_end|>")]}))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "InternLM2Tokenizer", "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False, "decode_with_prefix_space": False, "additional_special_tokens": SPECIAL,
        "added_tokens_decoder": {str(sp.piece_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                                          "single_word": False, "special": True} for t in SPECIAL},
        "chat_template": CHAT_TEMPLATE}))
    g = torch.Generator().manual_seed(seed)
    V, D, I = cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"]
    H, KV, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], D // cfg["num_attention_heads"]
    rand = lambda *shape, scale=0.3: torch.randn(*shape, generator=g) * scale  # noqa: E731
    weights = {"model.tok_embeddings.weight": rand(V, D, scale=1.0), "model.norm.weight": 1 + rand(D, scale=0.1), "output.weight": rand(V, D)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights.update({
            p + "attention_norm.weight": 1 + rand(D, scale=0.1), p + "ffn_norm.weight": 1 + rand(D, scale=0.1),
            p + "attention.wqkv.weight": rand((H + 2 * KV) * d, D), p + "attention.wo.weight": rand(D, H * d),
            p + "feed_forward.w1.weight": rand(I, D), p + "feed_forward.w3.weight": rand(I, D), p + "feed_forward.w2.weight": rand(D, I),
        })
        if bias:
            weights.update({p + "attention.wqkv.bias": rand((H + 2 * KV) * d), p + "attention.wo.bias": rand(D)})
    names = sorted(weights)  # two shards, as the real checkpoints come
    save_file({k: weights[k] for k in names[: len(names) // 2]}, path / "model-00001-of-00002.safetensors")
    save_file({k: weights[k] for k in names[len(names) // 2 :]}, path / "model-00002-of-00002.safetensors")
    return weights


def internlm2_logits(w: dict, cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    """InternLM2's forward pass, written from its checkpoint layout (not through plumbing/internlm2.py). ids (B, T) → (B, T, V)."""
    B, T = ids.shape
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    G, d = H // KV, cfg["hidden_size"] // H

    def rms(x, weight):
        return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg["rms_norm_eps"])

    base = cfg["rope_theta"]
    if T > cfg["max_position_embeddings"]:  # InternLM2's dynamic NTK scaling: a larger base past the trained length
        f = cfg["rope_scaling"]["factor"]
        base = base * (f * T / cfg["max_position_embeddings"] - (f - 1)) ** (d / (d - 2))
    angles = torch.arange(T)[:, None].double() / base ** (torch.arange(0, d, 2).double() / d)  # (T, d/2)
    cos, sin = torch.cat([angles, angles], -1).cos().float(), torch.cat([angles, angles], -1).sin().float()  # (T, d)

    def rotate(x):  # x (B, T, heads, d): rotate-half rotary embedding
        half = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
        return x * cos[None, :, None] + half * sin[None, :, None]

    x = w["model.tok_embeddings.weight"][ids]  # (B, T, D)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "attention_norm.weight"])
        qkv = (h @ w[p + "attention.wqkv.weight"].T + w.get(p + "attention.wqkv.bias", 0)).view(B, T, KV, G + 2, d)  # per KV group: G queries, key, value
        q = rotate(qkv[:, :, :, :G].reshape(B, T, H, d))  # query head k·G + g belongs to group k
        k = rotate(qkv[:, :, :, G]).repeat_interleave(G, dim=2)  # (B, T, H, d)
        v = qkv[:, :, :, G + 1].repeat_interleave(G, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
        attn = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + torch.einsum("bhqk,bkhd->bqhd", attn, v).reshape(B, T, H * d) @ w[p + "attention.wo.weight"].T + w.get(p + "attention.wo.bias", 0)
        h = rms(x, w[p + "ffn_norm.weight"])
        x = x + (F.silu(h @ w[p + "feed_forward.w1.weight"].T) * (h @ w[p + "feed_forward.w3.weight"].T)) @ w[p + "feed_forward.w2.weight"].T
    return rms(x, w["model.norm.weight"]) @ w["output.weight"].T


def internlm2_token_ids(sp, text: str, add_bos: bool = True) -> list[int]:
    """InternLM2's tokenizer rules with sentencepiece itself: special tokens split out whole, every other
    stretch of text encoded by the sentencepiece model on its own; BOS in front."""
    ids = [sp.bos_id()] if add_bos else []
    for part in re.split("(" + "|".join(map(re.escape, SPECIAL)) + ")", text):
        ids += [sp.piece_to_id(part)] if part in SPECIAL else sp.encode(part) if part else []
    return ids


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("internlm2") / "model"
    return path, write_internlm2_checkpoint(path)


@pytest.mark.parametrize("bias", [False, True])
def test_native_load_matches_internlm2_forward(checkpoint, tmp_path, bias):
    path, weights = checkpoint if not bias else (tmp_path / "biased", write_internlm2_checkpoint(tmp_path / "biased", bias=True))
    cfg = json.loads((path / "config.json").read_text())
    model = load_model(str(path)).eval()
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_key_value_heads < model.config.num_attention_heads
    assert model.config.rope_parameters == {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}
    assert model.generation_config.eos_token_id == json.loads((path / "generation_config.json").read_text())["eos_token_id"]
    ids = torch.randint(3, cfg["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(1))
    for T in (12, 20):  # within max_position_embeddings, and past it (dynamic NTK rope)
        with torch.no_grad():
            ours = model(ids[:, :T]).logits
            expected = internlm2_logits(weights, cfg, ids[:, :T])
        assert (ours - expected).abs().max().item() <= 1e-5, T
    model_default_rope = internlm2_logits(weights, {**cfg, "max_position_embeddings": 64}, ids)
    assert (model(ids).logits - model_default_rope).abs().max().item() > 1e-3  # the dynamic rope did change the logits


def test_tokenizer_matches_internlm2_rules(checkpoint, tmp_path):
    import random

    import sentencepiece as spm
    from transformers import AutoTokenizer

    path, _ = checkpoint
    sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    tok = load_tokenizer(str(path))
    rng = random.Random(0)
    alphabet = [*"abcdefghij ABC  \n\t.,!?0123456789你好世界é😀", "<|im_start|>", "<|im_end|>"]
    texts = ["Hello world", "  two leading spaces", "\n\nHuman: hi there\n\nAssistant:", " I think so.",
             "<|im_start|>user\nhi<|im_end|>\n", "日本語 ok"] + ["".join(rng.choices(alphabet, k=rng.randint(1, 30))) for _ in range(300)]
    for text in texts:
        assert tok(text).input_ids == internlm2_token_ids(sp, text), text
        assert tok(text, add_special_tokens=False).input_ids == internlm2_token_ids(sp, text, add_bos=False), text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, len(tok)) == (1, 2, 2, sp.get_piece_size())
    assert tok.decode(tok(" I think so.", add_special_tokens=False).input_ids) == " I think so."
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    tok.save_pretrained(tmp_path / "saved")  # what final/ holds: plain transformers loads the same tokenizer
    again = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert all(again(t).input_ids == tok(t).input_ids for t in texts) and again.chat_template == tok.chat_template


def test_betadpo_trains_and_eval_generates(checkpoint, tmp_path):
    """The headline config with a local InternLM2 directory (tiny settings): no remote code anywhere."""
    path, _ = checkpoint
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"\n\nHuman: {t}\n\nAssistant:", "chosen": " I think so.", "rejected": " I don't know!"} for t in TEXT]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    tiny = ["--data.dataset", data, "--data.eval_size", 2, "--data.max_length", 48, "--data.max_prompt_length", 24,
            "--train.output_dir", out, "--train.batch_size", 2, "--train.grad_accum", 1, "--train.max_steps", 2, "--train.warmup_steps", 0]
    run_here("betadpo.py", "--config", "configs/internlm2.yaml", "--model.name_or_path", path, *tiny)  # in this process
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert json.loads((out / "final" / "config.json").read_text())["model_type"] == "llama"
    result = run_here("eval.py", "--config", "configs/internlm2.yaml", "--model.name_or_path", path, *tiny,
                      "--eval.num_prompts", 2, "--eval.samples_per_prompt", 2, "--eval.max_new_tokens", 4,
                      "--eval.output_dir", tmp_path / "eval")
    generations = [json.loads(line) for line in (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == 2 and all(isinstance(g["policy"], str) for g in generations), result.stdout


def test_headline_command_without_network_fails_in_seconds(tmp_path, tiny_model):
    """No network (a hub endpoint that refuses connections), nothing cached: one line at once, not a minute of
    hub retries. Likewise for the HH dataset with a local model."""
    import os
    import time

    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": ""}
    env = {**{k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}, **env}
    # memory_check false: 1.8B in one process exceeds a small host's memory, and the launch guard (which reads
    # no files) would refuse it first; here the hub path is under test (the guard: tests/test_memory_model.py)
    for extra in (["--train.memory_check", "false"], ["--model.name_or_path", tiny_model]):
        out = tmp_path / "run"
        start = time.perf_counter()
        result = run_script("betadpo.py", "--config", "configs/internlm2.yaml", "--train.output_dir", out, *extra, check=False, env=env)
        elapsed = time.perf_counter() - start
        lines = result.stderr.strip().splitlines()
        hub_model = "--model.name_or_path" not in extra
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: model.name_or_path: could not load" if hub_model else "error: could not load"), result.stderr[-2000:]
        assert ("Hub (it does not answer: no network?)" if hub_model else "Anthropic/hh-rlhf") in lines[0]
        assert elapsed < 40 and not out.exists(), elapsed  # hub retries alone take about a minute
