"""Test-only launcher: run a script with its storage failing the way a full disk fails, without root.

    python tests/storage_fault.py FRAGMENT sft.py --config ...
    accelerate launch ... tests/storage_fault.py FRAGMENT sft.py ...

The first write whose path contains FRAGMENT fails as the real libraries fail on a full disk (measured on a
64 KiB tmpfs): torch.save writes part of the file, then raises its zip writer's RuntimeError ("unexpected pos",
no errno); safetensors' save_file raises SafetensorError("... No space left on device (os error 28)"). The disk
then reports 0 bytes free (shutil.disk_usage). Everything else is the script's own code. The product code never
imports this file.
"""

import os
import runpy
import shutil
import sys
from collections import namedtuple
from pathlib import Path

import accelerate.utils.other
import torch
from safetensors import SafetensorError

fragment = sys.argv[1]
failed = []


def _full(path) -> bool:
    if fragment in str(path) and not failed:
        failed.append(str(path))
        return True
    return False


_torch_save = torch.save


def torch_save(obj, f, *args, **kwargs):
    if isinstance(f, (str, os.PathLike)) and _full(f):
        Path(f).write_bytes(b"PK\3\4" + b"\0" * 60)  # the part written before the disk filled
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    return _torch_save(obj, f, *args, **kwargs)


_safe_save_file = accelerate.utils.other.safe_save_file


def safe_save_file(tensors, filename, metadata=None):
    if _full(filename):
        Path(filename).write_bytes(b"\0" * 64)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    return _safe_save_file(tensors, filename, metadata=metadata)


_disk_usage = shutil.disk_usage


def disk_usage(path):
    usage = _disk_usage(path)
    return namedtuple("usage", "total used free")(usage.total, usage.total, 0) if failed else usage


torch.save = torch_save
accelerate.utils.other.safe_save_file = safe_save_file
shutil.disk_usage = disk_usage

script = os.path.abspath(sys.argv[2])
sys.argv = sys.argv[2:]
sys.path.insert(0, os.path.dirname(script))
runpy.run_path(script, run_name="__main__")
