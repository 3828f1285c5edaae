"""Test-only: the gloo teardown race that plumbing.distributed.settle_collectives prevents, made to happen.

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 tests/teardown_check.py settle|none ROUNDS

Each round wraps a model in DDP on a new gloo group, runs collectives, and frees the model right after the last
one, so that DDP's Reducer drops the group's last reference (its destructor joins the worker threads while
holding the GIL): the moment betadpo.py reaches when train() returns. With `none` a worker that still needs
the GIL to release the last collective's tensors waits forever; with `settle` each round settles first.
The product code never imports this file.
"""

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from plumbing.distributed import settle_collectives  # noqa: E402

mode, rounds = sys.argv[1], int(sys.argv[2])
dist.init_process_group("gloo")
for i in range(rounds):
    group = dist.new_group(backend="gloo")
    model = DistributedDataParallel(torch.nn.Linear(4, 4), process_group=group)
    model(torch.randn(2, 4)).sum().backward()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"round": i}, group=group)
    dist.barrier(group=group)
    if mode == "settle":
        settle_collectives()
    dist.destroy_process_group(group)
    del group  # the Reducer inside `model` now holds the group's last reference
    del model
os.write(1, f"rank {dist.get_rank()}: {rounds} rounds\n".encode())
settle_collectives()
dist.destroy_process_group()
