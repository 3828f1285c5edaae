"""The launch commands written in the docstrings, README and demo.sh stay true to the code: every script,
config file and flag they name exists and parses (the scripts' own tests run the same configs for real)."""

import re
import shlex
import sys
from pathlib import Path

import pytest

from common import Config, parse_config, validate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import run as experiments  # noqa: E402

SOURCES = ["betadpo.py", "sft.py", "eval.py", "README.md", "demo.sh", "experiments/run.py", "docs/RESULTS.md",
           "benchmarks/bench_vs_trl.py", *(f"configs/{p.name}" for p in ROOT.glob("configs/*.yaml"))]
COMMAND = re.compile(r"(?:python|accelerate launch)\s[^\n`]*?(?<![\w/])([\w/]+\.py)\b([^\n`#]*)")


def commands():
    found = []
    for name in SOURCES:
        for line in (ROOT / name).read_text().splitlines():
            for match in COMMAND.finditer(line):
                found.append(pytest.param(match.group(0), match.group(1), match.group(2), id=f"{name}: {match.group(0)[:60]}"))
    return found


ALL = commands()


def test_the_documents_do_contain_commands():
    scripts = {p.values[1] for p in ALL}
    assert {"sft.py", "betadpo.py", "eval.py"} <= scripts and len(ALL) >= 15


@pytest.mark.parametrize("command, script, rest", ALL)
def test_documented_command_is_valid(command, script, rest):
    assert (ROOT / script).is_file(), command
    for config_file in re.findall(r"--config_file\s+(\S+)", command):
        assert (ROOT / config_file).is_file(), command
    args = shlex.split(rest.replace("\\", "").split("|")[0].split(">")[0])
    if script not in ("sft.py", "betadpo.py", "eval.py", "experiments/run.py") or not args or args[0] in ("--plot", "--compare"):
        return
    if script == "experiments/run.py":
        experiments.build_parser().parse_args(args)
        return
    args = [a.replace("$run", "sort_sft") for a in args]
    if "--help" in args:
        with pytest.raises(SystemExit) as exit_:
            parse_config(Config, args)
        assert exit_.value.code == 0
        return
    if "--config" in args:
        assert (ROOT / args[args.index("--config") + 1]).is_file(), command
        args[args.index("--config") + 1] = str(ROOT / args[args.index("--config") + 1])
    validate(parse_config(Config, args))
