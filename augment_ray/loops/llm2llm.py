"""LLM2LLM: targeted, iterative augmentation of the seed examples a student gets wrong.

Round r (0-based), with train_0 = the seeds:
  1. train    the user's command on train_r -> a student model (optional)
  2. evaluate the student answers every seed row (and the eval set); a grader marks each answer
  3. select   the seed rows it got wrong: only original seeds, never generated rows
  4. generate the teacher writes `per_wrong` new examples per wrong seed, validated per task
  5. dedup    new examples nearly equal to any row so far are rejected; the rest are merged:
              train_{r+1} = train_r + accepted
A conversation seed (a `messages` column) is asked its last answered user turn, given the turns
before it, and graded against its last assistant turn (`output`); it stays a conversation in
the training sets.
Layout under the output URI:
  _loop.json                      job digest: a rerun with another job is refused
  round=NN/train/part-00000.parquet        the training set of round NN (before training)
  round=NN/predictions/part-00000.parquet  seed rows + student answer + grade
  round=NN/eval_predictions/...            the same for the eval set, when given
  round=NN/generated/part-00000.parquet    accepted new examples
  round=NN/_rejects/part-00000.parquet     teacher outputs rejected, with reject_reason
  round=NN/_report.json, round=NN/_DONE    the round's figures; _DONE is written last
  train/part-00000.parquet, _report.json, _SUCCESS   the final training set and all rounds
A rerun resumes after the last round with _DONE (an unfinished round is done again).
"""

from __future__ import annotations

import logging
import shlex
import subprocess
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data

from augment_ray.config.base import EngineSpec
from augment_ray.config.io import InputSpec
from augment_ray.conversations import CONVERSATION_TYPE, MESSAGES
from augment_ray.errors import AugmentRayError, StorageError
from augment_ray.io.committed import SUCCESS, has_marker, read_json, spec_digest
from augment_ray.io.read import list_input_shards
from augment_ray.io.write import write_json, write_marked
from augment_ray.loops.config import LoopJobSpec
from augment_ray.loops.graders import NearDuplicateIndex, grade
from augment_ray.pipeline import (
    check_cpu_budget,
    connect_ray,
    read_dataset,
)
from augment_ray.rows import ID, ORIGIN_STEP, REJECT_REASON, REJECT_STEP, SOURCE_ID, derived_id
from augment_ray.run_errors import user_errors_unwrapped
from augment_ray.steps.engine_pool import prepare_engine
from augment_ray.steps.llm import LLMStep, RunOptions
from augment_ray.storage import Location, describe_os_error, location
from augment_ray.tasks.llm2llm import (
    JUDGE_VERDICT,
    PREDICTION,
    JudgeGradeTask,
    PredictTask,
    TeacherTask,
)

log = logging.getLogger(__name__)

TEACHER = "teacher"
ROUND = "llm2llm_round"
PARENT = "llm2llm_parent_id"
TRAIN_SCHEMA = pa.schema([
    (ID, pa.string()), ("instruction", pa.string()), ("input", pa.string()),
    ("output", pa.string()), (SOURCE_ID, pa.string()), (ORIGIN_STEP, pa.string()),
    (ROUND, pa.int32()), (PARENT, pa.string()),
])
PART = "part-00000.parquet"
LOOP = "_loop.json"  # the job digest: a rerun with another job is refused
REPORT = "_report.json"
DONE = "_DONE"  # written last in a round: the resume unit


class LoopError(AugmentRayError):
    exit_code = 1


def round_name(index: int) -> str:
    return f"round={index:02d}"


def job_digest(job: LoopJobSpec) -> str:
    """What must match for a rerun to resume: the spec as a pipeline job's digest takes it
    (without output.mode), and without the number of rounds (a finished 2-round run can be
    extended to 3)."""
    return spec_digest(job, leave_out={"rounds"})


# ------------------------------------------------------------------ storage


