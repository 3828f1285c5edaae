"""Writing the run directory when the storage fails (disk full, read-only, permission, quota): every process
stops with the same one line instead of a traceback (or a hang), and the partial write is removed.

The failing write usually happens on the main process alone (metrics.jsonl, config.yaml, final/, the reference
cache; a checkpoint's weights and optimizer), sometimes on another (a checkpoint's random_states_N.pkl). So
after each such write the processes exchange their outcome (`agree`, one small all-gather) and all raise
StorageError together: a process that went on alone would wait forever in the next step's collectives.
"""

import errno
import os
import re
import shutil
from pathlib import Path

from plumbing.errors import STATUS, StorageError


def fault(exc: BaseException) -> tuple[int | None, str] | None:
    """(errno or None, what happened in words) if `exc` is a failed write; None for any other exception.

    Not every library raises OSError: safetensors raises SafetensorError("... I/O error: No space left on device
    (os error 28)"), and torch.save a RuntimeError from its zip writer ("[enforce fail at inline_container.cc]
    ... unexpected pos 576 vs 534" on a full disk, "open file failed with strerror: Read-only file system")."""
    if isinstance(exc, OSError):
        return exc.errno, exc.strerror or str(exc)
    text = str(exc)
    if type(exc).__name__ == "SafetensorError" and "I/O error" in text:
        code = re.search(r"os error (\d+)", text)
        return (int(code[1]), os.strerror(int(code[1]))) if code else (None, text)
    if isinstance(exc, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text):
        reason = re.search(r"strerror: ([^\n.]+)", text)
        return None, reason[1] if reason else "the write failed"
    failures = getattr(exc, "failures", None)  # torch.distributed.checkpoint's CheckpointException (FSDP shards)
    if isinstance(failures, dict):
        for failure in failures.values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, BaseException) and fault(inner) is not None:
                return fault(inner)
    return None


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000


def describe(exc: BaseException, what: str, path: Path, needed: int | None = None) -> str | None:
    """The one line for a failed write of `what` at `path` (None if `exc` is no storage fault): the error, and
    for a full disk how much the write needs next to what is free. A write that failed without saying why
    (torch.save) on a device with less free space than needed is a full disk too."""
    found = fault(exc)
    if found is None:
        return None
    code, words = found
    free = shutil.disk_usage(next(p for p in (path, *path.parents) if p.exists())).free
    full = code in (errno.ENOSPC, errno.EDQUOT) or (code is None and needed is not None and free < needed)
    if full:
        words = os.strerror(code) if code else "no space left on device"
    text = f"{words[0].lower() + words[1:]} while writing {what} {path}"
    if full:
        text += f" ({f'it needs about {_size(needed)}, ' if needed else ''}{_size(free)} free)"
    return text


def attempt(write, what: str, path: Path, needed: int | None = None) -> str | None:
    """Run write(); → None, or the line for its storage fault (see `describe`). Other exceptions propagate."""
    try:
        write()
    except Exception as e:
        error = describe(e, what, path, needed)
        if error is None:
            raise
        return error
    return None


def agree(accelerator, error: str | None, interrupted: bool = False) -> tuple[str | None, bool]:
    """Every process learns whether any process's write failed (→ the first such error, on all) and whether any
    was interrupted (→ True on all). One all-gather when there are several processes, none otherwise."""
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        outcomes = gather_object([(error, interrupted)])
        error = next((e for e, _ in outcomes if e), None)
        interrupted = any(i for _, i in outcomes)
    return error, interrupted


def settle(accelerator, error: str | None, partial: Path | None = None, what: str = "write", interrupted: bool = False) -> bool:
    """After a write: if it failed on any process, the main process removes the partial write and every process
    raises StorageError (exit code 1) with one line: the error, the path, the last good checkpoint, what to do.
    → whether any process was `interrupted` (agreed in the same exchange)."""
    error, interrupted = agree(accelerator, error, interrupted)
    if error is None:
        return interrupted
    if partial is not None and (accelerator is None or accelerator.is_main_process):
        remove_quietly(partial)
    removed = f"the partial {what} was removed; " if partial is not None else ""
    raise StorageError(f"{error}: {removed}{last_good()}. Fix the storage (free space, permissions) and re-run the "
                       "same command to resume")


def remove_quietly(path: Path):
    """Remove a partial write (file or directory); a failure here must not hide the error being reported."""
    try:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    except OSError:
        pass


def last_good() -> str:
    return f"the last good checkpoint, {STATUS.checkpoint}, is intact" if STATUS.checkpoint else "no checkpoint was saved yet"
