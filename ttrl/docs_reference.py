"""The configuration reference, docs/reference/config.md, generated from the schema and conf/.

    python -m ttrl.docs_reference            # write docs/reference/config.md
    python -m ttrl.docs_reference --check    # exit 1 if the page is stale or a key has no comment

Every key of the structured config (`ttrl.config.TTRLConfig`, and for
`ttrl-serve` the `serve:` section of `ttrl.serve.config.ServeRootConfig`)
gets its type, default, allowed values and the comment written above it in
the dataclass source; every option of every group in conf/ gets its header
comment and the keys it sets. Allowed values are read from the section's
rules, never copied: the choices of its `one_of` checks, the names of the
registries its `registered` checks consult (so a newly registered reward or
estimator shows up by itself), and the bounds of `at_least`, `above`,
`within` and `share`.

The page is a pure function of the source: no dates, no absolute paths, no
machine-dependent values, so a unit test can compare it byte for byte.
This module reads source files and imports the config modules and the
registries of the pure core (torch comes in with the algorithm registries);
it must never import ray, vllm or deepspeed, and never start anything.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import io
import json
import re
import sys
import tokenize
import typing
from dataclasses import MISSING as NO_DEFAULT
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from ttrl import config as config_module
from ttrl.config import TTRLConfig
from ttrl.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "reference" / "config.md"
CONF = ROOT / "conf"


class ReferenceError(ValueError):
    """Something in the schema or conf/ that the reference cannot describe; the message names the file."""


# ── what the dataclass source says about each key ─────────────────────────
@dataclass
class Key:
    """One leaf key of the schema, with everything the reference prints about it."""

    path: str  # dotted, e.g. "rollout.n_votes"
    schema: type  # the dataclass that declares it
    name: str
    hint: Any  # the type annotation
    default: Any  # NO_DEFAULT for a field without one
    comment: str  # the comment above the field (and any on its line), "" if none
    where: str  # "ttrl/config.py:123"
    allowed: list[str]


@dataclass
class Section:
    """One dataclass of the schema at its place in the tree (a path of "" is the root)."""

    path: str
    schema: type
    doc: str  # the class's own docstring, "" if it has none
    where: str
    keys: list[Key]


_source_cache: dict[Path, tuple[ast.Module, dict[int, str], list[str]]] = {}


def _parsed(path: Path) -> tuple[ast.Module, dict[int, str], list[str]]:
    """The module's AST, its comments by line number, and its lines."""
    if path not in _source_cache:
        text = path.read_text()
        comments = {tok.start[0]: tok.string for tok in tokenize.generate_tokens(io.StringIO(text).readline)
                    if tok.type == tokenize.COMMENT}
        _source_cache[path] = (ast.parse(text, filename=str(path)), comments, text.splitlines())
    return _source_cache[path]


def _class_node(schema: type) -> tuple[Path, ast.ClassDef]:
    path = Path(inspect.getsourcefile(schema) or "")
    tree, _, _ = _parsed(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == schema.__name__:
            return path, node
    raise ReferenceError(f"{path}: no class {schema.__name__}")


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def _is_banner(comment: str) -> bool:
    # `# ── the loop`: a divider between groups of keys, not a word about the next key.
    return comment.strip().lstrip("#").strip().startswith("──")


def _comment_text(lines: list[str]) -> str:
    """Comment lines as one paragraph: the leading '#' and one space dropped, lines joined."""
    words = []
    for line in lines:
        body = line.strip()[1:]
        words.append(body[1:] if body.startswith(" ") else body)
    return " ".join(w.strip() for w in words if w.strip())


def field_comments(schema: type) -> dict[str, tuple[str, int]]:
    """{field: (its comment, line)}: the unbroken run of comment lines right above the field
    (dividers excluded), then any comment on the field's own lines."""
    path, node = _class_node(schema)
    _, comments, lines = _parsed(path)
    out: dict[str, tuple[str, int]] = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above: list[str] = []
        i = stmt.lineno - 1
        while i >= 1 and lines[i - 1].strip().startswith("#"):
            if _is_banner(lines[i - 1]):
                break
            above.insert(0, lines[i - 1])
            i -= 1
        inline = [comments[n] for n in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1) if n in comments]
        out[stmt.target.id] = (_comment_text(above + inline), stmt.lineno)
    return out


