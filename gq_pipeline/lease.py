"""One writer per output: ``.gq/lease.json`` under the output root, held by the run that writes there.

Two ``gq tokenize`` runs on one output would each plan from a listing of ``units/`` that does not hold the other's
work yet, cut the inputs into different units and tokenize some twice. The lease makes the second run refuse instead:

- It is created conditionally (:func:`gq_model.storage.create_exclusive`: a hard link on local disk, S3
  ``If-None-Match: *``, GCS ``ifGenerationMatch=0``), so of two runs starting together exactly one gets it.
- The holder renews it from a background thread (``heartbeat``, ``expires``), always with a compare-and-swap on the
  version it last wrote (S3 ``If-Match``, GCS ``ifGenerationMatch``, a directory lock locally). A renewal that finds
  the lease changed means another run took it over: the holder marks itself :attr:`OutputLease.lost` and must stop
  before writing more (the job checks at every progress tick, and renews once more, synchronously, before it
  writes the manifest: :meth:`OutputLease.confirm`).
- A lease whose ``expires`` has passed belongs to a run that stopped renewing (crashed, killed, cut off): a new run
  takes it over, again by compare-and-swap, so of two runs taking over one lease only one succeeds. Expiry compares
  the holder's clock with the taker's; the default TTL (10 minutes, renewed every minute) leaves room for skew and
  for a holder that stalls briefly. A holder stalled past its TTL loses the lease, notices at its next renewal and
  stops; what it committed before is kept (commit records are created conditionally, shards have deterministic
  names and bytes).
- An owner on this machine (same host name, boot and PID namespace) whose process is gone crashed: its lease is
  taken over at once, without waiting for the expiry (a SIGKILLed run is rerun straight away). A recycled PID only
  makes this check say "alive", which is the safe side.
- ``force=True`` (``gq tokenize --force-lease``) takes the lease from a live-looking owner: for an owner known to have
  crashed on a host whose clock cannot be trusted, or to skip waiting for the expiry. Forcing a lease a run still
  holds gives two writers until that run's next renewal.
- :meth:`OutputLease.release` deletes the lease only if it is still ours (a conditional delete).
"""
from __future__ import annotations

import json
import os
import posixpath
import socket
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Callable

from gq_model.storage import create_exclusive, delete_if_match, read_versioned, replace_if_match
from gq_pipeline.layout import CURRENT

__all__ = ["OutputLease", "LeaseHeldError", "LeaseLostError", "LEASE_NAME", "DEFAULT_TTL_S", "read_lease",
           "describe_owner"]

LEASE_NAME = CURRENT.lease  # gq_pipeline.layout: .gq/lease.json (version 1: _lease.json)
LEASE_VERSION = 1
DEFAULT_TTL_S = 600.0


class LeaseHeldError(RuntimeError):
    """Another run holds the output's lease."""

    def __init__(self, message: str, lease: dict[str, Any] | None):
        super().__init__(message)
        self.lease = lease


class LeaseLostError(RuntimeError):
    """This run's lease was taken over (expired or forced) by another run: it must stop writing."""


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _parse_time(s: str) -> float:
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def read_lease(fs, root: str, name: str = LEASE_NAME) -> dict[str, Any] | None:
    """The lease document under ``root`` (None if there is none); ``{"unreadable": ...}`` if it is not JSON."""
    got = read_versioned(fs, posixpath.join(root.rstrip("/"), name))
    if got is None:
        return None
    try:
        return json.loads(got[0])
    except ValueError as e:
        return {"unreadable": f"{e}"}


def describe_owner(lease: dict[str, Any]) -> str:
    o = lease.get("owner") or {}
    return f"run {o.get('run_id', '?')} (host {o.get('host', '?')}, pid {o.get('pid', '?')})"


def _process_namespace() -> dict[str, str]:
    """What makes a PID meaningful: the boot and the PID namespace (Linux; empty elsewhere)."""
    out = {}
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            out["boot_id"] = f.read().strip()
        out["pid_ns"] = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        pass
    return out


def _owner_is_dead_here(lease: dict[str, Any]) -> bool:
    """True only if the lease's owner ran on this machine, in this PID namespace, and its process no longer exists."""
    o = lease.get("owner") or {}
    here = _process_namespace()
    if not here or o.get("host") != socket.gethostname() or any(o.get(k) != v for k, v in here.items()):
        return False
    try:
        pid = int(o["pid"])
        if pid == os.getpid():
            return False
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (KeyError, TypeError, ValueError, OSError):  # EPERM: it exists (another user's)
        return False
    return False


