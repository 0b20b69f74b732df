"""The field tables of docs/STEPS.md and docs/ENGINES.md, rendered from the registered kinds'
pydantic specs (their `Field` descriptions), so the reference cannot drift from the code.

    python -m augment_ray.reference           # rewrite the tables in docs/
    python -m augment_ray.reference --check   # exit 1 when a table is stale (tests run this)

A table sits between `<!-- fields:KIND -->` and `<!-- /fields:KIND -->` (engines:
`fields:engine:KIND`); everything outside the markers is hand-written prose.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from augment_ray.config.base import EngineSpec
from augment_ray.kinds import engine_kinds, step_kinds

DOCS = Path(__file__).resolve().parent.parent / "docs"
MARKER = re.compile(r"(<!-- fields:(?P<key>[\w:]+) -->\n)(?P<body>.*?)(<!-- /fields:(?P=key) -->)",
                    re.DOTALL)


def type_text(annotation: Any) -> str:
    """A short, readable name of a field's type."""
    origin = get_origin(annotation)
    if origin is Literal:
        return " \\| ".join(f'"{value}"' if isinstance(value, str) else str(value)
                            for value in get_args(annotation))
    if origin in (Union, types.UnionType):
        parts = [type_text(arg) for arg in get_args(annotation) if arg is not type(None)]
        optional = type(None) in get_args(annotation)
        return " \\| ".join(parts) + (" \\| null" if optional else "")
    if origin in (list, tuple, dict):
        args = ", ".join(type_text(arg) for arg in get_args(annotation) if arg is not Ellipsis)
        return f"{origin.__name__}[{args}]"
    return getattr(annotation, "__name__", str(annotation))


def default_text(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(defaults below)" if type(value).model_fields else "{}"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return f"`{value!r}`" if isinstance(value, str) else f"`{value}`"


def _nested_models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in get_args(annotation) for model in _nested_models(arg)]


def fields_table(model: type[BaseModel], skip: tuple[str, ...] = ("kind",)) -> str:
    """Markdown: one row per field (name, type, default, description), then one table per
    nested model (e.g. `normalize`, `sampling`), each listed once."""
    lines = ["| field | type | default | description |", "| --- | --- | --- | --- |"]
    nested: dict[str, type[BaseModel]] = {}
    # what every engine kind shares comes after the kind's own fields
    shared = EngineSpec.model_fields if issubclass(model, EngineSpec) else {}
    for name, field in sorted(model.model_fields.items(), key=lambda item: item[0] in shared):
        if name in skip:
            continue
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{name}` | {type_text(field.annotation)} | {default_text(field)} | "
                     f"{description} |")
        for sub in _nested_models(field.annotation):
            nested.setdefault(f"{name}: {sub.__name__}", sub)
    text = "\n".join(lines) + "\n"
    for title, sub in nested.items():
        text += f"\n`{title}`\n\n" + fields_table(sub, skip=())
    return text


def tables() -> dict[str, str]:
    """marker key -> generated table, for every registered kind."""
    generated = {kind: fields_table(cls.spec_class) for kind, cls in step_kinds().items()}
    generated.update({f"engine:{kind}": fields_table(cls.spec_class)
                      for kind, cls in engine_kinds().items()})
    return generated


def render(text: str, generated: dict[str, str]) -> str:
    """`text` with every marker pair's body replaced by its generated table."""
    def fill(match: re.Match[str]) -> str:
        key = match["key"]
        if key not in generated:
            raise KeyError(f"docs name a kind that is not registered: {key!r}")
        return f"{match.group(1)}{generated[key]}{match.group(4)}"

    return MARKER.sub(fill, text)


def marker_keys(text: str) -> list[str]:
    return [match["key"] for match in MARKER.finditer(text)]


def doc_pages() -> list[Path]:
    return [DOCS / "STEPS.md", DOCS / "ENGINES.md"]


def main(argv: list[str]) -> int:
    check = "--check" in argv
    generated = tables()
    stale = []
    for page in doc_pages():
        text = page.read_text(encoding="utf-8")
        updated = render(text, generated)
        if updated != text:
            stale.append(page.name)
            if not check:
                page.write_text(updated, encoding="utf-8")
    if check and stale:
        print(f"stale field tables in {', '.join(stale)}: run python -m augment_ray.reference",
              file=sys.stderr)
        return 1
    print(("updated " if stale else "up to date: ") + ", ".join(stale or
          [p.name for p in doc_pages()]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
