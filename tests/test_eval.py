"""eval.py: each number against an independent re-computation, process-count invariance, errors.
(--plot and --compare: tests/test_plots.py.)

Models are random tiny Llamas built here (no files from outside the repository, no network); the command-line
tests run eval.py in a subprocess exactly as a user would, with tiny sizes.
"""

import contextlib
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import eval as ev
from betadpo import Config
from plumbing import sort_task
from plumbing.config import parse_config
from plumbing.models import generate, load_model, load_tokenizer
from conftest import run_main, run_script, save_tiny_model
from plumbing.data import collate, load_pairs, tokenize, tokenize_pairs

TINY = ["--data.eval_size", "8", "--eval.num_prompts", "3", "--eval.samples_per_prompt", "2",
        "--eval.max_new_tokens", "6", "--eval.batch_size", "3"]  # 3 chunks of pairs and 3 prompts: uneven over 2 processes
CPU = SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"), autocast=contextlib.nullcontext)  # what score_pairs uses of an Accelerator


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """reference (seed 0), policy (seed 1), and two references that do not fit: another tokenizer, another vocab size."""
    root = tmp_path_factory.mktemp("models")
    tok, other_tok = sort_task.build_tokenizer(), sort_task.build_tokenizer()
    other_tok.add_tokens(["<extra>"])

    def save_misfit(name, tokenizer, vocab_size):
        sort_task.build_tiny_llama(vocab_size, 32, 1, 0, tok.pad_token_id, tok.eos_token_id).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        return str(root / name)

    return SimpleNamespace(
        reference=str(save_tiny_model(root / "reference", seed=0)), policy=str(save_tiny_model(root / "policy", seed=1)),
        other_tokenizer=save_misfit("other_tokenizer", other_tok, len(other_tok)),
        other_vocab=save_misfit("other_vocab", tok, len(tok) + 8),
    )


@pytest.fixture(scope="module")
def models(dirs):
    return SimpleNamespace(tok=load_tokenizer(dirs.policy), policy=load_model(dirs.policy).eval(), reference=load_model(dirs.reference).eval())


def run(args, processes=1):
    return run_script("eval.py", *args, processes=processes, check=False)


# --------------------------------------------------------------------------------------------------------
# Independent re-computations: one unpadded sequence at a time, full log_softmax in float64
# --------------------------------------------------------------------------------------------------------
def full_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().log_softmax(-1)  # (T, V): row t predicts token t+1


def response_logp(model, prompt: list[int], response: list[int]) -> float:
    logp = full_logprobs(model, prompt + response)
    return sum(logp[t - 1, tok].item() for t, tok in zip(range(len(prompt), len(prompt) + len(response)), response))


def expected_preference(models, pairs) -> dict:
    """pref_accuracy and reward_margin by plain Python from per-response log-probs."""
    d = [(response_logp(models.policy, p, c) - response_logp(models.reference, p, c))
         - (response_logp(models.policy, p, r) - response_logp(models.reference, p, r)) for p, c, r in pairs]
    return {"pref_accuracy": sum(x > 0 for x in d) / len(d), "reward_margin": sum(d) / len(d)}


def held_out_pairs(tok):
    cfg = parse_config(Config, TINY)
    return tokenize_pairs(tok, load_pairs(cfg.data, "eval", tok), cfg.data.max_length, cfg.data.max_prompt_length)


