"""The test harness itself: a hung multi-process launch must fail with every process's stack and leave nothing running."""

import sys
from pathlib import Path

import pytest

from conftest import run_command

# A launcher whose worker runs in a session of its own (as torchrun's agent starts ranks) and waits forever.
HUNG_LAUNCH = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time\\ndef wait_in_collective():\\n    time.sleep(3600)\\nwait_in_collective()"],
                 start_new_session=True)
time.sleep(3600)
"""


def test_a_hung_launch_reports_its_workers_stacks_and_kills_them():
    with pytest.raises(AssertionError) as failure:
        run_command([sys.executable, "-c", HUNG_LAUNCH], timeout=3)
    message = str(failure.value)
    assert "still ran after 3 s" in message and "wait_in_collective" in message, message  # the worker's stack
    alive = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"wait_in_collective" in cmdline.read_bytes():  # the launcher's or the worker's
                alive.append(cmdline.parent.name)
        except OSError:
            pass  # gone meanwhile
    assert not alive, alive
