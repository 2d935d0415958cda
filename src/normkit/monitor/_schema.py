"""The telemetry's files, at the bottom of ``normkit.monitor``: the schemas of a baseline
(``normkit.baseline``) and of a JSONL record (``normkit.monitor``), each with its one version,
the histogram bucket layout both use, the checker that reads a parsed JSON document against
them, and ``read_jsonl``, the one reader of a telemetry file.  Writers (the exporters, the
watch, ``Baseline.save``) and readers (``Baseline``, the report, the study) sit above it; it
imports nothing from its siblings.

Readers call ``check_document(doc, SPEC, schema, source)`` before touching a document, so a
file with a wrong field type is refused at once with one message naming the file, the field
and what was expected (``b.json: layers["blocks.0.ln"].rows: expected an int >= 0, got
"lots"``), instead of failing somewhere later (or, in a watch, on every step).  Fields a spec
does not name are allowed: a later normkit may add fields within a schema version; a changed
meaning bumps the version, and ``check_document`` refuses versions it does not know.

Plain code, no dependency (jsonschema is not one).

JSONL record schema (``schema`` "normkit.monitor", ``schema_version`` 1)
--------------------------------------------------------------------------

The file starts with one header line, then one line per sampled step::

    {"type": "header", "schema": "normkit.monitor", "schema_version": 1, "created_unix": float,
     "normkit_version": str}

    {"type": "step", "schema": "normkit.monitor", "schema_version": 1,
     "time_unix": float,            # wall time the step started
     "model": str, "version": str,  # watch(model_name=, model_version=)
     "rank": str,                   # "0", "1", ... or "all" (reduce="all", written by rank 0)
     "world_size": int,
     "step": int,                   # 1-based step number (watch(step=...)), sampled or not
     "every": int | float,          # the sampling setting
     "batch_size": int | null, "seq_len": int | null,   # as seen by the first norm layer
     "nonfinite": {"forward" | "backward": {
         "origin": str | null,      # first module producing non-finite from finite inputs
                                    # ("<input>"/"<loss>": it arrived from outside the model)
         "origin_values": int,      # non-finite values in the origin's output (its in-grads)
         "origins": [str],          # further independent origins in the same pass
         "propagators": [str],      # modules that passed it on, in execution order (≤ 64)
         "modules": int,            # modules with non-finite outputs (in-grads) in the pass
         "resolved": bool}},        # False: origin placed provisionally (a container, or the
                                    # last module with a bad parameter gradient); a hunting
                                    # step follows (see normkit.monitor._hunt)
     "layers": {layer: {            # per norm layer, mergeable sums (LayerStats.to_dict)
         "kind": "ln" | "rms",      # the statistics held: mean and variance, or mean square
         "norm": str | null,        # the norm's kind: "layer", "rms", "batch", "group",
                                    # "instance", "dyt", "custom" (null in older records)
         "rows": int, "nonfinite_rows": int,
         "sum_mean", "sum_mean_sq", "sum_var", "sum_ms": float,   # over finite input rows
         "out_n": int, "out_sum", "out_sumsq": float, "out_nonfinite": int,
         "grad_nonfinite_rows": int, "steps": int,
         "batch_size", "seq_len": int | null,
         "weight_norm", "bias_norm", "weight_update_norm", "bias_update_norm",
         "grad_input_norm", "weight_grad_norm", "bias_grad_norm": float | null,
         "hist_mean", "hist_scale", "hist_latency": {   # per-row mean, per-row std (LN) or
             "edges": "slog2/4/80", "n": int,            # RMS (RMSNorm), forward seconds
             "min": float | null, "max": float | null,
             "buckets": [[bucket index, count], ...]}}},
     "summary": {layer: {...}},     # derived values (LayerStats.summary): input_mean,
                                    # input_std, input_rms, row_mean/row_scale quantiles,
                                    # output_mean, output_std, latency p50/p99, ...
     "latency_seconds": {layer: [float]},   # forward wall times of this step's calls
     "drift": null | {layer: {      # on the steps that checked drift against a baseline
         "layer", "rows", "mean_shift", "variance_ratio", "psi", "ks",
         "crossed": [str],          # metrics at or over their limit
         "evaluable": bool,         # false: not judged (metrics null), "reason" says why
         "reason": str | null,      # e.g. "the live window has 6 rows, fewer than min_rows=20"
         "limits": {metric: float}}},   # each metric's limit at these row counts
     "alerts": [{"severity", "rule", "layer", "model", "version", "count", "first_seen",
                 "last_seen", "layers", "message", "runbook_url"}]}  # alerts opened at this step

A ``normkit.guard`` given a running watch adds one line per call on which a check tripped
(``Watch.emit``); readers that want steps only skip it, as they skip every type they do not
know, so files with such lines stay readable by earlier normkit versions::

    {"type": "guard", "schema": "normkit.monitor", "schema_version": 1,
     "time_unix": float, "model": str, "version": str, "rank": str,   # the watch's labels
     "call": int,                   # 1-based count of the guard's calls
     "action": "raise" | "fallback" | "record",
     "trips": [{"layer": str,       # norm layer, or "<output>" (the model's own output)
                "check": "nonfinite" | "rstd" | "scale",
                "value": float | null,   # what was seen (null: NaN/Inf, which JSON lacks)
                "limit": float | null}]} # the bound crossed (null for nonfinite)

Aggregates only: sums over rows, histograms of per-row means/scales and norms of parameters
and gradients; no row, token or request identifier is ever written.

Torn lines.  Lines are appended with one ``write`` each and flushed, so a writer killed
mid-line leaves at most one torn line; an exporter that opens a file ending in one starts on a
fresh line, so a restarted job's records are never glued to it.  ``read_jsonl`` (every normkit
reader uses it) skips a line that is not JSON — torn, at the end or followed by more records,
or corrupt anywhere (a bad disk block) — with a warning naming the file and line number, and
keeps every other record; a torn line with a whole record glued after it (files written before
exporters started on a fresh line) gives that record back.  A line that *is* JSON but not a
record of this schema (a list, a field of the wrong type, another schema, a newer
``schema_version``) is not damage but a different file: it raises ValueError naming the file,
the line and the field (checked against ``RECORDS`` below).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator

# read_jsonl's warnings keep the logger name they have always had
log = logging.getLogger(__package__ + ".exporters")

BASELINE_SCHEMA = "normkit.baseline"
BASELINE_SCHEMA_VERSION = 1
RECORD_SCHEMA = "normkit.monitor"
RECORD_SCHEMA_VERSION = 1
_VERSIONS = {BASELINE_SCHEMA: BASELINE_SCHEMA_VERSION, RECORD_SCHEMA: RECORD_SCHEMA_VERSION}
_TITLES = {BASELINE_SCHEMA: "normkit baseline", RECORD_SCHEMA: "normkit telemetry file"}

# Row statistics of the *input* of a norm layer.  "ln" layers (LayerNorm, GroupNorm, BatchNorm)
# give a mean and a variance per row; "rms" layers give only the mean square (RMSNorm never
# computes a mean, and we do not add a pass over the activations to get one).
KINDS = ("ln", "rms")

# The histogram bucket layout every histogram in a file uses (``_sketch`` computes with it):
# edges 0, ±2^(j/4) for j in [-80, 80].
_STEPS_PER_OCTAVE = 4
_J = 80
_POS = [2.0 ** (j / _STEPS_PER_OCTAVE) for j in range(-_J, _J + 1)]
EDGES: list[float] = [-e for e in reversed(_POS)] + [0.0] + _POS
NBUCKETS = len(EDGES) + 1  # bucket i holds EDGES[i-1] < v <= EDGES[i] (0 and last are open)
EDGES_ID = f"slog2/{_STEPS_PER_OCTAVE}/{_J}"  # stored with every histogram: a changed layout
# must never be merged with an old one silently


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
    "runbook_url": STR,
}, "an alert object", optional=("layer", "layers", "message", "runbook_url"))

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

# The per-layer scalars of a record's "summary" that the scalar exporters (TensorBoard, MLflow)
# write for every layer.
SUMMARY_SCALARS = ("input_mean", "input_std", "input_rms", "output_mean", "output_std",
                   "nonfinite_rows", "grad_nonfinite_rows", "weight_norm", "bias_norm",
                   "weight_update_norm", "bias_update_norm", "grad_input_norm",
                   "weight_grad_norm", "bias_grad_norm")

_TRIP = Obj({
    "layer": STR,
    "check": OneOf("nonfinite", "rstd", "scale"),
    "value": OPT_NUMBER,
    "limit": OPT_NUMBER,
}, "a guard trip object")

GUARD = Obj({
    "type": OneOf("guard"),
    "time_unix": NUMBER,
    "model": STR,
    "version": STR,
    "rank": Value((str, int), "a string or an int"),
    "call": COUNT,
    "action": OneOf("raise", "fallback", "record"),
    "trips": ListOf(_TRIP, "a list of guard trip objects"),
}, "a guard record")

# What Baseline.from_records reads of a step record (the rest is the report's business).
STEP_STATS = Obj({k: STEP.fields[k] for k in ("type", "model", "version", "rank", "layers")},
                 "a step record")

# What each record type of a normkit.monitor file must hold; a record of another type only
# needs a type (every reader skips types it does not know, so a later normkit may add some).
RECORDS = {"header": HEADER, "step": STEP, "guard": GUARD}
ANY_RECORD = Obj({"type": STR}, "a record (a JSON object)")


# -- reading a normkit.monitor file ------------------------------------------------------------

# Lines read_jsonl names one by one in its warnings; past that it counts them.
_NAMED_BAD_LINES = 10
# Every record the exporter writes starts so (json.dumps keeps the dicts' order, "type" first).
_RECORD_START = '{"type":'


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Yields the records of a ``JsonlExporter`` file, each checked against the record schema.

    A line that is not JSON — torn by a writer that died mid-line, or corrupt — is skipped with
    a warning naming the file and line (the first ten; then a count), and reading goes on; a
    whole record glued after a torn part is kept (see "Torn lines" in the module docstring).

    Raises:
        OSError: the file cannot be read.
        ValueError: a line is JSON but not a record of this schema and version; the message
            names ``path:line`` and the field.
    """
    bad = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.rstrip(b"\r\n").decode("utf-8"))
            except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
                rec = _glued_record(raw)
                bad += 1
                if bad <= _NAMED_BAD_LINES:
                    why = (f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError)
                           else str(e))
                    log.warning("%s:%d: skipping a line that is not JSON (torn by a writer that "
                                "stopped mid-line, or corrupt: %s)%s", path, lineno, why,
                                "; kept the record glued after it" if rec is not None else "")
                if rec is None:
                    continue
            _check_record(rec, f"{path}:{lineno}")
            yield rec
    if bad > _NAMED_BAD_LINES:
        log.warning("%s: %d unreadable lines skipped in all (the first %d named above)", path,
                    bad, _NAMED_BAD_LINES)


def _glued_record(raw: bytes) -> dict | None:
    """The whole record at the end of a line that starts with a torn one, or None."""
    line = raw.decode("utf-8", "replace")
    at = line.find(_RECORD_START, 1)
    while at != -1:
        try:
            rec = json.loads(line[at:])
        except ValueError:
            at = line.find(_RECORD_START, at + 1)
            continue
        return rec if type(rec) is dict else None
    return None


def _check_record(rec, source: str) -> None:
    """``check_document`` for a record: a header or step record fully; a record of a type this
    normkit does not know only for its schema and version (readers skip such types)."""
    spec = RECORDS.get(rec.get("type")) if type(rec) is dict else None
    check_document(rec, spec or ANY_RECORD, RECORD_SCHEMA, source)
