"""Writes docs/config.md: every key of ``sqjax.config.default_config()``, its default and
its comment in the source.

    python docs/gen_config_reference.py          # rewrite docs/config.md
    python docs/gen_config_reference.py --check  # exit 1 when docs/config.md is stale

The defaults come from calling ``default_config()``; the comments from its source (a
comment on the key's line, or the comment lines directly above it). tests/test_docs.py
checks that the committed page equals what this writes.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import io
import sys
import textwrap
import tokenize
from pathlib import Path

PAGE = Path(__file__).resolve().parent / "config.md"
COMMAND = "python docs/gen_config_reference.py"


def _comments(source: str) -> dict[int, str]:
    """Line number -> the text of the comment on that line (without '#')."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def _key(target: ast.expr) -> str | None:
    """``c.data.augment`` -> "data.augment"; None for anything else."""
    parts = []
    while isinstance(target, ast.Attribute):
        parts.append(target.attr)
        target = target.value
    if isinstance(target, ast.Name) and target.id == "c" and parts:
        return ".".join(reversed(parts))
    return None


def source_comments() -> dict[str, tuple[int, str]]:
    """Key ("train.batch_size", "data.augment.p_noise") -> (its line in the source, its
    comment)."""
    from sqjax import config

    lines, _ = inspect.getsourcelines(config.default_config)
    source = textwrap.dedent("".join(lines))
    comments = _comments(source)
    code_lines = {n for n, line in enumerate(source.splitlines(), 1) if line.strip()}
    code_lines -= {n for n, line in enumerate(source.splitlines(), 1) if line.lstrip()[:1] == "#"}

    def above(lineno: int) -> list[str]:
        block, n = [], lineno - 1
        while n in comments and n not in code_lines:
            block.insert(0, comments[n])
            n -= 1
        return block

    def own(node: ast.AST) -> list[str]:
        return [comments[node.lineno]] if node.lineno in comments else []

    out = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Assign) or len(node.targets) != 1:
            continue
        key = _key(node.targets[0])
        if key is None:
            continue
        out[key] = (node.lineno, " ".join(above(node.lineno) + own(node)))
        # ConfigDict({"name": value,  # comment ...}): comments of the dict's entries
        for sub in ast.walk(node.value):
            if isinstance(sub, ast.Dict):
                for k, v in zip(sub.keys, sub.values):
                    if isinstance(k, ast.Constant) and isinstance(k.value, str):
                        text = comments.get(v.end_lineno, "") if v.end_lineno else ""
                        comment = " ".join([*above(k.lineno), text]).strip()
                        out[f"{key}.{k.value}"] = (k.lineno, comment)
    return out


def rows() -> list[tuple[str, object, str]]:
    """(key, default, comment) for every key of ``default_config()`` in source order; a
    group (a nested ConfigDict) has the default ``GROUP``."""
    import ml_collections

    from sqjax.config import default_config

    comments = source_comments()
    out = []

    def line(key: str) -> int:
        if key not in comments:
            raise KeyError(f"config key {key} is not assigned in default_config()'s source")
        return comments[key][0]

    def walk(node, prefix: str) -> None:
        for name in sorted(node.keys(), key=lambda name: line(prefix + name)):
            key, value = f"{prefix}{name}", node[name]
            if isinstance(value, ml_collections.ConfigDict):
                out.append((key, GROUP, comments[key][1]))
                walk(value, key + ".")
            else:
                out.append((key, value, comments[key][1]))

    walk(default_config(), "")
    return out


GROUP = object()
_HEADER = ["| key | default | comment |", "|---|---|---|"]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    """The page's Markdown."""
    out = [
        "# Config reference",
        "",
        "Every key of `sqjax.config.default_config()`, the defaults every config file starts",
        "from (`configs/*.py` override them; each file's docstring has its command). Override",
        "one on the command line with `--config.<key>=<value>`, e.g.",
        "`--config.train.num_steps=100`; a key the config lacks, or a value of another type",
        "than the default's, is an error.",
        "",
        f"Generated from the source by `{COMMAND}`; tests/test_docs.py fails",
        "when this page and `default_config()` differ.",
        "",
    ]
    all_rows = rows()
    sections = [("", None, "")] + [r for r in all_rows if "." not in r[0] and r[1] is GROUP]
    for section, _, comment in sections:
        out += [f"## `{section}`" if section else "## Top level", ""]
        if comment:
            out += [comment, ""]
        out += _HEADER
        for key, value, text in all_rows:
            inside = key.startswith(section + ".") if section else "." not in key
            if not inside or (not section and value is GROUP):
                continue
            default = "(group)" if value is GROUP else f"`{value!r}`"
            out.append(f"| `{key}` | {default} | {_cell(text)} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if PAGE.read_text() != text:
            print(f"{PAGE} is stale: run {COMMAND}", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
