"""Host memory of betadpo.py under FSDP2 on CPU processes: peak RSS per rank at load and over a whole step, and
the gradient memory of accumulation, for the current code and (with --before REV) for an older commit.

    python benchmarks/bench_scale.py                        # 273M-param Llama, the cases below: ≈1 hour on 2 busy cores
    python benchmarks/bench_scale.py --cases after:4:2 before:4:2   # CODE:PROCESSES:GRAD_ACCUM (before: 366a857's code)
    python benchmarks/bench_scale.py --layers 2 --hidden 64 --cases after:2:2 before:2:2   # a smoke run, ≈3 minutes
    python benchmarks/bench_scale.py --cases after:4:2 --load_peak   # the issue-31 run: as launched, + rank 0's load alone
    python benchmarks/bench_scale.py --cases after:4:2 --allocator_env   # MALLOC_* set by hand, as before issue 31

Launched as a user launches: no allocator variables in the environment (any inherited MALLOC_* is removed);
the scripts set glibc's malloc up themselves (plumbing/host_allocator.py). --allocator_env sets the same two
settings through the environment instead. A case CODE:PROCESSES:GRAD_ACCUM:bf16 reads a bf16 checkpoint of the
same model (the policy is still fp32: model.dtype float32, as the 7B/20B configs).
--load_peak: rank 0's loading alone, one process, plumbing.models.load_model(checkpoint, float32) of the fp32
and the bf16 checkpoint, peak RSS above the imports (what rank 0 holds before it shards anything).

Default cases: the current code on 4 processes with grad_accum 2; then on 2 processes (the code before, commit
366a857, needs ~4.5 S per rank: 4 of them do not fit in 24 GB) with grad_accum 4 and 1, before and after.

Each case is one `accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes P` of
`tests/fsdp_launch.py betadpo.py` (accelerate's real FSDP2 code path on gloo CPU processes), 1 optimizer step of
RMSprop with train.grad_accum micro-batches of one pair per process, a checkpoint and final/ (every memory
peak a real run has). The launched script is this file in --probe mode: it records each process's peak RSS
(VmHWM from /proc/self/status) when each model has been sharded (the end of loading), after each backward, and
at exit, and the peaks of the checkpoint and of final/ alone (VmHWM reset before each, the RSS final/ starts
from beside it, and the bytes of the tensors not freed at that point). Numbers are given in S, the model's size in fp32, above the RSS of a bare
`import torch, transformers, accelerate` (measured the same way).

Fully sharded over P processes a rank needs about (params + grads + optimizer state + reference)/P ≈ 4S/P,
plus transient whole tensors (one parameter at a time during loading, the gathered state of final/ on rank 0).
docs/SCALING.md holds the table this printed, and the memory model it checks.
"""

import argparse
import atexit
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# glibc's malloc on its defaults keeps freed memory in per-thread arenas (gloo runs several threads) and raises its
# mmap threshold after each large free, so a CPU process's RSS counts much memory no tensor holds any more. The
# scripts now set it up themselves (plumbing/host_allocator.py); --allocator_env sets the same through the
# environment, as users had to before.
ALLOCATOR: dict = {}
MARK = re.compile(r"MEM rank (\d+) (\S+) hwm_kb (\d+) rss_kb (\d+)")  # processes share stdout: lines may run together
LIVE = re.compile(r"LIVE rank (\d+) (\S+) tensors_kb (\d+)/(\d+)")


def vm_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1])


_PEAK_KB = [0]  # the whole run's peak so far: phase() resets the kernel's VmHWM


def mark(label: str, hwm_kb: int | None = None):
    _PEAK_KB[0] = max(_PEAK_KB[0], vm_kb("VmHWM"))
    hwm = _PEAK_KB[0] if hwm_kb is None else hwm_kb
    print(f"\nMEM rank {os.environ.get('RANK', '0')} {label} hwm_kb {hwm} rss_kb {vm_kb('VmRSS')}", flush=True)


