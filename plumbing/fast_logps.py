"""The fast log-prob path (skip on a first reading): betadpo.py's `plain_logps_at` — log π(token t+1 | tokens ≤ t)
at the positions β-DPO uses — computed with far less work and memory. Same arguments, same numbers and gradients
(tests/test_perf.py checks the two paths against each other); betadpo.py's `logps_at` picks one, as the config's
`train.logps` says (plain, fast, or fused: fast with 2b).

Logits (positions × V) are a DPO step's largest tensors: 128 sequences × 512 tokens × InternLM2's 92,544-token
vocabulary are 24 GiB as one fp32 log-softmax. Three savings, each in one place:
  1. The LM head and log-softmax run only at the positions whose log-probs are used: never on padding, on prompt
     tokens only where β(x) needs the prompt's perplexity. transformers' own models (5.x) take a boolean (B, T)
     `logits_to_keep` and return just those positions' logits; other models' full logits are indexed.
  2. log softmax + gather is `token_logps`, a kernel that never holds a full fp32 log-softmax, forward or
     backward. Plain equivalent: torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None]).
  2b. train.logps: fused (Llama, GPT-NeoX): not even the logits. The LM head and the log-softmax are one kernel,
     plumbing/fused_head.py, fed the final hidden states: per chunk of positions, logits → logsumexp and target
     logit, logits dropped; backward recomputes them. Memory no longer grows with positions × V. betadpo.py
     installs it around the forward (fused_head.LMHeadGivesLogps) and hands it to `logps_at` here.
  3. Packing (`packed_logits`): no compute on padding in the model body either. Plain equivalent: the padded
     (B, T) batch with its attention mask.
`token_logps` is also sft.py's SFT loss and eval.py's k1 KL (`plain_token_logps` with train.logps: plain).
"""

import os

import torch

from plumbing.fused_head import core_model


# ---- 2. the log-softmax kernel ---------------------------------------------------------------------------
class _LabelLogProb(torch.autograd.Function):
    """log softmax(logits)[target] without ever holding a full fp32 (B, T, V) log-softmax, forward or backward.

    Why it matters: for a batch of 64 pairs × 512 tokens and InternLM2's 92,544-token vocabulary, one fp32
    log-softmax is 128 × 512 × 92,544 × 4 B ≈ 24 GiB — more than the model. Autograd's version also keeps
    fp32 copies of bf16 logits for backward and builds several (B, T, V) temporaries there. Here:
      forward:  log p = log_softmax(logits) in fp32, `chunk_rows` rows at a time (one fused kernel per chunk),
                and log p(y) gathered from it. When a gradient is needed, the chunk's softmax p = exp(log p) is
                kept for backward, in the logits' dtype, or in autocast's dtype when autocast is on and narrower:
                under accelerate's bf16 the policy's logits arrive as fp32 (one process and DDP: accelerate wraps
                the model's forward in autocast and upcasts its outputs, `convert_outputs_to_fp32`; FSDP2 returns
                bf16), and p stays bf16 either way. The logits themselves are not kept.
      backward: ∂ log p(y) / ∂ logits = onehot(y) − p, times the incoming gradient g: −p·g written over the
                kept p in place, then (1 − p(y))·g at the target, from the fp32 log p(y) (bf16 p would lose
                1 − p(y) when the model is confident). So backward runs no exp over the vocabulary and makes
                no new (B, T, V) tensor. A second backward through the same graph fails loudly: autograd sees
                that the saved p was modified.
    Peak extra memory: one logits-sized tensor (p, bf16 under bf16 autocast) plus chunk_rows × T × V × 4 bytes of
    fp32 work space. (Upcast fp32 logits get their gradient back in fp32: autograd casts the bf16 one on return.)
    (fp32 at least: float64 logits stay float64.) That is the peak of autograd's logits + gradient too.
    Why keep p rather than the logits: recomputing softmax in backward is a second exp over every logit,
    and each (B, T, V) temporary is a fresh allocation, which on a CPU costs a page fault per 4 KiB.
    Works on (B, T, V) logits with (B, T) targets, and on (N, V) with (N,): chunks are chunk_rows slices of dim 0.
    """

    @staticmethod
    def forward(ctx, logits, targets, chunk_rows):
        acc = torch.promote_types(logits.dtype, torch.float32)  # bf16/fp16/fp32 → fp32; fp64 stays fp64
        picked = torch.empty(targets.shape, dtype=acc, device=logits.device)  # (B, T)
        device = logits.device.type
        saved = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else logits.dtype
        saved = saved if saved.itemsize < logits.dtype.itemsize else logits.dtype  # p's dtype: the narrower of the two
        probs = torch.empty_like(logits, dtype=saved) if ctx.needs_input_grad[0] else None  # (B, T, V): softmax, for backward
        for i in range(0, logits.shape[0], chunk_rows):
            rows = slice(i, i + chunk_rows)
            logp = torch.log_softmax(logits[rows].to(acc), -1)  # (b, T, V), fp32
            picked[rows] = logp.gather(-1, targets[rows].unsqueeze(-1)).squeeze(-1)
            if probs is not None:
                torch.exp(logp, out=probs[rows])  # written straight into p (and cast to its dtype)
        ctx.save_for_backward(probs, targets, picked)
        return picked

    @staticmethod
    def backward(ctx, grad_out):  # grad_out: (B, T)
        probs, targets, picked = ctx.saved_tensors
        grad = probs.mul_(-grad_out.unsqueeze(-1).to(probs.dtype))  # −p · g, in place (B, T, V)
        at_target = -torch.expm1(picked) * grad_out  # (1 − p(y)) · g, (B, T), fp32
        return grad.scatter_(-1, targets.unsqueeze(-1), at_target.unsqueeze(-1).to(grad.dtype)), None, None


