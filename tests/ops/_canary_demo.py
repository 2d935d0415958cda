"""The demo's model for the canary tests: ``normkit demo``'s pre-LN TinyGPT at its quick size
(2 layers, dim 64, context 64, batches of 16), trained briefly on the same corpus, a baseline
captured on validation traffic, and candidates served on fresh validation batches — healthy
(another seed) or with a fault from ``normkit.faults``."""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from normkit import faults
from normkit.monitor import JsonlExporter, watch

MODEL, VERSION = "demo-gpt", "2"
BATCH, CONTEXT, SERVE_STEPS = 16, 64, 12
# Ten steps (the quick demo trains 40): the norms' statistics settle within the first steps,
# and the fixture is paid once per test module on a 2-core machine.
TRAIN_STEPS = 10


@functools.lru_cache(maxsize=1)
def demo():
    """(model in eval mode, corpus, baseline): trained once per process."""
    from normkit.study.data import fixed_batches, load_corpus, sample_batch
    from normkit.study.models import TinyGPT

    torch.manual_seed(0)
    corpus = load_corpus(max_train_bytes=2_000_000, max_val_bytes=200_000)
    model = TinyGPT("pre", "layer", layers=2, dim=64, heads=4, context=CONTEXT)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(0)
    for _ in range(TRAIN_STEPS):
        x, y = sample_batch(corpus.train, BATCH, CONTEXT, gen)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad(), watch(model, model_name=MODEL, model_version=VERSION) as w:
        for x, _ in fixed_batches(corpus.val, SERVE_STEPS, BATCH, CONTEXT, seed=1):
            model(x)
    return model, corpus, w.baseline()


FAULTS = {
    "healthy": lambda m: contextlib.nullcontext(),
    "inf-weight": lambda m: faults.nonfinite(m, "blocks.1.norm1", where="weight",
                                             value=float("inf"), index=0),
    "eps-1e-2": lambda m: faults.eps(m, 1e-2),
    "inputs-x3": lambda m: faults.scale_inputs(m, 3.0),
}


def serve(seed: int, fault: str = "healthy", steps: int = SERVE_STEPS, exporters=(),
          version: str = VERSION) -> list[dict]:
    """Serves ``steps`` validation batches drawn with ``seed`` under ``fault``; returns the
    step records (also sent to ``exporters``)."""
    from normkit.study.data import fixed_batches

    model, corpus, _ = demo()
    records: list[dict] = []

    class Keep:
        def export(self, record):
            records.append(record)

        def close(self):
            pass

    batches = fixed_batches(corpus.val, steps, BATCH, CONTEXT, seed=seed)
    with torch.no_grad(), FAULTS[fault](model), watch(
            model, model_name=MODEL, model_version=version,
            exporters=[Keep(), *exporters]):
        for x, _ in batches:
            model(x)
    return records


def write_jsonl(path, seed: int, fault: str = "healthy", steps: int = SERVE_STEPS):
    serve(seed, fault, steps, exporters=[JsonlExporter(path)])
    return path
