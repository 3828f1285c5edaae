"""The real-data study's CSV rows (from the run directories) and its tables (from the CSV alone): the
preregistered endpoint and the secondary analyses of docs/RESULTS.md.

Definitions (fixed before any run; docs/RESULTS.md, "Real preferences: preregistered"):
  accuracy        held-out pairs with Δ_w > Δ_l (strict), Δ = log π(y|x) − log π_ref(y|x) summed over response
                  tokens; on UF only pairs with score_chosen > score_rejected (ties have no right answer)
  strata          d = |y_w| − |y_l| in tokens: chosen shorter (d < −LEN_TOL), similar (|d| ≤ LEN_TOL), longer (d > LEN_TOL)
  balanced acc.   the mean of the three strata's accuracies: the length control (a length-only rule scores ≈ 0.5)
  length baseline "the longer response is chosen" (ties wrong), on the same pairs
  KL              mean over the KL pairs' chosen and rejected responses of Σ_t KL(π‖π_ref) at each response position
  frontier        per data set, each DPO β₀'s mean (KL, accuracy) over the seeds; E(k) = max{acc_b : KL_b ≤ k}, the
                  best DPO at a KL no higher than k (an envelope; undefined below the lowest DPO KL)
  endpoint        Δ = acc(variant) − E(KL(variant)), means over seeds; 95% interval: 2,000 paired bootstrap draws of the
                  seeds (the same resampled seeds for every variant: a seed fixes the batch order all variants share),
                  frontier recomputed in each draw; MDE = 2.8 × the bootstrap SD (80% power, two-sided 5%)
  verdict         CI within ±MARGIN: equivalent; CI above 0: better; below 0: worse; else inconclusive
"""

import json
import math
import random
from pathlib import Path

import yaml

import stats  # the statistics shared with experiments/run.py (experiments/stats.py)

LEN_TOL = 4  # tokens
MARGIN = 0.02  # equivalence margin in accuracy (2 points)
N_BOOT = 2000
STRATA = ("shorter", "similar", "longer")


# ---- per-run numbers ----------------------------------------------------------------------------------------------
def stratum(d: int) -> str:
    return "shorter" if d < -LEN_TOL else "longer" if d > LEN_TOL else "similar"


def heldout_numbers(scored: list[dict], rows: list[dict]) -> dict:
    """One run's held-out numbers from its heldout.jsonl and the held-out data rows (for UF's scores)."""
    use = [s for s, r in zip(scored, rows) if r.get("score_chosen", 1) > r.get("score_rejected", 0)]
    right = [(s["policy_chosen"] - s["ref_chosen"]) > (s["policy_rejected"] - s["ref_rejected"]) for s in use]
    longer = [s["len_chosen"] > s["len_rejected"] for s in use]
    strata = [stratum(s["len_chosen"] - s["len_rejected"]) for s in use]
    out = {"pairs": len(use), "accuracy": sum(right) / len(use), "length_baseline": sum(longer) / len(use),
           "reward_margin": sum((s["policy_chosen"] - s["ref_chosen"]) - (s["policy_rejected"] - s["ref_rejected"]) for s in use) / len(use)}
    for name in STRATA:
        hits = [h for h, st in zip(right, strata) if st == name]
        out[f"n_{name}"] = len(hits)
        out[f"acc_{name}"] = sum(hits) / len(hits) if hits else math.nan
    present = [out[f"acc_{n}"] for n in STRATA if out[f"n_{n}"]]
    out["balanced_accuracy"] = sum(present) / len(present)
    kls = [s[k] for s in scored for k in ("kl_chosen", "kl_rejected") if k in s]
    out["kl"], out["kl_se"] = stats.mean_std(kls)[0], stats.mean_std(kls)[1] / math.sqrt(len(kls)) if len(kls) > 1 else math.nan
    return out


def kept_gap(run: Path, train_rows: list[dict]) -> dict:
    """UF: do the kept pairs follow the true score gap? Correlation of the kept indicator with score_chosen −
    score_rejected over every (calibration batch, pair) the filter acted on, and mean gap kept − dropped."""
    path = run / "kept.jsonl"
    if not path.exists() or "score_chosen" not in train_rows[0]:
        return {}
    last = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        last[r["step"], r["micro"]] = r  # a resumed run wrote some steps twice: the last one counts
    xs, ys = [], []
    for r in last.values():
        if sum(r["kept"]) < len(r["kept"]):  # the filter dropped something in this batch
            for i, k in zip(r["pairs"], r["kept"]):
                xs.append(float(k))
                ys.append(train_rows[i]["score_chosen"] - train_rows[i]["score_rejected"])
    if len(set(xs)) < 2 or len(set(ys)) < 2:
        return {}
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    corr = cov / math.sqrt(sum((x - mx) ** 2 for x in xs) * sum((y - my) ** 2 for y in ys))
    kept = [y for x, y in zip(xs, ys) if x]
    dropped = [y for x, y in zip(xs, ys) if not x]
    return {"kept_gap_corr": corr, "kept_minus_dropped_gap": sum(kept) / len(kept) - sum(dropped) / len(dropped)}


