"""β-DPO: Direct Preference Optimization with a dynamic β, in one file you can read top to bottom.

Launch (one process, or any number through accelerate):

    python betadpo.py --config configs/sort.yaml
    accelerate launch betadpo.py --config configs/sort.yaml
    accelerate launch --config_file configs/accelerate/fsdp.yaml betadpo.py --config configs/internlm2.yaml
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 betadpo.py --config configs/sort.yaml

Any config field can be overridden on the command line, e.g. `--loss.alpha 0 --loss.filter_ratio 0` (plain DPO).

The math (Wu et al., "β-DPO: Direct Preference Optimization with Dynamic β", NeurIPS 2024,
https://arxiv.org/abs/2407.08639; the authors' reference code: https://github.com/junkangwu/beta-DPO),
for pairs (x, y_w, y_l), policy π_θ, frozen reference π_ref, and one calibration batch of N pairs:

    log π(y|x)  = Σ_t log π(y_t | x, y_<t)                        response tokens only
    M_i         = [log π_θ(y_w|x) − log π_ref(y_w|x)] − [log π_θ(y_l|x) − log π_ref(y_l|x)]     margin (no β₀)
    M₀ ← m·M₀ + (1−m)·mean(M),   σ ← m·σ + (1−m)·std(M)           moving averages, training batches only
    w_i = exp(−(M_i − M₀)² / 2σ²)                                   β-guided filter: keep K = max(1, ⌊N(1−ρ)⌋)
                                                                    pairs, drawn without replacement ∝ w_i
    β_batch = β₀ · (1 + α · (mean_{kept} M_i − M₀)),  ≥ β_min       dynamic β, detached
    β_i = β_batch · s_i,  s_i = softplus(c) · log PPL_θ(x_i)        EXTENSION, not in the paper: optional
                                                                    learnable, perplexity-scaled β(x)
    L = (1/K) Σ_{kept} −log σ(β_i · M_i)                            (or IPO / SimPO / ORPO, below)

The paper writes the margin with β₀ inside; here, as in the reference code, it is left out, so α here (the
reference code's `a`) is the paper's α·β₀. The β(x) extension follows the learnable-scale design in
https://github.com/1587causalai/llama_factory (dpo_baseline/learnable_beta_scale.md, branch ledpo).
With α = 0, ρ = 0 and no scale this is exactly DPO (Rafailov et al., 2023, https://arxiv.org/abs/2305.18290;
original code: https://github.com/eric-mitchell/direct-preference-optimization).
docs/ALGORITHM.md: the same equations with the reasons behind them, where we differ from the reference code
and why, and its flags mapped to ours.

File layout: CONFIG (a note) → THE β-DPO MATH (pure functions of tensors, the state they update, the loss) →
LOG-PROBS (the textbook computation) → TRAINING LOOP (setup in named steps, then the loop) → main →
APPENDIX (the memory-saving log-prob path; skip on first read). Shared plumbing is in common.py, data in data.py.
"""

import array
import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import Config, LossArgs, UserError, main_guard, parse_config, validate  # config, one-line errors
from common import load_model, load_tokenizer, model_identity, token_logps  # models; the log-prob kernel (APPENDIX)
from common import (load_checkpoint, make_optimizer, make_scheduler, no_sync_unless_last, open_run, optimizer_step,  # training
                    resume_point, save_checkpoint, save_final, start_run)  # plumbing shared with sft.py
from data import collate_pairs, load_pairs, micro_batch_indices, tokenize_pairs
from plumbing.fused_head import fused_head_applies, fused_logps_at  # the fused LM head (APPENDIX, 2b)

# ========================================================================================================
# CONFIG: the dataclasses live in common.py (every field is a flag; `python betadpo.py --help` lists them).
# The β-DPO knobs, with their symbols:
#   loss.beta β₀ · loss.alpha α (the paper's α·β₀; 0 = static β) · loss.filter_ratio ρ (fraction dropped; 0 = off)
#   loss.momentum m (of M₀ and σ) · loss.beta_min β_min · loss.type (dpo | ipo | simpo | orpo)
#   β(x) extension: loss.ppl_scale, loss.learn_scale (c), loss.beta_scale_init (softplus(c₀)), loss.scale_lr
#   Variants and controls (docs/RESULTS.md): loss.beta_level (batch | instance) · loss.alpha_units (nats | sigma:
#   scale-free, not in the paper) · loss.filter (margin | uniform: random drop) · loss.beta_sequence (replayed βs)
#   N, the calibration batch = train.batch_size / train.grad_accum pairs, over all processes together.
# A new knob: a field of LossArgs in common.py (it becomes --loss.<name>; its range check goes in validate()).
# ========================================================================================================


# ========================================================================================================
# THE β-DPO MATH: pure functions of tensors, the small state they update, and the loss that calls them.
# To try a new β schedule, change `batch_beta` (per batch) or `beta_scale` (per pair); betadpo_loss calls
# each once (steps 4 and 5), with the state (M₀, σ, c, step) at hand.
# ========================================================================================================
REFERENCE_FREE = ("simpo", "orpo")
SIGMA_FLOOR = 1e-6  # below this σ the Gaussian weights are meaningless: filter uniformly


