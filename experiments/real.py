"""The real-data study (docs/RESULTS.md, "Real preferences: preregistered"): β-DPO against a DPO frontier on
Anthropic HH and UltraFeedback with SmolLM2-135M-Instruct. `python experiments/run.py real` runs it all.

The setup, the same for every method (SETUP below; why each choice, in docs/RESULTS.md):
  - data: experiments/real_data.py (committed files, SHA-256 checked, fixed split); the study uses the first
    SIZES[d] rows of each split; rendered with SmolLM2's chat template, HH last turn only;
  - prompt ≤ 128 tokens (its last ones), prompt + response ≤ 192;
  - only the top TOP_LAYERS block(s) of the 30 train (and the final norm), on cached outputs of the frozen ones
    (experiments/lower_cache.py: the split model, built once per data set); embeddings / LM head frozen;
  - one epoch, batch 16 (= β-DPO's calibration batch N), AdamW, lr 3e-5, 2 warm-up steps, reference log-probs
    precomputed (train.precompute_ref), training seeds 0, 1, 2 (batch order and the filter's draws);
  - evaluation in this process: per held-out pair the policy's and the reference's summed log-probs (implicit
    reward accuracy), and KL(π‖π_ref) summed over response positions, full vocabulary, on the held-out chosen
    and rejected responses of the first KL_PAIRS pairs (teacher-forced: no sampling).
Each run is an ordinary `python betadpo.py` run; a run with heldout.json is skipped (resumable).
"""

import json
import random
import sys
import time
from pathlib import Path

import torch

import lower_cache
import real_data
import real_report

REPO = Path(__file__).resolve().parents[1]
MODEL, TOP_LAYERS = "smollm2-135m", 1
SIZES = {"hh": (256, 256), "uf": (128, 128)}  # (training, held-out) pairs used, the first of each fixed split
KL_PAIRS = 64  # held-out pairs whose responses the KL is measured on
SEEDS = (0, 1, 2)
DATA_FLAGS = ["--data.max_length", "192", "--data.max_prompt_length", "128", "--data.chat_template", "on", "--data.eval_size", "0"]
TRAIN_FLAGS = ["--train.batch_size", "16", "--train.lr", "3e-5", "--train.warmup_steps", "2", "--train.max_steps", "0",
               "--train.epochs", "1", "--train.eval_every", "0", "--train.save_every", "100000", "--train.precompute_ref", "true",
               "--log.kept_pairs", "true", "--log.progress_every", "50"]

DPO = {"loss.alpha": 0.0, "loss.filter_ratio": 0.0}
BETA_DPO = {"loss.beta": 0.1, "loss.alpha": 0.6, "loss.filter_ratio": 0.2}  # the reference code's a and ρ
FRONTIER_BETAS = (0.03, 0.1, 0.3, 1.0)
FRONTIER = {f"DPO β₀ {b:g}": {**DPO, "loss.beta": b} for b in FRONTIER_BETAS}
PRIMARY = {**FRONTIER, "β-DPO": BETA_DPO}
CONTROLS = {  # secondary: each against β-DPO, paired over seeds
    "β-DPO, uniform drop": {**BETA_DPO, "loss.filter": "uniform"},
    "DPO fed β-DPO's βs, shuffled": {**DPO, "loss.beta": 0.1, "replay": "β-DPO"},
    "β-DPO, instance-level β": {**BETA_DPO, "loss.beta_level": "instance"},
    "β-DPO + learned β(x), ppl-scaled": {**BETA_DPO, "loss.ppl_scale": True, "loss.learn_scale": True, "loss.scale_lr": 1e-2},
}
GRID = {f"β-DPO ρ {r:g}, α {a:g}": {**BETA_DPO, "loss.filter_ratio": r, "loss.alpha": a} for r in (0.1, 0.2, 0.3, 0.5) for a in (0.3, 0.6, 1.0)}
# (dataset, variants, seeds): HH has the controls and the grid; UF the uniform-drop control (the score-gap analysis).
# `--real_plan primary` runs only the first three entries: the primary endpoint and the score-gap analysis.
PLAN = [("hh", PRIMARY, SEEDS), ("uf", PRIMARY, SEEDS), ("uf", {k: v for k, v in CONTROLS.items() if "uniform" in k}, SEEDS),
        ("hh", CONTROLS, SEEDS), ("hh", GRID, (0,))]
