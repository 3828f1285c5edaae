"""Test-only launcher: run a script under accelerate's real FSDP2 code path on CPU processes (gloo).

accelerate sets the FSDP distributed type only for GPU-like devices (accelerate/state.py), so on CPUs an FSDP
config quietly becomes DDP. To run the FSDP2 path without GPUs, this wraps `AcceleratorState.__init__`: when
it is given an `fsdp_plugin` and the processes are MULTI_CPU, the state becomes FSDP with that plugin (also in
PartialState's shared state, which later AcceleratorState instances copy). Everything else is accelerate's and
torch's own code: `fully_shard`, DTensor parameters, sharded checkpoints, gathered state dicts.

It also prints one line per `fsdp2_prepare_model` call that shards a model (policy and reference)
saying how many of the model's parameters are DTensors, for the tests to check that both are sharded, and on
which device the model's weights were before (meta: that process never held them).

    ACCELERATE_USE_CPU=true accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 \\
        tests/fsdp_launch.py betadpo.py --config ...

The product code never imports this file.
"""

import os
import runpy
import sys

import accelerate.accelerator
import accelerate.utils
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_original_init = AcceleratorState.__init__


def _init_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)  # as accelerate does for GPUs
        self.fsdp_plugin = fsdp_plugin
        self.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def _reporting(prepare):
    def prepare_and_report(accelerator, model):
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        if isinstance(model, FSDPModule):  # already sharded (betadpo.py shards the policy before accelerator.prepare)
            return prepare(accelerator, model)
        loaded_on = next(model.parameters()).device.type  # "meta": this process never held the weights
        model = prepare(accelerator, model)
        params = list(model.parameters())
        sharded = sum(isinstance(p, DTensor) for p in params)
        trainable = sum(p.requires_grad for p in params)
        sys.stdout.write(f"fsdp2_prepare_model rank {accelerator.process_index}: {type(model).__name__} {sharded}/{len(params)} "
                         f"parameters are DTensors, {trainable} trainable, device {params[0].device.type}, "
                         f"loaded on {loaded_on}\n")  # one write:
        sys.stdout.flush()  # the processes share the pipe, and print's separate "\n" write can interleave
        return model

    return prepare_and_report


AcceleratorState.__init__ = _init_fsdp_on_cpu
accelerate.accelerator.fsdp2_prepare_model = _reporting(accelerate.accelerator.fsdp2_prepare_model)  # the policy
accelerate.utils.fsdp2_prepare_model = _reporting(accelerate.utils.fsdp2_prepare_model)  # the reference

script = os.path.abspath(sys.argv[1])
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(script))
runpy.run_path(script, run_name="__main__")
