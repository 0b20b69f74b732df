"""A job run: check inputs, read shards -> steps -> route rows to output/rejects -> commit."""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import ray
import ray.data
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from augment_ray.config.io import InputSpec
from augment_ray.config.job import JobSpec
from augment_ray.curate.diversity import add_diversity
from augment_ray.errors import JobSpecError, RunFailedError, StorageError
from augment_ray.io.committed import (
    STARTED,
    SUCCESS,
    committed_run,
    has_marker,
    spec_digest,
    spec_json,
    started_by,
)
from augment_ray.io.journal import WORK_DIR, journaled_counts
from augment_ray.io.lease import OutputLease, output_lease
from augment_ray.io.read import (
    InputShard,
    check_first_shard,
    check_given_ids_unique,
    list_input_shards,
    read_shards,
)
from augment_ray.io.write import (
    COMPRESSION,
    FORMAT,
    STAGING_DIR,
    RoutingParquetSink,
    WriteStats,
    code_version,
    commit,
    create_output_folder,
    prepare_output,
    write_json,
)
from augment_ray.kinds import build_steps
from augment_ray.progress import (
    ProgressBoard,
    ProgressLogger,
    StepProgress,
    board_of_run,
    count_progress,
    quiet_ray_data,
)
from augment_ray.rows import ID, INPUT_STEP
from augment_ray.run_errors import user_errors_unwrapped
from augment_ray.steps.base import RunContext, Step
from augment_ray.steps.shared_engine import SharedEngineStage, Stage, plan_stages
from augment_ray.storage import Location, location
from augment_ray.summary import build_summary, redact_uri

log = logging.getLogger(__name__)


_STARTED_LOCAL_RAY = True  # False once we join a cluster someone else runs


def _not_token_auth_default_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled for this Ray")


def connect_ray(address: str | None) -> None:
    """Join the cluster named by --ray-address or RAY_ADDRESS (set by `ray job submit`), or start
    a private local one. Never attaches to a stray local cluster by accident."""
    # our errors (a missing column, a bad file) reach the driver as themselves, not as a
    # UserCodeException that has lost them (what ds.materialize() etc. raise by default)
    ray.data.DataContext.get_current().raise_original_map_exception = True
    quiet_ray_data()  # our progress lines replace Ray Data's (AUGMENT_RAY_RAY_PROGRESS=1: both)
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict[str, Any] = {"address": address, "logging_level": logging.WARNING}
    if address == "local":
        kwargs["include_dashboard"] = False
        # Ray tells every new local cluster that token auth is on by default: true, and noise
        # on every run of ours (the private cluster stays on loopback with auth on)
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
            _not_token_auth_default_notice)
    global _STARTED_LOCAL_RAY
    _STARTED_LOCAL_RAY = address == "local"
    ray.init(**kwargs)


@ray.remote(num_cpus=0)
class ReadLedger:
    """Rows each input file gave, told by the read tasks: the run's own count of its input, to
    check against what reached the output. Keyed by file, so a retried read counts once."""

    def __init__(self) -> None:
        self.rows: dict[str, int] = {}

    def record(self, path: str, rows: int) -> None:
        self.rows[path] = rows

    def totals(self) -> tuple[int, int]:
        return sum(self.rows.values()), len(self.rows)


def read_and_count(batch: Any, spec: InputSpec, ledger: Any = None, board: Any = None
                   ) -> Iterator[Any]:
    """read_shards for one file, telling the ledger how many rows it gave (and the progress
    board as they come: a progress map after the read would turn an empty file's block, which
    carries the schema, into a block without one)."""
    rows = 0
    for table in read_shards(batch, spec):
        rows += len(table)
        if board is not None and len(table):
            board.add.remote(INPUT_STEP, len(table), 0)
        yield table
    if ledger is not None:
        ray.get(ledger.record.remote(batch["path"][0].as_py(), rows))


def read_dataset(spec: InputSpec, shards: list[InputShard], ledger: Any = None,
                 board: Any = None) -> ray.data.Dataset:
    """The normalized rows of the input: one read task per input file."""
    return ray.data.from_items(
        [{"path": shard.path, "format": shard.format} for shard in shards],
        override_num_blocks=len(shards),
    ).map_batches(read_and_count, fn_kwargs={"spec": spec, "ledger": ledger, "board": board},
                  batch_size=1, batch_format="pyarrow")


def with_progress(ds: ray.data.Dataset, step: str, board: Any) -> ray.data.Dataset:
    # Ray Data does not call a UDF on an empty block and passes on an empty block without a
    # schema; steps never drop rows, so only an empty input makes one, and the sink skips it
    return ds.map_batches(count_progress, fn_kwargs={"step": step, "board": board},
                          batch_format="pyarrow", batch_size=None, zero_copy_batch=True)


