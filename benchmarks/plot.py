"""Plot ``results/attention-<platform>.json``: ``python -m benchmarks.plot [JSON ...]``.

One PNG per results file, beside it: forward+backward time and XLA temporary memory against
the map size, one line per implementation, for the Wide-ResNet and ResNet-50 layer shapes.
Also prints each file's results as the Markdown table the README shows.
"""

from __future__ import annotations

import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from benchmarks.measure import RESULTS


def plot(path: pathlib.Path) -> pathlib.Path:
    results = json.loads(path.read_text())
    results["rows"] = load_rows(path)
    families = sorted({row["shape"]["name"].split("_")[0] for row in results["rows"]})
    fig, axes = plt.subplots(2, len(families), figsize=(5 * len(families), 7), squeeze=False)
    for col, family in enumerate(families):
        rows = [r for r in results["rows"] if r["shape"]["name"].startswith(family + "_")]
        for name in dict.fromkeys(r["implementation"] for r in rows):
            mine = sorted(
                (r for r in rows if r["implementation"] == name), key=lambda r: r["shape"]["height"]
            )
            sizes = [r["shape"]["height"] for r in mine]
            axes[0, col].plot(sizes, [1e3 * r["seconds"] for r in mine], marker="o", label=name)
            axes[1, col].plot(sizes, [r["temp_bytes"] / 2**20 for r in mine], marker="o", label=name)
        shapes = dict.fromkeys((r["shape"]["height"], r["shape"]["batch"]) for r in rows)
        batches = ", ".join(f"{size}: B={batch}" for size, batch in shapes)
        axes[0, col].set_title(f"{family} layer shapes ({batches})", fontsize=9)
        axes[0, col].set_ylabel("forward+backward, ms (median)")
        axes[1, col].set_ylabel("XLA temporary memory, MiB")
        for ax in axes[:, col]:
            ax.set_xlabel("map size H = W")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[0, col].legend(fontsize=8)
    machine = results["machine"]
    device = f"{machine['device_kind']} ({machine['platform']}), JAX {machine['jax']}"
    fig.suptitle(f"Relative self-attention, 8 heads, 20 key dims per head; {device}")
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _time_and_memory(row: dict) -> str:
    return f"{1e3 * row['seconds']:.0f} ms / {row['temp_bytes'] / 2**20:.0f} MiB"


# (numerator, denominator, with memory): the ratios the README discusses, where both were measured.
RATIOS = (
    ("auto", "plain", True),
    ("fused", "plain_flash", True),
    ("dense", "fused", False),
    ("flex_attention", "fused", False),
    ("paper_port", "auto", False),
)


def load_rows(path: pathlib.Path) -> list[dict]:
    """Rows of a results file, with those of the peer script (``peers-<platform>.json``) beside it."""
    rows = json.loads(path.read_text())["rows"]
    peers = path.with_name(path.name.replace("attention-", "peers-"))
    return rows + (json.loads(peers.read_text())["rows"] if peers.exists() and peers != path else [])


def _ratio(top: dict, bottom: dict, memory: bool) -> str:
    text = f"{top['seconds'] / bottom['seconds']:.2f}x"
    return text + (f" / {top['temp_bytes'] / bottom['temp_bytes']:.2f}x" if memory else "")


def markdown_table(path: pathlib.Path) -> str:
    """Time / XLA temporary memory per shape and implementation, and the ratios the README discusses."""
    rows = load_rows(path)
    names = list(dict.fromkeys(r["implementation"] for r in rows))
    ratios = [(top, bottom, memory) for top, bottom, memory in RATIOS if {top, bottom} <= set(names)]
    by_shape = {}
    for r in rows:
        by_shape.setdefault(f"{r['shape']['name']} ({r['shape']['batch']})", {})[r["implementation"]] = r
    headers = [*names, *(f"{top} / {bottom}" for top, bottom, _ in ratios)]
    lines = ["| shape (batch) | " + " | ".join(headers) + " |", "|---" * (len(headers) + 1) + "|"]
    for shape, cases in by_shape.items():
        cells = [_time_and_memory(cases[n]) if n in cases else "-" for n in names]
        for top, bottom, memory in ratios:
            both = top in cases and bottom in cases
            cells.append(_ratio(cases[top], cases[bottom], memory) if both else "-")
        lines.append(f"| {shape} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    paths = [pathlib.Path(p) for p in argv] if argv else sorted(RESULTS.glob("attention-*.json"))
    for path in paths:
        print(f"wrote {plot(path)}\n")
        print(markdown_table(path))


if __name__ == "__main__":
    main(sys.argv[1:])
