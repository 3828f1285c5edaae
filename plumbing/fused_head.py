"""The fused LM head (skip on a first reading): log p(y) at chosen positions from the hidden states h and the LM
head's weight W, never holding the logits. Its plain equivalent, with the same numbers and gradients
(tests/test_fused_head.py), is

    logp = torch.log_softmax((h @ W.T + b).float(), -1).gather(-1, targets[:, None])[:, 0]      h (n, H), W (V, H)

Why: a DPO step's largest tensors are its logits, n positions × V. The chunked log-softmax kernel (token_logps)
never holds a fp32 log-softmax of them, but it still gets all n × V logits from the model's LM head and keeps
their softmax for backward, so memory grows with n × V: at InternLM2's 92,544-token vocabulary that is most of
what a step holds beyond the model. Here the LM head itself is tiled, `tile_rows` positions × `tile_cols` vocabulary
entries at a time: forward takes each tile's logits into a running logsumexp and the target logit, and drops
them; backward recomputes them tile by tile. Extra memory: one tile (32 MiB of fp32 logits), whatever n and V.
The price: the LM head's forward matmul runs a second time in backward, 8·n·V·H FLOPs for forward + backward
instead of 6·n·V·H (a third more for the LM head, nothing for the rest of the model; no-grad passes such as the
reference's pay nothing extra).
Why tiles over the vocabulary too, rather than chunks of positions × all of V: in backward each vocabulary block
of ∂/∂W is then written once, by one matmul over all the tile's positions, instead of being read and rewritten
once per chunk of positions (measurably faster on a CPU: docs/PERFORMANCE.md times the kernel end to end).
(Liger's and Apple's Cut Cross-Entropy fused linear + cross-entropy kernels, and TRL's chunked LM head, work on
the same principle; Liger's and CCE's return one mean loss, DPO needs each position's log-prob.)

The math, per position i with logits z = W h_i + b and target y:
    log p(y) = z_y − logsumexp(z)
    ∂ log p(y) / ∂z = onehot(y) − p,  p = softmax(z)          (times the incoming gradient g_i)
    ∂/∂h_i = g_i (W_y − pᵀ W),  ∂/∂W = Σ_i g_i (onehot(y_i) − p_i) h_iᵀ,  ∂/∂b = Σ_i g_i (onehot(y_i) − p_i)

`LMHeadGivesLogps(model)` is how betadpo.py uses it (train.logps: fused): installed around the model's own
forward, it makes the LM head compute these log-probs instead of logits (why inside the forward: see there).
"""

import torch

# Architectures whose causal-LM forward is exactly `logits = lm_head(hidden_states[logits_to_keep])`: no
# soft-capping, no logit scale after the LM head (Gemma, Cohere and Granite have them, so they are not listed).
# tests/test_fused_head.py checks each listed one against its plain logits. Others keep the logits path.
FUSED_HEAD_MODEL_TYPES = ("llama", "gpt_neox")
TILE_ROWS = 2048  # positions per tile (n larger: several position blocks) ...
TILE_COLS = 4096  # ... × vocabulary entries per tile: 2048 × 4096 fp32 logits = 32 MiB


