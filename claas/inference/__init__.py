"""Inference side of the gateway: the HTTP client to the vLLM-compatible server, the completion cache, the proxy.

Modules: `base` (InferenceBackend protocol), `vllm` (VllmClient), `cache` (CompletionCache), `helpers` (SSE, think
blocks, cache keys), `wire` (OpenAI-compatible request models), `replies` (reply shaping, cache extraction),
`proxy` (the service behind the inference routes).
"""

from claas.inference.base import InferenceBackend
from claas.inference.cache import CachedCompletion, CompletionCache
from claas.inference.vllm import VllmClient

__all__ = ["CachedCompletion", "CompletionCache", "InferenceBackend", "VllmClient"]
