"""Evaluate a trained policy against its reference: preference accuracy, reference KL, gold win rates.

Launch (one process, or any number through accelerate; the numbers do not depend on how many):

    python eval.py --config configs/sort.yaml --eval.policy runs/sort_betadpo/final \
        --eval.reference runs/sort_sft/final --eval.output_dir runs/eval
    accelerate launch eval.py --config configs/sort.yaml --eval.policy RUN/final --eval.reference SFT/final \
        --eval.output_dir DIR
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 eval.py --config configs/sort.yaml \
        --eval.policy RUN/final --eval.reference SFT/final

`eval.policy` defaults to `train.output_dir/final`, `eval.reference` to the run's reference
(`model.ref_name_or_path`, else the base model of a LoRA adapter, else `model.name_or_path`), so
`python eval.py --config configs/sort.yaml` evaluates the run that config trains. A LoRA run's final/ (an adapter
directory, plumbing/lora.py) is loaded on its base model with the adapters merged in. Two more flags, drawn by
plumbing/plots.py: training curves of one or more runs (their metrics.jsonl, overlaid in one PNG)

    python eval.py --plot runs/sort_dpo runs/sort_betadpo --plot_out curves.png

and several evaluations side by side (their eval.json, one column each):

    python eval.py --compare runs/eval_sft runs/eval_dpo runs/eval_betadpo

The numbers, for a policy π and its reference π_ref:

  held-out pairs (x, y_w, y_l), log π(y|x) summed over response tokens:
    Δ_w = log π(y_w|x) − log π_ref(y_w|x),   Δ_l likewise
    pref_accuracy = mean 1[Δ_w > Δ_l]               strict: a tie counts as wrong (TRL's convention)
    reward_margin = mean (Δ_w − Δ_l)
  n completions y ~ π(·|x) at temperature T = eval.temperature (samples_per_prompt for each of num_prompts):
    KL_seq(y) = Σ_t Σ_v π(v|x,y_<t) · (log π(v|x,y_<t) − log π_ref(v|x,y_<t))   full vocabulary, each sampled position
    k1(y)     = Σ_t log π(y_t|x,y_<t) − log π_ref(y_t|x,y_<t)                      same expectation, noisier
    kl_seq, kl_k1 = means over the n samples;  kl_seq_se, kl_k1_se = std / √n (standard error; treats the
    samples as independent, though those of one prompt share it)
    (at T ≠ 1 both models' logits are divided by T: the KL between the distributions actually sampled from)
  built-in task only (data.dataset: sort), at temperature 0 (greedy, one completion per prompt) and T:
    gold_reward = mean g(x, y),   exact_match = mean 1[g(x, y) = 1]          g = sort_task.gold_reward
    win_rate_vs_chosen = mean win(g(x, y), g(x, y_w))                         the β-DPO paper's protocol
    win_rate_vs_ref    = mean win(g(x, y), g(x, y_ref)),  y_ref ~ π_ref at the same temperature
    win(a, b) = 1 if a > b,  ½ if a = b,  0 if a < b                          ties count half

Outputs in eval.output_dir (main process only): eval.json (the numbers, the config, model paths and seeds),
generations.jsonl (prompt, policy, reference, chosen at eval.generations_temperature: the input an external
LLM judge needs for HH), pairs.jsonl (per held-out pair, in data order: the policy's and the reference's summed
log-probs of chosen and rejected, from which accuracy and margin intervals over pairs can be bootstrapped), and
a table on the terminal.

Process-count invariance: pairs (in fixed chunks of eval.batch_size) and prompts are sharded over processes,
padded with duplicates that are dropped after gathering, and reduced on the full, ordered set. The samples of
prompt i are drawn after torch.manual_seed(f(eval.seed, i, temperature)), so they do not depend on which
process draws them. For the same reason, `--eval.cache_reference true` can keep the reference's completions in
train.ref_cache_dir and reuse them when the same reference is evaluated again with the same prompts and settings
(many runs from one start): the same samples and numbers, half the generation time.
"""

