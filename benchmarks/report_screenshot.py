"""Render a run's report.html from its stage records with the current code and screenshot it in
headless Chromium (Debian: `apt-get install chromium`), to check how it looks in a real browser.

    python benchmarks/report_screenshot.py --root outputs/ml100k --run-date 2026-12-01 \
        [--out benchmarks/results/report.png] [--width 1200] [--narrow 640]

Writes the PNG at --width, and one at --narrow (a phone-sized window: the tables must scroll inside
the page, not widen it). Prints the page width Chromium laid out, from the screenshot size.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from recsys_core import storage
from recsys_core.config import load_config
from recsys_core.ops import report
from recsys_core.pipeline import Run


def render_report(root: str, run_date: str) -> str:
    """report.html as the report stage would write it now, from the run's stored records."""
    run = Run(load_config(None, [f"storage.root={root}"]), run_date)
    records = {s: run.require(s) for s in ("prepare", "train", "evaluate", "promote", "infer")}
    explained = run.done("explain")
    history = storage.read_table(report.history_uri(root)).to_pylist()
    recs = run.recs_dir if records["infer"].get("published") else None
    samples = report.load_samples(run.prepared.users, run.prepared.items, recs,
                                  (explained or {}).get("explanations"), n=10, seed=0)
    return report.render(run_date, records, history, samples)


def screenshot(html_path: Path, out: Path, width: int, height: int) -> None:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        sys.exit("no chromium on the PATH (Debian: apt-get install chromium)")
    subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={width},{height}", f"--screenshot={out}", html_path.as_uri()],
                   check=True, capture_output=True, timeout=120)


def crop_to_content(png: Path, margin: int = 24) -> tuple[int, int]:
    """Cut the blank space below the page (the window is taller than the page); returns the size."""
    im = Image.open(png)
    rows = np.flatnonzero(np.asarray(im.convert("L")).min(axis=1) < 250)
    if rows.size:
        im = im.crop((0, 0, im.width, min(im.height, int(rows.max()) + margin)))
        im.save(png)
    return im.size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True)
    p.add_argument("--run-date", required=True)
    p.add_argument("--out", default="benchmarks/results/report.png")
    p.add_argument("--width", type=int, default=1200)
    p.add_argument("--height", type=int, default=6000)
    p.add_argument("--narrow", type=int, default=640)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        page = Path(d) / "report.html"
        page.write_text(render_report(a.root, a.run_date))
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        screenshot(page, out, a.width, a.height)
        narrow = out.with_name(out.stem + f"_{a.narrow}px" + out.suffix)
        screenshot(page, narrow, a.narrow, a.height)
    for png in (out, narrow):
        w, h = crop_to_content(png)
        print(f"wrote {png}: {w} x {h} px")


if __name__ == "__main__":
    main()
