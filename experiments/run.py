"""The studies of docs/RESULTS.md on the built-in sorting task: every run is an ordinary command-line run.

    python experiments/run.py all                  # every study, 3 seeds (≈60 min on 2 CPU cores); resumable
    python experiments/run.py ablation noise       # some studies: ablation mixture noise sensitivity scale
    python experiments/run.py all --smoke          # tiny model, a few steps, one seed: checks the pipeline (CI)

What it does:
1. SFT once (`python sft.py --config configs/sort_sft.yaml`): the common starting point and reference,
   evaluated against itself for the tables' first row.
2. For each study, each variant (a set of config overrides of configs/sort.yaml) and each seed
   (`train.seed`: data order, filter draws), `python betadpo.py` then `python eval.py` against the SFT
   policy. A run is a directory named after its overrides, so variants shared between studies (DPO and
   β-DPO at the default mixture appear in four) train once. A run with an eval.json is skipped: re-running
   the command after an interruption continues (betadpo.py itself resumes a half-trained run).
3. Per study: `table.md` (mean ± 95% confidence half-width over seeds, Student t) and `figure.png`
   (training curves averaged over seeds; final metrics with the same error bars), under --out.

Evaluation always uses the default held-out pairs and prompts (clean labels, default mixture), so numbers are
comparable across the variants of a study even where the variants train on different data.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python experiments/run.py` puts only experiments/ on the path

import plots  # noqa: E402
from common import read_metrics  # noqa: E402

# ========================================================================================================
# THE STUDIES: variant name → config overrides of configs/sort.yaml
# ========================================================================================================
DATA_DEFAULTS = {"data.high_gap_ratio": 0.3, "data.flip_ratio": 0.0}  # common.DataArgs' defaults (a test checks)
DPO = {"loss.alpha": 0.0, "loss.filter_ratio": 0.0}
# β-DPO with the reference code's settings (https://github.com/junkangwu/beta-DPO), β₀ = 0.1 from configs/sort.yaml.
BETA_DPO = {"loss.alpha": 0.6, "loss.filter_ratio": 0.2}
LEARNED = {**BETA_DPO, "loss.ppl_scale": True, "loss.learn_scale": True, "loss.scale_lr": 1e-2}
FIXED = {**BETA_DPO, "loss.ppl_scale": True, "loss.learn_scale": False}

STUDIES = {
    # β-DPO paper, Table 1: each mechanism alone and both.
    "ablation": {
        "DPO": DPO,
        "DPO + dynamic β": {"loss.alpha": 0.6, "loss.filter_ratio": 0.0},
        "DPO + filtering": {"loss.alpha": 0.0, "loss.filter_ratio": 0.2},
        "β-DPO": BETA_DPO,
    },
    # β-DPO paper, Table 2: share of high-gap pairs in the training data.
    "mixture": {f"{name}, high-gap {r:.0%}": {**base, "data.high_gap_ratio": r}
                for r in (0.1, 0.2, 0.3, 0.4) for name, base in (("DPO", DPO), ("β-DPO", BETA_DPO))},
    # New: chosen/rejected swapped in a fraction of the training pairs.
    "noise": {f"{name}, flipped {r:.0%}": {**base, "data.flip_ratio": r}
              for r in (0.0, 0.2, 0.4) for name, base in (("DPO", DPO), ("β-DPO", BETA_DPO))},
    # One knob at a time around β-DPO's defaults (ρ = 0.2, α = 0.6, β₀ = 0.1).
    "sensitivity": {**{f"ρ = {r}": {**BETA_DPO, "loss.filter_ratio": r} for r in (0.1, 0.2, 0.3, 0.5)},
                    **{f"α = {a}": {**BETA_DPO, "loss.alpha": a} for a in (0.2, 1.0, 2.0)}},
    # The open questions of the learnable-scale extension (docs/ALGORITHM.md, step 5): β_i = β_batch · softplus(c)
    # · log PPL(x_i), c learned from several starts, against the same scale held fixed at each value.
    "scale": {**{f"learned, init {s}": {**LEARNED, "loss.beta_scale_init": s} for s in (0.1, 0.5, 1.0, 2.0)},
              **{f"fixed {s}": {**FIXED, "loss.beta_scale_init": s} for s in (0.1, 0.5, 1.0, 2.0)}},
}
# --smoke keeps the first and last variant of each study.
SMOKE_STUDIES = {name: dict([list(v.items())[0], list(v.items())[-1]]) for name, v in STUDIES.items()}

# Columns of the tables: (label, where, key); where = eval.json metrics or the training rows (mean of the last LAST).
EVAL_COLUMNS = [
    ("win vs chosen @t0", "eval", "win_rate_vs_chosen@t0"),
    ("win vs chosen @t1", "eval", "win_rate_vs_chosen@t1"),
    ("pref. accuracy", "eval", "pref_accuracy"),
    ("KL(π‖π_ref)", "eval", "kl_seq"),
]
SCALE_COLUMNS = [("softplus(c), last 30 steps", "train", "beta_scale"), ("mean β_i, last 30 steps", "train", "beta_mean")]
LAST = 30  # training columns average the last LAST steps: β_i moves with β_batch every step
COLUMNS = {name: EVAL_COLUMNS + (SCALE_COLUMNS if name == "scale" else []) for name in STUDIES}

# Run lengths: the full studies, and the CI smoke version (tiny model, a few steps).
FULL = {"seeds": 3, "sft": [], "train": [], "eval": []}
SMOKE = {
    "seeds": 1,
    "sft": ["--train.max_steps", "10", "--model.tiny_hidden_size", "32", "--model.tiny_layers", "1", "--data.num_sft", "640"],
    "train": ["--train.max_steps", "4", "--train.batch_size", "16", "--data.num_train", "64", "--data.eval_size", "16",
              "--train.eval_every", "0"],
    "eval": ["--data.eval_size", "16", "--eval.num_prompts", "4", "--eval.samples_per_prompt", "2"],
}


# ========================================================================================================
# STATISTICS
# ========================================================================================================
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def mean_ci(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% confidence interval) = (x̄, t_{0.975, n−1} · s / √n), s the unbiased std.
    One value has no interval (nan). Beyond 10 degrees of freedom the normal 1.96 is within 12% of t."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, T_975.get(n - 1, 1.96) * s / math.sqrt(n)


def fmt(mean: float, half: float) -> str:
    return f"{mean:.3f}" if math.isnan(half) else f"{mean:.3f} ± {half:.3f}"


# ========================================================================================================
# RUNS
# ========================================================================================================
def slug(overrides: dict) -> str:
    """A directory name from the overrides, e.g. loss.alpha=0.6,loss.filter_ratio=0.2 → alpha0.6_filter_ratio0.2.
    Data overrides equal to the default are left out, so "high-gap 30%" is the same run as the ablation's."""
    kept = {k: v for k, v in overrides.items() if DATA_DEFAULTS.get(k, object()) != v}
    return "_".join(f"{k.split('.')[-1]}{v}" for k, v in sorted(kept.items())) or "default"


