"""report.png: a picture of one prune, per block the kept fraction of every part and the predicted error.

Drawn from block rows in the shape corp_cli.inspection gives them ({"block": i, part: [kept, width],
"predicted_error": {part: error}}), so `corp prune` (from its report) and `corp inspect --plot`
(from any checkpoint or report) draw the same picture. matplotlib is optional (the `plot` extra):
`available()` says whether it is importable here.
"""

from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import Any

from corp_cli.artifacts import write_bytes_atomic

PNG_FILE = "report.png"
HINT = "pip install 'corp-cli[plot]' (or: pip install matplotlib)"
_LABELS = {"mlp": "MLP units", "qk": "Q/K dims per head", "heads": "heads", "vo": "V/O dims per head"}
_ERROR_LABELS = {"mlp": "MLP output", "qk": "Q/K logits (sum over heads)", "vo": "attention output"}


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def pruned_parts(rows: list[dict[str, Any]]) -> list[str]:
    """The parts some block keeps fewer of than it had (what the picture shows)."""
    return [p for p in _LABELS if any(p in r and r[p][1] is not None and r[p][0] < r[p][1] for r in rows)]


def render(rows: list[dict[str, Any]], title: str) -> bytes:
    """The PNG bytes: kept fraction per part (bars, top) and predicted error per part (log scale, bottom)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # a Figure of its own, not pyplot: no global state, no display, safe to call from a library
    fig = Figure(figsize=(max(6.0, 0.45 * len(rows) + 2.5), 5.5), dpi=110)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    blocks = [r["block"] for r in rows]
    parts = pruned_parts(rows) or [p for p in _LABELS if any(p in r for r in rows)][:1]
    width = 0.8 / max(1, len(parts))
    for j, part in enumerate(parts):
        xs = [b + (j - (len(parts) - 1) / 2) * width for b in blocks]
        frac = [r[part][0] / r[part][1] if part in r and r[part][1] else float("nan") for r in rows]
        bars = top.bar(xs, frac, width=width, label=_LABELS[part])
        if len(rows) <= 32:  # the kept count on each bar, while it stays legible
            top.bar_label(bars, labels=[str(r[part][0]) if part in r else "" for r in rows], fontsize=6, rotation=90,
                          padding=2)
    top.set_ylim(0, 1.18)
    top.set_ylabel("kept fraction")
    top.axhline(1.0, color="grey", lw=0.8, ls=":")
    top.legend(fontsize=7, ncol=len(parts), loc="upper center")
    top.set_title("\n".join(textwrap.wrap(title, width=int(fig.get_figwidth() * 14))), fontsize=8)
    top.grid(axis="y", alpha=0.3)
    drawn = False
    for part in _ERROR_LABELS:
        pts = [(r["block"], r.get("predicted_error", {}).get(part)) for r in rows]
        pts = [(b, e) for b, e in pts if isinstance(e, (int, float)) and e > 0]
        if pts:
            bottom.plot([b for b, _ in pts], [e for _, e in pts], "o-", ms=3, label=_ERROR_LABELS[part])
            drawn = True
    if drawn:
        bottom.set_yscale("log")
        bottom.legend(fontsize=7)
    else:
        bottom.text(0.5, 0.5, "no predicted errors recorded (no report.json)", ha="center", va="center",
                    transform=bottom.transAxes, fontsize=8)
    bottom.set_ylabel("predicted error")
    bottom.set_xlabel("block")
    bottom.set_xticks(blocks)
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write(rows: list[dict[str, Any]], out: Path, title: str) -> Path:
    """Render and write atomically; ImportError when matplotlib is not installed."""
    data = render(rows, title)
    write_bytes_atomic(Path(out), data)
    return Path(out)