# --------------------------------------------------------------------------------------------------------
# Preference accuracy and reward margin
# --------------------------------------------------------------------------------------------------------
def test_preference_metrics_hand_computed():
    # Δ_w − Δ_l = 1, 0 (a tie: wrong), −2  →  accuracy 1/3, margin −1/3
    items = [
        {"policy_chosen": -1.0, "ref_chosen": -2.0, "policy_rejected": -5.0, "ref_rejected": -5.0},
        {"policy_chosen": -3.0, "ref_chosen": -3.0, "policy_rejected": -4.0, "ref_rejected": -4.0},
        {"policy_chosen": -4.0, "ref_chosen": -3.0, "policy_rejected": -2.0, "ref_rejected": -3.0},
    ]
    sums = {k: torch.tensor([it[k] for it in items]) for k in items[0]}
    m = ev.preference_metrics(ev.PairLogps(**sums, policy_chosen_avg=None, policy_rejected_avg=None, tokens=None))
    assert m["pref_accuracy"] == pytest.approx(1 / 3)
    assert m["reward_margin"] == pytest.approx(-1 / 3)
    assert m["logps/chosen"] == pytest.approx(-8 / 3) and m["ref_logps/rejected"] == pytest.approx(-4.0)


def test_pair_scores_match_independent_loop(models):
    pairs = held_out_pairs(models.tok)
    cfg = Config()
    cfg.eval.batch_size = 3
    scores = ev.score_pairs(CPU, (models.policy, models.reference), pairs, models.tok.pad_token_id, cfg)
    assert scores.policy_chosen.shape == (len(pairs),)
    for i, (p, c, r) in enumerate(pairs):
        assert scores.policy_chosen[i].item() == pytest.approx(response_logp(models.policy, p, c), abs=1e-4)
        assert scores.ref_rejected[i].item() == pytest.approx(response_logp(models.reference, p, r), abs=1e-4)
    got, want = ev.preference_metrics(scores), expected_preference(models, pairs)
    assert 0 < want["pref_accuracy"] < 1  # the two random models disagree on some pairs: the check has teeth
    assert got["pref_accuracy"] == want["pref_accuracy"]
    assert got["reward_margin"] == pytest.approx(want["reward_margin"], abs=1e-4)


# --------------------------------------------------------------------------------------------------------
# Reference KL
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature, logps", [(1.0, "fused"), (0.5, "plain")])  # k1 from either log-prob path
def test_kl_matches_direct_computation(models, temperature, logps):
    tok = models.tok
    prompts = [p for p, _ in tokenize(tok, ["sort 3141: ", "sort 27182818: "], ["", ""], 64, 32)]
    torch.manual_seed(0)
    samples = [(p, y) for p in prompts for y in generate(models.policy, [p] * 3, 6, temperature, tok.eos_token_id, tok.pad_token_id)]
    batch = collate(samples, tok.pad_token_id)  # right-padded: prompts and responses of different lengths
    got = ev.sequence_kl(models.policy, models.reference, batch, temperature, logps)
    for b, (p, y) in enumerate(samples):
        with torch.no_grad():
            lp = (models.policy(torch.tensor([p + y])).logits[0].double() / temperature).log_softmax(-1)
            lq = (models.reference(torch.tensor([p + y])).logits[0].double() / temperature).log_softmax(-1)
        positions = range(len(p) - 1, len(p) + len(y) - 1)  # the positions that predicted the sampled tokens
        kl = sum(F.kl_div(lq[t], lp[t], log_target=True, reduction="sum").item() for t in positions)
        k1 = sum((lp[t, y[t - len(p) + 1]] - lq[t, y[t - len(p) + 1]]).item() for t in positions)
        assert kl > 0
        assert got["kl"][b].item() == pytest.approx(kl, rel=1e-4, abs=1e-6)
        assert got["k1"][b].item() == pytest.approx(k1, rel=1e-4, abs=1e-5)
    same = ev.sequence_kl(models.reference, models.reference, batch, temperature, logps)
    assert same["kl"].tolist() == [0.0] * len(samples) and same["k1"].tolist() == [0.0] * len(samples)


def test_full_vocab_kl_chunks_agree():
    torch.manual_seed(0)
    a, b = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    rows, cols = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([1, 4, 0, 2, 3])
    want = (a.softmax(-1) * (a.log_softmax(-1) - b.log_softmax(-1))).sum(-1)[rows, cols]
    for chunk in (1, 2, 256):
        assert torch.allclose(ev.full_vocab_kl(a, b, rows, cols, chunk), want, atol=1e-6)


