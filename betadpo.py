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
    β_i = max(β_batch · s_i, β_min),                                EXTENSION, not in the paper: optional
          s_i = softplus(c) · log PPL_θ(x_i)                        learnable, perplexity-scaled β(x)
    L = (1/K) Σ_{kept} −log σ(β_i · M_i)                            (or IPO / SimPO / ORPO: variants.py)

The paper writes the margin with β₀ inside; here, as in the reference code, it is left out, so α here (the
reference code's `a`) is the paper's α·β₀. The β(x) extension follows the learnable-scale design in
https://github.com/1587causalai/llama_factory (dpo_baseline/learnable_beta_scale.md, branch ledpo).
With α = 0, ρ = 0 and no scale this is exactly DPO (Rafailov et al., 2023, https://arxiv.org/abs/2305.18290;
original code: https://github.com/eric-mitchell/direct-preference-optimization).
docs/ALGORITHM.md: the same equations with the reasons behind them, where we differ from the reference code
and why, and its flags mapped to ours.

Departures from the paper (P), the reference code (R) and the learnable-scale design (D), one line each with its
reason (docs/ALGORITHM.md, "Where we differ", has the long form; defaults are β-DPO as published otherwise):
 1. P: M_i leaves β₀ out, as R does: loss.alpha is R's `a`, the paper's α·β₀, so R's settings carry over as they are.
 2. P, R: the optional β(x) = softplus(c)·log PPL_θ(x) scale per pair (loss.ppl_scale, learn_scale): the extension.
 3. P, R: every β_i ≥ β_min, not β_batch alone (R's floor): a one-token prompt has log PPL = 0, hence β(x) = 0.
 4. R: M₀ and σ move on training batches only, not on evaluation batches: held-out data must not steer training.
 5. R: held-out pairs are one unfiltered batch: their numbers cover every pair and leave the filter's draws alone.
 6. R: σ < 1e-6 (step 0, policy = reference) or every w_i = 0 filters uniformly: R divides by zero and samples NaN.
 7. R: the filter draws by Gumbel-top-k in log space, the law of multinomial without replacement: no underflow.
 8. R: one filter generator, in the same state on every process and checkpointed: all keep the same pairs; resumes.
 9. R: K = max(1, ⌊N(1−ρ)⌋), not ⌊N(1−ρ)⌋: a small calibration batch never keeps no pair.
10. R: the loss is normalised by the global kept count K, not per process: 1 and P processes give the same gradient.
11. R: rewards are logged with the β_i applied, not with β₀: the logged rewards are the ones being optimised.
12. P, R: loss.type ipo, simpo, orpo take the dynamic β too (variants.py); the calibration stays on the summed M_i.
13. R: label smoothing (conservative DPO, R's DPO code) applies to any β_i; R's β-DPO path ignored it. Default 0.
14. D: log PPL_θ(x) is detached: with its gradient the loss would also train the prompt's perplexity.
15. D: loss.beta_scale_init is the effective softplus(c₀), not the raw c₀: "init 1.0" then means a scale of 1.0.

File layout, in reading order: CONFIG (the β-DPO knobs) → THE β-DPO MATH (pure functions of tensors, each beside
its equation; the state they update; the loss) → LOG-PROBS (the plain computation, and `logps_at`, the one switch,
train.logps, to the fast kernels of plumbing/fast_logps.py and plumbing/fused_head.py) → TRAINING LOOP → main.
Every line of β-DPO math that runs is in this file; `--train.logps plain` runs the plain log-probs end to end.
Study variants and controls (IPO/SimPO/ORPO, instance-level β, σ units, random drop, replayed β) are
named entries in variants.py; the plumbing around the algorithm (config files, model loading, checkpoints,
logging, data) is in plumbing/, one module per job.
"""

import plumbing.host_allocator  # noqa: F401  (first: glibc malloc set up before torch loads; docs/SCALING.md)
import math
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

import variants
from plumbing import fast_logps, lora
from plumbing.checkpoints import load_checkpoint, resume_point, save_checkpoint, save_final
from plumbing.config import SFTConfig, parse_config, require
from plumbing.data import collate_pairs, micro_batch_indices, training_pairs
from plumbing.distributed import end_processes, frozen_dtype, load_on_main, main_first, shard_frozen
from plumbing.errors import UserError
from plumbing.fused_head import LMHeadGivesLogps, fused_head_applies
from plumbing.stopping import main_guard
from plumbing.inputs import fingerprint_inputs
from plumbing.launch import start_run
from plumbing.metrics import Progress, open_run
from plumbing.models import load_model, load_tokenizer
from plumbing.optim import make_optimizer, make_scheduler, no_sync_unless_last, optimizer_step
from plumbing.scoring import cached, reference_cache_file, score_in_chunks


# ========================================================================================================
# CONFIG: every field is a YAML key (loss: {beta: 0.1}) and a flag (--loss.beta 0.1); the other sections
# (model, data, train, eval, log) are in plumbing/config.py. A new knob: a field here and, if it has a range,
# a line in LossArgs.check. `python betadpo.py --help` lists every field.
# ========================================================================================================
@dataclass
class LossArgs:
    """loss.*: the preference loss and β-DPO's mechanisms. N, the calibration batch, is
    train.batch_size / train.grad_accum pairs, over all processes together."""

    beta: float = 0.1  # β₀
    alpha: float = 0.0  # α of dynamic β (reference code: `a`; = the paper's α·β₀, since M excludes β₀); 0 = static β
    # ρ, the FRACTION DROPPED from each calibration batch (reference code: `mode_weight`); 0 = off
    filter_ratio: float = 0.0
    momentum: float = 0.9  # m of the M₀ and σ moving averages
    beta_min: float = 1e-3  # floor of β_batch and of every β_i
    # β(x) extension (not in the paper): β_i = β_batch·s_i, s_i = beta_scale · log PPL_θ(x_i), beta_scale = softplus(c)
    ppl_scale: bool = False  # s_i ∝ log PPL_θ(x_i) of the prompt
    learn_scale: bool = False  # learn c, i.e. beta_scale = softplus(c)
    beta_scale_init: float = 1.0  # beta_scale at the start, softplus(c₀) (the design set c₀ itself)
    scale_lr: float = 0.0  # learning rate of c; 0 = train.lr
    # The loss, and the study variants of variants.py (one registry per key; β-DPO as published is the first choice)
    type: Literal[("dpo", *variants.LOSSES)] = "dpo"  # preference loss: dpo, or a variants.LOSSES entry
    label_smoothing: float = 0.0  # ε of conservative DPO (dpo only)
    simpo_gamma: float = 0.5  # γ, SimPO's target reward margin (simpo only)
    # margin: keep pairs ∝ the Gaussian weight; uniform: drop ρ·N at random (a control)
    filter: Literal[("margin", *variants.FILTERS)] = "margin"
    # batch: one β per calibration batch; instance: β_i from each M_i (the paper's Table 2 baseline)
    beta_level: Literal[("batch", *variants.BETA_LEVELS)] = "batch"
    # nats: α·(mean M − M₀) (reference code); sigma: divided by σ (not in the paper)
    alpha_units: Literal[("nats", *variants.ALPHA_UNITS)] = "nats"
    # JSON list, one β per optimizer step, used instead of β_batch (a control: replay another run's βs); "" = off
    beta_sequence: str = ""

    def check(self, cfg):
        """Range checks, run by plumbing.config.validate with the whole config (each names its key)."""
        require(self.beta > 0, "loss.beta", f"must be > 0, got {self.beta}")
        require(self.alpha >= 0, "loss.alpha", f"must be ≥ 0, got {self.alpha}")
        require(0 <= self.filter_ratio < 1, "loss.filter_ratio", f"must be in [0, 1), got {self.filter_ratio}")
        require(not self.beta_sequence or self.alpha == 0, "loss.beta_sequence",
                f"replaces the dynamic β: set loss.alpha to 0 (got {self.alpha})")
        require(0 <= self.momentum < 1, "loss.momentum", f"must be in [0, 1), got {self.momentum}")
        require(self.beta_min > 0, "loss.beta_min", f"must be > 0, got {self.beta_min}")
        require(0 <= self.label_smoothing < 0.5, "loss.label_smoothing",
                f"must be in [0, 0.5), got {self.label_smoothing}")
        require(self.beta_scale_init > 0, "loss.beta_scale_init", f"must be > 0, got {self.beta_scale_init}")
        require(self.scale_lr >= 0, "loss.scale_lr", f"must be ≥ 0, got {self.scale_lr}")
        require(not (self.learn_scale and cfg.train.mixed_precision == "fp16"), "loss.learn_scale",
                "does not work with train.mixed_precision fp16: c has an optimizer of its own, which fp16's loss "
                "scaler does not unscale; use bf16")


@dataclass
class Config(SFTConfig):
    """betadpo.py's and eval.py's config: sft.py's sections (model, data, train, eval, log) and `loss`."""

    loss: LossArgs = field(default_factory=LossArgs)


# ========================================================================================================
# THE β-DPO MATH: pure functions of tensors, the small state they update, and the loss that calls them.
# To try a new β schedule, change `batch_beta` (per batch) or `pair_scale` (per pair), or add a variant.
# ========================================================================================================
SIGMA_FLOOR = 1e-6  # below this σ the Gaussian weights are meaningless: filter uniformly


@dataclass
class PairLogps:
    """What the math reads: per-pair log-probs of a batch of pairs (x, y_w, y_l), each a (B,) tensor, pair i at i.

    Sums are over response tokens, log π(y|x) = Σ_t log π(y_t|x, y_<t); `_avg` is the sum / the number of
    response tokens (SimPO, ORPO and IPO use it). The policy's keep their graph in training; the reference's are
    None where there is no reference (SimPO, ORPO). Made by `pair_logps` (LOG-PROBS below)."""

    policy_chosen: torch.Tensor  # log π_θ(y_w|x)
    policy_rejected: torch.Tensor  # log π_θ(y_l|x)
    policy_chosen_avg: torch.Tensor  # log π_θ(y_w|x) / |y_w|
    policy_rejected_avg: torch.Tensor  # log π_θ(y_l|x) / |y_l|
    tokens: torch.Tensor  # non-padding tokens of the pair, prompt twice (throughput only)
    ref_chosen: torch.Tensor | None = None  # log π_ref(y_w|x)
    ref_rejected: torch.Tensor | None = None  # log π_ref(y_l|x)
    ref_chosen_avg: torch.Tensor | None = None  # log π_ref(y_w|x) / |y_w|
    ref_rejected_avg: torch.Tensor | None = None  # log π_ref(y_l|x) / |y_l|
    log_ppl: torch.Tensor | None = None  # log PPL_θ(x) of the prompt, detached; only with loss.ppl_scale (β(x))

    def tensors(self) -> dict:
        """{field: tensor} of the fields that are set: what the collectives and the scoring chunks carry."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def implicit_rewards(logps: PairLogps, loss_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-response rewards whose difference is the margin, before β (each (B,)).

    DPO/IPO:      Δ_w = log π_θ(y_w|x) − log π_ref(y_w|x),  Δ_l likewise.
    SimPO/ORPO:   the length-normalised avg log π_θ(y|x) (reference-free: variants.LOSSES).
    """
    if variants.reference_free(loss_type):
        return logps.policy_chosen_avg, logps.policy_rejected_avg
    return logps.policy_chosen - logps.ref_chosen, logps.policy_rejected - logps.ref_rejected


def margins(logps: PairLogps, loss_type: str) -> torch.Tensor:
    """M_i = Δ_w − Δ_l, *without* β₀ (as the reference code; the paper writes β₀ inside M). (B,)"""
    chosen, rejected = implicit_rewards(logps, loss_type)
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


def filter_mask(log_w, filter_ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Keep K = max(1, ⌊N(1−ρ)⌋) of N pairs (ρ = the fraction dropped), drawn without replacement ∝ w_i. (N,) bool.

    log_w: (N,) log w_i, from filter_log_weights (or a variants.FILTERS entry, which replaces the Gaussian).
    Drawn with the Gumbel-top-k trick: the K largest log w_i + Gumbel_i are distributed exactly as K draws
    without replacement ∝ w_i (as torch.multinomial), but work in log space, so pairs with w_i that underflow
    can still fill the K places. `generator` is shared and in the same state on every process, and the
    margins are gathered, so every rank computes the same mask (the reference code drew per rank).
    """
    N = log_w.numel()
    K = max(1, math.floor(N * (1 - filter_ratio)))
    if K == N:
        return torch.ones(N, dtype=torch.bool, device=log_w.device)
    u = torch.rand(N, generator=generator, device=generator.device)  # (N,) on the CPU; to a GPU without a host wait
    u = u if log_w.device.type == "cpu" else u.pin_memory().to(log_w.device, non_blocking=True)  # pinned, non_blocking
    gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1 - 1e-7)))
    kept_indices = (log_w + gumbel).topk(K).indices
    return torch.zeros(N, dtype=torch.bool, device=log_w.device).index_fill_(0, kept_indices, True)


def kept_mean(values, kept):
    """mean of values[kept], as a masked sum: boolean indexing would make the host wait for the device."""
    return (values * kept).sum() / kept.sum()


def batch_beta(beta0: float, alpha: float, gap, beta_min: float) -> torch.Tensor:
    """β_batch = β₀ · (1 + α · gap), gap = mean_{kept} M_i − M₀; clamped to ≥ β_min and detached. ()

    Batches whose margins run above the running mean (easy pairs, large gap) get a larger β, i.e. stay
    closer to the reference; batches below it get a smaller β and move more aggressively.
    (variants.BETA_LEVELS / ALPHA_UNITS compute another gap: per pair, (N,), or in units of σ.)
    """
    return (beta0 * (1 + alpha * gap)).clamp(min=beta_min).detach()


def prompt_log_ppl(logps: PairLogps) -> torch.Tensor:
    """log PPL_θ(x) per pair, (B,). pair_logps computes it only when β(x) uses it (loss.ppl_scale); otherwise
    zeros stand in, which pair_scale reads for their shape alone."""
    return logps.log_ppl if logps.log_ppl is not None else torch.zeros_like(logps.policy_chosen).detach()


def pair_scale(c, log_ppl, ppl_scale: bool, learn_scale: bool) -> torch.Tensor:
    """s_i = beta_scale · log max(PPL_θ(x_i), 1) with ppl_scale; beta_scale alone with learn_scale only; else 1.
    beta_scale = softplus(c) (logged as `beta_scale`). (B,)

    log_ppl is detached (pair_logps), so the loss's gradient reaches c through s_i but never the policy through
    its prompt perplexity: the learnable-scale design keeps that gradient (docs/ALGORITHM.md, Differences).
    """
    if not (ppl_scale or learn_scale):
        return torch.ones_like(log_ppl)
    s = F.softplus(c).expand_as(log_ppl)
    return s * log_ppl.clamp(min=0) if ppl_scale else s


def pair_betas(beta_b, c, log_ppl, cfg: LossArgs) -> torch.Tensor:
    """β_i = max(β_batch · s_i, β_min). (B,) The floor matters with ppl_scale: a prompt of one token has no
    perplexity (log PPL = 0, so s_i = 0), and β_i = 0 would drop the pair silently under DPO and give inf
    under IPO."""
    return (beta_b * pair_scale(c, log_ppl, cfg.ppl_scale, cfg.learn_scale)).clamp(min=cfg.beta_min)


def dpo_losses(beta, M, label_smoothing: float = 0.0) -> torch.Tensor:
    """ℓ_i = −(1−ε)·log σ(β_i·M_i) − ε·log σ(−β_i·M_i),  ε = label_smoothing (conservative DPO). (B,)"""
    return -(1 - label_smoothing) * F.logsigmoid(beta * M) - label_smoothing * F.logsigmoid(-beta * M)


def preference_losses(beta, logps: PairLogps, cfg: LossArgs) -> torch.Tensor:
    """Per-pair loss ℓ_i with per-pair β_i: DPO here, or the variants.LOSSES entry loss.type names. (B,)"""
    if cfg.type == "dpo":
        return dpo_losses(beta, margins(logps, "dpo"), cfg.label_smoothing)
    return variants.LOSSES[cfg.type].per_pair(beta, logps, cfg)


class BetaDPOState:
    """Everything β-DPO carries from batch to batch, saved with each checkpoint.

    M0, sigma: the moving averages (0-dim tensors, start at 0). c: the raw β-scale, beta_scale = softplus(c),
    a trainable nn.Parameter with learn_scale, else a constant. generator: the filter's random generator,
    seeded from train.seed, identical on every process, on the CPU. step: optimizer steps done.
    """

    def __init__(self, loss_cfg: LossArgs, seed: int, device):
        self.step = 0
        self.M0 = torch.zeros((), device=device)
        self.sigma = torch.zeros((), device=device)
        # c₀ = softplus⁻¹(init) = log(expm1(init)), so that `beta_scale_init` is the *effective* starting scale.
        # The learnable-scale design initialised c itself (so its "init 1.0" meant a scale of softplus(1) ≈ 1.31).
        c0 = math.log(math.expm1(loss_cfg.beta_scale_init))
        self.c = torch.nn.Parameter(torch.tensor(c0, device=device), requires_grad=loss_cfg.learn_scale)
        # On the CPU whatever the device: the same draws on any GPU type or count (N is a few hundred at most, so
        # drawing there costs nothing), and a resume on another machine keeps the masks.
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def state_dict(self) -> dict:
        return {"step": self.step, "M0": self.M0.cpu(), "sigma": self.sigma.cpu(), "c": self.c.detach().cpu(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, sd: dict):
        self.step = sd["step"]
        self.M0, self.sigma = sd["M0"].to(self.M0.device), sd["sigma"].to(self.sigma.device)
        with torch.no_grad():
            self.c.copy_(sd["c"])
        self.generator.set_state(sd["generator"])


def betadpo_loss(logps: PairLogps, state: BetaDPOState, cfg: LossArgs, training_batch: bool, replayed_beta=None):
    """One calibration batch of N pairs (docs/ALGORITHM.md, steps 1–6) → (ℓ (N,), kept (N,) bool, summary).

    logps:          the whole calibration batch, (N,) tensors, the same values on every process. On P processes
                    each one's own B pairs carry the policy's graph (the loop's gather_pairs), the rest are detached.
    training_batch: update M₀/σ and filter; at evaluation neither happens and every pair counts.
    replayed_beta:  loss.beta_sequence's β for this step, used instead of step 4's (a control: variants.py).
    The batch's loss is L = (1/K)·Σ_{kept} ℓ_i = kept_mean(ℓ, kept); the loop backpropagates each process's share
    of it (process_share). summary: the batch's logged numbers.
    """
    # 1. Margins of the whole calibration batch, the same on every process; no gradient flows through steps 2–4.
    M = margins(logps, cfg.type).detach()  # (N,)
    # 2. Moving averages, on training batches only.
    if training_batch:
        state.M0, state.sigma = update_statistics(state.M0, state.sigma, M, cfg.momentum)
    # 3. β-guided filtering: the same mask on every process.
    if training_batch and cfg.filter_ratio > 0:
        weights = filter_log_weights if cfg.filter == "margin" else variants.FILTERS[cfg.filter]
        kept = filter_mask(weights(M, state.M0, state.sigma), cfg.filter_ratio, state.generator)  # (N,) bool
    else:
        kept = torch.ones_like(M, dtype=torch.bool)
    # 4. Batch-level β from the kept pairs' margins (α = 0: β_batch = β₀). () — or (N,) with beta_level=instance.
    if cfg.beta_level == "batch":
        gap = kept_mean(M, kept) - state.M0
    else:
        gap = variants.BETA_LEVELS[cfg.beta_level](M, kept, state.M0)
    if cfg.alpha_units != "nats":
        gap = variants.ALPHA_UNITS[cfg.alpha_units](gap, state.sigma)
    beta_b = batch_beta(cfg.beta, cfg.alpha, gap, cfg.beta_min)
    if replayed_beta is not None:
        beta_b = torch.full_like(beta_b, replayed_beta)
    # 5. Per-pair β_i = max(β_batch · s_i, β_min); gradients reach c through s_i only.
    beta_i = pair_betas(beta_b, state.c, prompt_log_ppl(logps), cfg)  # (N,)
    # 6. Per-pair losses ℓ_i; L averages them over the K kept pairs.
    return preference_losses(beta_i, logps, cfg), kept, summarize(logps, kept, beta_b, state, cfg)


def summarize(logps: PairLogps, kept, beta_b, state: BetaDPOState, cfg: LossArgs) -> dict:
    """Logged numbers of one calibration batch (0-dim tensors). Rewards use the β actually applied, β_i —
    the reference code logged them with the static β₀."""
    with torch.no_grad():
        M = margins(logps, cfg.type)  # (N,)
        beta_i = pair_betas(beta_b, state.c, prompt_log_ppl(logps), cfg)  # (N,)
        r_w, r_l = implicit_rewards(logps, cfg.type)
        centred = M - M.mean()
        summary = {
            "beta": beta_b.mean(), "beta_mean": beta_i.mean(),
            "beta_floor": (beta_b <= cfg.beta_min).float().mean(),  # share of β_batch at its floor β_min
            "beta_scale": F.softplus(state.c) if (cfg.ppl_scale or cfg.learn_scale) else torch.ones_like(M.sum()),
            "M0": state.M0, "sigma": state.sigma,
            "margin_mean": M.mean(), "margin_std": M.std() if M.numel() > 1 else torch.zeros_like(M.sum()),
            "margin_skew": (centred ** 3).mean() / (centred ** 2).mean().clamp(min=1e-12) ** 1.5,  # raw margins'
            "kept_margin_mean": kept_mean(M, kept), "kept": kept.sum().float(),
            "pairs": torch.full_like(M.sum(), M.numel()),
            "rewards/chosen": (beta_i * r_w).mean(), "rewards/rejected": (beta_i * r_l).mean(),
            "rewards/margins": (beta_i * (r_w - r_l)).mean(), "rewards/accuracies": (r_w > r_l).float().mean(),
            "logps/chosen": logps.policy_chosen.mean(), "logps/rejected": logps.policy_rejected.mean(),
            "tokens": logps.tokens.sum(),
        }
        if logps.log_ppl is not None:  # computed when β(x) uses it (loss.ppl_scale)
            summary["log_ppl"] = logps.log_ppl.mean()
        return summary


# ========================================================================================================
# LOG-PROBS: the numbers the math consumes, from one forward pass per model and batch.
# ========================================================================================================
def plain_logps_at(model, batch: dict, needed) -> torch.Tensor:
    """log π(token t+1 | tokens ≤ t) at the True positions of `needed` (B, T−1), 0 elsewhere → (B, T−1), fp32 at
    least. The textbook computation: a full (B, T−1, V) fp32 log-softmax."""
    ids = batch["input_ids"]  # (B, T)
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, :-1]  # (B, T−1, V): t predicts t+1
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least (bf16 → fp32; fp64 stays)
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]  # (B, T−1)
    return logp * needed


def logps_at(model, batch: dict, needed, logps: str, prefix_sharing: bool = False) -> torch.Tensor:
    """THE SWITCH, the config's train.logps (also sft.py's and eval.py's): plain_logps_at above, or the same numbers
    and gradients (tests/test_perf.py, tests/test_fused_head.py) with far less work and memory → (B, T−1).

    fast:  plumbing/fast_logps.py's logps_at: the LM head only where log-probs are used, a chunked log-softmax
           kernel, and packing (no compute on padding).
    fused: fast, and the LM head and log-softmax as one kernel (plumbing/fused_head.py), never holding the logits;
           Llama and GPT-NeoX (fused_head_applies), other models run `fast`.
    The fused head is a pair of hooks on the LM head, installed here for this one forward, not an explicit call on
    the final hidden states: under FSDP2 the LM head's weight shards are gathered only inside its own forward, and
    DDP readies its gradient reduction only in the whole model's (LMHeadGivesLogps says more).
    prefix_sharing (fast, fused; train.prefix_sharing): rows i and B/2 + i are a pair, and its prompt goes through the
    model once (fast_logps.pair_sequences); plain always runs the padded rows as they are.
    """
    if logps == "plain":
        return plain_logps_at(model, batch, needed)
    if logps == "fused" and fast_logps.packs(model) and fused_head_applies(model):
        with LMHeadGivesLogps(model) as head:
            return fast_logps.logps_at(model, batch, needed, head, prefix_sharing)
    return fast_logps.logps_at(model, batch, needed, prefix_sharing=prefix_sharing)


def position_masks(batch: dict, prompt_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which positions t (predicting token t+1) count: (response, in_prompt), (B, T−1) bool each.
    in_prompt: the predicted token is a prompt token (1…|x|−1), only in rows [0, prompt_rows)."""
    ids = batch["input_ids"]  # (B, T)
    response = batch["labels"][:, 1:] != -100  # (B, T−1)
    predicted = torch.arange(1, ids.shape[1], device=ids.device)  # (T−1,): the token position t predicts
    in_prompt = predicted[None, :] < batch["prompt_lens"][:, None]  # (B, T−1)
    in_prompt[prompt_rows:] = False
    return response, in_prompt


def sequence_logps(model, batch: dict, logps: str, prompt_rows: int = 0, prefix_sharing: bool = False) -> dict:
    """One forward pass → per-row response log-prob sums/means, and the prompt's mean log-prob for rows
    [0, prompt_rows).

    batch: as `collate_pairs` makes it: input_ids, attention_mask, labels (-100 on prompt and padding), prompt_lens.
    logps, prefix_sharing: train.logps and train.prefix_sharing (logps_at). Returns (B,) tensors:
    `sum` = Σ_t log π(y_t|x,y_<t) over response tokens,
    `avg` = sum / #response tokens, `prompt` = mean_t log π(x_t|x_<t) over prompt tokens 1…|x|−1 (token 0 has no
    context; 0 for rows ≥ prompt_rows).
    """
    response, in_prompt = position_masks(batch, prompt_rows)  # (B, T−1) each
    if "host" in batch:  # fast_logps.to_device kept the batch on the host: the same masks there, to plan packing
        batch = {**batch, "needed_host": torch.logical_or(*position_masks(batch["host"], prompt_rows))}
    logp = logps_at(model, batch, response | in_prompt, logps, prefix_sharing)  # (B, T−1)
    total = (logp * response).sum(-1)
    return {"sum": total, "avg": total / response.sum(-1).clamp(min=1),
            "prompt": (logp * in_prompt).sum(-1) / in_prompt.sum(-1).clamp(min=1)}


REF_FIELDS = ("ref_chosen", "ref_rejected", "ref_chosen_avg", "ref_rejected_avg")


def pair_logps(policy, reference, batch: dict, logps: str, with_ppl: bool = False,
               prefix_sharing: bool = True) -> PairLogps:
    """Chosen rows [0, B) and rejected rows [B, 2B) of one concatenated batch → per-pair (B,) log-probs.

    The reference's are None when reference is None (SimPO and ORPO need none), and taken from the batch when
    precomputed (train.precompute_ref). With `with_ppl` (β(x) needs it: loss.ppl_scale) log_ppl = log PPL_θ(x) =
    −mean log π_θ(x_t|x_<t) of the prompt, detached (see pair_scale); from the chosen rows, no extra forward.
    logps, prefix_sharing: train.logps and train.prefix_sharing (logps_at); with prefix sharing the prompt's
    log-probs of log_ppl come from the pair's one shared prompt.
    """
    B = batch["input_ids"].shape[0] // 2
    pol = sequence_logps(policy, batch, logps, B if with_ppl else 0, prefix_sharing)  # chosen, rejected: one prompt
    out = PairLogps(
        policy_chosen=pol["sum"][:B], policy_rejected=pol["sum"][B:],
        policy_chosen_avg=pol["avg"][:B], policy_rejected_avg=pol["avg"][B:],
        tokens=(batch["attention_mask"][:B].sum(-1) + batch["attention_mask"][B:].sum(-1)).float(),
        log_ppl=-pol["prompt"][:B].detach() if with_ppl else None,
    )
    if "ref_chosen" in batch:  # precomputed (train.precompute_ref): no reference forward at all
        return replace(out, **{k: batch[k] for k in REF_FIELDS})
    if reference is not None:
        with torch.no_grad():
            ref = sequence_logps(reference, batch, logps, prefix_sharing=prefix_sharing)
        out = replace(out, ref_chosen=ref["sum"][:B], ref_rejected=ref["sum"][B:],
                      ref_chosen_avg=ref["avg"][:B], ref_rejected_avg=ref["avg"][B:])
    return out


# ========================================================================================================
# TRAINING LOOP: the setup in a few named steps, then one loop. Around the algorithm only: batches spread
# over processes, held-out evaluation, the optional precomputed reference.
# ========================================================================================================
SUMMED = ("kept", "pairs", "tokens")  # summed over a step's micro-batches; everything else is averaged
LAST = ("M0", "sigma", "beta_scale")  # state after the step
EVAL_KEYS = ("beta", "beta_mean", "margin_mean", "margin_std", "rewards/chosen", "rewards/rejected",
             "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "pairs")  # held-out rows


def gather_pairs(accelerator, mine: PairLogps) -> PairLogps:
    """This process's B pairs → the calibration batch's N = P·B, in process order, the same values on every
    process: the others' detached, its own `mine` with their graph, so that the loss's gradient reaches this
    process's policy through its own pairs only (the math itself sees one batch and knows no processes).
    accelerate gathers dicts of tensors, not dataclasses: converted explicitly both ways."""
    everyone = accelerator.gather({k: v.detach() for k, v in mine.tensors().items()})  # (N,) each
    B, rank = mine.policy_chosen.shape[0], accelerator.process_index
    return PairLogps(**{k: torch.cat([v[: rank * B], getattr(mine, k), v[(rank + 1) * B :]])
                        for k, v in everyone.items()})


def process_share(losses, kept, rank: int, num_processes: int):
    """This process's share of the batch's loss L = (1/K)·Σ_{kept} ℓ_i: (P/K)·Σ over its own B kept pairs.
    DDP/FSDP average gradients over the P processes, giving ∇L: the same gradient on 1 or P processes. (The
    reference code averaged per process, a different weighting.) losses, kept: (N,) = (P·B,), in process order."""
    B = losses.shape[0] // num_processes
    mine = slice(rank * B, (rank + 1) * B)
    return (losses[mine] * kept[mine]).sum() * num_processes / kept.sum()


def score_pairs(accelerator, models: tuple, pairs, pad_id: int, cfg: Config, with_ppl=False, ref_values=None):
    """`pair_logps` of models = (policy, reference) over a list of pairs, no gradients, cfg.eval.batch_size pairs
    per forward → (num_pairs,) tensors in order, the same on any process count. ref_values: precomputed reference
    log-probs, {ref_*: (num_pairs,)}, or None."""
    policy, reference = models
    score = lambda batch: pair_logps(policy, reference, batch, cfg.train.logps, with_ppl,  # noqa: E731
                                     cfg.train.prefix_sharing).tensors()
    return PairLogps(**score_in_chunks(accelerator, policy, score, pairs, pad_id, cfg.eval.batch_size, ref_values))


def held_out_summary(everyone: PairLogps, state: BetaDPOState, cfg: LossArgs) -> dict:
    """Held-out pairs (score_pairs) summarised as ONE calibration batch, not a training batch: no M₀/σ update and
    no filtering, whereas the reference code filtered its evaluation batches and updated M₀/σ on them
    (docs/ALGORITHM.md). Numbers do not depend on the process count. (eval.py evaluates a saved model in full.)"""
    losses, kept, summary = betadpo_loss(everyone, state, cfg, training_batch=False)
    return {"loss": kept_mean(losses, kept).item(), **{k: v.item() for k, v in summary.items() if k in EVAL_KEYS}}


def precompute_reference_logps(accelerator, cfg: Config, reference, pairs, pad_id: int, name: str) -> dict:
    """train.precompute_ref: the reference's log-probs of every pair, one no-grad pass, cached in train.ref_cache_dir
    → {ref_chosen, ref_rejected, ref_chosen_avg, ref_rejected_avg}: (num_pairs,) CPU tensors."""
    def score_all():
        scored = score_pairs(accelerator, (reference, None), pairs, pad_id, cfg)
        return {f"ref_{k[len('policy_'):]}": getattr(scored, k).cpu()
                for k in ("policy_chosen", "policy_rejected", "policy_chosen_avg", "policy_rejected_avg")}
    return cached(accelerator, reference_cache_file(cfg, pairs, name), score_all,
                  "reference log-probs", f"one pass over {len(pairs)} {name} pairs")


def load_policy_and_reference(cfg: Config, accelerator):
    """→ (policy to train, load_reference), load_reference() → the frozen reference π_ref or None; called once
    the policy is sharded, so that the main process never holds two whole models. None for the reference-free
    losses (SimPO, ORPO), and when the reference log-probs are precomputed from the policy's own start: before
    step 1 the policy *is* the reference, so no second model is loaded. load_model turns dropout off in both:
    DPO compares log-probs of two models, and dropout noise would leak into every margin. Under FSDP2 only
    the main process reads the weights; the others build the model on the meta device (load_on_main).
    With LoRA (model.lora_r > 0) the policy carries adapters and π_ref is the policy with them switched off
    (lora.AdaptersOff): no second model either."""
    model_cfg = cfg.model
    policy = load_on_main(accelerator, lambda: load_model(model_cfg.name_or_path, model_cfg.dtype,
                                                          model_cfg.trust_remote_code,
                                                          attn_implementation=model_cfg.attn_implementation))
    policy = lora.add_adapters(policy, model_cfg, model_cfg.name_or_path)  # the model itself when model.lora_r is 0
    if cfg.train.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy_scores_itself = cfg.train.precompute_ref and not model_cfg.ref_name_or_path and not lora.enabled(model_cfg)
    if variants.reference_free(cfg.loss.type) or policy_scores_itself:
        return policy, lambda: None
    if lora.enabled(model_cfg) and not model_cfg.ref_name_or_path:
        adapters_off = lora.AdaptersOff(policy)
        return policy, lambda: adapters_off
    ref_key = "model.ref_name_or_path" if model_cfg.ref_name_or_path else "model.name_or_path"
    ref_path = model_cfg.ref_name_or_path or model_cfg.name_or_path
    load = lambda: load_model(ref_path, frozen_dtype(cfg, accelerator), model_cfg.trust_remote_code,  # noqa: E731
                              ref_key, model_cfg.attn_implementation)
    return policy, lambda: load_on_main(accelerator, load).requires_grad_(False).eval()


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


def train_policy(cfg: Config):
    from accelerate.utils import fsdp2_prepare_model

    # ---- 1. accelerator, launch and config checks, seed ------------------------------------------------
    accelerator = start_run(cfg)  # stops with one line, before anything is written, on a bad launch/config
    P, rank = accelerator.num_processes, accelerator.process_index
    out = Path(cfg.train.output_dir)
    # ---- 2. data ---------------------------------------------------------------------------------------
    if cfg.model.name_or_path == "tiny":
        raise UserError("model.name_or_path: β-DPO starts from a trained policy; "
                        "run sft.py first and pass its final/ dir")
    # Rank 0 first: a hub tokenizer (or data set, inside training_pairs) is downloaded once, then read from the cache.
    tokenizer = main_first(accelerator, lambda: load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code))
    data = training_pairs(cfg.data, tokenizer, accelerator.is_main_process)  # prints the data summary line
    if data is None:  # data.preview N printed the first N pairs: stop before anything is written
        return out
    train_pairs, eval_pairs = data  # (prompt, chosen, rejected) id lists of the training and held-out pairs
    lengths = tuple(len(p) + max(len(c), len(r)) for p, c, r in train_pairs) if cfg.train.group_by_length else None
    calib_size = cfg.train.batch_size // cfg.train.grad_accum  # N: pairs in one calibration batch (all processes)
    per_process = calib_size // P  # B
    steps_per_epoch = len(train_pairs) // cfg.train.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"data: {len(train_pairs)} training pairs is fewer than "
                        f"train.batch_size={cfg.train.batch_size}")
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    inputs = fingerprint_inputs(cfg, tokenizer, train=train_pairs, eval=eval_pairs)  # data, models, tokenizer: pinned
    # the newest intact checkpoint (refused if the inputs changed), or a finished run
    ckpt, finished = resume_point(accelerator, out, total_steps, inputs, cfg.train.allow_changed_inputs)
    if finished:
        return out
    # ---- 3. models, β-DPO state, optimizers ------------------------------------------------------------
    policy, load_reference = load_policy_and_reference(cfg, accelerator)
    if accelerator.is_fsdp2:  # sharded first (the main process's weights sent out), so the optimizer holds the shards
        policy = fsdp2_prepare_model(accelerator, policy)
    state = BetaDPOState(cfg.loss, cfg.train.seed, accelerator.device)
    optimizer = make_optimizer(cfg.train, policy.parameters(), accelerator.device)
    scheduler = make_scheduler(optimizer, cfg.train.warmup_steps)
    scale_optimizer, scale_scheduler = make_scale_optimizer(cfg, state, accelerator.device)
    # ---- 4. onto the devices ---------------------------------------------------------------------------
    policy, optimizer = accelerator.prepare(policy, optimizer)
    reference = load_reference()  # now that the policy is sharded
    if isinstance(reference, lora.AdaptersOff):  # the policy itself, adapters off: prepared with it
        accelerator.print(lora.trainable_summary(policy))
    elif reference is not None:  # sharded like the policy under FSDP2 (never saved: it is not in accelerator._models)
        reference = shard_frozen(accelerator, reference)
    scale_objects = [scale_optimizer, scale_scheduler] if scale_optimizer else []
    accelerator.register_for_checkpointing(scheduler, state, *scale_objects)
    # ---- 5. reference log-probs, once (train.precompute_ref) -------------------------------------------
    ref_train = ref_eval = None
    # before resuming: the policy still holds its initial weights
    if cfg.train.precompute_ref and not variants.reference_free(cfg.loss.type):
        scorer = reference if reference is not None else policy
        ref_train = precompute_reference_logps(accelerator, cfg, scorer, train_pairs, tokenizer.pad_token_id, "train")
        if eval_pairs:
            ref_eval = precompute_reference_logps(accelerator, cfg, scorer, eval_pairs, tokenizer.pad_token_id, "eval")
        reference = scorer = None  # freed: from here on its log-probs come with each batch
    replayed = variants.load_beta_sequence(cfg.loss.beta_sequence, total_steps)  # [] unless loss.beta_sequence
    # ---- 6. resume -------------------------------------------------------------------------------------
    if ckpt is not None:
        load_checkpoint(accelerator, ckpt, state)
    log = open_run(cfg, accelerator, state.step, inputs)  # config.yaml, metrics.jsonl (later rows dropped), wandb
    # ---- the loop: one optimizer step = grad_accum calibration batches ---------------------------------
    progress = Progress("β-DPO", total_steps, state.step, accelerator.is_main_process, cfg.log.progress_every)
    policy.train()
    while state.step < total_steps:
        t0 = time.perf_counter()
        step_loss, summaries = torch.zeros((), device=accelerator.device), []
        for k in range(cfg.train.grad_accum):
            j = state.step * cfg.train.grad_accum + k  # global micro-batch number
            idx = micro_batch_indices(j, len(train_pairs), calib_size, steps_per_epoch * cfg.train.grad_accum,
                                      cfg.train.seed, lengths)
            my_pairs = idx[rank * per_process : (rank + 1) * per_process]  # this process's B pairs of the N
            batch = collate_pairs([train_pairs[i] for i in my_pairs], tokenizer.pad_token_id)
            batch.update({key: v[my_pairs] for key, v in (ref_train or {}).items()})
            batch = fast_logps.to_device(batch, accelerator.device)  # pinned, non_blocking; the host copy kept
            with no_sync_unless_last(accelerator, policy, k, cfg.train.grad_accum), accelerator.autocast():
                mine = pair_logps(policy, reference, batch, cfg.train.logps, cfg.loss.ppl_scale,  # (B,) each
                                  cfg.train.prefix_sharing)
                losses, kept, summary = betadpo_loss(gather_pairs(accelerator, mine), state, cfg.loss,  # (N,)
                                                     True, replayed[state.step] if replayed else None)
                loss = process_share(losses, kept, rank, P)
                accelerator.backward(loss / cfg.train.grad_accum)
            step_loss += loss.detach() / cfg.train.grad_accum
            summaries.append(summary)
            if cfg.log.kept_pairs:  # which pairs the filter kept (a resume appends again: last row wins)
                log.write_to(out / "kept.jsonl", {"step": state.step + 1, "micro": k, "pairs": idx,
                                                  "kept": kept.int().tolist()}, "the filter's record")
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
        on_device = [torch.as_tensor(v, device=accelerator.device).float() for v in row.values()]
        values = dict(zip(row, torch.stack(on_device).tolist()))
        dt = time.perf_counter() - t0
        tokens = values.pop("tokens")
        log.write({"step": state.step, "lr": lr, **values, "pairs_per_s": values["pairs"] / dt,
                   "tokens_per_s": tokens / dt})  # stops on NaN/inf
        progress.step(loss=values["loss"], beta=values["beta"], kept=values["kept"] / values["pairs"],
                      pairs_per_s=values["pairs"] / dt)
        last = state.step == total_steps
        if eval_pairs and ((cfg.train.eval_every and state.step % cfg.train.eval_every == 0) or last):
            scored = score_pairs(accelerator, (policy, reference), eval_pairs, tokenizer.pad_token_id, cfg,
                                 cfg.loss.ppl_scale, ref_eval)
            log.write({"step": state.step, "split": "eval", **held_out_summary(scored, state, cfg.loss)})
        if state.step % cfg.train.save_every == 0 or last:
            save_checkpoint(accelerator, out, state.step, [*policy.parameters(), state.c])
    progress.close()
    # ---- save -----------------------------------------------------------------------------------------
    # final/ gathers the model on the main process (under FSDP2 a file at a time): first free what the last checkpoint
    # already holds and the end no longer needs (optimizer state, reference), to lower that host peak (SCALING.md)
    optimizer.state.clear()
    reference = None  # noqa: F841
    scale = {"c": state.c.item(), "beta_scale": F.softplus(state.c).item(), "ppl_scale": cfg.loss.ppl_scale,
             "learn_scale": cfg.loss.learn_scale, "M0": state.M0.item(), "sigma": state.sigma.item(),
             "step": state.step}
    save_final(accelerator, policy, tokenizer, out, state.step, {"beta_scale.json": scale},  # + the learned β-scale
               merge_lora=cfg.model.lora_merge_final)  # LoRA: final/ holds the adapter; merged/ the folded model
    accelerator.print(f"model: {out / 'final'}\nmetrics: {out / 'metrics.jsonl'}")
    end_processes(accelerator)  # wait for all, let the collectives settle, destroy the process group
    return out


def main():
    train_policy(parse_config(Config))  # start_run validates it for the launched number of processes


if __name__ == "__main__":
    main_guard(main)
