"""Every ```python block of README.md and docs/**/*.md runs as written.

Each file's blocks run in order, in one fresh namespace (as ``python script.py`` would run
them), in a temporary working directory, in a worker process started once for this module
(registrations, thread settings and compiled graphs stay out of the test process; torch is
imported once). A block marked by an HTML comment on the line before its fence is treated
apart:

    <!-- no-run -->      not run (it needs a GPU, or another process around it)
    <!-- torchrun -->    run as a script under ``torchrun --nproc_per_node=2`` (CPU, gloo)

A file whose blocks compile a step is marked slow, as the rest of the suite marks compiles.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import re
import subprocess
import sys
import traceback
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)")
MARK = re.compile(r"^\s*<!--\s*(no-run|torchrun)\s*-->\s*$")
SLOW = re.compile(r"compile\s*=\s*True|steps_per_call\s*=\s*\d")


@dataclasses.dataclass(frozen=True)
class Block:
    path: str  # relative to the repository root
    line: int  # the first line of the code, 1-based
    source: str
    mark: str | None  # "no-run", "torchrun" or None


def code_blocks(path: Path) -> list[Block]:
    """The ```python blocks of a Markdown file, in order (indented ones too, dedented)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, index = [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        fence, indent = opening["fence"], opening["indent"]
        end = index + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        if opening["lang"] in ("python", "py"):
            mark = MARK.match(lines[index - 1]) if index else None
            body = [line[len(indent):] if line.startswith(indent) else line.lstrip()
                    for line in lines[index + 1:end]]
            blocks.append(Block(str(path.relative_to(ROOT)), index + 2,
                                "\n".join(body) + "\n", mark and mark.group(1)))
        index = end + 1
    return blocks


def _param(path: Path):
    blocks = code_blocks(path)
    slow = any(SLOW.search(b.source) for b in blocks if b.mark is None)
    name = str(path.relative_to(ROOT))
    return pytest.param(path, id=name, marks=[pytest.mark.slow] if slow else [])


def run_blocks(blocks: list[tuple[str, int, str]], cwd: str) -> str | None:
    """Run ``(path, first line, source)`` blocks in order in one fresh ``__main__`` namespace
    with ``cwd`` as the working directory; the traceback of a failure, or None. Runs in the
    worker process."""
    main, previous_main, previous_cwd = types.ModuleType("__main__"), sys.modules["__main__"], \
        os.getcwd()
    sys.modules["__main__"] = main  # classes defined in a block pickle as in a script
    os.chdir(cwd)
    try:
        for path, line, source in blocks:
            code = compile("\n" * (line - 1) + source, path, "exec")  # tracebacks: md lines
            exec(code, main.__dict__)
    except BaseException:  # noqa: BLE001 (reported to the test, the worker goes on)
        return traceback.format_exc()
    finally:
        sys.modules["__main__"] = previous_main
        os.chdir(previous_cwd)
    return None


@pytest.fixture(scope="module")
def worker():
    """One process for every file's blocks: spawned, so it shares nothing with this one."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        yield pool


def _run(command: list[str], cwd: Path, timeout: float) -> None:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {done.returncode}\n--- stdout\n"
                    f"{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-8000:]}", pytrace=False)


@pytest.mark.parametrize("path", [_param(p) for p in FILES
                                  if any(b.mark is None for b in code_blocks(p))])
def test_code_blocks_run(path: Path, tmp_path: Path, worker):
    blocks = [b for b in code_blocks(path) if b.mark is None]
    for block in blocks:  # a syntax error is reported without running anything
        compile(block.source, f"{block.path}:{block.line}", "exec")
    failure = worker.apply_async(
        run_blocks, ([(str(ROOT / b.path), b.line, b.source) for b in blocks], str(tmp_path))
    ).get(timeout=600)
    if failure is not None:
        pytest.fail(f"a code block of {path.relative_to(ROOT)} failed:\n{failure}",
                    pytrace=False)


TORCHRUN = [b for p in FILES for b in code_blocks(p) if b.mark == "torchrun"]


@pytest.mark.slow
@pytest.mark.parametrize("block", TORCHRUN, ids=[f"{b.path}:{b.line}" for b in TORCHRUN])
def test_torchrun_blocks_run_on_two_ranks(block: Block, tmp_path: Path):
    script = tmp_path / "train.py"
    script.write_text(block.source)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
          str(script)], tmp_path, timeout=300)


def test_the_docs_have_code_to_run():
    readme = code_blocks(ROOT / "README.md")  # one example per entry point, all run
    assert len([b for b in readme if b.mark != "no-run"]) >= 5
    skipped = [f"{b.path}:{b.line}" for p in FILES for b in code_blocks(p) if b.mark == "no-run"]
    assert len(skipped) <= 4, f"keep the blocks that do not run few: {skipped}"


def test_a_marked_block_is_found_and_a_fence_in_a_list_is_dedented(tmp_path: Path,
                                                                    monkeypatch):
    page = tmp_path / "page.md"
    page.write_text("text\n\n<!-- no-run -->\n```python\nx = 1\n```\n\n"
                    "- item\n\n    ```python\n    y = 2\n    ```\n\n```bash\nls\n```\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    first, second = code_blocks(page)
    assert (first.line, first.source, first.mark) == (5, "x = 1\n", "no-run")
    assert (second.line, second.source, second.mark) == (11, "y = 2\n", None)


def test_the_readme_links_to_files_that_exist():
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text())
    local = [link for link in links if "://" not in link]
    assert local, "the README links to the documentation"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"README.md links to missing files: {missing}"
