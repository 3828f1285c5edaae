"""InternLM2 checkpoints loaded as transformers' own Llama: no remote code.

InternLM2 (https://github.com/InternLM/InternLM) is a Llama-architecture model whose checkpoints use other
parameter names, one fused query/key/value matrix, and a tokenizer class that exists only as remote code.
transformers has no InternLM2 model: its hub repositories ship `modeling_internlm2.py` for
`trust_remote_code`, written for transformers 4.x. On transformers 5 that code loses `.generate` (from 4.52
`PreTrainedModel` no longer inherits `GenerationMixin`), gets no boolean `logits_to_keep` (our memory path)
and no native FSDP wrap class. So we convert at load time, the same mapping InternLM publishes in its
convert-to-Llama tool (`tools/convert2llama.py` in the repository above):

    InternLM2 name                         Llama name
    model.tok_embeddings                   model.embed_tokens
    model.layers.N.attention_norm          model.layers.N.input_layernorm
    model.layers.N.ffn_norm                model.layers.N.post_attention_layernorm
    model.layers.N.attention.wo            model.layers.N.self_attn.o_proj
    model.layers.N.attention.wqkv          model.layers.N.self_attn.{q,k,v}_proj      split, below
    model.layers.N.feed_forward.w1/w3/w2   model.layers.N.mlp.gate_proj/up_proj/down_proj   w2(silu(w1·x) ⊙ w3·x)
    model.norm                             model.norm
    output                                 lm_head                                   (not tied)

wqkv, ((H + 2·KV)·d, hidden) for H query heads, KV key/value heads, head size d, groups G = H / KV, is laid out
per key/value group: viewed as (KV, G + 2, d, hidden), slots [0, G) of group k are its G query heads, slot G
its key head, slot G + 1 its value head. Query head k·G + g therefore attends with key/value head k, which is
what Llama's `repeat_kv` does. Rotary embeddings are the same rotate-half form, RMSNorm and the MLP are the
same, so nothing else changes; `rope_theta` carries over and `rope_scaling {type: dynamic | linear, factor}`
becomes Llama's rope of that type (InternLM2's dynamic NTK formula is transformers' `dynamic` rope).

The tokenizer is InternLM2's sentencepiece `tokenizer.model` (a byte-fallback BPE, like Llama's), rebuilt as
a `tokenizers` BPE with InternLM2's own rules: a "▁" is prepended to every piece of text between special
tokens and spaces become "▁" (sentencepiece's add_dummy_prefix). transformers' `LlamaTokenizer` is not used
because its pre-tokenizer skips the prefix when the text already starts with a space, so " I think" (every
HH response) would get other ids than InternLM2 was trained with. Special tokens, BOS behaviour and the
chat template come from tokenizer_config.json; `save_pretrained` writes a tokenizer.json that plain
`AutoTokenizer` loads back unchanged.
"""

import json
import re
import sys
from pathlib import Path

import torch

# InternLM2 parameter-name pieces → Llama's, applied to each name in order (wqkv is split, not renamed).
RENAMES = (
    ("model.tok_embeddings.", "model.embed_tokens."),
    (".attention_norm.", ".input_layernorm."),
    (".ffn_norm.", ".post_attention_layernorm."),
    (".attention.wo.", ".self_attn.o_proj."),
    (".feed_forward.w1.", ".mlp.gate_proj."),
    (".feed_forward.w3.", ".mlp.up_proj."),
    (".feed_forward.w2.", ".mlp.down_proj."),
)
WQKV = re.compile(r"^(model\.layers\.\d+\.)attention\.wqkv\.(weight|bias)$")
LLAMA_NAME = re.compile(
    r"^(model\.embed_tokens\.weight|model\.norm\.weight|lm_head\.weight|model\.layers\.\d+\."
    r"(input_layernorm|post_attention_layernorm)\.weight|model\.layers\.\d+\.(self_attn\.o_proj|mlp\.(gate|up|down)_proj)\.(weight|bias))$"
)


class ConversionError(ValueError):
    """The directory says model_type internlm2 but its files do not have the InternLM2 layout."""


