"""The course (docs/learn/) stays true, its words are defined before they are used, and its
exercises check themselves.

Each chapter's code blocks run in order as one session, as a reader would type them, in a
scratch folder: the ```python blocks in one namespace, each line of a ```sh block as the shell
would run it (a `tinyformers` command runs in this process, through tinyformers.cli.main).
A line `expression  # value` is a check: the expression must equal the literal value. A
```text block right after a code block is what that block prints. Numbers are compared to
the digits written: within one unit of the last one (float32 sums round differently on AMD
and Intel CPUs), whole numbers exactly.
"""

from __future__ import annotations

import ast
import contextlib
import io
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinyformers import learn
from tinyformers.cli import main
from tinyformers.learn.exercises import EXERCISES

ROOT = Path(__file__).resolve().parents[1]
COURSE = ROOT / "docs" / "learn"
CHAPTERS = sorted(COURSE.glob("0*.md"))
GLOSSARY = COURSE / "glossary.md"
SOLUTIONS = ROOT / "tinyformers" / "learn" / "solutions"

FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", flags=re.MULTILINE | re.DOTALL)
CHECK = re.compile(r"^(\S.*?)  # (.+)$")  # `expression  # expected value`, at the margin
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e-?\d+)?")


# Reading a chapter -----------------------------------------------------------------------------


def blocks(markdown: str) -> list[tuple[str, str]]:
    """The fenced blocks in order: (language, code)."""
    return [(m[1], m[2]) for m in FENCE.finditer(markdown)]


def sessions(markdown: str) -> list[tuple[str, str, str | None]]:
    """(language, code, the ```text block right after it or None) for each python/sh block."""
    found = list(FENCE.finditer(markdown))
    out = []
    for i, m in enumerate(found):
        if m[1] not in ("python", "sh"):
            continue
        after = found[i + 1] if i + 1 < len(found) else None
        adjacent = after and after[1] == "text" and not markdown[m.end() : after.start()].strip()
        out.append((m[1], m[2], after[2] if adjacent else None))
    return out


def checked(code: str) -> str:
    """`expression  # value` lines become `_check(expression, "value", line)`; an expression
    with any other comment on its line is an error (a number in a comment is a claim)."""
    out = []
    for n, line in enumerate(code.splitlines(), 1):
        m = CHECK.match(line)
        if m and is_expression(m[1]):
            written(m[2])  # a comment on an expression must be a value
            line = f"_check({m[1]}, {m[2]!r}, {n})"
        out.append(line)
    return "\n".join(out)


def is_expression(text: str) -> bool:
    try:
        ast.parse(text, mode="eval")
    except SyntaxError:
        return False
    return True


# Comparing to the digits written ----------------------------------------------------------------


def written(source: str):
    """The literal in `source`, each float as (value, its unit in the last digit written)."""

    def walk(node):
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            value = walk(node.operand)
            return (-value[0], value[1]) if isinstance(value, tuple) else -value
        if isinstance(node, ast.Constant) and isinstance(node.value, float):
            return (node.value, unit(ast.get_source_segment(source, node)))
        if isinstance(node, ast.List | ast.Tuple):
            return [walk(e) for e in node.elts]
        if isinstance(node, ast.Name) and node.id in ("nan", "inf"):  # as Python prints them
            return (float(node.id), 0.0)
        return ast.literal_eval(node)

    return walk(ast.parse(source, mode="eval").body)


def unit(number: str) -> float:
    """One unit in the last digit of a number as written: 0.123 -> 0.001, 1.5e-05 -> 1e-06."""
    mantissa, _, exponent = number.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 10.0 ** (int(exponent or 0) - decimals)


def same(expected, got) -> bool:
    if isinstance(got, torch.Tensor):
        got = got.tolist()
    if isinstance(got, torch.Size | tuple):
        got = list(got)
    if isinstance(expected, tuple):  # a float and its unit
        value, step = expected
        if not isinstance(got, int | float):
            return False
        if math.isnan(value) or math.isinf(value):
            return math.isnan(got) if math.isnan(value) else got == value
        return abs(got - value) <= step * 1.0001
    if isinstance(expected, list):
        return (
            isinstance(got, list)
            and len(got) == len(expected)
            and all(same(e, g) for e, g in zip(expected, got, strict=True))
        )
    if isinstance(expected, bool) or isinstance(got, bool):
        return expected is got
    return (
        type(got) is type(expected)
        and got == expected
        or (isinstance(expected, int) and isinstance(got, float) and got == expected)
    )