class _FusedLinearLogProb(torch.autograd.Function):
    """log softmax(h Wᵀ + b)[target] for (n, H) hidden states, one (tile_rows, tile_cols) tile of logits at a
    time (see the module docstring). `compute` is the matmuls' dtype (autocast's when it is on, as the model's own
    LM head would use), `acc` the softmax's: fp32 at least. Forward keeps only h, W (cast to `compute`), the
    targets, log p(y) and the (n,) logsumexp; backward recomputes each tile's logits from them. Each pass
    allocates its tile buffers once and reuses them (on a CPU every fresh large tensor costs a page fault per
    4 KiB)."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, tiles, compute):
        acc = torch.promote_types(compute, torch.float32)  # bf16/fp16/fp32 → fp32; fp64 stays fp64
        hc, wc = h.to(compute), weight.to(compute)  # (n, H), (V, H): no copies unless autocast narrows them
        bc = bias.to(compute) if bias is not None else None
        n = h.shape[0]
        lse = torch.empty(n, dtype=acc, device=h.device)  # (n,) logsumexp_v z_v, kept for backward
        picked = torch.empty(n, dtype=acc, device=h.device)  # (n,) log p(y)
        buffers = _Tile(min(tiles[0], n), tiles[1], wc, acc)
        for rows, cols in _blocks(n, wc.shape[0], tiles):
            m = torch.full((rows.stop - rows.start,), -torch.inf, dtype=acc, device=h.device)  # running max
            total, z_y = torch.zeros_like(m), torch.zeros_like(m)  # running Σ exp(z − m); the target logit
            for block in cols:
                z = buffers.logits(hc[rows], wc, bc, block)  # (r, k) in acc: the model's logits (upcast from `compute`)
                index, here = _local(targets[rows], block)
                z_y = torch.where(here, z.gather(1, index)[:, 0], z_y)
                m_new = torch.maximum(m, z.amax(-1))  # logsumexp = m + log Σ exp(z − m), without overflow
                total = total.mul_((m - m_new).exp_()).add_(z.sub_(m_new[:, None]).exp_().sum(-1))  # (z overwritten)
                m = m_new
            lse[rows] = total.log_().add_(m)
            picked[rows] = z_y - lse[rows]  # log p(y) = z_y − logsumexp(z)
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(hc, wc, bc, targets, lse, picked)
        ctx.tiles, ctx.dtypes = tiles, (h.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return picked

    @staticmethod
    def backward(ctx, grad_out):  # grad_out: (n,), the gradient g_i of each log p(y_i)
        hc, wc, bc, targets, lse, picked = ctx.saved_tensors
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        acc = lse.dtype
        # Every position's logits are recomputed, also those whose log-prob gets no gradient (pairs β-DPO's filter
        # dropped, prompt tokens scored for β(x)'s detached perplexity): they contribute exactly 0. Skipping them
        # would need their count on the host, i.e. a host↔device sync in every backward (plumbing/host_sync.py).
        h_live, g, t = hc, grad_out.to(acc), targets
        m = h_live.shape[0]
        grad_h = torch.zeros(hc.shape, dtype=acc, device=hc.device) if ctx.needs_input_grad[0] else None  # (m, H), fp32 sums
        grad_w = (torch.zeros if m == 0 else torch.empty)(wc.shape, dtype=acc, device=wc.device) if ctx.needs_input_grad[1] else None
        grad_b = torch.zeros(wc.shape[0], dtype=acc, device=wc.device) if ctx.needs_input_grad[2] else None  # (V,)
        buffers = _Tile(min(ctx.tiles[0], max(1, m)), ctx.tiles[1], wc, acc)
        for rows, cols in _blocks(m, wc.shape[0], ctx.tiles):
            h_rows, g_rows, first = h_live[rows], g[rows, None], rows.start == 0  # (r, H), (r, 1)
            for block in cols:
                p = buffers.logits(h_rows, wc, bc, block).sub_(lse[rows, None]).exp_()  # (r, k): softmax, recomputed
                dz = p.mul_(-g_rows)  # −g·p, in place
                # + g at the target: (1 − p(y))·g from the fp32 log p(y) of forward, exact also where p(y) ≈ 1
                index, here = _local(t[rows], block)
                dz.scatter_(1, index, torch.where(here[:, None], -torch.expm1(picked[rows, None]) * g_rows, dz.gather(1, index)))
                if grad_b is not None:
                    grad_b[block] += dz.sum(0)
                dz = buffers.narrow(dz)  # (r, k): the logits' gradient in the matmuls' dtype, as autograd's would be
                if grad_h is not None:  # ∂/∂h = g (onehot(y) − p) W, summed over vocabulary blocks    (r, H)
                    _accumulate(grad_h[rows], dz, wc[block], first=block.start == 0)
                if grad_w is not None:  # ∂/∂W = (g (onehot(y) − p))ᵀ h: each block written once per position block
                    _accumulate(grad_w[block], dz.T, h_rows, first=first)
        return (grad_h.to(h_dtype) if grad_h is not None else None, grad_w.to(w_dtype) if grad_w is not None else None,
                grad_b.to(b_dtype) if grad_b is not None else None, None, None, None)


def _blocks(n: int, V: int, tiles: tuple[int, int]):
    """The tiles: (position slice, [vocabulary slices]) for each block of tiles[0] positions."""
    cols = [slice(a, min(a + tiles[1], V)) for a in range(0, V, tiles[1])]
    return [(slice(r, min(r + tiles[0], n)), cols) for r in range(0, n, tiles[0])]


def _local(targets, block: slice):
    """Each target's column in a vocabulary block, (r, 1) (clamped), and whether it falls in the block, (r,)."""
    local = targets - block.start
    return local.clamp(0, block.stop - block.start - 1)[:, None], (local >= 0) & (local < block.stop - block.start)


def _accumulate(out, a, b, first: bool):
    """out = a @ b (first) or out += a @ b; in place, summed in out's dtype (fp32 when a, b are bf16)."""
    if a.dtype == out.dtype:
        out.addmm_(a, b, beta=0 if first else 1)  # beta = 0: out's old contents are ignored
    elif first:
        out.copy_(a @ b)
    else:
        out += a @ b


class _Tile:
    """One tile of logits, (rows, cols), in a buffer reused by every tile: in the matmuls' dtype, and a second one
    in the softmax's dtype when that is wider (bf16 logits → fp32)."""

    def __init__(self, rows: int, cols: int, w: torch.Tensor, acc: torch.dtype):
        cols = min(cols, w.shape[0])
        self.compute = torch.empty(rows, cols, dtype=w.dtype, device=w.device)
        self.acc = self.compute if acc == w.dtype else torch.empty(rows, cols, dtype=acc, device=w.device)

    def logits(self, h, w, b, block: slice):
        """z = h W[block]ᵀ + b[block] for r positions: the model's own LM head on them → (r, k) in acc."""
        r, k = h.shape[0], block.stop - block.start
        out = self.compute[:r, :k]
        torch.mm(h, w[block].T, out=out) if b is None else torch.addmm(b[block], h, w[block].T, out=out)
        return out if self.acc is self.compute else self.acc[:r, :k].copy_(out)

    def narrow(self, x):
        """x (r, k) in acc → the matmuls' dtype (the same tensor when they agree)."""
        return x if self.acc is self.compute else self.compute[: x.shape[0], : x.shape[1]].copy_(x)


