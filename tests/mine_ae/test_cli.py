"""`wsss mine-ae` on the command line: options reach the config, errors are one line."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from wsss_cli.main import app


def test_missing_classifier_is_one_line_naming_train_cls(toy_root: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no wsss.toml here
    result = CliRunner().invoke(
        app, ["mine-ae", "--run", str(tmp_path / "run"), "--data", f"voc:{toy_root}", "--rounds", "2", "-q"]
    )
    assert result.exit_code == 2
    assert "wsss train-cls" in result.output and "Traceback" not in result.output


def test_bad_options_are_refused(toy_root: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    base = ["mine-ae", "--run", str(tmp_path / "run"), "--data", f"voc:{toy_root}", "-q"]
    for extra, needle in (
        (["--scales", "1,x"], "--scales"),
        (["--cam", "lrp"], "--cam"),
        (["--saliency-merge", "components"], "--saliency"),
        (["--stop-f1", "3"], "--stop-f1"),
    ):
        result = CliRunner().invoke(app, base + extra)
        assert result.exit_code == 2, extra
        assert needle in result.output, (extra, result.output)
