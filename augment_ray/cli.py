"""The `augment-ray` command."""

from __future__ import annotations

import logging
import os
import shlex
import sys
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import click

from augment_ray.config.job import JobSpec, load_job
from augment_ray.errors import AugmentRayError

if TYPE_CHECKING:
    from augment_ray.loops.config import LoopJobSpec

EXIT_FAILED = 1
EXIT_BAD_JOB = 2


def _fail(error: AugmentRayError) -> NoReturn:
    click.echo(f"error: {error}", err=True)
    sys.exit(error.exit_code)


def _load(job_file: str, ds: str | None = None) -> JobSpec:
    try:
        return load_job(job_file, ds)
    except AugmentRayError as error:
        _fail(error)


def _load_loop(job_file: str) -> LoopJobSpec:
    from augment_ray.loops.config import load_loop_job

    try:
        return load_loop_job(job_file)
    except AugmentRayError as error:
        _fail(error)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="augment-ray")
def main() -> None:
    """Augment and curate LLM fine-tuning datasets on Ray.

    A job is a YAML file: input (where rows come from), output (where they go), engines (model
    pools) and steps (what happens to each row). See jobs/ for examples.
    """


DS_OPTION = click.option(
    "--ds", default=None, metavar="YYYY-MM-DD",
    help="Run date filling {ds}/{ds_nodash}/{yesterday_ds} in the job file; default: today (UTC).",
)


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@DS_OPTION
def validate(job_file: str, ds: str | None) -> None:
    """Check JOB_FILE without running it: YAML, fields, engine references.

    Exit code 0 when valid, 2 when not (with one paragraph naming the bad field). A loop job
    (one with `seeds:`) is checked as such.
    """
    from augment_ray.config.dates import read_job_yaml
    from augment_ray.summary import redact_uri

    try:
        data = read_job_yaml(job_file, ds)
    except AugmentRayError as error:
        _fail(error)
    if isinstance(data, dict) and "seeds" in data:
        _load_loop(job_file)
        click.echo(f"{job_file}: valid loop job; run it with `augment-ray loop {job_file}`.")
        return
    job = _load(job_file, ds)
    click.echo(
        f"{job_file}: valid job {job.name!r}: {len(job.steps)} step(s) "
        f"[{', '.join(s.step_name for s in job.steps) or 'none'}], "
        f"engines [{', '.join(job.engines) or 'none'}], output {redact_uri(job.output.uri)} "
        f"({job.output.mode})."
    )


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--ray-address", default=None,
              help="Ray cluster to run on; default: $RAY_ADDRESS, else a private local Ray.")
@click.option("--output", "output_uri", default=None, help="Override output.uri.")
@click.option("--overwrite", is_flag=True,
              help="output.mode overwrite: replace a committed output (an unfinished attempt "
              "of this job is still resumed).")
@click.option("--force", is_flag=True,
              help="Start over: replace the output and discard an unfinished attempt's "
              "journal of model answers.")
@DS_OPTION
@click.option("--debug", is_flag=True,
              help="Show tracebacks and Ray's own logs and progress bars.")
def run(job_file: str, ray_address: str | None, output_uri: str | None, overwrite: bool,
        force: bool, ds: str | None, debug: bool) -> None:
    """Run JOB_FILE: read the input, apply the steps, write output shards, rejects and a summary.

    With output.mode error-if-exists (the default), an output already committed by this job
    (same spec, same --ds) is left alone and the run is a no-op: nightly reruns are safe. An
    unfinished attempt of this job (a crash, a killed driver) is resumed in either mode: the
    model answers it journaled are replayed.

    Exit code 0 on success (or nothing to do), 1 when the run fails, 2 when the job file is
    invalid.
    """
    job = _load(job_file, ds)
    if output_uri or overwrite or force:
        update = {"uri": output_uri or job.output.uri}
        if overwrite or force:
            update["mode"] = "overwrite"
        job = job.model_copy(update={"output": job.output.model_copy(update=update)})
    from augment_ray.pipeline import run_job
    from augment_ray.summary import format_summary

    show_ray_progress(debug)
    result = _reporting_errors(lambda: run_job(job, ray_address=ray_address, fresh=force), debug)
    click.echo(format_summary(result))
    click.echo(next_commands(result))


def show_ray_progress(debug: bool) -> None:
    """--debug shows Ray Data's own progress bars/blocks and INFO logs besides ours (as does
    AUGMENT_RAY_RAY_PROGRESS=1); without it they go to Ray Data's log file only."""
    if debug:
        from augment_ray.progress import RAY_PROGRESS_ENV

        os.environ.setdefault(RAY_PROGRESS_ENV, "1")