def class_doc(schema: type) -> tuple[str, str]:
    """(the docstring written in the class, file:line); "" when the class has none of its own."""
    path, node = _class_node(schema)
    return inspect.cleandoc(ast.get_docstring(node) or ""), f"{_rel(path)}:{node.lineno}"


# ── what each section's rules allow ────────────────────────────────────────
def _bound(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _choices(value: Any) -> list[str]:
    names = value.names() if isinstance(value, Registry) else sorted(value) if isinstance(value, (set, frozenset)) \
        else list(value)
    return [_show(v) for v in names]


def allowed_values(schema: type) -> dict[str, list[str]]:
    """{key: ["one of: a, b", ">= 1", ...]} from the calls in the section's rule function.

    The rule's choices are evaluated in ttrl.config's namespace plus the
    imports the rule makes itself (the registries), so they are the very
    objects validation checks against.
    """
    check = config_module._RULES.get(schema)
    if check is None:
        return {}
    node = ast.parse(inspect.cleandoc("\n" + inspect.getsource(check)))
    namespace = dict(vars(config_module))
    for stmt in ast.walk(node):
        if isinstance(stmt, ast.ImportFrom | ast.Import):
            exec(compile(ast.Module(body=[stmt], type_ignores=[]), "<rule imports>", "exec"), namespace)
    conditional: set[int] = set()
    for stmt in ast.walk(node):
        if isinstance(stmt, ast.If):
            conditional |= {id(n) for n in ast.walk(stmt) if n is not stmt}
    out: dict[str, list[str]] = {}

    def add(name: str, text: str) -> None:
        out.setdefault(name, [])
        if text not in out[name]:
            out[name].append(text)

    for call in ast.walk(node):
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)):
            continue
        method, args = call.func.attr, call.args
        kw = {k.arg: k.value for k in call.keywords}

        def names(from_index: int, args=args) -> list[str]:
            return [a.value for a in args[from_index:] if isinstance(a, ast.Constant) and isinstance(a.value, str)]

        def const(a: ast.expr) -> Any:
            return ast.literal_eval(a)

        if method in ("one_of", "registered") and len(args) >= 2 and isinstance(args[0], ast.Constant):
            value = eval(compile(ast.Expression(args[1]), "<rule choices>", "eval"), namespace)
            listed = ", ".join(_choices(value))
            text = f"one of: {listed}"
            if id(call) in conditional:
                text += " (when it is a name; see the description for the other forms)"
            add(args[0].value, text)
        elif method == "at_least":
            for n in names(1):
                add(n, f">= {_bound(const(args[0]))}")
        elif method == "above":
            for n in names(1):
                add(n, f"> {_bound(const(args[0]))}")
        elif method == "within":
            lo_open = bool(const(kw["low_open"])) if "low_open" in kw else False
            hi_open = bool(const(kw["high_open"])) if "high_open" in kw else False
            span = (f"{'(' if lo_open else '['}{_bound(const(args[0]))}, {_bound(const(args[1]))}"
                    f"{')' if hi_open else ']'}")
            for n in names(2):
                add(n, f"in {span}")
        elif method == "share":
            for n in names(0):
                add(n, "in [0, 1]")
        elif method == "filled":
            for n in names(0):
                add(n, "non-empty")
    return out


# ── the schema as a tree of sections ───────────────────────────────────────
def _hints(schema: type) -> dict[str, Any]:
    hints = typing.get_type_hints(schema)
    return {f.name: hints[f.name] for f in fields(schema)}


def _default(schema: type, name: str) -> Any:
    f = next(f for f in fields(schema) if f.name == name)
    if f.default is not NO_DEFAULT:
        return f.default
    if f.default_factory is not NO_DEFAULT:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return NO_DEFAULT


