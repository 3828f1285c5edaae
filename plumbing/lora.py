"""LoRA through `peft` (model.lora_r > 0): low-rank adapters are trained, the starting weights stay frozen, and
β-DPO's reference is the same model with its adapters switched off: no second model in memory.

LoRA (Hu et al., 2021, https://arxiv.org/abs/2106.09685) replaces each chosen Linear's W x by

    W x + (α / r) · B A x,     A: (r, d_in) random,  B: (d_out, r) = 0 at the start,  only A and B trained.

Since B starts at 0, the policy starts exactly at the base model; and with the adapters off (peft's
`disable_adapter()`) the forward pass is W x alone, i.e. the frozen starting model = π_ref of the usual DPO setup
(TRL does the same: https://github.com/huggingface/trl/issues/1263). The reference then costs a forward pass,
as always, but no memory beyond the adapters. tests/test_lora.py checks that adapters-off log-probs are the
base model's exactly, also after training steps.

Dropout: load_model switches off every dropout (DPO compares log-probs of two models; dropout noise would enter
every margin), and model.lora_dropout defaults to 0 for the same reason. In β-DPO it must stay 0 (config check):
the noise would be in the policy's log-probs and not the reference's. sft.py may use it (plain SFT loss).

final/: peft's adapter directory (adapter_config.json + adapter_model.safetensors, a few MB), the tokenizer and
the run's extras; with model.lora_merge_final also final/merged/, the adapters folded into the weights
(W ← W + (α/r)·B A): a plain `save_pretrained` model that transformers loads without peft.
"""

import json
import warnings
from pathlib import Path

import torch


ADAPTER_CONFIG = "adapter_config.json"


def enabled(model_cfg) -> bool:
    return model_cfg.lora_r > 0


def add_adapters(model, model_cfg, base_name: str):
    """model → peft's PeftModel with fresh adapters (B = 0: the same outputs), or the model itself without LoRA.
    Only the adapters are trainable. base_name: what adapter_config.json records as the base model
    (model.name_or_path as given, e.g. "smollm2-135m"), for eval.py to load it back."""
    if not enabled(model_cfg):
        return model
    from peft import LoraConfig, get_peft_model

    targets = model_cfg.lora_target_modules.strip()
    config = LoraConfig(
        r=model_cfg.lora_r, lora_alpha=model_cfg.lora_alpha, lora_dropout=model_cfg.lora_dropout, bias="none",
        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()],
        task_type="CAUSAL_LM",
    )
    try:
        with warnings.catch_warnings():  # peft 0.21 asks transformers 5 a deprecated question; nothing for the user to do
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = get_peft_model(model, config)
    except ValueError as e:  # e.g. "Target modules {'q'} not found in the base model"
        from plumbing.errors import UserError

        raise UserError(f"model.lora_target_modules: {str(e).splitlines()[0]}") from None
    peft_model.peft_config["default"].base_model_name_or_path = base_name
    return peft_model


def peft_model_of(model):
    """The PeftModel inside `model` (DDP keeps it in .module; FSDP2 shards it in place), or None without LoRA."""
    from peft import PeftModel

    model = getattr(model, "module", model)
    return model if isinstance(model, PeftModel) else None


class AdaptersOff:
    """π_ref as a view of the policy: calling it runs the policy's forward with every adapter switched off.

    Holds the PeftModel itself (under DDP the wrapper's .module): the reference forward is always no-grad, so it
    needs no DDP gradient hooks, and under FSDP2 the PeftModel *is* the sharded model (fully_shard works in
    place), whose forward gathers the shards as usual. `.module` lets fast_logps find the transformers model
    inside (packing, the position-mask LM head) as it does through DDP."""

    def __init__(self, policy):
        self.module = peft_model_of(policy)

    def __call__(self, **inputs):
        with self.module.disable_adapter():
            return self.module(**inputs)

    # score_in_chunks puts the model it scores with in eval mode and back: here that is the policy
    @property
    def training(self) -> bool:
        return self.module.training

    def train(self, mode: bool = True):
        self.module.train(mode)
        return self

    def eval(self):
        return self.train(False)


def is_adapter_dir(path: str) -> bool:
    return (Path(path).expanduser() / ADAPTER_CONFIG).is_file()


def adapter_base(path: str) -> str:
    """The base model an adapter directory was trained from (adapter_config.json's base_model_name_or_path)."""
    return json.loads((Path(path).expanduser() / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") or ""


def load_trained(path: str, dtype: str, trust_remote_code: bool, key: str, attn_implementation: str = "auto"):
    """A trained model for eval.py (and sft.py's last check) → a plain transformers model: load_model's, or for a
    LoRA adapter directory its base model (adapter_config.json names it) with the adapters folded in by peft
    (merge_and_unload: generation and scoring then run at full speed, without the peft wrapper)."""
    from plumbing.models import load_model

    if not is_adapter_dir(path):
        return load_model(path, dtype, trust_remote_code, key, attn_implementation)
    from peft import PeftModel

    base = load_model(adapter_base(path), dtype, trust_remote_code, f"{key}'s {ADAPTER_CONFIG} (base_model_name_or_path)",
                      attn_implementation)
    return PeftModel.from_pretrained(base, str(Path(path).expanduser())).merge_and_unload()


def merged_state_dict(peft_model, state_dict: dict) -> dict:
    """A PeftModel's full state dict (gathered from FSDP shards if need be) → the plain model's, with each adapted
    Linear's weight W + (α/r)·B A and no adapter tensors: what merge_and_unload would give, computed from the
    tensors alone (under FSDP2 the modules hold shards; the gathered state dict holds whole tensors)."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    merged = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.scaling:
            W, A, B = (state_dict[f"{name}.{k}"] for k in ("base_layer.weight", "lora_A.default.weight", "lora_B.default.weight"))
            acc = torch.promote_types(W.dtype, torch.float32)  # bf16 weights: the sum in fp32, then rounded once
            delta = module.scaling["default"] * (B.to(acc) @ A.to(acc))  # (d_out, d_in)
            if getattr(module, "fan_in_fan_out", False):  # GPT-2's Conv1D stores W transposed
                delta = delta.T
            merged[f"{name}.weight".removeprefix(prefix)] = (W.to(acc) + delta).to(W.dtype)
    for key, value in state_dict.items():
        plain = key.removeprefix(prefix).replace(".base_layer.", ".")
        if "lora_" not in key and plain not in merged:
            merged[plain] = value
    return merged


def save_merged(peft_model, directory: Path, state_dict: dict, tokenizer):
    """Main process: the merged model (merged_state_dict) and the tokenizer in `directory`, as a plain
    `save_pretrained` directory. Tied weights (lm_head = embed_tokens) are stored once, as the base model does."""
    base = peft_model.get_base_model()
    merged = merged_state_dict(peft_model, state_dict)
    for tied in getattr(base, "all_tied_weights_keys", None) or {}:
        merged.pop(tied, None)
    base.save_pretrained(directory, state_dict=merged)
    tokenizer.save_pretrained(directory)


def trainable_summary(model) -> str:
    """"LoRA: 1,843,200 of 136,358,208 parameters trainable (1.35%)" — one line for the log (per process under FSDP2)."""
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"LoRA: {trained:,} of {total:,} parameters trainable ({100 * trained / total:.2f}%)"