PLANS = {"all": PLAN, "primary": PLAN[:3]}
# The smoke's runs take one thread: its tiny model gains nothing from a second, whose OpenMP spin-waiting only adds CPU
# time (the study's runs, sequential, take the machine's 2 cores).
SMOKE = {"sizes": {"hh": (8, 8), "uf": (8, 8)}, "kl_pairs": 4, "train": ["--train.batch_size", "4", "--train.max_steps", "2"],
         "threads": 1,
         "plan": [("hh", {"DPO β₀ 0.1": FRONTIER["DPO β₀ 0.1"], "β-DPO": BETA_DPO}, (0,)), ("uf", {"β-DPO": BETA_DPO}, (0,))]}


def slug(overrides: dict) -> str:
    return "_".join(f"{k.split('.')[-1]}{v}" for k, v in sorted(overrides.items()) if k != "replay") or "default"


def run_dir(out: Path, dataset: str, overrides: dict, seed: int) -> Path:
    replay = "_replay" if "replay" in overrides else ""
    return out / dataset / "runs" / f"{slug(overrides)}{replay}" / f"seed{seed}"


def flags(overrides: dict) -> list[str]:
    return [str(x).lower() if isinstance(x, bool) else str(x) for k, v in overrides.items() if k != "replay" for x in (f"--{k}", v)]


# ---- data and the split model, once per data set -------------------------------------------------------------
def prepare(out: Path, dataset: str, sizes: dict) -> dict:
    """Checked, split data → out/<dataset>/{train,heldout}.jsonl; → the rows and the files."""
    d = real_data.prepare(dataset)
    n_train, n_heldout = sizes[dataset]
    rows = {"train": d["train"][:n_train], "heldout": d["heldout"][:n_heldout]}
    files = {k: real_data.write_jsonl(v, out / dataset / f"{k}.jsonl") for k, v in rows.items()}
    return {**rows, "files": files, "skipped": d["skipped"], "dropped": d["dropped"]}


def data_config(train_file: Path, eval_file: Path | None = None):
    from plumbing.config import DataArgs

    return DataArgs(dataset=str(train_file), eval_dataset=str(eval_file or ""), eval_size=0, max_length=192,
                    max_prompt_length=128, chat_template="on")


def tokenized(tokenizer, path: Path) -> list[tuple]:
    """The (prompt, chosen, rejected) ids of a prepared file, exactly as betadpo.py tokenizes them."""
    from plumbing.data import load_pairs, tokenize_pairs

    cfg = data_config(path)
    return tokenize_pairs(tokenizer, load_pairs(cfg, "train", tokenizer), cfg.max_length, cfg.max_prompt_length)


def build_split(out: Path, dataset: str, files: dict, model_name: str, top_layers: int, loaded: dict) -> Path:
    """The split model of a data set (experiments/lower_cache.py): the full model is loaded once for all data sets."""
    from plumbing.models import load_model, load_tokenizer

    split = out / dataset / "split"
    if lower_cache.is_split(split):
        return split
    if not loaded:
        loaded["tokenizer"] = load_tokenizer(model_name)
        loaded["model"] = load_model(model_name).eval()
    tok = loaded["tokenizer"]
    sequences = [p + y for f in files.values() for p, c, r in tokenized(tok, f) for y in (c, r)]
    t0 = time.perf_counter()
    lower_cache.make_split(loaded["model"], tok, sequences, top_layers, split)
    print(f"{dataset}: lower-block states of {len(sequences)} sequences in {time.perf_counter() - t0:.0f} s", flush=True)
    return split


