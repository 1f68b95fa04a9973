r"""How much of a student's code is the course's own: winnowed fingerprints against the solutions and peftlab.

A student's submitted code (the source of their solution cells) is compared with two references:

- ``solutions``: the solution cells of ``solutions/<assignment>/<assignment>.ipynb``, with the released template
  (signatures, docstrings: :func:`autograde.cells.stub`) as MOSS's *base file*: what the student was given counts
  for nothing, so only the code between ``### BEGIN SOLUTION`` and ``### END SOLUTION`` can match;
- ``peftlab``: every ``.py`` of the library (``peftlab/``, not ``peftlab/checks``), file by file.

The measure survives renaming, comments, blank lines and reformatting: :func:`tokens` normalises the code with
:mod:`tokenize` (identifiers become ``V`` except attribute, builtin and module names; strings ``S``; numbers by
value; comments, docstrings, line breaks inside brackets, trailing commas and grouping parentheses dropped),
:func:`fingerprints` winnows the hashes of its ``K``-token k-grams (the minimum of every window of ``W``;
Schleimer, Wilkerson and Aiken 2003, the algorithm of MOSS), and the score of a reference is the fraction of the
student's fingerprints found among its k-grams. A shared run of ``K + W - 1`` tokens is always found.

Calibration (tests/course/test_similarity.py, ``K = 12``, ``W = 6``, the five exercises), vs ``solutions``:

- the sample solution (``autograde/examples/solution/*``): 1.00 on every exercise (vs ``peftlab``: 0.02-0.42,
  the notebooks' code follows the library's);
- the same with every bound name renamed and reformatted by ``ast.unparse``: 1.00;
- the partly wrong sample (``autograde/examples/partial/*``): 0.93-1.00;
- independently written correct code (the observer tests' alternatives): 0.00-0.09 (vs ``peftlab``: 0.03-0.14);
- the released stubs (``autograde/examples/untouched/*``): 0, no fingerprints (the template is the base file).

A score above :data:`THRESHOLD` (0.5) says "mostly the course's code": evidence for a person to read, not a
verdict. The references are fingerprinted once per process (~0.5 s, most of it :mod:`tokenize` reading peftlab);
a notebook then takes a few milliseconds.

>>> a = "def double(x):\n    # twice\n    return (x + x)\n"
>>> tokens(a) == tokens("def twice(value):\n\n    return value + value  # no comment\n")
True
>>> " ".join(tokens(a))
'def V ( V ) : ; <in> return V + V ; <out>'
"""

from __future__ import annotations

import ast
import builtins
import functools
import hashlib
import io
import keyword
import tokenize
from pathlib import Path

K = 12  # tokens per k-gram: shorter ones match common idioms of any PyTorch code
W = 6  # winnowing window: every shared run of K + W - 1 = 17 tokens is found
THRESHOLD = 0.5  # the calibration above: a copy of the solution ~1.0, independent code <= 0.14
KEPT_NAMES = frozenset(dir(builtins)) | {"self", "cls", "torch", "nn", "F", "math", "np", "functools", "itertools"}
SKIPPED = {tokenize.COMMENT, tokenize.NL, tokenize.ENCODING, tokenize.ENDMARKER}
FSTRING_START = getattr(tokenize, "FSTRING_START", None)  # Python 3.12 splits an f-string into parts
FSTRING_PARTS = {getattr(tokenize, name) for name in ("FSTRING_MIDDLE", "FSTRING_END") if hasattr(tokenize, name)}


def _raw_tokens(code: str) -> list[tokenize.TokenInfo]:
    """The tokens of ``code``. Where it does not tokenize, the statement at fault is skipped (its first line) and
    reading goes on after it: a bracket or string left open, an unindent that matches no outer level. IPython
    magics (``%time``, ``!pip``) are skipped too."""
    lines = ["" if line.lstrip().startswith(("%", "!")) else line for line in code.split("\n")]
    out, start = [], 0
    while start < len(lines):
        first = len(out)
        try:
            for t in tokenize.generate_tokens(io.StringIO("\n".join(lines[start:]) + "\n").readline):
                out.append(t)  # one by one: the tokens before an error are kept
            break
        except tokenize.TokenError as e:  # EOF inside a bracket or string: drop the open statement, skip its line
            done = max((j for j in range(first, len(out)) if out[j].type == tokenize.NEWLINE), default=first - 1)
            bad = out[done + 1].start[0] if done + 1 < len(out) else e.args[1][0]
            del out[done + 1:]
            start += max(bad, 1)
        except SyntaxError as e:  # IndentationError
            start += max(e.lineno or 1, 1)
    return out


def _number(text: str) -> str:
    """A number literal by its value: ``0x0F`` and ``15``, ``1e-3`` and ``0.001`` are one token."""
    try:
        return repr(ast.literal_eval(text))
    except (ValueError, SyntaxError):
        return text


