"""Compare the README's demo tables with a demo report (``results/demo_report.md``), or copy them over.

The README keeps a copy of the report's tables between ``<!-- demo-report:start -->`` and
``<!-- demo-report:end -->``. After a full ``make demo``:

    python scripts/check_readme_demo.py                    # same tables, columns and numbers? (exit 1 if not)
    python scripts/check_readme_demo.py --structure_only   # same tables, columns and row labels only
    python scripts/check_readme_demo.py --update           # copy the report's tables (and machine line) into the README

``--structure_only`` is what the tests check against a tiny demo run, whose numbers differ by design. The
numbers of a full run match the README's only on the machine its ``Machine:`` line names; another CPU or
torch build changes the last digits.
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
    the title, intro and figures left out."""
    lines = report.splitlines()
    machine = [l for l in lines if l.startswith("Machine:")]
    first = next((i for i, l in enumerate(lines) if l.startswith("## ")), None)
    if first is None:
        raise CortexError("the demo report has no '## ' section: is it a results/demo_report.md from make demo?")
    end = next((i for i, l in enumerate(lines) if l.startswith("## Figures")), len(lines))
    body = ["#" + l if l.startswith("## ") else l for l in lines[first:end]]
    return "\n".join(machine + [""] + body).strip("\n")


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


def compare(readme_tables: list[Table], report_tables: list[Table], structure_only: bool = False) -> list[str]:
    """Differences between the README's tables and the report's, one message each (empty: they agree).

    Structure: the same tables in the same order, the same titles and headers (up to numbers), the same
    number of rows and the same row labels (first column). Unless ``structure_only``, also every cell.
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
                if ra != rb:
                    problems.append(f"'{b.title}', row '{ra[0]}': README {ra[1:]} vs report {rb[1:]}")
    return problems


def check(readme: Path, report: Path, structure_only: bool = False) -> list[str]:
    """Read both files and :func:`compare` their demo tables."""
    for p in (readme, report):
        if not p.exists():
            raise CortexError(f"{p} not found" + (" (run `make demo` first)" if p == report else ""))
    text = readme.read_text()
    i, j = readme_region(text, str(readme))
    return compare(parse_tables(text[i:j]), parse_tables(report_region(report.read_text())), structure_only)


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
    return p


def main(args) -> int:
    readme, report = Path(args.readme), Path(args.report)
    if args.update:
        update(readme, report)
        print(f"{readme}: demo tables replaced by those of {report}")
        return 0
    problems = check(readme, report, args.structure_only)
    machine = next((l for l in report.read_text().splitlines() if l.startswith("Machine:")), "Machine: (not recorded)")
    print(f"report: {report}\n  {machine}")
    if problems:
        print(f"{len(problems)} difference(s) between {readme} and {report}:\n  " + "\n  ".join(problems))
        return 1
    print(f"{readme} agrees with {report}" + (" (structure)" if args.structure_only else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
