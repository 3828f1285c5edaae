"""Pictures and tables of finished runs: training curves from metrics.jsonl, evaluations side by side.

It reads what betadpo.py (metrics.jsonl) and eval.py (eval.json) wrote, and trains or evaluates nothing.
Two callers: eval.py's `--plot` and `--compare` flags,

    python eval.py --plot runs/sort_dpo runs/sort_betadpo --plot_out runs/curves.png
    python eval.py --compare runs/eval/sort_sft runs/eval/sort_dpo runs/eval/sort_betadpo

and experiments/run.py, which draws one figure per study (`plot_study`) from the same curve panels.
"""

import argparse
import json
import math
from pathlib import Path

from plumbing.errors import UserError
from plumbing.metrics import read_metrics

# ========================================================================================================
# TRAINING CURVES: one panel per quantity of the algorithm (docs/ALGORITHM.md)
# ========================================================================================================
TITLES = {
    "loss": "loss (dashed: held-out)",
    "beta": "β_batch",
    "M0": "M₀ ± σ (running margin statistics)",
    "kept": "kept fraction (kept / pairs)",
    "acc": "reward accuracy (dashed: held-out)",
    "scale": "β-scale softplus(c)",
}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, works on a headless machine
    import matplotlib.pyplot as plt

    return plt


def draw_curves(ax: dict, train: list[dict], held_out: list[dict], color: str, label: str):
    """One run's curves on the panels in `ax` (panel name from TITLES → matplotlib Axes; any subset).

    train, held_out: metrics.jsonl rows (or rows of seed means), each with "step". A row without a panel's
    key adds nothing to it, so SFT rows or older files plot what they have.
    """
    def curve(panel, rows, key, **style):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if panel in ax and points:
            ax[panel].plot(*zip(*points), color=color, **style)

    kept = [{"step": r["step"], "fraction": r["kept"] / r["pairs"]} for r in train if "kept" in r and r.get("pairs")]
    curve("loss", train, "loss", label=label)
    curve("loss", held_out, "loss", ls="--", marker="o", ms=3)
    curve("beta", train, "beta", label=label)
    curve("kept", kept, "fraction")
    curve("acc", train, "rewards/accuracies")
    curve("acc", held_out, "rewards/accuracies", ls="--", marker="o", ms=3)
    curve("scale", train, "beta_scale")
    stats = [(r["step"], r["M0"], r["sigma"]) for r in train if "M0" in r and "sigma" in r]
    if "M0" in ax and stats:
        steps, m0, sigma = zip(*stats)
        ax["M0"].plot(steps, m0, color=color)
        ax["M0"].fill_between(steps, [m - s for m, s in zip(m0, sigma)], [m + s for m, s in zip(m0, sigma)],
                              color=color, alpha=0.15, lw=0)


def save(plt, fig, out: Path, dpi: int) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)  # pyplot keeps every open figure alive otherwise
    return out


def label_panels(ax: dict):
    for name, a in ax.items():
        a.set_title(TITLES[name])
        a.set_xlabel("optimizer step")
        a.grid(alpha=0.3)


