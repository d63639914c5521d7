"""Every config group composes and instantiates; schemas reject typos and bad values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import yaml
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from heatmapbench.app.schema import SCHEMAS, ConfigError, validate
from heatmapbench.data import ImageDataModule
from heatmapbench.registry import available, conf_dir
from heatmapbench.app.sanity import sanity_settings
from heatmapbench.app.provenance import resolved_config
from tests.helpers import compose_config

DATA = available("data")
MODELS = available("model")
TRAINERS = available("trainer")
EXPERIMENTS = available("experiment")


def test_groups_are_not_empty():
    assert {"fashion_mnist", "mnist", "cifar10", "imagefolder"} <= set(DATA)
    assert {"small_cnn", "vgg_small"} <= set(MODELS)
    assert {"default", "cpu", "gpu", "ddp"} <= set(TRAINERS)


@pytest.mark.parametrize("name", [d for d in DATA if d != "imagefolder"])
def test_data_configs_instantiate(train_cfg, name):
    cfg = train_cfg(f"data={name}")
    validate(cfg)
    dm = instantiate(cfg.data)
    assert isinstance(dm, ImageDataModule)
    assert len(dm.mean) == len(dm.std) == dm.in_channels
    assert dm.value_range == (0.0, 1.0)
    assert dm.batch_size == cfg.data.batch_size


def test_imagefolder_config_instantiates(train_cfg, tmp_path):
    root = tmp_path / "folder"
    (root / "cat").mkdir(parents=True)
    cfg = train_cfg("data=imagefolder", f"data.path={root}")
    validate(cfg)
    dm = instantiate(cfg.data)
    assert dm.path == root and dm.mean == (0.485, 0.456, 0.406)


# Zoo models: random init (no weights on disk here); the checkpoint model needs a file
# and is composed in tests/unit/models/test_zoo.py, the hf model a saved folder
# (tests/unit/models/test_timm_hf.py).
ZOO_RANDOM_INIT = {n: ["model.net.weights=null"] for n in ("alexnet", "vgg16", "resnet50", "googlenet", "vit_b_16",
                                                           "swin_t", "convnext_tiny")}
ZOO_RANDOM_INIT["timm"] = ["model.net.name=test_vit", "model.net.pretrained=false"]


@pytest.mark.parametrize("name", [m for m in MODELS if m not in ("checkpoint", "hf")])
def test_model_configs_instantiate(train_cfg, name):
    cfg = train_cfg(f"model={name}", *ZOO_RANDOM_INIT.get(name, []))
    module = instantiate(cfg.model)
    assert isinstance(module, pl.LightningModule)
    opt = module.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups[0]["lr"] == cfg.model.optimizer.lr


@pytest.mark.parametrize("name", TRAINERS)
def test_trainer_configs_compose(train_cfg, name):
    cfg = train_cfg(f"trainer={name}")
    validate(cfg)
    if cfg.trainer.accelerator in ("auto", "cpu"):
        trainer = instantiate(cfg.trainer, logger=False)
        assert isinstance(trainer, pl.Trainer)
    else:  # no GPU here: composing and validating is what can be checked
        assert cfg.trainer.accelerator == "gpu"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiments_compose(train_cfg, tmp_path, data_dir, name):
    if name.startswith("samek2015"):  # recipes of heatmapbench-evaluate
        extra = [f"data.path={tmp_path}"] if name == "samek2015_ilsvrc" else []
        cfg = compose_config("evaluate", [f"experiment={name}", *extra], tmp_path, data_dir)
        validate(cfg, groups=("paths", "data", "logger", "evaluation"))
        assert cfg.evaluation.region_size == 9 and cfg.evaluation.steps == 100
        assert cfg.evaluation.random_repeats == 10
        assert resolved_config(cfg)["evaluation"]["explainers"]
    elif name.startswith("protocol_sensitivity"):  # sweeps of heatmapbench-evaluate
        extra = ["model.net.ckpt_path=/models/last.ckpt"] if name.endswith("demo") else []
        cfg = compose_config("evaluate", [f"experiment={name}", *extra], tmp_path, data_dir)
        validate(cfg, groups=("paths", "data", "logger", "evaluation"))
        assert list(cfg.evaluation.orders) == ["morf", "lerf"] and "random" in cfg.evaluation.explainers
        sweep = cfg.hydra.sweeper.params
        assert set(sweep["perturbation"].split(",")) == {"uniform", "mean", "blur", "road"}
        sizes = [int(r) for r in sweep["evaluation.region_size"].split(",")]
        side = 224 if name == "protocol_sensitivity" else 28
        assert sizes == ([4, 9, 16, 32] if side == 224 else [2, 4, 7])
        for size in sizes:  # every job's L fits its grid: the paper's L, or all regions where fewer
            cfg.evaluation.region_size = size
            grid = (-(-side // size)) ** 2  # tiles, the last row/column cropped at the border
            assert cfg.evaluation.steps == min(100 if side == 224 else 24, grid)
    elif name.startswith("roar"):  # heatmapbench-roar
        from heatmapbench.app.roar import RoarSettings

        cfg = compose_config("roar", [f"experiment={name}"], tmp_path, data_dir)
        validate(cfg, groups=("paths", "data", "trainer", "logger", "roar"))
        settings = RoarSettings(**resolved_config(cfg)["roar"])
        assert settings.methods == ["roar", "kar"] and len(settings.seeds) >= 2 and settings.baseline == "random"
    elif name.startswith("sanity"):  # heatmapbench-evaluate with the randomisation test
        extra = ["model.net.ckpt_path=/models/last.ckpt"] if name.endswith("demo") else []
        cfg = compose_config("evaluate", [f"experiment={name}", *extra], tmp_path, data_dir)
        validate(cfg, groups=("paths", "data", "logger", "evaluation", "sanity"))
        assert sanity_settings(cfg).modes == ["cascading", "independent"]
    else:
        cfg = train_cfg(f"experiment={name}")
        validate(cfg)
        assert resolved_config(cfg)["trainer"]["max_epochs"] >= 1


def test_logger_and_callbacks_instantiate(train_cfg):
    cfg = train_cfg()
    logger = instantiate(cfg.logger)
    assert logger._tracking_uri == f"sqlite:///{cfg.paths.mlruns_dir}/mlflow.db"
    assert cfg.logger.artifact_location == f"{cfg.paths.mlruns_dir}/artifacts"


def test_typo_in_group_key_fails_at_composition(train_cfg):
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        train_cfg("data.batch_sise=3")


def test_wrong_type_fails_at_composition(train_cfg):
    with pytest.raises((ConfigCompositionException, ValidationError)):
        train_cfg("data.batch_size=three")


def test_trainer_schema_is_lightnings_signature(train_cfg):
    # keys and defaults come from pytorch_lightning.Trainer itself; the YAML sets only what differs
    import inspect

    params = inspect.signature(pl.Trainer.__init__).parameters
    cfg = train_cfg()
    assert set(cfg.trainer) - {"_target_"} == set(params) - {"self"}
    assert cfg.trainer.max_steps == params["max_steps"].default and cfg.trainer.max_epochs == 1
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        train_cfg("trainer.max_epoch=3")  # a typo
    with pytest.raises(ConfigError, match="trainer.max_epochs"):
        validate(train_cfg("trainer.max_epochs=three"))


@pytest.mark.parametrize("override, key", [("trainer.max_epochs=-1", "trainer.max_epochs"),
                                           ("data.batch_size=0", "data.batch_size"),
                                           ("trainer.limit_train_batches=-2", "trainer.limit_train_batches")])
def test_bad_values_fail_validation(train_cfg, override, key):
    cfg = train_cfg(override)
    with pytest.raises(ConfigError, match=key):
        validate(cfg)


def test_missing_imagefolder_path_fails_validation(train_cfg, tmp_path):
    cfg = train_cfg("data=imagefolder", f"data.path={tmp_path}/nowhere")
    with pytest.raises(ConfigError, match="data.path"):
        validate(cfg)
    cfg = train_cfg("data=imagefolder")
    with pytest.raises(ConfigError, match="data.path is required"):
        validate(cfg)


@pytest.mark.parametrize("launcher, target", [("joblib", "JoblibLauncher"), ("submitit_slurm", "SlurmLauncher"),
                                              ("submitit_local", "LocalLauncher")])
def test_scale_out_launchers_compose(tmp_path, data_dir, launcher, target):
    cfg = compose_config("evaluate", [f"hydra/launcher={launcher}"], tmp_path, data_dir)
    assert cfg.hydra.launcher._target_.endswith(target)


def test_ddp_trainer_config(train_cfg):
    cfg = train_cfg("trainer=ddp", "trainer.devices=4")
    validate(cfg)
    assert (cfg.trainer.strategy, cfg.trainer.accelerator, cfg.trainer.devices) == ("ddp", "gpu", 4)


def test_an_evaluate_recipe_that_needs_a_checkpoint_says_so(tmp_path, data_dir):
    from heatmapbench.app.schema import ConfigError
    from heatmapbench.app.evaluate import build_inputs

    cfg = compose_config("evaluate", ["experiment=protocol_sensitivity_demo"], tmp_path, data_dir)
    with pytest.raises(ConfigError, match="model.net.ckpt_path is required"):
        build_inputs(cfg)


# -- each default declared once --------------------------------------------------------------------

def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and (node or not prefix):  # an empty mapping is a leaf, an empty file nothing
        return {k: v for key, value in node.items()
                for k, v in _leaves(value, f"{prefix}.{key}" if prefix else str(key)).items()}
    return {prefix: node}


def _inherited(conf: Path, group: str, data: dict) -> DictConfig:
    """What a config of ``group`` reads without its own keys: its defaults list composed (the schemas
    of ``heatmapbench.app.schema`` and the group's other files; ``- net: <schema>`` from ``<group>/net``)."""
    base = OmegaConf.create()
    for entry in data.get("defaults", []):
        if isinstance(entry, dict) and len(entry) == 1:  # a subgroup's schema: ``net: vgg16_schema`` at net
            (sub, name), = entry.items()
            sub, _, package = str(sub).partition("@")
            if name in SCHEMAS.get(f"{group}/{sub}", {}):
                node = OmegaConf.structured(SCHEMAS[f"{group}/{sub}"][name])
                base = OmegaConf.merge(base, OmegaConf.create({package or sub: node}))
            continue
        if not isinstance(entry, str) or entry == "_self_":
            continue
        name, _, package = entry.partition("@")
        schema = SCHEMAS.get(group, {}).get(name)
        if schema is not None:
            node = OmegaConf.structured(schema)
        else:
            parent = yaml.safe_load((conf / group / f"{name}.yaml").read_text()) or {}
            node = OmegaConf.merge(_inherited(conf, group, parent), {k: v for k, v in parent.items() if k != "defaults"})
        base = OmegaConf.merge(base, OmegaConf.create({package: node}) if package else node)
    return base


def _bases(conf: Path, group: str, path: Path) -> list[Path]:
    """``path`` after the files of its group it reads through its defaults list (bases first)."""
    data = yaml.safe_load(path.read_text()) or {}
    files = [conf / group / f"{entry.partition('@')[0]}.yaml" for entry in data.get("defaults", [])
             if isinstance(entry, str)]
    return [base for file in files if file.is_file() for base in _bases(conf, group, file)] + [path]


def _net_schemas(conf: Path, path: Path) -> list[type]:
    """The schemas of the network builders whose ``net`` keys the model config ``path`` sets: the builder of
    each model option that reads it (itself, or a base file such as ``_torchvision.yaml``), found by the
    ``net._target_`` the option composes; none where one of them builds a net without a schema (a user's own)."""
    by_target = {OmegaConf.structured(schema)._target_: schema for schema in SCHEMAS["model/net"].values()}
    schemas = []
    for option in sorted((conf / "model").glob("*.yaml")):
        chain = _bases(conf, "model", option)
        if option.name.startswith("_") or path not in chain:
            continue
        targets = [net.get("_target_") for file in chain
                   if isinstance(net := (yaml.safe_load(file.read_text()) or {}).get("net"), dict)]
        target = next((t for t in reversed(targets) if t), None)
        if target not in by_target:
            return []
        schemas.append(by_target[target])
    return schemas


def restated_defaults(conf: Path, group: str, path: Path) -> list[str]:
    """The keys of ``path`` that set the value they would have anyway (a default restated); in a model config,
    a ``net`` key also where it sets its builder's default (for every model that reads the file), whether or
    not the file names the builder's schema."""
    data = yaml.safe_load(path.read_text()) or {}
    inherited = _leaves(OmegaConf.to_container(_inherited(conf, group, data), resolve=False))
    own = _leaves({k: v for k, v in data.items() if k != "defaults"})
    nets = [_leaves({"net": OmegaConf.to_container(OmegaConf.structured(schema))})
            for schema in (_net_schemas(conf, path) if group == "model" else [])]
    return sorted(key for key, value in own.items() if key.rsplit(".", 1)[-1] != "_target_"
                  and not (isinstance(value, str) and "${" in value)
                  and ((key in inherited and inherited[key] == value)
                       or (nets and all(key in net and net[key] == value for net in nets))))


#: Groups of whole recipes (``# @package _global_``) and Hydra's own settings: not typed by a schema.
UNTYPED = ("experiment", "debug", "hydra", "explainer")  # explainer: presets, equal to the Python catalogue


def test_no_config_file_restates_a_default():
    conf = conf_dir()
    restated = {f"{path.parent.name}/{path.name}": keys for group in conf.iterdir()
                if group.is_dir() and group.name not in UNTYPED for path in sorted(group.glob("*.yaml"))
                if (keys := restated_defaults(conf, group.name, path))}
    restated.update({path.name: keys for path in sorted(conf.glob("*.yaml"))  # root configs: roar_schema@roar
                     if (keys := restated_defaults(conf, "", path))})
    assert not restated, f"keys that restate their schema's or base file's default: {restated}"


def test_the_restated_default_check_sees_one(tmp_path):
    (tmp_path / "perturbation").mkdir()
    path = tmp_path / "perturbation" / "road.yaml"
    path.write_text("defaults:\n  - road_schema\n\n_target_: heatmapbench.perturbation.Road\nnoise: 0.01\ntol: 1.0e-3\n")
    assert restated_defaults(tmp_path, "perturbation", path) == ["noise"]
    (tmp_path / "callbacks").mkdir()
    path = tmp_path / "callbacks" / "aopc.yaml"
    path.write_text("defaults:\n  - aopc_schema@aopc\n\naopc:\n  gallery_size: 6\n  figures: every\n")
    assert restated_defaults(tmp_path, "callbacks", path) == ["aopc.gallery_size"]
    (tmp_path / "model").mkdir()
    path = tmp_path / "model" / "small_cnn.yaml"  # the file as it was before the model schemas
    path.write_text("defaults:\n  - classifier_schema\n\n_target_: heatmapbench.models.ClassifierModule\n"
                    "num_classes: 10\nnet:\n  _target_: heatmapbench.models.SmallCNN\n"
                    "optimizer:\n  _target_: torch.optim.Adam\n  lr: 0.001\nscheduler: null\n")
    assert restated_defaults(tmp_path, "model", path) == ["scheduler"]
    path = tmp_path / "model" / "_imagenet.yaml"
    path.write_text("defaults:\n  - finetune_classifier_schema\n\nnum_classes: 1000\nfreeze_backbone_epochs: 0\n"
                    "backbone_lr_factor: 0.1\nbackbone_bn: train\n")
    assert restated_defaults(tmp_path, "model", path) == ["backbone_bn", "freeze_backbone_epochs"]
    # the net blocks as they were before the builders' schemas (model/net): found by their builder
    path = tmp_path / "model" / "small_cnn.yaml"
    path.write_text("defaults:\n  - classifier_schema\n\nnum_classes: 10\nnet:\n  _target_: heatmapbench.models.SmallCNN\n"
                    "  in_channels: 1\n  num_classes: ${model.num_classes}\n  dropout: 0.5\n")
    assert restated_defaults(tmp_path, "model", path) == ["net.in_channels"]
    (tmp_path / "model" / "_torchvision.yaml").write_text(
        "defaults:\n  - _imagenet\n\nnet:\n  weights: IMAGENET1K_V1\n  weights_path: null\n  allow_download: true\n")
    for name in ("vgg16", "resnet50"):
        (tmp_path / "model" / f"{name}.yaml").write_text(
            f"defaults:\n  - _torchvision\n\nnet:\n  _target_: heatmapbench.models.zoo.{name}\n  weights_path: null\n")
    assert restated_defaults(tmp_path, "model", tmp_path / "model" / "_torchvision.yaml") == [
        "net.weights", "net.weights_path"]
    assert restated_defaults(tmp_path, "model", tmp_path / "model" / "vgg16.yaml") == ["net.weights_path"]
    (tmp_path / "model" / "mine.yaml").write_text(  # a user's own net reads the base file: no schema to compare
        "defaults:\n  - _torchvision\n\nnet:\n  _target_: my.module.Net\n")
    assert restated_defaults(tmp_path, "model", tmp_path / "model" / "_torchvision.yaml") == []
    path = tmp_path / "roar.yaml"
    path.write_text("defaults:\n  - roar_schema@roar\n  - _self_\n  - data: fashion_mnist\n\nseed: 0\n"
                    "roar:\n  explainers: [random]\n  seeds: [0, 1]\n  fill: road\n")
    assert restated_defaults(tmp_path, "", path) == ["roar.seeds"]


@pytest.mark.parametrize("name", available("perturbation"))
def test_perturbation_and_callback_schemas_are_their_signatures(train_cfg, name):
    import inspect

    from heatmapbench.callbacks import AOPCCallback
    from heatmapbench.perturbation.presets import PERTURBATIONS

    cfg = train_cfg(f"perturbation={name}", "callbacks.aopc.every_n_epochs=2")
    params = {k: p.default for k, p in inspect.signature(PERTURBATIONS[name].func).parameters.items()}
    assert OmegaConf.to_container(cfg.perturbation) == {"_target_": cfg.perturbation._target_, **params}
    aopc = inspect.signature(AOPCCallback).parameters
    assert set(cfg.callbacks.aopc) - {"_target_"} == set(aopc)
    assert cfg.callbacks.aopc.every_n_epochs == 2 and cfg.callbacks.aopc.gallery_size == aopc["gallery_size"].default
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        train_cfg(f"perturbation={name}", "perturbation.nosie=0.1")  # a typo


@pytest.mark.parametrize("name", MODELS)
def test_model_schemas_are_classifier_modules_signature(train_cfg, name):
    """Every model option is typed by a schema read from ``ClassifierModule``'s signature: the pretrained nets
    (whose head is named) with the fine-tuning arguments, the others without (ClassifierModule refuses them there).
    A key the YAML does not set keeps the signature's default; a typo fails at composition."""
    import inspect

    from heatmapbench.models import ClassifierModule
    from heatmapbench.models.classifier import FINE_TUNING

    cfg = train_cfg(f"model={name}")
    params = inspect.signature(ClassifierModule).parameters
    pretrained = name not in ("small_cnn", "small_vit", "vgg_small", "checkpoint")
    schema = "finetune_classifier_schema" if pretrained else "classifier_schema"
    assert OmegaConf.get_type(cfg.model) is SCHEMAS["model"][schema]
    assert set(cfg.model) - {"_target_"} == set(params) - (set() if pretrained else set(FINE_TUNING))
    assert cfg.model._target_ == "heatmapbench.models.ClassifierModule"
    for key in FINE_TUNING if pretrained else ():
        assert cfg.model[key] == params[key].default
    if name != "vgg_small":  # the one with a scheduler
        assert cfg.model.scheduler is params["scheduler"].default
    with pytest.raises((ConfigCompositionException, ConfigKeyError), match="freeze_backbone_epoch"):
        train_cfg(f"model={name}", "model.freeze_backbone_epoch=1")  # a typo
    if pretrained:
        with pytest.raises((ConfigCompositionException, ValidationError), match="freeze_backbone_epochs"):
            train_cfg(f"model={name}", "model.freeze_backbone_epochs=one")


@pytest.mark.parametrize("name", MODELS)
def test_model_nets_are_their_builders_signature(train_cfg, name):
    """Every model option's ``model.net`` is typed by its builder's schema (``model/net``), read from the builder's
    signature: each argument but those it leaves out (:data:`~heatmapbench.app.schema.NET_BUILDERS`), with the
    signature's default where no model file sets it; a typo fails at composition."""
    import inspect

    from hydra.utils import get_object

    from heatmapbench.app.schema import NET_BUILDERS

    cfg = train_cfg(f"model={name}")
    schema = OmegaConf.get_type(cfg.model.net)
    (builder, left_out), = [NET_BUILDERS[n] for n, s in SCHEMAS["model/net"].items() if s is schema]
    assert builder is get_object(cfg.model.net._target_)
    params = inspect.signature(builder).parameters
    assert set(cfg.model.net) - {"_target_"} == set(params) - set(left_out)
    conf = conf_dir()
    set_here = {key for file in _bases(conf, "model", conf / "model" / f"{name}.yaml")
                for key in (yaml.safe_load(file.read_text()) or {}).get("net", {})}
    for key in set(cfg.model.net) - set_here - {"_target_"}:
        default = params[key].default
        assert (OmegaConf.is_missing(cfg.model.net, key) if default is inspect.Parameter.empty
                else cfg.model.net[key] == default), key
    with pytest.raises(ConfigCompositionException, match="allow_downlod"):
        train_cfg(f"model={name}", "model.net.allow_downlod=true")  # a typo
    key = next(k for k in ("allow_download", "pretrained", "in_channels", "adapt_head") if k in cfg.model.net)
    with pytest.raises(ConfigCompositionException, match=key):
        train_cfg(f"model={name}", f"model.net.{key}=[1]")  # a value of the wrong type
    if left_out:  # an argument the schema leaves out goes in with +, as before
        assert train_cfg(f"model={name}", f"+model.net.{left_out[0]}=1").model.net[left_out[0]] == 1


def test_a_users_own_net_is_any_node(train_cfg, tmp_path):
    """A model config whose net names no schema (the user's own class) composes as before: ``model.net`` untyped,
    its keys the file's, another added with ``+``."""
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "mine.yaml").write_text(
        "defaults:\n  - classifier_schema\n\n_target_: heatmapbench.models.ClassifierModule\nnum_classes: 10\n"
        "net:\n  _target_: my.module.Net\n  depth: 3\noptimizer:\n  _target_: torch.optim.Adam\n  _partial_: true\n")
    cfg = train_cfg(f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "model=mine", "model.net.depth=4",
                    "+model.net.width=8")
    assert OmegaConf.get_type(cfg.model.net) is dict
    assert OmegaConf.to_container(cfg.model.net) == {"_target_": "my.module.Net", "depth": 4, "width": 8}