def sections(schema: type = TTRLConfig, path: str = "", only: str | None = None) -> list[Section]:
    """Each dataclass under `schema`, depth first in declaration order; `only`: that top-level field alone."""
    comments = field_comments(schema)
    rules = allowed_values(schema)
    doc, where = class_doc(schema)
    src = _rel(Path(inspect.getsourcefile(schema) or ""))
    keys, below = [], []
    for name, hint in _hints(schema).items():
        dotted = f"{path}.{name}" if path else name
        if only is not None and not path and name != only:
            continue
        if is_dataclass(hint):
            below += sections(hint, dotted)
            continue
        text, line = comments.get(name, ("", 0))
        keys.append(Key(dotted, schema, name, hint, _default(schema, name), text, f"{src}:{line}",
                        rules.get(name, [])))
    # The root section holds seed, experiment, device; a dataclass of sections only gets no table.
    here = [Section(path, schema, doc, where, keys)] if keys or (not path and only is None) else []
    return here + below


def serve_sections() -> list[Section]:
    from ttrl.serve.config import ServeRootConfig

    return sections(ServeRootConfig, only="serve")


def undocumented() -> list[str]:
    """Every key without a comment and every section without a docstring, as 'file:line: what'."""
    missing = []
    for sec in sections() + serve_sections():
        if not sec.doc:
            missing.append(f"{sec.where}: class {sec.schema.__name__} ({sec.path or 'the root'}) has no docstring")
        for k in sec.keys:
            if not k.comment:
                missing.append(f"{k.where}: {k.path} ({k.schema.__name__}.{k.name}) has no comment above it")
    return missing


# ── rendering ──────────────────────────────────────────────────────────────
_PLAIN = re.compile(r"[A-Za-z0-9_./:@+-]+")


def _show(value: Any) -> str:
    """A value as it would be written in YAML or on the command line."""
    if value is NO_DEFAULT or value == "???":
        return "???"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        return re.sub(r"e([+-])0*(\d)", r"e\1\2", text)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value if _PLAIN.fullmatch(value) and value not in ("null", "true", "false") else json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    return str(value)


def _type(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_type(a) for a in inner) + (" or null" if len(inner) < len(args) else "")
    if origin is list:
        return f"list of {_type(args[0])}"
    if origin is dict:
        return f"mapping of {_type(args[0])} to {_type(args[1])}"
    return getattr(hint, "__name__", str(hint))


def _outside_code(text: str, plain, code) -> str:
    """`text` with `plain` applied between inline code spans and `code` to each span's content."""
    parts = text.split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: no code spans at all
        return plain(text)
    return "".join(plain(part) if i % 2 == 0 else code(part) for i, part in enumerate(parts))


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("*", "\\*")


def _prose(text: str) -> str:
    """Comment text as markdown: `<name>` placeholders stay visible (not HTML), `*` is not emphasis;
    inline code is left as written."""
    return _outside_code(text, _escape, lambda c: f"`{c}`")


def _cell(text: str) -> str:
    """Comment text for a table cell: as prose, with every pipe escaped (one would end the cell)."""
    return _outside_code(text.replace("\n", " "), lambda t: _escape(t).replace("|", "\\|"), _code)


def _code(text: str) -> str:
    """Inline code that survives a table cell (a pipe would end the cell)."""
    return f"<code>{_html(text)}</code>" if "|" in text or "`" in text else f"`{text}`"


def _html(text: str) -> str:
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "&#124;")
            .replace("`", "&#96;"))


def _anchor(path: str) -> str:
    return "key-" + path.replace(".", "-").replace("_", "-")


def _section_title(sec: Section) -> str:
    return f"`{sec.path}`" if sec.path else "The root"


def _section_md(sec: Section) -> list[str]:
    lines = [f"### {_section_title(sec)}", ""]
    if sec.doc:
        lines += [sec.doc, ""]
    lines += [f"Declared in `{sec.where.split(':')[0]}` as `{sec.schema.__name__}`.", ""]
    lines += ["| key | type | default | allowed | what it does |", "|---|---|---|---|---|"]
    for k in sec.keys:
        shown = _show(k.default)
        default = "??? (must be set)" if shown == "???" else _code(shown)
        allowed = "; ".join(_cell(a) for a in k.allowed) or "–"
        lines.append(f'| <a id="{_anchor(k.path)}"></a>`{k.path}` | {_cell(_type(k.hint))} | {default} | '
                     f"{allowed} | {_cell(k.comment)} |")
    return lines + [""]


