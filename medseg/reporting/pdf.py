"""``report.pdf``: the report's content on A4 pages, drawn with matplotlib (no browser or external tool)."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg
import matplotlib.pyplot as plt
from matplotlib.backends.backend_pdf import PdfPages

A4 = (8.27, 11.69)
ROWS_PER_PAGE = 40


def _text_page(pdf: PdfPages, lines: list[tuple[str, float, str]]) -> None:
    fig = plt.figure(figsize=A4)
    y = 0.96
    for text, size, weight in lines:
        for line in textwrap.wrap(text, width=int(95 * 10 / size)) or [""]:
            fig.text(0.06, y, line, fontsize=size, weight=weight, va="top")
            y -= 0.0045 * size
        y -= 0.004
    pdf.savefig(fig)
    plt.close(fig)


def _image_pages(pdf: PdfPages, items: list[tuple[str, bytes]], per_page: int) -> None:
    for start in range(0, len(items), per_page):
        fig, axes = plt.subplots(per_page, 1, figsize=A4)
        for ax, (caption, png) in zip(list(axes) + [None] * per_page, items[start : start + per_page]):
            ax.imshow(mpimg.imread(io.BytesIO(png), format="png"))
            ax.set_title(caption, fontsize=8)
            ax.set_axis_off()
        for ax in list(axes)[len(items[start : start + per_page]) :]:
            ax.set_axis_off()
        fig.tight_layout()
        pdf.savefig(fig)
        plt.close(fig)


def _fmt(value: float) -> str:
    return "–" if value != value else f"{value:.3f}"


from medseg.metrics.catalogue import METRICS  # noqa: E402


def write_pdf(data: dict, path: Path) -> Path:
    """Writes the PDF version of a report built by :func:`medseg.reporting.report.build_report` (atomically)."""
    from medseg.fsutil import atomic_write

    return atomic_write(path, lambda tmp: _write_pdf(data, tmp), suffix=".pdf")


def _write_pdf(data: dict, path: Path) -> Path:
    with PdfPages(path) as pdf:
        lines: list[tuple[str, float, str]] = [
            (data["title"], 16, "bold"),
            ("Research use only — not a medical device.", 10, "bold"),
            (f"Created {data['created']}, medseg {data['versions']['medseg']}; {data['n_cases']} case(s).", 9, "normal"),
        ]
        lines += [(f"{k}: {v}", 9, "normal") for k, v in data["context"].items()]
        for name in data["labels"]:
            lines.append((name, 12, "bold"))
            lines += [(sentence, 9, "normal") for sentence in data["cards"][name]]
        _text_page(pdf, lines)

        columns = [m for m in METRICS.values() if m.pdf]  # the catalogue's PDF columns
        header = ["case", "label", *(m.title.replace(" (mm)", "") for m in columns), "flags"]
        rows = data["rows"]
        for start in range(0, len(rows), ROWS_PER_PAGE):
            chunk = rows[start : start + ROWS_PER_PAGE]
            cells = [[r["case"], r["label"], *(_fmt(r[m.name]) for m in columns), "; ".join(r["flags"])[:48]]
                     for r in chunk]
            fig, ax = plt.subplots(figsize=A4)
            ax.set_axis_off()
            table = ax.table(cellText=cells, colLabels=header, loc="upper center", cellLoc="left")
            table.auto_set_font_size(False)
            table.set_fontsize(6.5)
            table.auto_set_column_width(list(range(len(header))))
            ax.set_title("Per case", fontsize=11)
            pdf.savefig(fig)
            plt.close(fig)

        _image_pages(pdf, data["figures"], per_page=3)
        overlays = [(f"{o['case']} ({o['why']}) — {o['caption']}", o["png"]) for o in data["overlays"]]
        _image_pages(pdf, overlays, per_page=4)
    return path
