"""The README and the pages beside it (docs/*.md): their examples run, their figures say where they came from,
their links resolve, and the reason-code table is the one list in adapters.report.

Every ```python block of a page runs, in order, in one namespace per page (like a doctest file). A block
followed by a paragraph reading ``prints`` and a plain ``` block must write exactly that block to stdout. A
block that needs an optional extra that is not installed (mmcv-lite, torchvision, timm, onnx) is skipped, and so
are the blocks after it on the same page. (``>>>`` examples on these pages run as doctests: pytest collects
``docs`` with ``--doctest-glob=*.md``.)

A section (``##``) of a docs page that holds a table of figures (numbers, times, ratios, audit statuses) carries a
``Measured: commit HASH, YYYY-MM-DD; MACHINE.`` line and the command that produced it; the commit must exist in
the history, and the command's script (or ``python -m`` module) must exist and accept every option the page
passes it, so a page cannot keep naming a command that no longer regenerates its figures.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
OPTIONAL_MODULES = {"mmcv", "torchvision", "timm", "torch", "onnx", "onnxruntime", "onnxscript"}

_FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


@dataclass(frozen=True)
class Example:
    line: int               # the line of the page the code block starts on
    code: str
    prints: str | None      # the exact stdout it must produce; None when the page states none


def examples(text: str) -> list[Example]:
    """The ```python blocks of ``text``, each with the output block that follows a 'prints' paragraph."""
    fences = list(_FENCE.finditer(text))
    found = []
    for index, fence in enumerate(fences):
        if fence.group("info").strip() != "python":
            continue
        prints = None
        following = fences[index + 1] if index + 1 < len(fences) else None
        if following is not None and following.group("info").strip() == "":
            between = text[fence.end():following.start()]
            if between.strip() == "prints":
                prints = following.group("body")
        found.append(Example(text.count("\n", 0, fence.start()) + 1, fence.group("body"), prints))
    return found


EXAMPLES = [(page, example) for page in PAGES for example in examples(page.read_text(encoding="utf-8"))]


def test_the_parser_pairs_code_with_its_output():
    text = ("intro\n\n```python\nprint(1)\n```\n\nprints\n\n```\n1\n```\n\n"
            "```python\nx = 2\n```\n\nthen\n\n```\nnot an output\n```\n\n```bash\nls\n```\n")
    assert examples(text) == [Example(3, "print(1)\n", "1\n"), Example(13, "x = 2\n", None)]


def test_the_readme_has_examples_with_outputs():
    readme = examples(README.read_text(encoding="utf-8"))
    assert len(readme) >= 3 and sum(e.prints is not None for e in readme) >= 3


def test_the_readme_stays_short():
    """What a user needs first; the reference material lives in docs/ and spec/."""
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= 320, f"README.md has {lines} lines; move reference material to docs/"


TEST_COMMAND = 'pip install -e ".[test,zoo,peers]" && python -m pytest'


def test_ci_runs_the_readmes_test_command_verbatim():
    """The README's second command is what CI runs: the same line in both, and in .ci/run as a command, not a
    comment."""
    readme = README.read_text(encoding="utf-8")
    bash_blocks = [m["body"] for m in _FENCE.finditer(readme) if m["info"].strip() == "bash"]
    assert any(TEST_COMMAND in line.split("#", 1)[0] for line in bash_blocks[0].splitlines()), (
        "the README's first bash block no longer holds the test command")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert TEST_COMMAND in [line.strip() for line in ci], ".ci/run does not run the README's test command verbatim"


@pytest.fixture(scope="module")
def namespaces() -> dict[str, dict]:
    return {}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(("page", "example"), EXAMPLES, ids=[f"{_name(p)}:{e.line}" for p, e in EXAMPLES])
def test_example(page: Path, example: Example, namespaces: dict[str, dict]):
    namespace = namespaces.setdefault(_name(page), {"__name__": _name(page)})
    if namespace.get("__skipped__"):
        pytest.skip(f"an earlier example on the page needed {namespace['__skipped__']}")
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(example.code, f"{_name(page)}:{example.line}", "exec"), namespace)
    except ModuleNotFoundError as error:
        if error.name is None or error.name.split(".")[0] not in OPTIONAL_MODULES:
            raise
        namespace["__skipped__"] = error.name
        pytest.skip(f"needs {error.name} (an optional extra)")
    if example.prints is not None:
        assert out.getvalue() == example.prints


# --- links ---------------------------------------------------------------------------------------------------

_LINK = re.compile(r"\]\((?P<target>[^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_relative_links_resolve(page: Path):
    text = _FENCE.sub("", page.read_text(encoding="utf-8"))
    broken = [target for target in _LINK.findall(text)
              if "://" not in target and not (page.parent / target).exists()]
    assert not broken, f"{_name(page)} links to missing files: {broken}"


# --- one reason list -----------------------------------------------------------------------------------------

_REASON_ROW = re.compile(r"^\| `(?P<code>[a-z_]+)` \| (?P<meaning>.*) \|$", re.M)


def reason_table() -> str:
    """The table docs/reasons.md must hold, from adapters.report.REASONS."""
    from adapters.report import REASONS

    return "| code | meaning |\n| --- | --- |\n" + "".join(f"| `{code}` | {meaning} |\n"
                                                     for code, meaning in REASONS.items())


def write_reason_table() -> None:
    """Rewrite the table of docs/reasons.md from REASONS: ``python tests/test_readme.py``."""
    page = DOCS / "reasons.md"
    text = page.read_text(encoding="utf-8")
    start = text.index("| code | meaning |")
    end = start
    for line in text[start:].splitlines(keepends=True):
        if not line.startswith("|"):
            break
        end += len(line)
    page.write_text(text[:start] + reason_table() + text[end:], encoding="utf-8")


def test_the_reason_table_is_adapters_report_reasons():
    """docs/reasons.md lists exactly adapters.report.REASONS, in its order, with its meanings (both ways);
    ``python tests/test_readme.py`` regenerates it."""
    from adapters.report import REASONS

    rows = {m["code"]: m["meaning"] for m in _REASON_ROW.finditer((DOCS / "reasons.md").read_text(encoding="utf-8"))}
    assert sorted(set(rows) - set(REASONS)) == [], "docs/reasons.md lists codes REASONS does not have"
    assert sorted(set(REASONS) - set(rows)) == [], "REASONS has codes docs/reasons.md does not list"
    assert rows == REASONS and list(rows) == list(REASONS), "docs/reasons.md: meanings or order differ from REASONS"
    assert reason_table() in (DOCS / "reasons.md").read_text(encoding="utf-8")


# --- every figure carries its command, machine, date and commit ----------------------------------------------

_MEASURED = re.compile(r"^Measured: commit (?P<commit>[0-9a-f]{7,40}), (?P<date>\d{4}-\d{2}-\d{2}); "
                       r"(?P<machine>[^.\n]+)", re.M)
_FIGURE_CELL = re.compile(r"^\s*(?:[\d.,]+\s*(?:ms|×|%|MB|M)?|ok|missed|WRONG|CRASH|INVALID|fails)\s*$")
_LINE = r"(?:[^\n\\]|\\(?!\n))*"   # the rest of a line, up to a continuation backslash
_COMMAND = re.compile(rf"`(?P<inline>python [^`]+)`|^(?P<block>python (?:benchmarks/|-m ){_LINE}(?:\\\n{_LINE})*)$",
                      re.M)
_PROJECT_COMMAND = re.compile(r"^python (?:benchmarks/|-m (?:adapters|refimpl|pytest)\b)")


def sections(text: str) -> list[tuple[str, str]]:
    """``(heading, body)`` for each ``##`` section of a page (subsections included); the text before the first
    ``##`` comes under the page's title."""
    parts = re.split(r"^(## [^\n]*)$", text, flags=re.M)
    found = [(parts[0].split("\n", 1)[0], parts[0])]
    found += [(parts[i], parts[i + 1]) for i in range(1, len(parts) - 1, 2)]
    return found


def has_figures(body: str) -> bool:
    for line in body.splitlines():
        if line.startswith("|") and not re.match(r"^\|[\s|:-]+\|$", line):
            if any(_FIGURE_CELL.match(cell) for cell in line.strip().strip("|").split("|")):
                return True
    return False


def commands(body: str) -> list[str]:
    found = []
    for match in _COMMAND.finditer(body):
        command = (match["inline"] or match["block"]).replace("\\\n", " ")
        found.append(" ".join(command.split("#", 1)[0].split()))
    return [c for c in found if _PROJECT_COMMAND.match(c)]


def command_problems(command: str) -> list[str]:
    """What in ``command`` does not exist: its script or module, or an option its source does not define."""
    words = command.split()
    if words[1:3] == ["-m", "pytest"]:
        return []  # the test suite: its options are pytest's
    if words[1] == "-m":
        module = words[2]
        source_file = ROOT / Path(*module.split(".")) / "__main__.py"
        if not source_file.exists():
            return [f"no module {module}"]
        sources = [source_file]
    else:
        script = ROOT / words[1]
        if not script.exists():
            return [f"no script {words[1]}"]
        sources = [script, *script.parent.glob("common.py")]
    text = "".join(path.read_text(encoding="utf-8") for path in sources)
    options = [word.split("=", 1)[0] for word in words if word.startswith("--")]
    return [f"{command}: {_name(sources[0])} defines no option {option}" for option in options
            if f'"{option}"' not in text and f"'{option}'" not in text]


def test_the_figure_checks_see_figures_and_commands():
    body = ("Measured: commit abc1234, 2026-01-01; a machine.\n\n`python benchmarks/x.py --reps 5` —\n\n"
            "| model | ms |\n| --- | --- |\n| a | 1.5 ms |\n")
    assert has_figures(body) and not has_figures("| code | meaning |\n| --- | --- |\n| `x` | a 1x1 conv |\n")
    assert commands(body) == ["python benchmarks/x.py --reps 5"]
    assert commands("```\npython -m adapters.onnx audit a:b \\\n    c:d --markdown\n```\n") == [
        "python -m adapters.onnx audit a:b c:d --markdown"]
    assert command_problems("python benchmarks/no_such_script.py") == ["no script benchmarks/no_such_script.py"]
    assert command_problems("python benchmarks/fuse_time.py --no-such-option") != []


FIGURE_SECTIONS = [(page, heading, body) for page in PAGES if page != README
                   for heading, body in sections(page.read_text(encoding="utf-8"))
                   if has_figures(body) or _MEASURED.search(body)]


def _known_commits() -> set[str] | None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return None
    shallow = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--is-shallow-repository"], capture_output=True,
                             text=True)
    if shallow.returncode != 0 or shallow.stdout.strip() != "false":
        return None  # a shallow clone lacks the older commits
    out = subprocess.run(["git", "-C", str(ROOT), "log", "--all", "--format=%H"], capture_output=True, text=True)
    return set(out.stdout.split()) if out.returncode == 0 else None


@pytest.mark.parametrize(("page", "heading", "body"), FIGURE_SECTIONS,
                         ids=[f"{_name(p)}:{h.lstrip('# ')}" for p, h, _ in FIGURE_SECTIONS])
def test_figures_name_their_command_machine_date_and_commit(page: Path, heading: str, body: str):
    where = f"{_name(page)} section {heading!r}"
    stamps = list(_MEASURED.finditer(body))
    assert stamps, f"{where} holds figures but no 'Measured: commit HASH, YYYY-MM-DD; MACHINE.' line"
    named = commands(body)
    assert named, f"{where} holds figures but names no command (python benchmarks/..., python -m ...)"
    problems = [problem for command in named for problem in command_problems(command)]
    assert not problems, f"{where}: {problems}"
    known = _known_commits()
    if known is not None:
        unknown = [m["commit"] for m in stamps if not any(full.startswith(m["commit"]) for full in known)]
        assert not unknown, f"{where} names commits not in the history: {unknown}"


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(ROOT))
    write_reason_table()