def test_roar_block_is_roar_settings_and_what_roar_yaml_sets(tmp_path, data_dir):
    """The composed ``roar`` node is ``RoarSettings``' defaults (the one source; ``conf/roar.yaml`` lists it as
    ``roar_schema@roar``) with the two keys roar.yaml sets: ``explainers`` (required in Python) and ``cache_dir``
    (rooted at ``paths.root_dir``). Overrides reach it, typed; a typo fails at composition, one added with ``+``
    in one line before any work."""
    from dataclasses import MISSING, fields

    from heatmapbench.app.schema import RoarSettings

    cfg = compose_config("roar", [], tmp_path, data_dir)
    assert OmegaConf.get_type(cfg.roar) is RoarSettings
    block = resolved_config(cfg)["roar"]
    declared = {f.name: f.default if f.default is not MISSING else f.default_factory()
                for f in fields(RoarSettings) if f.default is not MISSING or f.default_factory is not MISSING}
    set_by_yaml = {"explainers": ["sensitivity_l2", "guided_backprop", "lrp_epsilon_0.01"],
                   "cache_dir": f"{cfg.paths.root_dir}/outputs/roar/cache"}
    assert block == {**declared, **set_by_yaml} and set(block) == {f.name for f in fields(RoarSettings)}
    assert RoarSettings(**block).all_explainers == [*set_by_yaml["explainers"], "random"]

    cfg = compose_config("roar", ["roar.fractions=[1]", "roar.seeds=[0]"], tmp_path, data_dir)
    assert cfg.roar.fractions == [1.0] and isinstance(cfg.roar.fractions[0], float) and cfg.roar.seeds == [0]
    with pytest.raises((ConfigCompositionException, ConfigKeyError), match="fractoins"):
        compose_config("roar", ["roar.fractoins=[0.5]"], tmp_path, data_dir)
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_config("roar", ["roar.seeds=[one]"], tmp_path, data_dir)
    cfg = compose_config("roar", ["+roar.fractoins=[0.5]"], tmp_path, data_dir)
    with pytest.raises(ConfigError, match=r"^roar.fractoins is not a setting of roar: did you mean roar.fractions\?"):
        validate(cfg, groups=("roar",))
    with pytest.raises(ConfigError, match=r"^roar.seeds=\[0, 0\] is invalid"):
        validate(compose_config("roar", ["roar.seeds=[0,0]"], tmp_path, data_dir), groups=("roar",))
