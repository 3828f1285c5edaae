"""The regime study (docs/RESULTS.md, "Regime: where β can act"): β-DPO against a DPO frontier on Anthropic HH
with SmolLM2-135M-Instruct, in a setting where β₀ changes what DPO learns. `python experiments/run.py regime`.

Why a new study: in the real-data study (experiments/real.py) every run kept |β·M| ≲ 0.1. There the DPO gradient
is ≈ (β/2)·∇M, β only scales it, and Adam divides the scale out: β₀, the dynamic β and the replayed β could not
act. This study first finds a setting where they can (the regime gate, `pilot`), then runs the arms there.

The setup, the same for every run (SETUP; why, in docs/RESULTS.md):
  - data: experiments/real_data.py (committed HH file, SHA-256 checked, fixed split): the first 512 training pairs,
    all 1,000 held-out pairs; SmolLM2's chat template, last turn; prompt ≤ 128 tokens, prompt + response ≤ 192;
  - the top TOP_LAYERS blocks of 30 train (and the final norm) on cached states of the frozen ones
    (experiments/lower_cache.py); embeddings / LM head frozen;
  - batch 16 (= β-DPO's calibration batch N), 2 warm-up steps, reference log-probs precomputed, training seeds
    (batch order, filter draws) 0, 1, ...; the learning rate, steps and optimizer of SETUP / an arm;
  - evaluation at each path point (setup["path"], steps; the study as run: its end only): the weights there are
    scored on held-out pairs (summed log-probs under policy and reference: accuracy, length-normalised accuracy,
    |β₀·M|; the last point of ALL_PAIRS_ARMS: all 1,000 pairs, else the first PATH_PAIRS) and the full-vocabulary
    KL(π‖π_ref) on the responses of the first KL_PAIRS of them (teacher-forced).
  - the positive control trains on the same 512 pairs with the labels of 30% swapped (FLIPS, a committed list).
Each run is an ordinary `python betadpo.py` run; a finished run with its path.jsonl is skipped (resumable).
`--regime_pilot` runs the pilot (PILOT) first; `--regime_paths` runs PATHS after the study (weights every 4 steps).
"""

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import lower_cache
import real
import real_data
import regime_report

REPO = Path(__file__).resolve().parents[1]
MODEL, TOP_LAYERS = "smollm2-135m", 2
SIZES = {"hh": (512, 1000)}  # (training, held-out) pairs: the first of real_data's fixed split
KL_PAIRS = 100  # held-out pairs whose responses the KL is measured on (the first ones)
PATH_PAIRS = 250  # held-out pairs scored at the path points before the last (the first ones; the last: all 1,000)
FLIPS = Path(__file__).resolve().parent / "data" / "regime_flips.json"  # training pairs whose labels are swapped
FLIP_FRACTION = 0.3
DATA_FLAGS = real.DATA_FLAGS
# The regime's setting, chosen by the pilot (docs/RESULTS.md, "Regime gate"): the one setting that passed; the
# study adopts the pilot's runs there. One path point (the end): see PATH_PAIRS and the departures.
SETUP = {"lr": 1e-3, "steps": 16, "path": (16,), "path_pairs": PATH_PAIRS, "pilot": "lr 1e-3, 16 steps"}
# SGD's learning rate (mechanism arms), fixed from the pilot before they ran: the gradient norm of DPO at β₀ 1 was
# 21.5 at step 1 (lr 3e-4 pilot), and Adam's first steps move the 7.1M parameters by about lr·√7.1M = 2.7 at
# lr 1e-3; 0.05 makes SGD at β₀ 1 step about 1.1 (no clipping), below Adam's, for stability; at β₀ 0.1 a tenth.
SGD_LR = 0.05


def train_flags(lr: float, steps: int, save_every: int) -> list[str]:
    return ["--train.batch_size", "16", "--train.lr", str(lr), "--train.warmup_steps", "2", "--train.max_steps", str(steps),
            "--train.eval_every", "0", "--train.save_every", str(save_every), "--train.precompute_ref", "true",
            "--log.kept_pairs", "true", "--log.progress_every", "16"]


DPO = {"loss.alpha": 0.0, "loss.filter_ratio": 0.0}
BETA_DPO = {"loss.beta": 0.1, "loss.alpha": 0.6, "loss.filter_ratio": 0.2}  # the reference code's a and ρ
# β₀ 0.01 rather than 0.3: in the pilot β-DPO's KL (22.4) lay at DPO β₀ 0.03's (22.4), the frontier's end, where
# the envelope is undefined; a β₀ below it brackets β-DPO (lower β₀, larger KL)
FRONTIER_BETAS = (0.01, 0.03, 0.1, 1.0)


