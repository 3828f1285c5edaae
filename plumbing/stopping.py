"""How the scripts stop: user errors, training stops and storage faults (plumbing/errors.py) as one line, no
traceback, with where the run was; Ctrl-C taken at a step boundary; the output directory's lock released and the
process group's threads settled on every way out. Every script runs its main() through `main_guard`.

It sits above errors.py, run_lock.py and distributed.py (it uses all three, none of them uses it): errors.py
stays a leaf that every module can import.
"""

import os
import signal
import sys
import threading

from plumbing import run_lock
from plumbing.distributed import settle_collectives
from plumbing.errors import STATUS, StorageError, TrainingStopped, UserError


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
