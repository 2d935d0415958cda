"""The NaN/Inf-origin hunt of ``normkit.watch``: which module produced a step's first non-finite
value, in forward and in backward.

* On sampled steps the watch is *armed*: hooks on every module (not only norms) look for
  non-finite values.  The **origin** is the first module in execution order whose output is
  non-finite while its inputs are finite (in backward: whose input gradient is non-finite while
  its output gradient is finite); hooks fire child-first, so a container whose child produced
  the value is never blamed, and one whose own code (an attention softmax, a residual add)
  produced it is named.  Modules downstream that only pass the value on are *propagators*.
* Forward, with autograd on (training): each module call's inputs and outputs are *recorded*,
  not checked — autograd keeps those activations alive anyway.  When the forward ends, one
  reduction of the model's output, plus the norm layers' own output statistics, tell whether
  anything went non-finite; only then are the recorded calls checked, in order, to name the
  origin of that very step.  (A value masked out before reaching the output or any norm layer
  is not hunted.)  Without autograd (serving, validation) nothing is kept: each module output
  is checked as it is produced.
* Backward (``backward_hunt="on_detect"``, the default): the norm layers' backward is observed
  — their input-gradient norm is a statistic and checks the gradient for free — plus one fused
  norm over all parameter gradients when backward ends.  A norm that turns a finite gradient
  non-finite is named exactly; a gradient that went bad elsewhere is placed provisionally
  (``resolved: False``: the block of the first norm it reached, or the last module with a bad
  parameter gradient) and the next step is sampled with every leaf module observed, which names
  the exact module while the fault persists.  ``"always"`` observes every leaf on every sampled
  step (exact at once, ~1% more step time).
* How a module call's backward is observed (``_Probe``): hooks on autograd's own graph, set in
  the forward hook — a hook on each output tensor (its gradient) and a post-hook on each node
  the call created that consumes one of its inputs (their gradients towards the inputs, summed,
  are the module's input gradient).  Nothing is wrapped: torch's full backward hooks wrap a
  module's outputs in views of a custom Function, which an in-place op downstream (Hugging Face
  ResNet's ``hidden_state += residual`` on a BatchNorm output, ``ReLU(inplace=True)``) may not
  modify, and which change the order gradients are summed in (different bits).  Here the graph
  is the unwatched one, so the model computes the same bits; a hook on a tensor later modified
  in place stays on the node that made it (torch's documented rule), i.e. still sees the
  module's own output gradient.  A module whose backward cannot be observed this way (a norm
  that returns its input modified in place, a graph reaching far beyond the call) keeps its
  forward statistics, and is listed in ``Watch.off`` (logged once).

The hooks that collect the events are ``_Hunting``'s methods (``Watch`` has them); the step
state they write is the watch's ``_Step``: ``fwd``/``bwd`` events (module, inputs finite, bad
values), ``calls`` recorded for a lazy forward, ``suspect``, ``hunt``, ``root_grad_bad`` and
``param_grad_bad``.
"""

from __future__ import annotations

import functools
import logging
import math
import weakref
from collections.abc import Iterable
from typing import Any

import torch

from .alerts import Alert

# The watch's log: the hunt's messages keep the logger name they have always had.
log = logging.getLogger(__package__ + ".watch")

_PROPAGATORS_MAX = 64  # names kept per pass in a record; counts stay exact


