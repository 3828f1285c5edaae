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
  3. Packing (`pack_plan`): no compute on padding in the model body either. Plain equivalent: the padded
     (B, T) batch with its attention mask.
  4. Prefix sharing (train.prefix_sharing, with packing): a pair's prompt goes through the body once, not once in
     its chosen row and once in its rejected row: one sequence prompt + chosen + rejected, and an attention mask
     that keeps the two responses apart (`pair_sequences`, `prefix_sharing_mask`). Plain equivalent: the same
     padded batch.
`token_logps` is also sft.py's SFT loss and eval.py's k1 KL (`plain_token_logps` with train.logps: plain).
"""

import os

import torch

from plumbing.fused_head import core_model
from plumbing.host_sync import on_host


# ---- 2. the log-softmax kernel ---------------------------------------------------------------------------
class _LabelLogProb(torch.autograd.Function):
    """log softmax(logits)[target] without ever holding a full fp32 (B, T, V) log-softmax, forward or backward.

    Why it matters: for a batch of 64 pairs × 512 tokens and InternLM2's 92,544-token vocabulary, one fp32
    log-softmax is 128 × 512 × 92,544 × 4 B ≈ 24 GiB — more than the model. Autograd's version also keeps
    fp32 copies of bf16 logits for backward and builds several (B, T, V) temporaries there. Here:
      forward:  log p = log_softmax(logits) in fp32, `chunk_rows` rows at a time (one fused kernel per chunk),
                and log p(y) gathered from it. When a gradient is needed, the chunk's softmax p = exp(log p) is
                kept for backward, in the logits' dtype, or in autocast's dtype when autocast is on and narrower:
                under accelerate's bf16 the policy's logits arrive as fp32 (accelerate wraps the prepared model's
                forward in autocast and upcasts its outputs, `convert_outputs_to_fp32`; a frozen reference under
                FSDP2 returns bf16), and p stays bf16 either way. The logits themselves are not kept.
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
PACK_ROW_WIDTH = 2  # packed rows hold up to 2 × the batch's longest sequence: see pack_plan
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


def to_device(batch: dict, device) -> dict:
    """The collated batch (CPU tensors) onto `device` without making the host wait for the copy: pinned memory and
    non_blocking copies (a copy from pageable memory blocks the host until it is done). The CPU batch itself stays
    under "host": `logps_at` plans the packing from it (pack_plan), so no device tensor is ever read back."""
    return {**{k: _copy(v, device) for k, v in batch.items()}, "host": batch}