def csv_rows(out: Path, todo: list, data: dict, run_dir) -> list[dict]:
    """One row per (data set, variant, seed) of the finished runs."""
    rows = []
    for dataset, name, items, seed in todo:
        d = run_dir(out, dataset, dict(items), seed)
        scored = [json.loads(line) for line in (d / "heldout.jsonl").read_text().splitlines()]
        saved = yaml.safe_load((d / "config.yaml").read_text())
        train = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in train if r.get("split") != "eval"]
        rows.append({"dataset": dataset, "variant": name, "run": d.parent.name, "seed": seed, "commit": (d / "commit.txt").read_text().strip(),
                     "beta0": saved["loss"]["beta"], "alpha": saved["loss"]["alpha"], "rho": saved["loss"]["filter_ratio"],
                     **heldout_numbers(scored, data[dataset]["heldout"]),
                     "beta_mean_train": sum(r["beta"] for r in train) / len(train),
                     "kept_rate": sum(r["kept"] for r in train) / sum(r["pairs"] for r in train),
                     "beta_scale_first": train[0]["beta_scale"], "beta_scale_last": train[-1]["beta_scale"], "steps": train[-1]["step"],
                     **kept_gap(d, data[dataset]["train"])})
    return rows


# ---- the frontier and the endpoint --------------------------------------------------------------------------------
def is_frontier(row: dict) -> bool:
    return row["variant"].startswith("DPO β₀")


def envelope(points: list[tuple[float, float]], kl: float) -> float:
    """E(k) = max{acc_b : KL_b ≤ k} over the DPO points (KL_b, acc_b); nan if none lies at or below k."""
    below = [a for k, a in points if k <= kl]
    return max(below) if below else math.nan


def means(rows: list[dict], seeds: list[int], key: str) -> float:
    by_seed = {r["seed"]: r[key] for r in rows}
    return sum(by_seed[s] for s in seeds) / len(seeds)


def endpoint(rows: list[dict], dataset: str, variant: str, metric: str = "accuracy", seed: int = 0) -> dict:
    """Δ = metric(variant) − E(KL(variant)) with its paired seed-bootstrap interval (module docstring)."""
    mine = [r for r in rows if r["dataset"] == dataset]
    groups = {}
    for r in mine:
        groups.setdefault(r["variant"], []).append(r)
    dpo = {v: g for v, g in groups.items() if is_frontier(g[0])}
    seeds = sorted({r["seed"] for r in groups[variant]})

    def delta(draw):
        points = [(means(g, draw, "kl"), means(g, draw, metric)) for g in dpo.values()]
        return means(groups[variant], draw, metric) - envelope(points, means(groups[variant], draw, "kl"))

    rng = random.Random(f"endpoint-{dataset}-{variant}-{metric}-{seed}")
    draws = [delta([rng.choice(seeds) for _ in seeds]) for _ in range(N_BOOT)]
    finite = sorted(d for d in draws if not math.isnan(d))
    est = delta(seeds)
    if len(finite) < 0.95 * N_BOOT:  # the variant's KL is below the frontier's range too often to say
        return {"delta": est, "lo": math.nan, "hi": math.nan, "sd": math.nan, "defined": len(finite) / N_BOOT, "n": len(seeds)}
    lo, hi = finite[int(0.025 * len(finite))], finite[int(0.975 * len(finite)) - 1]
    mean = sum(finite) / len(finite)
    sd = math.sqrt(sum((d - mean) ** 2 for d in finite) / max(len(finite) - 1, 1))
    return {"delta": est, "lo": lo, "hi": hi, "sd": sd, "defined": len(finite) / N_BOOT, "n": len(seeds)}


def verdict(e: dict) -> str:
    if math.isnan(e["lo"]):
        return f"undefined (KL below the frontier in {1 - e['defined']:.0%} of draws)"
    if -MARGIN <= e["lo"] and e["hi"] <= MARGIN:
        return "equivalent"
    return "better" if e["lo"] > 0 else "worse" if e["hi"] < 0 else "inconclusive"


# ---- tables -------------------------------------------------------------------------------------------------------
def by_variant(rows, dataset):
    out = {}
    for r in rows:
        if r["dataset"] == dataset:
            out.setdefault(r["variant"], []).append(r)
    return {k: sorted(v, key=lambda r: r["seed"]) for k, v in out.items()}