def _tensors(obj: Any) -> list[torch.Tensor]:
    """Floating tensors in a hook argument: a tensor, a tuple/list, or a dict (one level)."""
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.is_floating_point() or obj.is_complex() else []
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        return [t for t in obj if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return []


def _nonfinite(tensors: Iterable[torch.Tensor]) -> int:
    """Number of non-finite values.  One reduction per tensor in the common case: a finite sum
    proves every value finite; only a non-finite sum (or a float32 overflow, confirmed exactly)
    pays for the element-wise count.  Half types sum in float32 (an fp16 sum of 1000 values of
    100 would overflow)."""
    bad = 0
    for t in tensors:
        if t.numel() == 0:
            continue
        key = id(t)
        hit = _seen.get(key)
        if hit is not None and hit[0]() is t and hit[1] == t._version:
            bad += hit[2]  # the same tensor (a container's output is its last child's)
            continue
        d = t.detach()
        s = d.sum(dtype=torch.float32) if d.dtype in (torch.float16, torch.bfloat16) else d.sum()
        b = 0 if math.isfinite(s.item()) else int((~torch.isfinite(d)).sum())
        _remember(t, b)
        bad += b
    return bad


def _remember(t: torch.Tensor, bad: int) -> None:
    """Records a finiteness result found by another pass over ``t`` (see ``_nonfinite``)."""
    try:
        _seen[id(t)] = (weakref.ref(t), t._version, bad)
    except TypeError:
        pass


# Finiteness of tensors already checked in this thread's current step (weak references, so no
# activation is kept alive); cleared at every step start.
_seen: dict[int, tuple] = {}


def _first_tensor(obj: Any) -> torch.Tensor | None:
    ts = _tensors(obj)
    return ts[0] if ts else None


# Autograd nodes searched per module call for the ones consuming its inputs; a LayerNorm call
# makes 1-3, a Hugging Face RMSNorm ~8, a Linear on 3-D input 3-4.  More means the call's graph
# reaches beyond it (a tensor with history taken from elsewhere): that backward is not observed.
_SEARCH_MAX = 256
_ACCUMULATE_SEQ = 2**64 - 1  # AccumulateGrad's sequence number (a leaf; made at any time)


def _input_consumers(ins: list[torch.Tensor], outs: list[torch.Tensor]):
    """The autograd nodes one module call created that take one of its inputs' gradient edges.

    Walks back from the outputs' ``grad_fn`` over the nodes made during the call: nodes are
    numbered in creation order (``_sequence_nr``, per thread), so anything numbered at or below
    the inputs' own nodes existed before the call and ends the walk.

    Returns:
        {node: [(index in node.next_functions, index in ``ins``)]}, or None when more than
        ``_SEARCH_MAX`` nodes would have to be searched.
    """
    edges = {}
    floor = -1
    for k, t in enumerate(ins):
        e = torch.autograd.graph.get_gradient_edge(t)
        edges[(e.node, e.output_nr)] = k
        seq = e.node._sequence_nr()
        if seq != _ACCUMULATE_SEQ:
            floor = max(floor, seq)

    def inside(node) -> bool:
        return node is not None and floor < node._sequence_nr() != _ACCUMULATE_SEQ

    stack = [t.grad_fn for t in outs if inside(t.grad_fn)]
    seen: set[int] = set()
    found: dict = {}
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if len(seen) > _SEARCH_MAX:
            return None
        for i, edge in enumerate(node.next_functions):
            k = edges.get(edge)
            if k is not None:
                found.setdefault(node, []).append((i, k))
            elif inside(edge[0]):
                stack.append(edge[0])
    return found


def _safe(fn):
    """Hook bodies never raise into the model's forward/backward: a telemetry bug costs that
    hook's data (logged once per hook), never the step."""
    failed = []

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception:
            if not failed:
                failed.append(True)
                log.exception("normkit watch hook %s failed; its statistics are lost (logged "
                              "once)", fn.__name__)
            return None

    return wrapper


class _Probe:
    """The backward of one module call, seen through hooks on the autograd graph (see the
    module docstring): ``grad_out`` on each output tensor, ``node_done`` on each node that
    consumes an input.  When the last consuming node has run, the input gradients (summed over
    the consumers) go to ``Watch._module_backward``; a consumer that never runs (an output the
    loss does not use) is waited for only until the backward ends."""

    __slots__ = ("watch", "cur", "module", "nodes", "left", "gin", "gout", "queued")

    def __init__(self, watch, cur, module: torch.nn.Module, n_inputs: int, n_nodes: int):
        self.watch, self.cur, self.module = watch, cur, module
        self.nodes = self.left = n_nodes
        self.gin: list[torch.Tensor | None] = [None] * n_inputs
        self.gout: list[torch.Tensor] = []
        self.queued = False

    @_safe
    def grad_out(self, g):
        # Kept, not checked: only read when the input gradient is non-finite.
        if g is not None:
            self.gout.append(g)

    @_safe
    def node_done(self, pairs, grad_inputs, grad_outputs):
        if not self.queued:
            self.queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.report)
        for i, k in pairs:
            g = grad_inputs[i]
            if g is not None:
                prev = self.gin[k]
                self.gin[k] = g if prev is None else prev + g
        self.left -= 1
        if self.left == 0:
            self.report()

    @_safe
    def report(self):
        if self.left == self.nodes:
            return  # reported already (or nothing ran)
        gin, gout = [g for g in self.gin if g is not None], self.gout
        self.gin, self.gout = [None] * len(self.gin), []
        self.left, self.queued = self.nodes, False  # ready for another backward (retain_graph)
        self.watch._module_backward(self.cur, self.module, gin, gout)


