"""The metric registry: each metric measures one aspect of an adapter through the gateway and returns flat numbers
(plots and the summary read those) plus details (the answers behind them, kept in steps.jsonl for reading)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from claas.eval.client import ClaasClient
from claas.eval.settings import EvalConfig, Preference


@dataclass
class MeasureContext:
    client: ClaasClient
    model: str  # the lora_id under evaluation
    preference: Preference
    config: EvalConfig
    seed: int  # varies per step, so sampled answers differ between steps but a rerun is reproducible


@dataclass
class Measurement:
    values: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


class Metric(ABC):
    name: ClassVar[str]
    #: slow metrics run at baseline, every `measure.slow_every` steps and at the last step
    slow: ClassVar[bool]

    @abstractmethod
    def measure(self, ctx: MeasureContext) -> Measurement: ...


METRICS: dict[str, type[Metric]] = {}
M = TypeVar("M", bound=type[Metric])


def register(cls: M) -> M:
    METRICS[cls.name] = cls
    return cls


def get_metric(name: str) -> Metric:
    try:
        return METRICS[name]()
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; known: {sorted(METRICS)}") from None