def tokens(code: str) -> list[str]:
    """``code`` as normalised tokens: what renaming, comments, layout and redundant parentheses cannot change."""
    raw = [t for t in _raw_tokens(code) if t.type not in SKIPPED]
    out: list[str] = []
    grouping: list[bool] = []  # per open "(": a grouping or tuple parenthesis (dropped), not a call's
    statement_start, docstring = (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT), -2
    for i, t in enumerate(raw):
        before = raw[i - 1] if i else None
        after = raw[i + 1] if i + 1 < len(raw) else None
        if t.type == tokenize.STRING and (before is None or before.type in statement_start) \
                and (after is None or after.type == tokenize.NEWLINE):
            docstring = i
            continue  # a docstring (or any string statement)
        if t.type == tokenize.NEWLINE and (docstring == i - 1 or (before is not None and before.string == ";")):
            continue  # the end of a dropped docstring, or after an explicit ";"
        if t.type == tokenize.OP and t.string == "," and after is not None and after.string in (")", "]", "}"):
            continue  # a trailing comma: a formatter's choice
        if t.string == "(" and t.type == tokenize.OP:
            call = before is not None and (before.string in (")", "]") or before.type == tokenize.STRING or (
                before.type == tokenize.NAME and not keyword.iskeyword(before.string)))
            grouping.append(not call)
            if not call:
                continue
        if t.string == ")" and t.type == tokenize.OP and grouping and grouping.pop():
            continue
        if t.type == tokenize.NAME:
            attribute = before is not None and before.string == "."  # an API name: renaming a variable keeps it
            out.append(t.string if attribute or keyword.iskeyword(t.string) or t.string in KEPT_NAMES else "V")
        elif t.type == tokenize.STRING or t.type == FSTRING_START:
            out.append("S")
        elif t.type in FSTRING_PARTS:
            continue
        elif t.type == tokenize.NUMBER:
            out.append(_number(t.string))
        else:
            out.append({tokenize.NEWLINE: ";", tokenize.INDENT: "<in>", tokenize.DEDENT: "<out>"}.get(t.type, t.string))
    return out


@functools.lru_cache(maxsize=None)
def _token_id(token: str) -> int:
    return int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little")


def kgram_hashes(toks: list[str], k: int = K) -> list[int]:
    """The hash of every run of ``k`` tokens, in order; the same in every process (a tuple of ints hashes
    deterministically, a str does not: ``PYTHONHASHSEED``)."""
    ids = [_token_id(t) for t in toks]
    return [hash(tuple(ids[i:i + k])) for i in range(len(ids) - k + 1)]


def fingerprints(hashes: list[int], w: int = W) -> set[int]:
    """Winnowing: the minimum hash of every window of ``w`` consecutive k-grams (the rightmost one on a tie)."""
    if len(hashes) <= w:
        return {min(hashes)} if hashes else set()
    picked, last = set(), -1
    for start in range(len(hashes) - w + 1):
        window = hashes[start:start + w]
        low = min(window)
        at = start + max(i for i, h in enumerate(window) if h == low)
        if at != last:
            picked.add(hashes[at])
            last = at
    return picked


def _solution_blocks(assignment: str, root: Path) -> tuple[str, str]:
    """``(solution cells as a student would write them, the released templates of those cells)``."""
    from autograde import cells

    nb = cells.read_solution(assignment, root)
    sources = cells.solution_cells(nb).values()
    return "\n\n".join(map(cells.student_source, sources)), "\n\n".join(map(cells.stub, sources))


@functools.lru_cache(maxsize=32)
def solution_hashes(assignment: str, root: Path) -> tuple[frozenset[int], frozenset[int]]:
    """``(k-gram hashes of the solution cells, those of their released templates)``, computed once per process."""
    solution, template = _solution_blocks(assignment, root)
    return frozenset(kgram_hashes(tokens(solution))), frozenset(kgram_hashes(tokens(template)))


@functools.lru_cache(maxsize=4)
def library_hashes(root: Path) -> tuple[dict[str, frozenset[int]], frozenset[int]]:
    """``({"peftlab/<file>.py": its k-gram hashes}, all of them)``, ``peftlab/checks`` left out; once per process."""
    files = {}
    for path in sorted((root / "peftlab").rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[1] != "checks":
            files[rel.as_posix()] = frozenset(kgram_hashes(tokens(path.read_text(encoding="utf-8"))))
    return files, frozenset().union(*files.values())


def score(student_code: str, assignment: str, root: Path) -> dict:
    """How much of ``student_code`` is found in the course's code, each score in 0..1.

    ``{"solutions": ..., "peftlab": ..., "max": ..., "closest": label or None, "fingerprints": n}``: the fraction of
    the student's fingerprints (those not in the released template) found in the solution cells, in peftlab's files
    (all of them together), the larger of the two, and the one reference (``solutions/<assignment>`` or a
    ``peftlab/<file>.py``) that holds most of them; ``fingerprints`` says how much evidence the scores rest on.
    """
    root = Path(root).resolve()
    (solution, template), (library, everything) = solution_hashes(assignment, root), library_hashes(root)
    mine = fingerprints(kgram_hashes(tokens(student_code))) - template
    if not mine:
        return {"solutions": 0.0, "peftlab": 0.0, "max": 0.0, "closest": None, "fingerprints": 0}
    share = {f"solutions/{assignment}": len(mine & solution) / len(mine)}
    share.update({name: len(mine & hashes) / len(mine) for name, hashes in library.items()})
    solutions, peftlab = share[f"solutions/{assignment}"], len(mine & everything) / len(mine)
    return {"solutions": solutions, "peftlab": peftlab, "max": max(solutions, peftlab),
            "closest": max(share, key=share.get), "fingerprints": len(mine)}


def submission_code(nb) -> str:
    """The code a student wrote in a notebook: its solution cells (nbgrader ``solution``), joined."""
    from autograde import cells

    return "\n\n".join(cells.solution_cells(nb).values())
