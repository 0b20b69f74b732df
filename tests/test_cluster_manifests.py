"""Static checks of cluster/: the Kubernetes manifests, the `ray up` config, the image's path
mapping, and every augment-ray command written in them (entrypoints, container commands,
comments, README code blocks), parsed by the real CLI without running anything.

Path mapping: cluster/Dockerfile copies repository folders into the image (COPY cluster/jobs/
/app/jobs/); a job file named /app/... in a manifest is looked up through those COPY lines, so
a file that the image would not contain fails here. Commands run from a laptop name job files
relative to the repository root.
"""

from __future__ import annotations

import copy
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from augment_ray.cli import main
from augment_ray.config.dates import check_ds, render_dates
from augment_ray.config.job import JobSpec, load_job, parse_job
from augment_ray.errors import AugmentRayError
from augment_ray.submit import base_submission_id, plan_submission

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
DOCKERFILE = CLUSTER / "Dockerfile"
TEST_DS = "2026-11-21"
RAY_VERSION = version("ray")
KUBERAY_KINDS = {"RayCluster", "RayJob", "RayCronJob"}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
# env var names that must never get a literal value in a manifest
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)
# the only shell expansions allowed in commands: today's date in UTC, as YYYY-MM-DD
DATE_EXPANSION = re.compile(r"\$\(date -u \+(?:%F|%Y-%m-%d)\)")
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

YAML_FILES = sorted(CLUSTER.rglob("*.yaml"))
MD_FILES = sorted(CLUSTER.rglob("*.md"))


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def load_docs(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def doc_type(doc: Any) -> str | None:
    if not isinstance(doc, dict):
        return None
    if "apiVersion" in doc or "kind" in doc:
        return "kubernetes"
    if "provider" in doc and "available_node_types" in doc:
        return "ray-up"
    if "input" in doc and "output" in doc:
        return "job"
    return None


ALL_DOCS = [(path, doc) for path in YAML_FILES for doc in load_docs(path)]
K8S_DOCS = [(path, doc) for path, doc in ALL_DOCS if doc_type(doc) == "kubernetes"]
RAY_UP_DOCS = [(path, doc) for path, doc in ALL_DOCS if doc_type(doc) == "ray-up"]
JOB_FILES = sorted({path for path, doc in ALL_DOCS if doc_type(doc) == "job"})


def of_kind(kind: str) -> list[tuple[Path, dict]]:
    return [(path, doc) for path, doc in K8S_DOCS if doc.get("kind") == kind]


def ids(pairs: list[tuple[Path, dict]]) -> list[str]:
    return [f"{rel(path)}:{doc.get('metadata', {}).get('name', '?')}" for path, doc in pairs]


# ---- the image's path mapping ------------------------------------------------------------------


def image_path_map() -> dict[str, Path]:
    """{in-image folder: repository folder} from the Dockerfile's single-source COPY lines."""
    mapping = {}
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        words = line.split()
        if not words or words[0].upper() != "COPY":
            continue
        operands = [word for word in words[1:] if not word.startswith("--")]
        if len(operands) != 2:
            continue  # several sources into one folder: not a folder mapping
        source, dest = operands
        if (REPO / source).is_dir():
            mapping[dest.rstrip("/")] = REPO / source
    return mapping


IMAGE_PATHS = image_path_map()


def host_path(image_path: str) -> Path:
    """The repository file that the image holds at `image_path`, or a test failure."""
    for dest in sorted(IMAGE_PATHS, key=len, reverse=True):
        if image_path.startswith(dest + "/"):
            return IMAGE_PATHS[dest] / image_path[len(dest) + 1:]
    pytest.fail(f"{image_path} is not copied into the image by {rel(DOCKERFILE)} "
                f"(it maps {sorted(IMAGE_PATHS)})")


def test_dockerfile_maps_cluster_jobs_and_pins_ray():
    assert IMAGE_PATHS.get("/app/jobs") == CLUSTER / "jobs"
    text = DOCKERFILE.read_text(encoding="utf-8")
    base = re.search(r"^ARG RAY_IMAGE=(\S+)", text, re.MULTILINE)
    assert base, "Dockerfile: no ARG RAY_IMAGE=..."
    assert base.group(1).startswith(f"rayproject/ray:{RAY_VERSION}-"), base.group(1)
    assert re.search(r'^ARG EXTRAS="\[vllm\]"', text, re.MULTILINE), "GPU image needs [vllm]"


# ---- every YAML file ---------------------------------------------------------------------------


def test_cluster_folder_has_every_manifest():
    kinds = {doc.get("kind") for _, doc in K8S_DOCS}
    assert {"RayCluster", "RayJob", "RayCronJob", "CronJob"} <= kinds
    assert RAY_UP_DOCS, "no `ray up` config under cluster/"
    assert JOB_FILES, "no job file under cluster/"


@pytest.mark.parametrize("path", YAML_FILES, ids=rel)
def test_every_yaml_document_is_a_known_kind(path):
    docs = load_docs(path)
    assert docs, f"{rel(path)} is empty"
    for doc in docs:
        assert doc_type(doc), (
            f"{rel(path)}: a document that is neither a Kubernetes object, a `ray up` config "
            f"nor an augment_ray job: {str(doc)[:200]}")


@pytest.mark.parametrize("path,doc", K8S_DOCS, ids=ids(K8S_DOCS))
def test_kubernetes_doc_identity(path, doc):
    assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], "apiVersion"
    assert isinstance(doc.get("kind"), str) and doc["kind"], "kind"
    name = (doc.get("metadata") or {}).get("name")
    assert isinstance(name, str) and DNS_1123.match(name) and len(name) <= 63, \
        f"metadata.name {name!r} is not a DNS-1123 name"
    if doc["kind"] in KUBERAY_KINDS:
        assert doc["apiVersion"] == "ray.io/v1"
    if doc["kind"] == "CronJob":
        assert doc["apiVersion"] == "batch/v1"


def walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


@pytest.mark.parametrize("path,doc", K8S_DOCS, ids=ids(K8S_DOCS))
def test_no_secret_values_in_manifests(path, doc):
    for node in walk(doc):
        if isinstance(node, dict) and "name" in node and "value" in node:
            assert not SECRET_NAME.search(str(node["name"])), (
                f"env {node['name']} has a literal value; take it from a Secret (secretKeyRef/"
                "envFrom) or a service-account role")
    for spec in job_specs(doc):
        env_vars = runtime_env(spec).get("env_vars") or {}
        for name in env_vars:
            assert not SECRET_NAME.search(name), f"runtimeEnvYAML sets secret-looking {name}"


# ---- Ray clusters ------------------------------------------------------------------------------


def cluster_specs(doc: dict) -> list[dict]:
    spec = doc.get("spec") or {}
    if doc.get("kind") == "RayCluster":
        return [spec]
    return [job["rayClusterSpec"] for job in job_specs(doc) if "rayClusterSpec" in job]


def job_specs(doc: dict) -> list[dict]:
    """The RayJob specs in `doc`: a RayJob's spec, a RayCronJob's jobTemplate."""
    spec = doc.get("spec") or {}
    if doc.get("kind") == "RayJob":
        return [spec]
    if doc.get("kind") == "RayCronJob":
        return [spec.get("jobTemplate") or {}]
    return []


def containers(template: dict) -> list[dict]:
    return (template.get("spec") or {}).get("containers") or []


