"""The end of a multi-process run never hangs and never aborts: plumbing.distributed.settle_collectives."""

from conftest import run_script


def test_freeing_a_ddp_model_after_settling_does_not_hang():
    """tests/teardown_check.py frees a DDP model right after its last collective, 12 times per process. Without
    the settle (`none`), 3 of 4 such launches hung here (rank 0 in the Reducer's destructor, a gloo worker
    waiting for the GIL); with it, none of 4 (plus this test)."""
    result = run_script("tests/teardown_check.py", "settle", 12, processes=2, timeout=120)
    assert sorted(line for line in result.stdout.splitlines() if line.startswith("rank ")) == ["rank 0: 12 rounds", "rank 1: 12 rounds"]
