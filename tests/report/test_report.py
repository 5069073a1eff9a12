"""`wsss report`: a self-contained HTML page whose images load in a real browser."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "show"))
from test_show import write  # noqa: E402  (tests share the artifact writer)

from stages.common.context import RunOptions  # noqa: E402
from stages.report import ReportConfig, bar_chart, collect, run  # noqa: E402


def make_run(tmp_path: Path, toy_root: Path) -> RunOptions:
    opts = RunOptions(run_dir=tmp_path / "run", data=f"toy:{toy_root}", quiet=True)
    write(opts.path("cams.h5"), opts, "scores")
    write(opts.path("pseudo.h5"), opts, "labels")
    return opts


def test_report_collects_results_and_provenance(tmp_path: Path, toy_root: Path) -> None:
    opts = make_run(tmp_path, toy_root)
    data = collect(opts)
    assert [r["artifact"] for r in data["provenance"]] == ["cams.h5", "pseudo.h5"]
    pseudo = next(r for r in data["results"] if r["title"] == "pseudo labels")
    assert pseudo["miou"] == pytest.approx(100.0)  # pseudo.h5 holds the ground truth itself
    html = (run(opts, ReportConfig(images=2)).artifacts[0]).read_text()
    assert "data:image/png;base64," in html and "<svg" in html
    assert not re.search(r'src="(?!data:)', html), "every image is embedded"


def test_bar_chart_scales_bars() -> None:
    svg = bar_chart([("a", 50.0), ("b", 100.0)], width=460)
    widths = [float(w) for w in re.findall(r'<rect x="200" y="\d+" width="([\d.]+)"', svg)]
    assert widths == [100.0, 200.0]  # (460 - 200 - 60) / 100 px per percent


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


CHROME_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path: Path, toy_root: Path) -> None:
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no chromium binary: install Debian's chromium package (.ci/run does) to run this test")
    opts = make_run(tmp_path, toy_root)
    page = run(opts, ReportConfig(images=2)).artifacts[0]
    # A copy with a probe that records, once loaded, whether every image decoded.
    probe = page.with_name("probe.html")
    probe.write_text(
        page.read_text().replace(
            "</body>",
            "<script>window.addEventListener('load', () => { const ok = [...document.images].every("
            "i => i.complete && i.naturalWidth > 0); document.body.setAttribute('data-images', "
            "document.images.length + (ok ? ':ok' : ':broken')); });</script></body>",
        )
    )
    profile = tmp_path / "profile"
    dom = subprocess.run(
        [
            chromium,
            *CHROME_FLAGS,
            f"--user-data-dir={profile}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    match = re.search(r'data-images="(\d+):(\w+)"', dom)
    assert match is not None, "the page did not finish loading"
    assert int(match.group(1)) >= 1 and match.group(2) == "ok"
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            chromium,
            *CHROME_FLAGS,
            f"--user-data-dir={profile}",
            "--window-size=1100,1400",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert shot.stat().st_size > 10_000
