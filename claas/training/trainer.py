"""DistillationTrainer: one resident base model, hot LoRA adapters, one SDPO step per feedback batch.

The base model is loaded once. Adapters are PEFT LoRA adapters injected into that one model; the most recently used
ones (weights + AdamW state) stay resident in an LRU, and disk is touched only to persist after a step. Every method
here is synchronous and must be called from ONE thread (the local engine's worker): torch work is serialized.

Failure safety: if a step raises after touching the in-memory adapter, that adapter is evicted, so memory never
diverges from what is on disk; the store guarantees the on-disk adapter is the previous complete one.
Not here: HTTP, locks across processes (the store and the feedback transaction do that), the loss maths.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file

from claas.core.config import Settings
from claas.core.models import LoadedModel, load_model
from claas.core.types import (
    DistillBatch,
    DistillResult,
    FeedbackPlacement,
    LoraInitRequest,
    TrainingConfig,
    TrainingExample,
)
from claas.errors import UnprocessableError
from claas.training.examples import ExampleTokens, example_tokens, is_degenerate
from claas.training.sdpo_loss import sdpo_loss_from_hidden
from claas.training.storage import (
    METADATA_FILE,
    LoraExistsError,
    LoraMetadata,
    LoraNotFoundError,
    LoraStore,
    LoraStoreError,
)
from claas.training.teacher import RemoteTeacher

logger = logging.getLogger(__name__)

DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
OPTIMIZER_FILE = "optimizer_state.pt"


class AdapterIncompatibleError(UnprocessableError, ValueError):
    """The adapter was made for another base model than the one this trainer holds (422, `param: base_model`)."""

    def __init__(self, message: str, *, param: str | None = "base_model") -> None:
        super().__init__(message, param=param)


@dataclass
class HotAdapter:
    lora_id: str
    peft_name: str
    metadata: LoraMetadata
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.AdamW
    snapshot: Path  # the on-disk snapshot these weights and optimizer state equal (freshness check)


def peft_adapter_name(lora_id: str) -> str:
    # PEFT keeps adapters in ModuleDicts whose keys may not contain '.' or '/'; lora ids may.
    return "a" + hashlib.sha1(lora_id.encode()).hexdigest()[:16]


class DistillationTrainer:
    def __init__(
        self,
        *,
        base_model: str,
        store: LoraStore,
        cache_dir: Path,
        device: str = "auto",
        hot_adapters: int = 8,
        default_rank: int = 32,
        default_alpha: int = 64,
        remote_teacher: RemoteTeacher | None = None,
    ) -> None:
        self.base_model = base_model
        self.store = store
        self._cache_dir = cache_dir
        self._device_preference = device
        self._max_hot = hot_adapters
        self._default_rank = default_rank
        self._default_alpha = default_alpha
        self._remote_teacher = remote_teacher
        self._loaded: LoadedModel | None = None
        self._peft: Any = None  # PeftModel once the first adapter exists
        self._hot: OrderedDict[str, HotAdapter] = OrderedDict()
        self._linear_names: set[str] = set()

    @classmethod
    def from_settings(
        cls, settings: Settings, store: LoraStore, remote_teacher: RemoteTeacher | None = None
    ) -> DistillationTrainer:
        return cls(
            base_model=settings.base_model,
            store=store,
            cache_dir=settings.model_cache,
            device=settings.device,
            hot_adapters=settings.hot_adapters,
            default_rank=settings.lora_rank,
            default_alpha=settings.lora_alpha,
            remote_teacher=remote_teacher,
        )

    # ------------------------------------------------------------------ model
    def ensure_loaded(self) -> LoadedModel:
        if self._loaded is None:
            started = time.perf_counter()
            self._loaded = load_model(self.base_model, self._cache_dir, self._device_preference)
            for param in self._loaded.model.parameters():
                param.requires_grad_(False)
            # What LoRA may target, read before any adapter wraps these layers.
            self._linear_names = {name.rpartition(".")[2] for name, module in self._loaded.model.named_modules()
                                  if isinstance(module, torch.nn.Linear)} - {"lm_head"}
            if self._loaded.device.type == "cuda":
                self._loaded.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            logger.info("trainer loaded %s on %s in %.1fs", self.base_model, self._loaded.device,
                        time.perf_counter() - started)
        return self._loaded

    @property
    def device(self) -> torch.device:
        return self.ensure_loaded().device

    @property
    def tokenizer(self) -> Any:
        return self.ensure_loaded().tokenizer

    @property
    def hot_adapter_ids(self) -> list[str]:
        return list(self._hot)

    # ------------------------------------------------------------------ adapters
    def init_lora(self, request: LoraInitRequest) -> LoraMetadata:
        if request.base_model not in (None, self.base_model):
            raise AdapterIncompatibleError(
                f"this engine trains on base model {self.base_model!r}, not {request.base_model!r}"
            )
        if self.store.exists(request.lora_id):  # also validates the id
            raise LoraExistsError(f"adapter {request.lora_id!r} already exists")
        self.evict(request.lora_id)  # a stale hot copy of an adapter deleted by another process
        target_modules = request.target_modules or DEFAULT_TARGET_MODULES
        self._check_target_modules(target_modules)
        config = LoraConfig(
            r=request.lora_r or self._default_rank,
            lora_alpha=request.lora_alpha or self._default_alpha,
            target_modules=target_modules,
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        )
        name = peft_adapter_name(request.lora_id)
        params, optimizer = self._attach_trainable(name, config=config)
        metadata = LoraMetadata(  # the store stamps created_at / updated_at
            lora_id=request.lora_id,
            base_model=self.base_model,
            rank=config.r,
            alpha=int(config.lora_alpha),
            target_modules=list(target_modules),
        )
        try:
            self.store.create(request.lora_id, lambda d: self._write_adapter(d, name, optimizer), metadata)
        except BaseException:
            self._detach(name)
            raise
        snapshot = self.store.snapshot_path(request.lora_id)
        metadata = _snapshot_metadata(snapshot, request.lora_id)
        hot = HotAdapter(request.lora_id, name, metadata, params, optimizer, snapshot)
        self._remember(hot)
        return hot.metadata

    def _check_target_modules(self, target_modules: list[str]) -> None:
        """Refuse module names the base model has no linear layer for, before anything is attached or written."""
        self.ensure_loaded()
        linear = self._linear_names
        unknown = sorted(set(target_modules) - linear)
        if unknown:
            raise UnprocessableError(
                f"target_modules {unknown} are not linear layers of {self.base_model!r}; "
                f"choose from {sorted(linear)}",
                param="target_modules",
            )

    def evict(self, lora_id: str) -> None:
        hot = self._hot.pop(lora_id, None)
        if hot is not None:
            self._detach(hot.peft_name)

    def _hot_adapter(self, lora_id: str) -> HotAdapter:
        """The adapter in memory, equal to its current on-disk snapshot.

        Another process sharing the adapter root may have saved a newer snapshot since this copy was loaded or
        saved; stepping the stale copy would overwrite that update (a lost update). So the hot copy is used only
        while the public link still points at the snapshot it equals; otherwise it is reloaded. Callers that
        step hold the adapter's store lock, so the snapshot cannot change between this check and the save.
        """
        path = self.store.snapshot_path(lora_id)  # one consistent snapshot for weights and optimizer state
        hot = self._hot.get(lora_id)
        if hot is not None:
            if hot.snapshot == path:
                self._hot.move_to_end(lora_id)
                return hot
            logger.info("adapter %s was saved elsewhere since it was loaded (%s -> %s): reloading",
                        lora_id, hot.snapshot.name, path.name)
            self.evict(lora_id)
        metadata = _snapshot_metadata(path, lora_id)
        if metadata.base_model != self.base_model:
            raise AdapterIncompatibleError(
                f"adapter {lora_id!r} was made for {metadata.base_model!r}; this engine trains {self.base_model!r}"
            )
        name = peft_adapter_name(lora_id)
        params, optimizer = self._attach_trainable(name, path=path)
        hot = HotAdapter(lora_id, name, metadata, params, optimizer, path)
        self._remember(hot)
        return hot

    def _remember(self, hot: HotAdapter) -> None:
        self._hot[hot.lora_id] = hot
        self._hot.move_to_end(hot.lora_id)
        while len(self._hot) > self._max_hot:
            oldest, _ = next(iter(self._hot.items()))
            self.evict(oldest)

    def _attach_trainable(
        self, name: str, *, config: LoraConfig | None = None, path: Path | None = None
    ) -> tuple[list[torch.nn.Parameter], torch.optim.AdamW]:
        """Attach a new (`config`) or saved (`path`) adapter with its AdamW (state restored from `path` if saved)."""
        self._attach(name, config=config, path=path)
        try:
            params = self._adapter_params(name)
            optimizer = torch.optim.AdamW(params, lr=TrainingConfig().learning_rate)
            optimizer_file = path / OPTIMIZER_FILE if path is not None else None
            if optimizer_file is not None and optimizer_file.is_file():
                optimizer.load_state_dict(torch.load(optimizer_file, map_location=self.device, weights_only=True))
        except BaseException:
            self._detach(name)
            raise
        return params, optimizer

    def _attach(self, name: str, *, config: LoraConfig | None = None, path: Path | None = None) -> None:
        base = self.ensure_loaded().model
        if self._peft is None:
            if config is not None:
                self._peft = get_peft_model(base, config, adapter_name=name)
            else:
                self._peft = PeftModel.from_pretrained(base, str(path), adapter_name=name, is_trainable=True)
        elif config is not None:
            self._peft.add_adapter(name, config)
        else:
            self._peft.load_adapter(str(path), adapter_name=name, is_trainable=True)
        self._peft.to(self.device)

    def _detach(self, name: str) -> None:
        if self._peft is not None and name in self._peft.peft_config:
            with warnings.catch_warnings():
                # PEFT warns when the active adapter goes; every step selects its adapter explicitly.
                warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
                self._peft.delete_adapter(name)

    def _adapter_params(self, name: str) -> list[torch.nn.Parameter]:
        params = [p for n, p in self._peft.named_parameters() if f".{name}." in n]
        if not params:
            raise RuntimeError(f"adapter {name} has no parameters after loading")
        for param in params:
            param.requires_grad_(True)
        return params

    def _write_adapter(self, directory: Path, name: str, optimizer: torch.optim.Optimizer) -> None:
        state = get_peft_model_state_dict(self._peft, adapter_name=name, save_embedding_layers=False)
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, directory / "adapter_model.safetensors")
        config = self._peft.peft_config[name]
        config.base_model_name_or_path = self.base_model
        config.save_pretrained(str(directory))
        torch.save(optimizer.state_dict(), directory / OPTIMIZER_FILE)

    # ------------------------------------------------------------------ training
    def step(self, batch: DistillBatch) -> DistillResult:
        timing: dict[str, float] = {}
        started = time.perf_counter()
        hot = self._hot_adapter(batch.lora_id)
        timing["load_adapter"] = _ms_since(started)
        try:
            return self._step_hot(hot, batch, timing)
        except BaseException:
            # The in-memory weights or optimizer may be half-updated; drop them so disk stays the truth.
            self.evict(batch.lora_id)
            raise

    def _step_hot(self, hot: HotAdapter, batch: DistillBatch, timing: dict[str, float]) -> DistillResult:
        cfg = batch.training
        model = self._peft
        model.set_adapter(hot.peft_name)
        for param in hot.params:
            param.requires_grad_(True)
        for group in hot.optimizer.param_groups:
            group["lr"] = cfg.learning_rate
            group["weight_decay"] = cfg.weight_decay

        phase = time.perf_counter()
        examples = [self._tensors(example, cfg.feedback_placement) for example in batch.examples]
        timing["tokenize"] = _ms_since(phase)
        dropped: dict[str, float] = {}
        if cfg.teacher_demonstration:
            phase = time.perf_counter()
            demonstrations = [self._teacher_demonstration(t) for t in examples]
            kept = [d for d in demonstrations if not is_degenerate(d.response_ids)]
            # A looping teacher answer is no demonstration: the served answer is still distilled token by token.
            dropped["demonstrations_dropped"] = float(len(demonstrations) - len(kept))
            examples += kept
            timing["demonstrate"] = _ms_since(phase)

        metrics: dict[str, float] = {}
        for _ in range(cfg.steps):
            phase = time.perf_counter()
            hot.optimizer.zero_grad(set_to_none=True)
            totals: dict[str, float] = {"loss": 0.0, "jsd": 0.0, "kl_reg": 0.0, "is_ratio_mean": 0.0,
                                        "is_clip_fraction": 0.0, "student_logprob_mean": 0.0, "tokens": 0.0}
            for tensors in examples:
                out = self._example_loss(tensors, cfg)
                (out.loss / len(examples)).backward()
                totals["loss"] += out.loss.item() / len(examples)
                totals["jsd"] += out.jsd / len(examples)
                totals["kl_reg"] += out.kl_reg / len(examples)
                totals["is_ratio_mean"] += out.is_ratio_mean / len(examples)
                totals["is_clip_fraction"] += out.is_clip_fraction / len(examples)
                totals["student_logprob_mean"] += out.student_logprobs.mean().item() / len(examples)
                totals["tokens"] += out.tokens
            grad_norm = torch.nn.utils.clip_grad_norm_(hot.params, cfg.max_grad_norm)
            if not torch.isfinite(grad_norm):
                raise FloatingPointError(f"non-finite gradient norm {grad_norm.item()} for {hot.lora_id}")
            hot.optimizer.step()
            hot.optimizer.zero_grad(set_to_none=True)
            totals["grad_norm"] = float(grad_norm)
            metrics = totals | dropped
            timing["compute"] = timing.get("compute", 0.0) + _ms_since(phase)

        phase = time.perf_counter()
        metadata = replace(hot.metadata, step=hot.metadata.step + cfg.steps, extra={"last_metrics": metrics})
        writer = lambda d: self._write_adapter(d, hot.peft_name, hot.optimizer)  # noqa: E731
        if batch.save_mode == "version":
            saved_id = self.store.save_version(hot.lora_id, writer, metadata)
            # The in-place adapter must stay as it was on disk: drop the stepped weights from memory.
            self.evict(hot.lora_id)
        else:
            self.store.save(hot.lora_id, writer, metadata)
            hot.snapshot = self.store.snapshot_path(hot.lora_id)
            hot.metadata = _snapshot_metadata(hot.snapshot, hot.lora_id)
            saved_id = hot.lora_id
        timing["save"] = _ms_since(phase)
        return DistillResult(lora_id=saved_id, step=metadata.step, metrics=metrics, timing_ms=timing)

    def _tensors(self, example: TrainingExample, placement: FeedbackPlacement = "user") -> ExampleTokens:
        return example_tokens(self.tokenizer, example, placement)

    def _teacher_demonstration(self, t: ExampleTokens, max_tokens: int = 128) -> ExampleTokens:
        """The teacher's own greedy answer to the prompt (frozen base, teacher prompt), as one more example: the
        student is trained on it exactly like on its own answer (teacher-forced, no importance weight)."""
        prompt = torch.tensor([t.teacher_prompt_ids], device=self.device)
        eos = self.tokenizer.eos_token_id
        with torch.no_grad(), self._peft.disable_adapter():
            out = self._causal_lm().generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=min(max(len(t.response_ids), 16), max_tokens),
                do_sample=False,
                pad_token_id=eos,
            )
        answer = out[0, prompt.shape[1] :].tolist()
        if eos is not None and eos in answer:
            answer = answer[: answer.index(eos) + 1]  # keep the stop: the answer ends here
        return ExampleTokens(t.prompt_ids, answer, t.teacher_prompt_ids, None)

    def _causal_lm(self) -> Any:
        """The transformers model (with LoRA layers injected in place when adapters exist)."""
        return self._peft.get_base_model() if self._peft is not None else self.ensure_loaded().model

    def _lm_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        head = self._causal_lm().get_output_embeddings()
        return head.weight.detach(), None if head.bias is None else head.bias.detach()

    def _response_hidden(self, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
        """Final-norm hidden states at the positions that predict each response token: [T, H].

        The loss applies the LM head itself, chunk by chunk, so [T, V] logits never exist (memory O(chunk x V)).
        """
        ids = torch.tensor([prompt_ids + response_ids], device=self.device)
        hidden = self._causal_lm().get_decoder()(input_ids=ids).last_hidden_state[0]  # [P+T, H]
        return hidden[-(len(response_ids) + 1) : -1]

    def _token_logprobs(self, hidden: torch.Tensor, token_ids: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """log p(token_t) from hidden states [T, H], without materialising [T, V]: [T]."""
        weight, bias = self._lm_head()
        rows = []
        for start in range(0, hidden.shape[0], chunk):
            logits = torch.nn.functional.linear(hidden[start : start + chunk], weight, bias).float()  # [c, V]
            rows.append(logits.log_softmax(-1).gather(-1, token_ids[start : start + chunk, None]).squeeze(-1))
        return torch.cat(rows)

    def _example_loss(self, t: ExampleTokens, cfg: TrainingConfig) -> Any:
        device = self.device
        response = torch.tensor(t.response_ids, device=device)
        teacher_kwargs: dict[str, Any] = {}
        base_logprobs = None
        with torch.no_grad():
            if cfg.teacher_mode == "remote":
                if self._remote_teacher is None:
                    raise ValueError("teacher_mode=remote needs CLAAS_REMOTE_TEACHER_URL and _MODEL to be set")
                scores = self._remote_teacher.score(t.teacher_prompt_ids, t.response_ids, cfg.teacher_top_k)
                teacher_kwargs = {"teacher_topk_logprobs": scores.logprobs.to(device),
                                  "teacher_topk_ids": scores.ids.to(device)}
            with self._peft.disable_adapter():
                if cfg.teacher_mode == "self":
                    teacher_kwargs = {"teacher_hidden": self._response_hidden(t.teacher_prompt_ids, t.response_ids)}
                if cfg.kl_reg_weight > 0:
                    base_logprobs = self._token_logprobs(self._response_hidden(t.prompt_ids, t.response_ids), response)
        mode = "teacher_topk" if cfg.teacher_mode == "remote" else cfg.loss_mode
        # Gradient checkpointing (CUDA) only acts in train mode; nothing in these models uses dropout.
        self._peft.train(self.device.type == "cuda")
        try:
            student_hidden = self._response_hidden(t.prompt_ids, t.response_ids)  # [T, H]
        finally:
            self._peft.eval()
        weight, bias = self._lm_head()
        rollout = torch.tensor(t.rollout_logprobs, device=device) if t.rollout_logprobs is not None else None
        return sdpo_loss_from_hidden(
            student_hidden=student_hidden,
            lm_head_weight=weight,
            lm_head_bias=bias,
            response_ids=response,
            response_mask=torch.ones_like(response, dtype=torch.bool),
            alpha=cfg.alpha,
            is_clip=cfg.is_clip,
            kl_reg_weight=cfg.kl_reg_weight,
            top_k=cfg.teacher_top_k,
            mode=mode,
            rollout_logprobs=rollout,
            base_logprobs=base_logprobs,
            **teacher_kwargs,
        )

    # ------------------------------------------------------------------ scoring (tests, eval)
    def response_logprobs(self, lora_id: str | None, messages: list[dict[str, Any]], response_text: str) -> list[float]:
        """Per-token logprobs of `response_text` after `messages`, under the adapter (or the base if None)."""
        example = TrainingExample(messages=messages, response_text=response_text, feedback="-")
        t = self._tensors(example)
        response = torch.tensor(t.response_ids, device=self.device)
        with torch.no_grad():
            if lora_id is None:
                with self._peft.disable_adapter() if self._peft is not None else contextlib.nullcontext():
                    hidden = self._response_hidden(t.prompt_ids, t.response_ids)
            else:
                self._peft.set_adapter(self._hot_adapter(lora_id).peft_name)
                hidden = self._response_hidden(t.prompt_ids, t.response_ids)
            return self._token_logprobs(hidden, response).tolist()

    def health(self) -> dict[str, Any]:
        return {
            "base_model": self.base_model,
            "loaded": self._loaded is not None,
            "device": str(self._loaded.device) if self._loaded else None,
            "hot_adapters": len(self._hot),
        }


def _snapshot_metadata(snapshot: Path, lora_id: str) -> LoraMetadata:
    """The metadata of one snapshot (not of whatever the public link points at by the time it is read)."""
    try:
        return LoraMetadata.from_json((snapshot / METADATA_FILE).read_text())
    except FileNotFoundError as e:  # collected after being superseded and deleted: the adapter is gone or newer
        raise LoraNotFoundError(f"no adapter {lora_id!r}") from e
    except (OSError, ValueError) as e:
        raise LoraStoreError(f"unreadable metadata in the snapshot of adapter {lora_id!r}") from e


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 3)