def dpo(beta: float) -> dict:
    return {**DPO, "loss.beta": beta}


# arm name → (overrides, flip, optimizer). The arms of docs/RESULTS.md's preregistration.
ARMS = {
    **{f"DPO β₀ {b:g}": (dpo(b), False, "adamw") for b in FRONTIER_BETAS},
    "β-DPO": (BETA_DPO, False, "adamw"),
    "filter only (α 0)": ({**BETA_DPO, "loss.alpha": 0.0}, False, "adamw"),
    "dynamic β only (ρ 0)": ({**BETA_DPO, "loss.filter_ratio": 0.0}, False, "adamw"),
    "uniform drop": ({**BETA_DPO, "loss.filter": "uniform"}, False, "adamw"),
    "β(x), ppl-scaled": ({**BETA_DPO, "loss.ppl_scale": True, "loss.learn_scale": True, "loss.scale_lr": 1e-2}, False, "adamw"),
    "flip: DPO β₀ 0.1": (dpo(0.1), True, "adamw"),
    "flip: β-DPO": (BETA_DPO, True, "adamw"),
    "SGD: DPO β₀ 0.1": (dpo(0.1), False, "sgd"),
    "SGD: DPO β₀ 1": (dpo(1.0), False, "sgd"),
}
# The ablation arms (ARMS above, named in regime_report.COMPONENTS): β-DPO with one of its parts removed or replaced
# (the paper's Table 1, plus the extension's β(x)).
COMPONENTS = regime_report.COMPONENTS
# Arms scored on every held-out pair at their last point: the primary endpoint and its frontier, and the ablation
# arms (compared with both on the same pairs); the control and mechanism arms on the first PATH_PAIRS only: a
# scoring pass of 1,000 pairs costs more than a run's training here (docs/RESULTS.md, Time).
ALL_PAIRS_ARMS = {"β-DPO", *(f"DPO β₀ {b:g}" for b in FRONTIER_BETAS), *COMPONENTS}
# (arms, seeds) in the order they run: the primary comparison first, so that a run cut short still has it. Seeds
# 0 and 1 of β-DPO and DPO β₀ 0.1, and seed 0 of DPO β₀ 0.03 and 1, are the pilot's runs (adopt_pilot_runs).
# The first run had 3 seeds (a run with its 1,000-pair scoring took ~6 min on the shared machine); the extension
# brought β-DPO and the DPO arms nearest its KL to 8 (~3 min a run on a quiet one).
PLAN = [
    (["β-DPO", "DPO β₀ 0.1"], range(3)),
    (["DPO β₀ 0.03", "DPO β₀ 1", "DPO β₀ 0.01"], range(1)),
    (["flip: β-DPO", "flip: DPO β₀ 0.1"], range(1)),
    (["SGD: DPO β₀ 0.1", "SGD: DPO β₀ 1"], range(1)),
    # The extension, run after the first analysis (declared in docs/RESULTS.md): 8 seeds of β-DPO and of the two
    # DPO arms whose KL brackets its own.
    (["β-DPO", "DPO β₀ 0.1", "DPO β₀ 0.03"], range(3, 8)),
    (["DPO β₀ 0.03"], range(1, 3)),
    # The second extension, preregistered in docs/RESULTS.md before it ran: the ablation arms at seeds 0–2, and
    # seeds 1–2 of the positive control and of the mechanism arms (3 seeds each; fewer than 8 for time, declared).
    (COMPONENTS, range(3)),
    (["flip: β-DPO", "flip: DPO β₀ 0.1", "SGD: DPO β₀ 0.1", "SGD: DPO β₀ 1"], range(1, 3)),
    # Added after the second extension's results (declared in docs/RESULTS.md): the Adam side of the mechanism at
    # the seeds SGD has (DPO β₀ 1 is also a frontier arm, far below β-DPO's KL).
    (["DPO β₀ 1"], range(1, 3)),
]
# The paths (docs/RESULTS.md, "Regime: paths"): β-DPO and the DPO arm at its KL, trained again with their weights
# kept every 4 steps and every point scored on the first PATH_PAIRS held-out pairs, so that β-DPO's end is compared
# with DPO's path at the same KL (the study's runs keep only their end). Their own directory, `paths/`.
PATHS = {"setup": {"lr": 1e-3, "steps": 16, "path": (4, 8, 12, 16)}, "plan": [(["β-DPO", "DPO β₀ 0.03"], range(3))]}
# The pilot: (setting name, lr, steps, path points) × DPO at β₀ 0.03, 0.1, 1 (and the plan's β-DPO at the last)
PILOT = [("lr 3e-4, 16 steps", 3e-4, 16, (16,)), ("lr 1e-3, 16 steps", 1e-3, 16, (16,))]  # the end point only
SMOKE = {"sizes": {"hh": (16, 8)}, "kl_pairs": 4, "setup": {"lr": 1e-3, "steps": 4, "path": (2, 4), "path_pairs": 4}, "threads": 1,
         "plan": [(["DPO β₀ 0.1", "flip: β-DPO"], range(1))]}


