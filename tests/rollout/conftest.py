"""Fixtures of the SGLang tests: the pinned release's source, and the stand-in installed as ``sglang``."""

import pytest

from tests.rollout import sglang_standin
from tests.rollout.sglang_source import released


@pytest.fixture(scope="module")
def release():
    return released()


@pytest.fixture
def standin(monkeypatch, release):
    """``import sglang`` gives the stand-in of the pinned release; returns its engine class."""
    return sglang_standin.install(monkeypatch, release)
