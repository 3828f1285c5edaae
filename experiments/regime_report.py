"""The regime study's CSV rows (from the run directories) and its tables (from the CSV alone): the regime gate, the
preregistered endpoint and the secondary analyses of docs/RESULTS.md ("Regime: where β can act").

Definitions (fixed before the full run; docs/RESULTS.md, "Regime: preregistered"):
  Δ(y)          log π(y|x) − log π_ref(y|x), summed over response tokens; M = Δ(y_w) − Δ(y_l) (no β)
  accuracy      held-out pairs with M > 0 (strict)
  norm. acc.    pairs with Δ(y_w)/|y_w| > Δ(y_l)/|y_l| (per-token rewards: a longer response gains no sum from length)
  heuristics    "longer wins": |y_w| > |y_l|; "shorter wins": |y_w| < |y_l| (equal lengths count as wrong for both)
  |β·M|         the median over held-out pairs of |β₀·M| (β₀ of the run, not β-DPO's moving β)
  KL            mean over the KL pairs' chosen and rejected responses of Σ_t KL(π‖π_ref) over response positions
  path          the run at each path point (steps): KL and accuracies there; the points before the last score the
                first PATH_PAIRS held-out pairs (experiments/regime.py), the last all of them
  envelope      E(k): each DPO arm's path (its seeds' mean KL and accuracy at each point, joined by straight lines in
                KL) read at KL k; the highest of the arms whose path spans k; undefined where none does. Paths of
                one point (the study as run): one line through the DPO arms' points, in order of KL
  endpoint      Δ = acc(β-DPO at its last point) − E(its KL). Intervals: (1) a hierarchical bootstrap, 2,000 draws,
                each resampling seeds (one draw u₁..u_n of the n seeds of the arm compared; an arm with m seeds
                takes seed u mod m, so equal seeds stay paired) and then held-out pairs (one multinomial draw for all
                runs: the same pairs); KL is not resampled over pairs; (2) a Student t interval over seeds of the
                per-seed Δ_s = acc_s − E_s(KL_s), E_s from the DPO runs of seed s (an arm with m seeds: s mod m)
  MDE           2.8 × the bootstrap SD (80% power, two-sided 5%)
"""

import json
import math
import random
from pathlib import Path

import yaml

import stats  # the statistics shared with experiments/run.py (experiments/stats.py)

N_BOOT = 2000
ENDPOINTS = ("acc", "nacc")  # co-primary: accuracy and length-normalised accuracy
NAMES = {"acc": "accuracy", "nacc": "length-normalised accuracy"}


# ---- per-pair bits in the CSV: one hex string per (run, point, endpoint) ------------------------------------------
def pack(bits: list[bool]) -> str:
    """[True, False, ...] → hex, 4 pairs a digit, first pair in the highest bit of the first digit."""
    bits = list(bits) + [False] * (-len(bits) % 4)
    return "".join(f"{8 * a + 4 * b + 2 * c + d:x}" for a, b, c, d in zip(*[iter(bits)] * 4))


def unpack(text: str, n: int) -> list[bool]:
    return [bool(int(ch, 16) >> (3 - k) & 1) for ch in text for k in range(4)][:n]