def token_logps(logits: torch.Tensor, targets: torch.Tensor, chunk_rows: int = 4) -> torch.Tensor:
    """log softmax(logits)[target] in fp32 (fp64 for fp64 logits), `chunk_rows` rows at a time (see _LabelLogProb).

    logits (B, T, V), targets (B, T) → (B, T); or (N, V), (N,) → (N,). Targets outside [0, V) (e.g. -100) give 0.
    """
    valid = (targets >= 0) & (targets < logits.shape[-1])
    return _LabelLogProb.apply(logits, torch.where(valid, targets, 0), chunk_rows) * valid


def plain_token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """token_logps' textbook equivalent (train.logps: plain): the whole fp32 log-softmax, then each target's entry."""
    valid = (targets >= 0) & (targets < logits.shape[-1])
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)  # (…, V)
    return logp.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1) * valid


# ---- 1 and 3: which positions reach the LM head, and packing -------------------------------------------------
def takes_position_mask(model) -> bool:
    """transformers' own causal LMs (5.x) accept a boolean (B, T) `logits_to_keep` and return the logits of the
    True positions only, (n, V). Remote code (`trust_remote_code`) may not: it gets all logits."""
    return any(c.__module__.startswith("transformers.models.") for c in type(core_model(model)).__mro__)


# Architectures whose packed log-probs and gradients tests/test_perf.py checks against the padded ones: each builds
# its attention mask with transformers' masking_utils, which turns position ids that restart at 0 into a
# block-diagonal mask (find_packed_sequence_indices; with the sliding window of Mistral, Gemma 2 and Phi-3 inside
# each block). InternLM2 loads as llama. Others (and remote code) run padded: packing relies on that mask.
PACKED_MODEL_TYPES = ("llama", "gpt_neox", "qwen2", "mistral", "gemma", "gemma2", "phi3")
# Attention implementations (model.attn_implementation) and how packed rows reach them: sdpa and eager get the
# block-diagonal mask and any number of rows; flash attention gets no mask and separates sequences by their
# position ids only for a batch of ONE row (transformers' _is_packed_sequence), so every sequence goes in one row.
PACKED_ROWS = {"sdpa": "rows", "eager": "rows", "flash_attention_2": "one row", "flash_attention_3": "one row"}
PACK_ROW_WIDTH = 2  # packed rows hold up to 2 × the batch's longest sequence: see packed_logits
_SAID = set()  # (model type, attention) pairs already reported as running padded


def packs(model) -> bool:
    """Does this model run packed? If not for a reason worth knowing (an architecture or attention kernel not
    checked for packing), one line says so, once per process and kind."""
    config = getattr(core_model(model), "config", None)
    kind, attention = getattr(config, "model_type", None), getattr(config, "_attn_implementation", None) or "sdpa"
    why = ("the model's code is not transformers' own (remote code)" if not takes_position_mask(model) else
           f"architecture '{kind}' is not among those checked for packing ({', '.join(PACKED_MODEL_TYPES)})"
           if kind not in PACKED_MODEL_TYPES else
           f"attention implementation '{attention}' is not one packing supports ({', '.join(PACKED_ROWS)})"
           if attention not in PACKED_ROWS else None)
    if why and (kind, attention) not in _SAID:
        _SAID.add((kind, attention))
        if os.environ.get("RANK", "0") == "0":
            print(f"note: sequences run padded, not packed: {why}", flush=True)
    return why is None


def row_width(model, T: int, lengths: list[int]) -> int:
    """Tokens per packed row: PACK_ROW_WIDTH × T, or everything in one row for flash attention (PACKED_ROWS)."""
    attention = getattr(core_model(model).config, "_attn_implementation", None)
    return sum(lengths) if PACKED_ROWS.get(attention) == "one row" else PACK_ROW_WIDTH * T


