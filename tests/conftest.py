"""Shared fixtures: a tiny tokenizer + Llama saved like a hub checkpoint, and a way to launch the scripts."""

import contextlib
import io
import os
import runpy
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# One thread for the tests run in this process, as for every script they launch (run_script's OMP_NUM_THREADS=1):
# pytest.ini runs 2 workers on this project's 2 cores, each usually beside a launched script, and a second
# thread per process only adds OpenMP's spin-waiting to the suite's CPU time. No assertion depends on it: every
# comparison runs both of its sides in the same process.
torch.set_num_threads(1)

from plumbing import sort_task  # noqa: E402
from plumbing.metrics import read_metrics as read_jsonl  # noqa: E402


def save_tiny_model(path: Path, seed: int = 0, hidden: int = 32, layers: int = 1) -> Path:
    tok = sort_task.build_tokenizer()
    model = sort_task.build_tiny_llama(len(tok), hidden, layers, seed, tok.pad_token_id, tok.eos_token_id)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory) -> Path:
    """The tokenized data cache of every test and script the tests launch: the session's own, never the user's."""
    path = tmp_path_factory.mktemp("data_cache")
    os.environ["BETADPO_DATA_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def run_script(script: str, *args, processes: int = 1, check: bool = True, env: dict | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a top-level script as users do: `python X.py ...`, or `accelerate launch` with 2 CPU processes."""
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    if processes == 1:
        cmd = [sys.executable, str(ROOT / script), *map(str, args)]
    else:
        env["ACCELERATE_USE_CPU"] = "true"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
               str(ROOT / script), *map(str, args)]
    return run_command(cmd, env, timeout=timeout, check=check)


def run_main(script: str, *args, capsys) -> tuple[int, str, str]:
    """`python SCRIPT ARGS` in this process: the script's `__main__` through runpy → (exit code, stdout, stderr).
    For checks that stop before any work (a bad flag, file or model; data.preview), and for whole one-process runs
    where the launch is not what is tested (resume from disk, the metrics): a launch would add seconds of
    interpreter start-up and imports per run.
    An exception the script does not turn into an exit fails the test with its traceback."""
    code = run_in_this_process(script, *args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_here(script: str, *args, check: bool = True) -> subprocess.CompletedProcess:
    """run_script's one-process case, `python SCRIPT ARGS`, in this process (run_in_this_process), its stdout and
    stderr captured → the same CompletedProcess. For runs whose launch is not what is tested: a new interpreter
    would add seconds of start-up and imports per run. (Output of loggers that hold the real stderr is not caught.)"""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = run_in_this_process(script, *args)
    result = subprocess.CompletedProcess([script, *map(str, args)], code, stdout.getvalue(), stderr.getvalue())
    if check and code != 0:
        raise AssertionError(f"{script} {' '.join(result.args[1:])} failed ({code}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-5000:]}")
    return result


def run_in_this_process(script: str, *args) -> int:
    """runpy of `script`'s `__main__` with sys.argv = [script, *args] → its exit code (0 if it returns). accelerate's
    process-wide state is reset after every run, so that the next run (or test) builds its own Accelerator, as a new
    process would; each run sets its own seeds."""
    from accelerate.state import AcceleratorState, GradientState

    saved = list(sys.argv)
    sys.argv = [script, *map(str, args)]
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
        return 0
    except SystemExit as stopped:
        return stopped.code if isinstance(stopped.code, int) else 1
    finally:
        sys.argv = saved
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def _descendants(pid: int) -> list[int]:
    """Every live process below `pid` (from /proc's parent links), children before grandchildren. torchrun's agent
    (behind `accelerate launch`) starts its ranks in sessions of their own (start_new_session=True), so signalling
    the launcher's process group would not reach them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(0), [])
        found += kids
        todo += kids
    return found


def _signal_all(pids: list[int], sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def run_command(cmd: list, env: dict | None = None, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """subprocess.run(cmd) with Python's faulthandler on: a process that aborts (SIGABRT, e.g. C++'s "terminate
    called") prints every thread's Python stack. A command still running after `timeout` seconds (a hang: two
    ranks waiting in different collectives) gets SIGABRT in every process below it, ranks first, so that each
    prints where it waits, then SIGKILL; the failure shows those stacks, and no rank is left running to slow the
    rest of the suite down."""
    env = {**(env if env is not None else os.environ), "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        tree = _descendants(proc.pid)
        _signal_all(tree[::-1], signal.SIGABRT)  # the ranks (deepest) first: each dumps its stacks into the pipes
        time.sleep(5)
        _signal_all([*_descendants(proc.pid), *tree, proc.pid], signal.SIGKILL)
        try:
            stdout, stderr = proc.communicate(timeout=30)  # every writer of the pipes we know of is gone now
        except subprocess.TimeoutExpired:  # one that left the tree (re-parented) still holds them
            stdout, stderr = "", "(no output: a process outside the launcher's tree still holds its pipes)"
        raise AssertionError(f"{' '.join(cmd)} still ran after {timeout:.0f} s (a hang?); its processes' stacks:\n"
                             f"{(stdout or '')[-3000:]}\n{(stderr or '')[-12000:]}") from None
    result = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def _worker_ports():
    """This pytest-xdist worker's own ports for `--main_process_port`: 400 per worker from 20000, below Linux's
    ephemeral range (32768+). Asking the kernel for a free port (`bind(("", 0))`) instead can hand two workers the
    same port moments apart, or a port that the other worker's gloo connections then take as ephemeral ones; two
    launches sharing a rendezvous port can mix their ranks and hang."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    base = 20000 + 400 * int(worker.removeprefix("gw") or 0)
    while True:
        yield from range(base, base + 400)


_PORTS = _worker_ports()


def _free_port() -> int:
    """The next of this worker's ports that nothing is bound to now."""
    for port in _PORTS:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def read_metrics(run_dir: Path, split: str = "train") -> list[dict]:
    """The `split` rows ("train" or "eval") of run_dir/metrics.jsonl, read by the scripts' own reader."""
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("split", "train") == split]


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps its state in process-wide singletons: an Accelerator built by one test (a script's main()
    run in-process) would fix the mixed precision every later test in this xdist worker gets. Reset after each."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