def _resolve(events: list[tuple[str, bool, int]], outside: str) -> dict:
    """Origin, further origins and propagators of one pass, from events in hook order."""
    if not events:
        return {"origin": None, "origin_values": 0, "origins": [], "propagators": [],
                "modules": 0}
    origins: list[tuple[str, int]] = []
    props: list[str] = []
    for name, clean_in, bad in events:
        if clean_in:
            # A container whose child already produced the value is not a new origin.
            if any(o == "" or o.startswith(name + ".") or name == "" for o, _ in origins):
                continue
            origins.append((name, bad))
        else:
            if not origins:
                origins.append((outside, 0))  # non-finite from the start: input / loss
            props.append(name)
    return {
        "origin": origins[0][0],
        "origin_values": origins[0][1],
        "origins": [o for o, _ in origins[1:]][:_PROPAGATORS_MAX],
        "propagators": props[:_PROPAGATORS_MAX],
        "modules": len(events),
    }


def _check_recorded_calls(cur, output) -> None:
    """The end of a lazily hunted forward (autograd on): only if the step went non-finite — a
    norm layer saw or made a non-finite value, or the model's output has one — are the module
    calls recorded in hook order checked, into ``cur.fwd``."""
    calls, cur.calls = cur.calls, []
    if cur.suspect or _nonfinite(_tensors(output)):
        for name, ins, outs in calls:
            if isinstance(outs, int):  # checked when it ran: (name, clean_in, bad)
                cur.fwd.append((name, ins, outs))
                continue
            bad = _nonfinite(outs)
            if bad:
                cur.fwd.append((name, _nonfinite(ins) == 0, bad))


def _resolve_step(cur) -> tuple[dict, dict]:
    """The forward and backward origin reports of a completed step (with ``resolved``)."""
    fwd = _resolve(cur.fwd, "<input>")
    outside = "<loss>"
    if cur.bwd and cur.root_grad_bad is False and not cur.bwd[0][1]:
        # The model's output gradient was finite, yet the first hooked module already got a
        # bad one: the code in between (a container's own forward, e.g. attention's softmax
        # or a residual add) produced it — name the innermost container of that module.
        first = cur.bwd[0][0]
        outside = first.rpartition(".")[0] or "<model>"
    bwd = _resolve(cur.bwd, outside)
    fwd["resolved"] = True
    # With only the norm layers' backward hooked, a gradient that went non-finite between
    # the model's output and the first norm that received it is placed in that norm's
    # innermost container, provisionally; the next step hunts with every leaf hooked.
    bwd["resolved"] = cur.hunt or bwd["origin"] is None or bwd["origin"] != outside or \
        outside == "<loss>"
    if bwd["origin"] is None and cur.param_grad_bad is not None:
        bwd.update(origin=cur.param_grad_bad, resolved=False)
    return fwd, bwd


def _merge_ranks(gathered: list[tuple[dict, dict]]) -> tuple[dict, dict]:
    """One (forward, backward) report from every rank's (``reduce="all"``)."""
    # The lowest rank that saw an origin names it; the others' names are kept as
    # further origins so nothing is lost.
    out = []
    for i in (0, 1):
        found = [g[i] for g in gathered if g[i]["origin"] is not None]
        if not found:
            out.append(_resolve([], ""))
            continue
        first = dict(found[0])
        first["origins"] = list(dict.fromkeys(
            first["origins"] + [f["origin"] for f in found[1:]]))[:_PROPAGATORS_MAX]
        first["origin_values"] = sum(f["origin_values"] for f in found)
        out.append(first)
    return out[0], out[1]


