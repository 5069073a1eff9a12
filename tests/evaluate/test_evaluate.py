"""`wsss eval` on constructed datasets and artifacts whose figures are derived by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stages import evaluate as ev
from stages.common.artifacts import Provenance, begin, open_artifact, save_model
from stages.common.context import RunOptions
from stages.common.datasets import VocDataset, open_dataset
from stages.common.errors import ArtifactError, DatasetError
from stages.common.metrics import DEFAULT_THRESHOLDS, confusion_matrix, mean_iou

CLASSES = ("background", "cat", "dog")

# Two 2x4 images. 255 in a mask = void (not scored).
GT = {
    "a": np.array([[0, 0, 1, 1], [0, 0, 1, 255]], np.uint8),
    "b": np.array([[2, 2, 0, 0], [2, 2, 0, 0]], np.uint8),
}
PRED = {
    "a": np.array([[0, 1, 1, 1], [0, 0, 0, 2]], np.uint8),
    "b": np.array([[2, 2, 2, 0], [0, 2, 0, 0]], np.uint8),
}


def make_voc(root: Path, annotated: dict[str, tuple[str, ...]] | None = None, classes=CLASSES) -> Path:
    """A VOC-layout folder holding GT as masks, split "val"; `annotated` overrides XML labels."""
    for sub in ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for image_id, mask in GT.items():
        Image.fromarray(np.zeros((*mask.shape, 3), np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg")
        Image.fromarray(mask, mode="L").save(root / "SegmentationClass" / f"{image_id}.png")
        names = (annotated or {}).get(image_id) or tuple(CLASSES[c] for c in np.unique(mask) if 0 < c < 255)
        objects = "".join(f"<object><name>{n}</name></object>" for n in names)
        (root / "Annotations" / f"{image_id}.xml").write_text(f"<annotation>{objects}</annotation>")
    (root / "ImageSets/Segmentation/val.txt").write_text("a\nb\n")
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def write_artifact(path: Path, dataset, split: str, records: dict, kind: str = "labels", stage: str = "test"):
    """A complete artifact; `records` maps image id -> write_image keyword arguments."""
    prov = Provenance(kind=kind, stage=stage, config={"n": len(records)}, dataset=dataset.describe(split))
    status = begin(path, prov, force=True)
    with status.writer as writer:
        for image_id, fields in records.items():
            writer.write_image(image_id, **fields)
        writer.finish()
    return path


@pytest.fixture()
def voc(tmp_path: Path) -> VocDataset:
    return VocDataset(make_voc(tmp_path / "voc"))


def test_labels_miou_by_hand(voc, tmp_path):
    # Pixels (gt, pred), void (a[1,3]) left out:
    #   a: (0,0) (0,1) (1,1) (1,1) / (0,0) (0,0) (1,0)
    #   b: (2,2) (2,2) (0,2) (0,0) / (2,0) (2,2) (0,0) (0,0)
    # Confusion (rows gt): [[6,1,1],[1,2,0],[1,0,3]]; gt sums 8,3,4 = pred sums; 7 + 8 = 15 pixels.
    # IoU: bg 6/(8+8-6) = 6/10, cat 2/4, dog 3/5 -> mIoU = (.6 + .5 + .6)/3 = 56.667 %
    # pixel acc (6+2+3)/15 = 73.333 %; fg precision = fg recall = (2+3)/(3+4) = 71.429 %
    # FP/union: 2/10, 1/4, 1/5 -> mean 21.667 %; FN/union the same; 56.667 + 2*21.667 = 100.
    path = write_artifact(tmp_path / "pseudo.h5", voc, "val", {i: {"labels": p} for i, p in PRED.items()})
    res = ev.evaluate_artifact(path, voc)
    assert res["miou"] == pytest.approx(170 / 3)
    assert res["per_class_iou"] == pytest.approx({"background": 60.0, "cat": 50.0, "dog": 60.0})
    assert res["pixel_accuracy"] == pytest.approx(1100 / 15)
    assert res["precision"] == pytest.approx(500 / 7) and res["recall"] == pytest.approx(500 / 7)
    assert res["fp"] == pytest.approx(100 * (0.2 + 0.25 + 0.2) / 3) == pytest.approx(res["fn"])
    assert res["miou"] + res["fp"] + res["fn"] == pytest.approx(100)
    assert res["coverage"] == 100 and res["threshold"] is None and res["images"] == 2
    assert res["label_mismatch_images"] == 0 and res["split"] == "val"
    # the same maps in memory, streamed from a generator
    streamed = ev.evaluate_labels(((i, p) for i, p in PRED.items()), voc)
    assert streamed["miou"] == pytest.approx(res["miou"])


def test_unsure_coverage_and_precision(voc, tmp_path):
    # Seeds of image a only. gt [[0,0,1,1],[0,0,1,void]], pred [[0,U,1,U],[U,0,0,2]] (U = 255).
    # Scored pixels: 7; unsure among them: 3 -> coverage 4/7. Labelled: (0,0) (1,1) (0,0) (1,0): 3 right of 4.
    # Labelled only: bg 2/(3+2-2) = 2/3, cat 1/(1+2-1) = 1/2, dog absent -> 58.333 %.
    # Unsure as background: bg 4/(6+4-4) = 2/3, cat 1/(1+3-1) = 1/3 -> 50 %.
    seeds = np.array([[0, 255, 1, 255], [255, 0, 0, 2]], np.uint8)
    path = write_artifact(tmp_path / "seeds.h5", voc, "val", {"a": {"labels": seeds}}, stage="mine-ae")
    res = ev.evaluate_artifact(path, voc)
    assert res["coverage"] == pytest.approx(400 / 7)
    assert res["labelled_precision"] == pytest.approx(75.0)
    assert res["miou_labelled_only"] == pytest.approx(100 * (2 / 3 + 1 / 2) / 2)
    assert res["miou"] == pytest.approx(50.0)
    assert res["images"] == 1 and "1 of the 2" in res["partial_split"]
    assert "background" in res["conventions"]["miou"]


def test_scores_with_background_are_argmax(voc, tmp_path):
    # Channels (background, cat) of image a; dog not stored, so never predicted even though the
    # void pixel's scores are tiny. argmax = [[0,1,1,1],[0,0,1,0]] against gt [[0,0,1,1],[0,0,1,void]]:
    # bg 3/(3+4-3) = 3/4, cat 3/(4+3-3) = 3/4 -> mIoU 75 %.
    bg = np.array([[0.9, 0.2, 0.1, 0.3], [0.8, 0.7, 0.2, 0.01]], np.float32)
    cat = np.array([[0.1, 0.6, 0.9, 0.7], [0.1, 0.2, 0.8, 0.0]], np.float32)
    record = {"scores": np.stack([bg, cat]), "classes": (0, 1), "stride": 1}
    path = write_artifact(tmp_path / "refined.h5", voc, "val", {"a": record}, kind="scores", stage="refine")
    res = ev.evaluate_artifact(path, voc)
    assert res["miou"] == pytest.approx(75.0)
    assert res["threshold"] is None and res["scored"].startswith("scores (argmax")


def test_labels_from_scores_maps_channels_to_classes():
    scores = np.array([[[0.1, 0.9]], [[0.5, 0.2]]], np.float32)  # (K=2, 1, 2) for classes (0, 3)
    np.testing.assert_array_equal(ev.labels_from_scores(scores, (0, 3)), [[3, 0]])
    with pytest.raises(ValueError, match="no background"):
        ev.labels_from_scores(scores, (1, 3))


def test_cam_curve_best_equals_brute_force(toy_root, tmp_path):
    ds = open_dataset(f"toy:{toy_root}")
    rng = np.random.default_rng(0)
    records = {}
    for image_id in ds.ids("val"):
        gt, classes = ds.mask(image_id), ds.labels(image_id)
        cams = np.stack([0.5 * (gt == c) + 0.6 * rng.random(gt.shape) for c in classes]).astype(np.float32)
        records[image_id] = {"scores": cams, "classes": classes, "stride": 1}
    path = write_artifact(tmp_path / "cams.h5", ds, "val", records, kind="scores", stage="mine-ae")
    res = ev.evaluate_artifact(path, ds)
    brute = {}
    with open_artifact(path) as art:
        for t in DEFAULT_THRESHOLDS:
            cm = 0
            for image_id in ds.ids("val"):
                scores, classes, _ = art.scores(image_id)
                pred = np.where(scores.max(0) >= t, np.asarray(classes)[scores.argmax(0)], 0)
                cm = cm + confusion_matrix(pred.astype(np.uint8), ds.mask(image_id), len(ds.class_names))
            brute[t] = mean_iou(cm)
    best = max(brute, key=lambda t: brute[t])
    assert res["threshold"] == pytest.approx(best) and res["best_miou"] == pytest.approx(brute[best])
    assert res["default_threshold"] == 0.25 and res["miou"] == pytest.approx(brute[0.25])
    assert "ground truth" in res["threshold_diagnostic"]
    assert [p[1] for p in res["curve"]] == pytest.approx([brute[t] for t in DEFAULT_THRESHOLDS])


def test_crf_reported_beside_labels(voc, tmp_path):
    records = {i: {"labels": PRED[i], "extra": {"labels_crf": GT[i]}} for i in GT}
    path = write_artifact(tmp_path / "pred_val.h5", voc, "val", records, stage="train-seg")
    res = ev.evaluate_artifact(path, voc)
    assert res["miou"] == pytest.approx(170 / 3)
    assert res["with_crf"]["miou"] == pytest.approx(100.0)


def test_label_disagreement_is_counted(tmp_path):
    ds = VocDataset(make_voc(tmp_path / "voc", annotated={"b": ("dog", "cat")}))
    path = write_artifact(tmp_path / "gt.h5", ds, "val", {i: {"labels": m} for i, m in GT.items()})
    summary = ev.run(RunOptions(run_dir=tmp_path, data=f"voc:{ds.root}", quiet=True), ev.EvalConfig((path,)))
    assert summary.results[0]["label_mismatch_images"] == 1
    assert any("1 of 2 images" in note for note in summary.notes)


def test_missing_mask_names_the_file(voc, tmp_path):
    path = write_artifact(tmp_path / "gt.h5", voc, "val", {i: {"labels": m} for i, m in GT.items()})
    (voc.root / "SegmentationClass" / "b.png").unlink()
    with pytest.raises(DatasetError, match=r"SegmentationClass/b\.png: mask not found"):
        ev.evaluate_artifact(path, voc)


def test_foreign_artifacts_are_refused(voc, tmp_path):
    other = VocDataset(make_voc(tmp_path / "other", classes=("background", "cat", "dog", "cow")))
    path = write_artifact(tmp_path / "pseudo.h5", other, "val", {i: {"labels": m} for i, m in GT.items()})
    with pytest.raises(ArtifactError, match="made for classes"):
        ev.evaluate_artifact(path, voc)
    toy_named = open_dataset(f"toy:{voc.root}")  # same files, read as another dataset
    path = write_artifact(tmp_path / "seeds.h5", toy_named, "val", {"a": {"labels": GT["a"]}})
    with pytest.raises(ArtifactError, match="made for dataset 'toy'"):
        ev.evaluate_artifact(path, voc)


def test_toy_ground_truth_scores_100(toy_root, tmp_path):
    ds = open_dataset(f"toy:{toy_root}")
    records = {i: {"labels": ds.mask(i)} for i in ds.ids("val")}
    path = write_artifact(tmp_path / "gt.h5", ds, "val", records)
    res = ev.evaluate_artifact(path, ds)
    assert res["miou"] == 100.0 and res["coverage"] == 100.0 and res["images"] == len(records)
    assert res["label_mismatch_images"] == 0
    assert ev.evaluate_artifact(path, ds, max_images=3)["images"] == 3


def test_default_scores_all_and_skips_partial_and_models(voc, tmp_path):
    run = tmp_path / "run"
    write_artifact(run / "pseudo.h5", voc, "val", {i: {"labels": p} for i, p in PRED.items()})
    write_artifact(run / "seeds.h5", voc, "val", {"a": {"labels": GT["a"]}}, stage="mine-ae")
    prov = Provenance(kind="scores", stage="refine", config={}, dataset=voc.describe("val"))
    begin(run / "refined.h5", prov).writer.close()  # killed: refined.h5.partial only
    model = Provenance(kind="model", stage="train-cls", config={}, dataset=voc.describe("val"))
    save_model(run / "cls.h5", model, {"w": torch.zeros(2)}, {"arch": "none"})
    opts = RunOptions(run_dir=run, data=f"voc:{voc.root}", quiet=True)
    summary = ev.run(opts, ev.EvalConfig())
    assert sorted(Path(r["artifact"]).name for r in summary.results) == ["pseudo.h5", "seeds.h5"]
    reasons = {Path(s["path"]).name: s["reason"] for s in summary.skipped}
    assert set(reasons) == {"refined.h5.partial", "cls.h5"}
    assert "partial" in reasons["refined.h5.partial"] and "model" in reasons["cls.h5"]
    with open_artifact(run / "eval.h5", kind="metrics") as art:
        assert art.meta("results") == json.loads(json.dumps(summary.results))
        assert set(art.provenance.inputs) == {"pseudo.h5", "seeds.h5"}
        cm = art.h5["results/pseudo.h5/confusion"][()]
        np.testing.assert_array_equal(cm, [[6, 1, 1], [1, 2, 0], [1, 0, 3]])
    # eval.h5 is up to date for the same question; another question replaces it, and says so.
    assert ev.run(opts, ev.EvalConfig()).status == "up to date"
    other = ev.run(opts, ev.EvalConfig(artifacts=[run / "seeds.h5"]))
    assert other.status == "made" and other.notes[0].startswith("replaced eval.h5")
    with open_artifact(run / "eval.h5", kind="metrics") as art:
        assert set(art.provenance.inputs) == {"seeds.h5"}


def test_interrupted_eval_resumes(voc, tmp_path, monkeypatch):
    run = tmp_path / "run"
    write_artifact(run / "a.h5", voc, "val", {i: {"labels": p} for i, p in PRED.items()})
    write_artifact(run / "b.h5", voc, "val", {i: {"labels": m} for i, m in GT.items()})
    opts = RunOptions(run_dir=run, data=f"voc:{voc.root}", quiet=True)
    real, calls = ev.score_artifact, []

    def dies_on_b(path, *args, **kwargs):
        calls.append(Path(path).name)
        if Path(path).name == "b.h5":
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ev, "score_artifact", dies_on_b)
    with pytest.raises(KeyboardInterrupt):
        ev.run(opts, ev.EvalConfig())
    assert (run / "eval.h5.partial").exists() and not (run / "eval.h5").exists()
    monkeypatch.setattr(
        ev, "score_artifact", lambda *a, **k: (calls.append(Path(a[0]).name), real(*a, **k))[1]
    )
    summary = ev.run(opts, ev.EvalConfig())
    assert summary.status == "resumed" and calls == ["a.h5", "b.h5", "b.h5"]
    assert [r["miou"] for r in summary.results] == pytest.approx([170 / 3, 100.0])


def test_cli_json(voc, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from wsss_cli.main import app

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    write_artifact(run / "pseudo.h5", voc, "val", {i: {"labels": p} for i, p in PRED.items()})
    result = CliRunner().invoke(app, ["eval", "--run", str(run), "--data", f"voc:{voc.root}", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    keys = {"artifact", "stage", "split", "miou", "per_class_iou", "precision", "recall", "fp", "fn"}
    assert keys | {"coverage", "threshold", "images"} <= set(data["results"][0])
    assert data["results"][0]["per_class_iou"]["cat"] == pytest.approx(50.0)
    # a named artifact is found in the run directory; a foreign one is one line on stderr, exit 2
    table = CliRunner().invoke(app, ["eval", "pseudo.h5", "--run", str(run), "--data", f"voc:{voc.root}"])
    assert table.exit_code == 0 and "56.67" in table.stdout
    other = VocDataset(make_voc(tmp_path / "other", classes=("background", "cat", "dog", "cow")))
    write_artifact(tmp_path / "foreign.h5", other, "val", {"a": {"labels": GT["a"]}})
    refused = CliRunner().invoke(
        app, ["eval", str(tmp_path / "foreign.h5"), "--run", str(run), "--data", f"voc:{voc.root}"]
    )
    assert refused.exit_code == 2 and "made for classes" in refused.output