# ---- training: an ordinary betadpo.py run --------------------------------------------------------------------
def train(out: Path, dataset: str, overrides: dict, seed: int, files: dict, split: Path, extra: list[str], run, commit,
          threads: int = 2) -> Path:
    d = run_dir(out, dataset, overrides, seed)
    if (d / "final" / "finished.json").exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "commit.txt").exists():  # the code that trained it (kept across a resume)
        (d / "commit.txt").write_text(commit() + "\n")
    replay = []
    if "replay" in overrides:  # the shuffled-β control: β-DPO's β sequence of the same seed, shuffled
        source = [r["beta"] for r in map(json.loads, (run_dir(out, dataset, PRIMARY[overrides["replay"]], seed) / "metrics.jsonl")
                                                      .read_text().splitlines()) if r.get("split") != "eval"]
        random.Random(f"replay-{dataset}-{seed}").shuffle(source)
        (d / "beta_sequence.json").write_text(json.dumps(source))
        replay = ["--loss.beta_sequence", str(d / "beta_sequence.json")]
    run([sys.executable, "betadpo.py", "--model.name_or_path", str(split), *lower_cache.BETADPO_FLAGS,
         "--data.dataset", str(files["train"]), *DATA_FLAGS,
         *TRAIN_FLAGS, *extra, "--train.seed", str(seed), "--train.output_dir", str(d), "--train.ref_cache_dir", str(out / "ref_cache"),
         *flags(overrides), *replay], d / "train.log", threads=threads)
    return d


# ---- evaluation: held-out log-probs and KL, in this process -------------------------------------------------
@torch.no_grad()
def score_heldout(policy, reference, pairs: list[tuple], pad_id: int, kl_pairs: int, ref_sums: list | None = None,
                  batch_size: int = 16) -> list[dict]:
    """Per held-out pair: summed log-probs of chosen and rejected under both models, response lengths, and (first
    kl_pairs pairs) KL_seq(y) = Σ_t Σ_v π(v|x,y<t)·(log π − log π_ref)(v|x,y<t) for y = chosen and rejected.
    ref_sums: the reference's (chosen, rejected) sums, computed once per data set (`reference_sums`): then the
    reference runs only on the KL pairs. reference None: the policy alone (policy_* keys only)."""
    from eval import full_vocab_kl
    from plumbing.data import collate_pairs

    out = []
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s : s + batch_size]
        B = len(chunk)
        batch = collate_pairs(chunk, pad_id)  # rows [0, B) chosen, [B, 2B) rejected
        response = batch["labels"][:, 1:] != -100  # (2B, T−1): position t predicts response token t+1
        keep = torch.cat([response, torch.zeros_like(response[:, :1])], 1)  # (2B, T)
        targets = batch["input_ids"][:, 1:][response]  # (n,)
        rows = response.nonzero()[:, 0]  # (n,) the row of each kept position
        models = {"policy": policy}
        if reference is not None and (s < kl_pairs or ref_sums is None):
            models["ref"] = reference
        logits = {role: m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits.float()
                  for role, m in models.items()}  # (n, V) each
        sums = {role: torch.zeros(2 * B).index_add_(0, rows, l.log_softmax(-1).gather(-1, targets[:, None])[:, 0])
                for role, l in logits.items()}  # (2B,)
        kl = torch.zeros(2 * B)
        if s < kl_pairs and "ref" in logits:
            n = rows.numel()
            kl.index_add_(0, rows, full_vocab_kl(logits["policy"][None], logits["ref"][None], torch.zeros(n, dtype=torch.long), torch.arange(n)))
        for i, (p, c, r) in enumerate(chunk):
            row = {"policy_chosen": sums["policy"][i].item(), "policy_rejected": sums["policy"][B + i].item(),
                   "len_chosen": len(c), "len_rejected": len(r)}
            if reference is not None:
                ref = (sums["ref"][i].item(), sums["ref"][B + i].item()) if "ref" in sums else ref_sums[s + i]
                row.update({"ref_chosen": ref[0], "ref_rejected": ref[1]})
            if s + i < kl_pairs and "ref" in logits:
                row.update({"kl_chosen": kl[i].item(), "kl_rejected": kl[B + i].item()})
            out.append(row)
    return out