def input_rows_hint(spec: InputSpec, shards: list[InputShard]) -> int | None:
    """Rows of a Parquet input from the files' footers (a few KB each, read in parallel), for
    progress percentages and ETA; None for JSONL (the ledger knows once everything is read)."""
    if any(shard.format != "parquet" for shard in shards):
        return None
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.parquet as pq

    loc = location(spec.uri, spec.storage)

    def rows(shard: InputShard) -> int:
        with loc.fs.open_input_file(shard.path) as handle:
            return pq.ParquetFile(handle).metadata.num_rows

    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            return sum(pool.map(rows, shards))
    except (OSError, ValueError):
        return None  # only a hint: the read reports a broken file properly


def check_cpu_budget(steps: list[Stage]) -> None:
    """Actors that together hold every CPU leave none for read/write tasks: Ray waits forever.
    On a cluster we joined, an autoscaler may add nodes once work queues up: only warn there."""
    total = ray.cluster_resources().get("CPU", 0)
    wanted = sum(step.cpu_request() for step in steps)
    if wanted and wanted > total - 1 and not _STARTED_LOCAL_RAY:
        log.warning(
            "The engines' actors ask for %g CPUs and the cluster has %g now; the run waits "
            "until an autoscaler adds nodes (it never finishes if none can).", wanted, total)
        return
    if wanted and wanted > total - 1:
        raise JobSpecError(
            f"The engines' actors ask for {wanted:g} CPUs but the cluster has {total:g}; "
            "at least one CPU must stay free for reading and writing, or the run never "
            "finishes. Lower engines.*.replicas or engines.*.num_cpus."
        )


def check_column_clashes(steps: list[Step], input_columns: set[str]) -> None:
    """A step must never overwrite an input column or another step's column."""
    taken = {name: "the input" for name in input_columns}
    for step in steps:
        for name in step.output_columns():
            if name in taken:
                raise JobSpecError(
                    f"Step {step.name!r} writes column {name!r}, which {taken[name]} already "
                    "has; give the step another `name` or `output_column`."
                )
            taken[name] = f"step {step.name!r}"


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def run_job(job: JobSpec, *, ray_address: str | None = None, fresh: bool = False
            ) -> dict[str, Any]:
    """Run `job` to completion and return its summary. Raises AugmentRayError subclasses for
    anything the user can fix; the output is committed (_SUCCESS) only after every row is
    written, to data/ or _rejects/, and the run's accounting balances. `fresh` (--force)
    discards an unfinished attempt's journal instead of resuming it."""
    started, started_wall = time.perf_counter(), time.time()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    run_id = new_run_id()

    output = location(job.output.uri, job.output.storage)
    earlier = committed_summary(job, output)
    if earlier is not None:
        return earlier
    shards = list_input_shards(job.input)
    columns = set(check_first_shard(job.input, shards[0]))
    check_given_ids_unique(job.input, shards)
    steps = build_steps(job)
    check_column_clashes(steps, columns)
    create_output_folder(output)
    lease = output_lease(output, run_id, job.name, job.reliability.lease_timeout_s)
    with lease.held():
        # another run may have committed this output while we checked the input
        earlier = committed_summary(job, output)
        if earlier is not None:
            return earlier
        prepare_output(output, *output_mode(job, output, fresh))
        write_json(output, STARTED, {"run_id": run_id, "job_digest": spec_digest(job)})
        clock = RunClock(run_id, started, started_at, started_wall)
        return run_steps(job, output, shards, steps, lease, clock, ray_address)


@dataclass(frozen=True)
class RunClock:
    run_id: str
    started: float  # perf_counter
    started_at: str  # ISO time, for the summary
    started_wall: float  # epoch seconds, for step timings


def run_steps(job: JobSpec, output: Location, shards: list[InputShard], steps: list[Step],
              lease: OutputLease, clock: RunClock, ray_address: str | None) -> dict[str, Any]:
    """The run itself, on a prepared output whose lease this run holds: steps, accounting,
    summary, commit."""
    run_id = clock.run_id
    for step in steps:
        step.prepare()

    connect_ray(ray_address)
    stages = plan_stages(steps)  # consecutive steps on one engine share its pool
    check_cpu_budget(stages)
    log.info("Run %s: %d input files, %d steps", run_id, len(shards), len(steps))
    work = output.join(WORK_DIR) if job.reliability.resume else None
    context = RunContext(run_id, work, job.reliability.max_actor_restarts)
    for step in steps:
        step.context = context
    staging = output.join(STAGING_DIR)
    executed = execute(job, shards, steps, stages, staging)
    stats = executed.stats

    summary = build_summary(
        job_name=job.name, run_id=run_id, input_uri=job.input.uri, output_uri=job.output.uri,
        input_files=len(shards), steps=[step.describe() for step in steps], stats=stats,
        wall_seconds=time.perf_counter() - clock.started, started_at=clock.started_at,
    )
    summary["accounting"] = executed.accounting
    if executed.placement:
        summary["placement"] = executed.placement
    if executed.model_loads:
        summary["model_loads"] = executed.model_loads
    add_step_timing(summary["steps"], executed.timing, clock.started_wall)
    if work is not None:
        summary["journal"] = journaled_counts(work, run_id)
    check_reject_shares(job, summary["steps"])
    manifest = manifest_of(job, run_id, shards, stats, staging)
    # from the written (staged) shards, so _summary.json is written once, before _SUCCESS
    add_diversity(summary["steps"], staging, manifest, job.report.diversity_sample)
    lease.check()  # a run whose lease was taken over must not commit over its taker
    commit(output, manifest, summary, remove_after=(WORK_DIR,))
    return summary