_COMMANDS = ("ttrl-", "make ", "python ", "bash ", "sbatch ", "ray ", "experiments/", "./")


def _yaml_header(text: str) -> tuple[str, bool]:
    """(the file's opening comment as markdown, whether it is `# @package _global_`)."""
    out, is_global = [], False
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        body = line[1:]
        body = body[1:] if body.startswith(" ") else body
        if body.strip().startswith("@package"):
            is_global = "_global_" in body
            continue
        out.append(body)
    # Indented commands (`#   ttrl-train ...`) become a code block; everything else is prose.
    md, block = [], []
    for line in out + [""]:
        if line.startswith("  ") and line.strip().startswith(_COMMANDS):
            block.append(line.strip())
            continue
        if block:
            md += ["", "```", *block, "```", ""]
            block = []
        if line.startswith("- ") and md and md[-1].strip() and not md[-1].startswith(("- ", "  ")):
            md.append("")  # a list needs a blank line before it
        md.append(_prose(line))
    return "\n".join(md).strip(), is_global


def _leaf_keys(schema: type, path: list[str]) -> tuple[type, str] | None:
    """(the dataclass declaring the key at `path`, the field name), or None if the schema has no such key;
    a path that runs into a leaf field's value (a mapping key of a dict field) returns that field."""
    node: Any = schema
    for i, part in enumerate(path):
        hints = _hints(node)
        if part not in hints:
            return None
        if not is_dataclass(hints[part]):
            return node, ".".join(path[: i + 1])
        node = hints[part]
    return None


def option_rows(data: Any, package: list[str], schema: type, file: Path) -> list[tuple[str, Any, str | None]]:
    """(dotted key, value set, the schema key it documents) for every value a conf file sets."""
    rows: list[tuple[str, Any, str | None]] = []

    def walk(node: Any, path: list[str]) -> None:
        if isinstance(node, dict) and not (path and _leaf_keys(schema, path) is not None):
            for k, v in node.items():
                if path == package and k == "defaults":  # the file's defaults list, shown apart
                    continue
                walk(v, path + [str(k)])
            return
        dotted = ".".join(path)
        if path[0] == "hydra":
            rows.append((dotted, node, None))  # Hydra's own keys: documented by Hydra
            return
        found = _leaf_keys(schema, path)
        if found is None:
            raise ReferenceError(f"{_rel(file)}: {dotted} is not a key of the schema (ttrl/config.py,"
                                 " ttrl/serve/config.py)")
        rows.append((dotted, node, found[1]))

    walk(data, package)
    return rows


def _defaults_md(data: Any) -> str:
    items = data.get("defaults", []) if isinstance(data, dict) else []
    shown = []
    for item in items:
        if isinstance(item, dict):
            shown += [f"`{k}: {_show(v)}`" for k, v in item.items()]
        else:
            shown.append(f"`{item}`")
    return ", ".join(shown)


def group_md(conf: Path, schema: type) -> list[str]:
    """Each group of conf/ (model/, data/, ..., hydra/launcher/), each option with its header and keys."""
    lines: list[str] = []
    # In the order conf/config.yaml's defaults list picks them (the data flow), then the rest by name.
    root = yaml.safe_load((conf / "config.yaml").read_text()) or {}
    order = [k for item in root.get("defaults", []) if isinstance(item, dict) for k in item]
    names = sorted({str(p.parent.relative_to(conf)) for p in conf.rglob("*.yaml") if p.parent != conf},
                   key=lambda n: (order.index(n) if n in order else len(order), n))
    for name in names:
        group = conf / name
        lines += [f"### Group `{name}`", ""]
        for file in sorted(group.glob("*.yaml")):
            text = file.read_text()
            try:
                data = yaml.safe_load(text) or {}
            except yaml.YAMLError as err:
                raise ReferenceError(f"{_rel(file)}: not valid YAML ({str(err).splitlines()[0]})") from None
            header, is_global = _yaml_header(text)
            package = [] if is_global else name.split("/")
            choice = file.stem
            lines += [f"#### `{name}={choice}`", "", f"`{_rel(file)}`" + (" (sets keys anywhere: `@package _global_`)"
                                                                       if is_global else ""), ""]
            if header:
                lines += [header, ""]
            defaults = _defaults_md(data)
            if defaults:
                lines += [f"Defaults list: {defaults}", ""]
            rows = option_rows(data, package, schema, file)
            if rows:
                lines += ["| key | value here | schema default |", "|---|---|---|"]
                for dotted, value, key in rows:
                    if key is None:
                        ref, default = f"`{dotted}`", "(Hydra's own key)"
                    else:
                        owner = _leaf_keys(schema, key.split("."))
                        assert owner is not None
                        ref = f"[`{dotted}`](#{_anchor(key)})"
                        default = _code(_show(_default(owner[0], key.split(".")[-1])))
                    lines.append(f"| {ref} | {_code(_show(value))} | {default} |")
                lines.append("")
    return lines


