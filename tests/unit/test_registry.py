"""Names → objects: the package's catalogue in Python, classes registered from Python, user config folders;
the package's YAML files equal to the catalogue."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from heatmapbench import registry
from heatmapbench.app.schema import ConfigError, validate
from heatmapbench.evaluation import EvaluationSettings
from heatmapbench.evaluation import build_explainers, evaluate_batch
from heatmapbench.explain import LRP, Explainer, Sensitivity, get_explainer
from heatmapbench.perturbation import Constant, Perturbation, Road, Uniform, get_perturbation, region_perturbation
from tests.helpers import compose_config


class CenterExplainer(Explainer):
    """Relevance = closeness to the image centre, scaled by ``weight`` (a user's own method)."""

    name = "center"

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__(pooling="sum")
        self.weight = weight

    def attribute(self, model, x, target):
        h, w = x.shape[-2:]
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        d = ((yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2).to(x.dtype)
        return (self.weight * -d).expand(x.shape[0], h, w).clone()


class Half(Perturbation):
    """Removed pixels become ``value`` (a user's own perturbation)."""

    name = "half"

    def __init__(self, value: float = 0.5) -> None:
        self.value = value

    def prepare(self, x, space, generator):
        return torch.full_like(x, self.value)


@pytest.fixture
def registered():
    registry.register_explainer("center", CenterExplainer, weight=2.0)
    registry.register_perturbation("half", Half, value=0.25)
    yield
    registry.unregister("explainer", "center")
    registry.unregister("perturbation", "half")


def linear(c=1, h=8, w=8):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 3))


def _no_file(*args, **kwargs):
    raise AssertionError(f"a config file was read: {args}")


@pytest.mark.parametrize("group", registry.GROUPS)
def test_every_name_builds_from_python_without_reading_a_config_file(group, tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "_PACKAGE", tmp_path / "nowhere")  # conf_dir() holds nothing
    monkeypatch.setattr(registry, "_USER_DIRS", [])  # and no user folder (another test may have added one)
    monkeypatch.setattr(registry, "_hydra_search_dirs", lambda: [])
    monkeypatch.setattr(OmegaConf, "load", _no_file)
    get = get_explainer if group == "explainer" else get_perturbation
    kind = Explainer if group == "explainer" else Perturbation
    names = registry.available(group)
    assert names == sorted(registry.catalogue(group))
    assert set(names) >= ({"random", "lrp_epsilon_0.01", "cp_lrp", "attnlrp", "integrated_gradients"}
                          if group == "explainer" else {"uniform", "blur", "road"})
    for name in names:
        assert isinstance(get(name), kind), name
    road = get_perturbation("road", noise=0.05, max_iter=7)
    assert isinstance(road, Road) and (road.noise, road.max_iter) == (0.05, 7)
    assert get_explainer("sensitivity_l2", pooling="linf").pooling == "linf"
    # a mapping overrides key by key, as a config override does
    ig = get_explainer("integrated_gradients", attribute_kwargs={"n_steps": 4})
    assert ig.attribute_kwargs == {"n_steps": 4, "baselines": 0.0}
    assert EvaluationSettings(explainers=registry.available("explainer")).explainers == registry.available("explainer")


def _state(obj) -> tuple[type, dict]:
    """An object's class and public attributes: what its parameters made of it."""
    return type(obj), {k: v for k, v in vars(obj).items() if not k.startswith("_")}


@pytest.mark.parametrize("group", registry.GROUPS)
def test_every_config_file_builds_what_its_python_preset_builds(group):
    """``<group>=<name>`` as the commands compose it (``conf/<group>/<name>.yaml``) gives the object of
    the catalogue entry: the same class with the same parameters; a file for every entry and back."""
    files = sorted(p.name[: -len(".yaml")] for p in (registry.conf_dir() / group).glob("*.yaml"))
    presets = registry.catalogue(group)
    assert files == sorted(presets)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(registry.conf_dir()), version_base="1.3"):
            for name in files:
                node = compose(config_name="evaluate", overrides=[f"{group}={name}"])[group]
                if group == "explainer":  # a preset's file states what the preset binds, no more, no less
                    assert set(node) - {"_target_"} == set(presets[name].keywords), name
                assert _state(instantiate(node, _convert_="all")) == _state(presets[name]()), name
    finally:
        GlobalHydra.instance().clear()
    # the comparison sees a parameter that differs
    probe, changed = ("lrp_epsilon_0.01", {"epsilon": 0.1}) if group == "explainer" else ("road", {"noise": 0.05})
    assert _state(registry.build(group, probe, **changed)) != _state(presets[probe]())


def test_get_perturbations_old_home_warns_and_forwards():
    import heatmapbench.perturbation.perturbations as old

    with pytest.warns(DeprecationWarning, match="import from heatmapbench.perturbation instead"):
        assert old.get_perturbation is get_perturbation


def test_objects_pass_through_and_unknown_names_explain_how_to_register():
    s, u = Sensitivity(), Uniform()
    assert get_explainer(s) is s and get_perturbation(u) is u
    with pytest.raises(TypeError, match="overrides apply to explainer names"):
        get_explainer(s, pooling="sum")
    with pytest.raises(ValueError, match=r"Unknown explainer 'nope'.*sensitivity_l2.*register_explainer"):
        get_explainer("nope")
    with pytest.raises(ValueError, match="Unknown perturbation 'nope'.*uniform"):
        region_perturbation(linear(), torch.rand(2, 1, 8, 8), torch.rand(2, 8, 8), steps=2, region_size=4,
                            perturbation="nope")


