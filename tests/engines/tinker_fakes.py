"""Fakes of Tinker's service (the network boundary) that compute with the real SmolLM2 model.

`FakeTinkerCloud` plays Tinker's servers: one resident SmolLM2 with PEFT adapters, checkpoints in a dict keyed by
`tinker://` paths, all torch work on one thread (as a remote service it never blocks the caller's event loop). The
client classes have the installed SDK's method signatures (tests/engines/test_tinker_fakes.py checks them) and
return the SDK's own `AwaitableConcurrentFuture` and response types.

Faithful parts: `forward_backward_custom` does what the SDK does client-side (a forward for the target tokens'
logprobs, the user's loss on detached leaf tensors, then a backward with cross-entropy weights = -dL/dlogprobs);
`sample` / `compute_logprobs` report per sequence position with None first; `optim_step` is AdamW with the given
AdamParams. Not modelled: chunking, retries, rate limits, sessions, server-side custom losses.
"""

from __future__ import annotations

import copy
import io
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import httpx
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from tinker import types
from tinker.lib.public_interfaces.api_future import AwaitableConcurrentFuture

from claas.core.config import Settings

BASE = "smollm2-135m"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FILES_URL = "https://fake-tinker.test/files"


def tinker_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "training_engine": "tinker",
        "tinker_base_model": BASE,
        "lora_root": tmp_path / "loras",
        "feedback_log_dir": tmp_path / "feedback",
        "lora_rank": 8,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


class FakeTinkerCloud:
    """Tinker's servers, in process: the model, the checkpoints, the call log."""

    def __init__(self, loaded: Any, base_model: str) -> None:
        self.base_model = base_model
        self.tokenizer = loaded.tokenizer
        self._base = loaded.model
        self._peft: Any = None
        self.checkpoints: dict[str, dict[str, Any]] = {}
        self.files: dict[str, bytes] = {}
        self.calls: list[str] = []
        self.fail_next: dict[str, BaseException] = {}  # method name -> exception raised once
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fake-tinker")
        self._runs = 0

    def submit(self, method: str, fn: Callable[[], Any]) -> AwaitableConcurrentFuture[Any]:
        self.calls.append(method)
        failure = self.fail_next.pop(method, None)

        def run() -> Any:
            if failure is not None:
                raise failure
            return fn()

        future: Future[Any] = self._pool.submit(run)
        return AwaitableConcurrentFuture(future)

    def new_run(self) -> str:
        self._runs += 1
        return f"run-{self._runs}-{uuid.uuid4().hex[:6]}"

    def adapter(self, name: str, rank: int) -> list[torch.nn.Parameter]:
        """Attach a fresh LoRA adapter `name` (B = 0: equal to the base) and return its parameters."""
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0,
                            task_type="CAUSAL_LM")
        if self._peft is None:
            self._peft = get_peft_model(self._base, config, adapter_name=name)
        else:
            self._peft.add_adapter(name, config)
        params = [p for n, p in self._peft.named_parameters() if f".{name}." in n]
        for param in params:
            param.requires_grad_(True)
        return params

    def weights(self, name: str) -> dict[str, torch.Tensor]:
        state = get_peft_model_state_dict(self._peft, adapter_name=name, save_embedding_layers=False)
        return {k: v.detach().clone() for k, v in state.items()}

    def load_weights(self, name: str, weights: dict[str, torch.Tensor]) -> None:
        set_peft_model_state_dict(self._peft, weights, adapter_name=name)

    def logprobs(self, adapter: str | None, tokens: list[int], *, grad: bool = False) -> torch.Tensor:
        """log_softmax over the vocabulary at every position: [len(tokens), V] (row i predicts token i + 1)."""
        ids = torch.tensor([tokens])
        context = torch.enable_grad() if grad else torch.no_grad()
        with context:
            if adapter is None:
                model = self._peft if self._peft is not None else self._base
                with model.disable_adapter() if self._peft is not None else torch.no_grad():
                    logits = model(input_ids=ids).logits[0]
            else:
                self._peft.set_adapter(adapter)
                logits = self._peft(input_ids=ids).logits[0]
        return logits.float().log_softmax(-1)

    def generate(self, adapter: str | None, prompt: list[int], params: types.SamplingParams, seed: int) -> list[int]:
        eos = self.tokenizer.eos_token_id
        tokens = list(prompt)
        generator = torch.Generator().manual_seed(seed)
        out: list[int] = []
        for _ in range(params.max_tokens or 64):
            row = self.logprobs(adapter, tokens)[-1]
            if params.temperature == 0:
                token = int(row.argmax())
            else:
                token = int(torch.multinomial((row / params.temperature).softmax(-1), 1, generator=generator))
            out.append(token)
            tokens.append(token)
            if token == eos:
                break
        return out

    def serve_file(self, request: httpx.Request) -> httpx.Response:
        """The signed-URL download endpoint of external weights (an httpx MockTransport handler)."""
        body = self.files.get(str(request.url))
        return httpx.Response(200, content=body) if body is not None else httpx.Response(404)


