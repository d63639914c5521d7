"""The randomisation test inside ``heatmapbench-evaluate`` (``sanity=mprt``): settings, metrics, artifacts.

Kept apart from the evaluate command so that it stays a few lines there: :func:`sanity_settings`
checks the config before any MLflow run exists; :func:`run_sanity` runs every mode on the first
images and writes the tables and figures into the run's output folder; :func:`log_sanity` logs the
``sanity/...`` metrics (:func:`heatmapbench.metrics.names.sanity_metric`) and the files under ``sanity/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from heatmapbench.evaluation.markdown import format_ci, format_number
from heatmapbench.metrics import names as mn
from heatmapbench.sanity.mprt import MPRTResult, model_randomisation
from heatmapbench.app.schema import SanitySettings

#: Artifact folder of the sanity checks in an evaluate run.
ARTIFACT_PATH = "sanity"


def sanity_settings(cfg: DictConfig) -> SanitySettings | None:
    """The ``sanity`` group of ``cfg`` checked (a ConfigError names the key), or None when not selected.

    Under Hydra the group's choice decides: ``sanity=null`` (``~sanity``) after an experiment that
    selects ``sanity: mprt`` and sets ``sanity.num_images`` leaves that experiment's values in the
    config, without a choice; the test is off then.
    """
    from hydra.core.hydra_config import HydraConfig

    from heatmapbench.app.schema import validate

    node = cfg.get("sanity")
    if HydraConfig.initialized() and HydraConfig.get().runtime.choices.get("sanity") is None:
        return None
    if node is None:
        return None
    validate(cfg, groups=("sanity",))
    return SanitySettings(**OmegaConf.to_container(node, resolve=True))


def per_image_frame(result: MPRTResult) -> pd.DataFrame:
    """Long table: image × explainer × measure × step of one mode's similarities."""
    frames = []
    for measure, per_explainer in result.similarity.items():
        for name, values in per_explainer.items():
            for depth, (step, v) in enumerate(zip(result.steps, values), start=1):
                frames.append(pd.DataFrame({"image": range(len(v)), "explainer": name, "mode": result.mode,
                                            "measure": measure, "depth": depth, "layer": step.label,
                                            "similarity": v.numpy()}))
    return pd.concat(frames, ignore_index=True)


def sanity_metrics(summary: pd.DataFrame) -> dict[str, float]:
    """``sanity/mprt/<e>`` (+ bounds): Spearman after the whole net is randomised (cascading), the same
    per measure, and per measure the mean over the independently randomised layers."""
    metrics: dict[str, float] = {}
    finite = lambda v: v == v  # noqa: E731
    casc = summary[summary["mode"] == "cascading"]
    for (name, measure), part in casc.groupby(["explainer", "measure"], sort=False):
        last = part.loc[part.depth.idxmax()]
        stems = [f"mprt_{measure}"] + (["mprt"] if measure == summary.measure.iloc[0] else [])
        for stem in stems:
            for bound, column in ((None, "mean"), ("lo", "lo"), ("hi", "hi")):
                if finite(last[column]):
                    metrics[mn.sanity_metric(stem, name, bound)] = float(last[column])
    ind = summary[summary["mode"] == "independent"]
    for (name, measure), part in ind.groupby(["explainer", "measure"], sort=False):
        value = float(part["mean"].mean())
        if finite(value):
            metrics[mn.sanity_metric(f"mprt_independent_{measure}", name)] = value
    return metrics


@dataclass
class SanityChecks:
    """What :func:`run_sanity` measured and wrote: metrics, results per mode, the summary, the files."""

    metrics: dict[str, float]
    results: dict[str, MPRTResult]
    summary: pd.DataFrame
    files: list[Path] = field(default_factory=list)

    @property
    def markdown(self) -> str:
        return sanity_markdown(self.summary)


def run_sanity(settings: SanitySettings, net: nn.Module, dataset, explainers: dict[str, Callable],
               device: torch.device, folder: Path, *, n_boot: int = 2000, seed: int = 0,
               log: Callable[[str], Any] = print) -> SanityChecks:
    """Run the configured modes on the first ``settings.num_images`` of ``dataset``; write the tables and
    figures into ``folder`` (the results are kept there should logging fail).

    The summary has one row per explainer × mode × measure × step: means with bootstrap CIs over the images.
    """
    from heatmapbench.sanity.figures import plot_heatmap_grid, plot_similarity

    n = min(settings.num_images, len(dataset))
    x = torch.stack([dataset[i][0] for i in range(n)]).to(device)  # (N, C, H, W)
    results = {}
    for mode in settings.modes:
        results[mode] = model_randomisation(
            net, x, explainers, mode=mode, max_steps=settings.max_steps, measures=settings.measures,
            topk=settings.topk, ssim_window=settings.ssim_window, seed=settings.seed, batch_size=settings.batch_size,
            gallery_size=settings.gallery_size, progress=lambda s: log(f"sanity: {s}"))
    summary = pd.concat([r.summary(n_boot=n_boot, seed=seed) for r in results.values()], ignore_index=True)
    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / "mprt_summary.csv", folder / "mprt_per_image.csv", folder / "mprt.md"]
    summary.to_csv(files[0], index=False)
    pd.concat([per_image_frame(r) for r in results.values()]).to_csv(files[1], index=False)
    files[2].write_text(sanity_markdown(summary))
    for mode, result in results.items():
        files.append(folder / f"mprt_{mode}.png")
        plot_similarity(summary[summary["mode"] == mode], files[-1],
                        title=f"{mode} randomisation, {result.num_images} images")
        if result.gallery:
            files.append(folder / f"mprt_{mode}_heatmaps.png")
            plot_heatmap_grid(result, files[-1])
    return SanityChecks(sanity_metrics(summary), results, summary, files)


def log_sanity(logger: Any, checks: SanityChecks) -> None:
    """Log the metrics and the files of :func:`run_sanity` to the logger's MLflow run (artifacts under ``sanity/``)."""
    from heatmapbench.app.store import retry_locked

    retry_locked(logger.log_metrics)(checks.metrics)
    for path in checks.files:
        retry_locked(logger.experiment.log_artifact)(logger.run_id, str(path), ARTIFACT_PATH)


def sanity_markdown(summary: pd.DataFrame) -> str:
    """The similarity after the whole net is randomised (cascading) and the independent mean, per explainer."""
    rows = []
    for (name, mode, measure), part in summary.groupby(["explainer", "mode", "measure"], sort=False):
        if mode == "cascading":
            last = part.loc[part.depth.idxmax()]
            rows.append((name, measure, format_ci(last["mean"], last.lo, last.hi, ".3f"), mode))
        else:
            rows.append((name, measure, f"{format_number(part['mean'].mean(), '.3f')} (mean over {len(part)} layers)", mode))
    table = pd.DataFrame(rows, columns=["explainer", "measure", "similarity", "mode"])
    wide = table.pivot_table(index=["explainer", "measure"], columns="mode", values="similarity", aggfunc="first")
    lines = ["## Model randomisation (Adebayo et al. 2018): similarity to the trained model's heatmap",
             "cascading: after every layer is re-initialised (95% CI over images); independent: mean over the "
             "layers re-initialised one at a time. Lower = the heatmap depends on the weights.", "",
             "| explainer | measure | " + " | ".join(wide.columns) + " |",
             "|---|---|" + "---|" * len(wide.columns)]
    for (name, measure), row in wide.iterrows():
        lines.append(f"| {name} | {measure} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"
