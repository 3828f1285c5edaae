"""Many processes, one run: the Accelerator (its timeout, FSDP2's gradient reduce dtype), decisions taken once
on the main process and broadcast, the check that every process sees the same output directory, and models
whose weights exist in host memory on the main process only (the others receive their shards from it).

Why decisions are broadcast: a choice that reads the filesystem (is there a checkpoint, a finished run, a cached
reference, the same config) can come out differently on different processes: a relative output directory on
2 machines that share no filesystem, or NFS showing one machine a file a moment later than another. Processes
that take different branches then wait for each other in different collectives until the timeout. So every
such choice is made on the main process and the answer is sent to the others (`main_decides`).
"""

import os
import secrets
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch

from plumbing.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_accelerator(cfg):
    """The Accelerator of a run: train.mixed_precision; a process-group timeout of train.dist_timeout_min
    minutes (torch's default of 10 is shorter than loading a 20B model or writing its checkpoint on a slow
    filesystem, during which the other processes wait in a collective); and under FSDP2 the dtype gradients
    are reduce-scattered in, train.fsdp_reduce_dtype (accelerate's default is the mixed-precision dtype), and
    no cast of the model's outputs: log-probs and their sums stay fp32 on every launch (tests/test_precision.py)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision,
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.train.dist_timeout_min))])
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if accelerator.is_fsdp2 and plugin.mixed_precision_policy is not None:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        # Forward/backward compute in param_dtype (bf16); the sharded gradients (and the optimizer) stay in the
        # parameters' fp32. reduce_dtype is only the dtype of the reduce-scatter: fp32 sums P contributions
        # without rounding each to 8 bits of mantissa; bf16 halves the traffic.
        # output_dtype None: every sharded module's output keeps the dtype it was computed in. accelerate sets it
        # to the mixed-precision dtype, and FSDP2 then casts the model's output after the forward, i.e. after the
        # fused LM head (and accelerate's fp32 upcast of the logits) has returned fp32 log-probs: the per-sequence
        # sums came out bf16, 2 nats apart at |log π(y|x)| ≈ 256-512 (docs/ALGORITHM.md, Precision). Inside the
        # model nothing changes: the decoder layers compute in bf16 from bf16 parameters and inputs either way.
        old = plugin.mixed_precision_policy
        plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=old.param_dtype, reduce_dtype=DTYPES[cfg.train.fsdp_reduce_dtype],
                                                             output_dtype=None, cast_forward_inputs=old.cast_forward_inputs)
    return accelerator


GLOO_SETTLE_S = 0.5  # seconds: far more than a worker thread needs to drop one finished collective


def settle_collectives():
    """Let the process group's worker threads finish with the last collective, before anything may destroy the
    group: call between the last collective of a run and the end of the process.

    Why: gloo runs collectives on worker threads, and a worker releases a finished collective's tensors just
    after the caller's wait() has returned; releasing a tensor made in Python needs the GIL. The group is
    destroyed when its last owner goes (DDP's Reducer, when the wrapped model is freed as train() returns; or
    the interpreter at exit), and its destructor joins the workers while holding the GIL. Were a worker still
    waiting for the GIL then, the process would hang forever (the destructor) or abort at exit with "terminate
    called without an active exception" (a thread made to exit by the finishing interpreter). Sleeping here
    releases the GIL, so the workers finish and go idle; tests/test_teardown.py makes the race happen."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        time.sleep(GLOO_SETTLE_S)


def end_processes(accelerator):
    """The end of a script's work, on every process: wait for all; settle the collectives; finish trackers
    (wandb) and destroy the process group."""
    accelerator.wait_for_everyone()  # no process tears down the process group while another still uses it
    settle_collectives()
    accelerator.end_training()


def main_decides(accelerator, decide):
    """decide() on the main process only → its answer (any picklable value) on every process.

    A UserError raised by decide() stops every process: the main one prints it (main_guard), the others exit
    quietly with the same code, so that one line is printed and no process waits for one that has stopped."""
    from accelerate.utils import broadcast_object_list

    if accelerator.num_processes == 1:
        return decide()
    answer = [None, None]  # [value, error]
    if accelerator.is_main_process:
        try:
            answer[0] = decide()
        except UserError as e:
            answer[1] = str(e)
    broadcast_object_list(answer)
    if answer[1] is not None:
        if accelerator.is_main_process:
            raise UserError(answer[1])
        sys.exit(2)
    return answer[0]


def main_first(accelerator, work):
    """work() on the main process first, then on the others (which then find its downloads in the local cache):
    accelerate's main_process_first, except that a UserError on the main process stops every process at once,
    where main_process_first would leave the others waiting in its barrier until the timeout."""
    if accelerator.num_processes == 1:
        return work()
    value = []
    main_decides(accelerator, lambda: value.append(work()))  # only "done" or its UserError is broadcast, not the value
    return value[0] if accelerator.is_main_process else work()


SHARED_TOKEN = ".shared-dir-check"
SHARED_WAIT_S = 5.0  # how long a process looks for the main process's token (NFS shows new files with a delay)


