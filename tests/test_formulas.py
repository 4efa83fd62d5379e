"""Every registered loss's formula is LaTeX that renders (what `lossreg show` prints and
a reader pastes into a paper or a notebook).

Two checks, because matplotlib's mathtext, the renderer at hand, is a subset of LaTeX
that is both stricter and looser than LaTeX itself:

* every command (``\\name``: a backslash and the longest run of letters after it) is
  one LaTeX knows: mathtext's own symbols, fonts, functions and spaces, or one of the
  few amsmath commands in ``AMSMATH``. mathtext reads ``\\quadL`` as ``\\quad L`` and
  renders it, while LaTeX stops at the unknown ``\\quadL``: this check catches it;
* the formula renders with ``matplotlib.mathtext.math_to_image`` once the amsmath
  constructs mathtext lacks are written in its own terms (``AMSMATH``: sized
  delimiters dropped, ``\\lVert`` as ``\\Vert``, ``cases`` as a stacked brace, an
  unbraced ``\\frac12`` braced), so unbalanced braces, a ``\\left`` without its
  ``\\right`` or a missing argument fail.
"""

from __future__ import annotations

import io
import re

import pytest

import lossreg

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
from matplotlib import _mathtext, mathtext  # noqa: E402
from matplotlib._mathtext_data import tex2uni  # noqa: E402

#: amsmath commands mathtext lacks -> how the rendering check writes them for mathtext
#: ("" drops the command: a size hint such as \big)
AMSMATH = {
    **{size: "" for size in ("big", "Big", "bigg", "Bigg", "bigl", "bigr", "Bigl", "Bigr",
                             "biggl", "biggr", "Biggl", "Biggr")},
    "lVert": r"\Vert", "rVert": r"\Vert", "lvert": r"\vert", "rvert": r"\vert",
    "tfrac": r"\frac", "dfrac": r"\frac", "begin": None, "end": None,
    "textstyle": "", "displaystyle": "", "le": r"\leq", "ge": r"\geq",
}
#: commands of mathtext's grammar that are not in its symbol tables
GRAMMAR = {"frac", "genfrac", "binom", "sqrt", "left", "right", "middle", "overline",
           "operatorname", "text", "substack", "boldsymbol", "overset", "underset", "hspace",
           "mathdefault"}


def known_commands() -> set[str]:
    known = set(tex2uni) | GRAMMAR | set(AMSMATH)
    parser = _mathtext.Parser
    for name in dir(parser):
        table = getattr(parser, name)
        if name.startswith("_") and isinstance(table, (set, frozenset, dict)):
            known |= {str(k).lstrip("\\") for k in table}
    return known | {f"math{font}" for font in parser._fontnames}


def unknown_commands(formula: str, known: set[str]) -> list[str]:
    return [c for c in re.findall(r"\\([A-Za-z]+)", formula) if c not in known]


def _cases(match: re.Match) -> str:
    rows = [row.replace("&", r"\quad ") for row in match.group(1).split(r"\\")]
    return r"\left\{\substack{" + r"\\".join(rows) + r"}\right."


def for_mathtext(formula: str) -> str:
    out = re.sub(r"\\begin\{cases\}(.*?)\\end\{cases\}", _cases, formula, flags=re.DOTALL)
    for command, replacement in AMSMATH.items():
        if replacement is not None:
            out = re.sub(rf"\\{command}(?![A-Za-z])", lambda m, r=replacement: r, out)
    # LaTeX takes one-token arguments unbraced (\frac12, \mathbf c); mathtext wants braces
    out = re.sub(r"\\frac\s*([0-9A-Za-z])\s*([0-9A-Za-z])", r"\\frac{\1}{\2}", out)
    out = re.sub(r"\\(math[a-z]+|boldsymbol)\s+([0-9A-Za-z])", r"\\\1{\2}", out)
    return out


def render(formula: str) -> bytes:
    buf = io.BytesIO()
    mathtext.math_to_image(f"${formula}$", buf, format="png")
    return buf.getvalue()


def test_the_checks_catch_what_they_are_for():
    known = known_commands()
    assert unknown_commands(r"\ell_i,\quadL = \frac{1}{n}", known) == ["quadL"]
    assert unknown_commands(r"\ell_i,\quad L = \frac{1}{n}\sum_i \lVert x\rVert", known) == []
    assert render(for_mathtext(r"\begin{cases}\frac12 r^2 & a\\ b & c\end{cases}")) \
        .startswith(b"\x89PNG")
    for broken in (r"\frac{1}{n", r"\left( x", r"\sqrt"):
        with pytest.raises(ValueError):
            render(for_mathtext(broken))


def test_every_formula_is_known_latex_and_renders():
    specs = lossreg.losses()
    assert len(specs) >= 43
    known = known_commands()
    bad = {}
    for spec in specs:
        unknown = unknown_commands(spec.formula, known)
        if unknown:
            bad[spec.name] = f"unknown commands {unknown}"
            continue
        try:
            assert render(for_mathtext(spec.formula)).startswith(b"\x89PNG")
        except ValueError as exc:
            bad[spec.name] = str(exc).splitlines()[-1]
    assert not bad, bad
