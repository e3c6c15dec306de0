"""`claas openclaw ...`: commands for running OpenClaw in front of CLaaS (the config lives in claas.openclaw)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from claas.core.lora_ids import InvalidLoraIdError
from claas.openclaw import DEFAULT_GATEWAY_PORT, DEFAULT_PROVIDER, OpenClawSetup, build_config, write_config

openclaw_app = typer.Typer(help="Run OpenClaw (Telegram and other chats) in front of CLaaS.", no_args_is_help=True)


@openclaw_app.command("config")
def config(
    lora_id: Annotated[list[str], typer.Option("--lora-id", help="Adapter served as a model (repeatable).")],
    claas_url: Annotated[str, typer.Option(help="CLaaS API URL as OpenClaw reaches it.")] = "http://127.0.0.1:8080",
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Write here (default: stdout).")] = None,
    provider: Annotated[str, typer.Option(help="Provider id in OpenClaw (model refs are provider/lora_id).")] = (
        DEFAULT_PROVIDER),
    api_key: Annotated[Optional[str], typer.Option(help="CLaaS API key, written literally.")] = None,
    api_key_env: Annotated[Optional[str], typer.Option(help="Env var holding the CLaaS API key.")] = None,
    gateway_port: int = DEFAULT_GATEWAY_PORT,
    gateway_bind: Annotated[str, typer.Option(help="loopback, lan, tailnet, auto or custom.")] = "loopback",
    gateway_token: Annotated[Optional[str], typer.Option(help="Literal (else ${OPENCLAW_GATEWAY_TOKEN}).")] = None,
    context_window: Annotated[int, typer.Option(help="The model's context (SmolLM2: 8192).")] = 8192,
    max_tokens: Annotated[int, typer.Option(help="Answer length cap OpenClaw asks for.")] = 512,
    tools: Annotated[bool, typer.Option(help="Let the model call tools (large models; longer prompt).")] = False,
    plugin: Annotated[Optional[Path], typer.Option(help="claas-feedback plugin directory to load.")] = None,
    feedback_batch_size: Annotated[int, typer.Option(help="/feedback items sent per training step.")] = 1,
    telegram: Annotated[bool, typer.Option(help="Enable the Telegram channel (token: ${TELEGRAM_BOT_TOKEN}).")] = (
        False),
    telegram_allow_from: Annotated[Optional[list[str]], typer.Option(help="Telegram user id allowed to DM.")] = None,
) -> None:
    """Write an openclaw.json whose agent answers through CLaaS, one model per lora_id."""
    try:
        setup = OpenClawSetup(
            lora_ids=lora_id, claas_url=claas_url, provider=provider, claas_api_key=api_key,
            claas_api_key_env=api_key_env, gateway_port=gateway_port, gateway_bind=gateway_bind,
            gateway_token=gateway_token, context_window=context_window, max_tokens=max_tokens, tools=tools,
            plugin_path=str(plugin.resolve()) if plugin else None, feedback_batch_size=feedback_batch_size,
            telegram=telegram, telegram_allow_from=telegram_allow_from or [],
        )
    except (ValueError, InvalidLoraIdError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    if output is None:
        typer.echo(json.dumps(build_config(setup), indent=2))
        return
    write_config(setup, output)
    typer.echo(f"wrote {output}  (start the gateway with OPENCLAW_CONFIG_PATH={output}; headless: "
               "OPENCLAW_SKIP_CHANNELS=1)", err=True)