def reference_sums(reference, pairs: list[tuple], pad_id: int) -> list[tuple[float, float]]:
    """The reference's summed log-probs of each held-out pair's (chosen, rejected): once per data set."""
    return [(r["policy_chosen"], r["policy_rejected"]) for r in score_heldout(reference, None, pairs, pad_id, 0)]


def evaluate(run: Path, reference, pairs: list[tuple], pad_id: int, kl_pairs: int, ref_sums: list) -> Path:
    from plumbing.models import load_model

    path = run / "heldout.jsonl"
    if not path.exists():
        policy = load_model(str(run / "final"), trust_remote_code=True).eval()  # a split model (lower_cache.py)
        scored = score_heldout(policy, reference, pairs, pad_id, kl_pairs, ref_sums)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in scored))
        tmp.rename(path)
    return path


# ---- the study -----------------------------------------------------------------------------------------------
def main(out: Path, smoke: bool, run, commit, model_name: str = MODEL, top_layers: int = TOP_LAYERS, plan: str = "all") -> list[dict]:
    """Every run of PLANS[plan] (or SMOKE's), evaluated → the CSV rows (real_report.csv_rows)."""
    from plumbing.models import load_model, load_tokenizer

    sizes, kl_pairs, plan = (SMOKE["sizes"], SMOKE["kl_pairs"], SMOKE["plan"]) if smoke else (SIZES, KL_PAIRS, PLANS[plan])
    extra, threads = (SMOKE["train"], SMOKE["threads"]) if smoke else ([], 2)
    out.mkdir(parents=True, exist_ok=True)
    t0, loaded, data, splits = time.perf_counter(), {}, {}, {}
    for dataset in dict.fromkeys(d for d, _, _ in plan):
        data[dataset] = prepare(out, dataset, sizes)
        splits[dataset] = build_split(out, dataset, data[dataset]["files"], model_name, top_layers, loaded)
    loaded.clear()  # the full model is no longer needed
    todo = [(d, name, o, s) for d, variants, seeds in plan for name, o in variants.items() for s in seeds]
    todo.sort(key=lambda t: "replay" in t[2])  # the shuffled-β control after the runs it replays
    todo = list(dict.fromkeys((d, name, tuple(o.items()), s) for d, name, o, s in todo))
    refs = {}
    for k, (dataset, name, items, seed) in enumerate(todo, 1):
        overrides = dict(items)
        started = time.perf_counter()
        d = train(out, dataset, overrides, seed, data[dataset]["files"], splits[dataset], extra, run, commit, threads)
        if dataset not in refs:
            tok = load_tokenizer(str(splits[dataset]))
            reference, pairs = load_model(str(splits[dataset]), trust_remote_code=True).eval(), tokenized(tok, data[dataset]["files"]["heldout"])
            refs[dataset] = (reference, pairs, tok.pad_token_id, reference_sums(reference, pairs, tok.pad_token_id))
        evaluate(d, *refs[dataset][:3], kl_pairs, refs[dataset][3])
        print(f"[{k}/{len(todo)}] {dataset} {name} seed {seed}: {time.perf_counter() - started:.0f} s "
              f"({(time.perf_counter() - t0) / 60:.1f} min)", flush=True)
    return real_report.csv_rows(out, todo, data, run_dir)


def is_real(rows: list[dict]) -> bool:
    """A CSV of this study (it has a dataset column), not of the sort-task studies."""
    return bool(rows) and "dataset" in rows[0]
