"""Matplotlib, lazily and consistently: the ``report`` extra is imported only when a plot is
made, always with the non-interactive Agg backend (no display needed, same pixels
everywhere), and every figure leaves as PNG bytes."""

from __future__ import annotations

import io

__all__ = ["require_matplotlib", "new_figure", "to_png", "text_label", "PALETTE"]

# Colour-blind-safe (Okabe–Ito), in the order configurations are usually listed.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000",
           "#F0E442")


def require_matplotlib():
    """``matplotlib.pyplot`` on the Agg backend; ImportError naming the extra if missing."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(
            "normkit's reports need matplotlib: pip install 'normkit[report]'"
        ) from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def text_label(text) -> str:
    """``str(text)`` as a matplotlib title, legend entry or tick label that shows exactly those
    characters: a layer named ``$\\frac$`` would otherwise be parsed as mathtext (and fail)."""
    return str(text).replace("$", r"\$")


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 6.4, height: float = 3.6,
               **kw):
    """``(fig, axes)`` with the normkit look; ``axes`` is a flat list."""
    plt = require_matplotlib()
    with plt.rc_context({"axes.spines.top": False, "axes.spines.right": False,
                         "axes.grid": True, "grid.alpha": 0.3, "font.size": 9,
                         "axes.prop_cycle": plt.cycler(color=PALETTE)}):
        fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows),
                                 squeeze=False, **kw)
    flat = [ax for row in axes for ax in row]
    for ax in flat:
        ax.grid(True, alpha=0.3)
        ax.spines["top"].set_visible(False)
        ax.spines["right"].set_visible(False)
        ax.set_prop_cycle(color=PALETTE)
    return fig, flat


def to_png(fig, dpi: int = 110) -> bytes:
    """The figure as PNG bytes; the figure is closed (matplotlib keeps open figures alive)."""
    plt = require_matplotlib()
    buf = io.BytesIO()
    try:
        fig.tight_layout()
        # metadata without "Software"/dates: the same figure gives the same bytes every run
        fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    finally:
        plt.close(fig)
    return buf.getvalue()
