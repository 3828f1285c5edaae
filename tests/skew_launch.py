"""Test-only launcher: run a script with the processes of rank ≥ 1 given another value of one flag, as processes
on machines that do not share a filesystem (or see it late) would see other files under the same path.

    _SKEW_FLAG=--train.output_dir _SKEW_VALUE=/elsewhere accelerate launch ... tests/skew_launch.py betadpo.py --train.output_dir out ...

Rank 0 runs the command as given; every other rank runs it with `_SKEW_FLAG`'s value replaced by `_SKEW_VALUE`.
The product code never imports this file.
"""

import os
import runpy
import sys

args = sys.argv[1:]
if int(os.environ.get("RANK", "0")) > 0:
    i = args.index(os.environ["_SKEW_FLAG"])
    args[i + 1] = os.environ["_SKEW_VALUE"]
script = os.path.abspath(args[0])
sys.argv = args
sys.path.insert(0, os.path.dirname(script))
runpy.run_path(script, run_name="__main__")
