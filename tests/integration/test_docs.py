"""The documentation stays true: its code runs, its generated reference lists every option, and the
built site fetches nothing at view time.

The tutorial runs as written, in a fresh folder, with smaller settings appended to each command
(:data:`SMALL`); the Python snippets of the guides run against a tiny network.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.helpers import REPO, cli_env

DOCS = REPO / "docs"
sys.path.insert(0, str(REPO / "scripts"))

#: Appended to each command of the tutorial: the same steps, on a few images and batches.
SMALL = {
    "train": "trainer.max_epochs=1 trainer.limit_train_batches=20 trainer.limit_val_batches=2 test=false "
             "'~callbacks.aopc' progress=false",
    "evaluate": "num_images=12 evaluation.steps=6 evaluation.random_repeats=1 evaluation.n_boot=200 "
                "gallery_size=0 progress=false",
    "report": "n_boot=200",
}


def code_blocks(page: Path) -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block of a Markdown page, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w+)[^\n]*\n(.*?)^```", page.read_text(),
                                                          re.S | re.M)]


def as_script(blocks: list[tuple[str, str]], root: Path) -> str:
    """The page's bash and Python blocks as one bash script: commands through this interpreter and
    package, each with the smaller settings and its outputs under ``root``."""
    lines = ["set -euo pipefail"]
    merged: list[tuple[str, str]] = []
    for language, code in blocks:  # consecutive Python blocks run in one session, as a reader runs them
        if merged and language == "python" and merged[-1][0] == "python":
            merged[-1] = ("python", merged[-1][1] + "\n" + code)
        else:
            merged.append((language, code))
    for language, code in merged:
        if language == "python":
            lines += [f'"{sys.executable}" - <<\'PYEOF\'', code.rstrip(), "PYEOF"]
            continue
        assert language == "bash", language
        for command in re.sub(r"\\\n\s*", " ", code).splitlines():
            match = re.match(r"\s*\.venv/bin/heatmapbench-(train|evaluate|report)\b(.*)$", command)
            if match:
                task, rest = match.groups()
                command = (f'"{sys.executable}" -m heatmapbench.app.{task}{rest} {SMALL[task]} '
                           f"paths.root_dir={root}")
            lines.append(command)
    return "\n".join(lines) + "\n"


@pytest.mark.slow
def test_tutorial_runs_as_written(tmp_path):
    page = DOCS / "tutorials" / "ranking.md"
    blocks = code_blocks(page)
    assert [lang for lang, _ in blocks].count("bash") >= 3 and any(lang == "python" for lang, _ in blocks)
    script = as_script(blocks, tmp_path)
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=cli_env(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # what the page tells the reader to look at was printed
    assert "aopc_rel_lo" in done.stdout and "p_best" in done.stdout and "p_holm" in done.stdout
    assert "Kendall" in done.stdout, done.stdout[-2000:]
    assert list(tmp_path.glob("outputs/report/runs/*/rank_per_setting.png"))


# -- the guides' Python snippets ----------------------------------------------------------------------

class TinyNet(nn.Module):
    """A ReLU convnet for 3-channel images: LRP-ε with ε → 0 equals gradient × input on it."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x):
        return self.head(self.features(x))


def run_snippets(page: str, namespace: dict) -> dict:
    """Run every Python block of ``docs/<page>`` (or of the repository's README.md) in order, in one namespace."""
    source = REPO / page if page == "README.md" else DOCS / page
    blocks = [code for lang, code in code_blocks(source) if lang == "python"]
    assert blocks, page
    for code in blocks:
        exec(compile(code, f"{page} (python block)", "exec"), namespace)
    return namespace


@pytest.fixture
def tiny():
    """A seeded tiny network and a batch of two 3 × 90 × 90 images: 100 regions of 9 × 9 pixels."""
    torch.manual_seed(0)
    return {"model": TinyNet().eval(), "x": torch.rand(2, 3, 90, 90), "MyNet": TinyNet}