# --------------------------------------------------------------------------------------------------------
# Which checkpoints are InternLM2
# --------------------------------------------------------------------------------------------------------
def is_internlm2_dir(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "internlm2"


def checkpoint_dir(name: str, is_local: bool, local_files_only: bool) -> Path | None:
    """The local directory of the InternLM2 checkpoint `name` (a directory, or a hub id: from the local
    Hugging Face cache, or downloaded unless local_files_only), or None when `name` is not InternLM2 (or
    cannot be resolved: then the ordinary loader reports why)."""
    if is_local:
        path = Path(name).expanduser()
        return path if is_internlm2_dir(path) else None
    from huggingface_hub import hf_hub_download, snapshot_download

    try:  # one small file first: most hub ids are not InternLM2 and must not be downloaded here
        config = Path(hf_hub_download(name, "config.json", local_files_only=local_files_only))
    except Exception:  # not cached / no such repo / no network: the ordinary loader says which
        return None
    if not is_internlm2_dir(config.parent):
        return None
    files = ["*.json", "*.model", "*.safetensors"]
    path = Path(snapshot_download(name, allow_patterns=files, local_files_only=local_files_only))
    if not any(path.glob("*.safetensors")):  # older repositories ship only pytorch_model*.bin
        path = Path(snapshot_download(name, allow_patterns=[*files, "*.bin"], local_files_only=local_files_only))
    return path


# --------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------
def llama_config(cfg: dict):
    """InternLM2's config.json (a dict) → the equivalent LlamaConfig."""
    from transformers import LlamaConfig

    rope = {"rope_type": "default", "rope_theta": float(cfg.get("rope_theta", 10000.0))}
    scaling = cfg.get("rope_scaling")
    if scaling:
        kind = scaling.get("type") or scaling.get("rope_type")
        if kind not in ("dynamic", "linear"):
            raise ConversionError(f"rope_scaling type {kind!r}: InternLM2 defines only 'dynamic' and 'linear'")
        rope.update(rope_type=kind, factor=float(scaling["factor"]))
    return LlamaConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        hidden_act=cfg.get("hidden_act", "silu"),
        max_position_embeddings=cfg["max_position_embeddings"],
        initializer_range=cfg.get("initializer_range", 0.02),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        bos_token_id=cfg.get("bos_token_id", 1),
        eos_token_id=cfg.get("eos_token_id", 2),
        pad_token_id=cfg.get("pad_token_id"),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        rope_parameters=rope,
        attention_bias=cfg.get("bias", False),  # InternLM2's `bias` is on wqkv and wo only, as Llama's attention_bias
        mlp_bias=False,
    )


def convert_state_dict(weights: dict, cfg: dict) -> dict:
    """InternLM2 parameter names and fused wqkv → Llama's names and separate q/k/v projections."""
    H = cfg["num_attention_heads"]
    KV = cfg.get("num_key_value_heads", H)
    G, d = H // KV, cfg["hidden_size"] // H
    out = {}
    for name, tensor in weights.items():
        if name.endswith("rotary_emb.inv_freq"):  # a buffer some old checkpoints saved; recomputed by Llama
            continue
        if m := WQKV.match(name):
            prefix, kind = m.groups()
            groups = tensor.reshape(KV, G + 2, d, *tensor.shape[1:])  # (KV, G+2, d[, hidden])
            rest = tensor.shape[1:]
            out[f"{prefix}self_attn.q_proj.{kind}"] = groups[:, :G].reshape(H * d, *rest)  # head k·G+g ← group k, slot g
            out[f"{prefix}self_attn.k_proj.{kind}"] = groups[:, G].reshape(KV * d, *rest)
            out[f"{prefix}self_attn.v_proj.{kind}"] = groups[:, G + 1].reshape(KV * d, *rest)
            continue
        new = "lm_head.weight" if name == "output.weight" else name
        for old, replacement in RENAMES:
            new = new.replace(old, replacement)
        if not LLAMA_NAME.match(new):
            raise ConversionError(f"unexpected parameter '{name}' for an InternLM2 checkpoint")
        out[new] = tensor
    return out


