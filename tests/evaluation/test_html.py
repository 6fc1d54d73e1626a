"""report.html: rendered from report.md into one self-contained page, and what a browser makes of
it — headless Chromium loads the page from disk, offline, and must lay out its tables and decode
every embedded image (``make test`` installs Debian's ``chromium`` when it is missing)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crc_lightning.evaluation.html import render_markdown, write_html
from crc_lightning.evaluation.report import find_job_dirs, report_from_jobs
from crc_lightning.io.errors import InputError
from tests.helpers.jobs import cohort, noise_score, signal_score, write_jobs
from tests.helpers.stores import write_fake_store


class Page(HTMLParser):
    """The parts of a page the tests look at (stdlib parser: an oracle independent of the renderer)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.headings: list[tuple[str, str | None]] = []
        self.links: list[str] = []
        self.tags: list[str] = []
        self.cells: list[str] = []
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        self.tags.append(tag)
        if tag == "img":
            self.images.append(a)
        if tag in ("h1", "h2", "h3"):
            self.headings.append((tag, a.get("id")))
        if tag == "a":
            self.links.append(a.get("href", ""))
        if tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.cells.append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _png(path: Path, size=(40, 20), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(path)
    return path


def test_page_embeds_images_keeps_alt_text_and_escapes_markup(tmp_path: Path) -> None:
    (tmp_path / "figs").mkdir()
    fig = _png(tmp_path / "figs" / "fig 1.png")
    md = (
        "# Experiment report\n\nIntro.\n\n## Tables\n\n| variant | AUC |\n|---|---:|\n"
        "| oodp <script>alert(1)</script> | 0.71 ± 0.05† |\n\n## Figures\n\n"
        "![ROC per class](<figs/fig 1.png>)\n\n![](figs/fig%201.png)\n"
    )
    page = render_markdown(md, tmp_path)
    p = Page(page)
    assert "script" not in p.tags and "&lt;script&gt;" in page  # markup in a cell is text
    assert p.cells == ["variant", "AUC", "oodp <script>alert(1)</script>", "0.71 ± 0.05†"]
    assert len(p.images) == 2
    for img in p.images:
        head, data = img["src"].split(",", 1)
        assert head == "data:image/png;base64"
        assert base64.b64decode(data) == fig.read_bytes()  # the file's own bytes
    assert [i["alt"] for i in p.images] == ["ROC per class", "fig 1"]  # none left without alt
    assert p.headings == [("h1", "experiment-report"), ("h2", "tables"), ("h2", "figures")]
    assert p.links == ["#tables", "#figures"]  # the contents list
    assert '<html lang="en">' in page and "<title>Experiment report</title>" in page
    assert "http" not in page.replace("http-equiv", "")  # nothing fetched from anywhere


def test_a_missing_figure_is_refused_and_nothing_written(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"gone\.png"):
        write_html("# R\n\n![x](gone.png)\n", tmp_path / "r.html")
    assert not list(tmp_path.iterdir())


@pytest.fixture
def sweep_report(tmp_path: Path) -> Path:
    """report.html of a sweep (2 variants × 2 label sets × 3 seeds) with the crop-store gallery."""
    root = tmp_path / "multiruns" / "2026-01-01"
    c = cohort(15, seed=3)
    for labels in ("three", "five"):
        write_jobs(root, c, signal_score(0.35), variant="oodp_sa", labels=labels, init="simclr",
                   seeds=(0, 1, 2), k=3)  # fmt: skip
        write_jobs(root, c, noise_score, variant="baseline", labels=labels, init="none",
                   seeds=(0, 1, 2), k=3)  # fmt: skip
    store = write_fake_store(tmp_path / "crops" / "fake", n_patients=8)
    md = report_from_jobs(
        find_job_dirs(root), root / "report", permutations=50, store=store, window=(400, 40)
    )
    return md.with_suffix(".html")


def test_report_html_beside_report_md_has_every_table_and_figure(sweep_report: Path) -> None:
    md = sweep_report.with_suffix(".md").read_text()
    p = Page(sweep_report.read_text())
    figures = sorted(f.name for f in sweep_report.parent.glob("*.png"))
    assert "fig2_sample_crops.png" in figures  # the gallery of crops per class
    assert len(p.images) == md.count("](") == len(figures)
    assert all(i["alt"] and i["src"].startswith("data:image/png;base64,") for i in p.images)
    rules = [ln for ln in md.splitlines() if re.fullmatch(r"\|(\s*:?-+:?\s*\|)+\s*", ln)]
    assert p.tags.count("table") == len(rules) > 5  # every markdown table became one
    assert any(
        re.search(r"\[[\d.]+, [\d.]+\]", c) and "base" in c for c in p.cells
    )  # CI + baseline


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# marks, once the page has loaded, whether every image decoded (naturalWidth) and what was laid out
PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images].map(i => ({ok: i.complete && i.naturalWidth > 0,
    w: i.naturalWidth, shown: i.getBoundingClientRect().width}));
  const tables = [...document.querySelectorAll("table")].map(t => t.getBoundingClientRect().height);
  const out = document.createElement("pre"); out.id = "probe";
  out.textContent = JSON.stringify({imgs, tables, width: document.documentElement.scrollWidth});
  document.body.appendChild(out);
});
</script>"""


def _chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp / 'profile'}",
        "--window-size=1280,2000", "--virtual-time-budget=5000", *args,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)


@pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium (make test installs it: apt-get install chromium)"
)
def test_report_html_renders_in_headless_chromium(sweep_report: Path, tmp_path: Path) -> None:
    # 1. every <img> decoded and every table laid out: a copy of the page with a probe script
    probed = tmp_path / "probed.html"
    probed.write_text(sweep_report.read_text().replace("</body>", PROBE + "</body>"))
    dom = _chromium("--dump-dom", probed.as_uri(), tmp=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = json.loads(_probe_text(dom.stdout))
    n_images = len(Page(sweep_report.read_text()).images)
    assert len(found["imgs"]) == n_images > 5
    assert all(i["ok"] and i["shown"] > 100 for i in found["imgs"]), found["imgs"]
    assert found["tables"] and all(h > 20 for h in found["tables"])
    assert found["width"] <= 1280  # nothing wider than the window: tables scroll in their region
    # 2. the screenshot of the page itself, as a reader sees it at 1280 px
    shot = tmp_path / "report.png"
    run = _chromium(f"--screenshot={shot}", sweep_report.as_uri(), tmp=tmp_path)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (2000, 1280)
    dark = (pixels < 128).mean()  # text, table rules and figures
    assert 0.005 < dark < 0.6 and pixels.std() > 20, (dark, pixels.std())
    if os.environ.get("CRC_KEEP_SCREENSHOT"):  # a folder: keep the screenshot for a human to see
        shutil.copy(shot, Path(os.environ["CRC_KEEP_SCREENSHOT"]) / "report_1280.png")


def _probe_text(dom: str) -> str:
    start = dom.index('<pre id="probe">') + len('<pre id="probe">')
    text = dom[start : dom.index("</pre>", start)]
    return (
        text.replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    )
