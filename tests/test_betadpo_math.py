"""The pure β-DPO functions against independent re-computations written here (numbers, not shapes)."""

import math
import statistics
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from betadpo import (
    BetaDPOState,
    batch_beta,
    LossArgs,
    PairLogps,
    betadpo_loss,
    gather_pairs,
    filter_log_weights,
    filter_mask,
    kept_mean,
    margins,
    pair_betas,
    pair_scale,
    preference_losses,
    process_share,
    update_statistics,
)
import variants


def random_stats(n=8, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    stats = {
        "policy_chosen": -5 - 3 * torch.rand(n, generator=g), "policy_rejected": -6 - 3 * torch.rand(n, generator=g),
        "ref_chosen": -5 - 3 * torch.rand(n, generator=g), "ref_rejected": -5 - 3 * torch.rand(n, generator=g),
        "log_ppl": 0.5 + 2 * torch.rand(n, generator=g), "tokens": torch.full((n,), 10.0),
    }
    lengths_w, lengths_l = torch.randint(2, 9, (n,), generator=g).float(), torch.randint(2, 9, (n,), generator=g).float()
    for side, length in (("chosen", lengths_w), ("rejected", lengths_l)):
        stats[f"policy_{side}_avg"] = stats[f"policy_{side}"] / length
        stats[f"ref_{side}_avg"] = stats[f"ref_{side}"] / length
    if grad:
        for k in ("policy_chosen", "policy_rejected", "policy_chosen_avg", "policy_rejected_avg"):
            stats[k] = stats[k].clone().requires_grad_(True)
    return PairLogps(**stats)


def batch_loss(s: PairLogps, state, cfg, training_batch=True, replayed_beta=None):
    """One process's β-DPO on the batch s: (L = (1/K)·Σ_{kept} ℓ_i, as the loop backpropagates it on one process;
    the summary)."""
    losses, kept, summary = betadpo_loss(s, state, cfg, training_batch, replayed_beta)
    return process_share(losses, kept, 0, 1), summary


def beta_rule(beta0, alpha, M, kept, M0, beta_min, sigma=None, instance=False):
    """β as betadpo_loss's step 4 computes it: the gap of loss.beta_level (batch, or variants' instance), in the
    units of loss.alpha_units (nats, or variants' sigma), through batch_beta."""
    gap = variants.BETA_LEVELS["instance"](M, kept, M0) if instance else kept_mean(M, kept) - M0
    if sigma is not None:
        gap = variants.ALPHA_UNITS["sigma"](gap, sigma)
    return batch_beta(beta0, alpha, gap, beta_min)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_margins_are_log_ratio_differences_without_beta():
    s = random_stats()
    for i in range(8):
        expected = (s.policy_chosen[i] - s.ref_chosen[i]) - (s.policy_rejected[i] - s.ref_rejected[i])
        assert margins(s, "dpo")[i].item() == pytest.approx(expected.item(), abs=1e-6)
        assert margins(s, "simpo")[i].item() == pytest.approx((s.policy_chosen_avg[i] - s.policy_rejected_avg[i]).item(), abs=1e-6)


def test_moving_averages_over_several_steps():
    m, M0, sigma = 0.9, torch.tensor(0.0), torch.tensor(0.0)
    ref_M0 = ref_sigma = 0.0
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        batch = torch.randn(16, generator=g) * (step + 1) + step
        M0, sigma = update_statistics(M0, sigma, batch, m)
        values = batch.tolist()
        ref_M0 = m * ref_M0 + (1 - m) * statistics.fmean(values)
        ref_sigma = m * ref_sigma + (1 - m) * statistics.stdev(values)  # unbiased, as github.com/junkangwu/beta-DPO
        assert M0.item() == pytest.approx(ref_M0, rel=1e-5) and sigma.item() == pytest.approx(ref_sigma, rel=1e-5)


def test_batch_beta_and_its_floor():
    M, kept = torch.tensor([1.0, 2.0, 9.0, 4.5]), torch.tensor([True, True, False, True])  # kept mean 2.5
    assert beta_rule(0.1, 0.6, M, kept, torch.tensor(1.0), 1e-3).item() == pytest.approx(0.1 * (1 + 0.6 * (2.5 - 1.0)))
    assert beta_rule(0.1, 0.0, M, kept, torch.tensor(9.0), 1e-3).item() == pytest.approx(0.1)  # α = 0: static β
    assert beta_rule(0.1, 0.6, M, kept, torch.tensor(100.0), 1e-3).item() == pytest.approx(1e-3)  # clamped
    assert not beta_rule(0.1, 0.6, M.requires_grad_(True), kept, torch.tensor(1.0), 1e-3).requires_grad


def test_filter_weights_are_gaussian_around_M0():
    M = torch.tensor([0.0, 1.0, 2.0, -3.0])
    log_w = filter_log_weights(M, torch.tensor(1.0), torch.tensor(2.0))
    expected = [-((x - 1.0) ** 2) / (2 * 2.0**2) for x in M.tolist()]
    assert log_w.tolist() == pytest.approx(expected)


def test_sigma_zero_or_underflow_gives_uniform_weights():
    M = torch.zeros(6)
    assert filter_log_weights(M, torch.tensor(0.0), torch.tensor(0.0)).tolist() == [0.0] * 6  # step 0: σ = 0
    far = torch.tensor([1e4, 2e4, -1e4])
    assert filter_log_weights(far, torch.tensor(0.0), torch.tensor(1.0)).tolist() == [0.0] * 3  # every w underflows


@pytest.mark.parametrize("N, rho, K", [(64, 0.2, 51), (10, 0.25, 7), (3, 0.9, 1), (8, 0.0, 8), (7, 0.5, 3)])
def test_filter_keeps_floor_of_N_times_one_minus_rho(N, rho, K):
    g = torch.Generator().manual_seed(0)
    mask = filter_mask(filter_log_weights(torch.randn(N), torch.tensor(0.0), torch.tensor(1.0)), rho, g)
    assert mask.dtype == torch.bool and mask.sum().item() == K


def test_filter_prefers_margins_near_M0():
    """Over many draws each pair's keep rate must match sampling without replacement ∝ w_i, computed
    independently here by exact enumeration (N = 5, K = 2)."""
    M, M0, sigma = torch.tensor([0.0, 0.5, 1.0, 2.0, 3.0]), torch.tensor(0.5), torch.tensor(1.0)
    w = [math.exp(-((x - 0.5) ** 2) / 2) for x in M.tolist()]
    exact = [0.0] * 5  # P(i kept) = Σ_j≠i P(first i, then j) + P(first j, then i)
    for i in range(5):
        for j in range(5):
            if i != j:
                p = w[i] / sum(w) * w[j] / (sum(w) - w[i])
                exact[i] += p
                exact[j] += p
    g, draws = torch.Generator().manual_seed(0), 20000
    counts = torch.zeros(5)
    for _ in range(draws):
        counts += filter_mask(filter_log_weights(M, M0, sigma), 0.6, g).float()  # K = floor(5 · 0.4) = 2
    rates = (counts / draws).tolist()
    for rate, p in zip(rates, exact):
        assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / draws)  # 4 standard errors
    assert rates[1] > rates[3] > rates[4]  # nearest to M₀ kept most


