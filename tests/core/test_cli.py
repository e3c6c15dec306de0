"""The CLI: every command has help; local commands work without a server."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from claas.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    "command",
    [[], ["up"], ["api"], ["model-server"], ["config"], ["feedback"], ["models", "list"], ["models", "pull"],
     ["lora", "init"], ["lora", "list"], ["lora", "export"], ["lora", "delete"]],
)
def test_help_everywhere(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_models_list_names_the_default() -> None:
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 0 and "smollm2-135m" in result.output


def test_feedback_without_arguments_says_what_is_missing() -> None:
    result = runner.invoke(app, ["feedback"])
    assert result.exit_code == 1
    assert "--lora-id" in result.output and "--feedback" in result.output


def test_unreachable_api_is_reported() -> None:
    result = runner.invoke(app, ["lora", "list", "--url", "http://127.0.0.1:9"])
    assert result.exit_code == 1 and "cannot reach" in result.output