def fused_logps(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None,
                tiles: tuple[int, int] | None = None) -> torch.Tensor:
    """log softmax(h Wᵀ + b)[target] without the logits: h (n, H), weight (V, H), targets (n,), bias (V,) → (n,),
    fp32 (fp64 for fp64 inputs). Targets outside [0, V) (e.g. -100) give 0 and no gradient. tiles: (positions,
    vocabulary entries) per tile, default (TILE_ROWS, TILE_COLS).

    Under autocast the matmuls run in autocast's dtype, as `torch.nn.functional.linear` would (the logsumexp
    stays fp32); a tied W (the input embedding) gets this gradient added to the embedding's by autograd."""
    device = h.device.type
    narrow = torch.is_autocast_enabled(device) and torch.float64 not in (h.dtype, weight.dtype)  # autocast leaves fp64 alone
    compute = torch.get_autocast_dtype(device) if narrow else torch.promote_types(h.dtype, weight.dtype)
    valid = (targets >= 0) & (targets < weight.shape[0])
    with torch.autocast(device, enabled=False):  # dtypes chosen above, explicitly, in both passes
        out = _FusedLinearLogProb.apply(h, weight, bias, torch.where(valid, targets, 0), tiles or (TILE_ROWS, TILE_COLS), compute)
    return out * valid


# ---- inside the model's own forward --------------------------------------------------------------------
def core_model(model):
    """The transformers model inside the wrappers: DDP's (and LoRA's adapters-off view's) .module, peft's
    PeftModel (its forward passes every keyword through to this model; plumbing/lora.py). FSDP2 subclasses the
    model in place: nothing to unwrap."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def fused_head_applies(model) -> bool:
    """A transformers causal LM of a FUSED_HEAD_MODEL_TYPES architecture whose output embedding is a Linear (also
    inside peft's LoRA wrapper, which leaves the LM head alone: our adapters go on the decoder's linear layers)."""
    model = core_model(model)
    from_transformers = any(c.__module__.startswith("transformers.models.") for c in type(model).__mro__)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return (from_transformers and getattr(getattr(model, "config", None), "model_type", None) in FUSED_HEAD_MODEL_TYPES
            and isinstance(head, torch.nn.Linear))


class LMHeadGivesLogps:
    """`with LMHeadGivesLogps(model) as head:` for one forward: set `head.targets` (n,) to the tokens that the n
    kept positions predict, then `model(..., logits_to_keep=keep).logits` is log p(target) at those positions,
    (n,) fp32, instead of their (n, V) logits. betadpo.py installs it (its `logps_at`, train.logps: fused).
    keep: (R, W) bool with the n True positions row-major; or (R, m) integer positions per row (transformers'
    sync-free form) with `head.rows` (n,), which of the R·m kept positions the n targets belong to
    (fast_logps.pack_plan).

    Why two hooks on the LM head, rather than an explicit `model.model(...)` for the final hidden states and then
    fused_logps with `lm_head.weight`: under FSDP2 the weights are sharded between forwards, and they are gathered
    by hooks on the wrapped modules' forward (accelerate wraps the final norm and the LM head as one unit, whose
    hooks fire when the LM head is called; otherwise the root's hooks, around the whole forward). A body called by
    itself skips the root's hooks: its embedding stays sharded. DDP likewise prepares its gradient reduction only
    in its own forward. Here the LM head is called as usual: FSDP's pre-forward hook runs first (gathers W,
    registers its post-backward on the hidden states), then ours takes the hidden states and hands the Linear no
    rows; ours after the forward replaces the empty (0, V) logits with the log-probs before FSDP's post-forward
    hook sees the output, so FSDP's pre-backward hook sits on what the loss really uses. DDP, autocast and tied
    embeddings see an ordinary LM-head call too."""

    def __init__(self, model):
        self.head = core_model(model).get_output_embeddings()
        self.targets = None  # (n,): set before each forward
        self.rows = None  # (n,) or None: with integer `keep`, the targets' places among the R·m kept positions
        self.hidden, self.handles = [], ()

    def take_hidden(self, module, args):  # args: ((n, H),) or ((R, m, H),): the kept positions' final hidden states
        h = args[0]
        self.hidden.append(h if self.rows is None else h.reshape(-1, h.shape[-1]).index_select(0, self.rows))  # (n, H)
        return (h[:0],)  # the Linear itself runs on no rows

    def give_logps(self, module, args, output):  # output: the (0, V) logits of no rows
        return fused_logps(self.hidden.pop(), module.weight, self.targets, module.bias)  # (n,)

    def __enter__(self):
        self.handles = (self.head.register_forward_pre_hook(self.take_hidden),
                        self.head.register_forward_hook(self.give_logps, prepend=True))
        return self

    def __exit__(self, *exc_info):
        for handle in self.handles:
            handle.remove()
        self.hidden.clear()
