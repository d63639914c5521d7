"""The configuration reference page, generated from ``conf/`` and the typed schemas.

Every option of every config group is composed by Hydra as the commands compose it; each key is
listed with its default and its meaning. The meaning is read, in this order, from the comment
above the key in the option's YAML file (or in a shared base it extends), from the numpy-style
``Parameters`` section of the class its ``_target_`` names, and from the schema dataclass
(``heatmapbench.app.schema``: its docstring or the comment above the field). Nothing is written twice:
a wrong or missing meaning is fixed where it lives, and this page follows.

    python scripts/config_reference.py > config.md     # the page on its own

``make docs`` runs it through ``scripts/docs_hooks.py``.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from dataclasses import is_dataclass
from functools import cache
from pathlib import Path
from typing import Any, Iterator

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "src" / "heatmapbench" / "conf"
#: Which command composes a group (the first root config whose defaults list names it).
ROOTS = ("train", "evaluate", "report", "roar")
#: Groups described in prose, not composed key by key.
WHOLE_FILES = {"experiment", "debug"}
SKIP_GROUPS = {"hydra"}
TRAINER_NOTE = ("Every other `pytorch_lightning.Trainer` argument is accepted too (`trainer.<argument>=...`) "
                "with Lightning's own default: the schema is read from the Trainer's signature.")


# -- comments and docstrings ------------------------------------------------------------------------

def yaml_comments(path: Path) -> tuple[str, dict[str, str]]:
    """``(header, {dotted key: comment})`` of a YAML file: the comment block above each key
    (or after its value on the same line); the header is the file's leading comment block."""
    header: list[str] = []
    comments: dict[str, str] = {}
    pending: list[str] = []
    stack: list[tuple[int, str]] = []
    started = False
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            text = stripped.lstrip("#").strip()
            if text.startswith("@package"):
                continue
            (pending if started else header).append(text)
            continue
        if not stripped:
            if not started and header:
                started = True  # a blank line ends the header; later comments belong to keys
            pending = [] if started else pending
            continue
        started = True
        match = re.match(r"^(\s*)([A-Za-z_][\w.\-]*)\s*:(.*)$", line)
        if not match or stripped.startswith("- "):
            pending = []
            continue
        indent, key, rest = len(match.group(1)), match.group(2), match.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        dotted = ".".join(k for _, k in stack)
        inline = rest.split(" #", 1)[1].strip() if " #" in rest else ""
        text = " ".join(pending + ([inline] if inline else [])).strip()
        if text and dotted != "defaults":
            comments[dotted] = text
        pending = []
    return " ".join(header).strip(), comments


def numpy_parameters(doc: str | None) -> dict[str, str]:
    """``{name: description}`` from the ``Parameters`` section of a numpy-style docstring."""
    if not doc:
        return {}
    lines = inspect.cleandoc(doc).splitlines()
    out: dict[str, str] = {}
    try:
        start = next(i for i, line in enumerate(lines[:-1]) if line.strip() == "Parameters"
                     and set(lines[i + 1].strip()) == {"-"})
    except StopIteration:
        return {}
    names: list[str] = []
    for line in lines[start + 2:]:
        if line and not line.startswith(" "):
            if set(line.strip()) == {"-"}:  # the next section's underline
                break
            if names and not out.get(names[0]) and line.strip() and line == line.strip() and \
                    not re.match(r"^[\w*, ]+(\s*:.*)?$", line):
                break
            if not re.match(r"^[\w*, ]+(\s*:.*)?$", line):
                break
            names = [n.strip().lstrip("*") for n in line.split(":")[0].split(",")]
            for n in names:
                out.setdefault(n, "")
        elif line.strip() and names:
            for n in names:
                out[n] = (out[n] + " " + line.strip()).strip()
        elif not line.strip() and names:
            continue
    return {k: v for k, v in out.items() if v}


