"""Fixtures of the cluster tests (`make test-cluster`, not part of `make test`): the multi-host
stack in network namespaces, and the tiny model's Hugging Face reference."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from services.common.runtime import ModelRuntime
from services.gateway.text import PromptEncoder
from tests.cluster.multihost import MultiHost, multihost
from tests.cluster.netns import namespaces_unavailable
from tests.conftest import prompt_encoder, reference_model


@pytest.fixture(scope="session")
def tiny_runtime() -> ModelRuntime:
    """The tiny model: the Hugging Face reference."""
    return reference_model("tiny")


@pytest.fixture(scope="session")
def tiny_encoder() -> PromptEncoder:
    return prompt_encoder("tiny")


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MultiHost]:
    """Every service on a host of its own (tests/cluster/multihost.py)."""
    reason = namespaces_unavailable()
    if reason:
        pytest.skip(f"the multi-host tests need network namespaces: {reason}")
    with multihost(tmp_path_factory.mktemp("multihost")) as cluster:
        yield cluster