def variant_table(rows, dataset) -> str:
    lines = ["| variant | seeds | KL(π‖π_ref) | accuracy | balanced acc. | acc. shorter / similar / longer | β mean | kept |",
             "|---" * 8 + "|"]
    for name, runs in by_variant(rows, dataset).items():
        cells = [stats.fmt(*stats.mean_ci([r[k] for r in runs])) for k in ("kl", "accuracy", "balanced_accuracy")]
        strata = " / ".join(f"{stats.mean_ci([r[f'acc_{s}'] for r in runs])[0]:.3f}" for s in STRATA)
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + f" | {strata} | {stats.mean_ci([r['beta_mean_train'] for r in runs])[0]:.3f} "
                     f"| {stats.mean_ci([r['kept_rate'] for r in runs])[0]:.0%} |")
    r0 = next(r for r in rows if r["dataset"] == dataset)
    lines.append(f"\nHeld-out pairs: {int(r0['pairs'])} (chosen shorter / similar / longer: {int(r0['n_shorter'])} / {int(r0['n_similar'])} / "
                 f"{int(r0['n_longer'])}); length-only baseline (the longer response wins): {r0['length_baseline']:.3f}.\n")
    return "\n".join(lines) + "\n"


def endpoint_table(rows, dataset) -> str:
    lines = ["| variant | seeds | metric | Δ vs DPO envelope | 95% CI (seed bootstrap) | MDE (80%) | verdict (margin ±0.02) |", "|---" * 7 + "|"]
    for name, runs in by_variant(rows, dataset).items():
        if is_frontier(runs[0]) or len(runs) < 2 or not any(is_frontier(r) for r in rows if r["dataset"] == dataset):
            continue  # (one seed, e.g. a grid cell: no interval to give)
        for metric in ("accuracy", "balanced_accuracy"):
            e = endpoint(rows, dataset, name, metric)
            lines.append(f"| {name} | {e['n']} | {metric.replace('_', ' ')} | {e['delta']:+.3f} | [{e['lo']:+.3f}, {e['hi']:+.3f}] "
                         f"| {2.8 * e['sd']:.3f} | {verdict(e)} |")
    return "\n".join(lines) + "\n"


def paired_table(rows, dataset, base: str = "β-DPO") -> str:
    variants = by_variant(rows, dataset)
    if base not in variants:
        return ""
    lines = ["| comparison | seeds | Δ KL | Δ accuracy | p | Δ balanced acc. | p |", "|---" * 7 + "|"]
    for name, runs in variants.items():
        if name == base or is_frontier(runs[0]) or len(runs) < 2:
            continue
        base_runs = {r["seed"]: r for r in variants[base]}
        pairs = [(r, base_runs[r["seed"]]) for r in runs if r["seed"] in base_runs]
        cells = []
        for key in ("kl", "accuracy", "balanced_accuracy"):
            m, h, p = stats.t_test([a[key] - b[key] for a, b in pairs])
            cells += [stats.fmt(m, h)] + ([stats.fmt_p(p)] if key != "kl" else [])
        lines.append(f"| {name} − {base} | {len(pairs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def grid_table(rows, dataset) -> str:
    grid = {(r["rho"], r["alpha"]): r for r in rows if r["dataset"] == dataset and r["variant"].startswith("β-DPO ρ")}
    if not grid:
        return ""
    alphas, rhos = sorted({a for _, a in grid}), sorted({r for r, _ in grid})
    lines = ["| ρ \\ α | " + " | ".join(f"{a:g}" for a in alphas) + " |", "|---" * (len(alphas) + 1) + "|"]
    for rho in rhos:
        cells = [f"{grid[rho, a]['accuracy']:.3f} (KL {grid[rho, a]['kl']:.2f})" if (rho, a) in grid else "–" for a in alphas]
        lines.append(f"| {rho:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def kept_gap_table(rows, dataset) -> str:
    variants = {n: v for n, v in by_variant(rows, dataset).items() if any(not math.isnan(r.get("kept_gap_corr", math.nan)) for r in v)}
    if not variants:
        return ""
    lines = ["| variant | seeds | corr(kept, score gap) | mean gap kept − dropped |", "|---" * 4 + "|"]
    for name, runs in variants.items():
        lines.append(f"| {name} | {len(runs)} | {stats.fmt(*stats.mean_ci([r['kept_gap_corr'] for r in runs]))} "
                     f"| {stats.fmt(*stats.mean_ci([r['kept_minus_dropped_gap'] for r in runs]))} |")
    return "\n".join(lines) + "\n"


def report(rows: list[dict]) -> str:
    """tables.md of the real-data study, from its CSV's rows alone."""
    parts = []
    for dataset, title in (("hh", "Anthropic HH (harmless-base)"), ("uf", "UltraFeedback")):
        if not any(r["dataset"] == dataset for r in rows):
            continue
        parts += [f"## {title}: every variant\n\n", variant_table(rows, dataset),
                  f"\n## {title}: the endpoint (variant − best DPO at the same KL)\n\n", endpoint_table(rows, dataset)]
        for heading, table in ((f"{title}: paired differences from β-DPO (same seed)", paired_table(rows, dataset)),
                               (f"{title}: sensitivity grid (seed 0), accuracy (KL)", grid_table(rows, dataset)),
                               (f"{title}: does the filter keep the pairs with the larger true score gap?", kept_gap_table(rows, dataset))):
            if table:
                parts += [f"\n## {heading}\n\n", table]
        parts.append("\n")
    return "".join(parts)
