"""Entry point: load the model, build the app, run uvicorn (blocking). The CLI's `claas model-server` calls `serve`.

The model is loaded before the port is bound, so `/health` answering means the server can generate.

Not here: argument parsing (`__main__.py`, the CLI), the routes (app.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def serve(
    *,
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    served_model_name: str | None = None,
    device: str = "auto",
    cache_dir: Path | None = None,
    max_model_len: int | None = None,
    max_loras: int = 8,
    max_num_seqs: int = 16,
    api_key: str | None = None,
    dtype: str = "auto",
    generation_config: str = "auto",
    override_generation_config: dict | None = None,
) -> None:
    """Serve `model` over vLLM's HTTP API subset until interrupted; the served model id defaults to `model`."""
    import uvicorn

    from claas.core.config import get_settings
    from claas.modelserver.app import build_app
    from claas.modelserver.engine import Engine

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cache = Path(cache_dir) if cache_dir is not None else get_settings().model_cache
    logger.info("loading %s (device=%s, cache=%s)", model, device, cache)
    engine = Engine.load(
        model,
        cache_dir=cache,
        device=device,
        served_model_name=served_model_name or model,
        max_model_len=max_model_len,
        max_loras=max_loras,
        max_num_seqs=max_num_seqs,
        dtype=dtype,
        generation_config=generation_config,
        override_generation_config=override_generation_config,
    )
    logger.info(
        "serving %r on http://%s:%d (max_model_len=%d, max_num_seqs=%d, device=%s, dtype=%s)",
        engine.served_model_name,
        host,
        port,
        engine.max_model_len,
        engine.max_num_seqs,
        engine.device,
        engine.dtype,
    )
    uvicorn.run(build_app(engine, api_key=api_key), host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
