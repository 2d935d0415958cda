"""The schemas of the files normkit's telemetry writes — a baseline (``normkit.baseline``) and a
JSONL record (``normkit.monitor``) — written down once, field by field, with the checker that
reads a parsed JSON document against them.

Readers call ``check_document(doc, SPEC, schema, source)`` before touching a document, so a
file with a wrong field type is refused at once with one message naming the file, the field
and what was expected (``b.json: layers["blocks.0.ln"].rows: expected an int >= 0, got
"lots"``), instead of failing somewhere later (or, in a watch, on every step).  Fields a spec
does not name are allowed: a later normkit may add fields within a schema version; a changed
meaning bumps the version, and ``check_document`` refuses versions it does not know.

Plain code, no dependency (jsonschema is not one).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from ._sketch import EDGES_ID, NBUCKETS
from ._stats import KINDS

BASELINE_SCHEMA = "normkit.baseline"
BASELINE_SCHEMA_VERSION = 1
RECORD_SCHEMA = "normkit.monitor"
RECORD_SCHEMA_VERSION = 1
_VERSIONS = {BASELINE_SCHEMA: BASELINE_SCHEMA_VERSION, RECORD_SCHEMA: RECORD_SCHEMA_VERSION}
_TITLES = {BASELINE_SCHEMA: "normkit baseline", RECORD_SCHEMA: "normkit telemetry file"}


class SchemaError(ValueError):
    """A document does not match its schema.  The message names the source (file, line), the
    field path and what was expected.

    Attributes:
        path: the field, e.g. ``layers["blocks.0.ln"].rows`` ("" for the whole document).
    """

    def __init__(self, source: str, path: str, problem: str):
        self.path = path
        super().__init__(f"{source}: {path + ': ' if path else ''}{problem}")


class _Bad(Exception):
    """Raised inside a check; each container it passes on the way out adds its step of the
    path, so a document that matches builds no path strings at all."""

    def __init__(self, problem: str, mismatch: bool):
        self.problem, self.mismatch = problem, mismatch
        self.steps: list[str] = []  # innermost first

    def at(self, step: str) -> _Bad:
        self.steps.append(step)
        return self


def _shown(v) -> str:
    """A value as an error message shows it: JSON for scalars, the kind for containers."""
    if isinstance(v, dict):
        return "an object"
    if isinstance(v, list):
        return "a list"
    text = json.dumps(v)
    return text if len(text) <= 40 else text[:37] + "..."


class _Spec:
    what: str  # "an int >= 0": the expected-value phrase of error messages

    def check(self, v) -> None:
        raise NotImplementedError

    def _fail(self, v):
        raise _Bad(f"expected {self.what}, got {_shown(v)}", mismatch=True)


class Value(_Spec):
    """A JSON scalar of exactly one of ``types`` (so bool is no int: JSON's true is not a
    number) for which ``ok`` holds, if given."""

    def __init__(self, types: type | tuple[type, ...], what: str,
                 ok: Callable[[object], bool] | None = None):
        self.types = types if isinstance(types, tuple) else (types,)
        self.what, self.ok = what, ok

    def check(self, v):
        if type(v) not in self.types or (self.ok is not None and not self.ok(v)):
            self._fail(v)


class OneOf(_Spec):
    def __init__(self, *values):
        self.values = values
        self.what = " or ".join(json.dumps(v) for v in values)

    def check(self, v):
        if type(v) is bool or v not in self.values:
            self._fail(v)


class Nullable(_Spec):
    def __init__(self, spec: _Spec):
        self.spec = spec
        self.what = f"{spec.what} or null"

    def check(self, v):
        if v is None:
            return
        try:
            self.spec.check(v)
        except _Bad as e:
            if e.mismatch and not e.steps:  # this very value is of the wrong kind
                self._fail(v)
            raise


class ListOf(_Spec):
    def __init__(self, item: _Spec, what: str | None = None):
        self.item = item
        self.what = what or f"a list of {item.what.removeprefix('a ').removeprefix('an ')}s"

    def check(self, v):
        if type(v) is not list:
            self._fail(v)
        for i, x in enumerate(v):
            try:
                self.item.check(x)
            except _Bad as e:
                raise e.at(f"[{i}]") from None


class _Buckets(_Spec):
    """A histogram's sparse buckets ``[[index, count], ...]``: checked in one pass (a record
    holds ~750 of them; a spec per element took 3x as long as parsing the JSON)."""

    what = f"a [bucket index in [0, {NBUCKETS}), count >= 0] pair"

    @staticmethod
    def _ok(p) -> bool:
        return (type(p) is list and len(p) == 2 and type(p[0]) is int and type(p[1]) is int
                and 0 <= p[0] < NBUCKETS and p[1] >= 0)

    def check(self, v):
        if type(v) is not list:
            raise _Bad(f"expected a list of [bucket index, count] pairs, got {_shown(v)}", True)
        if not all(map(self._ok, v)):
            i = next(i for i, p in enumerate(v) if not self._ok(p))
            raise _Bad(f"expected {self.what}, got {json.dumps(v[i])[:40]}", True).at(f"[{i}]")


class MapOf(_Spec):
    """An object ``{name: value}`` with any names."""

    def __init__(self, value: _Spec, what: str):
        self.value, self.what = value, what

    def check(self, v):
        if type(v) is not dict:
            self._fail(v)
        for k, x in v.items():
            try:
                self.value.check(x)
            except _Bad as e:
                raise e.at(f"[{json.dumps(k)}]") from None


class Obj(_Spec):
    """An object with these fields; those in ``optional`` (all of them if True) may be missing.
    ``rule(d)`` checks what no single field can (returns the problem, or None)."""

    def __init__(self, fields: dict[str, _Spec], what: str,
                 optional: tuple[str, ...] | bool = (),
                 rule: Callable[[dict], str | None] | None = None):
        self.fields, self.what, self.rule = fields, what, rule
        self.optional = set(fields) if optional is True else set(optional or ())

    def check(self, v):
        if type(v) is not dict:
            self._fail(v)
        for name, spec in self.fields.items():
            if name in v:
                try:
                    spec.check(v[name])
                except _Bad as e:
                    raise e.at(f".{name}") from None
            elif name not in self.optional:
                raise _Bad(f"missing (expected {spec.what})", False).at(f".{name}")
        problem = self.rule(v) if self.rule is not None else None
        if problem:
            raise _Bad(problem, False)


def check(doc, spec: _Spec, source: str) -> None:
    """Raises SchemaError (a ValueError) naming ``source`` and the field where ``doc`` first
    departs from ``spec``."""
    try:
        spec.check(doc)
    except _Bad as e:
        raise SchemaError(source, "".join(reversed(e.steps)).removeprefix("."),
                          e.problem) from None


def check_document(doc, spec: _Spec, schema: str, source: str) -> None:
    """``check`` for a document of a versioned ``schema``: first that it is one, at the version
    this normkit reads (a newer version says to upgrade normkit), then every field."""
    if type(doc) is dict:
        if doc.get("schema") != schema:
            raise SchemaError(source, "", f"not a {_TITLES[schema]} (schema "
                                          f"{_shown(doc.get('schema'))}, expected \"{schema}\")")
        v, supported = doc.get("schema_version"), _VERSIONS[schema]
        if type(v) is int and v > supported:
            raise SchemaError(source, "", f"schema_version {v} was written by a newer normkit; "
                                          f"this one reads {schema} version {supported} "
                                          "(upgrade normkit to read it)")
        if v != supported or type(v) is not int:
            raise SchemaError(source, "", f"schema_version {_shown(v)} is not supported (this "
                                          f"normkit reads {schema} version {supported})")
    check(doc, spec, source)


# -- field types ---------------------------------------------------------------------------------

STR = Value(str, "a string")
BOOL = Value(bool, "true or false")
NUMBER = Value((int, float), "a number")
NONNEG = Value((int, float), "a number >= 0", lambda v: not v < 0)  # NaN passes, as NUMBER
COUNT = Value(int, "an int >= 0", lambda v: v >= 0)
OPT_NUMBER = Nullable(NUMBER)
OPT_COUNT = Nullable(COUNT)


# -- LayerStats (normkit.monitor._stats) ---------------------------------------------------------

def _histogram_rule(h: dict) -> str | None:
    held = sum(c for _, c in h["buckets"])
    if held != h["n"]:
        return f"n is {h['n']} but the buckets hold {held}"
    if h["n"] and (h["min"] is None or h["max"] is None):
        return f"min and max must be numbers when n is {h['n']}"
    return None


HISTOGRAM = Obj({
    "edges": OneOf(EDGES_ID),
    "n": COUNT,
    "min": OPT_NUMBER,
    "max": OPT_NUMBER,
    "buckets": _Buckets(),
}, "a histogram object", rule=_histogram_rule)

# A LayerStats.to_dict(): every field since schema version 1 except "norm" (added later, null
# or missing in older files).  tests/test_files.py checks these are exactly to_dict's keys.
LAYER_STATS = Obj({
    "kind": OneOf(*KINDS),
    "norm": Nullable(STR),
    **dict.fromkeys(("rows", "nonfinite_rows", "out_n", "out_nonfinite", "grad_nonfinite_rows",
                     "steps"), COUNT),
    **dict.fromkeys(("sum_mean", "out_sum"), NUMBER),
    **dict.fromkeys(("sum_mean_sq", "sum_var", "sum_ms", "out_sumsq"), NONNEG),
    **dict.fromkeys(("batch_size", "seq_len"), OPT_COUNT),
    **dict.fromkeys(("weight_norm", "bias_norm", "weight_update_norm", "bias_update_norm",
                     "grad_input_norm", "weight_grad_norm", "bias_grad_norm"), OPT_NUMBER),
    **dict.fromkeys(("hist_mean", "hist_scale", "hist_latency"), HISTOGRAM),
}, "a layer statistics object", optional=("norm",))

LAYERS = MapOf(LAYER_STATS, "an object {layer name: statistics}")


# -- normkit.baseline ----------------------------------------------------------------------------

BASELINE = Obj({
    "schema": OneOf(BASELINE_SCHEMA),
    "schema_version": OneOf(BASELINE_SCHEMA_VERSION),
    "model_name": STR,
    "model_version": STR,
    "normkit_version": Nullable(STR),
    "created_unix": OPT_NUMBER,
    "layers": LAYERS,
}, "a baseline object", optional=("normkit_version", "created_unix"))


# -- normkit.monitor (JSONL) ---------------------------------------------------------------------

_NONFINITE_PASS = Obj({
    "origin": Nullable(STR),
    "origin_values": COUNT,
    "origins": ListOf(STR),
    "propagators": ListOf(STR),
    "modules": COUNT,
    "resolved": BOOL,
}, "a non-finite report object")

# LayerStats.summary(): any field may be missing (readers use what is there).
_SUMMARY = Obj({
    "kind": OneOf(*KINDS),
    "norm": Nullable(STR),
    **dict.fromkeys(("steps", "rows", "nonfinite_rows", "output_nonfinite",
                     "grad_nonfinite_rows"), COUNT),
    **dict.fromkeys(("input_mean", "input_std", "input_rms", "output_mean", "output_std",
                     "latency_p50_seconds", "latency_p99_seconds", "weight_norm", "bias_norm",
                     "weight_update_norm", "bias_update_norm", "grad_input_norm",
                     "weight_grad_norm", "bias_grad_norm"), OPT_NUMBER),
    **dict.fromkeys(("batch_size", "seq_len"), OPT_COUNT),
    **dict.fromkeys(("row_mean", "row_scale"),
                    Nullable(MapOf(OPT_NUMBER, "an object {quantile: number}"))),
}, "a layer summary object", optional=True)

_DRIFT = Obj({
    "layer": STR,
    "rows": COUNT,
    **dict.fromkeys(("mean_shift", "variance_ratio", "psi", "ks"), OPT_NUMBER),
    "crossed": ListOf(STR),
    "evaluable": BOOL,
    "reason": Nullable(STR),
    "limits": MapOf(NUMBER, "an object {metric: limit}"),
}, "a drift result object", optional=("evaluable", "reason", "limits"))

_ALERT = Obj({
    "severity": STR,
    "rule": STR,
    "layer": Nullable(STR),
    "model": STR,
    "version": STR,
    "count": COUNT,
    "first_seen": NUMBER,
    "last_seen": NUMBER,
    "layers": ListOf(STR),
    "message": STR,
}, "an alert object", optional=("layer", "layers", "message"))

HEADER = Obj({
    "type": OneOf("header"),
    "created_unix": NUMBER,
    "normkit_version": Nullable(STR),
}, "a header record", optional=("normkit_version",))

STEP = Obj({
    "type": OneOf("step"),
    "time_unix": NUMBER,
    "model": STR,
    "version": STR,
    "rank": Value((str, int), "a string or an int"),
    "world_size": COUNT,
    "step": COUNT,
    "every": Value((int, float), "a number > 0", lambda v: v > 0),
    "batch_size": OPT_COUNT,
    "seq_len": OPT_COUNT,
    "nonfinite": Obj({"forward": _NONFINITE_PASS, "backward": _NONFINITE_PASS},
                     "an object {pass: non-finite report}", optional=("forward", "backward")),
    "layers": LAYERS,
    "summary": MapOf(_SUMMARY, "an object {layer name: summary}"),
    "latency_seconds": MapOf(ListOf(OPT_NUMBER, "a list of seconds"),
                             "an object {layer name: [seconds]}"),
    "drift": Nullable(MapOf(_DRIFT, "an object {layer name: drift result}")),
    "alerts": ListOf(_ALERT, "a list of alert objects"),
}, "a step record", optional=("world_size", "every", "batch_size", "seq_len", "nonfinite",
                              "summary", "latency_seconds", "drift", "alerts"))

# What Baseline.from_records reads of a step record (the rest is the report's business).
STEP_STATS = Obj({k: STEP.fields[k] for k in ("type", "model", "version", "rank", "layers")},
                 "a step record")

# What each record type of a normkit.monitor file must hold; a record of another type only
# needs a type (every reader skips types it does not know, so a later normkit may add some).
RECORDS = {"header": HEADER, "step": STEP}
ANY_RECORD = Obj({"type": STR}, "a record (a JSON object)")