def committed_summary(job: JobSpec, output: Location) -> dict[str, Any] | None:
    """With output.mode error-if-exists, an output committed by this very job spec is done (a
    nightly rerun of a finished date): its summary, marked skipped. Another spec's is refused."""
    done = committed_run(output)
    if done is None or job.output.mode != "error-if-exists":
        return None
    if done["manifest"].get("job_digest") != spec_digest(job):
        raise StorageError(
            f"Output {job.output.uri} holds a committed run of a different job spec "
            f"(run {done['manifest'].get('run_id')}); pass --force (or set output.mode: "
            "overwrite) to replace it."
        )
    log.info("Output %s is already committed by run %s; nothing to do (--force reruns).",
             job.output.uri, done["manifest"].get("run_id"))
    return {**done["summary"], "skipped": "already committed"}


def output_mode(job: JobSpec, output: Location, fresh: bool = False
                ) -> tuple[str, tuple[str, ...]]:
    """(write mode, entries to keep) for prepare_output. An unfinished attempt of this very job
    (a killed driver, a retried RayJob, a failed date submitted again: its _STARTED names this
    job and there is no _SUCCESS) is resumed in either output mode: cleared except for the
    journal of answers it already paid for. output.mode overwrite replaces a committed output
    or another job's files; `fresh` starts over whatever is there."""
    if fresh:
        return "overwrite", ()
    if started_by(output) == spec_digest(job) and not has_marker(output, SUCCESS):
        log.info("Output %s holds an unfinished attempt of this job; resuming it (answers it "
                 "journaled are replayed, everything else runs again; --force starts over).",
                 redact_uri(job.output.uri))
        return "overwrite", (WORK_DIR,)
    return job.output.mode, ()


def on_this_node() -> NodeAffinitySchedulingStrategy:
    """The driver's node: the run's bookkeeping actors live and die with the driver, never on a
    worker node whose loss would lose the run's counts."""
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


@dataclass
class Executed:
    stats: WriteStats
    accounting: dict[str, Any]
    timing: dict[str, StepProgress]  # per step
    placement: dict[str, dict[str, int]]  # per step: node id -> engine actors started there
    model_loads: dict[str, int]  # per engine: model copies its actors loaded


def execute(job: JobSpec, shards: list[InputShard], steps: list[Step], stages: list[Stage],
            staging: Location) -> Executed:
    """Read -> steps (run as `stages`) -> routed write into `staging`, logging progress; then
    check the accounting."""
    ledger = ReadLedger.options(scheduling_strategy=on_this_node()).remote()
    board = ProgressBoard.options(scheduling_strategy=on_this_node()).remote()
    sink = RoutingParquetSink(staging, job.output.max_rows_per_file)
    names = [INPUT_STEP, *(step.name for step in steps)]
    progress = ProgressLogger(board, names, input_rows_hint(job.input, shards), ledger,
                              len(shards))
    with user_errors_unwrapped(job.reliability.max_actor_restarts), progress:
        ds = read_dataset(job.input, shards, ledger, board)
        with board_of_run(board):  # engine pools report their calls' progress to it
            for stage in stages:  # a barrier step runs everything before it here
                ds = apply_counted(stage, ds, board)
        ds.write_datasink(sink)
    rows_read, files_read = ray.get(ledger.totals.remote())
    stats = sink.result
    accounting = check_accounting(staging, stats, rows_read, files_read, len(shards))
    return Executed(stats, accounting, ray.get(board.snapshot.remote()),
                    ray.get(board.placement.remote()), ray.get(board.model_loads.remote()))


def apply_counted(stage: Stage, ds: ray.data.Dataset, board: Any) -> ray.data.Dataset:
    """The stage applied to ds, its rows counted on the board after each of its steps."""
    if isinstance(stage, SharedEngineStage):
        return stage.apply(ds)  # counts after each step inside its actors
    return with_progress(stage.apply(ds), stage.name, board)