def load_run(run_dir) -> list[dict]:
    """The rows of RUN_DIR/metrics.jsonl; a missing or empty file is the user's mistake."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"'{path}' does not exist (pass training output directories)")
    rows = read_metrics(path)
    if not rows:
        raise UserError(f"'{path}' is empty")
    return rows


def plot_runs(run_dirs: list[str], out: Path) -> Path:
    """Training curves of each run, overlaid (one colour per run, legend = run directory name); held-out dashed."""
    runs = [load_run(d) for d in run_dirs]
    names = [Path(d).name for d in run_dirs]
    names = names if len(set(names)) == len(names) else [str(d) for d in run_dirs]
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    ax = dict(zip(("loss", "beta", "M0", "kept", "acc", "scale"), axes.flat))
    for i, (rows, name) in enumerate(zip(runs, names)):
        train = [r for r in rows if r.get("split") != "eval"]
        held_out = [r for r in rows if r.get("split") == "eval"]
        draw_curves(ax, train, held_out, f"C{i % 10}", name)
    label_panels(ax)
    ax["loss"].legend()
    return save(plt, fig, out, dpi=110)


def plot_study(title: str, curves: dict, bars: list, out: Path) -> Path:
    """One figure for a study of experiments/run.py.

    curves: variant name → training rows (seed means), drawn as β_batch, M₀ ± σ, kept fraction and β-scale,
    with the legend beside them. bars: [(title, [(mean, 95% half-width or nan) per variant])], one bar chart
    each in the bottom row, variants numbered in the order of `curves`.
    """
    ncols = max(5, len(bars))  # 4 curve panels + the legend on top; one bar chart per entry below
    plt = pyplot()
    fig, axes = plt.subplots(2, ncols, figsize=(4 * ncols, 7.5), constrained_layout=True)
    ax = dict(zip(("beta", "M0", "kept", "scale"), axes[0]))
    for i, (name, rows) in enumerate(curves.items()):
        draw_curves(ax, rows, [], f"C{i % 10}", name)
    label_panels(ax)
    for a in axes[0][4:]:
        a.axis("off")
    axes[0][4].legend(*ax["beta"].get_legend_handles_labels(), loc="upper left", title="variant (bars 0, 1, … in this order)")
    for a, (label, values) in zip(axes[1], bars):
        for i, (mean, half) in enumerate(values):
            a.bar(i, mean, color=f"C{i % 10}", yerr=None if math.isnan(half) else half, capsize=4)
        a.set_title(label + " (95% CI)")
        a.set_xticks(range(len(values)), [str(i) for i in range(len(values))])
        a.grid(alpha=0.3, axis="y")
    for a in axes[1][len(bars):]:
        a.axis("off")
    fig.suptitle(f"study: {title}")
    return save(plt, fig, out, dpi=90)


def plot_frontier(points: dict, win_curves: dict, gold_curves: dict, out: Path) -> Path:
    """experiments/run.py's frontier figure: every run on the (KL, win @t1) and (KL, gold @t1) planes.

    points: label → [(KL, win, gold) per run]; "DPO (frontier runs)" is drawn grey, every other label as its runs
    (small) and their mean (large, numbered, listed in the legend). *_curves: name → ((c₀, c₁, c₂), (ln KL lo, hi)),
    DPO's quadratic fits in ln KL, drawn over the range they were fitted on.
    """
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(19, 6.5), gridspec_kw={"width_ratios": [1, 1, 0.75]}, constrained_layout=True)
    markers = "osD^v<>Ph*X"
    handles = []
    for a, curves, column, title in ((axes[0], win_curves, 1, "win rate vs chosen @t1"), (axes[1], gold_curves, 2, "gold reward @t1")):
        for i, (name, (coef, (lo, hi))) in enumerate(curves.items()):
            xs = [lo + (hi - lo) * k / 100 for k in range(101)]
            a.plot([math.exp(x) for x in xs], [coef[0] + coef[1] * x + coef[2] * x * x for x in xs], color="0.3", ls=("-", "--", ":")[i % 3], label=name)
        k = 0
        for label, pts in points.items():
            kl, y = [p[0] for p in pts], [p[column] for p in pts]
            if label == "DPO (frontier runs)":
                a.scatter(kl, y, s=14, color="0.6", label=label, zorder=2)
                continue
            color, marker = plt.cm.tab20(k % 20), markers[k % len(markers)]
            a.scatter(kl, y, s=10, color=color, marker=marker, alpha=0.5, zorder=3)
            a.scatter([sum(kl) / len(kl)], [sum(y) / len(y)], s=90, color=color, marker=marker, edgecolor="k", zorder=4,
                      label=f"{k}: {label}")
            a.annotate(str(k), (sum(kl) / len(kl), sum(y) / len(y)), fontsize=7, xytext=(5, 4), textcoords="offset points")
            k += 1
        a.set_xscale("log")
        a.set_xlabel("KL(π‖π_ref), nats (log scale)")
        a.set_title(title)
        a.grid(alpha=0.3, which="both")
        handles = a.get_legend_handles_labels()
    axes[2].axis("off")
    axes[2].legend(*handles, loc="upper left", fontsize=8, title="large markers: variant means (small: runs)")
    fig.suptitle("β-DPO variants against plain DPO's KL frontier (built-in task)")
    return save(plt, fig, out, dpi=90)


def plot_main(argv: list[str]):
    """`eval.py --plot RUN_DIR [RUN_DIR ...] [--plot_out PNG]`."""
    parser = argparse.ArgumentParser(prog="eval.py --plot", description="Training curves of one or more runs → one PNG.")
    parser.add_argument("--plot", nargs="+", required=True, metavar="RUN_DIR", help="training output directories (metrics.jsonl)")
    parser.add_argument("--plot_out", default=None, help="PNG to write (default: FIRST_RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    out = Path(args.plot_out or Path(args.plot[0]) / "curves.png")
    print(f"curves: {plot_runs(args.plot, out)}")


# ========================================================================================================
# EVALUATIONS SIDE BY SIDE (--compare)
# ========================================================================================================
def compare_table(eval_dirs: list[str]) -> str:
    """Several eval.json side by side: one row per metric (standard errors dropped), one column per directory."""
    if not eval_dirs:
        raise UserError("--compare: pass one or more eval.output_dir directories")
    reports = []
    for d in eval_dirs:
        path = Path(d) / "eval.json"
        if not path.is_file():
            raise UserError(f"--compare: '{path}' does not exist (pass eval.output_dir directories)")
        reports.append(json.loads(path.read_text())["metrics"])
    names = [n for n in reports[0] if not n.endswith("_se") and all(n in r for r in reports)]
    width = max(12, *(len(Path(d).name) + 2 for d in eval_dirs))
    lines = [f"{'':<26}" + "".join(f"{Path(d).name:>{width}}" for d in eval_dirs)]
    lines += [f"{n:<26}" + "".join(f"{r[n]:>{width}.4f}" for r in reports) for n in names]
    return "\n".join(lines)
