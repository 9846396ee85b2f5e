"""User factories: by module (also from the current directory) or by file, what they are passed,
and the one-line reasons when they cannot be used."""

from __future__ import annotations

import sys
import textwrap

import pytest
from torch import nn

from lepton.errors import ConfigError
from lepton.workloads import (
    ALL_FACTS_ATTRIBUTE,
    Workload,
    absolute_factory,
    build_model,
    load_workload,
    resolve_factory,
)


@pytest.fixture
def workload() -> Workload:
    return load_workload("integration.custom_workload:blobs", 0)


def write(path, text: str):
    path.write_text(textwrap.dedent(text))
    return path


def test_a_factory_in_a_file_is_loaded_by_path(tmp_path, monkeypatch, workload):
    write(tmp_path / "nets.py", """
        from torch import nn
        def net(input_dim, num_classes):
            return nn.Linear(input_dim, num_classes)
    """)
    monkeypatch.chdir(tmp_path)
    model = build_model("nets.py:net", workload, 0)
    assert isinstance(model, nn.Linear) and model.in_features == 5
    assert build_model(f"{tmp_path}/nets.py:net", workload, 0).out_features == 2
    assert absolute_factory("nets.py:net") == f"{tmp_path}/nets.py:net"
    assert absolute_factory("package.module:net") == "package.module:net"


def test_a_module_in_the_current_directory_is_found_without_pythonpath(tmp_path, monkeypatch, workload):
    write(tmp_path / "cwd_models_for_test.py", """
        from torch import nn
        def net(num_classes, input_dim):
            return nn.Linear(input_dim, num_classes)
    """)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "cwd_models_for_test", raising=False)
    assert isinstance(build_model("cwd_models_for_test:net", workload, 0), nn.Linear)


def test_a_module_nowhere_is_refused_with_what_went_wrong(tmp_path, monkeypatch, workload):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="cannot import 'no_such_module_anywhere'"):
        build_model("no_such_module_anywhere:net", workload, 0)
    with pytest.raises(ConfigError, match="no file .*missing.py"):
        resolve_factory("missing.py:net")
    with pytest.raises(ConfigError, match="has no attribute 'nope'"):
        resolve_factory("integration.custom_workload:nope")


@pytest.mark.parametrize(
    ("what", "name", "builtins"),
    [("dataset", "nosuchdata", "digits, diabetes, synthetic-image"), ("model", "nosuchmodel", "mlp, embedding-bag")],
)
def test_an_unknown_built_in_name_lists_the_built_in_ones(workload, what, name, builtins):
    with pytest.raises(ConfigError, match=f"unknown {what} '{name}': built-in ones are {builtins}"):
        load_workload(name, 0) if what == "dataset" else build_model(name, workload, 0)


def test_a_factory_that_raises_is_named_with_its_exception_type_and_message(tmp_path, workload):
    path = write(tmp_path / "broken.py", """
        def net(input_dim):
            raise RuntimeError(f"cannot build for {input_dim} inputs")
        def data(seed):
            raise KeyError("missing split")
    """)
    with pytest.raises(
        ConfigError, match=r"model factory .*broken.py:net' raised RuntimeError: cannot build for 5 inputs"
    ):
        build_model(f"{path}:net", workload, 0)
    with pytest.raises(ConfigError, match=r"dataset factory .*broken.py:data' raised KeyError: 'missing split'"):
        load_workload(f"{path}:data", 0)


def test_a_module_that_fails_to_import_is_named_with_its_exception(tmp_path):
    path = write(tmp_path / "bad_import.py", "raise ValueError('bad module')\n")
    with pytest.raises(ConfigError, match="raised ValueError: bad module"):
        resolve_factory(f"{path}:net")


def test_a_kwargs_factory_gets_only_what_it_names_unless_it_opts_in(tmp_path, workload):
    path = write(tmp_path / "kw.py", f"""
        from torch import nn
        seen = {{}}
        class Net(nn.Linear):
            def __init__(self, num_classes=7, width=3):  # no input_dim: it would raise TypeError
                super().__init__(width, num_classes)
        def torchvision_style(*, weights=None, **kwargs):
            seen["plain"] = dict(kwargs)
            return Net(**kwargs)
        def opted_in(**kwargs):
            seen["opted"] = dict(kwargs)
            return nn.Linear(kwargs["input_dim"], kwargs["num_classes"])
        opted_in.{ALL_FACTS_ATTRIBUTE} = True
    """)
    model = build_model(f"{path}:torchvision_style", workload, 0)
    assert model.out_features == 7  # its own default: num_classes is not in its signature
    module = sys.modules[next(n for n in sys.modules if n.startswith("lepton_user_kw_"))]
    assert module.seen["plain"] == {}
    assert build_model(f"{path}:opted_in", workload, 0).in_features == 5
    assert module.seen["opted"] == {"input_dim": 5, "output_dim": 2, "num_classes": 2}
