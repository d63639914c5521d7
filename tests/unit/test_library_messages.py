"""The library speaks of its own arguments, never of the commands' config keys or command lines.

Every string literal of the library (messages, warnings, docstrings; everything under the package
but ``app/`` and the deprecation shims) is scanned for a Hydra override (``<group>.<key>=``, a
``heatmapbench-<command> key=value`` line) and for a key the configs define (``model.net.ckpt_path``,
``data.eval_subset_size``). The commands name the keys themselves (:mod:`heatmapbench.errors`).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from heatmapbench.registry import conf_dir
from tests.helpers import PACKAGE, is_shim

#: Docstrings (only docstrings: never a message) that document how the configs or the commands use a
#: library object, and the registry's, whose subject is the user's YAML on Hydra's search path:
#: (module, text its docstrings may contain).
ALLOWED = {
    ("errors.py", "data.download"),  # the module that maps arguments to keys shows one of each
    ("errors.py", "data.train_path"),
    ("errors.py", "model.net"),
    ("evaluation/settings.py", "evaluation.steps"),  # module docstring: how the commands name the group
    ("explain/presets.py", "evaluation.explainers"),  # module docstring: the YAML face of the presets
    ("models/hf_models.py", "model.net.path"),  # module docstring: the command line that builds it
    ("models/timm_models.py", "model.net.name"),  # module docstring: the command line that builds it
    ("models/timm_models.py", "heatmapbench-train head="),  # module docstring: how train fine-tunes it
    ("models/zoo.py", "model.net.net"),  # from_checkpoint's docstring: how conf/model/checkpoint.yaml wraps it
    ("models/zoo.py", "heatmapbench-train head="),
    ("registry.py", "hydra.searchpath"),  # user YAML is found on Hydra's search path: the registry's subject
    ("registry.py", "paths.root_dir"),  # project_root's docstring: the config key that defaults to it
}
#: Messages of the registry: a user's YAML explainer goes in a folder on Hydra's search path, whose key
#: is Hydra's own (not one of the package's configs).
ALLOWED_MESSAGES = {("registry.py", "hydra.searchpath")}

COMMAND_LINE = re.compile(r"heatmapbench-[a-z]+ \S+=")
DOTTED = re.compile(r"(?<![\w./])[a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)+")


def _groups() -> list[str]:
    return sorted([p.name for p in conf_dir().iterdir() if p.is_dir()] + ["roar"])


def _keys(node: object, prefix: str) -> set[str]:
    if isinstance(node, ListConfig) or not isinstance(node, (dict, DictConfig)):
        return set()
    found = set()
    for key in node.keys():
        if key != "defaults" and isinstance(key, str):
            found |= {f"{prefix}.{key}"} | _keys(node[key] if isinstance(node, dict) else node._get_node(key),
                                                 f"{prefix}.{key}")
    return found


def config_keys() -> set[str]:
    """Every ``<group>.<key>`` path the package's configs define: their YAML files and their schemas."""
    import heatmapbench.app.schema  # noqa: F401  (registers the schemas)
    from hydra.core.config_store import ConfigStore

    keys: set[str] = set()
    for group in _groups():
        for path in conf_dir().glob(f"{group}/*.yaml"):
            keys |= _keys(OmegaConf.to_container(OmegaConf.load(path)), group)
        keys |= _keys(OmegaConf.to_container(OmegaConf.load(conf_dir() / "roar.yaml")).get("roar", {}), "roar")

    def nodes(tree: dict):
        for value in tree.values():
            yield from nodes(value) if isinstance(value, dict) else [value]

    for node in nodes(ConfigStore.instance().repo):
        group = node.group or node.name.removesuffix("_schema.yaml")
        if group in _groups():  # a schema placed at <group>.<name> too (callbacks: aopc_schema@aopc)
            for prefix in (group, f"{group}.{node.name.removesuffix('_schema.yaml')}"):
                keys |= _keys(node.node, prefix)
        elif group.partition("/")[0] in _groups():  # a subgroup's schema, at its package (model/net: model.net)
            keys |= _keys(node.node, group.replace("/", "."))
    return keys