def flags(overrides: dict) -> list[str]:
    return [str(x).lower() if isinstance(x, bool) else str(x) for k, v in overrides.items() for x in (f"--{k}", v)]


def run(cmd: list[str], log: Path):
    """One script run, output to a log; on failure, show its tail and stop."""
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with log.open("w") as f:
        code = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        sys.exit(f"experiments: `{' '.join(cmd)}` failed ({code}); its output: {log}\n" + log.read_text()[-3000:])


def sft(out: Path, lengths: dict) -> Path:
    final = out / "sft" / "final"
    if not (final / "config.json").exists():
        print("SFT warm-start ...", flush=True)
        (out / "sft").mkdir(parents=True, exist_ok=True)
        run([sys.executable, "sft.py", "--config", "configs/sort_sft.yaml", "--train.output_dir", str(out / "sft"),
             *lengths["sft"]], out / "sft" / "log.txt")
    return final


def sft_baseline(sft_final: Path, out: Path, lengths: dict) -> dict:
    """The SFT policy evaluated against itself (KL 0): the starting point every variant should beat."""
    result = out / "sft" / "eval" / "eval.json"
    if not result.exists():
        run([sys.executable, "eval.py", "--config", "configs/sort.yaml", "--eval.policy", str(sft_final),
             "--eval.reference", str(sft_final), "--eval.output_dir", str(result.parent), *lengths["eval"]], out / "sft" / "eval.log")
    return json.loads(result.read_text())["metrics"]


def train_and_eval(run_dir: Path, overrides: dict, seed: int, sft_final: Path, lengths: dict) -> float:
    """betadpo.py then eval.py for one variant and seed; → seconds taken (0 if it was already done)."""
    if (run_dir / "eval" / "eval.json").exists():
        return 0.0
    t0 = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "betadpo.py", "--config", "configs/sort.yaml", "--model.name_or_path", str(sft_final),
         "--train.seed", str(seed), "--train.output_dir", str(run_dir), *flags(overrides), *lengths["train"]],
        run_dir / "train.log")
    run([sys.executable, "eval.py", "--config", "configs/sort.yaml", "--eval.policy", str(run_dir / "final"),
         "--eval.reference", str(sft_final), "--eval.output_dir", str(run_dir / "eval"), *lengths["eval"]],
        run_dir / "eval.log")
    return time.perf_counter() - t0