def write_table(loc: Location, folder: str, table: pa.Table) -> str:
    target = loc.join(folder)
    try:
        loc.fs.create_dir(target.path, recursive=True)
        pq.write_table(table, f"{target.path}/{PART}", filesystem=loc.fs, compression="zstd")
    except (OSError, pa.ArrowException) as error:
        raise describe_os_error(target, "write to", error) from None
    return target.uri


def read_table(loc: Location, folder: str) -> pa.Table:
    try:
        return pq.read_table(f"{loc.join(folder).path}/{PART}", filesystem=loc.fs)
    except (OSError, pa.ArrowException) as error:
        raise describe_os_error(loc.join(folder), "read", error) from None


def prepare_loop_output(output: Location, job: LoopJobSpec, overwrite: bool) -> int:
    """The first round still to do. A different job's output is refused (or cleared with
    overwrite); rounds with _DONE are kept."""
    try:
        info = output.file_info()
        digest = job_digest(job)
        if info.type == pafs.FileType.Directory and overwrite:
            output.fs.delete_dir_contents(output.path)
        elif info.type == pafs.FileType.Directory and has_marker(output, LOOP):
            previous = read_json(output, LOOP)
            if previous.get("job_digest") != digest:
                raise StorageError(
                    f"Output {output.uri} holds a loop run of another job (digest "
                    f"{previous.get('job_digest')} != {digest}); choose another output.uri or "
                    "pass --overwrite."
                )
        elif info.type == pafs.FileType.Directory and output.fs.get_file_info(
                pafs.FileSelector(output.path, recursive=False)):
            if job.output.mode == "error-if-exists":
                raise StorageError(f"Output {output.uri} already holds files that are not a "
                                   "loop run; choose another output.uri or pass --overwrite.")
            output.fs.delete_dir_contents(output.path)
        output.fs.create_dir(output.path, recursive=True)
        write_json(output, LOOP, {"job": job.name, "job_digest": digest})
        done = 0
        while done < job.rounds and has_marker(output.join(round_name(done)), DONE):
            done += 1
        return done
    except StorageError:
        raise
    except (OSError, pa.ArrowException) as error:
        raise describe_os_error(output, "prepare output", error) from None


# ------------------------------------------------------------------ stages


def collect(ds: ray.data.Dataset) -> pa.Table:
    tables = [t for t in ray.get(ds.to_arrow_refs()) if len(t)]
    return pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})


def read_input(spec: InputSpec) -> tuple[pa.Table, pa.Table]:
    """(live rows, rows the reader rejected) of a seed or eval set."""
    table = collect(read_dataset(spec, list_input_shards(spec)))
    rejected = pc.is_valid(table[REJECT_STEP])
    return table.filter(pc.invert(rejected)), table.filter(rejected)


def as_train(table: pa.Table) -> pa.Table:
    """`table` in the training set's columns, and a conversation seed's turns (`messages`)
    where the seeds have them: without them its instruction and output are not a pair."""
    schema = TRAIN_SCHEMA if MESSAGES not in table.column_names else \
        TRAIN_SCHEMA.append(pa.field(MESSAGES, CONVERSATION_TYPE))
    columns = {}
    for field in schema:
        if field.name in table.column_names:
            columns[field.name] = table[field.name].cast(field.type)
        else:
            columns[field.name] = pa.nulls(len(table), field.type)
    return pa.table(columns, schema=schema)


