"""Smoke test of an installed heatmapbench (run from outside the repository by .ci/run).

The Python API with names and with objects, a user's own explainer registered from Python, and
the packaged configs; the CLI part is in .ci/run.
"""

import sys
from pathlib import Path

import torch
from torch import nn

import heatmapbench
from heatmapbench import registry
from heatmapbench.evaluation import EvaluationSettings
from heatmapbench.evaluation import evaluate_batch
from heatmapbench.explain import Explainer, Sensitivity, get_explainer
from heatmapbench.perturbation import Uniform, region_perturbation

package = Path(heatmapbench.__file__).resolve().parent
assert Path(sys.prefix).resolve() in package.parents, f"imported {package}, not the installed wheel"
assert registry.conf_dir() == package / "conf" and not registry.in_checkout(), registry.conf_dir()
assert registry.project_root() == Path.cwd()
assert {"sensitivity_l2", "lrp_epsilon_0.01"} <= set(registry.available("explainer"))

torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16 * 16, 3))
x = torch.rand(4, 1, 16, 16)
target = torch.zeros(4, dtype=torch.long)
kw = dict(target=target, region_size=4, steps=5)
by_name = region_perturbation(model, x, get_explainer("sensitivity_l2")(model, x, target), perturbation="uniform", **kw)
by_object = region_perturbation(model, x, Sensitivity(pooling="l2")(model, x, target), perturbation=Uniform(), **kw)
assert torch.equal(by_name.curves, by_object.curves)


class Ones(Explainer):
    name = "ones"

    def attribute(self, model, x, target):
        return torch.ones_like(x[:, 0])


registry.register_explainer("ones", Ones)
settings = EvaluationSettings(explainers=["sensitivity_l2", "ones"], region_size=4, steps=5, random_repeats=2,
                              n_boot=100)
evaluation = evaluate_batch(model, x, settings=settings, perturbation="uniform")
table = evaluation.statistics(n_boot=settings.n_boot).summary
assert list(table.explainer) == ["sensitivity_l2", "ones"], table
print(f"installed API OK ({package}):\n{table[['explainer', 'aopc', 'aopc_rel']]}")
