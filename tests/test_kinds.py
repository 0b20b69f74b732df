"""The registry of step and engine kinds agrees with the docs, the example jobs and itself."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from augment_ray import reference
from augment_ray.config.job import JobSpec, parse_job
from augment_ray.errors import JobSpecError
from augment_ray.kinds import engine_kinds, kind_of, step_kind, step_kinds
from augment_ray.steps.base import Step
from augment_ray.steps.dedup import DedupExactStepSpec

ROOT = Path(__file__).resolve().parent.parent
STEPS_DOC = ROOT / "docs" / "STEPS.md"
ENGINES_DOC = ROOT / "docs" / "ENGINES.md"
KINDS = sorted(step_kinds())
ENGINES = sorted(engine_kinds())


def test_the_registry_finds_every_kind_module() -> None:
    # a floor, not the list: a new kind is found without editing this test
    assert {"refine", "expand", "pair_expand", "respond", "classify_task", "dedup_exact",
            "dedup_near", "filter", "score", "auto_filter", "auto_correct"} <= set(KINDS)
    assert {"transformers", "vllm", "openai"} <= set(ENGINES)
    for kind, cls in step_kinds().items():
        assert issubclass(cls, Step) and cls.kind == kind == kind_of(cls.spec_class)


def test_the_job_spec_union_is_the_registry() -> None:
    job = JobSpec.model_json_schema()
    step_refs = job["properties"]["steps"]["items"]["discriminator"]["mapping"]
    assert sorted(step_refs) == KINDS
    with pytest.raises(JobSpecError, match="unknown step kind; expected one of: " +
                       re.escape(", ".join(KINDS))):
        parse_job({"input": {"uri": "x"}, "output": {"uri": "y"}, "steps": [{"kind": "nope"}]})
    with pytest.raises(JobSpecError, match="unknown engine kind; expected one of: " +
                       re.escape(", ".join(ENGINES))):
        parse_job({"input": {"uri": "x"}, "output": {"uri": "y"},
                   "engines": {"e": {"kind": "nope"}}})


def test_a_kind_registered_twice_is_refused() -> None:
    with pytest.raises(TypeError, match="registered twice"):
        @step_kind(DedupExactStepSpec)
        class AnotherDedup(Step):  # pragma: no cover - never built
            def apply(self, ds):
                return ds


def _documented(path: Path, prefix: str = "") -> set[str]:
    keys = reference.marker_keys(path.read_text(encoding="utf-8"))
    return {key.removeprefix(prefix) for key in keys if key.startswith(prefix)}


@pytest.mark.parametrize("kind", KINDS)
def test_every_step_kind_has_a_docs_section_with_its_fields(kind: str) -> None:
    text = STEPS_DOC.read_text(encoding="utf-8")
    assert re.search(rf"^## {kind}$", text, re.M), f"docs/STEPS.md has no '## {kind}' section"
    assert kind in _documented(STEPS_DOC), f"docs/STEPS.md has no fields table for {kind}"


@pytest.mark.parametrize("kind", ENGINES)
def test_every_engine_kind_has_a_docs_section_with_its_fields(kind: str) -> None:
    text = ENGINES_DOC.read_text(encoding="utf-8")
    assert re.search(rf"^## {kind}$", text, re.M), f"docs/ENGINES.md has no '## {kind}'"
    assert kind in _documented(ENGINES_DOC, "engine:")


def test_the_readme_links_every_step_kind() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [kind for kind in KINDS if f"(docs/STEPS.md#{kind})" not in readme]
    assert not missing, f"README.md's step list lacks {missing}"


def test_every_documented_kind_is_registered() -> None:
    assert _documented(STEPS_DOC) <= set(KINDS)
    assert _documented(ENGINES_DOC, "engine:") <= set(ENGINES)


def test_the_field_tables_are_generated_from_the_specs() -> None:
    generated = reference.tables()
    for page in reference.doc_pages():
        text = page.read_text(encoding="utf-8")
        assert reference.render(text, generated) == text, (
            f"{page.name} is stale: run python -m augment_ray.reference")
    # the generator really renders a description (a table that cannot fail proves nothing)
    assert "Jaccard similarity at or above which rows are duplicates" in generated["dedup_near"]


def _models(model: type[BaseModel], seen: set[type[BaseModel]]) -> None:
    if model in seen:
        return
    seen.add(model)
    for field in model.model_fields.values():
        for nested in reference._nested_models(field.annotation):
            _models(nested, seen)


def test_every_spec_field_is_described() -> None:
    seen: set[type[BaseModel]] = set()
    for cls in [*step_kinds().values(), *engine_kinds().values()]:
        _models(cls.spec_class, seen)
    missing = [f"{model.__name__}.{name}" for model in seen
               for name, field in model.model_fields.items()
               if name != "kind" and not field.description]
    assert not missing, f"fields without a description (the docs show it): {missing}"


def test_every_step_kind_has_an_example_job() -> None:
    used: set[str] = set()
    for path in (ROOT / "jobs").rglob("*.yaml"):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        used |= {step.get("kind") for step in data.get("steps", []) or []}
    missing = sorted(set(KINDS) - used)
    assert not missing, f"step kinds with no example job in jobs/: {missing}"


def _module_imports(path: Path, module: str, modules: set[str]) -> set[str]:
    """augment_ray modules `path` imports anywhere (functions too), except under
    TYPE_CHECKING."""
    found: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            test = node.test
            if getattr(test, "id", None) == "TYPE_CHECKING" or \
                    getattr(test, "attr", None) == "TYPE_CHECKING":
                for child in node.orelse:
                    self.visit(child)
                return
            self.generic_visit(node)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.module and node.module.startswith("augment_ray"):
                for alias in node.names:
                    name = f"{node.module}.{alias.name}"
                    found.add(name if name in modules else node.module)

        def visit_Import(self, node: ast.Import) -> None:
            found.update(a.name for a in node.names if a.name.startswith("augment_ray"))

    Visitor().visit(ast.parse(path.read_text(encoding="utf-8")))
    return {name for name in found if name in modules and name != module}


def test_no_import_cycles() -> None:
    files = {}
    for path in (ROOT / "augment_ray").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        files[name] = path
    graph = {name: _module_imports(path, name, set(files)) for name, path in files.items()}
    cycles = []
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target):], target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, f"import cycles: {cycles}"


def test_no_module_is_over_500_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "augment_ray").rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500}
    assert not long, f"modules over 500 lines (split them by owner): {long}"


def test_the_reference_command_checks_the_docs_as_documented() -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "augment_ray.reference", "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "up to date: STEPS.md, ENGINES.md"
    assert "Traceback" not in done.stderr
