"""The documents stay true to the repository.

1. The launch commands written in the docstrings, README and demo.sh: every script, config file and flag they
   name exists and parses (the scripts' own tests run the same configs for real).
2. Every reference points at something a reader can open: no file cites a document that is not in the
   repository, every relative markdown link and every in-repo path (configs/…, docs/…, tests/…) exists.
"""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from betadpo import Config
from plumbing.config import parse_config, validate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_vs_trl as bench  # noqa: E402
import run as experiments  # noqa: E402

SOURCES = ["betadpo.py", "sft.py", "eval.py", "plumbing/plots.py", "README.md", "demo.sh", "experiments/run.py",
           *(f"docs/{p.name}" for p in sorted(ROOT.glob("docs/*.md"))), "benchmarks/bench_vs_trl.py", "benchmarks/bench_lora.py",
           *(f"configs/{p.name}" for p in ROOT.glob("configs/*.yaml"))]
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
    if script == "benchmarks/bench_vs_trl.py":
        bench.build_parser().parse_args(args)
        return
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


# --------------------------------------------------------------------------------------------------------
# 2. References
# --------------------------------------------------------------------------------------------------------
def repository_text_files() -> dict:
    """{path relative to ROOT: text} of every file git tracks or would track (untracked, not ignored), binaries
    left out. Without git (an exported tree), every file outside hidden directories, runs/ and caches."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        skip = ("runs", "__pycache__")
        listed = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                  if p.is_file() and not any(part.startswith(".") or part in skip for part in p.relative_to(ROOT).parts)]
    files = {}
    for name in listed:
        path = ROOT / name
        if path.is_file() and b"\0" not in (data := path.read_bytes()):  # deleted in the working tree; binary
            files[name] = data.decode("utf-8", errors="replace")
    return files


FILES = repository_text_files()
TOP_DIRS = sorted({name.split("/")[0] for name in FILES if "/" in name})
# Spelled in pieces so that this file does not match its own patterns.
UNOPENABLE = {
    "the team's private spec": re.compile(r"\b" + "SP" + r"EC\b"),
    "a path next to the repository": re.compile(re.escape(".." + "/shared")),
    "an absolute path on the development machine": re.compile("/" + "work/"),
}
MARKDOWN_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
REPO_PATH = re.compile(r"(?<![\w./~-])((?:%s)/[\w./-]*[\w/])" % "|".join(map(re.escape, TOP_DIRS)))


def test_the_scan_sees_the_repository():
    assert {"README.md", "betadpo.py", "docs/ALGORITHM.md", "configs/sort.yaml", "tests/test_docs.py"} <= set(FILES)
    assert {"configs", "docs", "tests"} <= set(TOP_DIRS)


def test_no_reference_to_anything_outside_the_repository():
    found = [f"{name}:{number} cites {what}: {line.strip()}"
             for name, text in FILES.items() for number, line in enumerate(text.splitlines(), start=1)
             for what, pattern in UNOPENABLE.items() if pattern.search(line)]
    assert not found, "\n".join(found)


def broken_references(name: str, text: str) -> list[str]:
    """Relative markdown links (in .md files) and in-repo paths (anywhere) of one file that do not exist."""
    broken = []
    for target in MARKDOWN_LINK.findall(text) if name.endswith(".md") else []:
        if target.startswith(("http://", "https://", "mailto:", "#")):
            continue
        path = ((ROOT / name).parent / target.split("#")[0]).resolve()
        if not (path.is_relative_to(ROOT) and path.exists()):
            broken.append(f"{name}: link to '{target}', which is not in the repository")
    broken += [f"{name}: names '{path}', which is not in the repository"
               for path in REPO_PATH.findall(text) if not (ROOT / path).exists()]
    return broken


def test_in_repository_paths_and_links_exist():
    found = [problem for name, text in FILES.items() for problem in broken_references(name, text)]
    assert not found, "\n".join(found)


def test_every_docs_page_is_linked_from_the_readme():
    """Detail lives in docs/; the README is where a reader finds it, so a page it does not link is lost."""
    readme = (ROOT / "README.md").read_text()
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert {"ALGORITHM.md", "RESULTS.md", "PERFORMANCE.md", "ERRORS.md"} <= set(pages)
    assert [p for p in pages if f"](docs/{p})" not in readme and f"](docs/{p}#" not in readme] == []


def test_the_reference_checks_catch_what_they_are_for():
    assert UNOPENABLE["the team's private spec"].search("see " + "SP" + "EC.md §2")
    assert UNOPENABLE["a path next to the repository"].search("data in .." + "/shared/data")
    assert not UNOPENABLE["the team's private spec"].search("SP" + "ECIAL_TOKENS, METRIC_KEYS")
    missing = "docs/" + "NOWHERE.md"
    text = f"see [the math](../docs/ALGORITHM.md#notation), [x]({missing[5:]}), [paper](https://arxiv.org) and {missing}"
    assert broken_references("guide/page.md", text) == [
        f"guide/page.md: link to '{missing[5:]}', which is not in the repository",
        f"guide/page.md: names '{missing}', which is not in the repository",
    ]


def test_the_algorithm_page_names_functions_that_exist():
    """docs/ALGORITHM.md's step table and "Where to change what" send a reader to functions by name: each one
    is defined in betadpo.py, variants.py, plumbing/ or experiments/run.py (a rename that forgot the page fails here)."""
    page = (ROOT / "docs/ALGORITHM.md").read_text()
    code = "".join(path.read_text() for path in (ROOT / "betadpo.py", ROOT / "variants.py", *sorted((ROOT / "plumbing").glob("*.py")), ROOT / "experiments/run.py"))
    defined = {f or c for f, c in re.findall(r"^\s*(?:def|class) (\w+)|^([A-Z_]+) = ", code, re.M)}  # functions, classes, constants
    table = [line.rsplit("|", 2)[1] for line in page.splitlines() if re.match(r"\| \d\. ", line)]  # the function column
    where = page.split("## Where to change what")[1]
    named = {name for text in (*table, where) for name in re.findall(r"`([A-Za-z_]\w*)`", text)}
    assert {"batch_beta", "pair_scale", "betadpo_loss", "LossArgs", "LOSSES", "STUDIES"} <= named
    assert named <= defined, sorted(named - defined)
