"""The run summary: per-step funnel, rejections by reason, tokens and throughput."""

from __future__ import annotations

from typing import Any

from augment_ray.curate.diversity import format_diversity
from augment_ray.io.write import WriteStats
from augment_ray.rows import INPUT_STEP
from augment_ray.storage import redact_uri  # re-exported: callers import it from here

__all__ = ["build_summary", "format_summary", "redact_uri", "step_funnel"]


def step_funnel(steps: list[dict[str, Any]], stats: WriteStats) -> list[dict[str, Any]]:
    """rows_in/rows_out per step, derived from the rows themselves: a row created by step k is
    live from k on until the step that rejected it, if any."""
    live = 0
    funnel = []
    for step in [{"name": INPUT_STEP, "kind": "read"}, *steps]:
        name = step["name"]
        created = stats.origin.get(name, 0)
        rejected = {
            reason: count for (at, reason), count in sorted(stats.rejected.items()) if at == name
        }
        rows_in = live if name != INPUT_STEP else created
        live = live + created - sum(rejected.values())
        entry = {**step, "rows_in": rows_in, "rows_created": created, "rows_out": live,
                 "rejected": rejected}
        if name == INPUT_STEP:
            entry.pop("rows_created")
        prompt = stats.sums.get(f"{name}_prompt_tokens")
        completion = stats.sums.get(f"{name}_completion_tokens")
        if prompt is not None or completion is not None:
            entry["prompt_tokens"] = prompt or 0
            entry["completion_tokens"] = completion or 0
        funnel.append(entry)
    return funnel


def build_summary(
    *, job_name: str, run_id: str, input_uri: str, output_uri: str, input_files: int,
    steps: list[dict[str, Any]], stats: WriteStats, wall_seconds: float, started_at: str,
) -> dict[str, Any]:
    funnel = step_funnel(steps, stats)
    completion = sum(step.get("completion_tokens", 0) for step in funnel)
    prompt = sum(step.get("prompt_tokens", 0) for step in funnel)
    return {
        "job": job_name,
        "run_id": run_id,
        "started_at": started_at,
        "wall_seconds": round(wall_seconds, 3),
        "input": {"uri": redact_uri(input_uri), "files": input_files},
        "output": {"uri": redact_uri(output_uri), "files": len(stats.files),
                   "reject_files": len(stats.reject_files)},
        "rows_in": funnel[0]["rows_in"],
        "rows_out": stats.rows_out,
        "rows_rejected": stats.rows_rejected,
        "rejected_by_reason": {
            f"{step}:{reason}": count for (step, reason), count in sorted(stats.rejected.items())
        },
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        # the whole run's wall time: steps stream concurrently, so no per-step wall time exists
        "completion_tokens_per_second": round(completion / wall_seconds, 2) if wall_seconds else 0,
        "steps": funnel,
    }


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"Run {summary['run_id']} of job {summary['job']!r}: {summary['rows_in']} rows in, "
        f"{summary['rows_out']} out, {summary['rows_rejected']} rejected, "
        f"{summary['wall_seconds']:.1f}s, {summary['completion_tokens']} tokens generated "
        f"({summary['completion_tokens_per_second']:.1f} tok/s)",
    ]
    if summary.get("skipped"):
        lines.insert(0, f"Nothing to do: {summary['output']['uri']} is {summary['skipped']} by "
                        "the run below (pass --force to run again).")
    for step in summary["steps"]:
        line = f"  {step['name']:<16} in {step['rows_in']:>8}  out {step['rows_out']:>8}"
        if step.get("rows_created"):
            line += f"  created {step['rows_created']}"
        if "completion_tokens" in step:
            line += f"  tokens {step['prompt_tokens']} prompt / {step['completion_tokens']} gen"
        if diversity := format_diversity(step):  # e.g. "diversity vendi 41.2 -> 37.5"
            line += f"  {diversity}"
        if step.get("note"):
            line += f"  {step['note']}"
        lines.append(line)
        for reason, count in step["rejected"].items():
            lines.append(f"      rejected {count:>6}  {reason}")
    for step, counts in (summary.get("journal") or {}).items():
        if counts.get("replayed"):
            lines.append(f"  resumed: {step} replayed {counts['replayed']} answers of an earlier "
                         f"attempt, generated {counts['generated']}")
    accounting = summary.get("accounting")
    if accounting:
        lines.append(
            f"  accounting: {accounting['input_rows_read']} input rows read from "
            f"{accounting['input_files_read']} files = {accounting['input_rows_written']} "
            f"written (+{accounting['rows_created']} created), ids unique")
    lines.append(f"  output: {summary['output']['uri']}")
    return "\n".join(lines)