def slug(overrides: dict) -> str:
    return real.slug(overrides)


def run_dir(out: Path, name: str, seed: int) -> Path:
    overrides, flip, optimizer = ARMS[name]
    return out / "hh" / "runs" / f"{slug(overrides)}{'_flip' if flip else ''}_{optimizer}" / f"seed{seed}"


# ---- data -----------------------------------------------------------------------------------------------------
def flip_list(n_train: int) -> list[int]:
    """The committed list of flipped training pairs (indices into the first n_train): 30% of them, drawn once."""
    if FLIPS.exists():
        flips = json.loads(FLIPS.read_text())
        if flips["n_train"] == n_train:
            return flips["flipped"]
    return sorted(random.Random(f"regime-flips-{n_train}").sample(range(n_train), round(FLIP_FRACTION * n_train)))


def prepare(out: Path, sizes: dict) -> dict:
    """real.prepare's files, plus train_flipped.jsonl: the same pairs, chosen and rejected swapped on the flip list."""
    d = real.prepare(out, "hh", sizes)
    flipped = set(flip_list(len(d["train"])))
    rows = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} if i in flipped else r for i, r in enumerate(d["train"])]
    d["files"]["train_flipped"] = real_data.write_jsonl(rows, out / "hh" / "train_flipped.jsonl")
    d["flipped"] = sorted(flipped)
    return d


# ---- training: an ordinary betadpo.py run, its path weights kept as they are saved ----------------------------
def keep_path_weights(path_dir: Path):
    """Hard-link the weights of each checkpoint the run has now into path_dir (betadpo.py keeps only the newest two
    checkpoints; a link keeps the file after its directory is deleted)."""
    path_dir.mkdir(exist_ok=True)
    ckpts = path_dir.parent / "checkpoints"
    for c in sorted(ckpts.glob("step-*")) if ckpts.exists() else []:
        target = path_dir / f"{c.name}.safetensors"
        if not target.exists() and (c / "model.safetensors").exists():
            try:
                os.link(c / "model.safetensors", target)
            except FileNotFoundError:  # deleted between the check and the link: a newer one replaced it
                pass


def launch(cmd: list[str], log: Path, env: dict, path_dir: Path):
    """Run `cmd`, keeping each checkpoint's weights in path_dir while it runs (keep_path_weights, every 0.5 s). On
    failure show the log's tail, stop."""
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            keep_path_weights(path_dir)
            time.sleep(0.5)
    keep_path_weights(path_dir)
    if proc.returncode != 0:
        sys.exit(f"experiments: `{' '.join(cmd)}` failed ({proc.returncode}); its output: {log}\n" + log.read_text()[-3000:])


def train(out: Path, name: str, seed: int, files: dict, split: Path, setup: dict, env: dict, commit) -> Path:
    overrides, flip, optimizer = ARMS[name]
    d = run_dir(out, name, seed)
    if (d / "final" / "finished.json").exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "commit.txt").exists():
        (d / "commit.txt").write_text(commit() + "\n")
    lr = SGD_LR if optimizer == "sgd" else setup["lr"]
    path = setup["path"]
    save_every = path[0] if all(p % path[0] == 0 for p in path) else 1
    extra = ["--train.optimizer", optimizer] + (["--train.max_grad_norm", "0"] if optimizer == "sgd" else [])
    launch([sys.executable, "betadpo.py", "--model.name_or_path", str(split), *lower_cache.BETADPO_FLAGS,
            "--data.dataset", str(files["train_flipped" if flip else "train"]), *DATA_FLAGS,
            *train_flags(lr, setup["steps"], save_every), *extra, "--train.seed", str(seed), "--train.output_dir", str(d),
            "--train.ref_cache_dir", str(split.parent / "ref_cache"), *real.flags(overrides)], d / "train.log", env, d / "path")
    return d


