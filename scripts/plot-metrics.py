#!/usr/bin/env python3
"""Draws the metrics an e2e run scraped (metrics.tsv: a column of
milliseconds, then one column per series) as an SVG of small panels, one per
series, with no dependency beyond Python 3.

    scripts/plot-metrics.py target/e2e/tests/<test>/metrics.tsv out.svg
"""
import sys
from html import escape

W, H, PAD, COLS = 300, 150, 40, 2


def main(src, dst):
    with open(src) as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    names, data = rows[0][1:], [[float(x) for x in r] for r in rows[1:]]
    t = [r[0] / 1000 for r in data]
    panels = []
    for i, name in enumerate(names):
        ys = [r[i + 1] for r in data]
        x0, y0 = (i % COLS) * (W + PAD) + PAD, (i // COLS) * (H + PAD) + PAD
        tmax, ymax = max(t) or 1, max(ys) or 1
        pts = " ".join(
            f"{x0 + W * tt / tmax:.1f},{y0 + H - H * y / ymax:.1f}" for tt, y in zip(t, ys)
        )
        panels.append(
            f'<rect x="{x0}" y="{y0}" width="{W}" height="{H}" fill="none" stroke="#999"/>'
            f'<polyline points="{pts}" fill="none" stroke="#1f5fbf" stroke-width="1.5"/>'
            f'<text x="{x0}" y="{y0 - 6}" font-size="11">{escape(name)}</text>'
            f'<text x="{x0 + W}" y="{y0 + H + 13}" font-size="10" text-anchor="end">{tmax:.0f} s</text>'
            f'<text x="{x0 - 4}" y="{y0 + 10}" font-size="10" text-anchor="end">{ymax:g}</text>'
        )
    rows_n = (len(names) + COLS - 1) // COLS
    width, height = COLS * (W + PAD) + PAD, rows_n * (H + PAD) + PAD
    with open(dst, "w") as f:
        f.write(
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>'
            + "".join(panels)
            + "</svg>\n"
        )


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