def point_numbers(scored: list[dict], beta0: float) -> dict:
    """One path point's numbers from its scored held-out pairs (real.score_heldout's rows)."""
    dw = [s["policy_chosen"] - s["ref_chosen"] for s in scored]
    dl = [s["policy_rejected"] - s["ref_rejected"] for s in scored]
    right = [a > b for a, b in zip(dw, dl)]
    nright = [a / s["len_chosen"] > b / s["len_rejected"] for a, b, s in zip(dw, dl, scored)]
    bm = sorted(abs(beta0 * (a - b)) for a, b in zip(dw, dl))
    kls = [s[k] for s in scored for k in ("kl_chosen", "kl_rejected") if k in s]
    n = len(scored)
    return {"n": n, "acc": sum(right) / n, "nacc": sum(nright) / n, "margin": sum(a - b for a, b in zip(dw, dl)) / n,
            "abs_bm": (bm[(n - 1) // 2] + bm[n // 2]) / 2, "kl": sum(kls) / len(kls), "bits_acc": pack(right), "bits_nacc": pack(nright)}


def filter_record(run: Path, flipped: set) -> dict:
    """Over every (step, pair) the filter decided: flipped pairs dropped / kept, clean pairs dropped / kept."""
    path = run / "kept.jsonl"
    last = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        r = json.loads(line)
        last[r["step"], r["micro"]] = r  # a resumed run wrote some steps twice: the last one counts
    counts = {"flip_dropped": 0, "flip_kept": 0, "clean_dropped": 0, "clean_kept": 0}
    for r in last.values():
        for i, k in zip(r["pairs"], r["kept"]):
            counts[f"{'flip' if i in flipped else 'clean'}_{'kept' if k else 'dropped'}"] += 1
    return counts


def csv_rows(out: Path, todo: list, data: dict, run_dir, setup: dict) -> list[dict]:
    """One row per (arm, seed): its settings, training summaries, and per path point its held-out numbers."""
    rows = []
    flipped = set(data["flipped"])
    for name, seed in todo:
        d = run_dir(out, name, seed)
        saved = yaml.safe_load((d / "config.yaml").read_text())
        train = [r for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if r.get("split") != "eval"]
        is_flip = saved["data"]["dataset"].endswith("train_flipped.jsonl")
        row = {"dataset": "hh", "arm": name, "seed": seed, "optimizer": saved["train"]["optimizer"],
               "flip": len(flipped) / len(data["train"]) if is_flip else 0.0, "commit": (d / "commit.txt").read_text().strip(),
               "beta0": saved["loss"]["beta"], "alpha": saved["loss"]["alpha"], "rho": saved["loss"]["filter_ratio"],
               "filter": saved["loss"]["filter"], "lr": saved["train"]["lr"], "steps": train[-1]["step"],
               "pilot": int((d / "pilot.txt").exists()),  # trained by the pilot (regime.adopt_pilot_runs)
               "beta_mean_train": sum(r["beta"] for r in train) / len(train),
               "kept_rate": sum(r["kept"] for r in train) / sum(r["pairs"] for r in train),
               **(filter_record(d, flipped) if is_flip else {})}
        path = [json.loads(line) for line in (d / "path.jsonl").read_text().splitlines()]
        last = path[-1]["pairs"]  # the held-out pairs scored at the last point: the length heuristics on the same pairs
        row.update(pairs=len(last), longer_wins=sum(s["len_chosen"] > s["len_rejected"] for s in last) / len(last),
                   shorter_wins=sum(s["len_chosen"] < s["len_rejected"] for s in last) / len(last))
        for i, point in enumerate(path, 1):
            row[f"step_{i}"] = point["step"]
            row.update({f"{k}_{i}": v for k, v in point_numbers(point["pairs"], row["beta0"]).items()})
        rows.append(row)
    return rows


# ---- the envelope and the endpoint --------------------------------------------------------------------------------
def points(row: dict) -> list[int]:
    return sorted(int(k.split("_")[1]) for k in row if k.startswith("step_"))


def is_frontier(row: dict) -> bool:
    return row["arm"].startswith("DPO β₀") and row["optimizer"] == "adamw" and not row["flip"]


def curve_at(curve: list[tuple[float, float]], kl: float) -> float:
    """A path's accuracy at KL `kl`, on straight lines between its points (sorted by KL); nan outside its range."""
    curve = sorted(curve)
    for (k0, a0), (k1, a1) in zip(curve, curve[1:]):
        if k0 <= kl <= k1:
            return a0 if k1 == k0 else a0 + (a1 - a0) * (kl - k0) / (k1 - k0)
    return curve[0][1] if len(curve) == 1 and curve[0][0] == kl else math.nan


def envelope(curves: list[list[tuple[float, float]]], kl: float) -> float:
    values = [v for v in (curve_at(c, kl) for c in curves) if not math.isnan(v)]
    return max(values) if values else math.nan


def run_points(rows: list[dict]) -> list[tuple]:
    """Every (arm, seed, point) of the rows, in row order."""
    return [(r["arm"], r["seed"], p) for r in rows for p in points(r)]


def pair_matrix(rows: list[dict], key: str):
    """(runs × points, pairs) 0/1 matrices, row order of run_points: the per-pair outcomes `key` (acc, nacc), zero
    beyond a point's scored pairs, and which pairs each point scored (the first n_p)."""
    import numpy as np

    n = max(int(r["pairs"]) for r in rows)
    scored = [int(r[f"n_{p}"]) for r in rows for p in points(r)]
    bits = np.array([unpack(r[f"bits_{key}_{p}"], int(r[f"n_{p}"])) + [False] * (n - int(r[f"n_{p}"])) for r in rows for p in points(r)],
                    dtype=np.float64)
    return bits, (np.arange(n)[None, :] < np.array(scored)[:, None]).astype(np.float64)


def arm_curve(runs: list[dict], key: str, acc: dict | None = None) -> list[tuple[float, float]]:
    """An arm's mean path over `runs` (one per seed drawn; repeats allowed): [(KL, accuracy) per point]. acc: the
    accuracies of a bootstrap draw of pairs, by (arm, seed, point); None: the CSV's."""
    out = []
    for p in points(runs[0]):
        kl = sum(r[f"kl_{p}"] for r in runs) / len(runs)
        a = sum((acc[r["arm"], r["seed"], p] if acc else r[f"{key}_{p}"]) for r in runs) / len(runs)
        out.append((kl, a))
    return out


def by_arm(rows: list[dict]) -> dict:
    out = {}
    for r in rows:
        out.setdefault(r["arm"], []).append(r)
    return {k: sorted(v, key=lambda r: r["seed"]) for k, v in out.items()}


def delta(arms: dict, name: str, key: str, draw: list[int], acc: dict | None) -> float:
    """acc(arm at its last point) − E(its KL), each arm's seeds taken as draw's u mod (its number of seeds)."""
    pick = lambda runs: [runs[u % len(runs)] for u in draw]  # noqa: E731
    curves = [arm_curve(pick(runs), key, acc) for runs in arms.values() if is_frontier(runs[0])]
    if all(len(c) == 1 for c in curves):  # paths of one point (the end): one curve through the DPO arms' ends
        curves = [[c[0] for c in curves]]
    kl, a = arm_curve(pick(arms[name]), key, acc)[-1]
    return a - envelope(curves, kl)


def endpoint(rows: list[dict], name: str, key: str, seed: int = 0) -> dict:
    """Δ = acc(name) − E(KL(name)) at its last point: estimate, hierarchical bootstrap interval, t interval."""
    import numpy as np

    arms = by_arm(rows)
    n_seeds = len(arms[name])
    keys = run_points(rows)
    matrix, scored = pair_matrix(rows, key)
    rng = np.random.default_rng(random.Random(f"regime-{name}-{key}-{seed}").getrandbits(32))
    draws = []
    for _ in range(N_BOOT):
        u = rng.integers(0, n_seeds, n_seeds).tolist()
        w = rng.multinomial(matrix.shape[1], np.full(matrix.shape[1], 1 / matrix.shape[1])).astype(np.float64)
        acc = dict(zip(keys, (matrix @ w / (scored @ w)).tolist()))  # each point over its own pairs, reweighted
        draws.append(delta(arms, name, key, u, acc))
    finite = sorted(d for d in draws if not math.isnan(d))
    est = delta(arms, name, key, list(range(n_seeds)), None)
    per_seed = []
    for i in range(n_seeds):  # the t interval: Δ_s from the i-th seed's runs (an arm with m seeds: its (i mod m)-th)
        d = delta(arms, name, key, [i], None)
        if not math.isnan(d):
            per_seed.append(d)
    t_mean, t_half, t_p = stats.t_test(per_seed) if len(per_seed) > 1 else (math.nan, math.nan, math.nan)
    out = {"delta": est, "defined": len(finite) / N_BOOT, "n": n_seeds, "pairs": int(arms[name][0]["pairs"]),
           "t_mean": t_mean, "t_half": t_half, "t_p": t_p, "t_n": len(per_seed), "lo": math.nan, "hi": math.nan, "sd": math.nan, "p": math.nan}
    if len(finite) >= 0.95 * N_BOOT:  # else the arm's KL lies outside every DPO path too often to say
        mean = sum(finite) / len(finite)
        out.update(lo=finite[int(0.025 * len(finite))], hi=finite[int(0.975 * len(finite)) - 1],
                   sd=math.sqrt(sum((d - mean) ** 2 for d in finite) / (len(finite) - 1)),
                   p=min(1.0, 2 * min(sum(d <= 0 for d in finite), sum(d >= 0 for d in finite)) / len(finite)))
    return out


def paired(rows: list[dict], a: str, b: str, key: str, point: int | None = None) -> tuple:
    """Paired t over the seeds both arms have: (mean a − b, 95% half-width, p, n) of `key` at `point` (last: None)."""
    arms = by_arm(rows)
    other = {r["seed"]: r for r in arms.get(b, [])}
    diffs = []
    for r in arms.get(a, []):
        if r["seed"] in other:
            p, o = point or points(r)[-1], other[r["seed"]]
            n = min(int(r[f"n_{p}"]), int(o[f"n_{p}"]))
            if key in ENDPOINTS and n < max(int(r[f"n_{p}"]), int(o[f"n_{p}"])):  # on the pairs both scored
                x, y = (sum(unpack(q[f"bits_{key}_{p}"], n)) / n for q in (r, o))
                diffs.append(x - y)
            else:
                diffs.append(r[f"{key}_{p}"] - o[f"{key}_{p}"])
    if len(diffs) == 1:  # one seed: the difference, no interval
        return diffs[0], math.nan, math.nan, 1
    return (*stats.t_test(diffs), len(diffs)) if diffs else (math.nan, math.nan, math.nan, 0)


def wilson(k: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return math.nan, math.nan
    z, p = 1.959964, k / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


# ---- tables -------------------------------------------------------------------------------------------------------
def ci(values: list[float], digits: int = 3) -> str:
    return stats.fmt(*stats.mean_ci(values), digits)


def gate(rows: list[dict]) -> dict:
    """One pilot setting's gate: KL(β₀ 0.03) / KL(β₀ 1) ≥ 2 and median |β₀·M| ≥ 0.5 at β₀ 0.1, at the last point."""
    mine = {r["beta0"]: r for r in rows if r["arm"].startswith("DPO β₀") and r["seed"] == 0}
    last = lambda r, k: r[f"{k}_{points(r)[-1]}"]  # noqa: E731
    ratio = last(mine[0.03], "kl") / last(mine[1.0], "kl")
    bm = last(mine[0.1], "abs_bm")
    return {"ratio": ratio, "abs_bm": bm, "passes": ratio >= 2 and bm >= 0.5}


def gate_table(rows: list[dict]) -> str:
    """The pilot: per setting, KL and |β₀·M| at the end for DPO at each β₀, the two gate criteria, and the
    pilot's extra seeds (β-DPO and DPO β₀ 0.1) at the setting that passed."""
    lines = ["| setting | arm | seed | pairs | KL | accuracy | norm. acc. | median \\|β₀·M\\| | median \\|M\\| |", "|---" * 9 + "|"]
    verdicts = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == setting]
        for r in mine:
            p = points(r)[-1]
            lines.append(f"| {setting} | {r['arm']} | {r['seed']} | {r['pairs']:.0f} | {r[f'kl_{p}']:.3f} | {r[f'acc_{p}']:.3f} | {r[f'nacc_{p}']:.3f} "
                         f"| {r[f'abs_bm_{p}']:.3f} | {r[f'abs_bm_{p}'] / r['beta0']:.2f} |")
        g = gate(mine)
        verdicts.append(f"- {setting}: KL(β₀ 0.03) / KL(β₀ 1) = {g['ratio']:.2f} (gate ≥ 2), median |β₀·M| at β₀ 0.1 = "
                        f"{g['abs_bm']:.3f} (gate ≥ 0.5): {'passes' if g['passes'] else 'fails'}")
    return "\n".join(lines) + "\n\n" + "\n".join(verdicts) + "\n"


def arm_table(rows: list[dict]) -> str:
    lines = ["| arm | optimizer | flip | seeds | steps | KL | accuracy | norm. acc. | median \|β₀·M\| | β mean | kept |", "|---" * 11 + "|"]
    for name, runs in by_arm(rows).items():
        p = points(runs[0])[-1]
        cells = [ci([r[f"{k}_{p}"] for r in runs]) for k in ("kl", "acc", "nacc", "abs_bm")]
        lines.append(f"| {name} | {runs[0]['optimizer']} | {runs[0]['flip']:.0%} | {len(runs)} | {runs[0][f'step_{p}']:.0f} | " + " | ".join(cells)
                     + f" | {stats.mean_ci([r['beta_mean_train'] for r in runs])[0]:.3f} | {stats.mean_ci([r['kept_rate'] for r in runs])[0]:.0%} |")
    r0 = rows[0]
    lines.append(f"\nHeld-out pairs: {int(r0['pairs'])}. Length heuristics on them: the longer response wins {r0['longer_wins']:.3f}, "
                 f"the shorter wins {r0['shorter_wins']:.3f} (equal lengths: neither). Intervals: 95% t over seeds.\n")
    return "\n".join(lines) + "\n"


def path_table(rows: list[dict]) -> str:
    arms = by_arm(rows)
    steps = points(rows[0])
    lines = ["| arm | " + " | ".join(f"point {p}: step, KL, acc., norm. acc." for p in steps) + " |", "|---" * (len(steps) + 1) + "|"]
    for name, runs in arms.items():
        cells = [f"{runs[0][f'step_{p}']:.0f}, {sum(r[f'kl_{p}'] for r in runs) / len(runs):.3f}, "
                 f"{sum(r[f'acc_{p}'] for r in runs) / len(runs):.3f}, {sum(r[f'nacc_{p}'] for r in runs) / len(runs):.3f}" for p in steps]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def endpoint_table(rows: list[dict], names: list[str]) -> str:
    lines = ["| arm | endpoint | seeds | pairs | Δ vs DPO envelope | 95% CI (hier. bootstrap) | p (boot.) | MDE (80%) "
             "| t interval over seeds | p (t) | Holm p (t) |", "|---" * 11 + "|"]
    results = [(name, key, endpoint(rows, name, key)) for name in names for key in ENDPOINTS]
    holm = stats.holm([e["t_p"] for _, _, e in results])
    for (name, key, e), hp in zip(results, holm):
        boot = f"[{e['lo']:+.3f}, {e['hi']:+.3f}]" if not math.isnan(e["lo"]) else f"undefined ({1 - e['defined']:.0%} of draws outside the paths)"
        t = f"{stats.fmt(e['t_mean'], e['t_half'])} (n {e['t_n']})" if e["t_n"] > 1 else f"– (n {e['t_n']})"
        lines.append(f"| {name} | {NAMES[key]} | {e['n']} | {e['pairs']} | {e['delta']:+.3f} | {boot} | {stats.fmt_p(e['p'])} "
                     f"| {2.8 * e['sd']:.3f} | {t} | {stats.fmt_p(e['t_p'])} | {stats.fmt_p(hp)} |")
    return "\n".join(lines) + "\n"


def paired_table(rows: list[dict], comparisons: list[tuple[str, str]]) -> str:
    lines = ["| comparison (same seeds) | seeds | Δ KL | Δ accuracy | p | Δ norm. acc. | p |", "|---" * 7 + "|"]
    arms = by_arm(rows)
    for a, b in comparisons:
        if a not in arms or b not in arms:
            continue
        kl, acc, nacc = (paired(rows, a, b, k) for k in ("kl", "acc", "nacc"))
        lines.append(f"| {a} − {b} | {acc[3]} | {stats.fmt(kl[0], kl[1])} | {stats.fmt(acc[0], acc[1])} | {stats.fmt_p(acc[2])} "
                     f"| {stats.fmt(nacc[0], nacc[1])} | {stats.fmt_p(nacc[2])} |")
    return "\n".join(lines) + "\n"


def flip_table(rows: list[dict]) -> str:
    """Positive control: does the filter drop flipped pairs more often than chance? Per seed and pooled."""
    runs = [r for r in rows if r["flip"] and r.get("flip_dropped", "") != "" and r["rho"] > 0]
    if not runs:
        return ""
    lines = ["| arm | seeds | decisions | precision P(flipped \| dropped) | recall P(dropped \| flipped) | chance (flipped share / drop rate) |",
             "|---" * 6 + "|"]
    for name, mine in by_arm(runs).items():
        prec = [r["flip_dropped"] / (r["flip_dropped"] + r["clean_dropped"]) for r in mine]
        rec = [r["flip_dropped"] / (r["flip_dropped"] + r["flip_kept"]) for r in mine]
        fd, cd = sum(r["flip_dropped"] for r in mine), sum(r["clean_dropped"] for r in mine)
        fk, ck = sum(r["flip_kept"] for r in mine), sum(r["clean_kept"] for r in mine)
        total = fd + cd + fk + ck
        pw, rw = wilson(fd, fd + cd), wilson(fd, fd + fk)
        lines.append(f"| {name} | {len(mine)} | {total:.0f} | {ci(prec)} (t); pooled {fd / (fd + cd):.3f} [{pw[0]:.3f}, {pw[1]:.3f}] "
                     f"| {ci(rec)} (t); pooled {fd / (fd + fk):.3f} [{rw[0]:.3f}, {rw[1]:.3f}] "
                     f"| {(fd + fk) / total:.3f} / {(fd + cd) / total:.3f} |")
    lines.append("\nPooled intervals: Wilson, treating every decision as independent (optimistic: decisions of one run share its "
                 "model); the t intervals over seeds are the ones to read.\n")
    return "\n".join(lines) + "\n"


def mechanism_table(rows: list[dict]) -> str:
    """Adam against SGD: does β₀ (0.1 → 1) change the path? Per seed: log KL ratio and the held-out pairs whose
    outcome differs, at each point; and |β₀·M| there."""
    arms = by_arm(rows)
    pairs = {"adamw": ("DPO β₀ 1", "DPO β₀ 0.1"), "sgd": ("SGD: DPO β₀ 1", "SGD: DPO β₀ 0.1")}
    lines = ["| optimizer | point (step) | seeds | ln KL(β₀ 1) − ln KL(β₀ 0.1) | pairs whose outcome differs | median \|β₀·M\| at β₀ 0.1 / 1 |",
             "|---" * 6 + "|"]
    for opt, (a, b) in pairs.items():
        if a not in arms or b not in arms:
            continue
        other = {r["seed"]: r for r in arms[b]}
        both = [(r, other[r["seed"]]) for r in arms[a] if r["seed"] in other]
        for p in points(both[0][0]):
            lnkl = [math.log(x[f"kl_{p}"] / y[f"kl_{p}"]) for x, y in both]
            n = int(both[0][0][f"n_{p}"])
            differ = [sum(u != v for u, v in zip(unpack(x[f"bits_acc_{p}"], n), unpack(y[f"bits_acc_{p}"], n))) / n for x, y in both]
            lines.append(f"| {opt} | {p} ({both[0][0][f'step_{p}']:.0f}) | {len(both)} | {ci(lnkl, 2)} | {ci(differ)} "
                         f"| {ci([y[f'abs_bm_{p}'] for _, y in both])} / {ci([x[f'abs_bm_{p}'] for x, _ in both])} |")
    return "\n".join(lines) + "\n"


PRIMARY = ["β-DPO"]
COMPONENTS = ["filter only (α 0)", "dynamic β only (ρ 0)", "uniform drop", "β(x), ppl-scaled"]  # ablation arms


def report(rows: list[dict]) -> str:
    """tables.md of the regime study, from its CSV's rows alone (pilot rows: the gate table only)."""
    if "setting" in rows[0]:
        return ("## Regime gate (pilot; every run at its last step: the gate's DPO runs on the first 250 held-out pairs, the "
                "seed runs on all 1,000)\n\n" + gate_table(rows))
    main = [r for r in rows if not r["flip"] and r["optimizer"] == "adamw"]
    arms = by_arm(rows)
    parts = ["## Every arm at its last point\n\n", arm_table(rows), "\n## Along the path (means over seeds)\n\n", path_table(rows),
             "\n## Primary endpoint: β-DPO − the DPO envelope at its KL (co-primary: accuracy, length-normalised accuracy)\n\n",
             endpoint_table(main, [n for n in PRIMARY if n in arms])]
    components = [n for n in COMPONENTS if n in arms and len(arms[n]) > 1]
    if components:
        parts += ["\n## Components and controls − the DPO envelope at their KL (secondary)\n\n", endpoint_table(main, components)]
    parts += ["\n## Paired differences (secondary; ± 95% t over seeds, none with one seed)\n\n",
              paired_table(rows, [("β-DPO", "DPO β₀ 0.1"), ("β-DPO", "DPO β₀ 0.03"), *((n, "β-DPO") for n in components)])]
    if "flip: β-DPO" in arms:
        parts += ["\n## Positive control: 30% of the training labels flipped\n\n",
                  paired_table(rows, [("flip: β-DPO", "flip: DPO β₀ 0.1"), ("flip: DPO β₀ 0.1", "DPO β₀ 0.1"), ("flip: β-DPO", "β-DPO")]),
                  "\n", flip_table(rows)]
    if "SGD: DPO β₀ 1" in arms:
        parts += ["\n## Mechanism: does β₀ change the path, under Adam and under SGD?\n\n", mechanism_table(rows)]
    return "".join(parts)
