"""docs/SCALING.md's memory model (bytes per device of a training step, from the model's config alone), and the
launch guard that refuses a launch the model says cannot fit, before anything is read.

The model, per device, for N parameters (T of them trained), G processes a model is sharded over (1 unless
FSDP2), w bytes per weight (model.dtype), p bytes per parameter in the forward (2 under bf16/fp16 mixed
precision with FSDP2, else w), and n tokens per micro-batch on this device (pairs × 2 × data.max_length):

    states      = (w·N + w·T + k·w·T + r·N) / G     weights, gradients, optimizer (k = 2 AdamW, 1 RMSprop),
                                                    reference (r bytes: plumbing/distributed.py frozen_dtype)
    forward/backward, whichever is larger:
      A = activations(n) + head_backward(n) + (FSDP: 2 unsharded layers + the embedding/LM-head group, p bytes)
      B = FSDP's end of backward: the unsharded gradient of the embedding/LM-head group in p bytes, plus its fp32
          copy for the reduce-scatter when p < 4 and train.fsdp_reduce_dtype is fp32 (the staging)
    peak        = states + max(A, B)

    activations(n) = n · L · (a·(7h + 2·kv + 4·I) + 8h)      a = 2 under autocast, 4 in fp32: what a Llama layer saves
                   = n · (L·4h + a·(7h + 2·kv + 4·I) + 8h)   with gradient checkpointing (layer inputs + one layer)
    head_backward(n) = 4·V·h (∂W in fp32, plumbing/fused_head.py) + 2·V·h (its cast to the bf16 weight, FSDP2
                       mixed precision) + 4·n·h (∂h) + 48 MiB (one tile of fp32 and one of bf16 logits)

Not counted: the CUDA context and the caching allocator's slack on a GPU, the data, temporary tensors inside one
op. So the guard refuses only when the estimate alone exceeds the device's memory: a launch it lets through can
still run out of memory, one it refuses cannot fit.
"""

import os
from dataclasses import dataclass

GB = 1e9
TILE_BYTES = 48 * 2**20  # plumbing/fused_head.py: one 2048 × 4096 tile of fp32 logits and one of bf16
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
OPTIMIZER_STATES = {"adamw": 2, "rmsprop": 1, "sgd": 0}  # fp32 tensors per parameter (sgd: no momentum)

# Models whose configs a guard must know without the Hub: hub id → their config.json's shape (hidden, layers,
# heads, KV heads, MLP, vocabulary). InternLM2.5 (internlm/internlm2_5-*-chat, untied LM head), as the 7B and
# 20B configs name them; anything else is read from its config.json (a local directory or the Hub's cache).
KNOWN_SHAPES = {
    "internlm/internlm2_5-1_8b-chat": (2048, 24, 16, 8, 8192, 92544),
    "internlm/internlm2_5-7b-chat": (4096, 32, 32, 8, 14336, 92544),
    "internlm/internlm2_5-20b-chat": (6144, 48, 48, 8, 16384, 92544),
}


@dataclass
class Shape:
    """What the memory model needs of an architecture (Llama-like names; other architectures map onto them)."""

    params: int  # N, counted on a model built on the meta device (exact, no memory)
    hidden: int
    layers: int
    kv: int  # key/value width: KV heads × head size
    mlp: int
    vocab: int
    embed_head: int  # parameters of the embedding + LM head + final norm: FSDP2's root group


