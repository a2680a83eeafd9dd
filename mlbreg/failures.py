"""How a command ends when the machine stops it: one line, never a traceback.

- `os_cause(err)`: the OSError of the machine (a full disk, a read-only folder, a path
  through a file, ...) behind `err`, found along `__cause__` / `__context__`: `torch.save`
  wraps a full disk's OSError in `RuntimeError: [enforce fail at inline_container.cc ...]`.
- `describe(err)`: that cause as one line: the path, the cause, the way out (None when
  `err` has no such cause: a real crash keeps its traceback).
- `naming(path)`: re-raises such an error naming `path` (a write to an open file names none).
- `stop_signals_raise()`: SIGTERM / SIGUSR2 outside the training loop (whose `StopGuard`
  checkpoints instead) raise `Stopped`, so a launcher stopped while it starts up says so.

A leaf module: nothing of mlbreg, no torch.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

# errors of the storage, not of the program: reported as one line
SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
NOT_WRITABLE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
STORAGE = SPACE | NOT_WRITABLE | {errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.EIO}
_ELSEWHERE = "mlbreg train / tune: output_root=DIR; report / export: --out PATH"


def os_cause(err: BaseException | None) -> OSError | None:
    """The first OSError of the storage (`STORAGE`) in `err`'s chain of causes and contexts."""
    todo, seen = [err], set()
    while todo:
        err = todo.pop(0)
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in STORAGE:
            return err
        todo += [err.__cause__, err.__context__]
    return None


def describe(err: BaseException, elsewhere: str | None = None) -> str | None:
    """`PATH: cause [ERRNO]; the way out`, or None when no OSError of the storage is behind `err`.
    `elsewhere`: how the command writes somewhere else (`output_root=DIR`, `--out PATH`)."""
    elsewhere = elsewhere or _ELSEWHERE
    cause = os_cause(err)
    if cause is None:
        return None
    code = cause.errno
    where = f"{cause.filename}: " if cause.filename else ""
    text = f"{where}{cause.strerror or os.strerror(code)} [{errno.errorcode.get(code, code)}]"
    if code in SPACE:
        hint = "free some space and run the same command again (a run resumes from its last checkpoint)"
    elif code == errno.EROFS:
        hint = f"a read-only disk: write elsewhere ({elsewhere})"
    elif code in NOT_WRITABLE:
        hint = f"no permission here: change the permissions, or write elsewhere ({elsewhere})"
    elif code == errno.ENOTDIR:
        hint = f"a part of this path is a file, not a folder: write elsewhere ({elsewhere})"
    elif code == errno.EISDIR:
        hint = "a folder is where a file should go: name a file (--out FILE)"
    else:
        hint = "check the disk and the path, then run the same command again"
    return f"{text}; {hint}"


@contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """An OSError of the storage raised inside (even wrapped, as torch.save wraps it) comes
    out as an OSError naming `path`, chained to the original."""
    try:
        yield
    except Exception as err:
        cause = os_cause(err)
        if cause is None or (cause is err and cause.filename == str(path)):
            raise
        raise OSError(cause.errno, cause.strerror or os.strerror(cause.errno), str(path)) from err


class Stopped(BaseException):
    """A stop signal that came outside the training loop. A BaseException, as KeyboardInterrupt:
    no `except Exception` on the way (Hydra's job runner included) holds it up."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name


def _raise_stopped(signum, frame):
    raise Stopped(signum)


def is_ours(handler) -> bool:
    """Whether `handler` is the one `stop_signals_raise` installs (not a handler to hand a signal on to)."""
    return handler is _raise_stopped


@contextmanager
def stop_signals_raise() -> Iterator[None]:
    """While inside, SIGTERM and SIGUSR2 raise `Stopped` where their action was the default one
    (which ends the process without a word); a handler installed by someone else (submitit's)
    is left alone. The training loop's StopGuard takes them over while it runs."""
    previous = {}
    for name in ("SIGTERM", "SIGUSR2"):
        signum = getattr(signal, name, None)
        try:
            if signum is not None and signal.getsignal(signum) is signal.SIG_DFL:
                previous[signum] = signal.signal(signum, _raise_stopped)
        except ValueError:  # not the main thread: signals stay with whoever runs us
            pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