def check_shared_output_dir(accelerator, out: Path, key: str = "train.output_dir"):
    """Every process must see the same `out`: each writes its checkpoint shards there and resumes from what the
    main process lists. The main process writes a random token into `out`; every other process must read the
    same token within SHARED_WAIT_S seconds. If any cannot, every process stops with one line."""
    import torch.distributed as dist
    from accelerate.utils import broadcast_object_list

    if accelerator.num_processes == 1:
        return
    token = [secrets.token_hex(16) if accelerator.is_main_process else None]
    path = out / SHARED_TOKEN
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(token[0])
    broadcast_object_list(token)  # after the write: the others look only once it is there
    seen, deadline = accelerator.is_main_process, time.monotonic() + SHARED_WAIT_S
    while not seen:
        try:
            seen = path.read_text() == token[0]
        except OSError:
            pass
        if not seen and time.monotonic() > deadline:
            break
        time.sleep(0 if seen else 0.2)
    blind = [None] * accelerator.num_processes
    dist.all_gather_object(blind, (accelerator.process_index, os.uname().nodename, seen))
    if accelerator.is_main_process:
        path.unlink(missing_ok=True)
    if not all(s for _, _, s in blind):
        if not accelerator.is_main_process:
            sys.exit(2)
        who = ", ".join(f"rank {r} on {host}" for r, host, s in blind if not s)
        raise UserError(f"{key}: '{out}' is not the same directory for every process ({who} cannot see what rank 0 "
                        f"writes there); every process writes checkpoint shards into it: set {key} to an absolute path "
                        "on a filesystem all machines mount (e.g. NFS or Lustre)")


def uses_meta_loading(accelerator) -> bool:
    """Under FSDP2 with fsdp_cpu_ram_efficient_loading (configs/accelerate/fsdp.yaml), accelerate's
    fsdp2_prepare_model shards a model by broadcasting the main process's full weights one tensor at a time
    (fsdp2_load_full_state_dict): the other processes need only the model's shape, on the meta device."""
    if not getattr(accelerator, "is_fsdp2", False) or accelerator.num_processes == 1:
        return False
    return bool(accelerator.state.fsdp_plugin.cpu_ram_efficient_loading)


def load_on_main(accelerator, load):
    """load() → a model, on the main process; on the others, when `uses_meta_loading`, the same model class and
    config built on the meta device (no memory), with the main process's non-persistent buffers (e.g. the
    rotary inv_freq, which no state dict holds). The weights reach them when the model is sharded. Host memory
    at load: one copy of the weights on the main process, none elsewhere (every process loading its own copy
    would need P copies per machine: 8 × 28 GB for 7B in fp32).

    Without meta loading: load() on every process. A UserError in load() stops every process (main_decides)."""
    if not uses_meta_loading(accelerator):
        return main_first(accelerator, load)  # a hub model is downloaded once
    loaded = []

    def load_and_describe():
        model = load()
        loaded.append(model)
        buffers = {name: b for name, b in model.named_buffers() if name not in model.state_dict()}  # non-persistent
        dtype = next(model.parameters()).dtype
        return type(model), model.config, dtype, buffers, model.training

    cls, config, dtype, buffers, training = main_decides(accelerator, load_and_describe)
    if accelerator.is_main_process:
        return loaded[0]
    from plumbing.models import disable_dropout

    with torch.device("meta"):
        model = cls._from_config(config, dtype=dtype)
    for name, value in buffers.items():
        parent, _, leaf = name.rpartition(".")
        model.get_submodule(parent).register_buffer(leaf, value, persistent=False)
    disable_dropout(model)
    return model.train(training)


def shard_frozen(accelerator, model):
    """A frozen model (the reference) onto the devices: sharded like the policy under FSDP2 (weights from the
    main process, see load_on_main); a whole copy on every process otherwise (DDP, one process, FSDP1).
    (accelerator.prepare_model(model, evaluation_mode=True) would neither shard it nor move it under FSDP.)"""
    from accelerate.utils import fsdp2_prepare_model

    return fsdp2_prepare_model(accelerator, model) if getattr(accelerator, "is_fsdp2", False) else model.to(accelerator.device)


def frozen_dtype(cfg, accelerator) -> str:
    """The dtype a frozen model (reference) is loaded in. Under FSDP2 with bf16/fp16 mixed precision every
    parameter is cast to that dtype before each forward (MixedPrecisionPolicy.param_dtype), so a frozen model
    held in it computes exactly the same numbers in half the memory. Elsewhere model.dtype: under plain
    autocast the parameters of non-matmul ops (norms, embeddings) are used in their own dtype."""
    low = {"bf16": "bfloat16", "fp16": "float16"}.get(cfg.train.mixed_precision)
    return low if getattr(accelerator, "is_fsdp2", False) and low and cfg.model.dtype == "float32" else cfg.model.dtype


def spread(accelerator, items: list, fn) -> dict:
    """{item: fn(item)} on every process, each process computing its share items[rank::P] (e.g. SHA-256 of a
    checkpoint's files: 56 GB at 7B take minutes on one process, while the others would wait in a collective)."""
    mine = {item: fn(item) for item in items[accelerator.process_index :: accelerator.num_processes]}
    if accelerator.num_processes == 1:
        return mine
    import torch.distributed as dist

    shares = [None] * accelerator.num_processes
    dist.all_gather_object(shares, mine)
    return {k: v for share in shares for k, v in share.items()}
