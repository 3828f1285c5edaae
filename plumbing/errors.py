"""The ways a run can stop early (user errors, training stops, storage faults) and where a run is (STATUS), for the
one line that says so. The bottom of plumbing's imports: it imports no module of the repository, so every module
may raise these. How a script turns them into that line and an exit code: plumbing/stopping.py's `main_guard`."""

from dataclasses import dataclass


class UserError(Exception):
    """A mistake in the user's config, data or paths: printed as one line, no traceback, exit code 2.
    Raised before anything is written."""


class TrainingStopped(Exception):
    """Training cannot go on (a loss, gradient norm, β statistic or weight is not finite): one line, exit
    code 3. The last good checkpoint stays; this step is neither logged nor saved."""


class StorageError(Exception):
    """Writing the run directory failed (disk full, read-only, permission...): one line, exit code 1, on every
    process alike (the processes agree on it: plumbing/storage.py). The partial write is removed first."""


@dataclass
class RunStatus:
    """Where a training run is, for the one line main_guard prints when it stops early (Ctrl-C, TrainingStopped).
    Set by MetricsLog.write (step) and by the checkpoint functions (checkpoint); read by stopping.main_guard."""

    step: int | None = None  # optimizer steps done; None until the training loop starts
    checkpoint: str = ""  # the last checkpoint saved or resumed from
    defer_interrupt: bool = False  # in the training loop: Ctrl-C stops at the next step boundary (see _on_sigint)
    interrupted: bool = False  # Ctrl-C came while deferred; MetricsLog.write raises KeyboardInterrupt for it

    def where(self) -> str:
        if self.step is None:
            return "before training started"
        return f"at step {self.step + 1} (last checkpoint: {self.checkpoint or 'none yet'})"


STATUS = RunStatus()
