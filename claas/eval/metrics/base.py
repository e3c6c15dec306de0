"""The metric registry: each metric measures one aspect of an adapter through the gateway and returns flat numbers
(plots and the summary read those) plus details (the answers behind them, kept in steps.jsonl for reading)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from claas.eval.client import ClaasClient
from claas.eval.settings import EvalConfig, Preference

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class MeasureContext:
    client: ClaasClient
    model: str  # the lora_id under evaluation
    preference: Preference
    config: EvalConfig
    seed: int  # varies per step, so sampled answers differ between steps but a rerun is reproducible

    def map(self, fn: "Callable[[T], R]", items: "Iterable[T]") -> "list[R]":
        """`fn` over `items`, up to `measure.concurrency` calls at a time, results in item order. The inference server
        decodes concurrent requests in one batch (vLLM, and our model server), so probes take a fraction of the time;
        greedy answers are the same as one at a time."""
        todo = list(items)
        workers = min(self.config.measure.concurrency, len(todo))
        if workers <= 1:
            return [fn(item) for item in todo]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="claas-eval-probe") as pool:
            return list(pool.map(fn, todo))


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