def same_output(expected: str, got: str) -> bool:
    """Printed text equal line by line (trailing spaces aside), numbers to the digits shown."""
    want, have = expected.rstrip().splitlines(), got.rstrip().splitlines()
    if len(want) != len(have):
        return False
    for w, h in zip(want, have, strict=True):
        w, h = w.rstrip(), h.rstrip()
        if NUMBER.sub("#", w) != NUMBER.sub("#", h):
            return False
        for a, b in zip(NUMBER.findall(w), NUMBER.findall(h), strict=True):
            whole = "." not in a and "e" not in a
            if (a != b) if whole else abs(float(a) - float(b)) > unit(a) * 1.0001:
                return False
    return True


# Running a chapter -----------------------------------------------------------------------------


def run_chapter(path: Path) -> None:
    """Every block of the chapter in order, in the current folder; fails at the first block
    whose check or output does not hold."""
    namespace: dict = {}

    def _check(got, expected_source: str, line: int) -> None:
        if not same(written(expected_source), got):
            shown = got.tolist() if isinstance(got, torch.Tensor) else got
            raise AssertionError(f"line {line}: expected {expected_source}, got {shown!r}")

    namespace["_check"] = _check
    for n, (language, code, output) in enumerate(sessions(path.read_text()), 1):
        where = f"{path.name}, code block {n}"
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            if language == "python":
                try:
                    exec(compile(checked(code), where, "exec"), namespace)
                except AssertionError as e:
                    raise AssertionError(f"{where}: {e}") from None
            else:
                statuses = [run_shell(line) for line in code.splitlines() if line.strip()]
        if language == "sh" and output is None:  # a failure must show what it prints
            assert not any(statuses), f"{where}: a command exited {statuses}"
        if output is not None:
            assert same_output(output, stdout.getvalue()), (
                f"{where} printed:\n{stdout.getvalue()}\nnot:\n{output}"
            )


def run_shell(line: str) -> int:
    """A `tinyformers` command, in this process; what it sets for itself (train's thread count
    and OMP_WAIT_POLICY) is put back after, as a process of its own would leave nothing."""
    words = shlex.split(line.split("  #")[0])
    assert words[0] == "tinyformers", f"only tinyformers commands run here: {line}"
    environ, threads = dict(os.environ), torch.get_num_threads()
    try:
        with contextlib.redirect_stderr(sys.stdout):  # a reader's terminal shows both
            return main(words[1:])
    finally:
        os.environ.clear()
        os.environ.update(environ)
        torch.set_num_threads(threads)


def test_the_course_has_its_eight_chapters():
    assert [p.stem for p in CHAPTERS] == list(learn.CHAPTERS.values())


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem[:2])
def test_chapter_runs_and_every_number_in_it_holds(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_chapter(path)


# Numbers in the prose ---------------------------------------------------------------------------


def blanked(markdown: str) -> str:
    """The chapter's prose at its own offsets: code, link targets and headings blanked out."""

    def blank(m: re.Match) -> str:
        return re.sub(r"[^\n]", " ", m[0])

    text = FENCE.sub(blank, markdown)
    text = re.sub(r"`[^`\n]*`", blank, text)
    text = re.sub(r"\]\([^)]*\)", blank, text)
    return re.sub(r"^#.*$", blank, text, flags=re.MULTILINE)


def numbers_in(text: str) -> set[float]:
    return {float(n.replace(",", "")) for n in re.findall(r"\d[\d,]*(?:\.\d+)?", text)}


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem[:2])
def test_a_number_in_the_prose_is_one_the_code_shows(path):
    """Each number of two digits or more, or with a decimal point, in a chapter's prose is
    one that a code block of that chapter shows (a check's value or its printed output)."""
    markdown = path.read_text()
    shown = numbers_in("\n".join(code for _, code in blocks(markdown)))
    cited = re.findall(r"(?<![\w\-.−])(?:\d[\d,]*\d(?:\.\d+)?|\d\.\d+)(?!\w)", blanked(markdown))
    missing = sorted({n for n in cited if float(n.replace(",", "")) not in shown})
    assert not missing, f"{path.name} cites numbers no code block shows: {missing}"


# The glossary: every word defined where it is first used -----------------------------------------

ROW = re.compile(
    r"^\| (?P<forms>.+?) \| \[(?P<n>\d)\]\((?P<file>[\w-]+\.md)\) \| (?P<meaning>.+) \|$"
)
# The words and signs the course must define before use (the brief's list).
REQUIRED = [
    "matrix", "vector", "shape", "[B, T, C]", "dot product", "×", "⊙", "ᵀ", "softmax", "logits",
    "token", "embedding", "W_E", "q", "k", "v", "d_head", "mask", "LayerNorm", "RMSNorm",
    "rsqrt", "pre-norm", "residual stream", "MLP", "GELU", "SwiGLU", "RoPE", "GQA", "SDPA",
    "loss", "gradient",
]  # fmt: skip