def is_gpu_group(group: dict) -> bool:
    return any(int(((c.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu", 0)) > 0
               for c in containers(group.get("template") or {}))


RAY_CLUSTER_DOCS = [(path, doc) for path, doc in K8S_DOCS if doc.get("kind") in KUBERAY_KINDS]


@pytest.mark.parametrize("path,doc", RAY_CLUSTER_DOCS, ids=ids(RAY_CLUSTER_DOCS))
def test_ray_cluster_spec(path, doc):
    specs = cluster_specs(doc)
    assert specs, "no Ray cluster spec"
    for spec in specs:
        assert str(spec.get("rayVersion")) == RAY_VERSION, "rayVersion must match the image's Ray"
        assert spec.get("enableInTreeAutoscaling") is True
        head = spec["headGroupSpec"]
        params = head.get("rayStartParams") or {}
        assert params.get("num-cpus") == "0", "head: rayStartParams num-cpus \"0\" (no work there)"
        assert params.get("dashboard-host") == "0.0.0.0"
        head_containers = containers(head["template"])
        assert head_containers and head_containers[0].get("image")
        groups = spec.get("workerGroupSpecs") or []
        for group in [head, *groups]:
            for key, value in (group.get("rayStartParams") or {}).items():
                assert isinstance(value, str), f"rayStartParams.{key} must be a string"
        for group in groups:
            assert group.get("groupName")
            low, count, high = group["minReplicas"], group["replicas"], group["maxReplicas"]
            assert 0 <= low <= count <= high, f"{group['groupName']}: min <= replicas <= max"
        gpu_groups = [group for group in groups if is_gpu_group(group)]
        assert gpu_groups, "no worker group with an nvidia.com/gpu limit"
        for group in gpu_groups:
            pod = group["template"]["spec"]
            assert pod.get("nodeSelector"), f"{group['groupName']}: GPU group needs a nodeSelector"
            assert any(t.get("key") == "nvidia.com/gpu" and t.get("effect") == "NoSchedule"
                       for t in pod.get("tolerations") or []), \
                f"{group['groupName']}: no toleration for nvidia.com/gpu NoSchedule"
            for container in containers(group["template"]):
                resources = container.get("resources") or {}
                requests = resources.get("requests") or {}
                if "nvidia.com/gpu" in requests:
                    assert requests["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
        # the head has no CPUs and augment-ray checks the LIVE cluster's CPUs before it starts
        assert any(group["minReplicas"] >= 1 for group in groups), \
            "some worker group must keep minReplicas >= 1 (the head has num-cpus 0)"
        images = {c.get("image") for group in [head, *groups]
                  for c in containers(group["template"])}
        assert len(images) == 1, f"head and workers must run one image, not {sorted(images)}"


# ---- RayJob, RayCronJob, CronJob ---------------------------------------------------------------


def runtime_env(job: dict) -> dict:
    text = job.get("runtimeEnvYAML")
    if text is None:
        return {}
    parsed = yaml.safe_load(text)
    assert isinstance(parsed, dict), "runtimeEnvYAML must parse to a YAML mapping"
    return parsed


RAY_JOB_DOCS = of_kind("RayJob") + of_kind("RayCronJob")


@pytest.mark.parametrize("path,doc", RAY_JOB_DOCS, ids=ids(RAY_JOB_DOCS))
def test_ray_job_spec(path, doc):
    (job,) = job_specs(doc)
    assert "spec" not in job, "a RayCronJob jobTemplate is a RayJob spec itself (KubeRay v1.6)"
    assert isinstance(job.get("entrypoint"), str) and job["entrypoint"].strip()
    assert job.get("shutdownAfterJobFinishes") is True
    ttl = job.get("ttlSecondsAfterFinished")
    assert isinstance(ttl, int) and ttl >= 0
    assert isinstance(job.get("backoffLimit"), int) and job["backoffLimit"] >= 0
    assert isinstance(job.get("activeDeadlineSeconds"), int) and job["activeDeadlineSeconds"] > 0
    assert job.get("submissionMode", "K8sJobMode") in SUBMISSION_MODES
    assert "rayClusterSpec" in job, "the job's own cluster"
    env = runtime_env(job)
    assert isinstance(env.get("env_vars", {}), dict)
    assert all(isinstance(v, str) for v in env.get("env_vars", {}).values()), \
        "runtimeEnvYAML env_vars values must be strings"


CRON_FIELDS = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]


def check_cron(schedule: Any) -> None:
    assert isinstance(schedule, str), f"schedule {schedule!r} must be a string"
    fields = schedule.split()
    assert len(fields) == 5, f"schedule {schedule!r} must have 5 fields"
    for field, (low, high) in zip(fields, CRON_FIELDS, strict=True):
        for part in field.split(","):
            base, _, step = part.partition("/")
            assert not step or step.isdigit(), f"bad step in {schedule!r}"
            if base == "*":
                continue
            bounds = base.split("-")
            assert len(bounds) in (1, 2) and all(b.isdigit() for b in bounds), \
                f"bad field {field!r} in {schedule!r}"
            assert all(low <= int(b) <= high for b in bounds), f"{field!r} out of range"


@pytest.mark.parametrize("path,doc", of_kind("RayCronJob"), ids=ids(of_kind("RayCronJob")))
def test_ray_cron_job(path, doc):
    check_cron(doc["spec"]["schedule"])
    (job,) = job_specs(doc)
    assert job["activeDeadlineSeconds"] < 24 * 3600, "a nightly run must end before the next"


@pytest.mark.parametrize("path,doc", of_kind("CronJob"), ids=ids(of_kind("CronJob")))
def test_cron_job(path, doc):
    spec = doc["spec"]
    check_cron(spec["schedule"])
    assert spec.get("concurrencyPolicy") == "Forbid"
    assert isinstance(spec.get("startingDeadlineSeconds"), int)
    job = spec["jobTemplate"]["spec"]
    assert isinstance(job.get("backoffLimit"), int)
    pod = job["template"]["spec"]
    assert pod.get("restartPolicy") in ("Never", "OnFailure")
    assert containers(job["template"])


def test_example_secret_names_match_the_manifests():
    """Every manifest maps the same optional Secret onto the Ray pods (README says so)."""
    refs = set()
    for _, doc in RAY_CLUSTER_DOCS:
        for spec in cluster_specs(doc):
            for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
                for container in containers(group["template"]):
                    for source in container.get("envFrom") or []:
                        ref = source.get("secretRef") or {}
                        assert ref.get("optional") is True, "the Secret is optional (IRSA setups)"
                        refs.add(ref.get("name"))
                    assert container.get("envFrom"), f"{group.get('groupName', 'head')}: envFrom"
    assert refs == {"augment-ray-credentials"}


# ---- the `ray up` config -----------------------------------------------------------------------


@pytest.mark.parametrize("path,config", RAY_UP_DOCS, ids=[rel(p) for p, _ in RAY_UP_DOCS])
def test_ray_up_config(path, config):
    assert config["provider"]["type"] == "aws"
    assert config["provider"].get("region")
    assert config["provider"].get("availability_zone")
    assert config["auth"].get("ssh_user")
    types = config["available_node_types"]
    head_type = config.get("head_node_type")
    assert head_type in types, "head_node_type must be one of available_node_types"
    assert types[head_type]["resources"].get("CPU") == 0, "head: resources CPU 0 (no work there)"
    gpu_types = {name: t for name, t in types.items()
                 if name != head_type and t.get("resources", {}).get("GPU", 0) > 0}
    assert gpu_types, "no GPU worker type"
    for name, node_type in gpu_types.items():
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"], name
        assert node_type["node_config"].get("InstanceType"), name
    # the head has no CPUs and augment-ray checks the LIVE cluster's CPUs before it starts
    assert any(t.get("min_workers", 0) >= 1 for n, t in types.items() if n != head_type)
    for name, node_type in types.items():
        assert node_type["node_config"].get("IamInstanceProfile"), f"{name}: no instance profile"
    setup = " ".join(config.get("setup_commands") or [])
    assert "augment-ray[vllm]" in setup, "setup_commands must install augment-ray[vllm]"
    docker_image = (config.get("docker") or {}).get("image", "")
    if docker_image.startswith("rayproject/"):
        assert f":{RAY_VERSION}-" in docker_image, f"{docker_image} is not Ray {RAY_VERSION}"
    # Ray's own schema, after the defaults `ray up` fills in (no cloud call)
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


# ---- job files and README job snippets ---------------------------------------------------------


@pytest.mark.parametrize("path", JOB_FILES, ids=rel)
def test_job_files_validate(path):
    job = load_job(path, ds=TEST_DS)
    assert "{ds}" in path.read_text(encoding="utf-8"), "a nightly job reads a dated partition"
    assert TEST_DS in job.input.uri and TEST_DS in job.output.uri


def markdown_blocks(path: Path, languages: tuple[str, ...]) -> list[str]:
    text = path.read_text(encoding="utf-8")
    blocks = re.findall(r"^([ \t]*)```(\w*)\n(.*?)^\1```", text, re.MULTILINE | re.DOTALL)
    out = []
    for indent, language, body in blocks:
        if language in languages:
            lines = [line[len(indent):] if line.startswith(indent) else line
                     for line in body.splitlines()]
            out.append("\n".join(lines))
    return out


MD_YAML = [(path, block) for path in MD_FILES for block in markdown_blocks(path, ("yaml",))]


@pytest.mark.parametrize("path,block", MD_YAML,
                         ids=[f"{rel(p)}#{i}" for i, (p, _) in enumerate(MD_YAML)])
def test_readme_yaml_snippets(path, block):
    data = yaml.safe_load(block)
    assert isinstance(data, dict), f"{rel(path)}: a yaml block that is not a mapping"
    if "input" in data or "engines" in data:  # a job, or engines for one
        data = render_dates(data, TEST_DS)
        data.setdefault("input", {"uri": "/tmp/in"})
        data.setdefault("output", {"uri": "/tmp/out"})
        parse_job(data, source=f"{rel(path)} snippet")
    elif "apiVersion" in data:
        assert data.get("kind") and (data.get("metadata") or {}).get("name")


def test_readmes_have_an_oss_job():
    jobs = [yaml.safe_load(block) for path, block in MD_YAML if "aliyun" in path.parts]
    uris = [(job.get("input", {}).get("uri", ""), job.get("output", {}).get("uri", ""))
            for job in jobs if isinstance(job, dict)]
    assert any(i.startswith("oss://") and o.startswith("oss://") for i, o in uris)


# ---- augment-ray commands ----------------------------------------------------------------------


@dataclass
class Command:
    where: str
    text: str | None = None         # a shell command line
    argv: list[str] | None = None   # an exec-form container command
    in_cluster: bool = False        # runs in a cluster pod: job files must be /app/... paths


def command_tokens(command: Command) -> list[list[str]]:
    """The simple commands of `command` (split at ; && || |), date expansions filled in."""
    if command.argv is not None:
        argv = command.argv
        if len(argv) >= 3 and Path(argv[0]).name in ("sh", "bash") and argv[1] in ("-c", "-ec"):
            return command_tokens(Command(command.where, text=argv[2],
                                          in_cluster=command.in_cluster))
        return [list(argv)]
    text = DATE_EXPANSION.sub(TEST_DS, command.text or "")
    assert "$(" not in text and "`" not in text, \
        f"{command.where}: unexpected shell expansion in {command.text!r}"
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    segments: list[list[str]] = [[]]
    for token in lexer:
        if token and set(token) <= set(";&|"):
            segments.append([])
        else:
            segments[-1].append(token)
    out = []
    for segment in segments:
        while segment and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", segment[0]):
            segment = segment[1:]  # FOO=bar cmd
        if segment:
            out.append(segment)
    return out


def remaining_args(ctx: click.Context) -> list[str]:
    protected = getattr(ctx, "_protected_args", None)
    if protected is None:  # Click 9: args holds everything
        protected = []
    return [*protected, *ctx.args]


def resolve_job_file(token: str, in_cluster: bool, where: str) -> Path:
    if token.startswith("/app/"):
        return host_path(token)
    assert not in_cluster, (
        f"{where}: {token} runs inside the cluster, where job files are /app/... paths "
        f"(the image copies {sorted(IMAGE_PATHS)})")
    path = Path(token)
    return path if path.is_absolute() else REPO / path


def check_augment_ray(args: list[str], where: str, in_cluster: bool) -> tuple[JobSpec, str] | None:
    """Parse `augment-ray ARGS` with the real CLI; validate the job file it names."""
    # /app/... paths exist only in the image: parse with their repository twins
    # (`submit` checks that its job file exists)
    mapped = [str(host_path(a)) if a.startswith("/app/") else a for a in args]
    try:
        ctx = main.make_context("augment-ray", list(mapped), resilient_parsing=False)
        rest = remaining_args(ctx)
        assert rest, f"{where}: augment-ray without a subcommand"
        name, sub_args = rest[0], rest[1:]
        cmd = main.get_command(ctx, name)
        assert cmd is not None, f"{where}: augment-ray has no subcommand {name!r}"
        sub = cmd.make_context(name, list(sub_args), parent=ctx, resilient_parsing=False)
    except click.UsageError as error:
        pytest.fail(f"{where}: `augment-ray {shlex.join(args)}` does not parse: "
                    f"{error.format_message()}")
    params = sub.params
    ds = params.get("ds") or TEST_DS
    try:
        check_ds(ds)
    except AugmentRayError as error:
        pytest.fail(f"{where}: {error}")
    if "job_file" not in params:
        return None
    original = args[mapped.index(params["job_file"])] if params["job_file"] in mapped else \
        params["job_file"]
    no_working_dir = params.get("no_working_dir", False)
    path = resolve_job_file(original, in_cluster or no_working_dir, where)
    assert path.is_file(), f"{where}: job file {original} -> {rel(path)} does not exist"
    try:
        job = load_job(path, ds=ds)
        if name == "submit" and not no_working_dir:
            # the job file must lie in the working dir that is shipped (relative to the repo)
            plan_submission(str(path), job.name, ds, params["address"] or "http://x:8265",
                            working_dir=str(REPO / params["working_dir"]), pip=[],
                            env_names=[], output=None, force=False)
    except AugmentRayError as error:
        pytest.fail(f"{where}: {error}")
    if name == "submit":
        assert params.get("address"), f"{where}: submit needs --address"
    return job, ds


def check_command(command: Command) -> int:
    """Checks every augment-ray invocation in `command`; how many there were."""
    found = 0
    for tokens in command_tokens(command):
        found += check_simple_command(tokens, command.where, command.in_cluster)
    return found


def augment_ray_args(tokens: list[str]) -> list[str] | None:
    if Path(tokens[0]).name == "augment-ray":
        return tokens[1:]
    if (len(tokens) >= 3 and re.fullmatch(r"python3?(\.\d+)?", Path(tokens[0]).name)
            and tokens[1:3] == ["-m", "augment_ray.cli"]):
        return tokens[3:]
    return None


def check_simple_command(tokens: list[str], where: str, in_cluster: bool) -> int:
    args = augment_ray_args(tokens)
    if args is not None:
        check_augment_ray(args, where, in_cluster)
        return 1
    if tokens[:3] != ["ray", "job", "submit"]:
        return 0
    # `ray job submit [OPTIONS] -- ENTRYPOINT`: the options must parse with Ray's own CLI, and
    # the entrypoint (run on the cluster) must be a valid augment-ray command
    from ray.dashboard.modules.job.cli import job_cli_group

    assert "--" in tokens, f"{where}: ray job submit without `--` before the entrypoint"
    split = tokens.index("--")
    ray_args, entrypoint = tokens[3:split], tokens[split + 1:]
    submit = job_cli_group.get_command(None, "submit")
    try:
        ray_ctx = submit.make_context("submit", [*ray_args, "--", *entrypoint],
                                      resilient_parsing=False)
    except click.UsageError as error:
        pytest.fail(f"{where}: `ray job submit` options do not parse: {error.format_message()}")
    args = augment_ray_args(entrypoint)
    assert args is not None, f"{where}: ray job submit runs {entrypoint[:3]}, not augment-ray"
    shipped = bool(ray_ctx.params.get("working_dir"))
    checked = check_augment_ray(args, where, in_cluster=not shipped)
    if checked and ray_ctx.params.get("submission_id"):
        job, ds = checked
        assert ray_ctx.params["submission_id"] == base_submission_id(job.name, ds), (
            f"{where}: submission id {ray_ctx.params['submission_id']} is not the one "
            f"augment-ray submit uses ({base_submission_id(job.name, ds)})")
    return 1


def comment_commands(path: Path) -> list[Command]:
    """Example commands in YAML comments: lines `#   augment-ray ...` or `#   ray job submit ...`
    (indented by two or more spaces after the `#`, which tells them from prose), with \\
    continuation lines."""
    commands, pending = [], None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.strip()
        text = stripped[1:].strip() if stripped.startswith("#") else None
        indented = stripped.startswith("#  ")
        if pending is not None and text is not None:
            pending[1] += " " + text.rstrip("\\").strip()
            if not text.endswith("\\"):
                commands.append(Command(f"{rel(path)}:{pending[0]} (comment)", text=pending[1]))
                pending = None
            continue
        pending = None
        if text and indented and text.startswith(("augment-ray ", "ray job submit ")):
            text = text.split("  #")[0].strip()  # a trailing comment on the line
            if text.endswith("\\"):
                pending = [number, text.rstrip("\\").strip()]
            else:
                commands.append(Command(f"{rel(path)}:{number} (comment)", text=text))
    return commands


def markdown_commands(path: Path) -> list[Command]:
    commands = []
    for index, block in enumerate(markdown_blocks(path, ("bash", "sh", "shell", ""))):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if line.startswith("augment-ray ") or line.startswith("ray job submit "):
                commands.append(Command(f"{rel(path)} block {index}", text=line))
    return commands


def manifest_commands() -> dict[str, list[Command]]:
    """Commands by the kind of object that runs them."""
    found: dict[str, list[Command]] = {}
    for path, doc in K8S_DOCS:
        where = f"{rel(path)}:{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in ("RayJob", "RayCronJob"):
            for job in job_specs(doc):
                found.setdefault(doc["kind"], []).append(
                    Command(where + " entrypoint", text=job["entrypoint"], in_cluster=True))
        for node in walk(doc):
            if isinstance(node, dict) and "image" in node and ("command" in node or "args" in node):
                argv = [*(node.get("command") or []), *(node.get("args") or [])]
                found.setdefault(doc["kind"], []).append(
                    Command(f"{where} container {node.get('name')}", argv=[str(a) for a in argv],
                            in_cluster=True))
    for path, config in RAY_UP_DOCS:
        for key, value in config.items():
            if key.endswith("_commands") and isinstance(value, list):
                found.setdefault("ray-up", []).extend(
                    Command(f"{rel(path)}:{key}", text=str(c), in_cluster=True) for c in value)
    return found


MANIFEST_COMMANDS = manifest_commands()
DOC_COMMANDS = [c for path in YAML_FILES for c in comment_commands(path)] + \
    [c for path in MD_FILES for c in markdown_commands(path)]


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    # relative job files in laptop commands are relative to the repository root
    monkeypatch.chdir(REPO)


@pytest.mark.parametrize("kind", ["RayJob", "RayCronJob", "CronJob"])
def test_manifest_commands_run_augment_ray(kind):
    commands = MANIFEST_COMMANDS.get(kind, [])
    assert commands, f"no {kind} command found"
    assert sum(check_command(c) for c in commands) >= 1, f"no {kind} command runs augment-ray"


def test_ray_up_commands_parse():
    # setup/start commands mostly install and start Ray; any augment-ray call among them parses
    for command in MANIFEST_COMMANDS.get("ray-up", []):
        check_command(command)


@pytest.mark.parametrize("command", DOC_COMMANDS, ids=[c.where for c in DOC_COMMANDS])
def test_commands_in_comments_and_readmes(command):
    assert check_command(command) >= 1


def test_documented_commands_cover_submit_and_plain_ray():
    texts = [c.text or "" for c in DOC_COMMANDS]
    assert any(t.startswith("augment-ray submit ") for t in texts)
    assert any(t.startswith("ray job submit ") and "--submission-id" in t for t in texts)


def test_a_typo_in_an_entrypoint_fails():
    """The checks above can fail: a misspelled option or subcommand is a test failure."""
    for broken in ("augment-ray run /app/jobs/nightly_refine.yaml --dss 2026-11-21",
                   "augment-ray runn /app/jobs/nightly_refine.yaml",
                   "augment-ray run /app/jobs/missing.yaml",
                   "augment-ray run /app/elsewhere/nightly_refine.yaml",
                   "augment-ray run /app/jobs/nightly_refine.yaml --ds 2026-13-01",
                   "ray job submit --adress http://h:8265 -- augment-ray run /app/jobs/x.yaml",
                   "ray job submit --address http://h:8265 --submission-id augment-x-2026-11-21 "
                   "-- augment-ray run /app/jobs/nightly_refine.yaml --ds 2026-11-21"):
        with pytest.raises((pytest.fail.Exception, AssertionError)):
            check_command(Command("typo", text=broken, in_cluster=True))