def render(conf: Path = CONF) -> str:
    """The whole page, as markdown."""
    from ttrl.serve.config import ServeRootConfig

    root = yaml.safe_load((conf / "config.yaml").read_text()) or {}
    chosen = []
    for item in root.get("defaults", []):
        if isinstance(item, dict):
            chosen += [f"`{k}={_show(v)}`" for k, v in item.items()]
    lines = [
        "<!-- Generated by `python -m ttrl.docs_reference` (`make docs` runs it) from ttrl/config.py,",
        "     ttrl/serve/config.py and conf/. Do not edit: change the comments in the dataclasses instead. -->",
        "",
        "# Configuration reference",
        "",
        "Every key `ttrl-train`, `ttrl-eval` and `ttrl-serve` accept, generated from the structured config",
        "(`ttrl/config.py`, root `TTRLConfig`; `ttrl/serve/config.py` for the `serve:` section) and from the",
        "option files of `conf/`. A key that is not listed here is an error at start-up, not a silent no-op;",
        "a value outside *allowed* fails validation with one sentence naming the key, before any actor starts.",
        "",
        "Set keys on the command line (`ttrl-train rollout.n_votes=32 trainer.lr=1e-6`), pick group options",
        "(`ttrl-train model=qwen2.5-math-1.5b algorithm=ppo`), or print the composed config with",
        "`ttrl-train --cfg job`. *Allowed* comes from each section's validation rules and from the registries",
        "(`ttrl/registry.py`): registering a new reward or advantage estimator adds it here by itself.",
        "",
        "`ttrl-train` composes `conf/config.yaml`, whose defaults pick: " + ", ".join(chosen) + ".",
        "`ttrl-serve` composes `conf/serve.yaml`: the same groups plus the [`serve` section](#serve).",
        "",
        "## Keys",
        "",
    ]
    for sec in sections():
        lines += _section_md(sec)
    lines += ["## `serve` (ttrl-serve only)", "", '<a id="serve"></a>',
              "These keys exist in `ttrl-serve`'s config (`conf/serve.yaml`, schema `ServeRootConfig`) only.", ""]
    for sec in serve_sections():
        lines += _section_md(sec)
    lines += ["## Group options", "",
              "What each option file of `conf/` sets. A key links to its row above (type, allowed values, what it",
              "does); *schema default* is the value when no option sets it.", ""]
    lines += group_md(conf, ServeRootConfig)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m ttrl.docs_reference", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=PAGE)
    ap.add_argument("--check", action="store_true", help="exit 1 if the page is stale or a key has no comment")
    args = ap.parse_args(argv)
    try:
        text = render()
    except ReferenceError as err:
        print(f"ttrl.docs_reference: {err}", file=sys.stderr)
        sys.exit(2)
    missing = undocumented()
    if missing:
        print("ttrl.docs_reference: keys without a comment:\n  " + "\n  ".join(missing), file=sys.stderr)
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"ttrl.docs_reference: {_rel(args.out)} is stale: run `python -m ttrl.docs_reference`",
                  file=sys.stderr)
            sys.exit(1)
        sys.exit(1 if missing else 0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"ttrl.docs_reference: wrote {_rel(args.out)}", file=sys.stderr)


if __name__ == "__main__":
    main()