def test_mean_and_se():
    assert ev.mean_and_se([1.0, 2.0, 3.0, 6.0]) == pytest.approx((3.0, math.sqrt(14 / 3) / 2))


# --------------------------------------------------------------------------------------------------------
# Gold reward and win rates
# --------------------------------------------------------------------------------------------------------
def test_gold_metrics_hand_made():
    assert (ev.win(0.5, 0.2), ev.win(0.2, 0.2), ev.win(0.1, 0.2)) == (1.0, 0.5, 0.0)
    # gold of "sort 312: " is "123": g("123") = 1, g("132") = g("321") = 1/3; gold of "sort 90: " is "09":
    # g("09") = 1, g("9") = 0 (1 position of 2 lacking, the other wrong), g("00") = 1/2.
    prompts = ["sort 312: ", "sort 90: "]
    policy = [["123", "132"], ["9", "09"]]
    reference = [["123", "321"], ["00", "00"]]
    chosen = ["132", "00"]
    m = ev.gold_metrics(prompts, policy, reference, chosen)
    assert m["gold_reward"] == pytest.approx((1 + 1 / 3 + 0 + 1) / 4)
    assert m["exact_match"] == pytest.approx(2 / 4)
    assert m["win_rate_vs_chosen"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)  # "132" vs chosen "132": a tie, ½
    assert m["win_rate_vs_ref"] == pytest.approx((0.5 + 0.5 + 0 + 1) / 4)  # "123" vs "123", "132" vs "321": ties
    assert m["ref_gold_reward"] == pytest.approx((1 + 1 / 3 + 0.5 + 0.5) / 4)
    assert m["ref_exact_match"] == pytest.approx(1 / 4)


# --------------------------------------------------------------------------------------------------------
# The whole evaluation
# --------------------------------------------------------------------------------------------------------
def test_shard_covers_everything():
    for n in (1, 3, 8):
        for P in (1, 2, 3, 5):
            shares = [ev.shard(n, P, r) for r in range(P)]
            assert len({len(s) for s in shares}) == 1  # equal sizes: every process gathers the same count
            assert sorted({i for s in shares for i in s}) == list(range(n))


def test_policy_against_itself(dirs):
    """policy = reference: KL exactly 0, every margin a tie (so accuracy 0), greedy win rate vs. reference ½."""
    cfg = parse_config(Config, TINY + ["--eval.policy", dirs.reference, "--eval.reference", dirs.reference])
    result = ev.evaluate(cfg, CPU)
    m = result["metrics"]
    assert m["kl_seq"] == 0.0 and m["kl_k1"] == 0.0 and m["kl_seq_se"] == 0.0
    assert m["pref_accuracy"] == 0.0 and m["reward_margin"] == 0.0
    assert m["win_rate_vs_ref@t0"] == 0.5 and m["gold_reward@t0"] == m["ref_gold_reward@t0"]
    assert result["counts"] == {"pairs": 8, "prompts": 3, "samples": 6}
    assert [g["policy"] for g in result["generations"]] == [g["reference"] for g in result["generations"]]


