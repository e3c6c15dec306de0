"""The fakes cannot drift from the installed SDK: every public fake method has the real method's parameters."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
import tinker
from tinker_fakes import FakeRestClient, FakeSamplingClient, FakeServiceClient, FakeTrainingClient

PAIRS = [
    (FakeServiceClient, tinker.ServiceClient),
    (FakeRestClient, tinker.RestClient),
    (FakeTrainingClient, tinker.TrainingClient),
    (FakeSamplingClient, tinker.SamplingClient),
]


def _parameters(fn: Callable[..., Any]) -> list[tuple[str, object, object]]:
    # Names, kinds and defaults; annotations differ only in naming the fakes' own future type.
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def _public_methods(cls: type) -> list[str]:
    return sorted(n for n, v in vars(cls).items() if callable(v) and not n.startswith("_"))


@pytest.mark.parametrize(("fake", "real"), PAIRS, ids=lambda c: c.__name__)
def test_fake_methods_have_the_sdk_signatures(fake: type, real: type) -> None:
    methods = _public_methods(fake)
    assert methods, f"{fake.__name__} has no methods"
    for name in methods:
        assert hasattr(real, name), f"tinker.{real.__name__} has no method {name}"
        assert _parameters(getattr(fake, name)) == _parameters(getattr(real, name)), f"{real.__name__}.{name}"


def test_engine_calls_only_methods_the_fakes_have() -> None:
    """What claas calls on the SDK's clients (grep of the engine and the sampling backend) exists on the fakes."""
    used = {
        FakeServiceClient: ["create_lora_training_client", "create_training_client_from_state_with_optimizer",
                            "create_sampling_client"],
        FakeRestClient: ["delete_checkpoint_from_tinker_path", "get_external_weights_urls"],
        FakeTrainingClient: ["forward_backward_custom", "optim_step", "save_state", "save_weights_for_sampler",
                             "save_weights_external"],
        FakeSamplingClient: ["sample", "compute_logprobs", "get_tokenizer"],
    }
    for fake, names in used.items():
        assert set(names) <= set(_public_methods(fake)), fake.__name__
