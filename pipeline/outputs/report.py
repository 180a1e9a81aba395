"""OUTPUT/report.png: how a segmentation run went, on one page a person can glance at.

Nuclei per image and nucleus areas (histograms), status counts with the commonest failure reasons, and
overlays of three images: the fewest, the median and the most nuclei. matplotlib (Agg), no Ray or TensorFlow.
"""
from __future__ import annotations

import collections
from typing import Callable

import numpy as np

FINISHED = ("done", "existing")


def overlay_choices(rows: list[dict]) -> list[tuple[str, dict]]:
    """(caption, row) of the finished images with the fewest, median and most nuclei (distinct, in that order)."""
    finished = sorted((row for row in rows if row["status"] in FINISHED), key=lambda row: (row["nuclei"], row["path"]))
    if not finished:
        return []
    picks = [("fewest", finished[0]), ("median", finished[len(finished) // 2]), ("most", finished[-1])]
    chosen, seen = [], set()
    for caption, row in picks:
        if row["path"] not in seen:
            seen.add(row["path"])
            chosen.append((caption, row))
    return chosen


def failure_reasons(rows: list[dict], top: int = 3) -> list[tuple[str, int]]:
    """The commonest reasons among failed and skipped files, with their counts."""
    reasons = collections.Counter(str(row["error"])[:70] for row in rows if row["status"] in ("error", "skipped"))
    return reasons.most_common(top)


def draw_report(rows: list[dict], areas: np.ndarray, overlay_of: Callable[[dict], np.ndarray | None],
                title: str = "") -> bytes:
    """The report as PNG bytes. `areas`: every nucleus' area; `overlay_of(row)`: an outlined picture, or None."""
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    finished = [row for row in rows if row["status"] in FINISHED]
    figure, axes = plt.subplots(2, 3, figsize=(15, 9.5), dpi=80)
    figure.suptitle(title or "segmentation run", fontsize=13)

    counts = np.asarray([row["nuclei"] for row in finished], np.int64)
    axes[0, 0].hist(counts, bins=min(40, max(1, len(np.unique(counts)))), color="#4477aa")
    axes[0, 0].set(title=f"nuclei per image ({len(finished)} images, median {np.median(counts) if len(counts) else 0:.0f})",
                   xlabel="nuclei", ylabel="images")

    areas = np.asarray(areas, np.float64)
    if areas.size:
        bins = np.logspace(np.log10(max(1.0, areas.min())), np.log10(max(2.0, areas.max())), 40)
        axes[0, 1].hist(areas, bins=bins, color="#228833")
        axes[0, 1].set_xscale("log")
    axes[0, 1].set(title=f"nucleus area ({areas.size} nuclei, median {np.median(areas) if areas.size else 0:.0f} px)",
                   xlabel="area (pixels)", ylabel="nuclei")

    statuses = collections.Counter(row["status"] for row in rows)
    names = [name for name in ("done", "existing", "skipped", "error") if statuses.get(name)]
    axes[0, 2].barh(names, [statuses[name] for name in names], color="#aa3377", height=0.5)
    for index, name in enumerate(names):
        axes[0, 2].text(statuses[name], index, f" {statuses[name]}", va="center")
    axes[0, 2].set_xlim(0, max(statuses.values(), default=1) * 1.2)
    axes[0, 2].set_ylim(-0.6, len(names) + 1.4)  # room above the bars for the failure reasons
    reasons = failure_reasons(rows)
    text = "\n".join(f"{count} x {reason[:48]}" for reason, count in reasons) or "none"
    axes[0, 2].set(title="status (existing = finished by an earlier run)", xlabel="files")
    axes[0, 2].text(0.02, 0.97, "top failure reasons:\n" + text, transform=axes[0, 2].transAxes, fontsize=8,
                    va="top", family="monospace")

    choices = overlay_choices(rows)
    for column in range(3):
        axis = axes[1, column]
        axis.axis("off")
        if column < len(choices):
            caption, row = choices[column]
            picture = overlay_of(row)
            if picture is not None:
                axis.imshow(picture)
            axis.set_title(f"{caption}: {row['nuclei']} nuclei\n{str(row['path'])[-48:]}", fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()
