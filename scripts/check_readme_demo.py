"""Compare the README's demo tables with a demo report (``results/demo_report.md``), or copy them over.

The README keeps a copy of the report's tables between ``<!-- demo-report:start -->`` and
``<!-- demo-report:end -->``. After a full ``make demo``:

    python scripts/check_readme_demo.py                    # same tables, columns and numbers? (exit 1 if not)
    python scripts/check_readme_demo.py --structure_only   # same tables, columns and row labels only
    python scripts/check_readme_demo.py --update           # copy the report's tables (and machine line) into the README

``--structure_only`` is what the tests check against a tiny demo run, whose numbers differ by design.

The rule for the numbers (docs/development.md, "The README's demo numbers"). The structure (tables, titles,
columns, row labels) must always agree. Then:

* same CPU (the ``Machine:`` lines name the same CPU model) or ``--exact``: every cell must be equal;
* another CPU: a training run's outcome differs there, so only what the seed replicates make comparable is
  compared. A README cell ``m [lo, hi]`` of the "Across seeds" table (mean and min–max over the seeds; other
  tables' brackets are confidence intervals of one run) passes when the report's mean lies in ``[lo, hi]``
  widened on each side by the range's own width ``hi - lo`` and half a unit of the last printed digit (with
  the demo's five seeds, an unchanged pipeline on another CPU passes a cell ~99.5% of the time, a table of ~15
  such cells ~93%; a change that moves a number by more than the seeds' spread fails); a verdict cell (``yes (5/5)``,
  ``no (0/5)``, ``robust (10/10)``, ``not robust (3/5)``) passes when its word is the same, and a README ``not robust``
  accepts any verdict. The other cells (one seed's run, per-seed lists) are not compared;
  their count is printed.
"""
import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cortex.utils import CortexError, atomic_write  # noqa: E402

START, END = "<!-- demo-report:start -->", "<!-- demo-report:end -->"


@dataclass
class Table:
    """One markdown table: the heading above it, its header cells and its rows (lists of cell strings)."""

    title: str
    header: list
    rows: list


def readme_region(text: str, where: str = "README.md") -> tuple[int, int]:
    """Character offsets ``(start, end)`` of the text between the two markers (markers excluded)."""
    i, j = text.find(START), text.find(END)
    if i < 0 or j < 0 or j < i:
        raise CortexError(f"{where}: the markers {START} and {END} (in this order) are missing; put the demo "
                          "tables between them")
    return i + len(START), j


def report_region(report: str) -> str:
    """The report's machine line and tables as the README holds them: ``##`` sections demoted to ``###``,
    the title, intro, seed 0's evaluation in detail (``cortex.report.demo_report.DETAIL_HEADING``) and figures left out."""
    lines = report.splitlines()
    machine = [l for l in lines if l.startswith("Machine:")]
    first = next((i for i, l in enumerate(lines) if l.startswith("## ")), None)
    if first is None:
        raise CortexError("the demo report has no '## ' section: is it a results/demo_report.md from make demo?")
    end = next((i for i, l in enumerate(lines) if l.startswith(("## Figures", "## Seed 0's evaluation in detail"))),
               len(lines))
    body = ["#" + l if l.startswith("## ") else l for l in lines[first:end]]
    # figures (and the line that introduces them) stay in the report: their paths are relative to results/
    figure = [l.startswith("![") for l in body]
    intro = [i for i in range(len(body) - 2) if body[i].endswith(":") and not body[i + 1] and figure[i + 2]]
    body = [l for i, l in enumerate(body) if not figure[i] and i not in intro]
    text = "\n".join(machine + [""] + body)
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def parse_tables(md: str) -> list[Table]:
    """Every ``| a | b |`` table of ``md`` with the nearest heading above it (the separator row dropped)."""
    tables, title, cur = [], "", None
    for line in md.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip()
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cur is None:
                cur = Table(title, cells, [])
                tables.append(cur)
            elif not all(re.fullmatch(r":?-+:?", c) for c in cells):
                cur.rows.append(cells)
        else:
            cur = None
    return tables


def _shape(s: str) -> str:
    """A title or header with its numbers replaced by ``#`` (a tiny run's settings differ in digits only)."""
    return re.sub(r"\d+(\.\d+)?", "#", s)


_INTERVAL = re.compile(r"^\s*([-+]?\d+(?:\.\d+)?)%?\s*\[\s*([-+]?\d+(?:\.\d+)?)%?\s*,\s*([-+]?\d+(?:\.\d+)?)%?\s*\]\s*$")
REPLICATE_TABLE = "Across seeds"  # the title of the demo report's table of mean [min, max] over the seeds
_VERDICT = re.compile(r"^(yes|no|robust|not robust) \((\d+)/(\d+)\)$")


def _half_unit(text: str) -> float:
    """Half a unit of the last printed digit of a number (``0.93`` -> 0.005)."""
    return 0.5 * 10 ** -len(text.split(".")[1]) if "." in text else 0.5


