"""Loading workloads: built-in names, ``package.module:factory``, ``path/file.py:factory``, and factories
that are a Workload instance or class; every failure is one-line bad input."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import FIXTURES, REPO, ref

from bsprof.errors import BadInput
from bsprof.workload import Split, Workload, load_workload
from bsprof.workloads import BUILTINS

NEEDS_DATA = {"cifar10-resnet"}  # reads a local dataset folder


@pytest.mark.parametrize("name", sorted(set(BUILTINS) - NEEDS_DATA))
def test_builtin_names_load(name: str) -> None:
    workload = load_workload(name)
    assert isinstance(workload, Workload)
    assert workload.name == name


def test_builtin_needing_data_without_it_is_bad_input(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BSPROF_CIFAR10_DIR", raising=False)
    with pytest.raises(BadInput, match="data-dir"):
        load_workload("cifar10-resnet")


def test_builtin_name_with_whitespace() -> None:
    assert load_workload("  digits-mlp ").name == "digits-mlp"


def test_workload_instance_is_returned_as_is() -> None:
    workload = load_workload(ref("tiny.py"))
    assert load_workload(workload) is workload


def test_package_module_factory_class() -> None:
    workload = load_workload("bsprof.workloads.digits:DigitsMLP")
    assert type(workload).__name__ == "DigitsMLP"


def test_package_module_factory_function(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(FIXTURES))
    workload = load_workload("tiny:factory")
    assert workload.name == "tiny"


def test_file_factory_function_absolute_path() -> None:
    workload = load_workload(ref("tiny.py"))
    assert workload.name == "tiny"
    assert isinstance(workload.train_split(), Split)


def test_file_factory_relative_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    assert load_workload("tests/fixtures/tiny.py:other").name == "tiny-other"
    monkeypatch.chdir(FIXTURES)
    assert load_workload("tiny.py:factory").name == "tiny"  # a bare file name with .py is a file


def test_file_factory_is_an_instance() -> None:
    workload = load_workload(ref("tiny.py", "INSTANCE"))
    assert type(workload).__name__ == "TinyWorkload"


def test_file_factory_is_a_class() -> None:
    workload = load_workload(ref("tiny.py", "TinyWorkload"))
    assert type(workload).__name__ == "TinyWorkload"
    assert workload.name == "tiny"


def test_a_file_workload_is_built_afresh_by_each_load() -> None:
    a, b = load_workload(ref("tiny.py")), load_workload(ref("tiny.py"))
    assert isinstance(a, Workload) and a is not b  # the factory runs per load: no state shared between sweeps
    assert a.config() == b.config() == {"name": "tiny"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no-such-workload", "unknown workload"),
        (ref("tiny.py", "no_such_factory"), "no attribute"),
        (ref("tiny.py", "raises"), "factory exploded on purpose"),
        (ref("tiny.py", "wrong_type"), "not a bsprof.Workload"),
        (ref("tiny.py", "NOT_A_WORKLOAD"), "neither a Workload nor a callable"),
        (ref("broken.py"), "nonexistent_pkg_for_bsprof_tests"),
        (ref("missing.py"), "not found"),
        ("no_such_module_for_bsprof:factory", "cannot import"),
        ("bsprof.workloads.digits:NoSuchClass", "no attribute"),
        (":factory", "expected"),
        ("bsprof.workloads.digits:", "expected"),
    ],
)
def test_bad_workload_specs_are_one_line_bad_input(spec: str, message: str) -> None:
    with pytest.raises(BadInput) as info:
        load_workload(spec)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_failed_plugin_import_is_not_left_in_sys_modules() -> None:
    import sys

    before = set(sys.modules)
    with pytest.raises(BadInput):
        load_workload(ref("broken.py"))
    assert not any(m.startswith("_bsprof_plugin_") for m in set(sys.modules) - before)


def test_fixture_files_are_plain_files() -> None:
    assert not (FIXTURES / "__init__.py").exists()
    assert {p.name for p in FIXTURES.glob("*.py")} >= {"tiny.py", "slow.py", "broken.py"}
    assert os.path.isfile(FIXTURES / "slow.py")
    assert Path(ref("slow.py").rpartition(":")[0]).is_file()
