"""`augment-ray submit`: a job file -> `ray job submit` on a cluster, idempotent per run date.

The submission id is derived from the job's name and run date, so submitting the same date
again finds the earlier submission: a finished one is not run twice (unless forced), a running
one is followed, a failed one is retried under the next free id. The command it runs is the
plain `ray job submit ... -- python -m augment_ray.cli run JOB --ds DATE` that the README shows.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from augment_ray.errors import AugmentRayError, JobSpecError
from augment_ray.names import NOT_AN_ENV_VAR_NAME, check_env_var_name, shown_env_var_name

# never shipped to the cluster with the working dir
WORKING_DIR_EXCLUDES = [".git", ".venv", "out", "**/__pycache__", "*.egg-info", ".pytest_cache",
                        ".ruff_cache"]
FINISHED = {"SUCCEEDED", "FAILED", "STOPPED"}


class SubmitError(AugmentRayError):
    """The cluster could not be reached or refused the submission."""

    exit_code = 1


@dataclass
class SubmitPlan:
    address: str
    job_file: str  # as the driver sees it (relative to the working dir when one is shipped)
    ds: str
    base_id: str
    working_dir: str | None = None
    pip: list[str] = field(default_factory=list)
    env_names: list[str] = field(default_factory=list)
    output: str | None = None
    force: bool = False

    def entrypoint(self) -> list[str]:
        # python -m works both with the package installed on the cluster and shipped in the
        # working dir
        command = ["python", "-m", "augment_ray.cli", "run", self.job_file, "--ds", self.ds]
        if self.output:
            command += ["--output", self.output]
        if self.force:
            command.append("--force")
        return command

    def runtime_env(self, environ: dict[str, str]) -> dict[str, Any]:
        """The runtime env; credentials come from `environ` by the names the user gave."""
        env: dict[str, Any] = {}
        if self.working_dir:
            env["working_dir"] = self.working_dir
            env["excludes"] = WORKING_DIR_EXCLUDES
        if self.pip:
            env["pip"] = list(self.pip)
        missing = [name for name in self.env_names if not environ.get(name)]
        if missing:
            raise JobSpecError(
                "--env names variables that are not set here: "
                + ", ".join(shown_env_var_name(name) for name in missing)
                + "; export them, or leave them to the cluster's own credentials."
            )
        if self.env_names:
            env["env_vars"] = {name: environ[name] for name in self.env_names}
        return env

    def ray_job_submit(self, submission_id: str, runtime_env_file: str) -> list[str]:
        return [ray_cli(), "job", "submit", "--address", self.address,
                "--submission-id", submission_id, "--runtime-env", runtime_env_file,
                "--no-wait", "--", *self.entrypoint()]


def ray_cli() -> str:
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def base_submission_id(job_name: str, ds: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", job_name.lower()).strip("-") or "job"
    return f"augment-{slug}-{ds}"


def plan_submission(job_file: str, job_name: str, ds: str, address: str, *,
                    working_dir: str | None, pip: list[str], env_names: list[str],
                    output: str | None, force: bool) -> SubmitPlan:
    for name in env_names:
        try:
            check_env_var_name(name)
        except ValueError:
            raise JobSpecError(f"--env {NOT_AN_ENV_VAR_NAME} (the value given is not shown: "
                               "it may be one).") from None
    driver_job_file = job_file
    if working_dir is not None:
        root = Path(working_dir).resolve()
        path = Path(job_file).resolve()
        if not path.is_relative_to(root):
            raise JobSpecError(
                f"The job file {job_file} is outside the working dir {working_dir} that is "
                "shipped to the cluster; run from the folder that holds it, or pass "
                "--working-dir."
            )
        driver_job_file = path.relative_to(root).as_posix()
        working_dir = str(root)
    return SubmitPlan(address=address, job_file=driver_job_file, ds=ds,
                      base_id=base_submission_id(job_name, ds), working_dir=working_dir,
                      pip=pip, env_names=env_names, output=output, force=force)


def _client(address: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as error:  # ConnectionError, or Ray's own wrappers of it
        raise SubmitError(f"Cannot reach the Ray dashboard at {address}: {error}") from None


def _status(client: Any, submission_id: str) -> str | None:
    try:
        return str(client.get_job_status(submission_id).value)
    except RuntimeError as error:  # Ray: "Job ... does not exist"
        if "does not exist" in str(error):
            return None
        raise SubmitError(f"Cannot ask the cluster about {submission_id}: {error}") from None


@dataclass
class SubmitOutcome:
    submission_id: str
    action: str  # submitted | already-succeeded | already-running
    plain_command: str
    status: str | None = None


def submit(plan: SubmitPlan, say: Callable[[str], None]) -> SubmitOutcome:
    """Submit unless this date already ran (or runs); say what was done."""
    client = _client(plan.address)
    submission_id, attempt = plan.base_id, 0
    while True:
        status = _status(client, submission_id)
        if status is None:
            break
        if status not in FINISHED:
            say(f"{submission_id} is already {status.lower()} on {plan.address}.")
            return SubmitOutcome(submission_id, "already-running", "", status)
        if status == "SUCCEEDED" and not plan.force:
            say(f"{submission_id} already succeeded for {plan.ds}; nothing to do "
                "(--force runs it again).")
            return SubmitOutcome(submission_id, "already-succeeded", "", status)
        attempt += 1  # a failed, stopped or forced-again date: the next free id
        submission_id = f"{plan.base_id}-{attempt + 1}"

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="runtime-env-",
                                     delete=False) as handle:
        # a file, not --runtime-env-json: credential values never sit on a command line
        yaml.safe_dump(plan.runtime_env(dict(os.environ)), handle)
        env_file = handle.name
    try:
        command = plan.ray_job_submit(submission_id, env_file)
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    finally:
        os.unlink(env_file)
    plain = " ".join(shlex.quote(part) for part in command).replace(env_file, "RUNTIME_ENV.yaml")
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise SubmitError(f"ray job submit failed ({done.returncode}): " + " | ".join(tail))
    say(f"Submitted {submission_id} to {plan.address}.")
    return SubmitOutcome(submission_id, "submitted", plain)


def follow(address: str, submission_id: str, say: Callable[[str], None]) -> str:
    """Stream the driver's log until the job ends; its final status."""
    client = _client(address)

    async def tail() -> None:
        async for lines in client.tail_job_logs(submission_id):
            say(lines.rstrip("\n"))

    asyncio.run(tail())
    return _status(client, submission_id) or "UNKNOWN"