import plumbing.host_allocator  # noqa: F401  (first: glibc malloc set up before torch loads; docs/SCALING.md)
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

# the β-DPO module's public functions: what is evaluated is what trains
from betadpo import Config, PairLogps, implicit_rewards, score_pairs
from plumbing import lora, plots, sort_task
from plumbing.config import parse_config, validate
from plumbing.data import collate, load_pairs, tokenize, tokenize_pairs
from plumbing.distributed import end_processes, frozen_dtype, load_on_main, main_decides, make_accelerator, shard_frozen
from plumbing.errors import UserError
from plumbing.fast_logps import plain_token_logps, token_logps
from plumbing.models import generate, load_tokenizer, model_identity
from plumbing.stopping import main_guard

LOGP_KEYS = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")


# ========================================================================================================
# PURE FUNCTIONS: the numbers
# ========================================================================================================
def preference_metrics(scores: PairLogps) -> dict:
    """Per-pair summed log-probs ((N,) each, LOGP_KEYS) → pref_accuracy, reward_margin, mean log-probs."""
    sums = dataclasses.replace(scores, **{k: getattr(scores, k).double() for k in LOGP_KEYS})  # (N,) each, fp64
    d_w, d_l = implicit_rewards(sums, "dpo")  # Δ_w, Δ_l
    return {
        "pref_accuracy": (d_w > d_l).double().mean().item(),  # strict: Δ_w = Δ_l is wrong
        "reward_margin": (d_w - d_l).mean().item(),
        "logps/chosen": sums.policy_chosen.mean().item(), "logps/rejected": sums.policy_rejected.mean().item(),
        "ref_logps/chosen": sums.ref_chosen.mean().item(), "ref_logps/rejected": sums.ref_rejected.mean().item(),
    }


def full_vocab_kl(logits_p, logits_q, rows, cols, chunk: int = 256) -> torch.Tensor:
    """KL(p‖q) = Σ_v p_v (log p_v − log q_v), p = softmax(logits_p), q = softmax(logits_q), at the positions
    (rows[k], cols[k]) of two (B, T, V) logit tensors → (N,), fp32.

    Only `chunk` positions × V of the log-softmaxes exist at once, whatever B and T. Identical logits give
    exactly 0 (log p − log q is then exactly 0 everywhere).
    """
    out = [torch.zeros(0, device=logits_p.device)]
    for s in range(0, rows.numel(), chunk):
        r, c = rows[s : s + chunk], cols[s : s + chunk]
        log_p = logits_p[r, c].float().log_softmax(-1)  # (n, V)
        log_q = logits_q[r, c].float().log_softmax(-1)  # (n, V)
        out.append((log_p.exp() * (log_p - log_q)).sum(-1))  # (n,)
    return torch.cat(out)


def sequence_kl(policy, reference, batch: dict, temperature: float, logps: str) -> dict:
    """Sampled (prompt, response) rows in `data.collate` layout → per-row {"kl": KL_seq, "k1": k1}, (B,) each.

    Both sum over response positions only (labels ≠ -100), the positions whose token was sampled. logps:
    train.logps; plain takes k1's log-probs from a whole fp32 log-softmax, the others from the token_logps kernel
    (KL_seq needs every logit anyway: neither packing nor the fused head would save anything here).
    """
    def logits(model):  # (B, T−1, V): position t predicts token t+1
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        return out if temperature == 1 else out.float() / temperature

    lp, lq = logits(policy), logits(reference)
    targets = batch["labels"][:, 1:]  # (B, T−1), -100 off the response
    label_logps = plain_token_logps if logps == "plain" else token_logps
    k1 = (label_logps(lp, targets) - label_logps(lq, targets)).sum(-1)  # Σ_t log π(y_t) − log π_ref(y_t)
    rows, cols = (targets != -100).nonzero(as_tuple=True)  # the N sampled positions
    kl = torch.zeros(targets.shape[0], device=lp.device).index_add_(0, rows, full_vocab_kl(lp, lq, rows, cols))
    return {"kl": kl, "k1": k1}


