"""The LLM2LLM loop job: pydantic models, loaded from YAML with the same error messages as jobs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from augment_ray.config.base import SamplingOverrides, Spec
from augment_ray.config.dates import read_job_yaml
from augment_ray.config.io import InputSpec, OutputSpec
from augment_ray.config.job import AnyEngineSpec, check_engine_reference, validate_spec


class TrainSpec(Spec):
    """The user's training command, run between rounds (outside Ray, on the driver's machine)."""

    command: str = Field(
        description="shell command; {train_uri}, {train_dir} (local path of a local train "
        "set), {round}, {model_dir} and {previous_model} are filled in, shell-quoted"
    )
    model_dir: str = Field(
        description="where the command leaves the student model; {round} and {output} are "
        "filled in, e.g. /models/llm2llm/round-{round}"
    )
    timeout_s: int | None = Field(None, gt=0, description="kill the command after this long")


class StudentSpec(Spec):
    engine: str = Field(description="engine that answers the seed rows (the student)")
    sampling: SamplingOverrides | None = None
    predictions: str | None = Field(
        None,
        description="instead of running the student: a parquet/jsonl file or folder per round "
        "with columns id, prediction ({round} is filled in); train and student are skipped",
    )


class GraderSpec(Spec):
    kind: Literal["final_number", "exact", "label", "llm_judge"] = Field(
        "final_number",
        description="final_number: the same final number (GSM8K '#### N', else the last "
        "number); exact: equal after case/space folding; label: the first allowed label in the "
        "answer equals the reference; llm_judge: an engine says whether the answer matches",
    )
    labels: list[str] | None = Field(None, description="allowed labels (kind: label)")
    engine: str | None = Field(None, description="judge engine (kind: llm_judge)")

    @model_validator(mode="after")
    def _needs(self) -> GraderSpec:
        if self.kind == "label" and not self.labels:
            raise ValueError("kind: label needs `labels`")
        if self.kind == "llm_judge" and not self.engine:
            raise ValueError("kind: llm_judge needs `engine`")
        return self


class TeacherSpec(Spec):
    engine: str = Field(description="engine that writes new examples")
    per_wrong: int = Field(1, gt=0, le=16, description="new examples per wrong seed (m)")
    task: Literal["math", "classification", "generic"] = Field(
        "math",
        description="math: a rationale ending in '#### N'; classification: a label from "
        "`labels`; generic: any non-empty answer",
    )
    labels: list[str] | None = None
    sampling: SamplingOverrides | None = None
    max_retries: int = Field(2, ge=0, le=10, description="new tries for an invalid example")

    @model_validator(mode="after")
    def _labels(self) -> TeacherSpec:
        if self.task == "classification" and not self.labels:
            raise ValueError("task: classification needs `labels`")
        return self


class LoopDedupSpec(Spec):
    """New examples are compared with every row so far (seeds, earlier rounds' examples, and the
    earlier accepted examples of the same round) by MinHash of the folded instruction."""

    threshold: float = Field(0.8, gt=0.0, le=1.0, description="estimated Jaccard that rejects")
    shingle_size: int = Field(5, gt=0, le=32, description="character n-grams")
    num_perm: int = Field(128, ge=16, le=1024)


class LoopJobSpec(Spec):
    name: str = "llm2llm"
    seeds: InputSpec = Field(description="the seed training set; only these rows are evaluated")
    eval: InputSpec | None = Field(None, description="held-out set: accuracy per round")
    output: OutputSpec
    engines: dict[str, AnyEngineSpec]
    rounds: int = Field(2, gt=0, le=50)
    train: TrainSpec | None = Field(
        None, description="omitted: no training; the student engine is used as it is"
    )
    student: StudentSpec
    grader: GraderSpec = GraderSpec()
    teacher: TeacherSpec
    dedup: LoopDedupSpec = LoopDedupSpec()

    @model_validator(mode="after")
    def _engines(self) -> LoopJobSpec:
        for where, name in (("student.engine", self.student.engine),
                            ("teacher.engine", self.teacher.engine),
                            ("grader.engine", self.grader.engine)):
            check_engine_reference(where, name, self.engines)
        return self


def parse_loop_job(data: Any, source: str = "job") -> LoopJobSpec:
    return validate_spec(LoopJobSpec, data, source)


def load_loop_job(path: str | Path) -> LoopJobSpec:
    return parse_loop_job(read_job_yaml(path), source=str(path))
