"""One job per output directory: train.output_dir/lock.json, held by the main process while a run is alive.

Two jobs writing one run directory would log every step twice and race each other's checkpoints and final/.
The lock is a file created with O_CREAT | O_EXCL (atomic on local filesystems and on NFS v3+; no flock, which
some cluster filesystems ignore). It says who holds it:

    {"host": "node17", "pid": 4242, "started": "2026-12-03 10:00:00 UTC", "proc_start": 918273, "token": "..."}

and a thread touches it every HEARTBEAT_S seconds (its modification time is the heartbeat). Another job on the
directory is refused with one line naming the holder, unless the lock is stale, which is then taken over with a
warning: on the same host, when that pid is gone (or is now another process: `proc_start`, the kernel's start
time, differs); on another host, when its heartbeat is older than STALE_AFTER_S (its process cannot be asked).
A job killed by SIGKILL therefore blocks the directory for at most STALE_AFTER_S from other hosts and not at
all from its own. Only the main process takes the lock; the other processes of the job follow its verdict
(launch.start_run broadcasts it). main_guard releases the lock on every way out, atexit as a fallback.
"""

import atexit
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from plumbing.errors import UserError

LOCK = "lock.json"
HEARTBEAT_S = 60
STALE_AFTER_S = 600  # 10 heartbeats missed: well beyond clock skew between hosts and a busy filesystem

_held = {}  # the lock this process holds: path, token, dirs it created, the heartbeat's stop event


def _proc_start(pid: int) -> int | None:
    """The kernel's start time of `pid` (clock ticks since boot; Linux), to tell a reused pid; None elsewhere."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def stale_reason(holder: dict | None, age_s: float) -> str | None:
    """Why a lock with content `holder` (None: unreadable) and heartbeat `age_s` seconds ago is stale; None if it
    belongs to a live job."""
    if holder is None:  # torn by a crash between create and write (a live job writes it at once)
        return "it is empty or damaged" if age_s > HEARTBEAT_S else None
    if holder.get("host") == socket.gethostname():
        pid = holder.get("pid")
        if not isinstance(pid, int) or not _alive(pid):
            return f"its process {pid} is gone"
        if holder.get("proc_start") is not None and _proc_start(pid) not in (None, holder["proc_start"]):
            return f"its pid {pid} now belongs to another process"
        return None
    if age_s > STALE_AFTER_S:
        return f"no heartbeat from host {holder.get('host')} for {age_s / 60:.0f} minutes"
    return None


def _read(path: Path) -> tuple[dict | None, float]:
    """(content or None, seconds since its heartbeat); FileNotFoundError if it is gone."""
    age = time.time() - path.stat().st_mtime
    try:
        holder = json.loads(path.read_text())
        return (holder if isinstance(holder, dict) else None), age
    except ValueError:
        return None, age


def _who(holder: dict | None, age_s: float) -> str:
    if holder is None:
        return "a job that is writing its lock now"
    beat = "less than a minute ago" if age_s < 60 else f"{age_s / 60:.0f} minutes ago"
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}, last heartbeat {beat}"


def acquire(output_dir: Path):
    """Take output_dir's lock for this process (the main one), creating the directory. UserError if a live job
    holds it; a stale lock is taken over with a warning."""
    release()
    created = [p for p in (output_dir, *output_dir.parents) if not p.exists()][::-1]  # outermost first
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
          "proc_start": _proc_start(os.getpid()), "token": uuid.uuid4().hex}
    for _ in range(5):  # a few rounds: another job may take over the same stale lock at the same moment
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder, age = _read(path)
            except FileNotFoundError:
                continue  # released meanwhile
            reason = stale_reason(holder, age)
            if reason is None:
                _remove_created(created)
                raise UserError(f"train.output_dir: {output_dir} is in use by another job ({_who(holder, age)}); wait for "
                                f"it to end, or use another train.output_dir (if that job is gone, delete {path})") from None
            # take the stale lock over: rename it aside (only one job's rename of it succeeds), check that it is
            # still the one judged stale, then remove it and try to create ours
            aside = path.with_name(f".{LOCK}.{me['token']}")
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue
            taken, _ = _read(aside)
            if taken != holder:  # another job's fresh lock was renamed: put it back, and look again
                os.rename(aside, path)
                continue
            aside.unlink()
            print(f"warning: {path}: taking over the lock of a job that is gone ({_who(holder, age)}: {reason})", file=sys.stderr)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me) + "\n")
        break
    else:
        raise UserError(f"train.output_dir: {output_dir}: could not take its lock {path} (other jobs keep taking it); "
                        "use another train.output_dir")
    stop = threading.Event()
    threading.Thread(target=_heartbeat, args=(path, me["token"], stop), daemon=True, name="run-lock-heartbeat").start()
    _held.update(path=path, token=me["token"], created=created, stop=stop)


def _heartbeat(path: Path, token: str, stop: threading.Event):
    while not stop.wait(HEARTBEAT_S):
        try:
            os.utime(path)
        except OSError:  # the directory's storage failing is reported by the writes that need it
            pass


def _remove_created(created: list[Path]):
    """Remove the directories acquire() created, if nothing else was written into them."""
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:
            break


def release():
    """Give the lock up (if this process holds one and it is still ours); the directories acquire() created are
    removed again when empty (a run stopped by a mistake in its input leaves nothing behind)."""
    if not _held:
        return
    path, token, created, stop = _held.pop("path"), _held.pop("token"), _held.pop("created"), _held.pop("stop")
    stop.set()
    try:
        if json.loads(path.read_text()).get("token") == token:
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass
    _remove_created(created)


atexit.register(release)
