"""`wsss mine-ae`: CAMs and adversarial erasing rounds -> cams.h5 and seeds.h5 (work in stages/mine_ae)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from stages.common.errors import ConfigError
from wsss_cli.common import (
    AmpOpt,
    DataOpt,
    DeviceOpt,
    ForceOpt,
    QuietOpt,
    RunOpt,
    SeedOpt,
    ShardOpt,
    WorkersOpt,
    run_stage,
)


def _scales(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise ConfigError(f"--scales {text}: expected comma-separated numbers, e.g. 1.0,0.5,1.5,2.0") from exc


def register(app: typer.Typer) -> None:
    @app.command("mine-ae")
    def mine_ae_command(
        rounds: Annotated[
            int | None,
            typer.Option(
                "--rounds", help="Erasing rounds T (AE-PSL: 3); 1 = plain CAM extraction of cls.h5."
            ),
        ] = None,
        classifier: Annotated[
            Path | None, typer.Option("--classifier", help="Round 1's classifier (default RUN/cls.h5).")
        ] = None,
        split: Annotated[
            str | None,
            typer.Option("--split", help="Images to mine (default: train_aug when present, else train)."),
        ] = None,
        top_fraction: Annotated[
            float | None,
            typer.Option("--top-fraction", help="Mine the top share of each class's CAM (AE-PSL: 0.2)."),
        ] = None,
        erase_thr: Annotated[
            float | None,
            typer.Option(
                "--erase-thr", help="Mine where the normalised CAM >= this instead of the top share."
            ),
        ] = None,
        stop_f1: Annotated[
            float | None,
            typer.Option(
                "--stop-f1",
                help="Stop when a round's classifier F1 on its erased images falls below this share of round 1's "
                "F1 (default 0.5); that round is left out.",
            ),
        ] = None,
        round_init: Annotated[
            str | None,
            typer.Option(
                "--round-init",
                help="Start of the round classifiers: recipe (train-cls's start, AE-PSL), cls (cls.h5's "
                "backbone) or auto (recipe with --weights, else cls).",
            ),
        ] = None,
        cam: Annotated[
            str | None, typer.Option("--cam", help="cam (multi-scale + flip, IRN) or gradcam.")
        ] = None,
        gradcam_layer: Annotated[
            str | None,
            typer.Option("--gradcam-layer", help="Backbone layer for --cam gradcam (default layer4)."),
        ] = None,
        scales: Annotated[
            str | None, typer.Option("--scales", help="CAM scales, comma-separated (IRN: 1.0,0.5,1.5,2.0).")
        ] = None,
        low_cam_thr: Annotated[
            float | None,
            typer.Option(
                "--low-cam-thr", help="Background where every round's CAM < this x max (AE-PSL: 0.05)."
            ),
        ] = None,
        saliency: Annotated[
            Path | None,
            typer.Option("--saliency", help="Folder of grayscale PNG saliency maps, one per image id."),
        ] = None,
        saliency_merge: Annotated[
            str | None,
            typer.Option("--saliency-merge", help="none, or components: grow seeds over salient components."),
        ] = None,
        saliency_bg_thr: Annotated[
            float | None,
            typer.Option("--saliency-bg-thr", help="Saliency below this is background (AE-PSL: 0.06)."),
        ] = None,
        run: RunOpt = None,
        data: DataOpt = None,
        device: DeviceOpt = None,
        workers: WorkersOpt = None,
        seed: SeedOpt = None,
        amp: AmpOpt = None,
        force: ForceOpt = False,
        quiet: QuietOpt = False,
        shard: ShardOpt = None,
    ) -> None:
        """Adversarial erasing (AE-PSL): CAMs of cls.h5, then rounds of erase / retrain / mine.

        Writes cams.h5 (per class, round 1's CAM raised to later rounds' CAMs where they mined) and seeds.h5
        (mined objects, 0 background, 255 unsure). Each round is resumable (cams_r{t}.h5, cls_r{t}.h5);
        the round classifiers use train-cls's resolved recipe from cls.h5, so their defaults scale with
        the dataset as train-cls's do.
        """
        from stages.mine_ae.stage import MineAeConfig
        from stages.mine_ae.stage import run as run_mine_ae

        def flags() -> dict[str, Any]:
            return {
                "rounds": rounds,
                "classifier": classifier,
                "split": split,
                "top_fraction": top_fraction,
                "erase_thr": erase_thr,
                "stop_f1": stop_f1,
                "round_init": round_init,
                "cam": cam,
                "gradcam_layer": gradcam_layer,
                "low_cam_thr": low_cam_thr,
                "saliency": saliency,
                "saliency_merge": saliency_merge,
                "saliency_bg_thr": saliency_bg_thr,
                "scales": _scales(scales),
            }

        run_stage(
            run_mine_ae,
            MineAeConfig,
            "mine-ae",
            flags,
            run=run,
            data=data,
            device=device,
            workers=workers,
            seed=seed,
            force=force,
            quiet=quiet,
            amp=amp,
            shard=shard,
        )