def next_commands(summary: dict[str, Any]) -> str:
    """What to do with a finished run: the commands that read it, with real arguments."""
    output_uri = summary["output"]["uri"]
    out, base = shlex.quote(output_uri), output_uri.rstrip("/")
    target = f"{base}.alpaca.jsonl" if "://" not in output_uri else f"{summary['job']}.alpaca.jsonl"
    export = f"augment-ray export {out} --format alpaca --to {shlex.quote(target)}"
    # a step that rewrites the instruction (refine) says so in its summary entry
    rewritten = [step["rewrites_instruction"] for step in summary["steps"]
                 if step.get("rewrites_instruction")]
    if rewritten:
        export += f" --instruction-column {rewritten[-1]}"
    return "\n".join([
        "Next:",
        f"  augment-ray summary {out}    # this summary again",
        f"  augment-ray report {out}     # writes {base}/_report/report.html",
        f"  {export}",
    ])


def quiet_ray_data_tracebacks() -> None:
    """Ray Data logs a failed task's traceback at ERROR before raising it; we report the
    error ourselves in one paragraph (--debug keeps the tracebacks)."""

    def no_tracebacks(record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and record.exc_info)

    import ray.data  # noqa: F401 - sets up Ray Data's log handlers

    for name in ("ray.data", "ray"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(no_tracebacks)


def _reporting_errors(work: Callable[[], Any], debug: bool) -> Any:
    """Runs `work` and turns any failure into one paragraph and an exit code."""
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from augment_ray.run_errors import find_user_error

    if not debug:
        quiet_ray_data_tracebacks()
    try:
        return work()
    except AugmentRayError as error:
        _fail(error)
    except Exception as error:  # a failure we did not anticipate: say so in one paragraph
        user_error = find_user_error(error)
        if user_error is not None:
            _fail(user_error)
        if debug:
            traceback.print_exc()
        first = str(error).strip().splitlines()[-1] if str(error).strip() else ""
        click.echo(
            f"error: the run failed: {type(error).__name__}: {first[:500]} "
            "(rerun with --debug for the full traceback).",
            err=True,
        )
        sys.exit(EXIT_FAILED)


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--ray-address", default=None,
              help="Ray cluster to run on; default: $RAY_ADDRESS, else a private local Ray.")
@click.option("--output", "output_uri", default=None, help="Override output.uri.")
@click.option("--overwrite", is_flag=True,
              help="Start over: clear the output instead of resuming its finished rounds.")
@click.option("--check", is_flag=True, help="Only validate JOB_FILE.")
@click.option("--debug", is_flag=True, help="Show tracebacks and Ray's own logs.")
def loop(job_file: str, ray_address: str | None, output_uri: str | None, overwrite: bool,
         check: bool, debug: bool) -> None:
    """Run the LLM2LLM loop of JOB_FILE: per round, (train ->) evaluate the student on the seeds
    -> take the seeds it got wrong -> the teacher writes new examples like them -> dedup ->
    merge. A rerun resumes after the last finished round.

    Exit code 0 on success, 1 when the run fails, 2 when the job file is invalid.
    """
    job = _load_loop(job_file)
    if output_uri:
        job = job.model_copy(update={"output": job.output.model_copy(update={"uri": output_uri})})
    if check:
        click.echo(f"{job_file}: valid loop job {job.name!r}, {job.rounds} rounds.")
        return
    from augment_ray.loops.llm2llm import format_loop_report, run_loop

    show_ray_progress(debug)
    report = _reporting_errors(
        lambda: run_loop(job, ray_address=ray_address, overwrite=overwrite), debug)
    click.echo(format_loop_report(report))


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False, exists=True))
@click.option("--address", default=None, envvar="RAY_ADDRESS", show_envvar=True,
              help="The cluster's dashboard, e.g. http://HEAD:8265.")
@DS_OPTION
@click.option("--wait", is_flag=True, help="Stream the driver's log; exit with the job's status.")
@click.option("--working-dir", default=".", show_default=True,
              help="Folder shipped to the cluster (the job file must be inside it).")
@click.option("--no-working-dir", is_flag=True,
              help="Ship nothing: augment-ray and the job file are already on the cluster.")
@click.option("--pip", "pip_packages", multiple=True, metavar="REQ",
              help="pip requirement installed for the job, e.g. 'augment-ray[vllm]'. Repeatable.")
@click.option("--env", "env_names", multiple=True, metavar="NAME",
              help="Environment variable passed to the job by NAME (its value is read here, "
                   "never printed), e.g. AWS_ACCESS_KEY_ID. Repeatable.")
@click.option("--output", "output_uri", default=None, help="Override output.uri.")
@click.option("--force", is_flag=True,
              help="Run again even if this date already succeeded (and replace its output).")
