"""Alertmanager silences for a rollout, through its HTTP API v2 (standard library only).

    with normkit.monitor.alertmanager.silence(
            "http://alertmanager:9093", matchers={"model": "lm", "version": "v2"},
            duration="30m", comment="canary of lm v2", created_by="normkit") as silence_id:
        roll_out()

The silence opens on entering and is expired on leaving, also when the body raises; a silence
that could not be expired still ends by itself after ``duration``.  The same from a shell:
``amtool silence add model=lm version=v2 --duration=30m --comment=...`` (deploy/README.md).
"""

from __future__ import annotations

import json
import logging
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

__all__ = ["AlertmanagerError", "silence", "open_silence", "expire_silence", "active_silences",
           "parse_duration"]

log = logging.getLogger(__name__)

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_DURATION_FULL = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d|w))+")


class AlertmanagerError(RuntimeError):
    """Alertmanager could not be reached, or refused the request (the message says which)."""


def parse_duration(duration: str | float | timedelta) -> timedelta:
    """``"30m"``, ``"1h30m"``, ``"90s"``, ``"2d"`` (Alertmanager's units ms/s/m/h/d/w), a number
    of seconds or a ``timedelta`` -> a positive ``timedelta``.

    Raises:
        ValueError: not one of those, or not positive.
    """
    if isinstance(duration, timedelta):
        td = duration
    elif isinstance(duration, (int, float)) and not isinstance(duration, bool):
        td = timedelta(seconds=duration)
    elif isinstance(duration, str) and _DURATION_FULL.fullmatch(duration.strip()):
        td = timedelta(seconds=sum(float(n) * _UNITS[u] for n, u in _DURATION.findall(duration)))
    else:
        raise ValueError(f"duration must be a string like '30m', '1h30m' or '90s' (units ms, s, "
                         f"m, h, d, w), seconds or a timedelta, got {duration!r}")
    if td <= timedelta(0):
        raise ValueError(f"duration must be positive, got {duration!r}")
    return td


def _base(url: str) -> str:
    parts = urllib.parse.urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"url must be Alertmanager's base URL, like http://127.0.0.1:9093, got "
                         f"{url!r}")
    return url.rstrip("/")


def _request(method: str, url: str, body: dict | None, timeout: float) -> dict | None:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text = r.read().decode()
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace").strip()[:500]
        raise AlertmanagerError(f"Alertmanager refused {method} {url}: HTTP {e.code}: "
                                f"{detail}") from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise AlertmanagerError(f"Alertmanager unreachable at {url}: {reason} (is it running, "
                                f"and is the URL its base, like http://host:9093?)") from e
    return json.loads(text) if text.strip() else None


def _rfc3339(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def open_silence(url: str, matchers: Mapping[str, str], duration: str | float | timedelta,
                 comment: str, created_by: str = "normkit", timeout: float = 10.0) -> str:
    """Creates a silence from now for ``duration``; returns its id.

    Args:
        url: Alertmanager's base URL, e.g. ``http://127.0.0.1:9093``.
        matchers: {label: value}, all of which an alert must carry (exact equality) to be
            silenced, e.g. ``{"model": "lm", "version": "v2"}``.
        duration: how long it lasts at most (see ``parse_duration``).
        comment, created_by: shown in Alertmanager's UI (both required by Alertmanager).
        timeout: seconds per HTTP request.

    Raises:
        ValueError: a bad argument (named).
        AlertmanagerError: Alertmanager unreachable or refused the silence.
    """
    if not isinstance(matchers, Mapping) or not matchers or not all(
            isinstance(k, str) and k and isinstance(v, str) for k, v in matchers.items()):
        raise ValueError(f"matchers must be a non-empty {{label: value}} dict of strings, got "
                         f"{matchers!r}")
    for name, value in (("comment", comment), ("created_by", created_by)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    length = parse_duration(duration)
    start = datetime.now(timezone.utc)
    body = {"matchers": [{"name": k, "value": v, "isRegex": False, "isEqual": True}
                         for k, v in matchers.items()],
            "startsAt": _rfc3339(start), "endsAt": _rfc3339(start + length),
            "createdBy": created_by, "comment": comment}
    out = _request("POST", _base(url) + "/api/v2/silences", body, timeout)
    if not isinstance(out, dict) or not out.get("silenceID"):
        raise AlertmanagerError(f"Alertmanager at {url} answered without a silenceID: {out!r}")
    log.info("normkit: silence %s opened on %s for %s (%s)", out["silenceID"], url, length,
             matchers)
    return out["silenceID"]


def expire_silence(url: str, silence_id: str, timeout: float = 10.0) -> None:
    """Expires (ends now) the silence ``silence_id``; expiring an expired one is harmless.

    Raises:
        AlertmanagerError: Alertmanager unreachable, or it knows no such silence.
    """
    if not isinstance(silence_id, str) or not silence_id:
        raise ValueError(f"silence_id must be a non-empty string, got {silence_id!r}")
    _request("DELETE", f"{_base(url)}/api/v2/silence/{urllib.parse.quote(silence_id)}", None,
             timeout)
    log.info("normkit: silence %s on %s expired", silence_id, url)


def active_silences(url: str, matchers: Mapping[str, str], created_by: str | None = None,
                    timeout: float = 10.0) -> list[str]:
    """The ids of the silences in force (active or pending) whose matchers are exactly
    ``matchers`` (equality, no regex) and, if given, created by ``created_by``.

    Raises:
        AlertmanagerError: Alertmanager unreachable or refused the request.
    """
    want = sorted(matchers.items())
    found = _request("GET", _base(url) + "/api/v2/silences", None, timeout) or []
    out = []
    for s in found:
        if s.get("status", {}).get("state") == "expired":
            continue
        if created_by is not None and s.get("createdBy") != created_by:
            continue
        ms = s.get("matchers", [])
        if any(m.get("isRegex") or not m.get("isEqual", True) for m in ms):
            continue
        if sorted((m["name"], m["value"]) for m in ms) == want:
            out.append(s["id"])
    return out


@contextmanager
def silence(url: str, matchers: Mapping[str, str], duration: str | float | timedelta,
            comment: str, created_by: str = "normkit", timeout: float = 10.0) -> Iterator[str]:
    """A silence for the ``with`` block: opened on entering (see ``open_silence`` for the
    arguments), yields its id, expired on leaving — also when the block raises.

    If the silence cannot be expired, leaving raises ``AlertmanagerError`` (the silence still
    ends by itself after ``duration``); when the block itself raised, that exception is the one
    that propagates and the failed expiry is logged.
    """
    silence_id = open_silence(url, matchers, duration, comment, created_by, timeout)
    try:
        yield silence_id
    except BaseException:
        try:
            expire_silence(url, silence_id, timeout)
        except AlertmanagerError:
            log.exception("normkit: could not expire silence %s (it ends by itself after %s)",
                          silence_id, duration)
        raise
    expire_silence(url, silence_id, timeout)
