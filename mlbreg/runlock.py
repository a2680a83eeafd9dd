"""One launcher per run directory: an OS lock on `RUN_DIR/.lock`, held for the whole run.

    lock = RunLock(run_dir)
    holder = lock.acquire()          # None: ours; else who holds it (host, pid, started)
    ...
    lock.release()

The lock is `fcntl.flock` on `.lock` (the file stays; its content names the holder: host,
PID, start time). The kernel drops a flock when its process dies, however it dies
(SIGKILL, OOM, a crashed node's NFS lease), so a dead holder's lock is simply free: the
next launcher takes it and notes whose it was (`taken_over`).

Shared filesystems: on NFS, Linux turns flock into POSIX byte-range locks that the NFS
lock manager (NFSv3 lockd, NFSv4 built in) sees from every client, so two Slurm jobs on
different nodes exclude each other; a node that dies loses its locks when its lease
expires (NFSv4: about 90 s). Where the filesystem refuses locks (ENOLCK, EOPNOTSUPP: some
FUSE or old NFS mounts without lockd), the lock falls back to a lease file `.lock.lease`
created with O_EXCL and kept fresh by a heartbeat thread; a lease whose holder is gone
(same host, PID not running) or whose heartbeat is older than `stale_after` seconds (other
hosts, clocks in step) is taken over with a note. A leaf module: nothing of mlbreg.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

LOCK_NAME = ".lock"
LEASE_NAME = ".lock.lease"
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def _identity() -> dict[str, Any]:
    return dict(host=socket.gethostname(), pid=os.getpid(), started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def holder_alive(run_dir: str | os.PathLike) -> bool | None:
    """Whether a live process holds the run directory's lock, as far as this host can tell:
    False for a released lock (empty) or a holder on this host whose PID is gone, True for a
    live one or one on another host (taken at its word), None when there is no lock file
    (runs from before the lock)."""
    run_dir = Path(run_dir)
    holder = _read(run_dir / LOCK_NAME) or _read(run_dir / LEASE_NAME)
    if not holder:
        return None if not (run_dir / LOCK_NAME).exists() else False
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        return pid_alive(holder["pid"])
    return True


def describe(holder: dict[str, Any]) -> str:
    return f"{holder.get('host', '?')} pid {holder.get('pid', '?')} since {holder.get('started', '?')}"


class RunLock:
    def __init__(self, run_dir: str | os.PathLike, stale_after: float = 600.0, poll: float = 2.0):
        self.dir = Path(run_dir)
        self.path = self.dir / LOCK_NAME
        self.lease = self.dir / LEASE_NAME
        self.stale_after = stale_after
        self.poll = poll
        self.taken_over: dict[str, Any] | None = None  # the dead holder whose lock we took
        self._fd: int | None = None
        self._heartbeat: threading.Event | None = None

    # -- the public side ---------------------------------------------------------------
    def acquire(self, wait: bool = False) -> dict[str, Any] | None:
        """Take the lock: None when it is ours, else the live holder (host, pid, started).
        `wait`: block until the holder is done instead."""
        self.dir.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                holder = self._acquire_flock()
            except OSError as err:
                if err.errno not in _NO_LOCKS:
                    raise
                holder = self._acquire_lease()
            if holder is None or not wait:
                return holder
            time.sleep(self.poll)

    def release(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.set()
            self._heartbeat = None
            self.lease.unlink(missing_ok=True)
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # an empty .lock: released cleanly
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- flock -------------------------------------------------------------------------
    def _acquire_flock(self) -> dict[str, Any] | None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return self._holder()
        except OSError:
            os.close(fd)
            raise
        previous = _read(self.path)
        if previous:  # content left by a holder that died without releasing
            self.taken_over = previous
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(dict(_identity(), mode="flock")).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return None

    def _holder(self) -> dict[str, Any]:
        """Who holds the flock: its content, which the holder writes just after locking
        (a launcher that lost the race by a moment waits for it, up to a second)."""
        for _ in range(20):
            holder = _read(self.path)
            if holder:
                return holder
            time.sleep(0.05)
        return dict(host="?", pid="?", started="?")

    # -- lease file (filesystems without locks) ---------------------------------------
    def _acquire_lease(self) -> dict[str, Any] | None:
        me = dict(_identity(), mode="lease")
        for _ in range(2):  # at most: one stale lease removed, then ours
            try:
                fd = os.open(self.lease, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _read(self.lease) or {}
                if not self._stale(holder):
                    return holder or dict(host="?", pid="?", started="?")
                self.taken_over = holder
                # move it aside under a unique name: of two launchers taking over, one wins the rename
                try:
                    os.replace(self.lease, self.lease.with_name(f"{LEASE_NAME}.stale.{os.getpid()}"))
                except FileNotFoundError:
                    pass
                continue
            os.write(fd, json.dumps(me).encode())
            os.fsync(fd)
            os.close(fd)
            self._start_heartbeat()
            return None
        return _read(self.lease) or dict(host="?", pid="?", started="?")

    def _stale(self, holder: dict[str, Any]) -> bool:
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            return not pid_alive(holder["pid"])
        try:
            age = time.time() - self.lease.stat().st_mtime
        except FileNotFoundError:
            return True
        return age > self.stale_after

    def _start_heartbeat(self) -> None:
        stop = threading.Event()

        def beat():
            while not stop.wait(self.stale_after / 4):
                try:
                    os.utime(self.lease)
                except FileNotFoundError:
                    return

        threading.Thread(target=beat, name="mlbreg-lease", daemon=True).start()
        self._heartbeat = stop
