"""The canary's thresholds: a versioned policy (YAML or JSON), every key checked.

A policy file overrides any subset of ``DEFAULTS`` and must carry ``version: 1``; an unknown
key, a value of the wrong kind, or a hold threshold on the wrong side of its rollback threshold
is a ValueError naming the file and the key (``p.yml: drift.rollback.pis: unknown key``).  Why
each default is what it is: docs/canary.md.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Policy", "DEFAULTS", "POLICY_VERSION"]

POLICY_VERSION = 1

# Tiered rules: ("hold", "rollback") thresholds of one metric.  A metric "up" is bad when it
# reaches the threshold; "down" (top-1 agreement) when it falls to it.
DEFAULTS: dict = {
    "evidence": {"min_steps": 10, "min_rows": 1000, "min_seconds": 0.0,
                 "min_latency_calls": 100},
    "nonfinite": {"max_rows": 0, "max_output_values": 0, "max_steps": 0},
    "drift": {"alpha": 0.001,
              "hold": {"mean_shift": 0.1, "variance_change": 0.1, "psi": 0.1, "ks": 0.1},
              "rollback": {"mean_shift": 0.25, "variance_change": 0.25, "psi": 0.25,
                           "ks": 0.2}},
    "output": {"hold": {"mean_shift": 0.05, "std_change": 0.05},
               "rollback": {"mean_shift": 0.2, "std_change": 0.2}},
    "latency": {"hold": {"p50_ratio": 1.25, "p99_ratio": 1.5},
                "rollback": {"p50_ratio": 1.5, "p99_ratio": 2.0}},
    "divergence": {"hold": {"kl": 0.02, "top1_agreement": 0.97},
                   "rollback": {"kl": 0.1, "top1_agreement": 0.9}},
}
_INTS = {"evidence.min_steps", "evidence.min_rows", "evidence.min_latency_calls",
         "nonfinite.max_rows", "nonfinite.max_output_values", "nonfinite.max_steps"}
_DOWN = {"top1_agreement"}  # smaller is worse


def _check_value(key: str, v, where: str):
    name = key.rpartition(".")[2]
    if key in _INTS:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{where}: {key}: expected an int >= 0, got {v!r}")
        if name in ("min_steps", "min_rows") and v < 1:
            raise ValueError(f"{where}: {key}: expected an int >= 1, got {v!r}")
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{where}: {key}: expected a finite number, got {v!r}")
    v = float(v)
    if key == "drift.alpha" and not 0 < v < 1:
        raise ValueError(f"{where}: {key}: expected a number in (0, 1), got {v!r}")
    if name in _DOWN and not 0 <= v <= 1:
        raise ValueError(f"{where}: {key}: expected a fraction in [0, 1], got {v!r}")
    if name.endswith("_ratio") and v < 1:
        raise ValueError(f"{where}: {key}: expected a ratio >= 1, got {v!r}")
    if v < 0 or (v == 0 and name not in ("min_seconds",)):
        raise ValueError(f"{where}: {key}: expected a positive number, got {v!r}")
    return v


def _merge(defaults: dict, given, where: str, prefix: str = "") -> dict:
    if not isinstance(given, dict):
        raise ValueError(f"{where}: {prefix.rstrip('.') or 'the policy'}: expected a mapping, got "
                         f"{type(given).__name__}")
    out = copy.deepcopy(defaults)
    for k, v in given.items():
        key = f"{prefix}{k}"
        if k not in defaults:
            raise ValueError(f"{where}: {key}: unknown key (known: {', '.join(defaults)})")
        if isinstance(defaults[k], dict):
            out[k] = _merge(defaults[k], v, where, key + ".")
        else:
            out[k] = _check_value(key, v, where)
    return out


@dataclass(frozen=True)
class Policy:
    """Thresholds of ``normkit canary``: ``DEFAULTS`` with a policy file's values over them.

    Build one with ``Policy()`` (the defaults), ``Policy.from_dict(d)`` or
    ``Policy.load(path)``; read it as ``policy["drift"]["rollback"]["psi"]``.
    """

    values: dict = field(default_factory=lambda: copy.deepcopy(DEFAULTS))
    version: int = POLICY_VERSION
    source: str = "defaults"

    def __getitem__(self, section: str) -> dict:
        return self.values[section]

    @classmethod
    def from_dict(cls, d, source: str = "policy") -> Policy:
        """A policy from a parsed document: ``{"version": 1, <sections of DEFAULTS>}``.

        Raises:
            ValueError: no or another ``version``, an unknown key, a bad value, or a hold
                threshold beyond its rollback threshold; the message names ``source`` and the
                key.
        """
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a mapping with a version, got "
                             f"{type(d).__name__}")
        d = dict(d)
        if "version" not in d:
            raise ValueError(f"{source}: version: missing (this normkit reads policy version "
                             f"{POLICY_VERSION})")
        version = d.pop("version")
        if version != POLICY_VERSION:
            raise ValueError(f"{source}: version: expected {POLICY_VERSION}, got {version!r}")
        values = _merge(DEFAULTS, d, source)
        for section, rules in values.items():
            if "hold" not in rules:
                continue
            for metric, hold in rules["hold"].items():
                roll = rules["rollback"][metric]
                if (hold < roll) if metric in _DOWN else (hold > roll):
                    raise ValueError(f"{source}: {section}.hold.{metric}: {hold} is beyond "
                                     f"{section}.rollback.{metric} ({roll})")
        return cls(values, version, source)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Policy:
        """Reads a JSON or (by the suffix .yml/.yaml; needs PyYAML) YAML policy file.

        Raises:
            OSError: it cannot be read.
            ValueError: it does not parse, or ``from_dict`` refuses it (naming the file).
        """
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in (".yml", ".yaml"):
            try:
                import yaml
            except ImportError:
                raise ValueError(f"{path}: a YAML policy needs PyYAML (pip install pyyaml); "
                                 "or write the policy as JSON") from None
            try:
                doc = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ValueError(f"{path}: not YAML ({str(e).splitlines()[0]})") from None
        else:
            try:
                doc = json.loads(text)
            except ValueError as e:
                raise ValueError(f"{path}: not JSON ({e})") from None
        return cls.from_dict(doc, source=str(path))

    def to_dict(self) -> dict:
        return {"version": self.version, **copy.deepcopy(self.values)}
