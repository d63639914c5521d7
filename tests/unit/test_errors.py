"""The library's errors about its arguments (heatmapbench.errors): spelled as keywords, and as config keys."""

from __future__ import annotations

import pickle

import pytest

from heatmapbench.errors import NULL, ArgumentError, spell


@pytest.mark.parametrize("value, python, key", [
    (True, "download=True", "data.download=true"),
    (False, "pretrained=False", "data.pretrained=false"),
    (NULL, "weights=None", "data.weights=null"),
    (3, "num_classes=3", "data.num_classes=3"),
    ("/a b/x.pth", "path='/a b/x.pth'", "data.path=/a b/x.pth"),
    (None, "train_path", "data.train_path"),
])
def test_an_argument_reads_as_its_keyword_and_as_its_config_key(value, python, key):
    name = python.partition("=")[0]
    assert spell(name, value) == python
    assert spell(name, value, "data") == key
    assert spell(name, value, "data", "root_key") == ("root_key" if value is None else f"root_key={key.partition('=')[2]}")
    assert spell(name, value, "data", "head=adapt") == "head=adapt"  # a key written with its value: as it is


def test_an_argument_error_is_its_template_with_arguments_as_keywords_and_values_as_they_are():
    err = ArgumentError("{file}: pass {download} or {weights} ({reason})", {"download": True, "weights": NULL},
                        file="/x/{odd}.bin", reason="a {brace}")
    assert str(err) == "/x/{odd}.bin: pass download=True or weights=None (a {brace})"  # values never formatted
    assert str(ArgumentError("a message with {braces} and no arguments")) == "a message with {braces} and no arguments"

    cli = err.in_group("model.net", {"weights": "model.weights"})
    assert type(cli) is ArgumentError
    assert str(cli) == "/x/{odd}.bin: pass model.net.download=true or model.weights=null (a {brace})"
    assert cli.in_group("data") is cli  # named once: a second mapping keeps the first
    assert str(pickle.loads(pickle.dumps(err)).in_group("model.net", {"weights": "model.weights"})) == str(cli)
    assert str(pickle.loads(pickle.dumps(cli))) == str(cli)  # a sweep's worker pickles it


def test_the_data_and_model_errors_are_argument_errors_of_their_own_kinds():
    from heatmapbench.data import DataArgumentError, DataError, DataNotFoundError
    from heatmapbench.models.errors import CheckpointError, ModelConfigError, WeightsNotFoundError

    for cls, base in ((DataNotFoundError, FileNotFoundError), (DataArgumentError, ValueError),
                      (WeightsNotFoundError, FileNotFoundError), (CheckpointError, ValueError),
                      (ModelConfigError, ValueError)):
        err = cls("pass {x}", {"x": 1}).in_group("g")
        assert type(err) is cls and isinstance(err, base) and isinstance(err, ArgumentError) and str(err) == "pass g.x=1"
    assert issubclass(DataNotFoundError, DataError)