def test_uniform_filter_when_sigma_is_zero():
    g, counts = torch.Generator().manual_seed(0), torch.zeros(8)
    for _ in range(4000):
        counts += filter_mask(filter_log_weights(torch.zeros(8), torch.tensor(0.0), torch.tensor(0.0)), 0.5, g).float()
    assert ((counts / 4000 - 0.5).abs() < 0.04).all()


def test_same_generator_state_gives_the_same_mask():
    M = torch.randn(32)
    a = filter_mask(filter_log_weights(M, M.mean(), M.std()), 0.3, torch.Generator().manual_seed(7))
    b = filter_mask(filter_log_weights(M, M.mean(), M.std()), 0.3, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_beta_scale_variants():
    log_ppl, c = torch.tensor([0.5, 2.0, -0.3]), torch.tensor(0.2)
    sp = math.log1p(math.exp(0.2))
    assert pair_scale(c, log_ppl, False, False).tolist() == [1.0, 1.0, 1.0]
    assert pair_scale(c, log_ppl, False, True).tolist() == pytest.approx([sp] * 3)
    assert pair_scale(c, log_ppl, True, False).tolist() == pytest.approx([sp * 0.5, sp * 2.0, 0.0])  # log max(PPL, 1)


def test_each_loss_type_against_a_scalar_recomputation():
    s, beta = random_stats(), torch.linspace(0.05, 0.4, 8)
    for i in range(8):
        b = beta[i].item()
        dw, dl = (s.policy_chosen[i] - s.ref_chosen[i]).item(), (s.policy_rejected[i] - s.ref_rejected[i]).item()
        aw, al = s.policy_chosen_avg[i].item(), s.policy_rejected_avg[i].item()
        rw, rl = s.ref_chosen_avg[i].item(), s.ref_rejected_avg[i].item()
        dpo = -math.log(sigmoid(b * (dw - dl)))
        cdpo = -0.8 * math.log(sigmoid(b * (dw - dl))) - 0.2 * math.log(sigmoid(-b * (dw - dl)))
        ipo = ((aw - rw) - (al - rl) - 1 / (2 * b)) ** 2
        simpo = -math.log(sigmoid(b * (aw - al) - 0.5))
        odds = lambda a: math.exp(a) / (1 - math.exp(a))  # noqa: E731
        orpo = -aw - b * math.log(sigmoid(math.log(odds(aw)) - math.log(odds(al))))
        assert preference_losses(beta, s, LossArgs(type="dpo"))[i].item() == pytest.approx(dpo, rel=1e-5)
        assert preference_losses(beta, s, LossArgs(type="dpo", label_smoothing=0.2))[i].item() == pytest.approx(cdpo, rel=1e-5)
        assert preference_losses(beta, s, LossArgs(type="ipo"))[i].item() == pytest.approx(ipo, rel=1e-5)
        assert preference_losses(beta, s, LossArgs(type="simpo", simpo_gamma=0.5))[i].item() == pytest.approx(simpo, rel=1e-5)
        assert preference_losses(beta, s, LossArgs(type="orpo"))[i].item() == pytest.approx(orpo, rel=1e-4)


def test_everything_off_is_plain_dpo():
    """α = 0, ρ = 0, no scale: mean over pairs of −log σ(β·M) (TRL's `sigmoid` loss), and state only tracks M."""
    s = random_stats(grad=True)
    cfg = LossArgs(beta=0.1)
    state = BetaDPOState(cfg, seed=0, device="cpu")
    loss, summary = batch_loss(s, state, cfg)
    M = [((s.policy_chosen[i] - s.ref_chosen[i]) - (s.policy_rejected[i] - s.ref_rejected[i])).item() for i in range(8)]
    assert loss.item() == pytest.approx(statistics.fmean(-math.log(sigmoid(0.1 * m)) for m in M), rel=1e-6)
    assert summary["beta"].item() == pytest.approx(0.1) and summary["kept"].item() == 8
    assert summary["rewards/margins"].item() == pytest.approx(0.1 * statistics.fmean(M), rel=1e-5)


def test_beta_dpo_loss_by_hand():
    """The whole calibration batch (docs/ALGORITHM.md), re-computed step by step with plain floats."""
    s = random_stats(n=10, seed=3, grad=True)
    cfg = LossArgs(beta=0.1, alpha=0.6, filter_ratio=0.3, momentum=0.9, ppl_scale=True, beta_scale_init=0.7)
    state = BetaDPOState(cfg, seed=5, device="cpu")
    state.M0, state.sigma = torch.tensor(0.2), torch.tensor(0.8)
    M = [((s.policy_chosen[i] - s.ref_chosen[i]) - (s.policy_rejected[i] - s.ref_rejected[i])).item() for i in range(10)]
    M0 = 0.9 * 0.2 + 0.1 * statistics.fmean(M)
    sigma = 0.9 * 0.8 + 0.1 * statistics.stdev(M)
    expected_mask = filter_mask(filter_log_weights(torch.tensor(M), torch.tensor(M0), torch.tensor(sigma)), 0.3, torch.Generator().manual_seed(5))
    kept = [i for i in range(10) if expected_mask[i]]
    beta_b = 0.1 * (1 + 0.6 * (statistics.fmean(M[i] for i in kept) - M0))
    expected = statistics.fmean(-math.log(sigmoid(beta_b * 0.7 * max(s.log_ppl[i].item(), 0) * M[i])) for i in kept)
    loss, summary = batch_loss(s, state, cfg)
    assert len(kept) == 7 and summary["kept"].item() == 7
    assert state.M0.item() == pytest.approx(M0, rel=1e-5) and state.sigma.item() == pytest.approx(sigma, rel=1e-5)
    assert summary["beta"].item() == pytest.approx(beta_b, rel=1e-5)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_evaluation_never_touches_the_statistics_or_the_generator():
    s = random_stats()
    cfg = LossArgs(alpha=0.6, filter_ratio=0.5)
    state = BetaDPOState(cfg, seed=0, device="cpu")
    state.M0, state.sigma = torch.tensor(0.3), torch.tensor(0.4)
    rng_before = state.generator.get_state().clone()
    _, summary = batch_loss(s, state, cfg, training_batch=False)
    assert state.M0.item() == pytest.approx(0.3) and state.sigma.item() == pytest.approx(0.4)
    assert torch.equal(state.generator.get_state(), rng_before) and summary["kept"].item() == 8


def test_global_normalisation_makes_two_processes_equal_one():
    """Rank r gathers the batch (gather_pairs: its own pairs keep their graph) and backpropagates its share
    (P/K)·Σ_{its kept} ℓ_i (process_share); averaging the two ranks' gradients (what DDP does) must give the
    single-process gradient of (1/K)·Σ_{all kept} ℓ_i, for the policy and for c."""
    cfg = LossArgs(beta=0.1, alpha=0.6, filter_ratio=0.25, learn_scale=True, ppl_scale=True)
    full = random_stats(n=8, seed=4, grad=True)
    one = BetaDPOState(cfg, 0, "cpu")
    loss, _ = batch_loss(full, one, cfg)
    loss.backward()
    two = [BetaDPOState(cfg, 0, "cpu") for _ in range(2)]
    halves = [PairLogps(**{k: v.detach()[r * 4 : (r + 1) * 4].clone().requires_grad_(v.requires_grad)
                           for k, v in full.tensors().items()}) for r in range(2)]
    for r in range(2):  # what accelerate's gather gives each rank: every rank's pairs, detached, in rank order
        gather = lambda d: {k: torch.cat([getattr(h, k).detach() for h in halves]) for k in d}  # noqa: E731
        everyone = gather_pairs(SimpleNamespace(process_index=r, gather=gather), halves[r])
        assert torch.equal(everyone.policy_chosen, full.policy_chosen.detach())
        losses, kept, _ = betadpo_loss(everyone, two[r], cfg, True)
        process_share(losses, kept, r, 2).backward()
    for k in ("policy_chosen", "policy_rejected"):
        assert torch.allclose(getattr(full, k).grad, torch.cat([getattr(h, k).grad for h in halves]) / 2, atol=1e-7)
    assert one.c.grad.item() == pytest.approx((two[0].c.grad + two[1].c.grad).item() / 2, rel=1e-5)


def test_learnable_scale_gets_a_gradient_and_round_trips():
    cfg = LossArgs(learn_scale=True, beta_scale_init=0.5)
    state = BetaDPOState(cfg, 0, "cpu")
    assert F.softplus(state.c).item() == pytest.approx(0.5)  # the *effective* initial scale
    s = random_stats(grad=True)
    loss, _ = batch_loss(s, state, cfg)
    loss.backward()
    assert state.c.grad is not None and state.c.grad.item() != 0
    state.step, state.M0 = 3, torch.tensor(1.5)
    restored = BetaDPOState(cfg, 99, "cpu")
    restored.load_state_dict(state.state_dict())
    assert restored.step == 3 and restored.M0.item() == 1.5 and restored.c.item() == state.c.item()
    assert torch.equal(restored.generator.get_state(), state.generator.get_state())
    fixed = BetaDPOState(LossArgs(learn_scale=False), 0, "cpu")
    assert not fixed.c.requires_grad


# ---- variants and controls (loss.beta_level, loss.alpha_units, loss.filter, loss.beta_sequence) -------------
def test_sigma_units_and_instance_level_beta_by_hand():
    M = torch.tensor([1.0, 3.0, -2.0, 6.0])
    kept = torch.tensor([True, True, False, True])
    M0, sigma = torch.tensor(2.0), torch.tensor(4.0)
    # batch level, nats: kept mean (1 + 3 + 6)/3 = 10/3; β = 0.1 · (1 + 0.6 · (10/3 − 2)) = 0.18
    assert beta_rule(0.1, 0.6, M, kept, M0, 1e-3).item() == pytest.approx(0.18)
    # batch level, σ units: gap (10/3 − 2)/4 = 1/3; β = 0.1 · (1 + 0.6/3) = 0.12
    assert beta_rule(0.1, 0.6, M, kept, M0, 1e-3, sigma=sigma).item() == pytest.approx(0.12)
    # instance level, nats: β_i = 0.1 · (1 + 0.6 · (M_i − 2)), floored at 1e-3 (pair 3: 0.1 · (1 − 2.4) < 0)
    expected = [max(0.1 * (1 + 0.6 * (m - 2)), 1e-3) for m in M.tolist()]
    assert beta_rule(0.1, 0.6, M, kept, M0, 1e-3, instance=True).tolist() == pytest.approx(expected)
    # instance level, σ units
    expected = [max(0.1 * (1 + 0.6 * (m - 2) / 4), 1e-3) for m in M.tolist()]
    assert beta_rule(0.1, 0.6, M, kept, M0, 1e-3, sigma=sigma, instance=True).tolist() == pytest.approx(expected)


def test_instance_level_loss_uses_each_pairs_own_beta():
    s = random_stats(n=6, seed=3)
    cfg = LossArgs(beta=0.1, alpha=0.6, beta_level="instance")
    state = BetaDPOState(cfg, seed=0, device="cpu")
    state.M0, state.sigma = torch.tensor(0.3), torch.tensor(1.0)
    loss, summary = batch_loss(s, state, cfg, training_batch=False)
    M = margins(s, "dpo")
    betas = [max(0.1 * (1 + 0.6 * (m - 0.3)), 1e-3) for m in M.tolist()]
    expected = sum(-math.log(sigmoid(b * m)) for b, m in zip(betas, M.tolist())) / 6
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert summary["beta"].item() == pytest.approx(sum(betas) / 6, rel=1e-5)


def test_uniform_filter_ignores_margins_and_keeps_the_same_number():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    M1, M2 = torch.randn(20), torch.randn(20) * 50 + 7
    a = filter_mask(variants.uniform_weights(M1, torch.tensor(0.0), torch.tensor(1.0)), 0.25, g1)
    b = filter_mask(variants.uniform_weights(M2, torch.tensor(7.0), torch.tensor(50.0)), 0.25, g2)
    assert a.sum() == 15 and torch.equal(a, b)  # the same draw whatever the margins
    # Over many draws every pair is kept 75% of the time (margin-guided filtering would favour pairs near M₀).
    g = torch.Generator().manual_seed(0)
    M = torch.linspace(-10, 10, 8)
    counts = sum(filter_mask(variants.uniform_weights(M, torch.tensor(0.0), torch.tensor(1.0)), 0.25, g).float() for _ in range(4000))
    assert (counts / 4000 - 0.75).abs().max() < 0.03
    guided = sum(filter_mask(filter_log_weights(M, torch.tensor(0.0), torch.tensor(1.0)), 0.25, g).float() for _ in range(500)) / 500
    assert guided[0] < 0.5 and guided[3] > 0.9  # the control really differs from the mechanism it controls


def test_replayed_beta_replaces_the_dynamic_beta():
    s = random_stats(n=8, seed=4)
    cfg = LossArgs(beta=0.1, alpha=0.0)
    state = BetaDPOState(cfg, seed=0, device="cpu")
    loss, summary = batch_loss(s, state, cfg, replayed_beta=0.37)
    M = margins(s, "dpo").tolist()
    assert loss.item() == pytest.approx(sum(-math.log(sigmoid(0.37 * m)) for m in M) / 8, rel=1e-5)
    assert summary["beta"].item() == pytest.approx(0.37)


def test_beta_sequence_file_errors(tmp_path):
    from plumbing.errors import UserError
    from variants import load_beta_sequence

    assert load_beta_sequence("", 10) == []
    good = tmp_path / "b.json"
    good.write_text("[0.1, 0.2, 0.05]")
    assert load_beta_sequence(str(good), 3) == [0.1, 0.2, 0.05]
    with pytest.raises(UserError, match="has 3 values, training needs one per step \\(4\\)"):
        load_beta_sequence(str(good), 4)
    bad = tmp_path / "bad.json"
    for text, match in (("[0.1, -1]", "positive numbers"), ("{\"a\": 1}", "positive numbers"), ("[0.1,", "cannot read")):
        bad.write_text(text)
        with pytest.raises(UserError, match=match):
            load_beta_sequence(str(bad), 1)
    with pytest.raises(UserError, match="cannot read"):
        load_beta_sequence(str(tmp_path / "missing.json"), 1)


def test_summary_logs_floor_rate_and_skew():
    s = random_stats(n=16, seed=7)
    cfg = LossArgs(beta=0.1, alpha=50.0, beta_level="instance")  # a huge α puts pairs below M₀ on the floor
    state = BetaDPOState(cfg, seed=0, device="cpu")
    _, summary = batch_loss(s, state, cfg, training_batch=False)
    M = margins(s, "dpo").tolist()
    at_floor = sum(0.1 * (1 + 50 * m) <= 1e-3 for m in M) / 16
    assert summary["beta_floor"].item() == pytest.approx(at_floor)
    mu = sum(M) / 16
    m2, m3 = sum((m - mu) ** 2 for m in M) / 16, sum((m - mu) ** 3 for m in M) / 16
    assert summary["margin_skew"].item() == pytest.approx(m3 / m2 ** 1.5, rel=1e-4)


# ---- β_i's floor and the detached perplexity -------------------------------------------------------------------
def test_beta_i_is_floored_so_a_one_token_prompt_still_trains_under_dpo_and_ipo():
    """A one-token prompt has no perplexity (log PPL = 0, so s_i = 0): β_i = β_min, not 0. Under DPO β_i = 0 would
    give every such pair the constant loss log 2 and no gradient; under IPO 1/(2β_i) would be inf."""
    s = random_stats(n=4, grad=True)
    s.log_ppl = torch.tensor([0.0, 1.5, 0.0, 2.0])  # pairs 0 and 2: one-token prompts
    for loss_type in ("dpo", "ipo"):
        cfg = LossArgs(type=loss_type, beta=0.1, ppl_scale=True, beta_min=1e-3)
        state = BetaDPOState(cfg, 0, "cpu")
        beta_i = pair_betas(torch.tensor(0.1), state.c, s.log_ppl, cfg)
        assert beta_i.tolist() == pytest.approx([1e-3, 0.1 * 1.5, 1e-3, 0.1 * 2.0])  # softplus(c) = beta_scale_init = 1
        loss, _ = batch_loss(s, state, cfg)
        assert torch.isfinite(loss)
        loss.backward()
        assert getattr(s, "policy_chosen" if loss_type == "dpo" else "policy_chosen_avg").grad[0].abs().item() > 0  # pair 0 trains
        for v in s.tensors().values():
            v.grad = None
    M0 = margins(s, "dpo")[0].item()
    by_hand = -math.log(sigmoid(1e-3 * M0))  # DPO at β_min for pair 0
    per_pair = preference_losses(torch.full((4,), 1e-3), s, LossArgs())
    assert per_pair[0].item() == pytest.approx(by_hand, rel=1e-6) and per_pair[0].item() != pytest.approx(math.log(2), rel=1e-9)


def test_a_one_token_prompt_has_zero_log_perplexity():
    """The prompt's mean log-prob is over tokens 1…|x|−1: none for |x| = 1, so log PPL = 0 exactly (no NaN)."""
    from plumbing.data import collate_pairs
    from plumbing.sort_task import build_tiny_llama, build_tokenizer
    from betadpo import pair_logps

    tok = build_tokenizer()
    model = build_tiny_llama(len(tok), 32, 1, 0, tok.pad_token_id, tok.eos_token_id)
    batch = collate_pairs([([5], [6, 7, tok.eos_token_id], [8, tok.eos_token_id]), ([5, 6, 7], [8, tok.eos_token_id], [9, tok.eos_token_id])], tok.pad_token_id)
    stats = pair_logps(model, model, batch, "fused", with_ppl=True)
    assert stats.log_ppl[0].item() == 0.0 and stats.log_ppl[1].item() > 0


def test_log_perplexity_is_detached_so_the_policy_gets_no_gradient_through_its_prompt():
    """We keep log PPL_θ(x) detached (the learnable-scale design keeps its gradient; docs/ALGORITHM.md): the
    policy's gradient with ppl_scale equals the gradient with log PPL replaced by the same numbers as a constant."""
    from plumbing.data import collate_pairs
    from plumbing.sort_task import build_tiny_llama, build_tokenizer
    from betadpo import pair_logps

    tok = build_tokenizer()
    model = build_tiny_llama(len(tok), 32, 1, 0, tok.pad_token_id, tok.eos_token_id)
    pairs = [([5, 6, 7, 8], [6, 7, tok.eos_token_id], [8, tok.eos_token_id]), ([5, 9, 7], [8, tok.eos_token_id], [9, 6, tok.eos_token_id])]
    batch = collate_pairs(pairs, tok.pad_token_id)
    cfg = LossArgs(beta=0.1, ppl_scale=True)
    grads = []
    for constant in (False, True):
        model.zero_grad()
        stats = pair_logps(model, model, batch, "fused", with_ppl=True)
        assert not stats.log_ppl.requires_grad
        if constant:
            stats.log_ppl = torch.tensor(stats.log_ppl.tolist())
        loss, _ = batch_loss(stats, BetaDPOState(cfg, 0, "cpu"), cfg)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert grads[0].abs().sum() > 0 and torch.equal(grads[0], grads[1])
