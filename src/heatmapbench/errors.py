"""Errors about a function's or class's own arguments, which an application can name as its config keys.

The library speaks of its arguments (``pass download=True``, ``ckpt_path='x.ckpt' has a 10-way
head``), never of a command's config keys or command line, which it does not know. An
:class:`ArgumentError` carries the names of the arguments its message mentions, so that a command
that built the object from a config node raises the same error naming that node's keys instead
(:meth:`ArgumentError.in_group`: ``pass data.download=true``).
"""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["NULL", "ArgumentError"]


class _Null:
    """An argument's value ``None`` (Python) / ``null`` (a config), where ``None`` would mean "the name alone"."""

    def __repr__(self) -> str:
        return "None"

    def __reduce__(self) -> str:
        return "NULL"


#: Pass as an argument's value in :class:`ArgumentError` to write ``weights=None`` (``model.net.weights=null``).
NULL = _Null()


def spell(name: str, value: Any, group: str | None = None, key: str | None = None) -> str:
    """An argument as the keyword it is passed as (``download=True``) or, in config ``group``, as its
    key (``data.download=true``, YAML values); ``key``: the config key that sets it when that is not
    ``<group>.<name>`` (a key written with its value, ``head=adapt``, is used as it is). ``value``
    None: the name alone (``train_path``, ``data.train_path``)."""
    if group is None and key is None:
        return name if value is None else f"{name}={value!r}"
    key = key or f"{group}.{name}"
    if value is None or "=" in key:
        return key
    text = "null" if value is NULL else str(value).lower() if isinstance(value, bool) else str(value)
    return f"{key}={text}"


class ArgumentError(Exception):
    """An error whose cause or fix is one of the raiser's arguments, which the message names.

    ``message`` is a template: each of ``arguments`` is a field (``"pass {download}"``,
    ``arguments={"download": True}``), read as the keyword the function or class takes
    (``download=True``; a value of None: the name alone; :data:`NULL`: ``=None``), and ``values``
    fill its other fields as they are (paths and reasons are never read as a template). A message
    without either is kept as it is. A command that passed the arguments from a config node raises
    :meth:`in_group` instead, whose message names the node's keys (``data.download=true``).
    """

    def __init__(self, message: str, arguments: Mapping[str, Any] | None = None, *, group: str | None = None,
                 keys: Mapping[str, str] | None = None, **values: Any) -> None:
        self.template, self.arguments, self.values = message, dict(arguments or {}), values
        self.group, self.keys = group, dict(keys or {})
        fields = {name: spell(name, value, group, self.keys.get(name)) for name, value in self.arguments.items()}
        super().__init__(message.format(**values, **fields) if fields or values else message)

    def in_group(self, group: str, keys: Mapping[str, str] | None = None) -> ArgumentError:
        """The same error (same class) with its arguments named as the keys of config node ``group``
        (``data``, ``model.net``), or as ``keys`` says for an argument set by another key
        (``{"ckpt_path": "ckpt_path"}``); one already named so is kept."""
        if self.group is not None or self.keys:
            return self
        return type(self)(self.template, self.arguments, group=group, keys=keys, **self.values)
