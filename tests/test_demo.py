"""`make demo` at a tiny size: every step runs through its script, every report line is computed."""
import re

from cortex import demo
from cortex.scripts import REPO, load_script


def test_tiny_demo_end_to_end(tmp_path):
    args = demo.get_args_parser().parse_args(["--tiny", "--workdir", str(tmp_path)])
    args.force = False
    timings = demo.main(args)
    assert timings and not any(skipped for *_, skipped in timings)
    report = (tmp_path / "results" / "demo_report.md").read_text()
    for heading in ("## IEM accuracy", "## Concept recovery", "## Deletion", "## Concept-level masking",
                    "## Codebook-level optimisation", "## Bias detection", "## Figures", "## Significant concept tokens",
                    "Paired per image", "## Sanity check: cascading model randomisation", "loss_curves"):
        assert heading in report, heading
    rows = [l for l in report.splitlines() if l.startswith("| ") and not l.startswith("| ---")]
    data = [r for r in rows if re.search(r"[-+]?\d+\.\d+", "|".join(r.split("|")[2:]))]
    assert len(data) >= 4 + 10 + 3 + 4 + 3 + 8  # accuracy, recovery, deletion, concept, codebook, bias rows
    assert "nan" not in report.lower()
    # the report names its machine, and the README's demo tables have its tables, columns and row labels
    assert re.search(r"^Machine: .+, \d+ cores, torch \S+, \d{4}-\d\d-\d\d", report, re.M)
    check = load_script(REPO / "scripts" / "check_readme_demo.py")
    assert check.check(REPO / "README.md", tmp_path / "results" / "demo_report.md", structure_only=True) == []
    for method in ("smoothgrad (top 5)", "smoothgrad_x_input (top 5)", "frequency_baseline", "random"):
        assert f"| {method} |" in report
    figures = re.findall(r"!\[[^]]*\]\(([^)]+)\)", report)
    assert len(figures) >= 6 and all((tmp_path / "results" / f).resolve().exists() for f in figures)
    from tests.test_paper_figures import EXPECTED, check_report_figures  # every figure: its expected panels

    assert set(check_report_figures(tmp_path / "results" / "demo_report.md")) == set(EXPECTED)

    # a second run reuses every finished step
    again = demo.main(args)
    assert all(skipped for *_, skipped in again)


def test_forced_rerun_starts_over(tmp_path):
    """FORCE=1 redoes finished steps: train/TIS/generate start over (--overwrite) instead of resuming, and every
    forced command line is accepted by its script's own parser."""
    steps = demo.all_steps(demo.TINY, demo.Roots.under(tmp_path))
    seen = set()
    for st in steps:
        argv = st.command(force=True)
        script = argv[0]
        if script in ("train.py", "TIS_computation.py", "generate_dataset.py"):
            assert "--overwrite" in argv and "--resume" not in argv, argv
            seen.add(script)
        if script == "train.py":
            assert "--resume" in st.command(force=False)  # a normal rerun resumes an interrupted training
        load_script(st.cwd / script).get_args_parser().parse_args(argv[1:])
    assert seen == {"train.py", "TIS_computation.py", "generate_dataset.py"}
