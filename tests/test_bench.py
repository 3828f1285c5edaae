"""benchmarks/bench_vs_trl.py's bookkeeping (no TRL needed): the batch layouts it credits each implementation with,
and the FLOP counts built on them, against hand computations."""

import sys
from pathlib import Path

import pytest

from plumbing.fast_logps import PACK_ROW_WIDTH, pack_layout

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_vs_trl as bench  # noqa: E402

META = {"matmul_params": 1000, "vocab": 10, "hidden": 4, "layers": 2}  # LM head: 10 × 4 = 40 of the 1000 weights
# Two pairs: prompt 3 + chosen 2 / rejected 5 tokens, prompt 2 + chosen 1 / rejected 1 (EOS included).
STEP = [([1, 2, 3], [4, 5], [6, 7, 8, 9, 10]), ([1, 2], [3], [4])]


def test_step_shape_is_the_padded_and_the_packed_layout():
    shape = bench.step_shape(STEP, pack_layout, PACK_ROW_WIDTH)
    assert shape["lengths"] == [5, 3, 8, 3]  # chosen rows, then rejected rows
    assert (shape["T"], shape["rows"]) == (8, 4)
    # rows of up to 2 × 8 = 16 tokens, first fit, longest first: row 0 holds 8 + 5 + 3 = 16, row 1 the last 3
    assert (shape["packed_rows"], shape["packed_width"]) == (2, 16)
    # prefix sharing: one sequence per pair, 3 + 2 + 5 = 10 and 2 + 1 + 1 = 4 tokens, both in one row of 14
    assert shape["shared_lengths"] == [10, 4] and (shape["shared_rows"], shape["shared_width"]) == (1, 14)
    assert shape["response"] == 2 + 5 + 1 + 1 and shape["prompt"] == 2 + 1


def test_counted_and_executed_flops_by_hand():
    shape = bench.step_shape(STEP, pack_layout, PACK_ROW_WIDTH)
    fwd = lambda t: 2 * 1000 * t + 4 * 2 * 4 * t * t  # noqa: E731
    assert bench.counted_step_flops(shape, META, live_ref=True) == sum(4 * fwd(t) for t in (5, 3, 8, 3))
    assert bench.counted_step_flops(shape, META, live_ref=False) == sum(3 * fwd(t) for t in (5, 3, 8, 3))

    def by_hand(rows, width, scored, live, ppl=0, recompute=False):
        """Policy: body and LM head forward + backward (2× forward); a recomputing LM head (ours' fused head, TRL's
        chunked one) runs its forward matmul once more in backward. Live reference: one forward."""
        body = rows * width * 2 * 960 + rows * 4 * 2 * 4 * width**2
        head = 2 * 40 * (scored + ppl)
        return 3 * (body + head) + (head if recompute else 0) + (body + 2 * 40 * scored if live else 0)

    assert bench.executed_step_flops("ours_unshared", shape, META, True) == by_hand(2, 16, 9, True, recompute=True)
    assert bench.executed_step_flops("ours", shape, META, True) == by_hand(1, 14, 9, True, recompute=True)  # shared
    assert bench.executed_step_flops("ours", shape, META, True, ppl=True) == by_hand(1, 14, 9, True, ppl=3, recompute=True)
    assert bench.executed_step_flops("ours_logits", shape, META, True) == by_hand(1, 14, 9, True)  # keeps the softmax
    assert bench.executed_step_flops("trlfast", shape, META, False) == by_hand(4, 8, 9, False, recompute=True)
    assert bench.executed_step_flops("trl", shape, META, True) == by_hand(4, 8, 32, True, recompute=True)  # the LM head on all 4 × 8
    assert bench.executed_step_flops("naive", shape, META, True) == by_hand(4, 8, 32, True)


def test_hh_pairs_are_deterministic_hh_format_text():
    rows = bench.make_hh_pairs(20, seed=3)
    assert rows == bench.make_hh_pairs(20, seed=3) and rows != bench.make_hh_pairs(20, seed=4)
    for r in rows:
        assert r["prompt"].startswith("\n\nHuman: ") and r["prompt"].endswith("\n\nAssistant:")
        assert r["chosen"].startswith(" ") and r["rejected"].startswith(" ")
    assert len({r["prompt"].count("Human:") for r in rows}) > 1  # one to three turns


def test_ci_of_a_mean():
    m, half = bench.mean_ci95([1.0, 2.0, 3.0])
    assert m == 2.0 and half == pytest.approx(4.30 * 1.0 / 3**0.5)


def test_machinery_alone_times_both_arms():
    """The in-process A/B of betadpo_loss: both arms timed, paired differences summarised (not their values: timing)."""
    r = bench.machinery_alone(4, 1, n=20)
    assert r["n"] == 20 and 0 < r["plain_s"] < 1 and 0 < r["betadpo_s"] < 1
    extra, half = r["extra_s"]
    assert abs(extra) < 1 and 0 <= half < 1


def test_the_logits_kernel_column_is_betadpo_with_its_switch_set_to_fast(tmp_path):
    """ours_logits runs betadpo.py as ours does, with `--train.logps fast` instead of fused: the one switch, a flag."""
    from plumbing.config import parse_config
    import betadpo

    bench_spec = {k: "x" for k in ("model_dir", "train_file", "eval_file", "batch_size", "max_length", "max_prompt_length", "steps")}
    fused, logits = bench.ours_command(bench_spec, tmp_path, False, []), bench.ours_command(bench_spec, tmp_path, False, [], fused=False)
    assert fused[1] == logits[1] == "betadpo.py" and fused[4:] == logits[4:]
    assert [parse_config(betadpo.Config, cmd[2:4]).train.logps for cmd in (fused, logits)] == ["fused", "fast"]


def test_kernel_ab_runs_both_kernels(tmp_path, capsys):
    """--kernel-ab on the quick model: one round of each kernel, the table printed."""
    a = bench.build_parser().parse_args(["--quick", "--kernel-ab", "1", "--workdir", str(tmp_path)])
    bench.kernel_ab(a, bench.QUICK)
    out = capsys.readouterr().out
    assert "| wall (s) |" in out and "| CPU time (s) |" in out