def mean_and_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error std/√n (unbiased std; 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std / math.sqrt(n)


def win(a: float, b: float) -> float:
    """1 if a beats b, ½ for a tie, 0 otherwise."""
    return 1.0 if a > b else 0.5 if a == b else 0.0


def gold_metrics(prompts: list[str], policy: list[list[str]], reference: list[list[str]], chosen: list[str]) -> dict:
    """Built-in task: policy completions (several per prompt) scored by the gold reward g.

    policy[i][j] is compared with reference[i][j] (same prompt, same sample number) and with chosen[i].
    """
    g = sort_task.gold_reward
    pol, ref, vs_chosen, vs_ref = [], [], [], []
    for x, ys, refs, y_w in zip(prompts, policy, reference, chosen, strict=True):
        for y, y_ref in zip(ys, refs, strict=True):
            pol.append(g(x, y))
            ref.append(g(x, y_ref))
            vs_chosen.append(win(pol[-1], g(x, y_w)))
            vs_ref.append(win(pol[-1], ref[-1]))
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return {
        "gold_reward": mean(pol), "exact_match": mean([r == 1.0 for r in pol]),
        "win_rate_vs_chosen": mean(vs_chosen), "win_rate_vs_ref": mean(vs_ref),
        "ref_gold_reward": mean(ref), "ref_exact_match": mean([r == 1.0 for r in ref]),
    }


def sample_seed(seed: int, i: int, temperature: float, model: int) -> int:
    """torch.manual_seed before the completions of prompt i: a pure function of its arguments (Python's hash()
    of a str is salted per process, so it is not used). model: 0 = policy, 1 = reference."""
    return ((seed * 1_000_003 + i) * 10_007 + round(temperature * 1000)) * 2 + model


def tkey(t: float) -> str:
    return f"t{t:g}"  # 0 → "t0", 1.0 → "t1", 0.7 → "t0.7"


# ========================================================================================================
# SHARDING: work split over processes, results gathered in order
# ========================================================================================================
def shard(n: int, num_processes: int, rank: int) -> list[int]:
    """This process's share of 0…n−1 after padding to a multiple of P with repeats (dropped after gathering)."""
    padded = [i % n for i in range(n + (-n) % num_processes)]
    return padded[rank::num_processes]


def gather_items(items: list[dict], n: int) -> list[dict]:
    """Every process's per-item dicts (each with "index") → the n items in index order, duplicates dropped."""
    from accelerate.utils import gather_object

    by_index = {}
    for item in gather_object(items):  # a no-op in one process
        by_index.setdefault(item["index"], item)
    return [by_index[i] for i in range(n)]


def sample_prompts(accelerator, models: dict, prompts: list[list[int]], temps: dict, tokenizer, cfg: Config,
                   cached_reference: list[dict] | None = None) -> list[dict]:
    """Completions of every prompt and the KL of the policy's samples at eval.temperature.

    models = {"policy": π, "reference": π_ref}; temps = {"policy": [t, ...], "reference": [t, ...]}.
    → per prompt i: {"index": i, "policy@t1": [ids, ...], ..., "kl": [KL_seq per sample], "k1": [...]}, in order.
    At eval.temperature each model draws samples_per_prompt completions of prompt i as one batch; at any other
    temperature (0 = greedy) one. Each batch is drawn right after seeding torch with sample_seed(…, i, t, …).
    cached_reference: per prompt, the reference's completions of an earlier evaluation (eval.cache_reference),
    taken instead of drawing them again: the same ids, since their seeds depend on (eval.seed, i, t) alone.
    """
    E, eos, pad = cfg.eval, tokenizer.eos_token_id, tokenizer.pad_token_id
    items = []
    for i in shard(len(prompts), accelerator.num_processes, accelerator.process_index):
        item = {"index": i}
        for number, (role, model) in enumerate(models.items()):
            if role == "reference" and cached_reference is not None:
                item.update(cached_reference[i])
                continue
            for t in temps[role]:
                torch.manual_seed(sample_seed(E.seed, i, t, number))
                n = E.samples_per_prompt if t == E.temperature else 1
                item[f"{role}@{tkey(t)}"] = generate(model, [prompts[i]] * n, E.max_new_tokens, t, eos, pad)
        samples = [(prompts[i], y) for y in item[f"policy@{tkey(E.temperature)}"]]
        batch = {k: v.to(accelerator.device) for k, v in collate(samples, pad).items()}
        kl = sequence_kl(models["policy"], models["reference"], batch, E.temperature, cfg.train.logps)
        item["kl"], item["k1"] = kl["kl"].tolist(), kl["k1"].tolist()
        items.append(item)
    return gather_items(items, len(prompts))


# ========================================================================================================
# EVALUATION
# ========================================================================================================
def model_paths(cfg: Config) -> tuple[str, str]:
    """(policy, reference): the eval.* paths, or by default the run's final/ and its reference."""
    policy = cfg.eval.policy or str(Path(cfg.train.output_dir) / "final")
    base = lora.adapter_base(policy) if lora.is_adapter_dir(policy) else ""  # a LoRA run's final/: its base model
    return policy, cfg.eval.reference or cfg.model.ref_name_or_path or base or cfg.model.name_or_path


def model_keys(cfg: Config) -> tuple[str, str]:
    """The config keys model_paths took the two paths from, for error messages."""
    policy = "eval.policy" if cfg.eval.policy else "train.output_dir (its final/)"
    sources = (("eval.reference", cfg.eval.reference), ("model.ref_name_or_path", cfg.model.ref_name_or_path))
    adapter = lora.is_adapter_dir(model_paths(cfg)[0]) and lora.adapter_base(model_paths(cfg)[0])
    sources += ((f"{policy}'s {lora.ADAPTER_CONFIG} (base_model_name_or_path)", adapter),)
    reference = next((key for key, value in sources if value), "model.name_or_path")
    return policy, reference


def reference_cache(cfg: Config, ref_path: str, prompts: list[list[int]], temps: list[float]) -> Path:
    """eval.cache_reference: the file in train.ref_cache_dir for the reference's completions, keyed by everything
    they depend on: the reference's weight files, dtype, the tokenized prompts and the sampling settings."""
    E = cfg.eval
    identity = {**model_identity(ref_path), "dtype": cfg.model.dtype, "mixed_precision": cfg.train.mixed_precision,
                "prompts": prompts, "temperatures": temps, "samples_per_prompt": E.samples_per_prompt,
                "temperature": E.temperature, "max_new_tokens": E.max_new_tokens, "seed": E.seed}
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
    return Path(cfg.train.ref_cache_dir) / f"completions-{key}.pt"


@torch.no_grad()
def evaluate(cfg: Config, accelerator) -> dict:
    """→ {"metrics": {...}, "generations": [rows of generations.jsonl], "counts": {...}} on every process."""
    E, D = cfg.eval, cfg.data
    policy_path, ref_path = model_paths(cfg)
    trust = cfg.model.trust_remote_code
    # ---- tokenizers and data ----------------------------------------------------------------------------
    policy_key, ref_key = model_keys(cfg)
    tokenizer = load_tokenizer(policy_path, trust, policy_key)
    if tokenizer.get_vocab() != load_tokenizer(ref_path, trust, ref_key).get_vocab():
        raise UserError(f"policy '{policy_path}' and reference '{ref_path}' have different tokenizers; "
                        "log-prob ratios need one vocabulary")
    rows = load_pairs(D, "eval", tokenizer)
    if not rows:
        raise UserError(f"no held-out pairs to evaluate (data.dataset={D.dataset}, data.eval_size={D.eval_size})")
    pairs = tokenize_pairs(tokenizer, rows, D.max_length, D.max_prompt_length)
    rows = rows[: E.num_prompts]  # prompts to complete: the first held-out ones
    prompts = [p for p, _ in tokenize(tokenizer, [r["prompt"] for r in rows], [""] * len(rows), D.max_length,
                                      D.max_prompt_length)]
    # ---- models (frozen, eval mode): one after the other; under FSDP2 (the accelerate config of training) rank 0
    # alone reads each, in the mixed-precision dtype, and each is sharded before the next is read; otherwise
    # one whole copy per process -------------------------------------------------------------------------
    def load_frozen(path, key):
        # (an adapter: merged into its base)
        load = lambda: lora.load_trained(path, frozen_dtype(cfg, accelerator), trust, key,  # noqa: E731
                                         cfg.model.attn_implementation)
        return shard_frozen(accelerator, load_on_main(accelerator, load).requires_grad_(False).eval())

    models = {role: load_frozen(path, key)
              for role, path, key in (("policy", policy_path, policy_key), ("reference", ref_path, ref_key))}
    sizes = [m.get_output_embeddings().weight.shape[0] for m in models.values()]
    if sizes[0] != sizes[1]:
        raise UserError(f"policy '{policy_path}' has a vocabulary of {sizes[0]} tokens, reference '{ref_path}' "
                        f"of {sizes[1]}: log-prob ratios need one vocabulary")
    # ---- held-out pairs ---------------------------------------------------------------------------------
    scores = score_pairs(accelerator, tuple(models.values()), pairs, tokenizer.pad_token_id, cfg)  # (N,) each
    metrics = preference_metrics(scores)
    columns = (getattr(scores, k).double().tolist() for k in LOGP_KEYS)
    scored_pairs = [dict(zip(LOGP_KEYS, values)) for values in zip(*columns)]
    # ---- completions: KL at eval.temperature; gold metrics at 0 and eval.temperature (built-in task) -----
    gold = D.dataset == "sort"
    T, T_gen = E.temperature, E.generations_temperature
    temps = {"policy": sorted({T, T_gen} | ({0.0} if gold else set())),
             "reference": sorted({T_gen} | ({0.0, T} if gold else set()))}
    cache = reference_cache(cfg, ref_path, prompts, temps["reference"]) if E.cache_reference else None
    # one answer for all
    cached = main_decides(accelerator, lambda: torch.load(cache) if cache is not None and cache.exists() else None)
    if cache is not None:
        accelerator.print(f"reference completions: {cache}"
                          + (" (cached)" if cached is not None else " (drawn, then cached)"))
    with accelerator.autocast():  # train.mixed_precision, as in training and in score_pairs
        done = sample_prompts(accelerator, models, prompts, temps, tokenizer, cfg, cached)
    if cache is not None and cached is None and accelerator.is_main_process:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save([{k: v for k, v in d.items() if k.startswith("reference@")} for d in done],
                   cache.with_suffix(f".{os.getpid()}.tmp"))
        os.replace(cache.with_suffix(f".{os.getpid()}.tmp"), cache)  # atomic: a crash never leaves half a cache
    metrics["kl_seq"], metrics["kl_seq_se"] = mean_and_se([v for d in done for v in d["kl"]])
    metrics["kl_k1"], metrics["kl_k1_se"] = mean_and_se([v for d in done for v in d["k1"]])
    text = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    texts = {key: [[text(y) for y in d[key]] for d in done] for key in done[0] if "@" in key}  # (prompts, samples)
    if gold:
        for t in sorted({0.0, T}):
            k = tkey(t)
            m = gold_metrics([r["prompt"] for r in rows], texts[f"policy@{k}"], texts[f"reference@{k}"],
                             [r["chosen"] for r in rows])
            metrics.update({f"{name}@{k}": v for name, v in m.items()})
    # ---- generations.jsonl rows: first completion of each prompt at generations_temperature --------------
    k = tkey(T_gen)
    generations = []
    for i, r in enumerate(rows):
        row = {"prompt": r["prompt"], "policy": texts[f"policy@{k}"][i][0], "reference": texts[f"reference@{k}"][i][0],
               "chosen": r["chosen"], "temperature": T_gen}
        if gold:
            row.update({f"gold_{key}": sort_task.gold_reward(r["prompt"], row[key])
                        for key in ("policy", "reference", "chosen")})
        generations.append(row)
    counts = {"pairs": len(pairs), "prompts": len(prompts), "samples": sum(len(d["kl"]) for d in done)}
    return {"metrics": metrics, "generations": generations, "counts": counts, "pairs": scored_pairs}


# ========================================================================================================
# OUTPUT
# ========================================================================================================
GOLD_NAMES = ("gold_reward", "exact_match", "win_rate_vs_chosen", "win_rate_vs_ref", "ref_gold_reward",
              "ref_exact_match")


def format_table(metrics: dict) -> str:
    """Aligned name/value lines; ± standard errors beside the KLs; gold metrics as one row per name, one
    column per temperature."""
    lines = []
    for name, value in metrics.items():
        if name.endswith("_se") or "@" in name:
            continue
        se = metrics.get(f"{name}_se")
        lines.append(f"{name:<22}{value:>10.4f}" + (f" ± {se:.4f}" if se is not None else ""))
    temps = sorted({n.split("@")[1] for n in metrics if "@" in n}, key=lambda k: float(k[1:]))
    if temps:
        lines.append(f"{'':<22}" + "".join(f"{'@' + k:>10}" for k in temps))
        for name in GOLD_NAMES:
            lines.append(f"{name:<22}" + "".join(f"{metrics[f'{name}@{k}']:>10.4f}" for k in temps))
    return "\n".join(lines)


def write_outputs(cfg: Config, result: dict, out: Path, num_processes: int, wall_s: float) -> list[Path]:
    policy_path, ref_path = model_paths(cfg)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "metrics": result["metrics"], "counts": result["counts"], "policy": policy_path, "reference": ref_path,
        "seeds": {"eval.seed": cfg.eval.seed, "data.seed": cfg.data.seed}, "num_processes": num_processes,
        "wall_s": wall_s, "config": dataclasses.asdict(cfg),
    }
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in result["generations"]))
    # Per held-out pair, in data order: the four summed log-probs (bootstrap intervals over pairs need them).
    (out / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in result["pairs"]))
    return [out / "eval.json", out / "generations.jsonl", out / "pairs.jsonl"]