def glossary() -> list[tuple[list[str], int]]:
    """(the spellings of a term, the chapter that defines it), for each row of the table."""
    rows = [ROW.match(line) for line in GLOSSARY.read_text().splitlines()]
    terms = [(m["forms"].split(" / "), int(m["n"])) for m in rows if m]
    assert terms, "no rows found in the glossary's table"
    for m in filter(None, rows):
        assert CHAPTERS[int(m["n"]) - 1].name == m["file"], m[0]
    return terms


def pattern(form: str) -> re.Pattern:
    """A form as a word (its plural too), or a sign as itself. Forms of one or two characters
    (q, V, W_E's kind) match in their own case only; longer ones in any case."""
    if not re.fullmatch(r"[\w][\w \-]*", form):
        return re.compile(re.escape(form))
    plural = "(?:e?s)?" if len(form) > 2 else ""
    flags = re.IGNORECASE if len(form) > 2 else 0
    return re.compile(rf"(?<!\w){re.escape(form)}{plural}(?!\w)", flags)


def without_link_targets(markdown: str) -> str:
    return re.sub(r"\]\([^)]*\)", "]", markdown)


def test_the_glossary_has_every_required_term():
    forms = {form for spellings, _ in glossary() for form in spellings}
    assert not [term for term in REQUIRED if term not in forms]


@pytest.mark.parametrize("term", glossary(), ids=lambda t: t[0][0])
def test_a_term_is_bolded_where_it_is_defined_and_used_nowhere_before(term):
    """In its chapter, the term's first use in the prose is in **bold** (code may use it
    earlier); in every chapter before, it appears nowhere, code included."""
    forms, n = term
    patterns = [pattern(form) for form in forms]
    for earlier in CHAPTERS[: n - 1]:
        text = without_link_targets(earlier.read_text())
        used = [m[0] for p in patterns for m in [p.search(text)] if m]
        assert not used, f"{forms[0]!r} (defined in chapter {n}) is used in {earlier.name}: {used}"
    markdown = CHAPTERS[n - 1].read_text()
    prose = blanked(markdown)
    first = min((m.start() for p in patterns for m in [p.search(prose)] if m), default=None)
    assert first is not None, f"{forms[0]!r} is not in {CHAPTERS[n - 1].name}"
    bold = [m.span() for m in re.finditer(r"\*\*[^*\n]+\*\*", markdown)]
    assert any(a < first < b for a, b in bold), (
        f"{forms[0]!r} is first used unbolded in {CHAPTERS[n - 1].name}: "
        f"...{markdown[max(0, first - 60) : first + 30]!r}..."
    )


# The exercises check themselves ------------------------------------------------------------------


def learn_cli(*argv: str, capsys) -> tuple[int, list[str], list[str]]:
    """(exit code, stdout lines, stderr lines) of `tinyformers learn ...`, in this process."""
    code = main(["learn", *argv])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


@pytest.mark.parametrize("chapter", sorted(EXERCISES))
def test_the_solutions_pass_every_check(chapter):
    lines, passed = learn.check(chapter, SOLUTIONS / f"ch{chapter:02d}.py")
    assert passed, lines
    assert [line.split(": ")[1] for line in lines] == ["passed"] * len(EXERCISES[chapter])


@pytest.mark.parametrize("chapter", sorted(EXERCISES))
def test_an_untouched_template_fails_every_check(chapter, tmp_path):
    """The checks are not vacuous: a function that does nothing passes none of them."""
    path = tmp_path / "template.py"
    path.write_text(learn.template(chapter))
    lines, passed = learn.check(chapter, path)
    assert not passed
    assert all(line.endswith("not written yet (it raises NotImplementedError)") for line in lines)
    source = path.read_text()
    source = re.sub(r"raise NotImplementedError\(.*\)", "return None", source)
    path.write_text(source)
    lines, passed = learn.check(chapter, path)
    assert not passed and not any(line.endswith("passed") for line in lines), lines


@pytest.mark.parametrize("chapter", sorted(EXERCISES))
def test_a_template_has_each_solution_signature_and_docstring_and_no_body(chapter):
    from tinyformers.learn.templates import solution_source

    def functions(source: str) -> dict:
        tree = ast.parse(source)
        return {f.name: (ast.unparse(f.args), ast.get_docstring(f), len(f.body))
                for f in tree.body if isinstance(f, ast.FunctionDef)}  # fmt: skip

    solution, template = functions(solution_source(chapter)), functions(learn.template(chapter))
    assert list(template) == [e.name for e in EXERCISES[chapter]] == list(solution)
    for name, (args, doc, body) in template.items():
        assert (args, doc) == solution[name][:2] and body == 2  # the docstring and a raise


def test_learn_alone_lists_the_chapters_and_their_exercises(capsys):
    code, out, _ = learn_cli(capsys=capsys)
    assert code == 0 and len(out) == 9
    assert out[0] == "1  docs/learn/01-numbers-vectors-matrices.md  (dot, matvec, matmul)"


