"""The study's configuration: one frozen dataclass, two presets (``default`` and ``quick``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

__all__ = ["EXPERIMENTS", "StudyConfig"]

EXPERIMENTS = ("placement", "norms", "batch", "recurrent")


@dataclass(frozen=True)
class StudyConfig:
    """Everything that decides a study's numbers (the thread count included: float sums in
    matmuls depend on how work is split, so the same config on the same machine and thread
    count gives the same bits, and a different thread count may not).

    Attributes:
        preset: "default", "quick" or "custom" — a label recorded in the results.
        experiments: which of :data:`EXPERIMENTS` to run.
        seeds: one training run per seed per configuration.
        threads: ``torch.set_num_threads`` for the whole study.
        layers, dim, heads, context, batch: the transformer and its batches.
        steps: training steps per transformer run.
        lr: the (deliberately high) peak learning rate of every transformer run.
        warmup_steps: linear warm-up length for the "warm-up" runs; the others start at ``lr``.
        eval_every, eval_batches: validation loss every this many steps, on this many fixed
            batches.
        log_every: the telemetry (``normkit.watch(every=...)``) samples every this many steps,
            starting with step 1.
        lstm_hidden, lstm_emb, lstm_context, lstm_steps, lstm_lr: the recurrent experiment.
        batch_sizes: the evaluation batch sizes of the batch-dependence experiment.
        batch_train_steps: training steps before the batch-dependence check (so BatchNorm's
            running statistics are not just their initial values).
        train_bytes, val_bytes: how much standard-library text to read.
    """

    preset: str = "default"
    experiments: tuple[str, ...] = EXPERIMENTS
    seeds: tuple[int, ...] = (0, 1, 2)
    threads: int = 1
    layers: int = 6
    dim: int = 64
    heads: int = 4
    context: int = 64
    batch: int = 8
    steps: int = 300
    lr: float = 3e-3
    warmup_steps: int = 100
    eval_every: int = 50
    eval_batches: int = 4
    log_every: int = 10
    lstm_hidden: int = 128
    lstm_emb: int = 64
    lstm_context: int = 32
    lstm_steps: int = 300
    lstm_lr: float = 3e-3
    batch_sizes: tuple[int, ...] = (1, 8, 64)
    batch_train_steps: int = 50
    train_bytes: int = 4_000_000
    val_bytes: int = 400_000

    def __post_init__(self):
        bad = [e for e in self.experiments if e not in EXPERIMENTS]
        if bad or not self.experiments:
            raise ValueError(f"experiments must be a non-empty subset of {EXPERIMENTS}, "
                             f"got {self.experiments!r}")
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        for name in ("threads", "layers", "context", "batch", "steps", "eval_every",
                     "eval_batches", "log_every", "lstm_hidden", "lstm_emb", "lstm_context",
                     "lstm_steps", "batch_train_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.warmup_steps < 0 or self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps), got {self.warmup_steps}")
        if not (self.lr > 0 and self.lstm_lr > 0):
            raise ValueError("learning rates must be positive")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch_sizes must be positive, got {self.batch_sizes!r}")

    @classmethod
    def quick(cls) -> StudyConfig:
        """The ``--quick`` preset: the same experiments on a smaller model, two seeds, fewer
        steps — under two minutes on a quiet 2-core CPU.  Long enough for the structure and the
        batch-dependence finding; too short for the training-dynamics findings (see the report).
        """
        return cls(preset="quick", seeds=(0, 1), layers=2, dim=32, heads=2, context=32,
                   batch=8, steps=60, warmup_steps=20, eval_every=20, eval_batches=2,
                   log_every=10, lstm_hidden=48, lstm_emb=16, lstm_context=16, lstm_steps=60,
                   batch_train_steps=10, train_bytes=600_000, val_bytes=60_000)

    def to_dict(self) -> dict:
        """JSON-ready (tuples become lists)."""
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def replace(self, **kw) -> StudyConfig:
        """``dataclasses.replace`` that skips None values (CLI flags left unset)."""
        return replace(self, **{k: v for k, v in kw.items() if v is not None})