def pack_layout(lengths: list[int], width: int) -> list[tuple[int, int]]:
    """Sequence i → (row, offset) in rows of `width` tokens: first-fit, longest first. Rows ≤ len(lengths)."""
    used, place = [], [None] * len(lengths)  # used[r]: tokens already in row r
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, u in enumerate(used) if u + lengths[i] <= width), len(used))
        if r == len(used):
            used.append(0)
        place[i], used[r] = (r, used[r]), used[r] + lengths[i]
    return place


def packed_logits(model, batch: dict, needed, fused_head=None):
    """OPTIMISATION 3, packing: the batch's sequences laid end to end in as few rows as fit (pack_layout), each
    with its own position ids 0…L−1 and no attention mask: transformers (5.x) then builds a block-diagonal causal
    mask from the position ids (`masking_utils.find_packed_sequence_indices`), so no token sees another
    sequence. Every sequence's logits are those of the padded batch, but the model body runs on few rows with
    little padding instead of 2B rows padded to the longest.
    Rows are up to PACK_ROW_WIDTH = 2 × the longest sequence: wider rows leave less padding but cost attention
    over more (masked) positions (docs/PERFORMANCE.md has the measurements behind the choice of 2).
    (Flash attention: one row of every sequence, whose attention runs per sequence: row_width.)
    → (logits (n, V), index (n,)): row-major over `needed`'s True positions in the packed layout, and each
    one's flat index into `needed` (B·(T−1)), to put the log-probs back in (B, T−1) order. With `fused_head` (a
    fused_head.LMHeadGivesLogps installed on the model): log-probs (n,) instead of logits."""
    ids = batch["input_ids"]  # (B, T)
    B, T = ids.shape
    lengths = batch["attention_mask"].sum(-1).tolist()  # right padding: sequence i is ids[i, :L_i]
    place = pack_layout(lengths, row_width(model, T, lengths))
    R = 1 + max(r for r, _ in place)
    W = max(o + L for (_, o), L in zip(place, lengths))  # the fullest row's length: no all-padding columns
    packed = torch.zeros((R, W), dtype=ids.dtype, device=ids.device)  # (R, W); trailing slots: token 0, position 0
    positions = torch.zeros_like(packed)  # (R, W); each trailing slot is then its own one-token "sequence"
    target = torch.full_like(packed, -1)  # (R, W): flat index b·(T−1) + t of the prediction at that slot, −1 if none
    for i, ((r, o), L) in enumerate(zip(place, lengths)):
        packed[r, o : o + L] = ids[i, :L]
        positions[r, o : o + L] = torch.arange(L, device=ids.device)
        target[r, o : o + L - 1] = i * (T - 1) + torch.arange(L - 1, device=ids.device)  # the last token predicts nothing
    keep = target >= 0
    keep[keep.clone()] = needed.reshape(-1)[target[keep]]  # (R, W): packed slots whose log-prob is used
    index = target[keep]  # (n,)
    # use_cache=False: transformers looks for packed sequences only when there is no KV cache (and no mask).
    if fused_head is not None:  # 2b: the LM head returns log p(the token each kept slot predicts), (n,)
        fused_head.targets = ids[:, 1:].reshape(-1)[index]
    logits = model(input_ids=packed, position_ids=positions, logits_to_keep=keep, use_cache=False).logits  # (n, V) or (n,)
    return logits, index


def logps_at(model, batch: dict, needed: torch.Tensor, fused_head=None) -> torch.Tensor:
    """betadpo.plain_logps_at with the work cut to where it is needed: log π(token t+1 | tokens ≤ t) at the True
    positions of `needed` (B, T−1), 0 elsewhere → (B, T−1) fp32 (fp64 for fp64 models). fused_head: 2b, a
    fused_head.LMHeadGivesLogps installed on the model by the caller; only for models that pack."""
    ids = batch["input_ids"]  # (B, T)
    targets = ids[:, 1:].reshape(-1)  # (B·(T−1),): the token each position predicts
    fused = fused_head is not None
    if fused and not packs(model):
        raise ValueError("logps_at: the fused LM head needs a model that packs (fast_logps.packs)")
    if packs(model):  # 3. packing
        logits, index = packed_logits(model, batch, needed, fused_head)  # (n, V) — or (n,) log-probs — and (n,)
    else:
        index = needed.reshape(-1).nonzero()[:, 0]  # (n,): row-major over `needed`
        if takes_position_mask(model):  # 1. the LM head at the needed positions only
            keep = torch.cat([needed, torch.zeros_like(needed[:, :1])], 1)  # (B, T): the last position predicts nothing
            logits = model(input_ids=ids, attention_mask=batch["attention_mask"], logits_to_keep=keep).logits  # (n, V)
        else:
            logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, :-1][needed]  # (n, V)
    picked = logits if fused else token_logps(logits, targets[index], chunk_rows=256)  # 2. (n,); 256 positions a chunk of fp32 work space
    logp = torch.zeros(needed.numel(), dtype=picked.dtype, device=picked.device).scatter(0, index, picked)  # (B·(T−1),)
    return logp.view(needed.shape)