# ========================================================================================================
# main
# ========================================================================================================
HELP = """Evaluate a trained policy against its reference (eval.policy, eval.reference). Two more modes:
  python eval.py --plot RUN_DIR [RUN_DIR ...] [--plot_out PNG]   training curves of runs (their metrics.jsonl)
  python eval.py --compare EVAL_DIR [EVAL_DIR ...]               several eval.json side by side
"""


def main():
    # Pictures and tables of finished runs are plumbing/plots.py's; eval.py only routes its two flags there,
    # before the config parser (which knows neither).
    if "--plot" in sys.argv[1:]:
        return plots.plot_main(sys.argv[1:])
    if sys.argv[1:2] == ["--compare"]:  # python eval.py --compare EVAL_DIR [EVAL_DIR ...]
        return print(plots.compare_table(sys.argv[2:]))
    t0 = time.perf_counter()
    cfg = parse_config(Config, description=HELP)
    validate(cfg)
    accelerator = make_accelerator(cfg)  # train.mixed_precision (bf16 matmuls on GPUs), process-group timeout
    result = evaluate(cfg, accelerator)
    if accelerator.is_main_process:
        written = write_outputs(cfg, result, Path(cfg.eval.output_dir), accelerator.num_processes,
                                time.perf_counter() - t0)
        policy_path, ref_path = model_paths(cfg)
        c = result["counts"]
        print(f"policy     {policy_path}\nreference  {ref_path}\n"
              f"{c['pairs']} held-out pairs, {c['prompts']} prompts, {c['samples']} samples at temperature "
              f"{cfg.eval.temperature:g}")
        print(format_table(result["metrics"]))
        print("wrote " + ", ".join(map(str, written)) + f" ({time.perf_counter() - t0:.1f} s)")
    end_processes(accelerator)  # wait for all, let the collectives settle, destroy the process group


if __name__ == "__main__":
    main_guard(main)