def test_start_then_check_fails_with_one_line_per_exercise(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = learn_cli("start", "3", capsys=capsys)
    assert code == 0 and out == [
        "wrote learn/ch03.py: write its functions, then `tinyformers learn check 3`"
    ]
    assert (tmp_path / "learn" / "ch03.py").read_text() == learn.template(3)
    code, out, err = learn_cli("check", "3", capsys=capsys)
    assert code == 1 and not err
    assert out == [
        f"3.{i} {e.name}: not written yet (it raises NotImplementedError)"
        for i, e in enumerate(EXERCISES[3], 1)
    ]


def test_check_passes_with_exit_0_when_every_exercise_is_right(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.py").write_text((SOLUTIONS / "ch01.py").read_text())
    code, out, _ = learn_cli("check", "1", "mine.py", capsys=capsys)
    assert code == 0 and out == ["1.1 dot: passed", "1.2 matvec: passed", "1.3 matmul: passed"]


def test_a_wrong_answer_says_what_was_expected_and_what_came_back(tmp_path, capsys):
    path = tmp_path / "mine.py"
    path.write_text(
        "import torch\n"
        "def dot(a, b):\n    return 0\n"
        "def matvec(M, x):\n    return [sum(row) for row in M]\n"
        "def matmul(A, B):\n    raise ValueError('shapes do not fit')\n"
        "def softmax(logits):\n    return logits.exp() / logits.exp().sum()\n"
    )
    code, out, _ = learn_cli("check", "1", str(path), capsys=capsys)
    assert code == 1
    assert out == [
        "1.1 dot: dot([1, 2], [3, 4]): expected 11, got 0 (each within 1e-09)",
        "1.2 matvec: matvec([[1, 2], [3, 4]], [5, 6]): expected [17, 39], got [3, 7] "
        "(each within 1e-09)",
        "1.3 matmul: raised ValueError: shapes do not fit",
    ]
    _, out, _ = learn_cli("check", "4", str(path), capsys=capsys)
    assert out[0].startswith("4.1 softmax: softmax([1000, 999, 998]): expected [0.665241, ")
    assert out[0].endswith("got [nan, nan, nan] (each within 1e-06) (exp(1000) is inf: "
                           "subtract the largest logit first)")  # fmt: skip
    assert out[1] == f"4.2 with_temperature: not in {path} (write def with_temperature)"


def test_start_does_not_overwrite_a_learners_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "learn").mkdir()
    (tmp_path / "learn" / "ch02.py").write_text("# my work\n")
    code, out, err = learn_cli("start", "2", capsys=capsys)
    assert code == 1 and not out
    assert err == [
        "tinyformers: error: learn/ch02.py exists: check it with `tinyformers learn check 2`, "
        "or move it away to start again"
    ]
    assert (tmp_path / "learn" / "ch02.py").read_text() == "# my work\n"


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["check", "2"], 1, "learn/ch02.py: no such file; `tinyformers learn start 2` writes it"),
        (["check", "2", "nope.py"], 1, "nope.py: no such file"),
        (["check", "1", "broken.py"], 1, "broken.py, line 1: '(' was never closed"),
        (["check", "1", "crash.py"], 1, "crash.py: ZeroDivisionError while loading: division by 0"),
        (["check", "9"], 2, "argument chapter: 9 is not a chapter from 1 to 8"),
        (["start", "0"], 2, "argument chapter: 0 is not a chapter from 1 to 8"),
        (["check", "one"], 2, "argument chapter: 'one' is not a chapter from 1 to 8"),
    ],
)  # fmt: skip
def test_bad_input_gets_one_line_and_an_exit_code(argv, code, message, tmp_path, monkeypatch,
                                                  capsys):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken.py").write_text("def dot(a, b:\n    pass\n")
    (tmp_path / "crash.py").write_text("raise ZeroDivisionError('division by 0')\n")
    try:
        got = main(["learn", *argv])
    except SystemExit as e:  # argparse refuses a bad value before anything runs
        got = e.code
    out, err = capsys.readouterr()
    assert got == code and not out
    assert len(err.splitlines()) == 1 and err.strip().endswith(message), err


def test_the_command_prints_no_traceback(tmp_path):
    """The installed command, as a learner runs it: errors are one line, never a traceback."""
    (tmp_path / "broken.py").write_text("def dot(a, b:\n")
    command = [sys.executable, "-m", "tinyformers", "learn", "check", "1", "broken.py"]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr == "tinyformers: error: broken.py, line 1: '(' was never closed\n"


@pytest.mark.parametrize("path", [*CHAPTERS, GLOSSARY], ids=lambda p: p.stem[:2])
def test_every_link_of_the_course_leads_somewhere(path):
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text())
    missing = [t for t in targets if "://" not in t and not (path.parent / t).exists()]
    assert not missing, missing
