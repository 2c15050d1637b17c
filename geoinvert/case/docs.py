"""The reference tables of ``docs/case-files.md``, generated from the schema.
"""

from pathlib import Path

import yaml

from geoinvert.case.schema import (KINDS, REQUIRED, REQUIRED_SECTIONS, SAMPLER_KEY_KINDS, SCHEMA,
                                   SECTIONS)

__all__ = ["schema_markdown", "DOC_START", "DOC_END", "update_doc"]


def _markdown_default(key):
    if key.default is REQUIRED:
        return "**required**"
    if key.default is None:
        return "—"
    text = yaml.safe_dump(key.default, default_flow_style=True)
    return f"`{text.strip().removesuffix('...').strip()}`"


def _markdown_type(key):
    rule = key.check.__doc__ if key.check and key.check.__doc__ else ""
    return KINDS[key.kind][1] + (f", {rule}" if rule else "")


def schema_markdown():
    """The reference tables of ``docs/case-files.md``, generated from :data:`SCHEMA`."""
    out = []
    for section in ("", *SECTIONS):
        keys = [k for k in SCHEMA if (k.path.split(".")[0] == section if section
                                      else "." not in k.path)]
        title = f"### `{section}`" if section else "### top level"
        if section in REQUIRED_SECTIONS:
            title += " (required section)"
        out += ["", title, "", "| key | type | default | meaning | example |",
                "| --- | --- | --- | --- | --- |"]
        out += [f"| `{k.path}` | {_markdown_type(k)} | {_markdown_default(k)} | "
                f"{k.doc.replace('|', '/')}{_markdown_kinds(k)} | `{k.example}` |" for k in keys]
    return "\n".join(out).lstrip("\n") + "\n"


def _markdown_kinds(key):
    """`` Kinds: ...`` for the ``sampler`` keys that apply to some kinds only."""
    parts = key.path.split(".")
    kinds = SAMPLER_KEY_KINDS.get(parts[1]) if parts[0] == "sampler" and len(parts) > 1 else None
    return f" Kinds: {', '.join(f'`{k}`' for k in kinds)}." if kinds else ""


DOC_START, DOC_END = "<!-- schema:start -->", "<!-- schema:end -->"


def update_doc(path):
    """Rewrite the generated block between the schema markers of a Markdown file.

    Returns:
        True if the file changed.
    """
    path = Path(path)
    text = path.read_text()
    head, rest = text.split(DOC_START, 1)
    _, tail = rest.split(DOC_END, 1)
    new = f"{head}{DOC_START}\n{schema_markdown()}{DOC_END}{tail}"
    if new != text:
        path.write_text(new)
    return new != text