def live_tensors_kb() -> tuple[int, int]:
    """The bytes of every tensor storage not freed yet (DTensors: their local shard), each counted once →
    (parameters', the rest's): a model not freed shows in the first, optimizer state or gradients in the second.
    gc.get_objects also lists objects in reference cycles that the collector has not freed yet."""
    import gc

    import torch
    from torch.distributed.tensor import DTensor

    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            local = obj._local_tensor if isinstance(obj, DTensor) else obj
            ptr = local.untyped_storage().data_ptr()
            is_param = isinstance(obj, torch.nn.Parameter) or storages.get(ptr, (0, False))[1]
            storages[ptr] = (local.untyped_storage().nbytes(), is_param)
    params = sum(n for n, is_param in storages.values() if is_param)
    return params // 1024, (sum(n for n, _ in storages.values()) - params) // 1024


def phase(label: str, run):
    """run(...) with its own peak RSS: VmHWM is reset to the current RSS before (writing 5 to /proc/self/clear_refs)
    and read after; the mark `label` holds that phase's peak, `label_start` the RSS it started from."""
    def run_and_mark(*args, **kwargs):
        mark(f"{label}_start")
        print(f"\nLIVE rank {os.environ.get('RANK', '0')} {label}_start tensors_kb {'/'.join(map(str, live_tensors_kb()))}", flush=True)
        Path("/proc/self/clear_refs").write_text("5")
        try:
            return run(*args, **kwargs)
        finally:
            peak = vm_kb("VmHWM")
            mark(label, peak)
    return run_and_mark


def probe(argv: list[str]):
    """The launched script: memory marks around accelerate's FSDP2 sharding and every backward, then
    tests/fsdp_launch.py (of the code under test, the working directory) runs betadpo.py."""
    import accelerate.accelerator
    import accelerate.utils
    from torch.distributed.fsdp import FSDPModule

    shards = []

    def marking(prepare):
        def prepare_and_mark(accelerator, model):
            already = isinstance(model, FSDPModule)
            model = prepare(accelerator, model)
            if not already:
                shards.append(model)
                mark(f"sharded_{len(shards)}")
            return model
        return prepare_and_mark

    accelerate.accelerator.fsdp2_prepare_model = marking(accelerate.accelerator.fsdp2_prepare_model)
    accelerate.utils.fsdp2_prepare_model = marking(accelerate.utils.fsdp2_prepare_model)
    backward, count = accelerate.Accelerator.backward, [0]

    def backward_and_mark(self, loss, **kwargs):
        backward(self, loss, **kwargs)
        count[0] += 1
        mark(f"backward_{count[0]}")

    accelerate.Accelerator.backward = backward_and_mark
    sys.path.insert(0, os.getcwd())  # the code under test
    import plumbing.checkpoints  # before betadpo.py imports save_checkpoint and save_final from it
    import plumbing.launch  # before betadpo.py imports start_run from it

    plumbing.checkpoints.save_checkpoint = phase("checkpoint", plumbing.checkpoints.save_checkpoint)
    plumbing.checkpoints.save_final = phase("final", plumbing.checkpoints.save_final)

    start_run = plumbing.launch.start_run

    def start_and_mark(*args, **kwargs):
        accelerator = start_run(*args, **kwargs)
        mark("started")  # imports done, process group up, nothing of the model yet
        return accelerator

    plumbing.launch.start_run = start_and_mark
    atexit.register(mark, "exit")
    import runpy

    sys.argv = [str(Path("tests/fsdp_launch.py").resolve()), *argv]
    runpy.run_path(sys.argv[0], run_name="__main__")


def bare_import_kb() -> int:
    code = ("import torch, transformers, accelerate\n"
            "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def build_model(path: Path, hidden: int, layers: int) -> int:
    """A random Llama (plumbing/sort_task.py's, width `hidden`, `layers` layers) saved in fp32 → its parameter count."""
    sys.path.insert(0, str(ROOT))
    from plumbing import sort_task

    tok = sort_task.build_tokenizer()
    model = sort_task.build_tiny_llama(len(tok), hidden, layers, 0, tok.pad_token_id, tok.eos_token_id)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def save_bf16(model: Path, path: Path):
    """The fp32 checkpoint `model` saved again in bf16 (as hub checkpoints of 7B/20B models are)."""
    import shutil

    from transformers import AutoModelForCausalLM

    if (path / "config.json").is_file():
        return
    AutoModelForCausalLM.from_pretrained(model, dtype="bfloat16").save_pretrained(path)
    for f in model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, path / f.name)


