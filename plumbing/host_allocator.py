"""glibc's malloc set up for large tensors, at import: the scripts import this module before torch.

Why: on a CPU process (CPU training, and rank 0 reading a checkpoint on any machine) tensors live in memory
that glibc's malloc hands out, and on its defaults glibc keeps much of what torch frees:
- each thread that allocates gets an arena of its own (up to 8 per core), and gloo runs collectives on worker
  threads, so tensors received in a collective are freed into arenas that the main thread never reuses;
- the mmap threshold (allocations above it get their own mapping, returned to the system on free) starts at
  128 KiB and rises to the size of each large block freed, up to 32 MiB: after one 4 MiB tensor is freed,
  every later tensor up to 4 MiB comes from an arena's heap, which returns memory only from its top.
Measured (docs/SCALING.md, FSDP2 × 4 CPU processes, a 1 GiB model): every rank then peaks at 3.1–4.2 model
copies, against 1.3 with the two settings below. A GPU run's tensors live in device memory; its host peak is
rank 0 reading the checkpoint, which is exactly the one-tensor-at-a-time pattern the rising threshold hurts.

What: 2 arenas and a fixed 1 MiB mmap threshold (mallopt M_ARENA_MAX, M_MMAP_THRESHOLD; also the fixed
threshold turns off glibc's matching rise of the trim threshold), the same as launching with
MALLOC_ARENA_MAX=2 MALLOC_MMAP_THRESHOLD_=1048576. glibc reads those variables only at process start, so the
settings are made with mallopt, which takes effect for arenas made and blocks allocated afterwards: hence
before torch is imported and before any thread starts. A variable the user set is left as they set it (glibc
already applied it). Not glibc (macOS, musl): nothing is done.

Cost: a block above 1 MiB is a fresh mapping, zeroed by the kernel page by page when first touched (the fused
head reuses its tile buffers for that reason). On the project's shared 2-core machine the difference in step time
was lost in the noise: a width-512, 4-layer Llama's forward + backward (8 × 256 tokens, 1 thread, median of 6)
took 10.7 and 9.4 s on glibc's defaults, 10.3 and 15.6 s with these settings (two alternating runs, load ≈ 12).
"""

import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # glibc's malloc.h
SETTINGS = {"MALLOC_ARENA_MAX": (M_ARENA_MAX, 2), "MALLOC_MMAP_THRESHOLD_": (M_MMAP_THRESHOLD, 1 << 20)}


def glibc():
    """The process's C library when it is glibc, else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()  # only glibc has it
        return libc
    except (OSError, AttributeError):
        return None


def pin_allocator() -> dict:
    """Apply SETTINGS through mallopt (each unless its environment variable is set) → {variable: value} applied."""
    libc = glibc()
    if libc is None:
        return {}
    applied = {}
    for variable, (option, value) in SETTINGS.items():
        if variable not in os.environ and libc.mallopt(option, value) == 1:  # mallopt returns 1 on success
            applied[variable] = value
    return applied


APPLIED = pin_allocator()
