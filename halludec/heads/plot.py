"""Heatmap of a head profile (layers x heads), drawn with matplotlib's Agg canvas (no display, no global state)."""

from __future__ import annotations

import os
from pathlib import Path

from halludec.decoding.profile import HeadProfile

INSTALL_HINT = "install the plotting extra with `pip install 'halludec[bench]'` (or `pip install matplotlib`)"


def has_matplotlib() -> bool:
    """Whether matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_profile(profile: HeadProfile, path: str | os.PathLike[str], top_k: int = 0) -> None:
    """Write a PNG heatmap of ``profile``: layers on the y axis, heads on the x axis, a colorbar, a title.

    Args:
        profile: The profile.
        path: Output image (the format follows the suffix, PNG by convention); parent folders are created.
        top_k: Outline the ``top_k`` highest-scoring heads (0 = none).

    Raises:
        ImportError: matplotlib is missing (the message says how to install it).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle
    except ImportError as err:
        raise ImportError(f"Plotting a head profile needs matplotlib; {INSTALL_HINT}.") from err
    from halludec.decoding.profile import head_set

    scores = profile.tensor().numpy()  # [L, H]
    n_layers, n_heads = scores.shape
    width = min(16.0, 3.0 + 0.25 * n_heads)
    height = min(12.0, 2.5 + 0.2 * n_layers)
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(scores, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label=profile.criterion)
    for layer, head in head_set(profile, top_k) if top_k > 0 else []:
        ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.2))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"{profile.model}\n{profile.criterion} ({n_layers} layers x {n_heads} heads)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
