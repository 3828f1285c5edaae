"""The three scripts read on one screen width: no line of betadpo.py, sft.py or eval.py is longer than 120 columns."""

import pytest

from conftest import ROOT

MAX_COLUMNS = 120


@pytest.mark.parametrize("script", ["betadpo.py", "sft.py", "eval.py"])
def test_no_line_is_longer_than_120_columns(script):
    text = (ROOT / script).read_text(encoding="utf-8")  # columns are characters: β, σ and ≤ count one each
    too_long = [f"{script}:{n}: {len(line)} columns" for n, line in enumerate(text.splitlines(), 1) if len(line) > MAX_COLUMNS]
    assert not too_long, "\n".join(too_long)
