"""The fused LM head (skip on a first reading): log p(y) at chosen positions from the hidden states h and the LM
head's weight W, never holding the logits. Its plain equivalent, with the same numbers and gradients
(tests/test_fused_head.py), is

    logp = torch.log_softmax((h @ W.T + b).float(), -1).gather(-1, targets[:, None])[:, 0]      h (n, H), W (V, H)

Why: a DPO step's largest tensors are its logits, n positions × V. The chunked log-softmax kernel (token_logps)
never holds a fp32 log-softmax of them, but it still gets all n × V logits from the model's LM head and keeps
their softmax for backward, so memory grows with n × V: at InternLM2's 92,544-token vocabulary that is most of
what a step holds beyond the model. Here the LM head itself is chunked: each chunk of positions gets its logits,
their logsumexp and target logit are taken, and they are dropped. Backward recomputes them chunk by chunk.
Extra memory: O(chunk_rows × V), whatever the number of positions. The price: the LM head's forward matmul runs
a second time in backward, 8·n·V·H FLOPs for forward + backward instead of 6·n·V·H (a third more for the LM head,
nothing for the rest of the model; no-grad passes such as the reference's pay nothing extra).
(Liger's and Apple's Cut Cross-Entropy fused linear + cross-entropy kernels work on the same principle, but
return one mean loss; DPO needs each position's log-prob, with its own gradient weight.)

The math, per position i with logits z = W h_i + b and target y:
    log p(y) = z_y − logsumexp(z)
    ∂ log p(y) / ∂z = onehot(y) − p,  p = softmax(z)          (times the incoming gradient g_i)
    ∂/∂h_i = g_i (W_y − pᵀ W),  ∂/∂W = Σ_i g_i (onehot(y_i) − p_i) h_iᵀ,  ∂/∂b = Σ_i g_i (onehot(y_i) − p_i)

`fused_logps_at(model, keep, targets, **inputs)` is how betadpo.py uses it: the model's own forward, with its LM
head computing these log-probs instead of logits (why inside the forward: see there).
"""

import torch

# Architectures whose causal-LM forward is exactly `logits = lm_head(hidden_states[logits_to_keep])`: no
# soft-capping, no logit scale after the LM head (Gemma, Cohere and Granite have them, so they are not listed).
# tests/test_fused_head.py checks each listed one against its plain logits. Others keep the logits path.
FUSED_HEAD_MODEL_TYPES = ("llama", "gpt_neox")
CHUNK_ELEMENTS = 1 << 23  # logits per chunk: 32 MiB in fp32 ...
MIN_CHUNK_ROWS = 128  # ... but at least this many positions: narrower matmuls lose speed


def default_chunk_rows(vocab: int) -> int:
    """Positions per chunk: 512 at V = 16k, 170 at 49k, 128 at 92k (47 MiB of fp32 logits)."""
    return max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // vocab)