def read_weights(path: Path) -> dict:
    """Every tensor of the checkpoint in `path` (*.safetensors, else pytorch_model*.bin), in its stored dtype."""
    files = sorted(path.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        return {k: v for f in files for k, v in load_file(f).items()}
    files = sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise ConversionError(f"no *.safetensors or pytorch_model*.bin weights in '{path}'")
    return {k: v for f in files for k, v in torch.load(f, map_location="cpu", weights_only=True, mmap=True).items()}


def load_model(path: Path, dtype: torch.dtype):
    """An InternLM2 checkpoint directory → transformers' LlamaForCausalLM with the same weights (and outputs).

    Memory: the checkpoint is read in its stored dtype (bf16 for InternLM2.5: 3.8 GB at 1.8B parameters) and
    handed to `from_pretrained`, which builds the model on the meta device and fills it in `dtype`.
    """
    from transformers import GenerationConfig, LlamaForCausalLM

    cfg = json.loads((path / "config.json").read_text())
    state_dict = convert_state_dict(read_weights(path), cfg)
    model = LlamaForCausalLM.from_pretrained(None, config=llama_config(cfg), state_dict=state_dict, dtype=dtype)
    if (path / "generation_config.json").is_file():  # e.g. InternLM2.5-chat stops at </s> or <|im_end|>
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model


# --------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------
def _content(token) -> str | None:
    return token["content"] if isinstance(token, dict) else token


def load_tokenizer(path: Path):
    """InternLM2's sentencepiece tokenizer.model + tokenizer_config.json → a transformers fast tokenizer that
    gives the same ids as InternLM2's own (remote-code) tokenizer."""
    from tokenizers import Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import import_protobuf
    from transformers.tokenization_utils_base import generate_merges

    config = json.loads((path / "tokenizer_config.json").read_text()) if (path / "tokenizer_config.json").is_file() else {}
    proto = import_protobuf().ModelProto()
    proto.ParseFromString((path / "tokenizer.model").read_bytes())
    if proto.trainer_spec.model_type != 2:  # sentencepiece's enum: 1 unigram, 2 BPE
        raise ConversionError(f"'{path / 'tokenizer.model'}' is not a BPE sentencepiece model (InternLM2's is)")
    if proto.normalizer_spec.precompiled_charsmap or proto.normalizer_spec.remove_extra_whitespaces:
        print(f"warning: '{path / 'tokenizer.model'}' normalizes text (Unicode rules or extra spaces); the converted "
              "tokenizer, like InternLM2's own fast tokenizer, does not, so some inputs may get other ids", file=sys.stderr)
    pieces = [p.piece for p in proto.pieces]
    # tokenizer_config.json names the special tokens by id; they replace whatever piece has that id.
    added = {int(i): _content(t) for i, t in config.get("added_tokens_decoder", {}).items()}
    for i, content in added.items():
        if i < len(pieces):
            pieces[i] = content
    vocab = {piece: i for i, piece in enumerate(pieces)}  # (sentencepiece orders pieces by merge priority)
    unk = proto.trainer_spec.unk_piece or "<unk>"
    backend = Tokenizer(BPE(vocab=vocab, merges=generate_merges(vocab), unk_token=unk, fuse_unk=True,
                            byte_fallback=proto.trainer_spec.byte_fallback))
    prefix = [normalizers.Prepend("▁")] if proto.normalizer_spec.add_dummy_prefix else []
    backend.normalizer = normalizers.Sequence([*prefix, normalizers.Replace(" ", "▁")])  # no pre-tokenizer: text stays whole
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         *([decoders.Strip(" ", 1, 0)] if prefix else [])])  # drop the prepended space
    chat_template = config.get("chat_template")
    if chat_template is None and (path / "chat_template.jinja").is_file():
        chat_template = (path / "chat_template.jinja").read_text()
    specials = {key: _content(config.get(key, default)) for key, default in
                (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", unk), ("pad_token", None))}
    extra = [_content(t) for t in config.get("additional_special_tokens", [])]
    extra += [c for i, c in sorted(added.items()) if c not in extra and c not in specials.values()]
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **{k: v for k, v in specials.items() if v is not None},
        additional_special_tokens=extra,
        add_bos_token=config.get("add_bos_token", True),
        add_eos_token=config.get("add_eos_token", False),
        chat_template=chat_template,
        clean_up_tokenization_spaces=False,
        name_or_path=str(path),
    )