def test_one_and_two_processes_agree(dirs, models, tmp_path, capsys):
    """The one-process runs are eval.py's __main__ in this process (conftest.run_main); the 2-process one is
    launched (what is tested: the launch and its split of the work)."""
    args = TINY + ["--eval.policy", dirs.policy, "--eval.reference", dirs.reference]
    code, one_stdout, stderr = run_main("eval.py", *args, "--eval.output_dir", tmp_path / "one", capsys=capsys)
    assert code == 0, stderr
    cache = ["--eval.cache_reference", "true", "--train.ref_cache_dir", str(tmp_path / "cache")]
    two = run(args + cache + ["--eval.output_dir", str(tmp_path / "two")], processes=2)  # draws and caches the reference's
    assert two.returncode == 0, two.stderr
    code, again_stdout, stderr = run_main("eval.py", *args, *cache, "--eval.output_dir", tmp_path / "again",
                                          capsys=capsys)  # takes them from the cache
    assert code == 0 and "(drawn, then cached)" in two.stdout and "(cached)" in again_stdout, stderr
    assert json.loads((tmp_path / "again" / "eval.json").read_text())["metrics"] == json.loads((tmp_path / "one" / "eval.json").read_text())["metrics"]
    a, b = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("one", "two"))
    assert (a["num_processes"], b["num_processes"]) == (1, 2)
    assert a["metrics"].keys() == b["metrics"].keys()
    for key, value in a["metrics"].items():
        assert b["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    gen = [(tmp_path / d / "generations.jsonl").read_text().splitlines() for d in ("one", "two")]
    assert gen[0] == gen[1] and len(gen[0]) == 3
    assert set(json.loads(gen[0][0])) >= {"prompt", "policy", "reference", "chosen"}
    # the command's numbers are the independently computed ones
    want = expected_preference(models, held_out_pairs(models.tok))
    assert a["metrics"]["pref_accuracy"] == want["pref_accuracy"]
    assert a["metrics"]["reward_margin"] == pytest.approx(want["reward_margin"], abs=1e-4)
    assert a["metrics"]["kl_seq"] > 0
    assert {"gold_reward@t0", "gold_reward@t1", "exact_match@t0", "win_rate_vs_chosen@t1", "win_rate_vs_ref@t1"} <= a["metrics"].keys()
    assert a["policy"] == dirs.policy and a["reference"] == dirs.reference
    assert a["seeds"] == {"eval.seed": 0, "data.seed": 0} and a["config"]["eval"]["samples_per_prompt"] == 2
    assert "pref_accuracy" in one_stdout and "kl_seq" in one_stdout


@pytest.mark.parametrize("case", ["missing", "empty", "tokenizer", "vocab"])
def test_errors_are_one_line(dirs, tmp_path, case, capsys):
    policy, reference, extra = dirs.policy, dirs.reference, []
    if case == "missing":
        policy = str(tmp_path / "no_such_model")
    elif case == "empty":
        extra = ["--data.eval_size", "0"]
    elif case == "tokenizer":
        reference = dirs.other_tokenizer
    else:
        reference = dirs.other_vocab
    args = TINY + ["--eval.policy", policy, "--eval.reference", reference, "--eval.output_dir", str(tmp_path / "out")] + extra
    code, _, stderr = run_main("eval.py", *args, capsys=capsys)  # in this process
    assert code == 2, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    expect = {"missing": [policy, "does not exist"], "empty": ["eval_size=0"],
              "tokenizer": [policy, reference, "tokenizers"], "vocab": [policy, reference, "vocabulary"]}[case]
    assert all(s in last for s in expect), last
    assert not (tmp_path / "out").exists()


def test_reference_cache_key_follows_what_the_completions_depend_on(dirs):
    cfg = Config()
    base = ev.reference_cache(cfg, dirs.reference, [[1, 2, 3]], [0.0, 1.0])
    assert base == ev.reference_cache(Config(), dirs.reference, [[1, 2, 3]], [0.0, 1.0])
    others = [ev.reference_cache(cfg, dirs.policy, [[1, 2, 3]], [0.0, 1.0]),  # another model
              ev.reference_cache(cfg, dirs.reference, [[1, 2, 4]], [0.0, 1.0]),  # other prompts
              ev.reference_cache(cfg, dirs.reference, [[1, 2, 3]], [1.0])]  # other temperatures
    for field, value in (("seed", 1), ("max_new_tokens", 3), ("samples_per_prompt", 7)):
        changed = Config()
        setattr(changed.eval, field, value)
        others.append(ev.reference_cache(changed, dirs.reference, [[1, 2, 3]], [0.0, 1.0]))
    assert len({base, *others}) == 1 + len(others)
