"""The built-in task: deterministic, gold reward maximal at the right answer, exact mixture proportions."""

import random

import pytest

from plumbing.sort_task import gold_reward, make_prompt, preference_pairs, sft_examples


def pairs(n=200, seed=0, high=0.3, flip=0.0, split="train"):
    return preference_pairs(n, seed, high, flip, 4, 12, split)


def test_deterministic_for_a_seed():
    assert pairs(seed=3) == pairs(seed=3)
    assert pairs(seed=3) != pairs(seed=4)
    assert pairs(split="train") != pairs(split="eval")  # held-out prompts differ from training prompts
    assert sft_examples(50, 1, 0.5, 4, 12) == sft_examples(50, 1, 0.5, 4, 12)


def test_gold_reward_of_correct_answer_is_the_maximum():
    rng = random.Random(0)
    for _ in range(200):
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 12)))
        prompt, answer = make_prompt(digits), "".join(sorted(digits))
        assert gold_reward(prompt, answer) == 1.0
        wrong = "".join(rng.choice("0123456789") for _ in range(rng.randint(0, 14)))
        assert gold_reward(prompt, wrong) <= 1.0
        assert (gold_reward(prompt, wrong) == 1.0) == (wrong == answer)


def test_gold_reward_by_hand():
    prompt = make_prompt("3142")  # sorted: 1234
    assert gold_reward(prompt, "1234") == 1.0
    assert gold_reward(prompt, "1243") == 0.5
    assert gold_reward(prompt, "123") == 0.75  # a missing position counts as wrong
    assert gold_reward(prompt, "123456") == 4 / 6  # so does an extra one
    assert gold_reward(prompt, " 1234 ") == 1.0 and gold_reward(prompt, "") == 0.0


@pytest.mark.parametrize("high, flip", [(0.1, 0.0), (0.4, 0.2), (0.0, 0.4), (1.0, 0.0)])
def test_mixture_and_noise_proportions_are_exact(high, flip):
    rows = pairs(n=500, high=high, flip=flip)
    assert sum(r["high_gap"] for r in rows) == round(500 * high)
    assert sum(r["flipped"] for r in rows) == round(500 * flip)
    for r in rows:
        gap = gold_reward(r["prompt"], r["chosen"]) - gold_reward(r["prompt"], r["rejected"])
        gap = -gap if r["flipped"] else gap
        assert gap > 0.5 if r["high_gap"] else 0 < gap <= 1 / 4 + 1e-9  # low gap = one digit of ≥ 4


def test_sft_targets_are_imperfect_in_the_requested_share():
    rows = sft_examples(2000, 0, 0.5, 4, 12)
    wrong = sum(gold_reward(r["prompt"], r["response"]) < 1 for r in rows) / len(rows)
    assert 0.45 < wrong < 0.55
    assert all(gold_reward(r["prompt"], r["response"]) == 1 for r in sft_examples(100, 0, 0.0, 4, 12))
