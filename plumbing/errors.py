"""How the scripts stop: user errors and training stops as one line (no traceback), and where a run was when
it stopped. Every script runs its main() through `main_guard`."""

import os
import sys
from dataclasses import dataclass


class UserError(Exception):
    """A mistake in the user's config, data or paths: printed as one line, no traceback, exit code 2.
    Raised before anything is written."""


class TrainingStopped(Exception):
    """Training cannot go on (a loss, gradient norm, β statistic or weight is not finite): one line, exit
    code 3. The last good checkpoint stays; this step is neither logged nor saved."""


@dataclass
class RunStatus:
    """Where a training run is, for the one line main_guard prints when it stops early (Ctrl-C, TrainingStopped).
    Set by MetricsLog.write (step) and by the checkpoint functions (checkpoint)."""

    step: int | None = None  # optimizer steps done; None until the training loop starts
    checkpoint: str = ""  # the last checkpoint saved or resumed from

    def where(self) -> str:
        if self.step is None:
            return "before training started"
        return f"at step {self.step + 1} (last checkpoint: {self.checkpoint or 'none yet'})"


STATUS = RunStatus()


def main_guard(main):
    """Run `main()`; turn expected failures into one readable line on stderr, no traceback:
    UserError → exit 2, TrainingStopped → exit 3, Ctrl-C → exit 130 (the shell's code for SIGINT)."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingStopped as e:  # every process stops at the same step: the main one says why
        _close_progress_bars()
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt:
        _close_progress_bars()
        if os.environ.get("RANK", "0") == "0":
            print(f"interrupted {STATUS.where()}; re-run the same command to resume", file=sys.stderr)
        sys.exit(130)


def _close_progress_bars():
    """End an open tqdm bar's line first, so that the message is a line of its own (and the last one)."""
    if "tqdm" in sys.modules:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
