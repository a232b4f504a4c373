"""The docs site's own checks: every config key documented, the generated reference current, the layout true.

- Every key of the schema (ttrl/config.py, ttrl/serve/config.py) has a
  comment above it in its dataclass, and every section a docstring: that
  comment is the key's documentation, so a key without one is a key users
  cannot look up.
- docs/reference/config.md is what `python -m ttrl.docs_reference` writes
  now: a new key, a changed default or a newly registered name makes it
  stale, and this test names the command that regenerates it.
- The layout on docs/development/design.md matches the tree of ttrl/.
- The generator imports no engine; the browser check skips cleanly without
  a browser. The build itself (`mkdocs build --strict`) runs in CI through
  `make docs`, and the browser check through `make docs-check`.
"""

from __future__ import annotations

import difflib
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from ttrl import docs_reference as ref

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def test_every_config_key_has_a_comment() -> None:
    missing = ref.undocumented()
    assert not missing, (
        "config keys without a comment above them in their dataclass (say what the key does and why; the "
        "comment is the key's entry in docs/reference/config.md):\n  " + "\n  ".join(missing))


def test_the_reference_page_is_current() -> None:
    page = ref.PAGE.read_text() if ref.PAGE.exists() else ""
    now = ref.render()
    if page != now:
        diff = "".join(list(difflib.unified_diff(page.splitlines(True), now.splitlines(True),
                                                 "docs/reference/config.md (committed)", "(generated now)", n=1))[:40])
        pytest.fail("docs/reference/config.md is stale: run `make docs` (or `python -m ttrl.docs_reference`) "
                    f"and commit the page.\n{diff}")


def test_the_reference_lists_every_key_and_every_registered_name() -> None:
    page = ref.PAGE.read_text()
    for sec in ref.sections() + ref.serve_sections():
        for k in sec.keys:
            assert f'<a id="{ref._anchor(k.path)}"></a>`{k.path}`' in page, k.path
    from ttrl.rewards import REWARDS

    row = next(line for line in page.splitlines() if "`reward.name`" in line and "<a id=" in line)
    assert all(name in row for name in REWARDS.names()), row


def test_allowed_values_come_from_the_registry_itself() -> None:
    """A name registered after the fact is allowed at once: the reference reads the registry, not a copy."""
    from ttrl.algos import ADVANTAGES
    from ttrl.config import AlgorithmConfig

    assert "only_in_this_test" not in " ".join(ref.allowed_values(AlgorithmConfig)["advantage"])
    ADVANTAGES._items["only_in_this_test"] = lambda rewards: rewards
    try:
        assert "only_in_this_test" in " ".join(ref.allowed_values(AlgorithmConfig)["advantage"])
    finally:
        del ADVANTAGES._items["only_in_this_test"]


def test_a_field_without_a_comment_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The completeness rule, on a dataclass of its own: comments above, on the line, dividers not counted."""
    (tmp_path / "docs_probe.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass

        @dataclass
        class Probe:
            """A section."""

            # Said above.
            above: int = 1
            inline: int = 2  # said on the line
            # ── a divider, not a comment on the key below
            bare: int = 3
            # A comment that ends above a blank line belongs to nothing.

            lone: int = 4
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    from docs_probe import Probe

    comments = {name: text for name, (text, _) in ref.field_comments(Probe).items()}
    assert comments == {"above": "Said above.", "inline": "said on the line", "bare": "", "lone": ""}
    assert ref.class_doc(Probe)[0] == "A section."


def test_a_conf_key_outside_the_schema_names_its_file(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    (conf / "model").mkdir(parents=True)
    (conf / "config.yaml").write_text("defaults:\n  - model: tiny\n")
    (conf / "model" / "tiny.yaml").write_text("# A model.\nname: tiny\nnum_layerz: 2\n")
    with pytest.raises(ref.ReferenceError, match=r"model/tiny\.yaml: model\.num_layerz is not a key"):
        ref.render(conf)


def test_the_generator_imports_no_engine() -> None:
    code = ("import sys\nfrom ttrl import docs_reference\ndocs_reference.render()\n"
            "print(','.join(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'vllm', 'deepspeed'})))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"rendering the reference imported {out.stdout.strip()}"


# ── the site's pages and the layout they describe ─────────────────────────
def _nav_pages(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [p for v in node.values() for p in _nav_pages(v)]
    return [p for v in node for p in _nav_pages(v)]


def test_every_page_is_in_the_nav_and_every_nav_entry_exists() -> None:
    nav = _nav_pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(nav) == pages, f"in the nav but missing: {sorted(set(nav) - set(pages))}; " \
                                 f"pages not in the nav: {sorted(set(pages) - set(nav))}"


def _layout_block() -> str:
    text = (DOCS / "development" / "design.md").read_text()
    m = re.search(r"<!-- layout:[^>]*-->\s*```\n(.*?)```", text, re.S)
    assert m, "docs/development/design.md lost its layout block (after the `<!-- layout: ... -->` marker)"
    return m.group(1)


def test_the_layout_on_the_design_page_matches_the_tree() -> None:
    """Every module and package of ttrl/ is on the page, nothing on it is gone, and every file it names
    inside a package exists there."""
    block = _layout_block()
    listed: dict[str, str] = {}  # "train.py" or "data/" -> its description (continuation lines included)
    current = None
    for line in block.splitlines()[1:]:
        if not line.startswith("  "):  # conf/, tests/, ...: the rest of the repository
            current = None
            top = line.split()[0] if line.strip() else ""
            if top:
                assert (ROOT / top.rstrip("/")).exists(), f"design.md lists {top}, which does not exist"
            continue
        m = re.match(r"  (\S+)\s*(.*)", line)
        if m and not line.startswith("   "):
            current = m.group(1)
            listed[current] = m.group(2)
        elif current is not None:
            listed[current] += " " + line.strip()
    actual = {p.name for p in (ROOT / "ttrl").glob("*.py") if p.name != "__init__.py"} | {
        f"{p.name}/" for p in (ROOT / "ttrl").iterdir() if (p / "__init__.py").exists()}
    assert set(listed) == actual, (f"docs/development/design.md's layout is out of date: missing "
                                   f"{sorted(actual - set(listed))}, gone {sorted(set(listed) - actual)}")
    for package, text in listed.items():
        if package.endswith("/"):
            for name in re.findall(r"\b([a-z_]+\.py)\b", text):
                assert (ROOT / "ttrl" / package / name).exists(), f"design.md: ttrl/{package}{name} does not exist"


# ── the browser check ─────────────────────────────────────────────────────
def test_the_browser_check_skips_without_a_browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from ttrl import docs_check

    monkeypatch.delenv("TTRL_CHROMIUM", raising=False)
    assert docs_check.find_browser(path=str(tmp_path)) is None
    monkeypatch.setattr(docs_check, "find_browser", lambda path=None: None)
    assert docs_check.main(["--site", str(tmp_path)]) == 0
    assert "skipped: no Chromium" in capsys.readouterr().err