# ---- evaluation along the path --------------------------------------------------------------------------------
def evaluate_path(run: Path, reference, pairs, pad_id: int, kl_pairs: int, ref_sums: list, path: tuple, path_pairs: int,
                  last_pairs: int) -> Path:
    """path.jsonl: per path point, the scored held-out pairs (real.score_heldout's rows, one list per point): the
    first path_pairs at the earlier points, the first last_pairs at the last (scoring costs ~0.1 s a pair here)."""
    from safetensors.torch import load_file

    from plumbing.models import load_model

    out = run / "path.jsonl"
    if out.exists():
        return out
    policy = load_model(str(run / "final"), trust_remote_code=True).eval()  # the split model's class and config
    lines = []
    for step in path:
        weights = load_file(str(run / "path" / f"step-{step:08d}.safetensors"))
        missing, unexpected = policy.load_state_dict(weights, strict=False)
        if unexpected or any("lm_head" not in k for k in missing):  # the LM head is tied to the embedding
            raise RuntimeError(f"{run}: step {step}'s weights do not fit the model ({missing}, {unexpected})")
        n = last_pairs if step == path[-1] else path_pairs  # the last point: every held-out pair (primary arms)
        scored = real.score_heldout(policy, reference, pairs[:n], pad_id, kl_pairs, ref_sums[:n])
        lines.append(json.dumps({"step": step, "pairs": scored}))
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.rename(out)
    return out


def build(out: Path, sizes: dict, model_name: str, top_layers: int):
    """The data and the split model (once): → (data, split directory)."""
    data = prepare(out, sizes)
    split = real.build_split(out, "hh", {k: data["files"][k] for k in ("train", "heldout")}, model_name, top_layers, {})
    return data, split


_REFERENCES: dict = {}  # split directory → references(): the reference's held-out sums cost a scoring pass


def references(split: Path, heldout_file: Path):
    """The reference (the split model untrained), the held-out pairs tokenized, the pad id and the reference's sums."""
    from plumbing.models import load_model, load_tokenizer

    if split in _REFERENCES:
        return _REFERENCES[split]
    tok = load_tokenizer(str(split))
    reference = load_model(str(split), trust_remote_code=True).eval()
    pairs = real.tokenized(tok, heldout_file)
    cache = split.parent / "reference_sums.json"  # kept across processes (pilot, study): ~4 min of scoring
    key = real_data.sha256(heldout_file) + "-" + real_data.sha256(split / "model.safetensors")
    saved = json.loads(cache.read_text()) if cache.exists() else {}
    if saved.get("key") != key:
        saved = {"key": key, "sums": real.reference_sums(reference, pairs, tok.pad_token_id)}
        cache.write_text(json.dumps(saved))
    _REFERENCES[split] = reference, pairs, tok.pad_token_id, [tuple(x) for x in saved["sums"]]
    return _REFERENCES[split]


def adopt_pilot_runs(out: Path, todo: list, setup: dict, n_heldout: int):
    """The pilot's finished runs at the study's setting are the study's runs of the same arm and seed (same code,
    data, setting and seed: betadpo.py would train them again bit for bit): hard-linked into the study's directory,
    with pilot.txt naming their origin (the CSV's `pilot` column). A run whose last point scored fewer held-out pairs
    than the study scores for it (the gate's 250) keeps its weights and is scored again."""
    import shutil

    pilot_dir = out / "pilot" / setup["pilot"].replace(" ", "_").replace(",", "")
    for name, seed in todo:
        src, dst = run_dir(pilot_dir, name, seed), run_dir(out, name, seed)
        if dst.exists() or not (src / "final" / "finished.json").exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dst, copy_function=os.link)
        (dst / "pilot.txt").write_text(f"{src}\n")
        last = n_heldout if name in ALL_PAIRS_ARMS else setup["path_pairs"]
        path = dst / "path.jsonl"
        if path.exists() and len(json.loads(path.read_text().splitlines()[-1])["pairs"]) != last:
            path.unlink()


