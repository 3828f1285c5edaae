"""How the scripts stop: user errors, training stops and storage faults as one line (no traceback), where a
run was when it stopped, and Ctrl-C taken at a step boundary. Every script runs its main() through `main_guard`."""

import os
import signal
import sys
import threading
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
    Set by MetricsLog.write (step) and by the checkpoint functions (checkpoint)."""

    step: int | None = None  # optimizer steps done; None until the training loop starts
    checkpoint: str = ""  # the last checkpoint saved or resumed from
    defer_interrupt: bool = False  # in the training loop: Ctrl-C stops at the next step boundary (see _on_sigint)
    interrupted: bool = False  # Ctrl-C came while deferred; MetricsLog.write raises KeyboardInterrupt for it

    def where(self) -> str:
        if self.step is None:
            return "before training started"
        return f"at step {self.step + 1} (last checkpoint: {self.checkpoint or 'none yet'})"


STATUS = RunStatus()


def _on_sigint(signum, frame):
    """Ctrl-C. In the training loop (STATUS.defer_interrupt) the first one only sets a flag, which the loop acts
    on at the next step boundary (MetricsLog.write), so that every process stops at the same step. A
    KeyboardInterrupt raised wherever the signal lands can land inside a finalizer (`__del__`, a weakref
    callback): Python prints "Exception ignored in ..." there and training simply goes on. A second Ctrl-C,
    or one outside the loop (loading, the final save's aftermath), raises at once."""
    if STATUS.defer_interrupt and not STATUS.interrupted:
        STATUS.interrupted = True
        if os.environ.get("RANK", "0") == "0":  # os.write: print() is not safe inside a signal handler
            os.write(2, b"Ctrl-C: stopping after this step (Ctrl-C again to stop at once)\n")
        return
    raise KeyboardInterrupt


def main_guard(main):
    """Run `main()`; turn expected failures into one readable line on stderr, no traceback:
    UserError → exit 2, TrainingStopped → exit 3, StorageError → exit 1, Ctrl-C → exit 130 (the shell's code for
    SIGINT). The output directory's lock (plumbing/run_lock.py) is released on every way out, and the process
    group's threads settle (plumbing.distributed.settle_collectives) before the interpreter exits."""
    from plumbing import run_lock

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _on_sigint) if in_main_thread else None
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except StorageError as e:  # the processes agreed on the message: the main one says it
        _close_progress_bars()
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
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
    finally:
        run_lock.release()
        from plumbing.distributed import settle_collectives  # (here: distributed.py imports this module)

        settle_collectives()  # every way out (a finished run found, an error): no hang or abort at exit
        STATUS.defer_interrupt = STATUS.interrupted = False
        if in_main_thread and previous is not None:
            signal.signal(signal.SIGINT, previous)


def _close_progress_bars():
    """End an open tqdm bar's line first, so that the message is a line of its own (and the last one)."""
    if "tqdm" in sys.modules:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