@pytest.mark.parametrize("page", ["index.md", "README.md"])
def test_library_in_five_lines(page, tiny, capsys):
    run_snippets(page, tiny)
    assert "aopc_rel" in capsys.readouterr().out


def test_evaluate_your_own_model_snippet(tiny, capsys):
    ns = run_snippets("how-to/evaluate.md", tiny)
    assert set(ns["stats"].summary.explainer) == {"sensitivity_l2", "lrp_epsilon_0.01", "random"}


def test_extend_snippets(tiny, monkeypatch):
    from heatmapbench import registry
    from heatmapbench.perturbation import PixelSpace

    monkeypatch.setitem(registry._REGISTERED, "explainer", dict(registry._REGISTERED["explainer"]))  # undone after
    ns = run_snippets("how-to/extend.md", tiny)
    heatmap = ns["GradientSquared"](pooling="sum")(tiny["model"], tiny["x"], torch.tensor([0, 1]))
    assert heatmap.shape == (2, 90, 90) and bool((heatmap >= 0).all())
    assert set(ns["evaluation"].explainers) == {"mine", "lrp"}
    assert "gradient_squared" in registry.available("explainer")
    space = PixelSpace.build(3, [0.5] * 3, [0.25] * 3, (0.0, 1.0), torch.device("cpu"), torch.float32)
    fill = ns["Grey"]().prepare(tiny["x"], space, torch.Generator())
    assert torch.allclose(fill, torch.zeros_like(tiny["x"]))  # grey 0.5 is the mean: 0 in model space


def test_lrp_check_snippet(tiny, capsys):
    run_snippets("how-to/lrp.md", tiny)
    assert float(capsys.readouterr().out.strip().splitlines()[-1]) < 1e-6  # exact up to the float32 heatmap


# -- generated reference and the built site ----------------------------------------------------------

def test_config_reference_lists_every_option_with_defaults():
    import config_reference
    from dataclasses import fields

    from heatmapbench.evaluation import EvaluationSettings

    page = config_reference.page()
    for group in (p for p in config_reference.CONF.iterdir() if p.is_dir() and p.name not in config_reference.SKIP_GROUPS):
        for option in config_reference.options(group.name):
            assert f"### `{group.name}={option}`" in page, (group.name, option)
    for f in fields(EvaluationSettings):  # every setting with its schema default and meaning
        row = next(line for line in page.splitlines() if line.startswith(f"| `evaluation.{f.name}` |"))
        assert row.count("|") >= 4 and not row.rstrip().endswith("|  |"), row
    assert "| `evaluation.region_size` | `9` |" in page and "| `evaluation.steps` | `100` |" in page
    # the network builders' defaults, from their schemas (model/net), with the builder's docstring as meaning
    vgg16 = page.split("### `model=vgg16`")[1].split("### ")[0]
    assert "`model.net` is typed by the schema `vgg16_schema`" in vgg16 and "| `model.net.allow_download` | `false` |" in vgg16
    # vgg16's docstring says "parameters as alexnet": the meanings are alexnet's
    assert "| `model.net.weights_path` | `null` | A state dict file to load instead of the hub cache. |" in vgg16, vgg16
    row = next(line for line in page.splitlines() if line.startswith("| `model.net.adapt_head` | `false` |"))
    assert "head=adapt" in row, row


def test_offline_check_finds_what_a_page_would_fetch(tmp_path):
    from docs_offline_check import problems

    (tmp_path / "index.html").write_text('<a href="https://arxiv.org/abs/1509.06321">paper</a>'
                                         '<link rel="stylesheet" href="assets/main.css">')
    assert problems(tmp_path) == []
    (tmp_path / "page.html").write_text(
        '<link href="https://fonts.googleapis.com/css?family=Roboto" rel="stylesheet">'
        '<script src="https://unpkg.com/mermaid/dist/mermaid.min.js"></script>')
    assert len(problems(tmp_path)) == 2