def read_run(run_dir: Path) -> dict:
    """{"eval": eval.json metrics, "train": [metrics.jsonl training rows]}."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    return {"eval": json.loads((run_dir / "eval" / "eval.json").read_text())["metrics"],
            "train": [r for r in rows if r.get("split") != "eval"]}


# ========================================================================================================
# REPORT: table.md and figure.png per study
# ========================================================================================================
def column_values(runs: list[dict], where: str, key: str) -> list[float]:
    if where == "eval":
        return [r["eval"][key] for r in runs]
    return [sum(row[key] for row in r["train"][-LAST:]) / len(r["train"][-LAST:]) for r in runs]


def table(study: str, results: dict, start: dict) -> str:
    """Markdown: one row per variant, mean ± 95% CI over seeds for each column; first the SFT start's row."""
    cols = COLUMNS[study]
    lines = ["| variant | seeds | " + " | ".join(c[0] for c in cols) + " |", "|---" * (len(cols) + 2) + "|"]
    lines.append("| *SFT start (π_ref)* | – | " + " | ".join(f"{start[key]:.3f}" if where == "eval" else "–" for _, where, key in cols) + " |")
    for name, runs in results.items():
        cells = [fmt(*mean_ci(column_values(runs, where, key))) for _, where, key in cols]
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def seed_means(runs: list[dict]) -> list[dict]:
    """The training rows of several seeds of one variant, averaged step by step (the curves of the figure)."""
    keys = ("beta", "M0", "sigma", "kept", "pairs", "beta_scale")
    return [{"step": rows[0]["step"], **{k: sum(r[k] for r in rows) / len(rows) for k in keys}}
            for rows in zip(*(run["train"] for run in runs), strict=True)]


def figure(study: str, results: dict, path: Path):
    """Top row: β_batch, M₀ ± σ, kept fraction, β-scale over training (seed means). Bottom: final metrics."""
    curves = {name: seed_means(runs) for name, runs in results.items()}
    bars = [(label, [mean_ci(column_values(runs, where, key)) for runs in results.values()])
            for label, where, key in COLUMNS[study]]
    plots.plot_study(study, curves, bars, path)


# ========================================================================================================
# main
# ========================================================================================================
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("studies", nargs="+", choices=["all", *STUDIES], help="which studies to run")
    parser.add_argument("--out", default="runs/experiments", help="runs, tables and figures go here")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per variant (default 3; --smoke: 1)")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, a few steps, two variants per study, one seed")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    lengths = SMOKE if args.smoke else FULL
    studies = SMOKE_STUDIES if args.smoke else STUDIES
    names = list(STUDIES) if "all" in args.studies else list(dict.fromkeys(args.studies))
    seeds = range(args.seeds or lengths["seeds"])
    out = (REPO / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)

    sft_final = sft(out, lengths)
    start = sft_baseline(sft_final, out, lengths)
    # Every (run directory, overrides, seed) once, even where studies share it.
    todo = {}
    for study in names:
        for overrides in studies[study].values():
            for seed in seeds:
                todo[out / "runs" / slug(overrides) / f"seed{seed}"] = (overrides, seed)
    t0, done = time.perf_counter(), 0

    def one(item):
        run_dir, (overrides, seed) = item
        return run_dir, train_and_eval(run_dir, overrides, seed, sft_final, lengths)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(one, item) for item in todo.items()]
        for future in as_completed(futures):
            if future.exception() is not None:  # a run failed: start no more, report it
                for f in futures:
                    f.cancel()
            run_dir, seconds = future.result()
            done += 1
            status = f"{seconds:.0f} s" if seconds else "done earlier"
            print(f"[{done}/{len(todo)}] {run_dir.relative_to(out)}: {status} ({(time.perf_counter() - t0) / 60:.1f} min)", flush=True)
    for study in names:
        results = {name: [read_run(out / "runs" / slug(o) / f"seed{s}") for s in seeds] for name, o in studies[study].items()}
        (out / study).mkdir(parents=True, exist_ok=True)
        (out / study / "table.md").write_text(table(study, results, start))
        figure(study, results, out / study / "figure.png")
        print(f"\n## {study}\n\n{table(study, results, start)}figure: {out / study / 'figure.png'}")


if __name__ == "__main__":
    main()