class _FusedLinearLogProb(torch.autograd.Function):
    """log softmax(h Wᵀ + b)[target] for (n, H) hidden states, chunk_rows positions at a time (see the module
    docstring). `compute` is the matmuls' dtype (autocast's when it is on, as the model's own LM head would use),
    `acc` the softmax's: fp32 at least. Forward keeps only h, W (cast to `compute`), the targets, log p(y) and
    the (n,) logsumexp; backward recomputes each chunk's logits from them. Each pass allocates its chunk buffers
    once and reuses them (on a CPU every fresh logits-sized tensor costs a page fault per 4 KiB)."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk_rows, compute):
        acc = torch.promote_types(compute, torch.float32)  # bf16/fp16/fp32 → fp32; fp64 stays fp64
        hc, wc = h.to(compute), weight.to(compute)  # (n, H), (V, H): no copies unless autocast narrows them
        bc = bias.to(compute) if bias is not None else None
        n = h.shape[0]
        lse = torch.empty(n, dtype=acc, device=h.device)  # (n,) logsumexp_v z_v, kept for backward
        picked = torch.empty(n, dtype=acc, device=h.device)  # (n,) log p(y)
        buffers = _Buffers(min(chunk_rows, n), wc, acc)
        for start in range(0, n, chunk_rows):
            rows = slice(start, start + chunk_rows)
            z = buffers.logits(hc[rows], wc, bc)  # (c, V) in acc: the model's logits (upcast from `compute`)
            m = z.amax(-1)  # (c,): logsumexp(z) = m + log Σ exp(z − m), without overflow
            picked[rows] = z.gather(1, targets[rows, None])[:, 0]  # z_y
            lse[rows] = z.sub_(m[:, None]).exp_().sum(-1).log_().add_(m)  # (z is overwritten: exp(z − m))
        picked -= lse  # log p(y) = z_y − logsumexp(z)
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(hc, wc, bc, targets, lse, picked)
        ctx.chunk_rows, ctx.dtypes = chunk_rows, (h.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return picked

    @staticmethod
    def backward(ctx, grad_out):  # grad_out: (n,), the gradient g_i of each log p(y_i)
        hc, wc, bc, targets, lse, picked = ctx.saved_tensors
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        acc = lse.dtype
        # Positions whose log-prob gets no gradient (pairs β-DPO's filter dropped; prompt tokens scored for β(x)'s
        # perplexity, which is detached) contribute exactly 0 to every gradient: their logits are not recomputed.
        # (One host sync, for the count.)
        live = (grad_out != 0).nonzero()[:, 0]  # (m,)
        everything = live.numel() == grad_out.numel()
        h_live, g, t, lse, picked = ((x if everything else x[live]) for x in (hc, grad_out.to(acc), targets, lse, picked))
        grad_h = torch.zeros_like(h_live) if ctx.needs_input_grad[0] else None  # (m, H)
        grad_w = torch.zeros_like(wc, dtype=acc) if ctx.needs_input_grad[1] else None  # (V, H), summed in fp32
        grad_b = torch.zeros(wc.shape[0], dtype=acc, device=wc.device) if ctx.needs_input_grad[2] else None  # (V,)
        buffers = _Buffers(min(ctx.chunk_rows, max(1, h_live.shape[0])), wc, acc)
        for start in range(0, h_live.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            h_rows, g_rows = h_live[rows], g[rows, None]  # (c, H), (c, 1)
            p = buffers.logits(h_rows, wc, bc).sub_(lse[rows, None]).exp_()  # (c, V): softmax, recomputed
            dz = p.mul_(-g_rows)  # −g·p, in place
            # + g at the target: (1 − p(y))·g from the fp32 log p(y) of forward, exact also where p(y) ≈ 1
            dz.scatter_(1, t[rows, None], -torch.expm1(picked[rows, None]) * g_rows)
            if grad_b is not None:
                grad_b += dz.sum(0)
            dz = buffers.narrow(dz)  # (c, V): the logits' gradient in the matmuls' dtype, as autograd's would be
            if grad_h is not None:
                torch.mm(dz, wc, out=grad_h[rows])  # ∂/∂h = g (onehot(y) − p) W    (c, H)
            if grad_w is not None:
                if dz.dtype == acc:
                    grad_w.addmm_(dz.T, h_rows)  # ∂/∂W += (g (onehot(y) − p))ᵀ h    (V, H), in place
                else:
                    grad_w += dz.T @ h_rows  # bf16 matmul, summed over chunks in fp32
        if grad_h is not None and not everything:
            grad_h = torch.zeros_like(hc).index_copy_(0, live, grad_h)  # (n, H): 0 where no gradient came
        return (grad_h.to(h_dtype) if grad_h is not None else None, grad_w.to(w_dtype) if grad_w is not None else None,
                grad_b.to(b_dtype) if grad_b is not None else None, None, None, None)


class _Buffers:
    """One chunk's logits, (c, V), in a buffer reused by every chunk: in the matmuls' dtype, and a second one
    in the softmax's dtype when that is wider (bf16 logits → fp32)."""

    def __init__(self, rows: int, w: torch.Tensor, acc: torch.dtype):
        self.compute = torch.empty(rows, w.shape[0], dtype=w.dtype, device=w.device)
        self.acc = self.compute if acc == w.dtype else torch.empty(rows, w.shape[0], dtype=acc, device=w.device)

    def logits(self, h, w, b):
        """z = h Wᵀ + b for c ≤ rows positions: the model's own LM head on them → (c, V) in acc."""
        out = self.compute[: h.shape[0]]
        torch.mm(h, w.T, out=out) if b is None else torch.addmm(b, h, w.T, out=out)
        return out if self.acc is self.compute else self.acc[: h.shape[0]].copy_(out)

    def narrow(self, x):
        """x (c, V) in acc → the matmuls' dtype (the same tensor when they agree)."""
        return x if self.acc is self.compute else self.compute[: x.shape[0]].copy_(x)