def add_step_timing(funnel: list[dict[str, Any]], timing: dict[str, StepProgress],
                    started: float) -> None:
    """When the first and the last rows came out of each step, in seconds since the run
    started: steps stream concurrently, so these overlap instead of adding up."""
    for entry in funnel:
        progress = timing.get(entry["name"])
        if progress is not None and progress.first_seen:
            entry["first_rows_at_s"] = round(progress.first_seen - started, 2)
            entry["last_rows_at_s"] = round(progress.last_seen - started, 2)


def manifest_of(job: JobSpec, run_id: str, shards: list[InputShard], stats: WriteStats,
                staging: Location) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "job": job.name,
        "job_digest": spec_digest(job),  # = job_spec_sha256[:16]; reruns compare it
        "job_spec_sha256": hashlib.sha256(spec_json(job)).hexdigest(),
        "code_version": code_version(),
        "input": redact_uri(job.input.uri),
        "input_files": [shard.path.rsplit("/", 1)[-1] for shard in shards],
        "format": FORMAT,
        "compression": COMPRESSION,
        "files": sorted(stats.files),
        "reject_files": sorted(stats.reject_files),
        "rows": stats.rows_out,
        "rows_rejected": stats.rows_rejected,
        "rows_per_file": dict(sorted(stats.rows_per_file.items())),
        "schema": _schema_of(staging, stats.files),
    }


def check_accounting(staging: Location, stats: WriteStats, rows_read: int, files_read: int,
                     files: int) -> dict[str, Any]:
    """Every input row the read tasks counted is in the output or the rejects exactly once,
    and so is every row a step created: counted from the written files, not assumed."""
    created = sum(count for step, count in stats.origin.items() if step != INPUT_STEP)
    written_input = stats.origin.get(INPUT_STEP, 0)
    ids = _written_ids(staging, [*stats.files, *stats.reject_files])
    distinct = len(set(ids))
    accounting = {
        "input_files_read": files_read,
        "input_rows_read": rows_read,
        "input_rows_written": written_input,
        "rows_created": created,
        "rows_written": stats.rows_out + stats.rows_rejected,
        "duplicate_ids": len(ids) - distinct,
    }
    problems = []
    if files_read != files:
        problems.append(f"{files_read} of {files} input files reported their rows")
    if written_input != rows_read:
        problems.append(f"{rows_read} input rows were read but {written_input} reached the "
                        "output or the rejects")
    if len(ids) != stats.rows_out + stats.rows_rejected:
        problems.append(f"the files hold {len(ids)} rows, the writers counted "
                        f"{stats.rows_out + stats.rows_rejected}")
    if distinct != len(ids):
        problems.append(f"{len(ids) - distinct} row ids appear more than once")
    if problems:
        raise RunFailedError(
            "The run's accounting does not balance, so it was not committed: "
            + "; ".join(problems) + ". This is a bug in a step; the journaled answers are kept, "
            "a rerun after the fix replays them."
        )
    return accounting


def _written_ids(staging: Location, files: list[str]) -> list[str]:
    import pyarrow.parquet as pq

    ids: list[str] = []
    for name in files:
        table = pq.read_table(staging.join(name).path, filesystem=staging.fs, columns=[ID])
        ids.extend(table[ID].to_pylist())
    return ids


def check_reject_shares(job: JobSpec, funnel: list[dict[str, Any]]) -> None:
    """A step that rejects more than its max_reject_share of its rows (those it got plus those
    it created) fails the run."""
    limits = {spec.step_name: spec.max_reject_share for spec in job.steps}
    for entry in funnel:
        name = entry["name"]
        rows = entry["rows_in"] + entry.get("rows_created", 0)  # what it got and what it made
        if name not in limits or not rows:
            continue
        limit = limits[name] if limits[name] is not None else job.reliability.max_reject_share
        rejected = sum(entry["rejected"].values())
        if rejected / rows > limit:
            reasons = ", ".join(f"{reason} {count}" for reason, count in
                                sorted(entry["rejected"].items(), key=lambda kv: -kv[1]))
            raise RunFailedError(
                f"Step {name!r} rejected {rejected} of its {rows} rows "
                f"({rejected / rows:.1%}, more than max_reject_share {limit:g}): "
                f"{reasons}. The output was not committed. Look at the reasons (a model that "
                "is down, a wrong column, a too strict threshold); if the share is expected, "
                f"raise steps[].max_reject_share for {name!r} or reliability.max_reject_share. "
                "A rerun replays the model answers journaled so far."
            )


def _schema_of(output: Location, files: list[str]) -> list[dict[str, str]]:
    if not files:
        return []
    import pyarrow.parquet as pq

    schema = pq.read_schema(output.join(files[0]).path, filesystem=output.fs)
    return [{"name": f.name, "type": str(f.type)} for f in schema]
