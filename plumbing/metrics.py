"""What a run writes as it goes: config.yaml, metrics.jsonl (and its wandb mirror), progress on the terminal."""

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

from plumbing.config import save_config
from plumbing.errors import STATUS, TrainingStopped, UserError
from plumbing.inputs import save_inputs
from plumbing.storage import agree, attempt, settle


def open_run(cfg, accelerator, step: int, inputs: dict | None = None) -> "MetricsLog":
    """The output directory, just before the loop starts at `step`: config.yaml (the config now in effect),
    inputs.json (the fingerprints of data, model and tokenizer: plumbing/inputs.py), metrics.jsonl without the
    rows of steps after `step` (a crashed run logged them after its last checkpoint; they are computed again,
    and said so), and the wandb mirror. From here on Ctrl-C stops at the next step boundary (stopping._on_sigint)."""
    out = Path(cfg.train.output_dir)
    log = MetricsLog(out / "metrics.jsonl", accelerator.is_main_process, accelerator=accelerator)

    def write():
        log.truncate_after(step)  # first: it reads the file, which may stop the run
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".config.yaml.tmp"  # through a temporary file: a failed write never leaves half a config
        save_config(cfg, tmp)
        os.replace(tmp, out / "config.yaml")
        if inputs is not None:
            save_inputs(out, inputs, step)

    settle(accelerator, attempt(write, "the run's files in", out) if accelerator.is_main_process else None,
           out / ".config.yaml.tmp", "write")
    log.wandb_run = init_wandb(cfg, accelerator.is_main_process)
    STATUS.step = step
    STATUS.defer_interrupt = True
    return log


# --------------------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------------------
class MetricsLog:
    """Appends one JSON object per line to `metrics.jsonl` (main process only) and mirrors it to wandb.

    A row with a value that is not finite (NaN, ±inf) is never written (JSON has no such numbers): it stops
    the run instead, on every process alike (their logged values are the same reduced numbers). None, for a
    value that does not exist this step, is written as null."""

    def __init__(self, path: Path, enabled: bool, wandb_run=None, accelerator=None):
        self.path, self.enabled, self.wandb_run, self.accelerator = path, enabled, wandb_run, accelerator

    def truncate_after(self, step: int):
        """On resume, drop rows a crashed run wrote after its last checkpoint, so each step appears once."""
        if not (self.enabled and self.path.exists()):
            return
        rows = read_metrics(self.path)
        kept = [r for r in rows if not isinstance(r.get("step"), (int, float)) or r["step"] <= step]
        if len(kept) < len(rows):
            print(f"{self.path}: {len(rows) - len(kept)} rows of steps after {step} dropped (logged after the last "
                  "checkpoint; those steps run again)", flush=True)
        if len(kept) < len(rows) or self.path.read_bytes()[-1:] not in (b"", b"\n"):  # rows dropped, or a torn line
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)  # atomic: a crash here never loses the rows that stay

    def write(self, row: dict):
        bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            what = ", ".join(f"{k} = {row[k]}" for k in bad[:4]) + (", ..." if len(bad) > 4 else "")
            split = " (held-out evaluation)" if row.get("split") == "eval" else ""
            raise TrainingStopped(f"step {row['step']}{split}: {what}: training stopped, nothing saved for this step; "
                                  f"last good checkpoint: {STATUS.checkpoint or 'none'}. Lower train.lr (or check the "
                                  "data) and train again in another train.output_dir")
        error = attempt(lambda: append_line(self.path, row), "metrics", self.path) if self.enabled else None
        # every process learns the outcome of the main one's write, and whether Ctrl-C came (on any process):
        # all stop at this same step boundary
        error, interrupted = agree(self.accelerator, error, STATUS.interrupted)
        if error is not None:
            settle(None, error)  # raises StorageError; the torn line was already cut off (append_line)
        if row.get("split") != "eval":
            STATUS.step = row["step"]
        if self.enabled and self.wandb_run is not None:
            prefix = "eval/" if row.get("split") == "eval" else "train/"
            self.wandb_run.log({prefix + k: v for k, v in row.items() if k not in ("step", "split")}, step=row["step"])
        if interrupted:
            raise KeyboardInterrupt

    def write_to(self, path: Path, row: dict, what: str):
        """One row appended to another JSON-lines file of the run (kept.jsonl), as safely as metrics.jsonl's:
        by the main process; a failed append cut back, and every process stopped with the same line."""
        settle(self.accelerator, attempt(lambda: append_line(path, row), what, path) if self.enabled else None)


def append_line(path: Path, row: dict):
    """One JSON line appended; a failed append (disk full) is cut back to the rows before it, not left torn."""
    size = path.stat().st_size if path.exists() else 0
    try:
        with path.open("a") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
    except OSError:
        try:
            os.truncate(path, size)
        except OSError:
            pass
        raise


def read_metrics(path) -> list[dict]:
    """The rows of a metrics.jsonl, one JSON object per line (every reader of metrics.jsonl uses this).

    A torn last line (a run killed while writing it) is skipped with a warning; an undecodable line anywhere
    else means the file was damaged or edited, and stops with its file and line number.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"'{path}' does not exist")
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                print(f"warning: {path} line {number} is incomplete (a run stopped while writing it); ignored", file=sys.stderr)
                continue
            raise UserError(f"{path} line {number}: not a JSON object (damaged or edited by hand); fix or delete the line") from None
        if not isinstance(row, dict):
            raise UserError(f"{path} line {number}: not a JSON object (damaged or edited by hand); fix or delete the line")
        rows.append(row)
    return rows


def wandb_logged_in() -> bool:
    """Whether wandb will find an API key: WANDB_API_KEY, or the ~/.netrc entry `wandb login` writes. No network."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def init_wandb(cfg, enabled: bool):
    """wandb only when `log.wandb` is on; `log.wandb_mode: offline` (the default) needs no network."""
    if not (cfg.log.wandb and enabled):
        return None
    import wandb

    return wandb.init(
        project=cfg.log.wandb_project,
        name=Path(cfg.train.output_dir).name,
        dir=cfg.train.output_dir,
        mode=cfg.log.wandb_mode,
        config=dataclasses.asdict(cfg),
    )


class Progress:
    """Training progress on the main process: a tqdm bar when stderr is a terminal; otherwise (a log file, a
    batch job) one plain line every `every` steps and at the last, e.g.
        β-DPO step 20/50 | loss 0.6353 | beta 0.1086 | kept 0.80 | 8.1 pairs/s | ETA 0:00:04
    so that a log holds no carriage-return redraws."""

    def __init__(self, desc: str, total: int, initial: int, enabled: bool, every: int):
        self.desc, self.total, self.done, self.every = desc, total, initial, max(1, every)
        self.enabled, self.started, self.first = enabled, time.perf_counter(), initial
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc)

    def step(self, **values: float):
        """One optimizer step done; `values` are shown (floats; kept as a share, pairs_per_s as a rate)."""
        self.done += 1
        if not self.enabled:
            return
        shown = {k: f"{v:.2f}" if k in ("kept", "pairs_per_s") else f"{v:.4f}" for k, v in values.items()}
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(shown)
        elif self.done % self.every == 0 or self.done == self.total:
            per_step = (time.perf_counter() - self.started) / (self.done - self.first)
            eta = round(per_step * (self.total - self.done))
            parts = [f"{k.replace('_per_s', '/s')} {v}" if k != "pairs_per_s" else f"{v} pairs/s" for k, v in shown.items()]
            print(f"{self.desc} step {self.done}/{self.total} | " + " | ".join(parts)
                  + f" | ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