def test_python_registration(registered):
    assert "center" in registry.available("explainer") and "half" in registry.available("perturbation")
    e = get_explainer("center")
    assert isinstance(e, CenterExplainer) and e.weight == 2.0
    assert get_explainer("center", weight=3.0).weight == 3.0
    assert get_perturbation("half").value == 0.25
    model, x = linear(), torch.rand(3, 1, 8, 8)
    # the name and the object give the same curves
    by_name = region_perturbation(model, x, e(model, x, torch.zeros(3, dtype=torch.long)), region_size=4,
                                  steps=3, perturbation="half")
    by_obj = region_perturbation(model, x, e(model, x, torch.zeros(3, dtype=torch.long)), region_size=4,
                                 steps=3, perturbation=Half(0.25))
    torch.testing.assert_close(by_name.curves, by_obj.curves)
    # centre first: step 1 replaces one of the four central 4×4 tiles with 0.25
    first = x.clone()
    tile = by_name.order[0, :, 0]
    for i, t in enumerate(tile.tolist()):
        r, c = divmod(t, 2)
        first[i, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] = 0.25
    with torch.no_grad():
        want = model(x).gather(1, by_name.target[:, None]) - model(first).gather(1, by_name.target[:, None])
    torch.testing.assert_close(by_name.curves[0, :, 1], want[:, 0])
    assert EvaluationSettings(explainers=["center", "random"]).explainers == ["center", "random"]


def test_evaluate_batch_takes_names_and_objects(registered):
    model, x = linear(), torch.rand(4, 1, 8, 8)
    settings = EvaluationSettings(explainers=["center"], region_size=4, steps=3, random_repeats=2, complexity=False)
    by_name = evaluate_batch(model, x, settings=settings, perturbation="half")
    by_obj = evaluate_batch(model, x, {"center": CenterExplainer(2.0)}, settings, Half(0.25))
    assert by_name.explainers == by_obj.explainers == ["center"]
    torch.testing.assert_close(by_name.curves["center"]["morf"], by_obj.curves["center"]["morf"])
    torch.testing.assert_close(by_name.random_curves, by_obj.random_curves)
    both = build_explainers(["sensitivity_l2", Sensitivity(pooling="linf"), CenterExplainer()])
    assert list(both) == ["sensitivity_l2", "sensitivity", "center"]
    with pytest.raises(ValueError, match="more than once"):
        build_explainers([Sensitivity(), Sensitivity(pooling="linf")])


def _user_conf(tmp_path: Path) -> Path:
    folder = tmp_path / "myconf"
    (folder / "explainer").mkdir(parents=True)
    (folder / "perturbation").mkdir()
    (folder / "explainer" / "center_yaml.yaml").write_text(
        "_target_: tests.unit.test_registry.CenterExplainer\nweight: 5.0\n")
    (folder / "perturbation" / "grey.yaml").write_text("_target_: heatmapbench.perturbation.Constant\nvalue: 0.5\n")
    # over a catalogue entry: the preset's parameters, epsilon changed
    (folder / "explainer" / "lrp_coarse.yaml").write_text("defaults: [lrp_epsilon_0.01]\nepsilon: 0.5\n")
    return folder


def test_user_config_folder_from_python(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "_USER_DIRS", [])
    with pytest.raises(ValueError, match="Unknown explainer"):
        get_explainer("center_yaml")
    registry.add_config_dir(_user_conf(tmp_path))
    assert get_explainer("center_yaml").weight == 5.0
    assert isinstance(get_perturbation("grey"), Constant)
    coarse = get_explainer("lrp_coarse")
    assert (type(coarse), coarse.epsilon, coarse.composite, coarse.pooling) == (LRP, 0.5, "epsilon", "sum")
    with pytest.raises(ValueError, match="does not exist"):
        registry.add_config_dir(tmp_path / "missing")


def test_user_config_folder_on_hydras_search_path(tmp_path, data_dir):
    folder = _user_conf(tmp_path)
    try:
        cfg = compose_config("evaluate", [f"hydra.searchpath=[file://{folder}]", "perturbation=grey",
                                          "evaluation.explainers=[center_yaml,random]"], tmp_path, data_dir)
        validate(cfg, groups=("evaluation",))  # the schema knows the user's name
        assert cfg.perturbation.value == 0.5  # Hydra composed the user's group option
        assert get_explainer("center_yaml").weight == 5.0
        cfg = compose_config("evaluate", ["evaluation.explainers=[center_yaml]"], tmp_path, data_dir)
        with pytest.raises(ConfigError, match=r"unknown explainer\(s\) \['center_yaml'\]"):
            validate(cfg, groups=("evaluation",))
    finally:
        GlobalHydra.instance().clear()


def test_installed_layout_puts_outputs_in_the_working_directory(tmp_path, monkeypatch):
    assert registry.in_checkout() and registry.project_root() == registry.conf_dir().parents[2]  # <repo>/src/heatmapbench/conf
    package = tmp_path / "site-packages" / "heatmapbench"
    (package / "conf").mkdir(parents=True)
    (package / "conf" / "train.yaml").write_text("task_name: train\n")
    monkeypatch.setattr(registry, "_PACKAGE", package)
    monkeypatch.chdir(tmp_path)
    assert registry.conf_dir() == package / "conf" and not registry.in_checkout()
    assert registry.project_root() == tmp_path


