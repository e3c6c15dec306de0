"""Entry point shared by `claas eval` and `python -m claas.eval`: Hydra overrides in, a run folder out."""

from __future__ import annotations

import pydantic
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console

from claas.eval.runner import run_eval
from claas.eval.settings import compose_config


def main(overrides: list[str]) -> int:
    console = Console()
    try:
        cfg = compose_config(overrides)
    except (pydantic.ValidationError, HydraException, OmegaConfBaseException, ValueError) as exc:
        console.print(f"[red]invalid eval config:[/red] {exc}")
        return 2
    try:
        run_eval(cfg, console)
    except KeyboardInterrupt:
        return 130
    return 0
