"""Fixtures of the trainer tests: one tiny prepared dataset for the whole session."""

import pytest

from .helpers import prepare_tiny_data


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return prepare_tiny_data(tmp_path_factory.mktemp("data"))