def load_peak_kb(path: Path) -> int:
    """Peak RSS (VmHWM, KiB) of one fresh process that loads `path` as betadpo.py's rank 0 does: the allocator
    module first, then plumbing.models.load_model(path, "float32")."""
    code = ("import sys; sys.path.insert(0, '.'); import plumbing.host_allocator\n"
            "import torch, transformers, accelerate\nfrom plumbing.models import load_model\n"
            f"model = load_model({str(path)!r}, 'float32')\n"
            "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])")
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**inherited, "OMP_NUM_THREADS": "1"})
    return int(out.stdout.split()[-1])


def run_case(code: Path, model: Path, out: Path, processes: int, accum: int) -> dict:
    """One launch → {rank: {mark: (hwm_kb, rss_kb)}}."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # as launched: no allocator variables
    env = {**inherited, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1", **ALLOCATOR}
    port = 29500 + os.getpid() % 1000 + processes * 10 + accum
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/fsdp.yaml",
           "--num_processes", str(processes), "--main_process_port", str(port), str(Path(__file__).resolve()), "--probe",
           "betadpo.py", "--config", "configs/sort.yaml", "--model.name_or_path", str(model), "--train.output_dir", str(out),
           "--train.optimizer", "rmsprop", "--train.grad_accum", str(accum), "--train.batch_size", str(processes * accum),
           "--train.max_steps", "1", "--train.warmup_steps", "0", "--data.eval_size", "2", "--eval.batch_size", "2", "--data.num_train", "64",
           "--log.progress_every", "1"]
    result = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    marks: dict = {}
    for rank, label, hwm, rss in MARK.findall(result.stdout):
        marks.setdefault(int(rank), {})[label] = (int(hwm), int(rss))
    for rank, label, params_kb, rest_kb in LIVE.findall(result.stdout):
        marks.setdefault(int(rank), {})["live_" + label] = (int(params_kb), int(rest_kb))
    return marks


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=26)
    parser.add_argument("--cases", nargs="+", default=["after:4:2", "before:2:4", "after:2:4", "after:2:1", "before:2:1"],
                        help="CODE:PROCESSES:GRAD_ACCUM, CODE = after (this tree) or before (--before's tree)")
    parser.add_argument("--before", default="366a857", help="the git revision 'before' cases run (366a857: the code before issue 25)")
    parser.add_argument("--workdir", default="")
    parser.add_argument("--memory_model", action="store_true", help="print docs/SCALING.md's memory model table and stop")
    parser.add_argument("--allocator_env", action="store_true", help="MALLOC_ARENA_MAX=2 MALLOC_MMAP_THRESHOLD_=1 MiB in the environment")
    parser.add_argument("--load_peak", action="store_true", help="also rank 0's load alone, fp32 and bf16 checkpoints")
    args = parser.parse_args()
    if args.probe is not None:
        return probe(args.probe)
    if args.memory_model:
        print_memory_model(4096)
        print()
        print_memory_model(2048)
        return
    if args.allocator_env:
        ALLOCATOR.update({"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": str(1 << 20)})
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_scale_"))
    model = work / "model"
    n = build_model(model, args.hidden, args.layers) if not (model / "config.json").is_file() else None
    if n is None:
        import json

        c = json.loads((model / "config.json").read_text())
        n = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_config(
            __import__("transformers").AutoConfig.for_model(**c)).parameters())
    S_kb = n * 4 / 1024
    base = bare_import_kb()
    cases = [(c.split(":") + ["fp32"])[:4] for c in args.cases]  # (code, processes, grad_accum, checkpoint dtype)
    if any(dtype == "bf16" for *_, dtype in cases) or args.load_peak:
        save_bf16(model, work / "model-bf16")
    trees = {"after": ROOT}
    if any(code != "after" for code, *_ in cases):
        old = work / f"code-{args.before}"
        if not old.is_dir():
            old.mkdir(parents=True)
            archive = subprocess.run(["git", "archive", args.before], cwd=ROOT, capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        trees["before"] = old
    print(f"model: {n / 1e6:.0f}M parameters, S = {S_kb / 2**20:.2f} GiB in fp32; bare import RSS {base / 2**20:.2f} GiB; "
          f"CPU: {cpu_name()}; before = {args.before}")
    print(f"allocator: {ALLOCATOR or 'no MALLOC_* variables (as users launch): the scripts call mallopt, plumbing/host_allocator.py'}")
    s = lambda kb: f"{(kb - base) / S_kb:.2f}"  # noqa: E731
    if args.load_peak:
        print("\n| checkpoint | rank 0's load alone: peak (S) |\n|---|---|")
        for dtype, path in (("fp32", model), ("bf16", work / "model-bf16")):
            print(f"| {dtype} | {s(load_peak_kb(path))} |", flush=True)
    print("\n| code | checkpoint | processes | grad_accum | rank | started (S) | peak at load (S) | peak after 1st backward (S) "
          "| peak in checkpoint (S) | RSS before final/ (S) | live tensors before final/: parameters + rest (S) | peak in final/ (S) "
          "| peak, whole run (S) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for code, P, accum, dtype in cases:
        path = work / "model-bf16" if dtype == "bf16" else model
        marks = run_case(trees[code], path, work / f"run-{code}-{P}-{accum}-{dtype}", int(P), int(accum))
        total = 0.0
        for rank in sorted(marks):
            m = marks[rank]
            load = max((v[0] for k, v in m.items() if k.startswith("sharded_")), default=None)
            get = lambda key, i=0: s(m[key][i]) if key in m else "–"  # noqa: E731
            live = " + ".join(f"{kb / S_kb:.2f}" for kb in m["live_final_start"]) if "live_final_start" in m else "–"
            total += (m["exit"][0] - base) / S_kb if "exit" in m else float("nan")
            print(f"| {code} | {dtype} | {P} | {accum} | {rank} | {get('started')} | {s(load) if load else '–'} | {get('backward_1')} | "
                  f"{get('checkpoint')} | {get('final_start', 1)} | {live} | {get('final')} | {get('exit')} |", flush=True)
        print(f"| {code} | {dtype} | {P} | {accum} | all | | | | | | | | {total:.2f} |", flush=True)


def print_memory_model(tokens: int = 4096, G: int = 8):
    """docs/SCALING.md's per-GPU tables, from plumbing/memory_model.py (the launch guard's model): InternLM2.5
    shapes, fp32 weights, gradients and RMSprop state; DDP with a fp32 reference, FSDP2/HSDP over G with bf16
    mixed precision and a bf16 reference; `tokens` per GPU per micro-batch; GB = 1e9 bytes."""
    sys.path.insert(0, str(ROOT))
    from plumbing import memory_model as mm

    gb = lambda b: f"{b / 1e9:.1f}"  # noqa: E731
    print(f"| model | params | DDP: weights+grads+RMSprop+ref (fp32) | FSDP/HSDP over {G}: the same, ref bf16 | FSDP unsharded "
          f"(2 layers + embed/head, bf16) | activations, {tokens} tokens: none / checkpointed | LM-head backward | "
          f"FSDP end of backward: embed/head grad bf16 + fp32 staging | FSDP peak: checkpointed / not |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, hub in (("1.8B", "internlm/internlm2_5-1_8b-chat"), ("7B", "internlm/internlm2_5-7b-chat"),
                      ("20B", "internlm/internlm2_5-20b-chat")):
        shape = mm.shape_of(mm.known_config(hub))
        common = dict(weight_bytes=4, trained_fraction=1.0, optimizer_states=1, tokens=tokens, autocast=True, fp32_reduce=True)
        ddp = mm.estimate(shape, mm.Launch(processes=G, shards=1, compute_bytes=4, reference_bytes=4, checkpointing=True, **common))
        fsdp = {ckpt: mm.estimate(shape, mm.Launch(processes=G, shards=G, compute_bytes=2, reference_bytes=2, checkpointing=ckpt,
                                                   **common)) for ckpt in (True, False)}
        states = lambda t: sum(t[k] for k in ("weights", "gradients", "optimizer", "reference"))  # noqa: E731
        f = fsdp[True]
        print(f"| {name} | {shape.params / 1e9:.2f} B | {gb(states(ddp))} | {gb(states(f))} | {gb(f['fsdp_unsharded'])} | "
              f"{gb(fsdp[False]['activations'])} / {gb(f['activations'])} | {gb(f['head_backward'])} | "
              f"{gb(f['fsdp_reduce_staging'])} | {gb(f['peak'])} / {gb(fsdp[False]['peak'])} |")


def cpu_name() -> str:
    try:
        line = next(line for line in open("/proc/cpuinfo") if line.startswith("model name"))
        import torch

        return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores, torch kernels {torch.backends.cpu.get_cpu_capability()}"
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
