"""The README's Python examples run, and print exactly what the README says they print.

Every ```python block of README.md runs, in order, in one namespace (like a doctest file). A block
followed by a paragraph reading ``prints`` and a plain ``` block must write exactly that block to
stdout. A block that needs an optional extra that is not installed (mmcv-lite, torchvision, timm)
is skipped, and so are the blocks after it that use its names.
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
OPTIONAL_MODULES = {"mmcv", "torchvision", "timm", "torch"}

_FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)


@dataclass(frozen=True)
class Example:
    line: int               # the line of README.md the code block starts on
    code: str
    prints: str | None      # the exact stdout it must produce; None when the README states none


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


EXAMPLES = examples(README.read_text(encoding="utf-8"))


def test_the_parser_pairs_code_with_its_output():
    text = ("intro\n\n```python\nprint(1)\n```\n\nprints\n\n```\n1\n```\n\n"
            "```python\nx = 2\n```\n\nthen\n\n```\nnot an output\n```\n\n```bash\nls\n```\n")
    assert examples(text) == [Example(3, "print(1)\n", "1\n"), Example(13, "x = 2\n", None)]


def test_the_readme_has_examples_with_outputs():
    assert len(EXAMPLES) >= 3 and sum(e.prints is not None for e in EXAMPLES) >= 3


@pytest.fixture(scope="module")
def namespace() -> dict:
    return {"__name__": "readme"}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: f"README.md:{e.line}")
def test_readme_example(example: Example, namespace: dict):
    if namespace.get("__skipped__"):
        pytest.skip(f"an earlier example needed {namespace['__skipped__']}")
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(example.code, f"README.md:{example.line}", "exec"), namespace)
    except ModuleNotFoundError as error:
        if error.name is None or error.name.split(".")[0] not in OPTIONAL_MODULES:
            raise
        namespace["__skipped__"] = error.name
        pytest.skip(f"needs {error.name} (an optional extra)")
    if example.prints is not None:
        assert out.getvalue() == example.prints
