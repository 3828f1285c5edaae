"""Named variants and controls of β-DPO's steps, for studies (docs/RESULTS.md) and forks. None is β-DPO as
published; each replaces one step of betadpo.py's `betadpo_loss` when its config value is chosen.

A registry per step, keyed by the config value that selects the entry:

    LOSSES        loss.type        the per-pair loss ℓ_i (betadpo.py has "dpo")
    FILTERS       loss.filter      the filter's log-weights log w_i (betadpo.py has "margin", the Gaussian)
    BETA_LEVELS   loss.beta_level  the margin gap that sets β (betadpo.py has "batch": mean_{kept} M_i − M₀)
    ALPHA_UNITS   loss.alpha_units the units of that gap (betadpo.py has "nats")

To try an idea, add one entry: betadpo.py's LossArgs builds each key's choices from these dicts, so the new
name is a valid `--loss.<key>` at once. Entries are pure functions of tensors; this module imports nothing of
betadpo.py (no cycle), so the few lines of math they share with it are restated here.
The replayed-β control (loss.beta_sequence) is `load_beta_sequence` below.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from plumbing.errors import UserError

SIGMA_FLOOR = 1e-6  # as betadpo.SIGMA_FLOOR


# ---- loss.type: the per-pair loss ℓ_i(β_i), (B,) ------------------------------------------------------------
@dataclass(frozen=True)
class LossVariant:
    per_pair: Callable  # (beta_i (B,), logps: betadpo.PairLogps, loss_cfg) → ℓ_i (B,)
    reference_free: bool  # True: no π_ref; the calibration margin M_i is avg log π_θ(y_w|x) − avg log π_θ(y_l|x)


def ipo(beta, logps, cfg) -> torch.Tensor:
    """ℓ = (M̄ − 1/(2β))², M̄ from length-normalised log-ratios (Azar et al., 2023, https://arxiv.org/abs/2310.12036).
    β-DPO's calibration still uses the summed margins M_i (docs/ALGORITHM.md, Differences)."""
    M_avg = (logps.policy_chosen_avg - logps.ref_chosen_avg) - (logps.policy_rejected_avg - logps.ref_rejected_avg)
    return (M_avg - 1 / (2 * beta)) ** 2


def simpo(beta, logps, cfg) -> torch.Tensor:
    """ℓ = −log σ(β·M − γ), M = avg log π_θ(y_w|x) − avg log π_θ(y_l|x), γ = loss.simpo_gamma (Meng et al., 2024)."""
    return -F.logsigmoid(beta * (logps.policy_chosen_avg - logps.policy_rejected_avg) - cfg.simpo_gamma)


def orpo(beta, logps, cfg) -> torch.Tensor:
    """ℓ = −avg log π_θ(y_w|x) − β·log σ(log odds_w − log odds_l), odds = p/(1−p), p = exp(avg log π_θ) (Hong et al., 2024)."""
    def log_odds(avg_logp):  # log(p / (1 − p)), with 1 − p = −expm1(log p) kept away from 0
        return avg_logp - torch.log(-torch.expm1(avg_logp.clamp(max=-1e-6)))
    ratio = log_odds(logps.policy_chosen_avg) - log_odds(logps.policy_rejected_avg)
    return -logps.policy_chosen_avg - beta * F.logsigmoid(ratio)


LOSSES = {"ipo": LossVariant(ipo, reference_free=False), "simpo": LossVariant(simpo, reference_free=True),
          "orpo": LossVariant(orpo, reference_free=True)}


def reference_free(loss_type: str) -> bool:
    return loss_type in LOSSES and LOSSES[loss_type].reference_free


# ---- loss.filter: the filter's log-weights, (N,) -----------------------------------------------------------
def uniform_weights(M, M0, sigma) -> torch.Tensor:
    """A control: every w_i equal, so ρ·N pairs are dropped at random without looking at the margins."""
    return torch.zeros_like(M)


FILTERS = {"uniform": uniform_weights}


# ---- loss.beta_level and loss.alpha_units: the gap in β = β₀·(1 + α·gap) ----------------------------------------
def per_pair_gap(M, kept, M0) -> torch.Tensor:
    """The paper's Table 2 baseline, instance-level β: β_i = β₀·(1 + α·(M_i − M₀)) from each pair's own margin. (N,)"""
    return M - M0


def in_sigma_units(gap, sigma) -> torch.Tensor:
    """An extension, NOT in the paper: the gap in units of σ, so that α means the same on any task whatever its
    margins' scale (with raw nats, α = 0.6 is mild where margins spread over ±1 nat and drives β to its floor
    where they spread over ±10)."""
    return gap / sigma.clamp(min=SIGMA_FLOOR)


BETA_LEVELS = {"instance": per_pair_gap}
ALPHA_UNITS = {"sigma": in_sigma_units}


# ---- loss.beta_sequence: replayed βs --------------------------------------------------------------------------
def load_beta_sequence(path: str, total_steps: int) -> list[float]:
    """loss.beta_sequence: a JSON list of β values, one per optimizer step ([] when unset), used instead of
    β_batch. A control feeds plain DPO another run's βs (e.g. shuffled) to tell "which β when" from "how much β
    overall"."""
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
