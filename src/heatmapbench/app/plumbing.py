"""Shared plumbing of the Hydra entry points: clean errors for users, instantiation helpers."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import importlib.util
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from hydra.errors import HydraException, InstantiationException, MissingConfigException, OverrideParseException
from hydra.utils import instantiate
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from omegaconf import open_dict

from heatmapbench.app.schema import ConfigError, config_error, left_out_by, not_a_setting
from heatmapbench.data import DataError
from heatmapbench.errors import ArgumentError
from heatmapbench.models.errors import CheckpointError, ModelConfigError
from heatmapbench.models.zoo import MissingExtraError, WeightsNotFoundError
from heatmapbench.registry import conf_dir
from heatmapbench.app.store import StoreError, disk_full
from heatmapbench.app.tracking import LoggingFailedError, RunInterrupted, end_reason

#: Errors that are the user's input, not a bug: printed as one clear line, exit status 2.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataError, WeightsNotFoundError,
                                                 CheckpointError, MissingExtraError, ModelConfigError)


def user_errors_exit(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print a user error as ``error: ...`` and exit 2 instead of a traceback.

    SIGINT/SIGTERM (while a run is open) and Ctrl+C end the process with ``128 + signal``
    (130, 143) after one line, also from inside a Hydra multirun (the sweep stops there). A store
    that fails while finished results are logged is one line naming their folder, exit status 1.
    Other exceptions propagate: Hydra prints them and exits 1.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _composed()
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from err
        except (LoggingFailedError, StoreError) as err:  # the message says where the results are / what to do
            print(f"error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(1) from err
        except Exception as err:
            if not disk_full(err):
                raise
            print(f"error: the disk is full: {end_reason(err)}; free space and rerun (an open MLflow run was marked "
                  "FAILED where the store could still write)", file=sys.stderr, flush=True)
            raise SystemExit(1) from err
        except (RunInterrupted, KeyboardInterrupt) as err:
            code = err.exit_code if isinstance(err, RunInterrupted) else 128 + signal.SIGINT
            print(f"interrupted: {err or 'SIGINT received'}; exiting with status {code}", file=sys.stderr, flush=True)
            raise SystemExit(code) from err

    return wrapper


#: Hydra launchers that come from an extra: the plugin module and the extra that installs it.
LAUNCHERS = {
    "joblib": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
}


def check_launcher(argv: list[str]) -> None:
    """Exit 2 with one line naming the extra when ``hydra/launcher=<name>`` names a launcher whose plugin
    is not installed (Hydra itself would list the launchers it has and say nothing of the extra)."""
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+~") != "hydra/launcher" or value not in LAUNCHERS:
            continue
        module, package = LAUNCHERS[value]
        if importlib.util.find_spec(module) is None:
            print(f"error: hydra/launcher={value} needs {package}, which is not installed; install it with: "
                  "pip install 'heatmapbench[launchers]'", file=sys.stderr)
            raise SystemExit(2)


def null_groups(argv: list[str], conf: Path | None = None) -> list[str]:
    """``argv`` with ``<group>=null`` (``sanity=null``, ``explainer=null``) written as Hydra's ``~<group>``.

    Hydra refuses null as a config group's value on the command line ("Config group override must be a
    string or a list"), also where the root config's default is null and an experiment chose a config
    (``experiment=sanity_demo sanity=null``). Deleting the group's entry from the defaults list is what
    null means there: nothing of the group is composed, whatever selected it (a null default is deleted
    as well). A sweep over null and other choices (``-m sanity=null,mprt``) cannot be written that way:
    one line, exit 2.
    """
    conf = conf_dir() if conf is None else conf
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        group = bool(sep and key) and key[:1] not in ("+", "~", "-") and "@" not in key and (conf / key).is_dir()
        choices = [v.strip().lower() for v in value.split(",")]
        if group and choices == ["null"]:
            out.append(f"~{key}")
            continue
        if group and "null" in choices:
            print(f"error: {arg} is invalid: Hydra cannot sweep the config group {key} over null; sweep the other "
                  f"choices, and run the one without {key} as its own command ({key}=null)", file=sys.stderr)
            raise SystemExit(2)
        out.append(arg)
    return out


#: Hydra's documented switch that makes it raise what fails, instead of printing it over several lines.
FULL_ERROR = "HYDRA_FULL_ERROR"
#: While a command's config is composed: the user's own value of :data:`FULL_ERROR` (None: unset).
_composing: dict[str, str | None] = {}


def _composed() -> None:
    """The config is composed (the command's function runs): :data:`FULL_ERROR` back to the user's value,
    so Hydra reports a failure of the run itself as it always does."""
    if "user" in _composing:
        user = _composing.pop("user")
        if user is None:
            os.environ.pop(FULL_ERROR, None)
        else:
            os.environ[FULL_ERROR] = user


def composition_error(err: BaseException) -> str:
    """One line for a config that Hydra could not compose from the command line: a key that is not a
    setting (with the nearest one), a value of the wrong type, an unknown config choice (with the choices),
    an override that does not parse."""
    if isinstance(err, MissingConfigException) and err.options and err.missing_cfg_file:
        group, _, name = str(err.missing_cfg_file).rpartition("/")
        choices = [o for o in err.options if not o.startswith("_") and not o.endswith("_schema")]
        if not choices:  # model/net: the builders' schemas, which the model configs name
            return (f"{group}={name} is not a choice: {group} holds only the schemas that the "
                    f"{group.partition('/')[0]} configs name")
        near = difflib.get_close_matches(name, choices, n=1)
        return (f"{group}={name} is not a choice of {group}: {f'did you mean {group}={near[0]}? ' if near else ''}"
                f"choose from {', '.join(choices)}")
    if isinstance(err, OverrideParseException) and err.override:
        what, *see = [line.strip().rstrip(".") for line in str(err).splitlines() if line.strip()]
        return f"{err.override} does not parse ({what}){''.join(f'; {line[0].lower()}{line[1:]}' for line in see)}"
    cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else None
    if isinstance(err, OmegaConfBaseException):
        cause = err
    if (isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and cause.full_key
            and dataclasses.is_dataclass(cause.object_type)):
        builder, left_out = left_out_by(cause.object_type)
        if str(cause.full_key).rpartition(".")[2] in left_out:
            return (f"{cause.full_key} is an argument of {builder} that the config does not list: "
                    f"add it with +{cause.full_key}=...")
        return not_a_setting(str(cause.full_key), [f.name for f in dataclasses.fields(cause.object_type)])
    parts: list[str] = []
    for exc in (err, cause) if cause is not err else (err,):
        if exc is None:
            continue
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        lines = [line for line in lines if not line.startswith(("full_key:", "object_type=", "reference_type="))]
        options = [line.strip() for line in str(exc).splitlines() if line.startswith("\t")]
        text = "; ".join(line.rstrip(".:") for line in lines if line not in options)
        if options:
            text += ": " + ", ".join(options)
        if isinstance(exc, OmegaConfBaseException) and getattr(exc, "full_key", None):
            text = f"{exc.full_key}: {text}"
        parts.append(text)
    return "; ".join(p for p in parts if p) or type(err).__name__


def launchers_checked(main: Callable[..., Any]) -> Callable[..., Any]:
    """Before Hydra composes the config of a command's ``main``: :func:`check_launcher` on the command
    line, and ``<group>=null`` rewritten by :func:`null_groups`. A config that cannot be composed from the
    command line (a key that is not a setting, a value of the wrong type, an unknown choice) is one
    ``error:`` line and exit status 2 (:func:`composition_error`), as for the settings checked after
    composition, instead of Hydra's message over several lines and status 1.

    Hydra only raises what it would print when :data:`FULL_ERROR` is 1: it is set while the config is
    composed, and given back its value as the command's function starts (:func:`user_errors_exit`), so a
    failure of the run is reported by Hydra as before. A sweep (``-m``) composes each job's config in its
    launcher, where Hydra keeps reporting; so does a user who set :data:`FULL_ERROR` to 1.
    """

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        check_launcher(sys.argv[1:])
        sys.argv[1:] = null_groups(sys.argv[1:])
        if not {"-m", "--multirun"} & set(sys.argv[1:]) and os.environ.get(FULL_ERROR) != "1":
            _composing["user"] = os.environ.get(FULL_ERROR)
            os.environ[FULL_ERROR] = "1"
        try:
            return main(*args, **kwargs)
        except (HydraException, OmegaConfBaseException) as err:
            if "user" not in _composing:  # not while composing: as Hydra (or the user) would have it
                raise
            print(f"error: {composition_error(err)}", file=sys.stderr)
            raise SystemExit(2) from err
        finally:
            _composed()

    return wrapper


def instantiate_node(cfg: DictConfig, key: str, **kwargs: Any) -> Any:
    """Instantiate a config node whose class checks its arguments: a ``ValueError`` of the class
    (``epsilon=-1 is invalid: ...``) becomes one line naming the key (``explainer.epsilon=-1 ...``), and an
    :class:`~heatmapbench.errors.ArgumentError` names the keys of the node that raised it
    (``pass model.net.weights_path=...``)."""
    try:
        return instantiate(cfg, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, ArgumentError):  # named as the keys of the node that failed (model.net)
            raise as_config_keys(cause, str(err).partition("full_key: ")[2].strip() or key) from None
        if isinstance(cause, USER_ERRORS):
            raise cause from None
        if isinstance(cause, (ValueError, TypeError)):
            raise config_error(key, cause) from None
        raise


#: Library arguments that the configs set from another key, as the key a user sets (``<node>.<argument>``:
#: key); the others are named as ``<node>.<argument>`` (``model.net.ckpt_path``). A key written with its
#: value is used as it is.
ARGUMENT_KEYS = {
    "model.net.num_classes": "model.num_classes",  # every model config: net.num_classes: ${..num_classes}
    "model.net.adapt_head": "heatmapbench-train head=adapt",  # train's head policy sets it (adapt_num_classes)
}


#: ``from_checkpoint(cfg.ckpt_path, <the model's net>)`` in evaluate and roar: its arguments as the root key
#: ``ckpt_path`` and the model config that builds the net.
CHECKPOINT_KEYS = {"ckpt_path": "ckpt_path", "net": "model"}


def as_config_keys(err: ArgumentError, node: str, **keys: str) -> ArgumentError:
    """``err`` (a library's error naming its arguments) naming the keys of config ``node`` instead
    (``pass download=True``: ``pass data.download=true``); ``keys``: an argument the command passed
    from another key (``ckpt_path="ckpt_path"``), else :data:`ARGUMENT_KEYS` or ``<node>.<argument>``."""
    known = {name: ARGUMENT_KEYS[f"{node}.{name}"] for name in err.arguments if f"{node}.{name}" in ARGUMENT_KEYS}
    return err.in_group(node, {**known, **keys})


@contextlib.contextmanager
def config_keys(node: str, **keys: str) -> Iterator[None]:
    """Where a command passes config ``node``'s values to the library: an error naming its arguments
    is raised naming the node's keys (:func:`as_config_keys`)."""
    try:
        yield
    except ArgumentError as err:
        raise as_config_keys(err, node, **keys) from None


def data_keys() -> contextlib.AbstractContextManager[None]:
    """Where a command builds or reads its data: a data module's error naming its arguments
    (``pass download=True``) is raised naming the ``data`` config keys (``data.download=true``)."""
    return config_keys("data")


def instantiate_data(cfg: DictConfig) -> Any:
    """Instantiate the ``data`` node; a data error raised while building it reaches the user as one line
    naming the ``data.`` keys (:func:`instantiate_node`, :func:`data_keys`), not as a traceback after the
    error's own text."""
    with data_keys():
        return instantiate_node(cfg, "data")


def instantiate_model(cfg: DictConfig) -> Any:
    """Instantiate the ``model`` node as :func:`instantiate_node` does (a weights file that does not fit,
    a checkpoint of another network: one line); a ``_target_`` that names nothing
    (``model.optimizer._target_=torch.optim.Adamm``) is one line too, not Hydra's traceback."""
    try:
        return instantiate_node(cfg, "model")
    except InstantiationException as err:
        text = str(err)
        if not text.startswith("Error locating target '"):
            raise
        target = text.split("'")[1]
        key = text.partition("full_key: ")[2].strip() or "model"
        raise ConfigError(f"{key}._target_={target!r} is invalid: no such class or function; name one that "
                          "exists (e.g. torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)") from None


def instantiate_callbacks(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` node of the ``callbacks`` group (``null`` entries are off)."""
    if not cfg:
        return []
    return [instantiate(node) for node in cfg.values() if node is not None and "_target_" in node]


def selected_explainer(cfg: DictConfig) -> tuple[str, DictConfig] | None:
    """The explainer chosen with ``explainer=<name>`` (one per sweep job): its name and config node."""
    node = cfg.get("explainer")
    if node is None:
        return None
    from hydra.core.hydra_config import HydraConfig

    name = HydraConfig.get().runtime.choices.get("explainer") if HydraConfig.initialized() else None
    return str(name or node.get("_target_", "explainer").rsplit(".", 1)[-1]), node


def apply_explainer_shortcut(cfg: DictConfig) -> None:
    """``explainer=<name>`` replaces ``evaluation.explainers`` with ``[<name>]``."""
    chosen = selected_explainer(cfg)
    if chosen is not None:
        with open_dict(cfg):
            cfg.evaluation.explainers = [chosen[0]]