def _vnorm(t: torch.Tensor | None) -> float | None:
    return None if t is None else float(torch.linalg.vector_norm(t.detach().float()))


class _Hunting:
    """The hunt's hooks, a part of ``Watch`` (its base class): they read the watch's open step
    (``_cur``, ``_in_root``), which modules are norms (``_norm_of``), module names
    (``_module_names``), ``backward``, ``_params`` and the alert ``rules``; they keep the
    origins found in ``nonfinite_events``/``nonfinite_origin``, and what cannot be observed
    goes to ``_switch_off``."""

    @_safe
    def _root_grad(self, cur, g):
        if g is not None:
            cur.root_grad_bad = bool(cur.root_grad_bad) or _nonfinite([g]) > 0
        if not cur.hunt and not cur.bw_end_queued:
            cur.bw_end_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(
                functools.partial(self._backward_end, cur))

    @_safe
    def _backward_end(self, cur):
        """At the end of a backward without the leaves hooked: are all parameter gradients
        finite?  One fused norm over them (``_foreach_norm``); catches a gradient going bad
        where no norm layer sees it (below the first norm, e.g. in the embedding).  Run after
        every backward of the step (a step of several forward calls has several)."""
        cur.bw_end_queued = False
        params = [(n, p.grad) for n, p in self._params
                  if p.grad is not None and p.grad.layout == torch.strided]
        if not params:
            return
        norms = torch.stack(torch._foreach_norm([g.detach() for _, g in params]))
        bad = (~torch.isfinite(norms)).nonzero().flatten().tolist()
        if bad:
            # The last module in registration order whose parameters got a non-finite
            # gradient: the gradient went bad there or downstream of it.
            cur.param_grad_bad = params[bad[-1]][0].rpartition(".")[0] or "<model>"

    @_safe
    def _any_post(self, module, args, kwargs, output):
        cur = self._cur
        if cur is None or not self._in_root:  # a submodule called outside a step (validation)
            return
        name = self._module_names.get(id(module), "?")
        ins = _tensors(args) + _tensors(kwargs)
        outs = _tensors(output)
        if self.backward and not module._modules and (cur.hunt or id(module) in self._norm_of):
            self._observe_backward(cur, module, name, ins, outs)
        if cur.lazy and all(t.requires_grad for t in outs):
            # Autograd keeps such activations alive until backward anyway, so holding references
            # until the forward ends costs no memory; the reductions are paid only when the
            # forward produced a non-finite value somewhere.  (Outputs outside the graph — a
            # frozen part of the model — are checked now, not kept.)
            cur.calls.append((name, ins, outs))
            return
        bad = _nonfinite(outs)
        if bad:
            clean_in = _nonfinite(ins) == 0
            if cur.lazy:  # keep the hook order: resolved with the recorded calls
                cur.calls.append((name, clean_in, bad))
                cur.suspect = True
            else:
                cur.fwd.append((name, clean_in, bad))

    def _observe_backward(self, cur, module, name: str, ins, outs) -> None:
        """Sets a ``_Probe`` on this call's backward: the norm layers always (their input-gradient
        norm is a statistic, and checks the gradient for free), every other leaf module on
        hunting steps.  Leaves only: hooking containers too would double the work, and a
        gradient going bad in a container's own code is attributed to it from the leaves around
        it (see ``_complete``)."""
        ins = [t for t in ins if t.requires_grad]
        outs = [t for t in outs if t.requires_grad]
        if not ins or not outs:
            return  # no gradient flows through this call (an embedding, a frozen input)
        norm = id(module) in self._norm_of
        what = f"backward of {name}"
        if any(o is i for o in outs for i in ins):
            # Its input returned as-is or modified in place (ReLU(inplace=True), Identity): no
            # node of its own to observe; the modules around it cover a non-leaf origin.
            if norm:
                self._switch_off(what, name,
                                 f"{name!r} returns its input tensor itself (modified in place), "
                                 f"so its backward cannot be observed; forward statistics only")
            return
        try:
            found = _input_consumers(ins, outs)
            if found is None:
                self._switch_off(what, name if norm else None,
                                 f"the autograd graph of {name!r} reaches beyond its inputs (over "
                                 f"{_SEARCH_MAX} nodes), so its backward is not observed"
                                 + ("; forward statistics only" if norm else ""))
                return
            if not found:
                return  # its outputs do not depend on its inputs differentiably
            probe = _Probe(self, cur, module, len(ins), len(found))
            for t in outs:
                t.register_hook(probe.grad_out)
            for node, pairs in found.items():
                node.register_hook(functools.partial(probe.node_done, pairs))
        except Exception as e:
            self._switch_off(what, name if norm else None,
                             f"backward hooks could not be set on {name!r} "
                             f"({type(e).__name__}: {e})")

    def _module_backward(self, cur, module, gin: list[torch.Tensor],
                         gout: list[torch.Tensor]) -> None:
        """A module call's backward has run (``_Probe``): its input gradients ``gin`` (those that
        require grad, in argument order) and output gradients ``gout``."""
        if cur is not self._cur:
            return  # a backward run after its step was completed (the next forward began)
        info = self._norm_of.get(id(module))
        s = None
        if info is not None and gin:
            name, kind, how, nd = info
            s = cur.layers.get(name)
            if s is not None:
                s.grad_input_norm = _vnorm(gin[0])
                if math.isfinite(s.grad_input_norm):
                    _remember(gin[0], 0)  # a finite norm proves it finite: no second pass
        bad = _nonfinite(gin)
        if s is not None and bad:
            g = gin[0].detach()
            n = math.prod(g.shape[g.dim() - nd:]) if how in ("last", "sink", "instance") else 1
            rows = (~torch.isfinite(g)).reshape(-1, max(n, 1)).any(dim=1)
            s.grad_nonfinite_rows += int(rows.sum())
        if bad:
            clean_out = _nonfinite(gout) == 0
            cur.bwd.append((self._module_names.get(id(module), "?"), clean_out, bad))

    def _report_origins(self, step: int, fwd: dict, bwd: dict, export: bool,
                        new_alerts: list[Alert]) -> None:
        """Keeps step ``step``'s origins (``nonfinite_events``, ``nonfinite_origin``) and, where
        this rank exports, alerts on them into ``new_alerts`` — a provisional placement once the
        next step's hunt has answered, or not seen the fault again."""
        deferred, self._deferred = self._deferred, []
        for pname, res in (("forward", fwd), ("backward", bwd)):
            if res["origin"] is None:
                continue
            ev = {"step": step, "pass": pname, **res}
            self.nonfinite_events.append(ev)
            if self.nonfinite_origin is None or not self._origin_resolved:
                self.nonfinite_origin = res["origin"]
                self._origin_resolved = res["resolved"]
            if not export:
                continue  # reduce="all": rank 0 alerts for everyone, once
            if not res["resolved"]:
                self._deferred.append((step, pname, res))  # alerted after the hunt
                continue
            # A hunt that found the module also answers the provisional events before it.
            for number, _, _ in (deferred if pname == "backward" else ()):
                self._alert(pname, number, res, new_alerts)
            if pname == "backward":
                deferred = []
            self._alert(pname, step, res, new_alerts)
        for number, pname, res in deferred:  # the fault did not persist: alert as placed
            self._alert(pname, number, res, new_alerts)

    def _alert(self, pname: str, number: int, res: dict, out: list[Alert]) -> None:
        where = "origin" if res["resolved"] else "provisionally placed in"
        a = self.rules.fire("nonfinite", self.model_name, self.model_version, res["origin"],
                            f"non-finite values in {pname} at step {number}, {where} "
                            f"{res['origin']}, {len(res['propagators'])} propagating modules")
        if a is not None:
            out.append(a)