class FakeServiceClient:
    """tinker.ServiceClient against a FakeTinkerCloud."""

    def __init__(self, cloud: FakeTinkerCloud) -> None:
        self.cloud = cloud

    def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        user_metadata: dict[str, str] | None = None,
        optimizer: types.OptimizerConfig | None = None,
    ) -> AwaitableConcurrentFuture[FakeTrainingClient]:
        if base_model != self.cloud.base_model:
            raise ValueError(f"fake Tinker serves only {self.cloud.base_model}, not {base_model}")
        return self.cloud.submit("create_lora_training_client", lambda: FakeTrainingClient(self.cloud, rank))

    def create_training_client_from_state_with_optimizer(
        self,
        path: str,
        base_model: str | None = None,
        user_metadata: dict[str, str] | None = None,
        weights_access_token: str | None = None,
    ) -> AwaitableConcurrentFuture[FakeTrainingClient]:
        def restore() -> FakeTrainingClient:
            saved = self.cloud.checkpoints[path]
            client = FakeTrainingClient(self.cloud, saved["rank"])
            self.cloud.load_weights(client.name, saved["weights"])
            client.optimizer.load_state_dict(copy.deepcopy(saved["optimizer"]))
            return client

        return self.cloud.submit("create_training_client_from_state_with_optimizer", restore)

    def create_sampling_client(
        self,
        model_path: str | None = None,
        base_model: str | None = None,
        retry_config: Any = None,
        record_stability_info: bool = False,
    ) -> AwaitableConcurrentFuture[FakeSamplingClient]:
        if model_path is None and base_model is None:
            raise ValueError("Either model_path or base_model must be provided")
        return self.cloud.submit("create_sampling_client", lambda: FakeSamplingClient(self.cloud, model_path))


class FakeRestClient:
    def __init__(self, cloud: FakeTinkerCloud) -> None:
        self.cloud = cloud

    def delete_checkpoint_from_tinker_path(self, tinker_path: str) -> AwaitableConcurrentFuture[None]:
        return self.cloud.submit("delete_checkpoint_from_tinker_path",
                                 lambda: self.cloud.checkpoints.pop(tinker_path, None) and None)

    def get_external_weights_urls(self, tinker_path: str) -> AwaitableConcurrentFuture[Any]:
        def urls() -> types.ExternalWeightsUrlsResponse:
            names = self.cloud.checkpoints[tinker_path]["files"]
            return types.ExternalWeightsUrlsResponse(
                urls={name: url for name, url in names.items()}, expires=datetime.now(timezone.utc) + timedelta(hours=1)
            )

        return self.cloud.submit("get_external_weights_urls", urls)


