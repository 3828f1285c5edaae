"""The data path at real sizes: a 160,000-pair HH file through `betadpo.py --data.preview 1` from a cold cache
(rendered by SmolLM2's chat template, tokenized, written to the tokenized cache), the same command again (the
cache read), the same on 2,000 pairs (the memory baseline), and 8 processes of one node sharing one tokenization.

    python benchmarks/bench_data.py                          # all four rows (≈ 3 min on 2 idle cores)
    python benchmarks/bench_data.py --only cold,warm --pairs 20000
    python benchmarks/bench_data.py --repo OTHER_CHECKOUT --only cold   # the same commands in another checkout (before/after)

The data file is generated here, never read from elsewhere: the 4 HH rows of tests/fixtures, each turn made unique
with a counter ("... (variant 12345)"), so that rows differ as real rows do (no two tokenize alike at the end) while
their length distribution stays HH's. Each launch is a fresh process; reported: wall time, CPU time (user + system
of the process and its workers), the peak of the process tree's summed PSS (proportional set size: a page that
forked workers share with the main process counts once in all) and the main process's own peak RSS, both sampled
every 100 ms.
The 8-process row runs `accelerate launch --num_processes 8` of this file's --rank-probe on a cold cache: per
rank, how many times it tokenized, and its RSS and USS growth from before the data to after the summary line, one
token hash and 64 pairs read. The machine may be shared: the load average is printed with every table.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "hh-harmless-base-test-4.jsonl"


def make_pairs(n: int, path: Path) -> Path:
    """n unique HH-format rows from the 4 fixture rows: every turn of row k ends with " (variant k)"."""
    base = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    with path.open("w") as f:
        for k in range(n):
            row = base[k % len(base)]
            tag = f" (variant {k})"
            f.write(json.dumps({side: row[side].replace("\n\nAssistant:", f"{tag}\n\nAssistant:") + tag
                                for side in ("chosen", "rejected")}) + "\n")
    return path


def measure(cmd: list, cwd: Path, env: dict) -> dict:
    """Run cmd; → wall s, CPU s (its tree's user + system), the tree's peak summed RSS, the process's own peak."""
    import psutil

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root, peak, own = psutil.Process(proc.pid), 0, 0
    while proc.poll() is None:
        try:
            own = max(own, root.memory_info().rss)
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_full_info().pss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.1)
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{err[-3000:]}")
    summary = [line for line in err.splitlines() if line.startswith("data: ")]
    return {"wall": wall, "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "tree_peak": peak / 2**20, "own_peak": own / 2**20, "summary": summary[-1] if summary else "", "stdout": out}


def preview(repo: Path, path: Path, cache: Path) -> dict:
    cmd = [sys.executable, "betadpo.py", "--config", "configs/smollm2_hh.yaml", "--data.dataset", str(path), "--data.preview", "1"]
    if (repo / "plumbing" / "token_cache.py").exists():  # (an older checkout has no cache)
        cmd += ["--data.cache_dir", str(cache)]
    return measure(cmd, repo, {**os.environ, "TQDM_DISABLE": "1"})


def rank_probe(a):
    """One rank of the 8-process row (under accelerate launch): tokenizations, RSS/USS growth, as JSON on rank 0."""
    import psutil
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    sys.path.insert(0, str(REPO))
    from plumbing import data
    from plumbing.config import DataArgs
    from plumbing.models import load_tokenizer
    from plumbing.scoring import token_hash

    state = Accelerator()  # (as the scripts make it: on CPUs, gloo)
    tokenizer = load_tokenizer("smollm2-135m")
    built = []
    tokenize = data._tokenized_splits
    data._tokenized_splits = lambda *args: built.append(1) or tokenize(*args)  # counts this rank's tokenizations
    D = DataArgs(dataset=a.dataset, eval_size=256, max_length=512, max_prompt_length=256, cache_dir=a.cache_dir)
    me = psutil.Process()
    rss, uss = me.memory_info().rss, me.memory_full_info().uss
    start = time.perf_counter()
    train, held_out = data.training_pairs(D, tokenizer, state.is_main_process)
    seconds = time.perf_counter() - start
    token_hash(train), token_hash(held_out)  # what inputs.json needs
    [train[i] for i in range(0, len(train), max(1, len(train) // 64))]  # pairs read as a run reads them
    row = {"rank": state.process_index, "tokenized": len(built), "seconds": seconds,
           "rss_mb": (me.memory_info().rss - rss) / 1e6, "uss_mb": (me.memory_full_info().uss - uss) / 1e6, "pairs": len(train)}
    rows = gather_object([row])
    if state.is_main_process:
        print("PROBE " + json.dumps(rows), flush=True)


def ranks_row(path: Path, cache: Path, processes: int) -> tuple[dict, list]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           str(Path(__file__).resolve()), "--rank-probe", "--dataset", str(path), "--cache-dir", str(cache)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    result = measure(cmd, REPO, env)
    probe = next(line for line in result["stdout"].splitlines() if line.startswith("PROBE "))
    return result, json.loads(probe[len("PROBE ") :])


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "?"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=160_000)
    p.add_argument("--baseline-pairs", type=int, default=2_000)
    p.add_argument("--processes", type=int, default=8)
    p.add_argument("--only", default="cold,warm,baseline,ranks", help="comma-separated rows")
    p.add_argument("--repo", type=Path, default=REPO, help="the checkout whose betadpo.py runs the preview rows")
    p.add_argument("--workdir", type=Path, default=None, help="data files and caches (default: a temporary directory)")
    p.add_argument("--rank-probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dataset", help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.rank_probe:
        return rank_probe(a)
    rows = set(a.only.split(","))
    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench_data-"))
    work.mkdir(parents=True, exist_ok=True)
    big, small = work / f"hh-{a.pairs}.jsonl", work / f"hh-{a.baseline_pairs}.jsonl"
    for n, path in ((a.pairs, big), (a.baseline_pairs, small)):
        if not path.exists():
            make_pairs(n, path)
    print(f"# {cpu_name()}, {os.cpu_count()} cores; load average before: {os.getloadavg()[0]:.1f}; checkout {a.repo}")
    print("| run | wall s | CPU s | tree peak PSS MiB | process peak RSS MiB |\n| --- | ---: | ---: | ---: | ---: |")
    results = {}
    for name, path, cache in (("baseline", small, work / "cache-small"), ("cold", big, work / "cache-big"), ("warm", big, work / "cache-big")):
        if name not in rows and not (name == "cold" and "warm" in rows):
            continue
        if name != "warm":
            shutil.rmtree(cache, ignore_errors=True)
        r = results[name] = preview(a.repo, path, cache)
        label = {"baseline": f"{a.baseline_pairs:,} pairs, cold", "cold": f"{a.pairs:,} pairs, cold", "warm": f"{a.pairs:,} pairs, cached"}[name]
        print(f"| {label} | {r['wall']:.1f} | {r['cpu']:.1f} | {r['tree_peak']:.0f} | {r['own_peak']:.0f} |", flush=True)
    if {"cold", "baseline"} <= results.keys():
        print(f"\ncold {a.pairs:,} − {a.baseline_pairs:,} pairs: {results['cold']['tree_peak'] - results['baseline']['tree_peak']:.0f} MiB "
              f"(tree), {results['cold']['own_peak'] - results['baseline']['own_peak']:.0f} MiB (process)")
    if "cold" in results:
        print(f"summary line: {results['cold']['summary']}")
    if "ranks" in rows:
        shutil.rmtree(work / "cache-ranks", ignore_errors=True)
        r, probe = ranks_row(big, work / "cache-ranks", a.processes)
        print(f"\n{a.processes} processes, cold cache: {r['wall']:.1f} s wall, {r['cpu']:.1f} CPU s, tokenizations: "
              f"{sum(x['tokenized'] for x in probe)}")
        print("| rank | tokenized | data s | RSS growth MB | USS growth MB |\n| ---: | ---: | ---: | ---: | ---: |")
        for x in sorted(probe, key=lambda x: x["rank"]):
            print(f"| {x['rank']} | {x['tokenized']} | {x['seconds']:.1f} | {x['rss_mb']:.0f} | {x['uss_mb']:.0f} |")
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