def _copy(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor onto `device`, asynchronously (pinned + non_blocking); the tensor itself on a CPU."""
    device = torch.device(device)
    return t if device.type == "cpu" else t.pin_memory().to(device, non_blocking=True)


def pack_plan(model, host: dict, needed: torch.Tensor, prefix_sharing: bool = False) -> dict:
    """OPTIMISATION 3, packing (and 4, prefix sharing), planned on the host: which tokens go where, and where the
    log-probs come from.

    host: the collated batch's input_ids and attention_mask (B, T) on the host (and prompt_lens (B,) for prefix
    sharing); needed (B, T−1) bool on the host.
    Packing (when `packs(model)`): the batch's sequences laid end to end in as few rows as fit (pack_layout), each
    with its own position ids 0…L−1 and no attention mask: transformers (5.x) then builds a block-diagonal causal
    mask from the position ids (`masking_utils.find_packed_sequence_indices`), so no token sees another
    sequence. Every sequence's logits are those of the padded batch, but the model body runs on few rows with
    little padding instead of 2B rows padded to the longest. Rows are up to PACK_ROW_WIDTH = 2 × the longest
    sequence: wider rows leave less padding but cost attention over more (masked) positions (docs/PERFORMANCE.md
    has the measurements behind the choice of 2). (Flash attention: one row of every sequence: row_width.)
    prefix_sharing (rows i and B/2 + i are a pair, as collate_pairs makes them, and `shares_prefixes(model)`):
    each pair is ONE sequence, prompt + chosen + rejected (pair_sequences), and the mask that keeps the branches
    apart is explicit: `shared` below, turned into the model's attention mask by prefix_sharing_mask.
    Otherwise the padded rows as they are, with their attention mask.
    → CPU tensors: the model's inputs (input_ids (R, W), position_ids or attention_mask), and for the n needed
    predictions: `keep` (R, m) the columns per row of the positions whose hidden states reach the LM head (padded by
    repeating a column: transformers' integer `logits_to_keep`), `rows` (n,) each prediction's place in the R·m
    kept positions (a shared prompt's last position appears twice: it predicts both responses' first tokens),
    `flat` (n,) its place in the R·W grid, `index` (n,) its flat index into `needed` (B·(T−1)), `targets` (n,) the
    token it predicts; `shared`: None, or (sequence, branch) (R, W) for prefix_sharing_mask. Every size is known
    here, so the device never has to report one (no boolean-mask indexing there)."""
    ids, mask = host["input_ids"], host["attention_mask"]  # (B, T)
    assert ids.device.type == mask.device.type == needed.device.type == "cpu", "pack_plan works on host tensors"
    B, T = ids.shape
    lengths = mask.sum(-1).tolist()  # right padding: sequence i is ids[i, :L_i]
    shared = None
    if packs(model):
        sharing = prefix_sharing and shares_prefixes(model)
        sequences = (pair_sequences(ids, lengths, host["prompt_lens"]) if sharing
                     else [_alone(ids, b, L) for b, L in enumerate(lengths)])
        sizes = [len(s[0]) for s in sequences]
        place = pack_layout(sizes, row_width(model, T, sizes))
        R = 1 + max(r for r, _ in place)
        W = max(o + L for (_, o), L in zip(place, sizes))  # the fullest row's length: no all-padding columns
        grid = torch.zeros((R, W), dtype=ids.dtype)  # (R, W); trailing slots: token 0, position 0
        positions = torch.zeros_like(grid)  # (R, W); each trailing slot is then its own one-token "sequence"
        sequence = -1 - torch.arange(R * W).view(R, W)  # (R, W): which sequence a slot holds; trailing slots: own ids
        branch = torch.zeros_like(grid)  # (R, W): 0 prompt (or a whole unshared sequence), 1 chosen, 2 rejected
        flat, index = [], []  # per prediction: its slot in the (R, W) grid; its flat index b·(T−1) + t in `needed`
        for k, ((tokens, pos, br, members), (r, o)) in enumerate(zip(sequences, place)):
            L = len(tokens)
            grid[r, o : o + L], positions[r, o : o + L], branch[r, o : o + L] = tokens, pos, br
            sequence[r, o : o + L] = k
            for b, slots in members:  # batch row b's token t sits at slot slots[t]; t predicts t+1 (the last: nothing)
                flat.append(r * W + o + slots[:-1])
                index.append(b * (T - 1) + torch.arange(len(slots) - 1))
        flat, index = torch.cat(flat), torch.cat(index)  # (n_all,) each
        # use_cache=False: transformers looks for packed sequences only when there is no KV cache (and no mask).
        inputs = {"input_ids": grid, "position_ids": positions, "use_cache": False}
        shared = (sequence, branch) if sharing else None
    else:
        grid, W = ids, T
        flat = (torch.arange(B)[:, None] * T + torch.arange(T - 1)).reshape(-1)  # (B·(T−1),): t predicts t+1
        index = torch.arange(B * (T - 1))
        inputs = {"input_ids": ids, "attention_mask": mask}
    used = needed.reshape(-1)[index]
    flat, index = flat[used], index[used]  # (n,): the predictions whose log-prob is used
    keep = torch.zeros(grid.numel(), dtype=torch.bool)
    keep[flat] = True
    keep = keep.view(grid.shape)  # (R, W): slots whose hidden state reaches the LM head (once, even if it predicts twice)
    rank = keep.cumsum(-1) - 1  # (R, W): a kept slot's number within its row
    m = max(1, int(keep.sum(-1).max()))
    row, col = keep.nonzero(as_tuple=True)
    kept = torch.zeros((grid.shape[0], m), dtype=torch.long)  # (R, m); padding repeats column 0 (computed, unused)
    kept[row, rank[row, col]] = col
    return {"inputs": inputs, "keep": kept, "rows": (flat // W) * m + rank.reshape(-1)[flat], "flat": flat,
            "index": index, "targets": ids[:, 1:].reshape(-1)[index], "shared": shared}


# ---- 4. prefix sharing: each pair's prompt through the model once -----------------------------------------
# The layer types whose masks prefix_sharing_mask builds (a config's `layer_types`; none: one kind for all layers).
SHARED_LAYER_TYPES = ("full_attention", "sliding_attention")


def shares_prefixes(model) -> bool:
    """Can a pair run as one sequence, prompt + chosen + rejected? Position ids cannot keep the rejected branch
    from seeing the chosen one, so it takes an explicit attention mask: a model that packs, with sdpa or eager
    attention (flash attention takes no mask: it runs packed, unshared), whose layers are of SHARED_LAYER_TYPES."""
    config = core_model(model).config
    attention = getattr(config, "_attn_implementation", None) or "sdpa"
    types = set(getattr(config, "layer_types", None) or ())
    return packs(model) and PACKED_ROWS.get(attention) == "rows" and types <= set(SHARED_LAYER_TYPES)


def _alone(ids, b: int, L: int) -> tuple:
    """Row b as a sequence of its own: (tokens (L,), positions 0…L−1, branch 0, members [(b, slots 0…L−1)])."""
    return ids[b, :L], torch.arange(L), torch.zeros(L, dtype=ids.dtype), [(b, torch.arange(L))]


def pair_sequences(ids, lengths: list[int], prompt_lens) -> list[tuple]:
    """The sequences the model body runs with prefix sharing. Rows i (chosen) and B/2 + i (rejected) of a
    collate_pairs batch, both starting with the same p prompt tokens x, become one sequence of Lc + Lr − p tokens:

        tokens     x_0 … x_{p−1}   y^w_p … y^w_{Lc−1}   y^l_p … y^l_{Lr−1}
        positions  0 … p−1         p … Lc−1             p … Lr−1          (the rejected branch restarts at p)
        branch     0 (prompt)      1 (chosen)           2 (rejected)

    Each token sits at the position it has in its own row, so rotary embeddings see the padded rows' positions,
    and prefix_sharing_mask lets a token see exactly what it sees there: its prompt, and earlier tokens of its
    own branch. → [(tokens, positions, branch, members)], members [(batch row, (L_row,) slot of each of its
    tokens)]: the prompt's slots belong to both rows, so x_{p−1}'s slot predicts y^w_p AND y^l_p. A pair whose
    rows do not start with the same prompt (never from collate_pairs; a caller's own batch), or with no prompt,
    stays two sequences (_alone)."""
    half = len(lengths) // 2 if len(lengths) % 2 == 0 else 0
    out = []
    for i in range(half):
        j, p, Lc, Lr = half + i, int(prompt_lens[i]), lengths[i], lengths[half + i]
        if not (1 <= p <= min(Lc, Lr) and int(prompt_lens[j]) == p and torch.equal(ids[i, :p], ids[j, :p])):
            out += [_alone(ids, i, Lc), _alone(ids, j, Lr)]
            continue
        tokens = torch.cat([ids[i, :Lc], ids[j, p:Lr]])  # (Lc + Lr − p,)
        positions = torch.cat([torch.arange(Lc), torch.arange(p, Lr)])
        branch = torch.cat([torch.zeros(p), torch.ones(Lc - p), torch.full((Lr - p,), 2)]).to(ids.dtype)
        out.append((tokens, positions, branch, [(i, torch.arange(Lc)), (j, torch.cat([torch.arange(p), Lc + torch.arange(Lr - p)]))]))
    return out + [_alone(ids, b, lengths[b]) for b in range(2 * half, len(lengths))]


def prefix_sharing_mask(model, positions, sequence, branch):
    """The attention mask of prefix-shared rows (pack_plan's `shared`), built on the device from (R, W) tensors:
    query q sees key k iff they hold the same sequence, pos_k ≤ pos_q, and k is in the prompt or in q's branch
    (so a rejected token never sees a chosen one); under a sliding window w also pos_q − pos_k < w. Positions, not
    columns: the rejected branch's first token sits Lc − p columns after the prompt's last, one position after.
    This is the block-diagonal of per-pair masks that transformers would build for packed sequences, with each
    pair's rejected branch cut from its chosen one (docs/ALGORITHM.md draws it).
    → (R, 1, W, W), True/0 where q sees k: bool for sdpa, additive (0 / the dtype's minimum) for eager attention,
    which adds the mask to its scores. Models with per-layer `layer_types` (Qwen2, Gemma 2) get a dict
    {layer type: mask}, which their forward takes as it is; the others one mask, which masking_utils hands to
    every layer unchanged (a 4D mask is "already prepared"), so a model-wide sliding window (Mistral, Phi-3) is
    applied here. Position ids then serve the rotary embeddings only."""
    config = core_model(model).config
    pos_q, pos_k = positions[:, :, None], positions[:, None, :]  # (R, W, 1), (R, 1, W)
    sees = ((sequence[:, :, None] == sequence[:, None, :]) & (pos_k <= pos_q)
            & ((branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])))  # (R, W, W): [q, k]
    window = getattr(config, "sliding_window", None)
    eager = getattr(config, "_attn_implementation", None) == "eager"
    dtype = core_model(model).get_input_embeddings().weight.dtype

    def form(allowed):  # (R, W, W) bool → (R, 1, W, W) in the attention implementation's form
        allowed = allowed[:, None]
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min) if eager else allowed

    windowed = (lambda: sees & (pos_q - pos_k < window)) if window else (lambda: sees)
    types = getattr(config, "layer_types", None)
    if types:
        return {t: form(windowed() if t == "sliding_attention" else sees) for t in set(types)}
    return form(windowed())


def logps_at(model, batch: dict, needed: torch.Tensor, fused_head=None, prefix_sharing: bool = False) -> torch.Tensor:
    """betadpo.plain_logps_at with the work cut to where it is needed: log π(token t+1 | tokens ≤ t) at the True
    positions of `needed` (B, T−1), 0 elsewhere → (B, T−1) fp32 (fp64 for fp64 models). fused_head: 2b, a
    fused_head.LMHeadGivesLogps installed on the model by the caller; only for models that pack. prefix_sharing:
    rows i and B/2 + i are a pair of one prompt (collate_pairs), run as one sequence where the model allows it
    (4, pack_plan); the same numbers and gradients (tests/test_prefix_sharing.py).

    No host↔device sync (plumbing/host_sync.py): the layout is planned from the batch's host copy (batch["host"],
    `to_device`, with batch["needed_host"], the same `needed` computed there); a batch without one (held-out
    scoring) is read back once for it."""
    if fused_head is not None and not packs(model):
        raise ValueError("logps_at: the fused LM head needs a model that packs (fast_logps.packs)")
    host, needed_host = batch.get("host"), batch.get("needed_host")
    with on_host():
        if host is None or needed_host is None:
            host = {k: batch[k].cpu() for k in ("input_ids", "attention_mask", "prompt_lens") if k in batch}
            needed_host = needed.cpu()
        plan = pack_plan(model, host, needed_host, prefix_sharing)
    device = needed.device
    inputs = {k: _copy(v, device) if isinstance(v, torch.Tensor) else v for k, v in plan["inputs"].items()}
    keep, rows, flat, index, targets = (_copy(plan[k], device) for k in ("keep", "rows", "flat", "index", "targets"))
    if plan["shared"] is not None:  # 4. the pairs' branches kept apart by an explicit mask, built on the device
        inputs["attention_mask"] = prefix_sharing_mask(model, inputs["position_ids"], *(_copy(t, device) for t in plan["shared"]))
    if fused_head is not None:  # 2b: the LM head returns log p(target) at the kept positions, (n,): no logits
        fused_head.targets, fused_head.rows = targets, rows
        picked = model(**inputs, logits_to_keep=keep).logits  # (n,)
    else:
        if takes_position_mask(model):  # 1. the LM head at the needed positions only (and the padding of `keep`)
            logits = model(**inputs, logits_to_keep=keep).logits  # (R, m, V)
            logits = logits.reshape(-1, logits.shape[-1]).index_select(0, rows)  # (n, V)
        else:
            logits = model(**inputs).logits  # (R, W, V)
            logits = logits.reshape(-1, logits.shape[-1]).index_select(0, flat)  # (n, V)
        picked = token_logps(logits, targets, chunk_rows=256)  # 2. (n,); 256 positions a chunk of fp32 work space
    logp = torch.zeros(needed.numel(), dtype=picked.dtype, device=picked.device).scatter(0, index, picked)  # (B·(T−1),)
    return logp.view(needed.shape)