class FakeTrainingClient:
    def __init__(self, cloud: FakeTinkerCloud, rank: int) -> None:
        self.cloud = cloud
        self.run_id = cloud.new_run()
        self.rank = rank
        self.name = "t" + self.run_id.replace("-", "")
        self.params = cloud.adapter(self.name, rank)
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4)

    def forward_backward_custom(
        self,
        data: list[types.Datum],
        loss_fn: Any,
        *,
        loss_type_input: str | None = None,
    ) -> AwaitableConcurrentFuture[types.ForwardBackwardOutput]:
        def run() -> types.ForwardBackwardOutput:
            outputs, leaves, model_lps = [], [], []
            for datum in data:
                tokens = datum.model_input.to_ints()
                targets = datum.loss_fn_inputs["target_tokens"].to_torch().long()
                full = self.cloud.logprobs(self.name, tokens, grad=True)  # [N, V]
                picked = full.gather(-1, targets if targets.ndim == 2 else targets[:, None])
                picked = picked if targets.ndim == 2 else picked[:, 0]
                model_lps.append(picked)
                # What the SDK hands the loss: float32 values from the wire, as leaves.
                leaves.append(picked.detach().clone().requires_grad_(True))
                outputs.append({"logprobs": types.TensorData.from_torch(picked.detach())})
            loss, metrics = loss_fn(data, leaves)
            loss.backward()
            # The server's cross-entropy backward with weights = -grad: L = sum(-logprobs * weights).
            surrogate = sum(((lp * leaf.grad).sum() for lp, leaf in zip(model_lps, leaves, strict=True)),
                            torch.zeros(()))
            surrogate.backward()
            return types.ForwardBackwardOutput(
                loss_fn_output_type="custom", loss_fn_outputs=outputs,
                metrics={**metrics, "loss:sum": float(loss.detach())},
            )

        return self.cloud.submit("forward_backward_custom", run)

    def optim_step(
        self,
        optim_params: Any = None,
        *,
        adam_params: types.AdamParams | None = None,
    ) -> AwaitableConcurrentFuture[types.OptimStepResponse]:
        params = optim_params or adam_params
        if not isinstance(params, types.AdamParams):
            raise ValueError("the fake optimizer is Adam: pass AdamParams")

        def step() -> types.OptimStepResponse:
            for group in self.optimizer.param_groups:
                group.update(lr=params.learning_rate, betas=(params.beta1, params.beta2), eps=params.eps,
                             weight_decay=params.weight_decay)
            norm = 0.0
            if params.grad_clip_norm > 0:
                norm = float(torch.nn.utils.clip_grad_norm_(self.params, params.grad_clip_norm))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            return types.OptimStepResponse(metrics={"grad_norm": norm})

        return self.cloud.submit("optim_step", step)

    def save_state(
        self,
        name: str,
        ttl_seconds: int | None = None,
        overwrite: bool = False,
        user_metadata: dict[str, str] | None = None,
    ) -> AwaitableConcurrentFuture[types.SaveWeightsResponse]:
        def save() -> types.SaveWeightsResponse:
            path = f"tinker://{self.run_id}/weights/{name}"
            self.cloud.checkpoints[path] = {"rank": self.rank, "weights": self.cloud.weights(self.name),
                                            "optimizer": copy.deepcopy(self.optimizer.state_dict())}
            return types.SaveWeightsResponse(path=path)

        return self.cloud.submit("save_state", save)

    def save_weights_for_sampler(
        self,
        name: str,
        ttl_seconds: int | None = None,
        user_metadata: dict[str, str] | None = None,
    ) -> AwaitableConcurrentFuture[types.SaveWeightsForSamplerResponse]:
        def save() -> types.SaveWeightsForSamplerResponse:
            path = f"tinker://{self.run_id}/sampler_weights/{name}"
            self.cloud.checkpoints[path] = {"rank": self.rank, "weights": self.cloud.weights(self.name)}
            return types.SaveWeightsForSamplerResponse(path=path)

        return self.cloud.submit("save_weights_for_sampler", save)

    def save_weights_external(
        self,
        name: str,
        ttl_seconds: int | None = None,
        age_encryption_recipients: list[str] | None = None,
    ) -> AwaitableConcurrentFuture[types.SaveWeightsExternalResponse]:
        def save() -> types.SaveWeightsExternalResponse:
            import tempfile

            path = f"tinker://{self.run_id}/external_weights/{name}"
            urls = {}
            with tempfile.TemporaryDirectory() as tmp:
                self.cloud._peft.save_pretrained(tmp, selected_adapters=[self.name])
                folder = Path(tmp) / self.name if (Path(tmp) / self.name).is_dir() else Path(tmp)
                for file in sorted(folder.iterdir()):
                    if file.is_file():
                        url = f"{FILES_URL}/{uuid.uuid4().hex}/{file.name}"
                        self.cloud.files[url] = io.BytesIO(file.read_bytes()).getvalue()
                        urls[file.name] = url
            self.cloud.checkpoints[path] = {"files": urls}
            return types.SaveWeightsExternalResponse(path=path)

        return self.cloud.submit("save_weights_external", save)

    def get_tokenizer(self) -> Any:
        return self.cloud.tokenizer