class OutputLease:
    """The lease on one output directory. Use as ``with OutputLease(fs, root): ...`` or acquire()/release().

    ``ttl_s`` (default :data:`DEFAULT_TTL_S`) is how long the lease stays valid without a renewal; the heartbeat
    renews it every ``heartbeat_s`` (default ``ttl_s / 10``). ``log`` receives one-line notes (take-overs, a lost lease)."""

    def __init__(self, fs, root: str, *, force: bool = False, ttl_s: float | None = None,
                 heartbeat_s: float | None = None, run_id: str | None = None, url: str | None = None,
                 log: Callable[[str], None] | None = None):
        ttl_s = DEFAULT_TTL_S if ttl_s is None else ttl_s
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        self.fs = fs
        self.root = root.rstrip("/")
        self.path = posixpath.join(self.root, LEASE_NAME)
        self.url = url or self.path
        self.force = force
        self.ttl_s = float(ttl_s)
        self.heartbeat_s = float(heartbeat_s) if heartbeat_s else self.ttl_s / 10
        self.run_id = run_id or uuid.uuid4().hex[:16]
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": self.run_id,
                      **_process_namespace(), "argv": " ".join(sys.argv)[:500]}
        self.log = log or (lambda msg: None)
        self.taken_from: dict[str, Any] | None = None  # the lease we replaced (expired or forced), if any
        # True once we hold a lease taken from an owner that may still be running (expired or forced, not dead here)
        self.previous_owner_may_live = False
        self._version: str | None = None
        self._created: float | None = None
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one store operation on the lease at a time (heartbeat vs release)
        self._thread: threading.Thread | None = None

    @classmethod
    def for_store(cls, store, **kwargs) -> "OutputLease":
        """The lease of a :class:`gq_pipeline.manifest.OutputStore`'s output."""
        return cls(store.fs, store.root, url=f"{store.url}/{LEASE_NAME}", **kwargs)

    # ------------------------------------------------------------------ state
    @property
    def held(self) -> bool:
        return self._version is not None and not self._lost.is_set()

    @property
    def lost(self) -> bool:
        """True once a renewal found that another run replaced (or removed) our lease."""
        return self._lost.is_set()

    @property
    def temp_grace_s(self) -> float:
        """How old a temporary under the output must be before this run may delete it: 0 when no other run can be
        writing (a fresh lease, or one taken from a dead owner), else OutputStore's TEMP_STALE_S."""
        if not self.previous_owner_may_live:
            return 0.0
        from gq_pipeline.manifest import TEMP_STALE_S

        return TEMP_STALE_S

    def check(self) -> None:
        """Raise :class:`LeaseLostError` if the lease was lost: call before writing anything that must have a
        single writer (commit records, the manifest)."""
        if self._lost.is_set():
            raise LeaseLostError(f"{self.url}: this run ({self.run_id}) lost the output's lease to another run "
                                 f"(it expired or was forced); stopping so that two runs do not write one output. "
                                 f"Committed units are kept; rerun once the other run is done.")

    def confirm(self) -> None:
        """Renew now, and raise :class:`LeaseLostError` if the lease is no longer ours: before a write only the holder
        may make (the manifest), so that a take-over since the last heartbeat is not missed."""
        self.check()
        if not self.renew():
            self._lost.set()
            self.check()

    def _document(self, now: float) -> bytes:
        doc = {"lease_version": LEASE_VERSION, "owner": self.owner, "created": _iso(self._created or now),
               "heartbeat": _iso(now), "expires": _iso(now + self.ttl_s), "ttl_s": self.ttl_s,
               "expires_at": round(now + self.ttl_s, 3)}  # epoch seconds: what gq gc compares (gc_cli.py)
        if self.taken_from:
            doc["taken_from"] = {"owner": self.taken_from.get("owner"), "expires": self.taken_from.get("expires")}
        return json.dumps(doc, indent=1).encode("utf-8")

    # ------------------------------------------------------------------ acquire
    def acquire(self) -> "OutputLease":
        """Take the lease, or raise :class:`LeaseHeldError` naming its owner and expiry."""
        if self._version is not None:
            raise RuntimeError("this lease object already holds the lease")
        for _ in range(20):  # each turn ends in success, a refusal, or a race another writer won (retry)
            now = time.time()
            self._created = now
            data = self._document(now)
            try:
                created = create_exclusive(self.fs, self.path, data)
            except FileNotFoundError as e:
                if "://" in self.url and not self.url.startswith("file://"):
                    bucket = self.root.split("/", 1)[0]
                    raise FileNotFoundError(f"{self.url.rsplit('/', 1)[0]}: bucket {bucket!r} does not exist (gq "
                                            f"does not create buckets)") from e
                raise
            if created:
                got = read_versioned(self.fs, self.path)
                if got is not None and got[0] == data:  # read back: a store that ignored the condition shows here
                    self._start(got[1])
                    return self
                continue
            got = read_versioned(self.fs, self.path)
            if got is None:  # released between our create and our read: try again
                continue
            blob, version = got
            try:
                current = json.loads(blob)
                expires = _parse_time(current["expires"])
            except (ValueError, KeyError, TypeError):
                current, expires = {"unreadable": blob[:200].decode("utf-8", "replace")}, None
            expired = expires is not None and time.time() > expires
            dead = _owner_is_dead_here(current)
            if not (expired or dead or self.force):
                raise LeaseHeldError(self._held_message(current, expires), current)
            self.taken_from = current
            new = replace_if_match(self.fs, self.path, self._document(time.time()), version)
            if new is not None:
                why = ("its process is gone" if dead else "it had expired" if expired
                       else "forced (--force-lease)")
                self.previous_owner_may_live = not dead
                self.log(f"took over the output lease of {describe_owner(current)}: {why}")
                self._start(new)
                return self
            self.taken_from = None  # someone else changed it first: look again
        raise LeaseHeldError(f"{self.url}: could not acquire the lease after 20 attempts (other runs keep "
                             f"changing it)", None)

    def _held_message(self, current: dict[str, Any], expires: float | None) -> str:
        if "unreadable" in current:
            return (f"{self.url} exists but is not a valid lease ({current['unreadable']!r}); if no run is writing "
                    f"to this output, rerun with --force-lease")
        left = expires - time.time()
        return (f"{self.url.rsplit('/', 1)[0]} is being written by {describe_owner(current)}, which holds its lease "
                f"until {current['expires']} (in {left:.0f}s, renewed while it runs; last heartbeat "
                f"{current.get('heartbeat')}). Two runs on one output would tokenize inputs twice, so this run "
                f"stops. Wait for that run to finish, or, if it crashed, rerun with --force-lease (or wait for the "
                f"lease to expire).")

    def _start(self, version: str) -> None:
        self._version = version
        self._lost.clear()
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat_loop, name=f"gq-lease-{self.run_id}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ heartbeat
    def renew(self) -> bool:
        """Renew once (the heartbeat thread does this); False, and :attr:`lost`, if the lease is no longer ours."""
        with self._lock:
            if self._version is None or self._lost.is_set():
                return False
            new = replace_if_match(self.fs, self.path, self._document(time.time()), self._version)
            if new is None:
                self._lost.set()
                now = read_lease(self.fs, self.root)
                self.log(f"lost the output lease: it is now held by {describe_owner(now) if now else 'nobody'}")
                return False
            self._version = new
            return True

    def _heartbeat_loop(self) -> None:
        last_ok = time.time()
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self.renew():
                    return
                last_ok = time.time()
            except Exception as e:  # a store hiccup: keep trying until the lease would have expired
                if time.time() - last_ok >= self.ttl_s:
                    self._lost.set()
                    self.log(f"lost the output lease: no renewal succeeded for {self.ttl_s:.0f}s ({e})")
                    return

    # ------------------------------------------------------------------ release
    def release(self) -> bool:
        """Stop the heartbeat and delete the lease if it is still ours; True if this call deleted it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            version, self._version = self._version, None
            if version is None or self._lost.is_set():
                return False
            got = read_versioned(self.fs, self.path)  # compare first too: not every store honours delete conditions
            if got is None or got[1] != version:
                self._lost.set()
                return False
            return delete_if_match(self.fs, self.path, version)

    def __enter__(self) -> "OutputLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