def fused_logps(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None,
                chunk_rows: int | None = None) -> torch.Tensor:
    """log softmax(h Wᵀ + b)[target] without the logits: h (n, H), weight (V, H), targets (n,), bias (V,) → (n,),
    fp32 (fp64 for fp64 inputs). Targets outside [0, V) (e.g. -100) give 0 and no gradient.

    Under autocast the matmuls run in autocast's dtype, as `torch.nn.functional.linear` would (the logsumexp
    stays fp32); a tied W (the input embedding) gets this gradient added to the embedding's by autograd."""
    device = h.device.type
    narrow = torch.is_autocast_enabled(device) and torch.float64 not in (h.dtype, weight.dtype)  # autocast leaves fp64 alone
    compute = torch.get_autocast_dtype(device) if narrow else torch.promote_types(h.dtype, weight.dtype)
    valid = (targets >= 0) & (targets < weight.shape[0])
    with torch.autocast(device, enabled=False):  # dtypes chosen above, explicitly, in both passes
        out = _FusedLinearLogProb.apply(h, weight, bias, torch.where(valid, targets, 0),
                                        chunk_rows or default_chunk_rows(weight.shape[0]), compute)
    return out * valid


# ---- inside the model's own forward --------------------------------------------------------------------
def fused_head_applies(model) -> bool:
    """A transformers causal LM of a FUSED_HEAD_MODEL_TYPES architecture whose output embedding is a Linear."""
    model = getattr(model, "module", model)  # DDP keeps the model in .module; FSDP2 subclasses it in place
    from_transformers = any(c.__module__.startswith("transformers.models.") for c in type(model).__mro__)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return (from_transformers and getattr(getattr(model, "config", None), "model_type", None) in FUSED_HEAD_MODEL_TYPES
            and isinstance(head, torch.nn.Linear))


def fused_logps_at(model, keep: torch.Tensor, targets: torch.Tensor, **inputs) -> torch.Tensor:
    """model(**inputs, logits_to_keep=keep), with its LM head returning log p(target) at the kept positions
    instead of their logits. keep: (R, W) bool; targets: (n,) for the n True positions, row-major → (n,) fp32.

    Why inside the forward, through two hooks on the LM head, rather than `model.model(...)` for the hidden
    states and then fused_logps with `lm_head.weight`: under FSDP2 the weights are sharded between forwards, and
    they are gathered by hooks on the wrapped modules' forward (accelerate wraps the final norm and the LM head
    as one unit, whose hooks fire when the LM head is called; otherwise the root's hooks, around the whole
    forward). A body called by itself skips the root's hooks: its embedding stays sharded. Here the LM head is
    called as usual: FSDP's pre-forward hook runs first (gathers W, registers its post-backward on the hidden
    states), then ours takes the hidden states and hands the Linear no rows; ours after the forward replaces
    the empty (0, V) logits with the log-probs before FSDP's post-forward hook sees the output, so FSDP's
    pre-backward hook sits on what the loss really uses. DDP, autocast and tied embeddings see an ordinary
    LM-head call too."""
    head = getattr(model, "module", model).get_output_embeddings()
    hidden = []

    def take_hidden(module, args):  # args: ((n, H),): the kept positions' final hidden states
        hidden.append(args[0])
        return (args[0][:0],)  # the Linear itself runs on no rows

    def give_logps(module, args, output):  # output: the (0, V) logits of no rows
        return fused_logps(hidden.pop(), module.weight, targets, module.bias)  # (n,)

    handles = (head.register_forward_pre_hook(take_hidden), head.register_forward_hook(give_logps, prepend=True))
    try:
        return model(**inputs, logits_to_keep=keep).logits  # (n,)
    finally:
        for handle in handles:
            handle.remove()