def dataclass_comments(cls: type) -> dict[str, str]:
    """``{field: comment}`` from the comment lines directly above each field of a dataclass."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    pending: list[str] = []
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        match = re.match(r"^\s+(\w+)\s*:\s*[^=]+(=.*)?$", line)
        if match and pending:
            out[match.group(1)] = " ".join(pending)
        pending = []
    return out


def google_args(doc: str | None) -> dict[str, str]:
    """``{name: description}`` from the ``Args:`` section of a Google-style docstring (Lightning's)."""
    if not doc or "Args:" not in doc:
        return {}
    out: dict[str, str] = {}
    name = None
    body = inspect.cleandoc(doc).split("Args:", 1)[1].splitlines()
    indent = None
    for line in body[1:] if body and not body[0].strip() else body:
        if not line.strip():
            continue
        width = len(line) - len(line.lstrip())
        if indent is None:
            indent = width
        if width < indent:
            break
        match = re.match(r"^(\w+)(\s*\(.*?\))?:\s*(.*)$", line.strip())
        if width == indent and match:
            name = match.group(1)
            out[name] = match.group(3)
        elif name:
            out[name] = (out[name] + " " + line.strip()).strip()
    return {k: v for k, v in out.items() if v}


def markdown(text: str) -> str:
    """reStructuredText roles and literals of a docstring as Markdown."""
    text = re.sub(r":(?:class|func|mod|meth|attr|data|obj):`~?([^`]+)`", lambda m: f"`{m.group(1).split('.')[-1]}`"
                  if "~" in m.group(0) else f"`{m.group(1)}`", text)
    return text.replace("``", "`")


@cache
def target_parameters(target: str) -> dict[str, str]:
    """The documented parameters of a ``_target_`` (a class: its docstring and ``__init__``'s)."""
    module, _, name = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return {}
    # a class of ours: also its bases' (ImageFolderDataModule takes batch_size from ImageDataModule)
    owners = [k for k in obj.__mro__ if k.__module__.startswith("heatmapbench.")] if inspect.isclass(obj) else []
    docs = [d for k in owners or [obj]
            for d in [inspect.getdoc(k)] + ([inspect.getdoc(k.__init__)] if inspect.isclass(k) else [])]
    params: dict[str, str] = {}
    for doc in reversed(docs):
        # "parameters as :func:`alexnet`", "; as :func:`alexnet`" (the torchvision builders): that function's
        # parameters, then this one's own
        for other in re.findall(r"(?:[Pp]arameters\s+|;\s+)as\s+:func:`~?([\w.]+)`", doc or ""):
            params.update(target_parameters(other if "." in other else f"{module}.{other}"))
        params.update(google_args(doc))
        params.update(numpy_parameters(doc))
    if not target.startswith("heatmapbench."):  # another library's docstring: its first sentence
        params = {k: first_sentence(v) for k, v in params.items()}
    return params


def first_sentence(text: str) -> str:
    text = re.sub(r"\s*\(default: [^)]*\)", "", text)
    sentence = re.split(r"(?<=[.:])\s+(?=[A-Z`(])|\.\. |Example", text, maxsplit=1)[0].strip()
    return sentence[0].upper() + sentence[1:] if sentence else sentence


@cache
def schema_meanings() -> dict[str, dict[str, str]]:
    """``{schema name: {field: meaning}}`` for every schema registered by ``heatmapbench.app.schema``."""
    from heatmapbench.app.schema import SCHEMAS

    out: dict[str, dict[str, str]] = {}
    for schemas in SCHEMAS.values():
        for name, cls in schemas.items():
            meanings: dict[str, str] = {}
            for klass in reversed(cls.__mro__):
                if is_dataclass(klass):
                    meanings.update(dataclass_comments(klass))
                    meanings.update(numpy_parameters(klass.__doc__))
            out[name] = meanings
    return out


# -- the files of a group ---------------------------------------------------------------------------

def defaults_of(path: Path) -> list[str]:
    data = yaml.safe_load(path.read_text()) or {}
    return [d for d in data.get("defaults", []) if isinstance(d, str) and d != "_self_"]


def chain(group: str, option: str) -> tuple[list[Path], list[str]]:
    """The option's file and the shared bases it extends (nearest first), and its schemas."""
    files, schemas = [], []
    todo = [option]
    while todo:
        name = todo.pop(0).split("@")[0]  # aopc_schema@aopc: the schema, placed under aopc
        path = CONF / group / f"{name}.yaml"
        if not path.is_file():
            schemas.append(name)
            continue
        files.append(path)
        todo.extend(defaults_of(path))
    return files, schemas


def subgroup_schemas(group: str, files: list[Path]) -> list[tuple[str, str]]:
    """``(package, schema)`` of the subgroups' schemas the files list (``- net: vgg16_schema`` in a model config)."""
    from heatmapbench.app.schema import SCHEMAS

    return [(sub, name) for path in files
            for entry in (yaml.safe_load(path.read_text()) or {}).get("defaults", []) if isinstance(entry, dict)
            for sub, name in entry.items() if name in SCHEMAS.get(f"{group}/{sub}", {})]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


def flatten(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict) and node and "_target_" not in node or isinstance(node, dict) and prefix == "":
        for key, value in node.items():
            yield from flatten(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(node, dict) and node:
        for key, value in node.items():
            yield from flatten(value, f"{prefix}.{key}")
    else:
        yield prefix, node


def show(value: Any) -> str:
    if value == "???":
        return "required (`???`)"
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    text = text.removesuffix("\n...").removesuffix("...").strip()
    return f"`{text}`".replace("|", "\\|")


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def meaning(key: str, value_path: list[str], comments: dict[str, str], node: dict, schema: dict[str, str]) -> str:
    """The key's meaning: its YAML comment, else its ``_target_``'s parameter, else the schema's."""
    if key in comments:
        return comments[key]
    parts = key.split(".")
    for depth in range(len(parts) - 1, -1, -1):  # the nearest _target_ above the key documents it
        parent: Any = node
        for p in parts[:depth]:
            parent = parent.get(p, {}) if isinstance(parent, dict) else {}
        target = parent.get("_target_") if isinstance(parent, dict) else None
        if target:
            text = target_parameters(str(target)).get(parts[depth])
            if text and depth == len(parts) - 1:
                return text
            break
    if len(parts) == 1 and parts[0] in schema:
        return schema[parts[0]]
    if key == "_target_":
        return "The class or function this config builds."
    return ""


def compose(group: str, option: str) -> dict:
    from hydra import compose as hydra_compose
    from omegaconf import OmegaConf

    errors = []
    for root in ROOTS:
        if group not in group_roots().get(root, ()):
            continue
        try:
            cfg = hydra_compose(config_name=root, overrides=[f"{group}={option}"])
        except Exception as err:  # a root that cannot take this option: try the next
            errors.append(f"{root}: {err}")
            continue
        return OmegaConf.to_container(cfg[group], resolve=False)
    raise RuntimeError(f"{group}={option} composes with no root config: {errors}")


@cache
def group_roots() -> dict[str, tuple[str, ...]]:
    out = {}
    for root in ROOTS:
        names = []
        for entry in (yaml.safe_load((CONF / f"{root}.yaml").read_text()) or {}).get("defaults", []):
            if isinstance(entry, dict):
                names.extend(k.split("@")[0].replace("override /", "") for k in entry)
        out[root] = tuple(names)
    return out


def used_by(group: str) -> str:
    return ", ".join(f"`heatmapbench-{r}`" for r in ROOTS if group in group_roots()[r])


# -- the page ---------------------------------------------------------------------------------------

def option_section(group: str, option: str) -> list[str]:
    files, schemas = chain(group, option)
    header, comments = yaml_comments(files[0])
    merged: dict[str, str] = {}
    for path in reversed(files):  # nearest file wins
        merged.update(yaml_comments(path)[1])
    schema: dict[str, str] = {}
    for name in schemas:
        schema.update(schema_meanings().get(name, {}))
    node = compose(group, option)
    own = set(yaml_comments(files[0])[1]) | set(_keys(yaml.safe_load(files[0].read_text()) or {}))
    lines = [f"### `{group}={option}`", ""]
    if header:
        lines += [header, ""]
    if len(files) > 1:
        bases = ", ".join(f"`{p.relative_to(CONF)}`" for p in files[1:])
        lines += [f"Extends {bases}.", ""]
    if schemas:
        lines += [f"Typed by the schema `{'`, `'.join(schemas)}` (`heatmapbench.app.schema`): a mistyped key "
                  "or a value out of range fails before any work starts.", ""]
    for sub, name in subgroup_schemas(group, files):
        target = node.get(sub, {}).get("_target_", "")
        lines += [f"`{group}.{sub}` is typed by the schema `{name}`, read from the signature of `{target}`: its "
                  "defaults are the builder's, and a mistyped key fails while Hydra composes.", ""]
    inherited: dict[str, Any] = {}
    for path in files[1:]:
        if path.parent.name == group and not path.stem.startswith("_"):
            inherited.update(dict(flatten(compose(group, path.stem))))
            lines += [f"Every key of [`{group}={path.stem}`](#{group}{path.stem}) with its default, and:", ""]
    rows = []
    for key, value in flatten(node):
        if group == "trainer" and key not in own and key not in {"_target_"}:
            continue  # Lightning's own defaults: see TRAINER_NOTE
        if key in inherited and inherited[key] == value:
            continue
        text = markdown(meaning(key, [], merged, node, schema))
        rows.append(f"| `{group}.{key}` | {show(value)} | {cell(text)} |")
    if rows:
        lines += ["| key | default | meaning |", "|---|---|---|", *rows, ""]
    elif not inherited:
        lines += ["No keys: the group is empty.", ""]
    if group == "trainer":
        lines += [TRAINER_NOTE, ""]
    return lines


def _keys(node: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "defaults":
                continue
            dotted = f"{prefix}.{key}" if prefix else str(key)
            yield dotted
            yield from _keys(value, dotted)


def root_section(root: str) -> list[str]:
    """The command's own keys; a block typed by a schema (``roar_schema@roar``) as composed, with its defaults."""
    from hydra import compose as hydra_compose
    from omegaconf import OmegaConf

    path = CONF / f"{root}.yaml"
    header, comments = yaml_comments(path)
    data = yaml.safe_load(path.read_text()) or {}
    typed = {entry.partition("@")[2]: entry.partition("@")[0] for entry in defaults_of(path) if "@" in entry}
    composed = OmegaConf.to_container(hydra_compose(config_name=root), resolve=False) if typed else {}
    lines = [f"### `heatmapbench-{root}`", "", header, "",
             "| key | default | meaning |", "|---|---|---|"]
    for key in [*data, *(k for k in typed if k not in data)]:
        value = composed[key] if key in typed else data[key]
        if key in ("defaults",) or isinstance(value, dict) and key in group_roots()[root]:
            continue
        if isinstance(value, dict) and value:  # a block of the command's own (e.g. roar:): key by key
            schema = schema_meanings().get(typed.get(key, ""), {})
            for sub, inner in flatten(value, key):
                text = comments.get(sub) or schema.get(sub.removeprefix(f"{key}."), "")
                lines.append(f"| `{sub}` | {show(inner)} | {cell(markdown(text))} |")
            continue
        lines.append(f"| `{key}` | {show(value)} | {cell(comments.get(key, ''))} |")
    groups = [g for g in group_roots()[root] if g not in SKIP_GROUPS]
    for key, name in typed.items():
        lines += ["", f"`{key}` is typed by the schema `{name}` (`heatmapbench.app.schema`): a mistyped key or a value "
                  "out of range fails before any work starts."]
    lines += ["", "Groups: " + ", ".join(f"[`{g}`](#{g})" for g in groups) + ".", ""]
    return lines


def whole_file_section(group: str) -> list[str]:
    lines = []
    for option in options(group):
        path = CONF / group / f"{option}.yaml"
        header, _ = yaml_comments(path)
        body = "\n".join(line for line in path.read_text().splitlines()
                         if not line.strip().startswith("#") and line.strip())
        lines += [f"### `{group}={option}`", "", header, "",
                  f'??? note "conf/{group}/{option}.yaml"', "", "    ```yaml",
                  *(f"    {line}" for line in body.splitlines()), "    ```", ""]
    return lines


GROUP_INTRO = {
    "data": "The images: training, validation and the fixed evaluation subset. Every data module exposes its "
            "normalisation (`mean`, `std`) and pixel `value_range`, so perturbations are drawn in pixel space.",
    "model": "The classifier, wrapped in `ClassifierModule` (optimizer and fine-tuning options). "
             "Pretrained weights are read from disk; nothing is downloaded unless `model.net.allow_download=true`.",
    "trainer": "The `pytorch_lightning.Trainer`.",
    "logger": "The MLflow store every run is logged to.",
    "callbacks": "Lightning callbacks of `heatmapbench-train`; `callbacks.aopc` scores AOPC during training.",
    "evaluation": "What is scored and how: the schema `EvaluationSettings` is the one source of these defaults "
                  "for the commands and the Python API.",
    "perturbation": "How a removed region is filled.",
    "explainer": "Heatmap methods. `explainer=<name>` scores one explainer per job (it replaces "
                 "`evaluation.explainers`, and its parameters override as `explainer.<key>=...`); "
                 "`evaluation.explainers=[a,b]` names several.",
    "paths": "Where data, outputs and the MLflow store go.",
    "experiment": "Whole recipes (`experiment=<name>`): each file pins a set-up and overrides only what differs.",
    "debug": "Shrink a run to check that it works end to end.",
    "sanity": "Sanity checks beside an evaluation: `sanity=mprt` runs the model-parameter randomisation test "
              "(Adebayo et al., NeurIPS 2018) on every evaluated explainer.",
}


def page() -> str:
    from hydra import initialize_config_dir

    from heatmapbench.app.schema import register_configs

    register_configs()

    lines = ["# Configuration", "",
             "Every option of every config group, with its default and its meaning. This page is generated "
             "by `scripts/config_reference.py` from the files in `src/heatmapbench/conf/` and the typed schemas "
             "in `heatmapbench.app.schema`, composed by Hydra as the commands compose them; an interpolation such as "
             "`${seed}` is shown as written. Override any key on the command line (`evaluation.steps=50`), "
             "pick an option of a group with `group=option` (`perturbation=blur`), and print the composed "
             "config of a command with `--cfg job`.", "",
             "Each default has one source: a typed schema (its dataclass default; a mistyped key or a value out "
             "of range fails before any data is read or any run is created) or the YAML file, never both; the "
             "YAML files set only what differs. Files named `_*.yaml` are shared bases that options extend, not "
             "options of their own. A config folder of your own joins the search path with "
             "`hydra.searchpath=[file:///path/to/myconf]`.", "",
             "## Commands", ""]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for root in ROOTS:
            lines += root_section(root)
        for group in sorted(p.name for p in CONF.iterdir() if p.is_dir()):
            if group in SKIP_GROUPS:
                continue
            lines += [f"## {group}", "", GROUP_INTRO.get(group, ""), "",
                      f"Used by {used_by(group) or 'every command through `experiment`'}. "
                      f"Options: {', '.join(f'`{o}`' for o in options(group))}.", ""]
            if group in WHOLE_FILES:
                lines += whole_file_section(group)
                continue
            for option in options(group):
                lines += option_section(group, option)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(page())
