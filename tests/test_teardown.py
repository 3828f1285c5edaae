"""The end of a multi-process run never hangs and never aborts: plumbing.distributed.settle_collectives."""

import os
import sys

from conftest import ROOT, _free_port, run_command


def test_freeing_a_ddp_model_after_settling_does_not_hang():
    """tests/teardown_check.py frees a DDP model right after its last collective, 12 times per process. Without
    the settle (`none`), 3 of 4 such launches hung here (rank 0 in the Reducer's destructor, a gloo worker
    waiting for the GIL); with it, none of 4 (plus this test)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(ROOT / "tests" / "teardown_check.py"), "settle", "12"]
    result = run_command(cmd, env, timeout=120)
    assert sorted(line for line in result.stdout.splitlines() if line.startswith("rank ")) == ["rank 0: 12 rounds", "rank 1: 12 rounds"]