def run_all(out: Path, todo: list, data: dict, split: Path, setup: dict, kl_pairs: int, env: dict, commit, label: str):
    """Train and evaluate every (arm, seed) of `todo` in order, with a progress line per run."""
    t0, refs = time.perf_counter(), None
    for k, (name, seed) in enumerate(todo, 1):
        started = time.perf_counter()
        d = train(out, name, seed, data["files"], split, setup, env, commit)
        if refs is None:
            refs = references(split, data["files"]["heldout"])
        last = setup.get("last_pairs") or (len(refs[1]) if name in ALL_PAIRS_ARMS else setup["path_pairs"])
        evaluate_path(d, *refs[:3], kl_pairs, refs[3], setup["path"], min(setup["path_pairs"], last), last)
        print(f"[{label} {k}/{len(todo)}] {name} seed {seed}: {time.perf_counter() - started:.0f} s "
              f"({(time.perf_counter() - t0) / 60:.1f} min)", flush=True)


def child_env(kernel_env: dict, threads: int) -> dict:
    return {**os.environ, **kernel_env, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(threads)}


def main(out: Path, smoke: bool, kernel_env: dict, commit, model_name: str = MODEL, top_layers: int = TOP_LAYERS) -> list[dict]:
    """Every run of PLAN (or SMOKE's), trained and evaluated along its path → the CSV rows (regime_report.csv_rows)."""
    sizes, kl_pairs, setup, plan = (SMOKE["sizes"], SMOKE["kl_pairs"], SMOKE["setup"], SMOKE["plan"]) if smoke else (SIZES, KL_PAIRS, SETUP, PLAN)
    env = child_env(kernel_env, SMOKE["threads"] if smoke else 2)
    out.mkdir(parents=True, exist_ok=True)
    data, split = build(out, sizes, model_name, top_layers)
    todo = [(name, s) for names, seeds in plan for s in seeds for name in names]
    if setup.get("pilot"):
        adopt_pilot_runs(out, todo, setup, len(data["heldout"]))
    run_all(out, todo, data, split, setup, kl_pairs, env, commit, "regime")
    return regime_report.csv_rows(out, todo, data, run_dir, setup)


def pilot(out: Path, kernel_env: dict, commit, model_name: str = MODEL, top_layers: int = TOP_LAYERS) -> list[dict]:
    """The regime gate: each PILOT setting, DPO at β₀ 0.03, 0.1 and 1, seed 0, on its own directory; then, at the
    first setting that passes, β-DPO at seeds 0 and 1 and DPO β₀ 0.1 at seed 1 (the seed SDs of the detectable effect)."""
    env = child_env(kernel_env, 2)
    data, split = build(out, SIZES, model_name, top_layers)
    rows, passed = [], None
    for setting, lr, steps, path in PILOT:
        d = out / "pilot" / setting.replace(" ", "_").replace(",", "")
        setup = {"lr": lr, "steps": steps, "path": path, "path_pairs": PATH_PAIRS, "last_pairs": PATH_PAIRS}  # the gate: 250 pairs
        todo = [(f"DPO β₀ {b:g}", 0) for b in (0.03, 0.1, 1.0)]
        run_all(d, todo, data, split, setup, KL_PAIRS, env, commit, f"pilot {setting}")
        mine = [{**r, "setting": setting} for r in regime_report.csv_rows(d, todo, data, run_dir, setup)]
        rows += mine
        if passed is None and regime_report.gate(mine)["passes"]:
            passed = (d, setup, setting)
    if passed is not None:
        d, setup, setting = passed
        todo = [("β-DPO", 0), ("β-DPO", 1), ("DPO β₀ 0.1", 1)]
        run_all(d, todo, data, split, {**setup, "last_pairs": None}, KL_PAIRS, env, commit, f"pilot {setting} seeds")
        rows += [{**r, "setting": setting} for r in regime_report.csv_rows(d, todo, data, run_dir, setup)]
    return rows


def paths(out: Path, kernel_env: dict, commit, model_name: str = MODEL, top_layers: int = TOP_LAYERS) -> list[dict]:
    """PATHS's runs in out/paths (the study's data, split model and reference cache): → the CSV rows."""
    env = child_env(kernel_env, 2)
    data, split = build(out, SIZES, model_name, top_layers)
    setup = {**PATHS["setup"], "path_pairs": PATH_PAIRS, "last_pairs": PATH_PAIRS}  # every point: the first PATH_PAIRS
    todo = [(name, s) for names, seeds in PATHS["plan"] for s in seeds for name in names]
    run_all(out / "paths", todo, data, split, setup, KL_PAIRS, env, commit, "paths")
    return regime_report.csv_rows(out / "paths", todo, data, run_dir, setup)