class FakeSamplingClient:
    def __init__(self, cloud: FakeTinkerCloud, model_path: str | None) -> None:
        self.cloud = cloud
        self.model_path = model_path
        self._adapter: str | None = None
        if model_path is not None:
            saved = cloud.checkpoints[model_path]  # KeyError: unknown path, as the service would refuse it
            self._adapter = "s" + uuid.uuid4().hex[:12]
            cloud.adapter(self._adapter, saved["rank"])
            cloud.load_weights(self._adapter, saved["weights"])

    def sample(
        self,
        prompt: types.ModelInput,
        num_samples: int,
        sampling_params: types.SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        topk_sample_logprobs: int = 0,
        target_prompt_logprobs: types.TensorData | None = None,
        prompt_alt_tokens_k: int = 0,
        prompt_logprobs_last_n: int | None = None,
    ) -> AwaitableConcurrentFuture[types.SampleResponse]:
        def run() -> types.SampleResponse:
            tokens = prompt.to_ints()
            prompt_lps: list[float | None] | None = None
            topk: list[list[tuple[int, float]] | None] | None = None
            if include_prompt_logprobs or topk_prompt_logprobs > 0:
                rows = self.cloud.logprobs(self._adapter, tokens)
                actual = rows[:-1].gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]
                prompt_lps = [None, *actual.tolist()]
                if topk_prompt_logprobs > 0:
                    values, ids = rows[:-1].topk(topk_prompt_logprobs, dim=-1)
                    topk = [None, *[list(zip(i.tolist(), v.tolist())) for i, v in zip(ids, values)]]
            sequences = []
            for index in range(num_samples):
                seed = (sampling_params.seed or 0) + index
                out = self.cloud.generate(self._adapter, tokens, sampling_params, seed)
                rows = self.cloud.logprobs(self._adapter, tokens + out)
                lps = rows[len(tokens) - 1 : -1].gather(-1, torch.tensor(out)[:, None])[:, 0].tolist()
                reason = "stop" if out and out[-1] == self.cloud.tokenizer.eos_token_id else "length"
                sequences.append(types.SampledSequence(stop_reason=reason, sequence_id=uuid.uuid4().hex,
                                                       _tokens_list=out, _logprobs_list=lps))
            return types.SampleResponse(sequences=sequences, _prompt_logprobs_list=prompt_lps,
                                        _topk_prompt_logprobs_list=topk)

        return self.cloud.submit("sample", run)

    def compute_logprobs(
        self, prompt: types.ModelInput, prompt_logprobs_last_n: int | None = None
    ) -> AwaitableConcurrentFuture[list[float | None]]:
        def run() -> list[float | None]:
            tokens = prompt.to_ints()
            rows = self.cloud.logprobs(self._adapter, tokens)
            return [None, *rows[:-1].gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0].tolist()]

        return self.cloud.submit("compute_logprobs", run)

    def get_tokenizer(self) -> Any:
        return self.cloud.tokenizer