def shape_of(config) -> Shape:
    """A transformers config → its Shape, the parameter count from a model built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    N = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.get_decoder().layers[0].parameters()) if hasattr(model, "get_decoder") else 0
    h, L = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * (getattr(config, "head_dim", None) or h // heads)
    return Shape(N, h, L, kv, getattr(config, "intermediate_size", 4 * h), config.vocab_size, N - L * layer)


def known_config(name: str):
    """The transformers config of `name` without the network: a local directory's config.json, the Hub's local
    cache, or KNOWN_SHAPES; None when there is none (GGUF files, packaged models, an uncached hub id)."""
    import json
    from pathlib import Path

    from transformers import AutoConfig, LlamaConfig

    from plumbing import internlm2

    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        config_file = path / "config.json"
    elif not path.exists() and name.count("/") == 1:
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(name, "config.json")
        except ValueError:  # not a valid hub id (e.g. './missing'): the loader says so, later
            cached = None
        config_file = Path(cached) if isinstance(cached, str) else None
    else:
        config_file = None
    if config_file is not None:
        try:
            raw = json.loads(config_file.read_text())
            return internlm2.llama_config(raw) if raw.get("model_type") == "internlm2" else AutoConfig.from_pretrained(config_file.parent)
        except Exception:  # a damaged config.json, remote-code architectures: the loader says what is wrong, later
            return None
    if name in KNOWN_SHAPES:
        h, L, H, KV, I, V = KNOWN_SHAPES[name]
        return LlamaConfig(hidden_size=h, num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=KV,
                           intermediate_size=I, vocab_size=V, tie_word_embeddings=False)
    return None


@dataclass
class Launch:
    """How a run is launched, as far as memory goes."""

    processes: int
    shards: int  # G: processes a model is sharded over (1: not sharded)
    weight_bytes: int  # w
    compute_bytes: int  # p
    reference_bytes: int  # r; 0 without a reference model
    trained_fraction: float  # T / N: 1, or ≈ 0 with LoRA
    optimizer_states: int  # k
    tokens: int  # n per device per micro-batch
    checkpointing: bool
    autocast: bool
    fp32_reduce: bool


def estimate(s: Shape, launch: Launch) -> dict:
    """The memory model above → {term: bytes} per device, and "peak"."""
    G, w, p, n = launch.shards, launch.weight_bytes, launch.compute_bytes, launch.tokens
    T = s.params * launch.trained_fraction
    terms = {"weights": w * s.params / G, "gradients": w * T / G, "optimizer": launch.optimizer_states * w * T / G,
             "reference": launch.reference_bytes * s.params / G}
    a = 2 if launch.autocast else 4
    saved = a * (7 * s.hidden + 2 * s.kv + 4 * s.mlp) + 8 * s.hidden  # bytes one layer saves per token
    per_token = s.layers * 4 * s.hidden + saved if launch.checkpointing else s.layers * saved
    terms["activations"] = n * per_token
    head_w = s.vocab * s.hidden
    terms["head_backward"] = 4 * head_w + (2 * head_w if p < 4 else 0) + 4 * n * s.hidden + TILE_BYTES
    layer = (s.params - s.embed_head) / max(s.layers, 1)
    sharded = G > 1
    terms["fsdp_unsharded"] = p * (2 * layer + s.embed_head) if sharded else 0
    terms["fsdp_reduce_staging"] = (p + (4 if p < 4 and launch.fp32_reduce else 0)) * s.embed_head if sharded else 0
    states = sum(terms[k] for k in ("weights", "gradients", "optimizer", "reference"))
    step = terms["activations"] + terms["head_backward"] + terms["fsdp_unsharded"]
    terms["peak"] = states + max(step, terms["fsdp_reduce_staging"])
    return terms


def launch_of(cfg, accelerator, shards: int | None = None) -> Launch:
    """The Launch of a run's config (betadpo.py's Config or sft.py's SFTConfig) under `accelerator`; `shards`
    overrides how it is launched: FSDP2 over that many processes (what the refusal suggests)."""
    from types import SimpleNamespace

    from plumbing.distributed import frozen_dtype

    T, M = cfg.train, cfg.model
    processes = shards or accelerator.num_processes
    fsdp = shards is not None or getattr(accelerator, "is_fsdp2", False)
    if shards is None:  # HSDP shards within a machine only: accelerate's parallelism_config dp_shard_size
        pc = getattr(accelerator, "parallelism_config", None)
        shards = (getattr(pc, "dp_shard_size", None) or processes) if fsdp else 1
    mixed = T.mixed_precision in ("bf16", "fp16")
    loss = getattr(cfg, "loss", None)  # sft.py's config has none, and no reference
    reference = loss is not None and not (M.lora_r > 0 and not M.ref_name_or_path)  # LoRA: the adapters-off policy
    if reference:
        import variants  # which losses need no reference model (SimPO, ORPO)

        reference = not variants.reference_free(loss.type) and not (T.precompute_ref and not M.ref_name_or_path)
    # the reference's dtype as betadpo.py loads it (frozen_dtype reads only whether the launch is FSDP2)
    r = DTYPE_BYTES[frozen_dtype(cfg, SimpleNamespace(is_fsdp2=fsdp))] if reference else 0
    w = DTYPE_BYTES[M.dtype]
    pairs = max(T.batch_size // T.grad_accum // processes, 1)  # per device per micro-batch
    return Launch(processes=processes, shards=shards, weight_bytes=w, compute_bytes=2 if fsdp and mixed else w,
                  reference_bytes=r, trained_fraction=0.0 if M.lora_r > 0 else 1.0,
                  optimizer_states=OPTIMIZER_STATES.get(T.optimizer, 2), tokens=pairs * 2 * cfg.data.max_length,
                  checkpointing=T.gradient_checkpointing, autocast=mixed, fp32_reduce=T.fsdp_reduce_dtype == "fp32")


def device_memory(accelerator) -> tuple[float, str]:
    """(bytes one process may use, what that is): a GPU's total memory; on CPUs the host's available memory
    (MemAvailable) shared by the processes on this machine."""
    device = accelerator.device
    if device.type == "cuda":
        import torch

        return float(torch.cuda.get_device_properties(device).total_memory), f"on a {torch.cuda.get_device_name(device)}"
    try:
        with open("/proc/meminfo") as f:
            available = int(next(line for line in f if line.startswith("MemAvailable:")).split()[1]) * 1024
    except (OSError, StopIteration):  # not Linux: nothing to compare with
        return float("inf"), "unknown"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return available / local, "available on this host" + (f" per process ({local} on it)" if local > 1 else "")


def check_fits(cfg, accelerator):
    """The launch guard (train.memory_check): a UserError, one line, when the memory model's peak per device
    exceeds the memory a process has. Reads the model's config only (never its weights, never the network);
    a model whose config cannot be known that way (GGUF, packaged, an uncached hub id) is not checked."""
    from plumbing.errors import UserError

    if not cfg.train.memory_check:
        return
    # (a study's split model, experiments/lower_cache.py, is a Llama config of its top blocks: counted as such)
    config = known_config(cfg.model.name_or_path)
    if config is None:
        return
    try:
        shape = shape_of(config)
    except Exception:  # an architecture transformers cannot build: its loader will say why
        return
    launch = launch_of(cfg, accelerator)
    need = estimate(shape, launch)
    have, where = device_memory(accelerator)
    if need["peak"] <= have:
        return
    how = (f"FSDP over {launch.shards} processes" if launch.shards > 1 else
           f"{launch.processes} process{'es' if launch.processes > 1 else ''}, not sharded (no FSDP)")
    terms = ", ".join(f"{k} {v / GB:.1f}" for k, v in need.items() if k != "peak" and v > 0.05 * GB)
    peak_at = lambda G: estimate(shape, launch_of(cfg, accelerator, G))["peak"]  # noqa: E731  FSDP over G processes
    fitting = [G for G in (2, 4, 8, 16, 32, 64) if G >= launch.processes and G > launch.shards and peak_at(G) <= have]
    hint = (f"; under FSDP over {fitting[0]} processes it needs ≈ {peak_at(fitting[0]) / GB:.1f} GB each (accelerate launch "
            "--config_file configs/accelerate/fsdp.yaml)") if fitting else ""
    raise UserError(f"this launch does not fit: {cfg.model.name_or_path} ({shape.params / 1e9:.2f} B parameters) needs ≈ "
                    f"{need['peak'] / GB:.1f} GB per device by docs/SCALING.md's memory model ({how}; {terms}), against "
                    f"{have / GB:.1f} GB {where}{hint}; or set train.memory_check false to launch anyway")
