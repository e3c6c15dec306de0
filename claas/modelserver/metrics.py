"""Prometheus metrics with vLLM's names and labels, in a registry owned by one engine (never the global one).

Names follow `vllm/v1/metrics/loggers.py` (`vllm:num_requests_running`, `vllm:prompt_tokens_total`,
`vllm:time_to_first_token_seconds`, ...), labelled `model_name` (the served base model name, also for adapter
requests, as vLLM does) and `engine` ("0"). A gateway that drains on `vllm:num_requests_running` /
`vllm:num_requests_waiting` works against either server.

Values are honest for this engine: the KV cache is the running batch's, sized by what it holds rather than by
preallocated blocks, so `vllm:kv_cache_usage_perc` is the tokens it holds over the token budget
`max_num_seqs x max_model_len` (0 when idle); `vllm:iteration_tokens_total` observes one prefill (its prompt
length) or one decode step (its number of running choices) per engine step; there is no prefix cache (queries
counted, hits always 0) and no preemption (always 0); `vllm:engine_sleep_state` has one sample per state
(`awake`, `weights_offloaded` = level 1, `discard_all` = level 2), 1 for the current one.

Not here: when the numbers change (engine.py) and the `/metrics` route (app.py).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
_LATENCY_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
_ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
FINISH_REASONS = ("stop", "length", "abort")
SLEEP_STATES = ("awake", "weights_offloaded", "discard_all")
_ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def _token_buckets(max_model_len: int) -> list[int]:
    # vLLM's build_1_2_5_buckets: 1, 2, 5, 10, 20, 50, ... up to max_model_len
    buckets, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_model_len:
                return buckets
            buckets.append(value)
        exponent += 1


class ServerMetrics:
    """The vLLM metric families, pre-bound to this server's labels."""

    def __init__(self, model_name: str, max_model_len: int, cache_dtype: str = "auto") -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name", "engine"]
        values = (model_name, "0")
        r = self.registry
        self.running = Gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches.", labels, registry=r
        ).labels(*values)
        self.waiting = Gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.", labels, registry=r
        ).labels(*values)
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", labels, registry=r
        ).labels(*values)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", labels, registry=r
        ).labels(*values)
        success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels + ["finished_reason"],
            registry=r,
        )
        self.request_success = {reason: success.labels(*values, reason) for reason in FINISH_REASONS}
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            labels,
            buckets=_TTFT_BUCKETS,
            registry=r,
        ).labels(*values)
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            labels,
            buckets=_ITL_BUCKETS,
            registry=r,
        ).labels(*values)
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        ).labels(*values)
        self.queue_time = Histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        ).labels(*values)
        token_buckets = _token_buckets(max_model_len)
        self.request_prompt_tokens = Histogram(
            "vllm:request_prompt_tokens",
            "Number of prefill tokens processed.",
            labels,
            buckets=token_buckets,
            registry=r,
        ).labels(*values)
        self.request_generation_tokens = Histogram(
            "vllm:request_generation_tokens",
            "Number of generation tokens processed.",
            labels,
            buckets=token_buckets,
            registry=r,
        ).labels(*values)

        self.kv_cache_usage = Gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", labels, registry=r
        ).labels(*values)
        self.prefix_cache_queries = Counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            labels,
            registry=r,
        ).labels(*values)
        self.prefix_cache_hits = Counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", labels, registry=r
        ).labels(*values)
        self.preemptions = Counter(
            "vllm:num_preemptions", "Cumulative number of preemption from the engine.", labels, registry=r
        ).labels(*values)
        self.iteration_tokens = Histogram(
            "vllm:iteration_tokens_total",
            "Histogram of number of tokens per engine_step.",
            labels,
            buckets=_ITERATION_TOKEN_BUCKETS,
            registry=r,
        ).labels(*values)
        self.params_n = Histogram(
            "vllm:request_params_n",
            "Histogram of the n request parameter.",
            labels,
            buckets=(1, 2, 5, 10, 20),
            registry=r,
        ).labels(*values)
        self.params_max_tokens = Histogram(
            "vllm:request_params_max_tokens",
            "Histogram of the max_tokens request parameter.",
            labels,
            buckets=token_buckets,
            registry=r,
        ).labels(*values)
        self.inference_time = Histogram(
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        ).labels(*values)
        self.prefill_time = Histogram(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        ).labels(*values)
        self.decode_time = Histogram(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        ).labels(*values)
        self.request_preemptions = Histogram(
            "vllm:request_num_preemptions",
            "Number of preemptions per finished request.",
            labels,
            buckets=(0, 1, 2, 5, 10, 20),
            registry=r,
        ).labels(*values)
        cache_info = Gauge(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            ["engine", "cache_dtype", "enable_prefix_caching", "block_size", "num_gpu_blocks"],
            registry=r,
        )
        # one sequence's cache at a time; a "block" here is the whole context
        cache_info.labels("0", cache_dtype, "False", str(max_model_len), "1").set(1)
        sleep = Gauge(
            "vllm:engine_sleep_state",
            "Engine sleep state; awake = 0 means engine is sleeping; weights_offloaded = 1 means sleep level 1; "
            "discard_all = 1 means sleep level 2.",
            labels + ["sleep_state"],
            registry=r,
        )
        self._sleep_state = {state: sleep.labels(*values, state) for state in SLEEP_STATES}
        self.set_sleep_level(None)

    def set_sleep_level(self, level: int | None) -> None:
        """Awake (None), level 1 (weights kept/offloaded) or level 2 (everything discarded)."""
        current = {None: "awake", 1: "weights_offloaded", 2: "discard_all"}[level]
        for state, gauge in self._sleep_state.items():
            gauge.set(1 if state == current else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