class Loop:
    def __init__(self, job: LoopJobSpec, output: Location) -> None:
        self.job = job
        self.output = output

    def step(self, name: str, engine: str, task: Any, sampling_overrides: Any = None,
             retries: int = 0, engine_spec: EngineSpec | None = None,
             seed_offset: int = 0) -> LLMStep:
        spec = engine_spec or self.job.engines[engine]
        sampling = spec.sampling.merged(sampling_overrides)
        sampling = sampling.model_copy(update={"seed": sampling.seed + seed_offset})
        return LLMStep(name=name, kind=name, engine_name=engine, engine_spec=spec, task=task,
                       sampling=sampling,
                       options=RunOptions(max_retries=retries, keep_seeds=False))

    def predict(self, rows: pa.Table, student: EngineSpec, round_index: int,
                folder: str) -> pa.Table:
        """The student's answers, graded: columns student_prediction, correct, grade_detail."""
        job = self.job
        if job.student.predictions:
            table = self._supplied_predictions(rows, round_index)
        else:
            step = self.step("student", job.student.engine, PredictTask(),
                             job.student.sampling, engine_spec=student)
            table = collect(step.apply(ray.data.from_arrow(rows)))
            if job.grader.kind == "llm_judge":
                judge = self.step("grader", job.grader.engine, JudgeGradeTask(), retries=1)
                table = collect(judge.apply(ray.data.from_arrow(table)))
        predictions = table[PREDICTION].to_pylist()
        references = table["output"].to_pylist()
        verdicts = (table[JUDGE_VERDICT].to_pylist() if JUDGE_VERDICT in table.column_names
                    else [None] * len(table))
        failed = table[REJECT_REASON].to_pylist()
        grades = [grade(p, r, job.grader, v) if f is None else (False, f"no answer: {f}")
                  for p, r, v, f in zip(predictions, references, verdicts, failed, strict=True)]
        table = table.append_column("correct", pa.array([g[0] for g in grades], pa.bool_()))
        table = table.append_column("grade_detail", pa.array([g[1] for g in grades], pa.string()))
        # the student's failures are graded wrong, not rejected: the rows stay seeds
        table = table.drop_columns([REJECT_STEP, REJECT_REASON, "reject_detail"])
        write_table(self.output, f"{round_name(round_index)}/{folder}", table)
        return table

    def _supplied_predictions(self, rows: pa.Table, round_index: int) -> pa.Table:
        uri = self.job.student.predictions.format(round=round_index)
        spec = InputSpec(uri=uri, columns={"instruction": "prediction", "input": None,
                                           "output": None, "id": "id"},
                         storage=self.job.seeds.storage)
        supplied, empty = read_input(spec)
        answers = dict.fromkeys(empty[ID].to_pylist(), "")  # blank predictions: graded wrong
        answers.update(zip(supplied[ID].to_pylist(), supplied["instruction"].to_pylist(),
                           strict=True))
        missing = [i for i in rows[ID].to_pylist() if i not in answers]
        if missing:
            raise LoopError(f"{uri} has no prediction for {len(missing)} seed rows "
                            f"(e.g. id {missing[0]!r}); it needs columns id, prediction.")
        table = rows.append_column(PREDICTION, pa.array(
            [answers[i] for i in rows[ID].to_pylist()], pa.string()))
        for name in (REJECT_STEP, REJECT_REASON, "reject_detail"):
            if name not in table.column_names:
                table = table.append_column(name, pa.nulls(len(table), pa.string()))
        return table

    def generate(self, wrong: pa.Table, seed_columns: list[str], round_index: int,
                 index: NearDuplicateIndex) -> tuple[pa.Table, pa.Table]:
        """(accepted new examples in train form, rejected teacher outputs with reasons)."""
        job = self.job
        if not len(wrong):
            return as_train(wrong.slice(0, 0)), pa.table({})
        seeds = wrong.select([c for c in seed_columns if c in wrong.column_names])
        for name in (REJECT_STEP, REJECT_REASON, "reject_detail"):
            if name not in seeds.column_names:
                seeds = seeds.append_column(name, pa.nulls(len(seeds), pa.string()))
        task = TeacherTask(job.teacher.task, job.teacher.per_wrong, job.teacher.labels)
        # a new seed per round: with an unchanged student the same seeds are wrong again, and
        # the same seed would write the same examples, all rejected as near duplicates
        step = self.step(TEACHER, job.teacher.engine, task, job.teacher.sampling,
                         job.teacher.max_retries, seed_offset=round_index)
        table = collect(step.apply(ray.data.from_arrow(seeds)))
        table = table.filter(pc.equal(table[ORIGIN_STEP], TEACHER))  # not the seeds themselves
        # ids: unique per round, since a seed can be wrong again in a later round
        ids = [derived_id(i, f"llm2llm.round{round_index}", 0) for i in table[ID].to_pylist()]
        table = table.set_column(table.schema.get_field_index(ID), ID, pa.array(ids))
        table = table.append_column(ROUND, pa.array([round_index] * len(table), pa.int32()))
        table = table.append_column(PARENT, table[f"{TEACHER}_parent_id"])
        reasons = table[REJECT_REASON].to_pylist()
        details = table["reject_detail"].to_pylist()
        for k, (row_id, text) in enumerate(zip(ids, table["instruction"].to_pylist(),
                                               strict=True)):
            if reasons[k] is None:
                admitted, why = index.admit(row_id, text)
                if not admitted:
                    reasons[k], details[k] = "near_duplicate", why
        table = table.set_column(table.schema.get_field_index(REJECT_REASON), REJECT_REASON,
                                 pa.array(reasons, pa.string()))
        table = table.set_column(table.schema.get_field_index("reject_detail"), "reject_detail",
                                 pa.array(details, pa.string()))
        rejected = pc.is_valid(table[REJECT_REASON])
        step_column = pc.if_else(rejected, pa.scalar(TEACHER), table[REJECT_STEP])
        table = table.set_column(table.schema.get_field_index(REJECT_STEP), REJECT_STEP,
                                 step_column)
        return as_train(table.filter(pc.invert(rejected))), table.filter(rejected)

    def train(self, round_index: int, train_uri: str, previous: str | None) -> str | None:
        spec = self.job.train
        if spec is None:
            return None
        model_dir = spec.model_dir.format(round=round_index, output=self.job.output.uri)
        train_loc = location(train_uri, self.job.output.storage)
        values = {"train_uri": train_uri, "train_dir": train_loc.path if train_loc.is_local
                  else train_uri, "round": str(round_index), "model_dir": model_dir,
                  "previous_model": previous or ""}
        command = spec.command.format(**{k: shlex.quote(v) for k, v in values.items()})
        log.info("round %d: training: %s", round_index, command)
        try:
            done = subprocess.run(command, shell=True, timeout=spec.timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise LoopError(f"Round {round_index}: the train command ran over "
                            f"{spec.timeout_s}s and was stopped.") from None
        if done.returncode != 0:
            raise LoopError(f"Round {round_index}: the train command exited with "
                            f"{done.returncode}; see its output above. Command: {command}")
        return model_dir

    def run_round(self, r: int, seeds: pa.Table, eval_rows: pa.Table | None, train: pa.Table,
                  student_model: str | None) -> tuple[pa.Table, str | None, dict[str, Any]]:
        job = self.job
        started = time.perf_counter()
        name = round_name(r)
        self.output.fs.delete_dir_contents(self.output.join(name).path, missing_dir_ok=True)
        train_uri = write_table(self.output, f"{name}/train", train)
        student = job.engines[job.student.engine]
        trained = None
        if not job.student.predictions:
            trained = self.train(r, train_uri, student_model)
            if trained:
                student = student.model_copy(update={"model": trained})
                prepare_engine(student)
        predictions = self.predict(seeds, student, r, "predictions")
        wrong = predictions.filter(pc.invert(predictions["correct"]))
        report: dict[str, Any] = {
            "round": r, "train_rows": len(train),
            "student_model": trained or ("supplied predictions" if job.student.predictions
                                         else student.model),
            "train": "skipped" if job.train is None or job.student.predictions else "ran",
            "seed_rows": len(seeds), "seed_correct": len(seeds) - len(wrong),
            "seed_accuracy": round((len(seeds) - len(wrong)) / len(seeds), 4) if len(seeds)
            else None, "wrong": len(wrong),
        }
        if eval_rows is not None and not job.student.predictions:
            graded = self.predict(eval_rows, student, r, "eval_predictions")
            correct = int(pc.sum(graded["correct"]).as_py() or 0)
            report["eval_rows"] = len(graded)
            report["eval_accuracy"] = round(correct / len(graded), 4) if len(graded) else None
        index = NearDuplicateIndex(job.dedup)
        index.add(train[ID].to_pylist(), train["instruction"].to_pylist())
        accepted, rejected = self.generate(wrong, seeds.column_names, r, index)
        write_table(self.output, f"{name}/generated", accepted)
        if len(rejected):
            write_table(self.output, f"{name}/_rejects", rejected)
        reasons = rejected[REJECT_REASON].to_pylist() if len(rejected) else []
        report.update({
            "generated": len(accepted) + len(rejected), "accepted": len(accepted),
            "rejected": {reason: reasons.count(reason) for reason in sorted(set(reasons))},
            "next_train_rows": len(train) + len(accepted),
            "seconds": round(time.perf_counter() - started, 2),
        })
        write_marked(self.output.join(name), {REPORT: report}, DONE, {"round": r})
        log.info("round %d: %s", r, report)
        return pa.concat_tables([train, accepted]), trained, report


def run_loop(job: LoopJobSpec, *, ray_address: str | None = None,
             overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume) the rounds of `job`; returns the loop report."""
    output = location(job.output.uri, job.output.storage)
    for name in {job.student.engine, job.teacher.engine, job.grader.engine} - {None}:
        prepare_engine(job.engines[name])
    start = prepare_loop_output(output, job, overwrite)
    connect_ray(ray_address)
    loop = Loop(job, output)
    for name in {job.student.engine, job.teacher.engine, job.grader.engine} - {None}:
        # stages run one after another: each pool alone must leave a CPU free
        check_cpu_budget([loop.step("budget", name, PredictTask())])
    with user_errors_unwrapped():
        seeds, seed_rejects = read_input(job.seeds)
        if len(seed_rejects):
            write_table(output, "_rejects/seeds", seed_rejects)
        eval_rows = read_input(job.eval)[0] if job.eval else None
        if start == 0:
            train, student_model = as_train(seeds), None
        else:  # resume: the last finished round's training set plus what it generated
            last = round_name(start - 1)
            train = pa.concat_tables([read_table(output, f"{last}/train"),
                                      read_table(output, f"{last}/generated")])
            student_model = None
            if job.train is not None:
                student_model = job.train.model_dir.format(round=start - 1,
                                                           output=job.output.uri)
            log.info("resuming at round %d: %d training rows", start, len(train))
        reports = []
        for r in range(job.rounds):
            if r < start:
                reports.append({**read_json(output.join(round_name(r)), REPORT),
                                "resumed": True})
                continue
            train, student_model, report = loop.run_round(r, seeds, eval_rows, train,
                                                          student_model)
            reports.append(report)
    write_table(output, "train", train)
    summary = {"job": job.name, "rounds": reports, "final_train_rows": len(train),
               "seed_rows": len(seeds), "seed_rows_rejected": len(seed_rejects),
               "resumed_from_round": start}
    write_marked(output, {REPORT: summary}, SUCCESS, {"job_digest": job_digest(job)})
    return summary


def format_loop_report(report: dict[str, Any]) -> str:
    lines = [f"LLM2LLM job {report['job']!r}: {report['seed_rows']} seeds, "
             f"{len(report['rounds'])} rounds, final training set {report['final_train_rows']} "
             "rows",
             "  round  train  seed_acc  wrong  generated  accepted  eval_acc  rejected"]
    for r in report["rounds"]:
        eval_acc = r.get("eval_accuracy")
        lines.append(
            f"  {r['round']:>5}  {r['train_rows']:>5}  {r['seed_accuracy'] or 0:>8.3f}  "
            f"{r['wrong']:>5}  {r['generated']:>9}  {r['accepted']:>8}  "
            f"{'-' if eval_acc is None else f'{eval_acc:.3f}':>8}  "
            f"{', '.join(f'{k} {v}' for k, v in r['rejected'].items()) or '-'}"
            + ("  (done before)" if r.get("resumed") else ""))
    return "\n".join(lines)

