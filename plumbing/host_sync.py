"""Host↔device syncs, found on any device (a CPU build included): `host_syncs()` records every operation inside
it that makes the host wait for the device.

Why it matters: a GPU runs kernels queued by the host. An operation whose result the host must read — `.item()`,
`.tolist()`, `bool(t)`, `nonzero()`, boolean-mask indexing (its output size is data) — stalls the host until the
queue drains, and the GPU idles while the host queues the next kernels. A training micro-batch should queue its
forward and backward without one (the step's logging reads its numbers once, after the optimizer step).

On a GPU, `torch.cuda.set_sync_debug_mode("error")` catches these as they happen. On a CPU there is no device to
wait for, so nothing is caught; this module looks at the operations themselves instead: a
TorchDispatchMode sees every aten op run in its block, forward and backward, and `Tensor.tolist` (which dispatches
none) is wrapped while the block runs. What it cannot see on a CPU: a copy to the host (`.cpu()`), which is an
ordinary copy there; the GPU check's sync-debug mode sees those.

    with host_syncs() as found:
        loss = step(batch); loss.backward()
    assert not found, found   # [(op, where), ...]: where = the innermost frame of this repository's code
"""

import contextlib
import os
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# ops whose output the host must read, or whose output size depends on the data (so the host must read it)
READS_DATA = {aten._local_scalar_dense.default: "item()/bool()/int()", aten.nonzero.default: "nonzero()",
              aten.masked_select.default: "masked_select()", aten._unique.default: "unique()",
              aten._unique2.default: "unique()", aten.repeat_interleave.Tensor: "repeat_interleave() without output_size"}
INDEXING = (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default)
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _where() -> str:
    """The innermost frame of this repository's code that led to the op, and the innermost frame outside torch
    (e.g. transformers' model code) when that is another one."""
    frames = [f for f in traceback.extract_stack() if f.filename != __file__]
    ours = [f for f in frames if f.filename.startswith(REPOSITORY)] or frames
    outside_torch = [f for f in frames if f"{os.sep}torch{os.sep}" not in f.filename] or frames
    frame, inner = ours[-1], outside_torch[-1]
    inside = f" (in {inner.filename.rsplit('site-packages' + os.sep, 1)[-1]}:{inner.lineno} {inner.name})" if inner is not frame else ""
    return f"{os.path.relpath(frame.filename, REPOSITORY)}:{frame.lineno} {frame.name}{inside}"


_HOST_SIDE = [0]  # > 0 inside on_host(): work on host tensors, which no device waits for


@contextlib.contextmanager
def on_host():
    """A block that works on host tensors only (e.g. planning a batch's packing from its CPU copy): not recorded by
    host_syncs. On a GPU its reads are of CPU memory and wait for nothing; a device tensor read here would still
    stop the host, and the GPU check's sync-debug mode catches it."""
    _HOST_SIDE[0] += 1
    try:
        yield
    finally:
        _HOST_SIDE[0] -= 1


class _Watch(TorchDispatchMode):
    def __init__(self, found: list):
        super().__init__()
        self.found = found

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        why = READS_DATA.get(func)
        if why is None and func in INDEXING:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                why = "boolean-mask indexing"
        if why is not None and not _HOST_SIDE[0]:
            self.found.append((why, _where()))
        return func(*args, **kwargs)


@contextlib.contextmanager
def host_syncs():
    """→ a list that fills with (what, where) for every host↔device sync of the block (see the module docstring).
    Autograd's backward runs in the same mode when `.backward()` is called inside the block."""
    found, tolist = [], torch.Tensor.tolist

    def watched_tolist(self, *args, **kwargs):
        if not _HOST_SIDE[0]:
            found.append(("tolist()", _where()))
        return tolist(self, *args, **kwargs)

    torch.Tensor.tolist = watched_tolist
    try:
        with _Watch(found):
            yield found
    finally:
        torch.Tensor.tolist = tolist
