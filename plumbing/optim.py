"""The optimizer, its schedule, one optimizer step, and sft.py's step counter: plain functions that sft.py's and
betadpo.py's loops call where a reader expects them."""

import contextlib

import torch

from plumbing.config import TrainArgs


def make_optimizer(train_cfg: TrainArgs, params, device, lr: float | None = None, weight_decay: float | None = None):
    """`train.optimizer` over `params` (their trainable ones), at `lr` and `weight_decay` (default: train.*).
    betadpo.py makes a second one for the β-scale c: its own learning rate, no weight decay.

    AdamW is `fused` on CPU and CUDA: one kernel updates every parameter, where the default runs about ten
    per tensor (same numbers, several times faster on small models).
    """
    group = {"params": [p for p in params if p.requires_grad],
             "weight_decay": train_cfg.weight_decay if weight_decay is None else weight_decay}
    lr = train_cfg.lr if lr is None else lr
    if train_cfg.optimizer == "rmsprop":  # the original DPO code's optimizer
        return torch.optim.RMSprop([group], lr=lr)
    if train_cfg.optimizer == "sgd":  # θ ← θ − lr·g: a step ∝ the gradient, so ∝ β where |β·M| is small (Adam's is not)
        return torch.optim.SGD([group], lr=lr)
    return torch.optim.AdamW([group], lr=lr, fused=torch.device(device).type in ("cpu", "cuda"))


def make_scheduler(optimizer, warmup_steps: int):
    """lr ∝ min(1, (step + 1) / (warmup + 1)): linear warm-up, then constant (the reference code's schedule),
    so that max_steps never changes it. Not `accelerator.prepare`d: accelerate would step it once per process."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup_steps + 1)))


def no_sync_unless_last(accelerator, model, k: int, grad_accum: int):
    """Context for the backward of micro-batch k of a step: DDP all-reduces gradients in every backward, which
    is wasted on all but the last micro-batch, whose backward then reduces the accumulated sum.

    Not under FSDP2: there accelerator.no_sync (set_requires_gradient_sync(False)) keeps every micro-batch's
    *unsharded* gradients, a whole model's worth per process (+14 GB at 7B in bf16), accumulated in the compute
    dtype. Reduce-scattering each micro-batch instead keeps only this process's fp32 gradient shard, to which
    each micro-batch's reduced shard is added (docs/SCALING.md)."""
    if k == grad_accum - 1 or accelerator.is_fsdp2:
        return contextlib.nullcontext()
    return accelerator.no_sync(model)


def optimizer_step(accelerator, model, optimizer, scheduler, max_grad_norm: float):
    """Clip the model's gradients to `max_grad_norm` (0 = no clipping), step optimizer and schedule, zero the
    gradients. → (gradient norm before clipping, 0-dim tensor; learning rate this step used).

    With fp16 mixed precision the loss scaler skips a step whose gradients overflowed, and lowers its scale:
    that is routine, not divergence, so the gradient norm is None then (and not logged) instead of inf."""
    from torch.distributed.tensor import DTensor

    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf"))
    if isinstance(grad_norm, DTensor):  # FSDP2: the norm of sharded gradients is itself a DTensor
        grad_norm = grad_norm.full_tensor()
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return (None if accelerator.optimizer_step_was_skipped else grad_norm), lr


class StepCount:
    """Optimizer steps done: sft.py's training state besides model, optimizer and schedule (betadpo.py keeps
    its step in BetaDPOState). Saved with each checkpoint through accelerator.register_for_checkpointing."""

    def __init__(self):
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, sd: dict):
        self.step = sd["step"]