def cell_agrees(readme_cell: str, report_cell: str, intervals: bool = True) -> bool | None:
    """Across CPUs: True/False for an interval cell (only where ``intervals``: the replicate table) or a verdict
    cell (the rule in the module doc), None otherwise."""
    m = _INTERVAL.match(readme_cell) if intervals else None
    if m:
        new = _INTERVAL.match(report_cell) or re.match(r"^\s*([-+]?\d+(?:\.\d+)?)%?\s*$", report_cell)
        if not new:
            return False
        lo, hi = float(m.group(2)), float(m.group(3))
        tol = (hi - lo) + max(_half_unit(m.group(2)), _half_unit(m.group(3)))  # the range's own width each side
        return lo - tol <= float(new.group(1)) <= hi + tol
    v = _VERDICT.match(readme_cell)
    if v:
        w = _VERDICT.match(report_cell)
        return bool(w) and (v.group(1) == "not robust" or v.group(1) == w.group(1))
    return None


def machine_cpu(text: str) -> str:
    """The CPU model of a ``Machine:`` line (``Machine: <CPU>, <n> cores, ...``), '' when absent."""
    line = next((l for l in text.splitlines() if l.startswith("Machine:")), "")
    return line[len("Machine:"):].split(",")[0].strip()


def compare(readme_tables: list[Table], report_tables: list[Table], structure_only: bool = False,
            same_machine: bool = True, skipped: list | None = None) -> list[str]:
    """Differences between the README's tables and the report's, one message each (empty: they agree).

    Structure: the same tables in the same order, the same titles and headers (up to numbers), the same
    number of rows and the same row labels (first column). Unless ``structure_only``, also every cell: equal on
    the same machine; on another (``same_machine=False``) by :func:`cell_agrees` (intervals and verdicts), the
    cells it cannot compare appended to ``skipped``.
    """
    problems = []
    if len(readme_tables) != len(report_tables):
        problems.append(f"the README has {len(readme_tables)} demo tables, the report {len(report_tables)}: "
                        f"README {[t.title for t in readme_tables]} vs report {[t.title for t in report_tables]}")
    for a, b in zip(readme_tables, report_tables):
        if _shape(a.title) != _shape(b.title):
            problems.append(f"table title: README '{a.title}' vs report '{b.title}'")
        if [_shape(c) for c in a.header] != [_shape(c) for c in b.header]:
            problems.append(f"'{b.title}': columns differ: README {a.header} vs report {b.header}")
        if [r[0] for r in a.rows] != [r[0] for r in b.rows]:
            problems.append(f"'{b.title}': rows differ: README {[r[0] for r in a.rows]} vs report "
                            f"{[r[0] for r in b.rows]}")
        elif not structure_only:
            for ra, rb in zip(a.rows, b.rows):
                if ra == rb:
                    continue
                if same_machine:
                    problems.append(f"'{b.title}', row '{ra[0]}': README {ra[1:]} vs report {rb[1:]}")
                    continue
                for col, ca, cb in zip(a.header[1:], ra[1:], rb[1:]):
                    ok = cell_agrees(ca, cb, b.title.startswith(REPLICATE_TABLE)) if ca != cb else True
                    if ok is None and skipped is not None:
                        skipped.append((b.title, ra[0], col))
                    elif ok is False:
                        problems.append(f"'{b.title}', row '{ra[0]}', column '{col}': report {cb!r} outside the "
                                        f"README's {ca!r}")
    return problems


def check(readme: Path, report: Path, structure_only: bool = False, exact: bool = False,
          skipped: list | None = None) -> list[str]:
    """Read both files and :func:`compare` their demo tables (exactly when both name the same CPU or ``exact``)."""
    for p in (readme, report):
        if not p.exists():
            raise CortexError(f"{p} not found" + (" (run `make demo` first)" if p == report else ""))
    text, rep = readme.read_text(), report.read_text()
    i, j = readme_region(text, str(readme))
    same = exact or machine_cpu(text[i:j]) == machine_cpu(rep)
    return compare(parse_tables(text[i:j]), parse_tables(report_region(rep)), structure_only, same, skipped)


def update(readme: Path, report: Path) -> None:
    """Replace the README's marked region with the report's machine line and tables."""
    text = readme.read_text()
    i, j = readme_region(text, str(readme))
    with atomic_write(readme) as f:
        f.write(text[:i] + "\n" + report_region(report.read_text()) + "\n" + text[j:])


def get_args_parser():
    p = argparse.ArgumentParser("check_readme_demo", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readme", default=str(REPO / "README.md"), help="the README holding the marked tables")
    p.add_argument("--report", default=str(REPO / "results" / "demo_report.md"), help="the demo report")
    p.add_argument("--structure_only", action="store_true", help="compare tables, columns and row labels only")
    p.add_argument("--update", action="store_true", help="copy the report's tables into the README")
    p.add_argument("--exact", action="store_true",
                   help="compare every cell exactly, even when the report comes from another CPU than the README's")
    return p


def main(args) -> int:
    readme, report = Path(args.readme), Path(args.report)
    if args.update:
        update(readme, report)
        print(f"{readme}: demo tables replaced by those of {report}")
        return 0
    skipped = []
    problems = check(readme, report, args.structure_only, args.exact, skipped)
    machine = next((l for l in report.read_text().splitlines() if l.startswith("Machine:")), "Machine: (not recorded)")
    print(f"report: {report}\n  {machine}")
    if skipped:
        print(f"another CPU than the README's: {len(skipped)} cell(s) of single runs not compared; the intervals "
              "over seeds and the verdicts are (--exact compares every cell)")
    if problems:
        print(f"{len(problems)} difference(s) between {readme} and {report}:\n  " + "\n  ".join(problems))
        return 1
    print(f"{readme} agrees with {report}" + (" (structure)" if args.structure_only else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