def submit(job_file: str, address: str | None, ds: str | None, wait: bool, working_dir: str,
           no_working_dir: bool, pip_packages: tuple[str, ...], env_names: tuple[str, ...],
           output_uri: str | None, force: bool) -> None:
    """Submit JOB_FILE to a Ray cluster with `ray job submit`, once per run date.

    The submission id is augment-<job name>-<date>: a date that already succeeded is not run
    again (unless --force), a running one is reported (and followed with --wait), a failed one
    is resubmitted as augment-<name>-<date>-2, -3, ...

    Exit code 0 when submitted (or nothing to do); with --wait, 0 only if the job succeeded.
    1 when the cluster cannot be reached or the job failed, 2 when the job file is invalid.
    """
    from augment_ray.config.dates import check_ds, today_ds
    from augment_ray.submit import follow, plan_submission
    from augment_ray.submit import submit as submit_job

    if not address:
        click.echo("error: pass --address http://HEAD:8265 (or set RAY_ADDRESS).", err=True)
        sys.exit(EXIT_BAD_JOB)
    try:
        run_date = check_ds(ds or today_ds())
        job = _load(job_file, run_date)  # a bad job fails here, not on the cluster
        plan = plan_submission(
            job_file, job.name, run_date, address,
            working_dir=None if no_working_dir else working_dir, pip=list(pip_packages),
            env_names=list(env_names), output=output_uri, force=force,
        )
        outcome = submit_job(plan, click.echo)
        if outcome.plain_command:
            click.echo(f"  same as: {outcome.plain_command}")
        if outcome.action == "already-succeeded":
            return
        if not wait:
            if outcome.action == "submitted":
                click.echo(f"  follow it: ray job logs --follow --address {address} "
                           f"{outcome.submission_id}")
            return
        status = follow(address, outcome.submission_id, click.echo)
    except AugmentRayError as error:
        _fail(error)
    click.echo(f"{outcome.submission_id}: {status}")
    sys.exit(0 if status == "SUCCEEDED" else EXIT_FAILED)


@main.command()
@click.argument("output_uri")
def summary(output_uri: str) -> None:
    """Print the summary of the finished run at OUTPUT_URI (a local path, or s3:// with the
    default AWS endpoint and credential chain)."""
    from augment_ray.io.committed import SUMMARY, read_json, require_committed
    from augment_ray.storage import location
    from augment_ray.summary import format_summary

    try:
        output = location(output_uri, None)
        require_committed(output, "summary")
        payload = read_json(output, SUMMARY)
    except AugmentRayError as error:
        _fail(error)
    click.echo(format_summary(payload))


def _export_formats() -> dict[str, str]:
    """--format's choices and what reads each, from the one registry (export.FORMATS)."""
    from augment_ray.export import FORMATS

    return {name: fmt.reader for name, fmt in FORMATS.items()}


@main.command()
@click.argument("output_uri")
@click.option("--format", "fmt", required=True, type=click.Choice(list(_export_formats())),
              help="; ".join(f"{name}: {reader}" for name, reader in _export_formats().items())
              + ".")
@click.option("--to", "to", required=True, type=click.Path(),
              help="Local JSONL file to write (parent folders are created); for hf, the folder.")
@click.option("--system", default=None, metavar="TEXT",
              help="System prompt for every example that has none of its own.")
@click.option("--instruction-column", default=None, metavar="NAME",
              help="Column holding the instruction (default: instruction), e.g. "
              "refined_instruction after a refine step; it also replaces a conversation's first "
              "user turn.")
@click.option("--force", is_flag=True, help="Overwrite --to if it exists.")
def export(output_uri: str, fmt: str, to: str, system: str | None,
           instruction_column: str | None, force: bool) -> None:
    """Write the finished run at OUTPUT_URI (a local path, or s3:// with the default AWS
    endpoint and credential chain) as training examples: JSONL, or a Hugging Face datasets
    folder (hf). Single-turn rows and conversations (a messages column) alike. Only data/ is
    exported (never _rejects/); rows without a response are skipped."""
    from pathlib import Path

    from augment_ray.export import export as export_run
    from augment_ray.storage import location

    try:
        stats = export_run(location(output_uri, None), fmt, Path(to), system=system,
                           instruction_column=instruction_column, force=force)
    except AugmentRayError as error:
        _fail(error)
    line = (f"wrote {stats.written} examples to {to} (format {fmt}); skipped "
            f"{stats.skipped_no_response} rows without a response")
    if stats.skipped_no_instruction:
        line += f" and {stats.skipped_no_instruction} without an instruction"
    if stats.skipped_bad_conversation:
        line += (f" and {stats.skipped_bad_conversation} conversations whose turns are out of "
                 "order or empty")
    click.echo(line)


@main.command()
@click.argument("output_uri")
@click.option("--to", "to", default=None, type=click.Path(file_okay=False),
              help="Local folder for report.html and report.md; default: OUTPUT_URI/_report/.")
def report(output_uri: str, to: str | None) -> None:
    """Write an HTML report (inline charts, works offline) and a Markdown summary of the
    finished run at OUTPUT_URI (a local path, or s3:// with the default AWS endpoint and
    credential chain): rows per step, rejections, lengths before/after, scores, duplicate
    clusters, labels, sample rows, tokens."""
    from pathlib import Path

    from augment_ray.report import write_report
    from augment_ray.storage import location

    try:
        written = write_report(location(output_uri, None), Path(to) if to else None)
    except AugmentRayError as error:
        _fail(error)
    for path in written:
        click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
