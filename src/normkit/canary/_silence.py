"""The rollout's Alertmanager silence, kept in step with the canary's verdict.

While the canary holds, the candidate version's alerts are expected (new versions drift a
little, and a hold means the evidence is still coming in): they are silenced for ``duration``
from the latest verdict, so a canary run on a schedule keeps the silence open as long as it
holds.  Once the canary promotes or rolls back, the silence is expired: a promoted version's
alerts must reach people again, and a rolled-back version's alerts stop by themselves.
"""

from __future__ import annotations

from datetime import timedelta

from ..monitor.alertmanager import active_silences, expire_silence, open_silence
from ._verdict import Verdict

__all__ = ["sync_silence", "SILENCE_AUTHOR"]

SILENCE_AUTHOR = "normkit canary"


def sync_silence(verdict: Verdict, url: str, duration: str | float | timedelta = "30m",
                 timeout: float = 10.0) -> dict:
    """Opens, renews or expires the silence of ``verdict``'s model version on the Alertmanager
    at ``url``.

    A hold opens a silence of ``{model, version}`` for ``duration`` from now and expires the
    canary's older ones for the same version (so the window slides); a promote or a rollback
    expires them all.  Only silences the canary made (author ``"normkit canary"``) are touched.

    Returns:
        ``{"action": "opened" | "expired", "id": the new silence or None, "expired": [ids]}``.

    Raises:
        AlertmanagerError: Alertmanager unreachable or refused (the verdict stands).
        ValueError: a bad ``url`` or ``duration``.
    """
    matchers = {"model": verdict.model, "version": verdict.version}
    before = active_silences(url, matchers, created_by=SILENCE_AUTHOR, timeout=timeout)
    opened = None
    if verdict.decision == "hold":
        reason = verdict.reasons[0].message if verdict.reasons else "holding"
        opened = open_silence(url, matchers, duration,
                              comment=f"canary of {verdict.model} {verdict.version} holds: "
                                      f"{reason}",
                              created_by=SILENCE_AUTHOR, timeout=timeout)
    for silence_id in before:
        expire_silence(url, silence_id, timeout)
    return {"action": "opened" if opened else "expired", "id": opened, "expired": before}