def config_names_in(source: str, keys: set[str]) -> list[tuple[int, str, bool]]:
    """``(line, text, in a docstring)`` of each config key or override in the string literals of ``source``
    (f-strings' literal parts included)."""
    override = re.compile(rf"\b(?:{'|'.join(_groups())})\.[a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*=")
    tree = ast.parse(source)
    documented = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree) if isinstance(node, documented) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
            hits = override.findall(text) + COMMAND_LINE.findall(text) + [m for m in DOTTED.findall(text) if m in keys]
            found += [(node.lineno, hit, id(node) in docstrings) for hit in sorted(set(hits))]
    return found


def library_sources() -> dict[str, str]:
    sources = {p.relative_to(PACKAGE).as_posix(): p.read_text() for p in PACKAGE.rglob("*.py")}
    return {name: s for name, s in sources.items() if not name.startswith("app/") and not is_shim(s)}


def _offending(name: str, source: str, keys: set[str]) -> list[str]:
    return [f"{name}:{line}: {hit}" for line, hit, doc in config_names_in(source, keys)
            if not any(name == module and text in hit for module, text in (ALLOWED if doc else ALLOWED_MESSAGES))]


def test_library_strings_name_no_config_key():
    keys = config_keys()
    assert {"model.net.ckpt_path", "data.eval_subset_size", "callbacks.aopc.subset_size", "roar.fill"} <= keys
    found = [hit for name, source in sorted(library_sources().items()) for hit in _offending(name, source, keys)]
    assert not found, "library strings that name config keys (name the argument; app/ maps it):\n  " + "\n  ".join(found)


def test_the_scan_finds_a_config_key_added_to_a_library_message():
    """Negative control: the messages this rule replaced, put back into a library module, are found."""
    keys = config_keys()
    name = "evaluation/core.py"
    source = library_sources()[name]
    assert not _offending(name, source, keys)
    for message, hit in [
        ('"no explainers configured: set evaluation.explainers=[...] or explainer=<name>"', "evaluation.explainers="),
        ('f"checkpoint: no file at {path} (model.net.ckpt_path)."', "model.net.ckpt_path"),
        ('"Train with heatmapbench-train trainer.enable_checkpointing=true."', "heatmapbench-train trainer."),
        ('"""Images of ``eval_subset()``; None takes ``data.eval_subset_size``."""', "data.eval_subset_size"),
    ]:
        added = source + f"\n\ndef _added():\n    raise ValueError({message})\n"
        assert any(hit in found for found in _offending(name, added, keys)), message
    # an allowed docstring's text is still found in a message of that module
    zoo = library_sources()["models/zoo.py"]
    added = zoo + '\n\ndef _added(path):\n    raise ValueError(f"{path} does not fit model.net.net")\n'
    assert [hit.partition(": ")[2] for hit in _offending("models/zoo.py", added, keys)] == ["model.net.net"]
    assert not config_names_in('"pass explainers=[...]; model.eval() and data.shape are code"', keys)


def test_the_allowed_mentions_are_still_there():
    """An allow-list entry whose text left its module would hide a new one: each must still match."""
    keys, sources = config_keys(), library_sources()
    for allowed, docstring in ((ALLOWED, True), (ALLOWED_MESSAGES, False)):
        for module, text in allowed:
            assert any(text in hit and doc == docstring for _, hit, doc in config_names_in(sources[module], keys)), \
                (module, text)


def test_library_sources_leave_out_the_application_and_the_shims():
    names = set(library_sources())
    assert "models/zoo.py" in names and "errors.py" in names
    assert not any(n.startswith("app/") for n in names) and "fuse.py" not in names and "config/schema.py" not in names
    assert all((PACKAGE / n).is_file() for n in names) and Path(PACKAGE / "app").is_dir()
