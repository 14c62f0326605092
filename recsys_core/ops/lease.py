"""Leases: one holder at a time for a key in storage (one nightly per (root, date), one publish switch
per folder), that never locks anything forever.

A lease is a small JSON object ``{holder, acquired_at, expires_at, ttl_s}``:

- taken with a conditional create (S3 ``If-None-Match: *``; locally a hard link), so of two runs
  starting together exactly one gets it;
- renewed by a heartbeat thread every ``ttl_s / 3`` seconds with a compare-and-swap on the version it
  last wrote (S3 ``If-Match``), so a holder that lost its lease finds out (:meth:`Lease.check`);
- taken over when expired (a crashed holder stops renewing) or when its holder ran on this machine and
  its process is gone, again with a compare-and-swap on that version, so of two runs one wins;
- released (deleted) at the end, only while it is still the version this holder wrote.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from recsys_core import storage
from recsys_core.config import ConfigError

log = logging.getLogger(__name__)


class LeaseHeldError(ConfigError):
    """Another live holder has the lease; the message names it and when its lease expires."""


class LeaseLostError(RuntimeError):
    """This holder's lease was taken over (it stopped renewing for longer than its ttl)."""


def holder_id() -> str:
    """``host:pid:random``: names the process in a refusal message."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def lease_body(holder: str, now: float, ttl_s: float, acquired_at: float | None = None) -> bytes:
    return json.dumps({"holder": holder, "acquired_at": _iso(acquired_at or now), "expires_at": _iso(now + ttl_s),
                       "expires_at_epoch": now + ttl_s, "ttl_s": ttl_s}, sort_keys=True).encode()


def is_expired(body: dict[str, Any], now: float) -> bool:
    return float(body.get("expires_at_epoch", 0.0)) <= now


def holder_gone(holder: str, host: str | None = None) -> bool:
    """True when the holder ran on this machine and its process no longer exists (a crash: no need to
    wait for the expiry). Holders on other machines are judged by their expiry alone."""
    parts = holder.split(":")
    if len(parts) != 3 or parts[0] != (host or socket.gethostname()) or not parts[1].isdigit():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass
class Lease:
    uri: str
    holder: str
    ttl_s: float
    token: str
    acquired_at: float
    lost: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def renew(self, now: float | None = None) -> bool:
        """Push the expiry ``ttl_s`` ahead, only if the stored lease is still the one this holder wrote."""
        now = time.time() if now is None else now
        if not storage.replace_if_match(self.uri, lease_body(self.holder, now, self.ttl_s, self.acquired_at),
                                        self.token):
            self.lost.set()
            return False
        cur = storage.read_versioned(self.uri)
        if cur is None or json.loads(cur[0]).get("holder") != self.holder:
            self.lost.set()
            return False
        self.token = cur[1]
        return True

    def start_heartbeat(self, every_s: float | None = None) -> "Lease":
        every = every_s if every_s is not None else max(0.5, self.ttl_s / 3)

        def beat() -> None:
            while not self._stop.wait(every):
                try:
                    if not self.renew():
                        log.error("lease %s lost: another holder took it over", self.uri)
                        return
                except OSError as e:  # a storage hiccup: the next beat retries well before expiry
                    log.warning("lease %s: heartbeat failed (%s); retrying", self.uri, e)

        self._thread = threading.Thread(target=beat, name=f"lease-heartbeat {self.uri}", daemon=True)
        self._thread.start()
        return self

    def check(self) -> None:
        """Raise if the lease was lost (call before a step that must be exclusive)."""
        if self.lost.is_set():
            raise LeaseLostError(f"{self.uri}: lease of {self.holder} was lost (taken over after expiry)")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if not self.lost.is_set() and not storage.delete_if_match(self.uri, self.token):
            log.warning("lease %s was no longer ours at release", self.uri)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _try_take(uri: str, holder: str, ttl_s: float, now: float) -> tuple[Lease | None, dict[str, Any] | None]:
    """(lease, None) when taken; (None, current holder's record) when a live holder has it."""
    body = lease_body(holder, now, ttl_s)
    if storage.create_if_absent(uri, body):
        cur = storage.read_versioned(uri)
        if cur is not None and json.loads(cur[0]).get("holder") == holder:
            return Lease(uri, holder, ttl_s, cur[1], now), None
    cur = storage.read_versioned(uri)
    if cur is None:  # released between our create and read: try again
        return None, None
    data, token = cur
    held = json.loads(data)
    gone = holder_gone(str(held.get("holder", "")))
    if not is_expired(held, now) and not gone:
        return None, held
    log.warning("lease %s of %s %s; taking it over", uri, held.get("holder"),
                "is held by a process that no longer exists" if gone else f"expired at {held.get('expires_at')}")
    if storage.replace_if_match(uri, body, token):
        cur = storage.read_versioned(uri)
        if cur is not None and json.loads(cur[0]).get("holder") == holder:
            return Lease(uri, holder, ttl_s, cur[1], now), None
    return None, None


def acquire(uri: str, ttl_s: float, wait_s: float = 0.0, holder: str | None = None, what: str = "",
            clock: Callable[[], float] = time.time, poll_s: float = 1.0) -> Lease:
    """Take the lease at ``uri`` (waiting up to ``wait_s`` for a live holder to finish) or raise
    :class:`LeaseHeldError` naming the holder and its expiry. The caller starts the heartbeat."""
    holder = holder or holder_id()
    deadline = clock() + wait_s
    while True:
        lease, held = _try_take(uri, holder, ttl_s, clock())
        if lease is not None:
            return lease
        if clock() >= deadline and held is not None:
            raise LeaseHeldError(f"{what or uri} is held by {held.get('holder')} (lease {uri}, acquired "
                                 f"{held.get('acquired_at')}, expires {held.get('expires_at')} unless renewed)")
        time.sleep(poll_s if held is not None else 0.05)