def implicit_rewards(stats: dict, loss_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-response rewards whose difference is the margin, before β (each (B,)).

    DPO/IPO:      Δ_w = log π_θ(y_w|x) − log π_ref(y_w|x),  Δ_l likewise.
    SimPO/ORPO:   the length-normalised avg log π_θ(y|x) (reference-free).
    """
    if loss_type in REFERENCE_FREE:
        return stats["policy_chosen_avg"], stats["policy_rejected_avg"]
    return stats["policy_chosen"] - stats["ref_chosen"], stats["policy_rejected"] - stats["ref_rejected"]


def margins(stats: dict, loss_type: str) -> torch.Tensor:
    """M_i = Δ_w − Δ_l, *without* β₀ (as the reference code; the paper writes β₀ inside M). (B,)"""
    chosen, rejected = implicit_rewards(stats, loss_type)
    return chosen - rejected


def update_statistics(M0, sigma, M, momentum: float):
    """M₀ ← m·M₀ + (1−m)·mean(M),  σ ← m·σ + (1−m)·std(M)  (unbiased std, as the reference code). M: (N,)

    Both start at 0 (reference code). Called on training batches only: the reference code also updated them
    on evaluation batches, which lets held-out data steer training; we don't.
    """
    std = M.std() if M.numel() > 1 else torch.zeros_like(M.sum())
    return momentum * M0 + (1 - momentum) * M.mean(), momentum * sigma + (1 - momentum) * std


def filter_log_weights(M, M0, sigma) -> torch.Tensor:
    """log w_i = −(M_i − M₀)² / 2σ²: pairs whose margin is near the running mean are the informative ones.

    Uniform (all zeros) when σ < SIGMA_FLOOR or every w_i underflows to 0. At step 0 the policy equals the
    reference, every M_i = 0 and σ = 0: the reference code divides by zero there and samples from NaNs.
    """
    log_w = -((M - M0) ** 2) / (2 * sigma.clamp(min=SIGMA_FLOOR) ** 2)
    degenerate = (sigma < SIGMA_FLOOR) | (log_w.exp().sum() == 0)
    return torch.where(degenerate, torch.zeros_like(log_w), log_w)


def filter_mask(M, M0, sigma, filter_ratio: float, generator: torch.Generator, uniform: bool = False) -> torch.Tensor:
    """Keep K = max(1, ⌊N(1−ρ)⌋) of N pairs, drawn without replacement with probability ∝ w_i. (N,) bool.

    Drawn with the Gumbel-top-k trick: the K largest log w_i + Gumbel_i are distributed exactly as K draws
    without replacement ∝ w_i (as torch.multinomial), but work in log space, so pairs with w_i that underflow
    can still fill the K places. `generator` is shared and in the same state on every process, and the
    margins are gathered, so every rank computes the same mask (the reference code drew per rank).
    uniform (loss.filter=uniform, a control, not in the paper): every w_i equal, i.e. K pairs at random —
    the same number dropped, without looking at the margins.
    """
    N = M.numel()
    keep = max(1, math.floor(N * (1 - filter_ratio)))
    if keep == N:
        return torch.ones(N, dtype=torch.bool, device=M.device)
    u = torch.rand(N, generator=generator, device=generator.device).to(M.device)
    gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1 - 1e-7)))
    log_w = torch.zeros_like(M) if uniform else filter_log_weights(M, M0, sigma)
    chosen = (log_w + gumbel).topk(keep).indices
    return torch.zeros(N, dtype=torch.bool, device=M.device).index_fill_(0, chosen, True)


def batch_beta(beta0: float, alpha: float, M, kept, M0, beta_min: float, sigma=None, instance: bool = False) -> torch.Tensor:
    """β_batch = β₀ · (1 + α · (mean_{kept} M_i − M₀)), clamped to ≥ β_min and detached. M: (N,), kept: (N,) bool.

    Batches whose margins run above the running mean (easy pairs, large gap) get a larger β, i.e. stay
    closer to the reference; batches below it get a smaller β and move more aggressively.
    Two variants, both off by default:
    - sigma given (loss.alpha_units=sigma; an extension, NOT in the paper): the gap is measured in units of σ,
      β = β₀ · (1 + α · (mean_{kept} M_i − M₀) / σ), so α means the same on any task whatever its margins' scale.
      With raw nats (the paper, the reference code) α = 0.6 is mild where margins spread over ±1 nat and
      drives β to its floor where they spread over ±10.
    - instance (loss.beta_level=instance; the paper's Table 2 baseline): β_i = β₀ · (1 + α · (M_i − M₀)) per
      pair, (N,), instead of one β for the batch.
    """
    gap = M - M0 if instance else kept_mean(M, kept) - M0  # (N,) or ()
    if sigma is not None:
        gap = gap / sigma.clamp(min=SIGMA_FLOOR)
    return (beta0 * (1 + alpha * gap)).clamp(min=beta_min).detach()


def kept_mean(values, kept):
    """mean of values[kept], as a masked sum: boolean indexing would make the host wait for the device."""
    return (values * kept).sum() / kept.sum()


def prompt_log_ppl(stats: dict) -> torch.Tensor:
    """log PPL_θ(x) per pair, (B,). pair_logps computes it only when β(x) uses it (loss.ppl_scale); otherwise
    zeros stand in, which beta_scale reads for their shape alone."""
    return stats["log_ppl"] if "log_ppl" in stats else torch.zeros_like(stats["policy_chosen"]).detach()


def beta_scale(c, log_ppl, ppl_scale: bool, learn_scale: bool) -> torch.Tensor:
    """s_i = softplus(c) · log max(PPL_θ(x_i), 1) with ppl_scale; softplus(c) with learn_scale only; else 1.

    log_ppl is detached, so the gradient of the loss reaches c through s_i alone. (B,)
    """
    if not (ppl_scale or learn_scale):
        return torch.ones_like(log_ppl)
    s = F.softplus(c).expand_as(log_ppl)
    return s * log_ppl.clamp(min=0) if ppl_scale else s


def preference_losses(loss_type: str, beta, stats: dict, label_smoothing=0.0, simpo_gamma=0.5) -> torch.Tensor:
    """Per-pair loss ℓ_i with per-pair β_i. (B,)

    dpo    ℓ = −(1−ε)·log σ(β·M) − ε·log σ(−β·M)            ε = label_smoothing (conservative DPO)
    ipo    ℓ = (M̄ − 1/(2β))²                                 M̄ from length-normalised log-ratios
    simpo  ℓ = −log σ(β·M − γ)                               M from avg log π_θ (reference-free)
    orpo   ℓ = −avg log π_θ(y_w|x) − β·log σ(log odds_w − log odds_l),  odds = p/(1−p), p = exp(avg log π_θ)
    """
    if loss_type == "dpo":
        M = margins(stats, "dpo")
        return -(1 - label_smoothing) * F.logsigmoid(beta * M) - label_smoothing * F.logsigmoid(-beta * M)
    if loss_type == "ipo":
        M_avg = (stats["policy_chosen_avg"] - stats["ref_chosen_avg"]) - (stats["policy_rejected_avg"] - stats["ref_rejected_avg"])
        return (M_avg - 1 / (2 * beta)) ** 2
    if loss_type == "simpo":
        return -F.logsigmoid(beta * margins(stats, "simpo") - simpo_gamma)
    if loss_type == "orpo":
        def log_odds(avg_logp):  # log(p / (1 − p)), with 1 − p = −expm1(log p) kept away from 0
            return avg_logp - torch.log(-torch.expm1(avg_logp.clamp(max=-1e-6)))
        ratio = log_odds(stats["policy_chosen_avg"]) - log_odds(stats["policy_rejected_avg"])
        return -stats["policy_chosen_avg"] - beta * F.logsigmoid(ratio)
    raise ValueError(f"unknown loss type {loss_type!r}")


class BetaDPOState:
    """Everything β-DPO carries from batch to batch, saved with each checkpoint.

    M0, sigma: the moving averages (0-dim tensors, start at 0). c: the raw β-scale, softplus(c) = scale,
    a trainable nn.Parameter with learn_scale, else a constant. generator: the filter's random generator,
    seeded from train.seed, identical on every process. step: optimizer steps done.
    """

    def __init__(self, loss_cfg: LossArgs, seed: int, device):
        self.step = 0
        self.M0 = torch.zeros((), device=device)
        self.sigma = torch.zeros((), device=device)
        # c₀ = softplus⁻¹(init) = log(expm1(init)), so that `beta_scale_init` is the *effective* starting scale.
        # The learnable-scale design initialised c itself (so its "init 1.0" meant a scale of softplus(1) ≈ 1.31).
        c0 = math.log(math.expm1(loss_cfg.beta_scale_init))
        self.c = torch.nn.Parameter(torch.tensor(c0, device=device), requires_grad=loss_cfg.learn_scale)
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def state_dict(self) -> dict:
        return {"step": self.step, "M0": self.M0.cpu(), "sigma": self.sigma.cpu(), "c": self.c.detach().cpu(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, sd: dict):
        self.step = sd["step"]
        self.M0, self.sigma = sd["M0"].to(self.M0.device), sd["sigma"].to(self.sigma.device)
        with torch.no_grad():
            self.c.copy_(sd["c"])
        self.generator.set_state(sd["generator"])


def betadpo_loss(stats: dict, batch_stats: dict, state: BetaDPOState, cfg: LossArgs, rank: int, num_processes: int, train: bool,
                 replayed_beta: float | None = None):
    """One calibration batch of β-DPO (docs/ALGORITHM.md, steps 1–6).

    stats:       this process's pairs, (B,) tensors with the policy's graph (from `pair_logps`).
    batch_stats: the whole calibration batch's stats: the same stats detached and gathered over all processes,
                 (N,) = (P·B,), identical on every process.
    train:       update M₀/σ and filter; at evaluation neither happens and every pair counts.
    replayed_beta: loss.beta_sequence's β for this step, used instead of step 4's (a control).
    Returns (loss to backpropagate on this process, summary of the whole calibration batch).
    """
    # 1. Margins of the whole calibration batch, the same on every process.
    M = margins(batch_stats, cfg.type)  # (N,)
    # 2. Moving averages, on training batches only.
    if train:
        state.M0, state.sigma = update_statistics(state.M0, state.sigma, M, cfg.momentum)
    # 3. β-guided filtering: the same mask on every process.
    if train and cfg.filter_ratio > 0:
        kept = filter_mask(M, state.M0, state.sigma, cfg.filter_ratio, state.generator, cfg.filter == "uniform")  # (N,) bool
    else:
        kept = torch.ones_like(M, dtype=torch.bool)
    # 4. Batch-level β from the kept pairs' margins (α = 0: β_batch = β₀). () — or (N,) with beta_level=instance.
    sigma = state.sigma if cfg.alpha_units == "sigma" else None
    beta_b = batch_beta(cfg.beta, cfg.alpha, M, kept, state.M0, cfg.beta_min, sigma, cfg.beta_level == "instance")
    if replayed_beta is not None:
        beta_b = torch.full_like(beta_b, replayed_beta)
    # 5. Per-pair β_i = β_batch · s_i; gradients reach c through s_i only.
    B = stats["policy_chosen"].shape[0]
    beta_here = beta_b if beta_b.dim() == 0 else beta_b[rank * B : (rank + 1) * B]  # this process's pairs
    beta_i = beta_here * beta_scale(state.c, prompt_log_ppl(stats), cfg.ppl_scale, cfg.learn_scale)  # (B,)
    # 6. Loss over this process's kept pairs, normalised by the *global* kept count K. Each process returns
    #    (P/K)·Σ_{its kept} ℓ_i; DDP/FSDP average gradients over P, giving ∇(1/K)·Σ_{all kept} ℓ_i: the same
    #    gradient on 1 or P processes. (The reference code averaged per process: a different weighting.)
    kept_here = kept[rank * B : (rank + 1) * B]
    per_pair = preference_losses(cfg.type, beta_i, stats, cfg.label_smoothing, cfg.simpo_gamma)
    K = kept.sum()
    loss = (per_pair * kept_here).sum() * num_processes / K
    return loss, summarize(batch_stats, M, kept, beta_b, state, cfg)


def summarize(batch_stats: dict, M, kept, beta_b, state: BetaDPOState, cfg: LossArgs) -> dict:
    """Logged numbers of one calibration batch (0-dim tensors). Rewards use the β actually applied, β_i —
    the reference code logged them with the static β₀."""
    with torch.no_grad():
        beta_i = beta_b * beta_scale(state.c, prompt_log_ppl(batch_stats), cfg.ppl_scale, cfg.learn_scale)  # (N,)
        r_w, r_l = implicit_rewards(batch_stats, cfg.type)
        centred = M - M.mean()
        summary = {
            "beta": beta_b.mean(), "beta_mean": beta_i.mean(),
            "beta_floor": (beta_b <= cfg.beta_min).float().mean(),  # share of β at its floor β_min (1 or 0 per batch-level β)
            "beta_scale": F.softplus(state.c) if (cfg.ppl_scale or cfg.learn_scale) else torch.ones_like(M.sum()),
            "M0": state.M0, "sigma": state.sigma,
            "margin_mean": M.mean(), "margin_std": M.std() if M.numel() > 1 else torch.zeros_like(M.sum()),
            "margin_skew": (centred ** 3).mean() / (centred ** 2).mean().clamp(min=1e-12) ** 1.5,  # raw margins' skewness
            "kept_margin_mean": kept_mean(M, kept), "kept": kept.sum().float(), "pairs": torch.full_like(M.sum(), M.numel()),
            "rewards/chosen": (beta_i * r_w).mean(), "rewards/rejected": (beta_i * r_l).mean(),
            "rewards/margins": (beta_i * (r_w - r_l)).mean(), "rewards/accuracies": (r_w > r_l).float().mean(),
            "logps/chosen": batch_stats["policy_chosen"].mean(), "logps/rejected": batch_stats["policy_rejected"].mean(),
            "tokens": batch_stats["tokens"].sum(),
        }
        if "log_ppl" in batch_stats:  # computed when β(x) uses it (loss.ppl_scale)
            summary["log_ppl"] = batch_stats["log_ppl"].mean()
        return summary


# ========================================================================================================
# LOG-PROBS: the numbers the math consumes, from one forward pass per model and batch.
# plain_sequence_logps is the textbook computation. Training calls sequence_logps (APPENDIX), its documented
# equivalent: the same numbers and gradients (tests/test_perf.py) with far less memory.
# ========================================================================================================
def plain_sequence_logps(model, batch: dict, prompt_rows: int = 0) -> dict:
    """One forward pass → per-row response log-prob sums/means, and the prompt's mean log-prob for rows [0, prompt_rows).

    batch: as `data.collate_pairs` makes it: input_ids, attention_mask, labels (-100 on prompt and padding), prompt_lens.
    Returns (B,) tensors: `sum` = Σ_t log π(y_t|x,y_<t) over response tokens, `avg` = sum / #response tokens,
    `prompt` = mean_t log π(x_t|x_<t) over prompt tokens 1…|x|−1 (token 0 has no context; 0 for rows ≥ prompt_rows).
    """
    ids = batch["input_ids"]  # (B, T)
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, :-1]  # (B, T−1, V): position t predicts token t+1
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least (bf16 → fp32; fp64 stays)
    # A full (B, T−1, V) fp32 log-softmax: the memory the APPENDIX's sequence_logps avoids holding.
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]  # (B, T−1): log π(token t+1 | tokens ≤ t)
    response, in_prompt = position_masks(batch, prompt_rows)
    return logp_sums(logp, response, in_prompt)


def position_masks(batch: dict, prompt_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which positions t (predicting token t+1) count: (response, in_prompt), (B, T−1) bool each.
    in_prompt: the predicted token is a prompt token (1…|x|−1), only in rows [0, prompt_rows)."""
    ids = batch["input_ids"]  # (B, T)
    response = batch["labels"][:, 1:] != -100  # (B, T−1)
    predicted = torch.arange(1, ids.shape[1], device=ids.device)  # (T−1,): the index of the token position t predicts
    in_prompt = predicted[None, :] < batch["prompt_lens"][:, None]  # (B, T−1)
    in_prompt[prompt_rows:] = False
    return response, in_prompt


def logp_sums(logp, response, in_prompt) -> dict:
    """Per-token log-probs (B, T−1) → {sum, avg} over response tokens and the prompt's mean, (B,) each."""
    total = (logp * response).sum(-1)
    return {"sum": total, "avg": total / response.sum(-1).clamp(min=1), "prompt": (logp * in_prompt).sum(-1) / in_prompt.sum(-1).clamp(min=1)}


REF_KEYS = ("ref_chosen", "ref_rejected", "ref_chosen_avg", "ref_rejected_avg")


def pair_logps(policy, reference, batch: dict, with_ppl: bool = False) -> dict:
    """Chosen rows [0, B) and rejected rows [B, 2B) of one concatenated batch → per-pair (B,) tensors.

    Keys: policy_{chosen,rejected}[_avg], ref_{chosen,rejected}[_avg] (absent when reference is None:
    SimPO and ORPO need none; taken from the batch when precomputed), tokens = non-padding tokens of the pair,
    and with `with_ppl` (β(x) needs it: loss.ppl_scale) log_ppl = log PPL_θ(x) = −mean log π_θ(x_t|x_<t) of the
    prompt (detached; from the chosen rows, no extra forward, but the LM head then runs on the prompt too).
    sequence_logps (APPENDIX) is plain_sequence_logps computed with less memory.
    """
    B = batch["input_ids"].shape[0] // 2
    pol = sequence_logps(policy, batch, prompt_rows=B if with_ppl else 0)  # chosen and rejected rows share the prompt
    out = {
        "policy_chosen": pol["sum"][:B], "policy_rejected": pol["sum"][B:],
        "policy_chosen_avg": pol["avg"][:B], "policy_rejected_avg": pol["avg"][B:],
        "tokens": (batch["attention_mask"][:B].sum(-1) + batch["attention_mask"][B:].sum(-1)).float(),
    }
    if with_ppl:
        out["log_ppl"] = -pol["prompt"][:B].detach()
    if "ref_chosen" in batch:  # precomputed (train.precompute_ref): no reference forward at all
        out.update({k: batch[k] for k in REF_KEYS})
    elif reference is not None:
        with torch.no_grad():
            ref = sequence_logps(reference, batch)
        out.update({
            "ref_chosen": ref["sum"][:B], "ref_rejected": ref["sum"][B:],
            "ref_chosen_avg": ref["avg"][:B], "ref_rejected_avg": ref["avg"][B:],
        })
    return out


# ========================================================================================================
# TRAINING LOOP: the setup in a few named steps, then one loop. Around the algorithm only: batches spread
# over processes, held-out evaluation, the optional precomputed reference.
# ========================================================================================================
SUMMED = ("kept", "pairs", "tokens")  # summed over a step's micro-batches; everything else is averaged
LAST = ("M0", "sigma", "beta_scale")  # state after the step
EVAL_KEYS = ("beta", "beta_mean", "margin_mean", "margin_std", "rewards/chosen", "rewards/rejected",
             "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "pairs")  # held-out rows


def gather(accelerator, stats: dict) -> dict:
    """Detach and all-gather per-pair stats: (B,) on each process → (P·B,) in process order, on every process."""
    return accelerator.gather({k: v.detach() for k, v in stats.items()})


def score_pairs(accelerator, policy, reference, pairs, pad_id, batch_size: int, ref_values: dict | None = None,
                with_ppl: bool = False) -> dict:
    """`pair_logps` over a list of pairs without gradients → (num_pairs,) tensors in order, on every process.

    Pairs go through the model in fixed chunks of `batch_size`, dealt out to processes and gathered: the
    same chunks (so the same padding and the same floating-point results) on any number of processes.
    Every process runs the same number of forwards, repeating chunk 0 where it has run out: a DDP forward
    broadcasts buffers and an FSDP forward gathers shards, so a process that skipped one would hang the rest.
    ref_values: precomputed reference log-probs, (num_pairs,) tensors, put into each chunk's batch.
    """
    from accelerate.utils import gather_object

    chunks = [list(range(s, min(s + batch_size, len(pairs)))) for s in range(0, len(pairs), batch_size)]
    P = accelerator.num_processes
    was_training = policy.training
    policy.eval()
    mine = []
    with torch.no_grad(), accelerator.autocast():
        for c in range(accelerator.process_index, -(-len(chunks) // P) * P, P):
            rows = chunks[c] if c < len(chunks) else chunks[0]  # a padding forward, result dropped below
            batch = collate_pairs([pairs[j] for j in rows], pad_id)
            batch.update({k: v[rows] for k, v in (ref_values or {}).items()})
            stats = pair_logps(policy, reference, {k: v.to(accelerator.device) for k, v in batch.items()}, with_ppl)
            if c < len(chunks):
                mine.append((c, {k: v.float().cpu() for k, v in stats.items()}))
    policy.train(was_training)
    gathered = [stats for _, stats in sorted(gather_object(mine), key=lambda item: item[0])]  # every chunk, in order
    return {k: torch.cat([s[k] for s in gathered]).to(accelerator.device) for k in gathered[0]}


def evaluate_held_out(accelerator, policy, reference, pairs, pad_id, state, cfg: Config, ref_values=None) -> dict:
    """Held-out pairs summarised as one calibration batch with `train=False`: no M₀/σ update, no filtering
    (the reference code updated both on evaluation batches). Numbers do not depend on the process count.
    (eval.py's `evaluate` is the separate, full evaluation of a saved model.)"""
    batch_stats = score_pairs(accelerator, policy, reference, pairs, pad_id, cfg.eval.batch_size, ref_values, cfg.loss.ppl_scale)
    loss, summary = betadpo_loss(batch_stats, batch_stats, state, cfg.loss, 0, 1, train=False)
    return {"loss": loss.item(), **{k: v.item() for k, v in summary.items() if k in EVAL_KEYS}}


def _token_hash(pairs) -> str:
    h = hashlib.sha256()
    for p, c, r in pairs:
        h.update(array.array("q", [*p, -1, *c, -2, *r, -3]).tobytes())
    return h.hexdigest()


def precompute_reference_logps(accelerator, cfg: Config, reference, pairs, pad_id, name: str) -> dict:
    """train.precompute_ref: the reference's log-probs of every pair, computed once (no grad) and cached in
    `train.ref_cache_dir` under a key of the reference model's files, the dtypes and the tokenized pairs.
    → {ref_chosen, ref_rejected, ref_chosen_avg, ref_rejected_avg}: (num_pairs,) CPU tensors."""
    ref_id = model_identity(cfg.model.ref_name_or_path or cfg.model.name_or_path)  # its path and weight files
    identity = {"reference": ref_id["model"], "files": ref_id["files"],
                "dtype": cfg.model.dtype, "mixed_precision": cfg.train.mixed_precision, "pairs": _token_hash(pairs)}
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
    path = Path(cfg.train.ref_cache_dir) / f"{name}-{key}.pt"
    if path.exists():
        accelerator.print(f"reference log-probs: {path} (cached)")
        return torch.load(path)
    accelerator.print(f"reference log-probs: one pass over {len(pairs)} {name} pairs → {path}")
    scored = score_pairs(accelerator, reference, None, pairs, pad_id, cfg.eval.batch_size)
    values = {f"ref_{k[len('policy_'):]}": scored[k].cpu() for k in ("policy_chosen", "policy_rejected", "policy_chosen_avg", "policy_rejected_avg")}
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(values, path.with_suffix(f".{os.getpid()}.tmp"))
        os.replace(path.with_suffix(f".{os.getpid()}.tmp"), path)  # atomic: a crash never leaves half a cache
    return values


def load_pairs_for(cfg: Config, tokenizer, split: str) -> list:
    """The tokenized (prompt, chosen, rejected) id lists of one split, "train" or "eval" (data.py)."""
    rows = load_pairs(cfg.data, split, tokenizer)
    return tokenize_pairs(tokenizer, rows, cfg.data.max_length, cfg.data.max_prompt_length)


def load_policy_and_reference(cfg: Config):
    """→ (policy to train, frozen reference π_ref or None). None for the reference-free losses (SimPO, ORPO),
    and when the reference log-probs are precomputed from the policy's own start: before step 1 the policy
    *is* the reference, so no second model is loaded."""
    policy = load_model(cfg.model.name_or_path, cfg.model.dtype, cfg.model.trust_remote_code)
    if cfg.train.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    needs_reference = cfg.loss.type not in REFERENCE_FREE
    policy_scores_itself = cfg.train.precompute_ref and not cfg.model.ref_name_or_path
    if not needs_reference or policy_scores_itself:
        return policy, None
    ref_key = "model.ref_name_or_path" if cfg.model.ref_name_or_path else "model.name_or_path"
    reference = load_model(cfg.model.ref_name_or_path or cfg.model.name_or_path, cfg.model.dtype, cfg.model.trust_remote_code, ref_key)
    return policy, reference.requires_grad_(False).eval()


def load_beta_sequence(path: str, total_steps: int) -> list[float]:
    """loss.beta_sequence: a JSON list of β values, one per optimizer step ([] when unset). A control experiment
    feeds plain DPO another run's βs (e.g. shuffled) to tell "which β when" from "how much β overall"."""
    if not path:
        return []
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"loss.beta_sequence: cannot read a JSON list from '{path}': {e}") from None
    if not (isinstance(values, list) and all(isinstance(v, (int, float)) and v > 0 for v in values)):
        raise UserError(f"loss.beta_sequence: '{path}' must hold a JSON list of positive numbers")
    if len(values) < total_steps:
        raise UserError(f"loss.beta_sequence: '{path}' has {len(values)} values, training needs one per step ({total_steps})")
    return [float(v) for v in values]


def make_scale_optimizer(cfg: Config, state: BetaDPOState, device):
    """With loss.learn_scale: (optimizer, scheduler) for c alone; else (None, None).

    c is no parameter of the model, and FSDP2 maps every parameter of a prepared optimizer to one of the model's
    (to shard it, and to checkpoint it by name): so c has an optimizer of its own, of the same kind, with its own
    lr and no weight decay, which accelerate does not prepare and checkpoints as a plain object. Not clipped.
    """
    if not cfg.loss.learn_scale:
        return None, None
    optimizer = make_optimizer(cfg.train, [state.c], device, lr=cfg.loss.scale_lr or cfg.train.lr, weight_decay=0.0)
    return optimizer, make_scheduler(optimizer, cfg.train.warmup_steps)


def train(cfg: Config):
    from accelerate.utils import fsdp2_prepare_model
    from tqdm.auto import tqdm

    # ---- 1. accelerator, launch and config checks, seed ------------------------------------------------
    accelerator = start_run(cfg)  # common.py; stops with one line, before anything is written, on a bad launch/config
    P, rank = accelerator.num_processes, accelerator.process_index
    out = Path(cfg.train.output_dir)
    # ---- 2. data ---------------------------------------------------------------------------------------
    if cfg.model.name_or_path == "tiny":
        raise UserError("model.name_or_path: β-DPO starts from a trained policy; run sft.py first and pass its final/ dir")
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    train_pairs = load_pairs_for(cfg, tokenizer, "train")
    eval_pairs = load_pairs_for(cfg, tokenizer, "eval")
    lengths = tuple(len(p) + max(len(c), len(r)) for p, c, r in train_pairs) if cfg.train.group_by_length else None
    calib_size = cfg.train.batch_size // cfg.train.grad_accum  # N: pairs in one calibration batch (all processes)
    per_process = calib_size // P  # B
    steps_per_epoch = len(train_pairs) // cfg.train.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"data: {len(train_pairs)} training pairs is fewer than train.batch_size={cfg.train.batch_size}")
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    ckpt, finished = resume_point(accelerator, out, total_steps)  # the newest intact checkpoint, or a finished run
    if finished:
        return out
    # ---- 3. models, β-DPO state, optimizers ------------------------------------------------------------
    policy, reference = load_policy_and_reference(cfg)
    state = BetaDPOState(cfg.loss, cfg.train.seed, accelerator.device)
    optimizer = make_optimizer(cfg.train, policy.parameters(), accelerator.device)
    scheduler = make_scheduler(optimizer, cfg.train.warmup_steps)
    scale_optimizer, scale_scheduler = make_scale_optimizer(cfg, state, accelerator.device)
    # ---- 4. onto the devices ---------------------------------------------------------------------------
    policy, optimizer = accelerator.prepare(policy, optimizer)
    if reference is not None:  # sharded like the policy under FSDP2 (and never saved: it is not in accelerator._models)
        # (prepare_model(reference, evaluation_mode=True) would neither shard it nor move it to the GPU under FSDP.)
        # DDP, one process and FSDP1: a whole frozen copy on every process.
        reference = fsdp2_prepare_model(accelerator, reference) if accelerator.is_fsdp2 else reference.to(accelerator.device)
    accelerator.register_for_checkpointing(scheduler, state, *([scale_optimizer, scale_scheduler] if scale_optimizer else []))
    # ---- 5. reference log-probs, once (train.precompute_ref) -------------------------------------------
    ref_train = ref_eval = None
    if cfg.train.precompute_ref and cfg.loss.type not in REFERENCE_FREE:  # before resuming: the policy still holds its initial weights
        scorer = reference if reference is not None else policy
        ref_train = precompute_reference_logps(accelerator, cfg, scorer, train_pairs, tokenizer.pad_token_id, "train")
        ref_eval = precompute_reference_logps(accelerator, cfg, scorer, eval_pairs, tokenizer.pad_token_id, "eval") if eval_pairs else None
        reference = None  # freed: from here on its log-probs come with each batch
    replayed = load_beta_sequence(cfg.loss.beta_sequence, total_steps)  # [] unless loss.beta_sequence
    # ---- 6. resume -------------------------------------------------------------------------------------
    if ckpt is not None:
        load_checkpoint(accelerator, ckpt, state)
    log = open_run(cfg, accelerator, state.step)  # config.yaml, metrics.jsonl (rows after state.step dropped), wandb
    # ---- the loop: one optimizer step = grad_accum calibration batches ---------------------------------
    bar = tqdm(total=total_steps, initial=state.step, desc="β-DPO", disable=not accelerator.is_main_process)
    policy.train()
    while state.step < total_steps:
        t0 = time.perf_counter()
        step_loss, summaries = torch.zeros((), device=accelerator.device), []
        for k in range(cfg.train.grad_accum):
            j = state.step * cfg.train.grad_accum + k  # global micro-batch number
            idx = micro_batch_indices(j, len(train_pairs), calib_size, steps_per_epoch * cfg.train.grad_accum, cfg.train.seed, lengths)
            mine = idx[rank * per_process : (rank + 1) * per_process]
            batch = collate_pairs([train_pairs[i] for i in mine], tokenizer.pad_token_id)
            batch.update({key: v[mine] for key, v in (ref_train or {}).items()})
            batch = {key: v.to(accelerator.device) for key, v in batch.items()}
            with no_sync_unless_last(accelerator, policy, k, cfg.train.grad_accum), accelerator.autocast():
                stats = pair_logps(policy, reference, batch, with_ppl=cfg.loss.ppl_scale)
                loss, summary = betadpo_loss(stats, gather(accelerator, stats), state, cfg.loss, rank, P, train=True,
                                             replayed_beta=replayed[state.step] if replayed else None)
                accelerator.backward(loss / cfg.train.grad_accum)
            step_loss += loss.detach() / cfg.train.grad_accum
            summaries.append(summary)
        if cfg.loss.learn_scale:  # c lives outside the DDP/FSDP model: average its gradient ourselves
            state.c.grad = accelerator.reduce(state.c.grad, reduction="mean")
        grad_norm, lr = optimizer_step(accelerator, policy, optimizer, scheduler, cfg.train.max_grad_norm)
        if scale_optimizer is not None:
            scale_optimizer.step()
            scale_scheduler.step()
            scale_optimizer.zero_grad(set_to_none=True)
        state.step += 1
        # ---- logging (one host sync per step) ---------------------------------------------------------
        row = {key: torch.stack([s[key] for s in summaries]).float() for key in summaries[0]}
        row = {key: v.sum() if key in SUMMED else v[-1] if key in LAST else v.mean() for key, v in row.items()}
        row["loss"] = accelerator.reduce(step_loss, reduction="sum") / P
        if grad_norm is not None:  # None: fp16's loss scaler skipped this step
            row["grad_norm"] = grad_norm
        values = dict(zip(row, torch.stack([torch.as_tensor(v, device=accelerator.device).float() for v in row.values()]).tolist()))
        dt = time.perf_counter() - t0
        tokens = values.pop("tokens")
        log.write({"step": state.step, "lr": lr, **values, "pairs_per_s": values["pairs"] / dt, "tokens_per_s": tokens / dt})  # stops on NaN/inf
        bar.update(1)
        bar.set_postfix(loss=f"{values['loss']:.4f}", beta=f"{values['beta']:.4f}", kept=f"{values['kept'] / values['pairs']:.2f}")
        last = state.step == total_steps
        if eval_pairs and ((cfg.train.eval_every and state.step % cfg.train.eval_every == 0) or last):
            held_out = evaluate_held_out(accelerator, policy, reference, eval_pairs, tokenizer.pad_token_id, state, cfg, ref_eval)
            log.write({"step": state.step, "split": "eval", **held_out})
        if state.step % cfg.train.save_every == 0 or last:
            save_checkpoint(accelerator, out, state.step, [*policy.parameters(), state.c])
    bar.close()
    # ---- save -----------------------------------------------------------------------------------------
    scale = {"c": state.c.item(), "beta_scale": F.softplus(state.c).item(), "ppl_scale": cfg.loss.ppl_scale,
             "learn_scale": cfg.loss.learn_scale, "M0": state.M0.item(), "sigma": state.sigma.item(), "step": state.step}
    save_final(accelerator, policy, tokenizer, out, state.step, {"beta_scale.json": scale})  # + the learned β-scale
    accelerator.print(f"model: {out / 'final'}\nmetrics: {out / 'metrics.jsonl'}")
    accelerator.wait_for_everyone()  # no process tears down the process group while another still uses it
    accelerator.end_training()
    return out


def main():
    cfg = parse_config(Config)
    validate(cfg)
    train(cfg)


# ========================================================================================================
# APPENDIX — SPEED/MEMORY: skip on first read.
# sequence_logps is plain_sequence_logps (LOG-PROBS) computed with far less work and memory; same arguments, same
# returned dict, same numbers and gradients (tests/test_perf.py checks both paths against each other). Logits
# (positions × V) are a DPO step's largest tensors: 128 sequences × 512 tokens × InternLM2's 92,544-token
# vocabulary are 24 GiB as one fp32 log-softmax. Three savings, each in one place:
#   1. The LM head and log-softmax run only at the positions whose log-probs are used: never on padding, on
#      prompt tokens only in the first prompt_rows rows (the policy's chosen rows, and only when β(x) needs the
#      prompt's perplexity: pair_logps' with_ppl). transformers' own models (5.x) take a boolean (B, T)
#      `logits_to_keep` and return just those positions' logits; other models' full logits are indexed.
#   2. log softmax + gather is common.token_logps, a kernel that never holds a full fp32 log-softmax, forward
#      or backward (its plain equivalent: torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None])).
#   2b. FUSED_HEAD (Llama, GPT-NeoX): not even the logits. The LM head and the log-softmax are one kernel,
#      plumbing/fused_head.py, fed the final hidden states: per chunk of positions, logits → logsumexp and
#      target logit, logits dropped; backward recomputes them. Memory no longer grows with positions × V.
#   3. Packing (packed_logits): no compute on padding in the model body either. Plain equivalent: the padded
#      (B, T) batch with its attention mask, as plain_sequence_logps runs it.
# ========================================================================================================
# THE SWITCH of 2b: True computes log-probs with the fused LM head where it applies (fused_head_applies); False
# keeps the logits path (LM head, then token_logps), e.g. to compare the two (benchmarks/bench_vs_trl.py does).
# Same numbers and gradients either way (tests/test_fused_head.py).
FUSED_HEAD = True


def _takes_position_mask(model) -> bool:
    """transformers' own causal LMs (5.x) accept a boolean (B, T) `logits_to_keep` and return the logits of the
    True positions only, (n, V). Remote code (`trust_remote_code`) may not: it gets all logits."""
    model = getattr(model, "module", model)  # DDP keeps the model in .module; FSDP subclasses it in place
    return any(c.__module__.startswith("transformers.models.") for c in type(model).__mro__)


# Architectures whose packed log-probs and gradients tests/test_perf.py checks against the padded ones. Others
# (and remote code) run padded: packing relies on the model building its attention mask from position_ids.
PACKED_MODEL_TYPES = ("llama", "gpt_neox")
PACK_ROW_WIDTH = 2  # packed rows hold up to 2 × the batch's longest sequence: see packed_logits


def _packs(model) -> bool:
    config = getattr(getattr(model, "module", model), "config", None)
    return _takes_position_mask(model) and getattr(config, "model_type", None) in PACKED_MODEL_TYPES


def pack_layout(lengths: list[int], width: int) -> list[tuple[int, int]]:
    """Sequence i → (row, offset) in rows of `width` tokens: first-fit, longest first. Rows ≤ len(lengths)."""
    used, place = [], [None] * len(lengths)  # used[r]: tokens already in row r
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, u in enumerate(used) if u + lengths[i] <= width), len(used))
        if r == len(used):
            used.append(0)
        place[i], used[r] = (r, used[r]), used[r] + lengths[i]
    return place


def packed_logits(model, batch: dict, needed, targets=None):
    """OPTIMISATION 3, packing: the batch's sequences laid end to end in as few rows as fit (pack_layout), each
    with its own position ids 0…L−1 and no attention mask: transformers (5.x) then builds a block-diagonal causal
    mask from the position ids (`masking_utils.find_packed_sequence_indices`), so no token sees another
    sequence. Every sequence's logits are those of the padded batch, but the model body runs on few rows with
    little padding instead of 2B rows padded to the longest.
    Rows are up to PACK_ROW_WIDTH = 2 × the longest sequence: wider rows leave less padding but cost attention
    over more (masked) positions. On SmolLM2-135M, 2 CPU threads, a forward + backward of 4 / 8 HH-format pairs
    took 11.95 / 25.9 s padded, 10.1 / 19.0 s packed to 1 × the longest, 8.8 / 18.1 s at 2 ×, 13.3 / 19.3 s at
    4 ×, 8.8 / 21.4 s in a single row.
    → (logits (n, V), index (n,)): row-major over `needed`'s True positions in the packed layout, and each
    one's flat index into `needed` (B·(T−1)), to put the log-probs back in (B, T−1) order. With `targets`
    (B·(T−1),), the token each position predicts: log-probs (n,) from the fused LM head instead of logits."""
    ids = batch["input_ids"]  # (B, T)
    B, T = ids.shape
    lengths = batch["attention_mask"].sum(-1).tolist()  # right padding: sequence i is ids[i, :L_i]
    place = pack_layout(lengths, PACK_ROW_WIDTH * T)
    R = 1 + max(r for r, _ in place)
    W = max(o + L for (_, o), L in zip(place, lengths))  # the fullest row's length: no all-padding columns
    packed = torch.zeros((R, W), dtype=ids.dtype, device=ids.device)  # (R, W); trailing slots: token 0, position 0
    positions = torch.zeros_like(packed)  # (R, W); each trailing slot is then its own one-token "sequence"
    target = torch.full_like(packed, -1)  # (R, W): flat index b·(T−1) + t of the prediction at that slot, −1 if none
    for i, ((r, o), L) in enumerate(zip(place, lengths)):
        packed[r, o : o + L] = ids[i, :L]
        positions[r, o : o + L] = torch.arange(L, device=ids.device)
        target[r, o : o + L - 1] = i * (T - 1) + torch.arange(L - 1, device=ids.device)  # the last token predicts nothing
    keep = target >= 0
    keep[keep.clone()] = needed.reshape(-1)[target[keep]]  # (R, W): packed slots whose log-prob is used
    index = target[keep]  # (n,)
    # use_cache=False: transformers looks for packed sequences only when there is no KV cache (and no mask).
    if targets is not None:  # 2b: log-probs (n,), no logits
        return fused_logps_at(model, keep, targets[index], input_ids=packed, position_ids=positions, use_cache=False), index
    logits = model(input_ids=packed, position_ids=positions, logits_to_keep=keep, use_cache=False).logits  # (n, V)
    return logits, index


def sequence_logps(model, batch: dict, prompt_rows: int = 0) -> dict:
    """plain_sequence_logps, with the LM head and log-softmax only where they are needed (see the banner)."""
    ids = batch["input_ids"]  # (B, T)
    response, in_prompt = position_masks(batch, prompt_rows)  # (B, T−1) each
    needed = response | in_prompt  # (B, T−1)
    targets = ids[:, 1:].reshape(-1)  # (B·(T−1),): the token each position predicts
    fused = FUSED_HEAD and _packs(model) and fused_head_applies(model)  # 2b (every FUSED_HEAD_MODEL_TYPES packs)
    if _packs(model):
        logits, index = packed_logits(model, batch, needed, targets if fused else None)  # (n, V) — or (n,) log-probs — and (n,)
    else:
        index = needed.reshape(-1).nonzero()[:, 0]  # (n,): row-major over `needed`
        if _takes_position_mask(model):
            keep = torch.cat([needed, torch.zeros_like(needed[:, :1])], 1)  # (B, T): the last position predicts nothing
            logits = model(input_ids=ids, attention_mask=batch["attention_mask"], logits_to_keep=keep).logits  # (n, V)
        else:
            logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, :-1][needed]  # (n, V)
    # 256 positions a chunk: 16 MiB of fp32 work space at V = 16k (reused by the allocator), 90 MiB at InternLM2's 92k.
    picked = logits if fused else token_logps(logits, targets[index], chunk_rows=256)  # (n,)
    logp = torch.zeros(needed.numel(), dtype=picked.dtype, device=picked.device).scatter(0, index, picked)  # (B·(T−1),)
    return logp_sums(logp.view(needed.shape), response, in_prompt)


if __name__ == "__main__":
    main_guard(main)
