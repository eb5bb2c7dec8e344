"""`make demo` at a tiny size: every step runs through its script, every report line is computed."""
import csv
import re

from cortex import demo
from cortex.cli import run_main
from cortex.scripts import REPO, load_script


def test_tiny_demo_end_to_end(tmp_path, capsys):
    args = demo.get_args_parser().parse_args(["--tiny", "--workdir", str(tmp_path)])
    args.force = False
    timings = demo.main(args)
    assert timings and not any(skipped for *_, skipped in timings)
    out = capsys.readouterr().out
    report = (tmp_path / "results" / "demo_report.md").read_text()
    _check_replicates(tmp_path, report, out)
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


def _check_replicates(work, report, out):
    """Seed 1's replicate ran in its own folders; the report gives intervals and verdicts; the SmoothGrad runs said
    where SmoothGrad fails; the bias robustness table compares the 4 runs (2 seeds x 2 attributions)."""
    from cortex.analysis.replicates import seed_paths

    vq, da = work / "VQGAN_explanation", work / "Dalle_explanation"
    assert seed_paths("vqgan", vq, 1).best_ckpt(1) == vq / "checkpoints/replicates/seed_1/ClassificationNet1/best_model.pth"
    assert seed_paths("vqgan", vq, 1).best_ckpt(1).is_file()
    assert (vq / "results/replicates/seed_1/Explanation/concept_recovery.csv").is_file()
    assert (da / "results/replicates/seed_1/doctor_color/Bias_detection/token_bias_top5_num10_cliff.csv").is_file()
    section = report.split("## Across seeds", 1)[1].split("## Stability", 1)[0]
    rows = [l for l in section.splitlines() if l.startswith("| ") and not l.startswith(("| ---", "| quantity"))]
    assert len(rows) >= 1 + 2 + 1 + 2 * 4
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert re.fullmatch(r"[-+]?\d+\.\d+ \[[-+]?\d+\.\d+, [-+]?\d+\.\d+\]", cells[1]), r
        assert len(cells[2].split(" / ")) >= 2, r  # one value per seed
        lo, hi = (float(x) for x in re.findall(r"[-+]?\d+\.\d+", cells[1])[1:])
        assert lo <= float(cells[1].split()[0]) <= hi
        assert cells[3] == "" or re.fullmatch(r"(yes|no|not robust) \(\d+/[24]\)", cells[3]), r
    stab = report.split("## Stability", 1)[1].split("## IEM accuracy", 1)[0]
    assert len([l for l in stab.splitlines() if l.startswith("| VQGAN") or l.startswith("| DALL-E")]) == 6
    assert re.search(r"\| (robust|not robust) \(\d/4\) \|$", report, re.M)  # the bias table's robustness column
    # one console line per SmoothGrad run that picks concept tokens or a bias sign
    assert out.count("note: --attribution smoothgrad (the paper's, the default) for bias") == 4  # 2 bias types x 2 seeds
    assert "check with --attribution smoothgrad_x_input" in out
    with open(da / "results/doctor_gender/Bias_detection/token_bias_top5_num10_cliff_robustness.csv") as f:
        rob = list(csv.DictReader(f))
    assert [r["label"] for r in rob] == ["0", "1"] and all(r["runs"] == "4" for r in rob)
    assert all(r["verdict"] in ("robust", "not robust") for r in rob)
    # the summary scripts of both folders
    summ = load_script(REPO / "VQGAN_explanation/explanation_evaluation/summarize_replicates.py")
    run_main(summ.main, summ.get_args_parser, ["--root", str(vq), "--k", "4"])
    with open(vq / "results/replicates/replicates_summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert summary[0]["n"] == "2" and summary[0]["per_seed"].startswith("seed 0: ")
    assert sum("across seeds" in r["quantity"] for r in summary) >= 3  # per label, then the mean
    summ = load_script(REPO / "Dalle_explanation/summarize_replicates.py")
    run_main(summ.main, summ.get_args_parser, ["--root", str(da), "--bias_type", "doctor_color"])
    assert (da / "results/doctor_color/replicates/replicates_summary.csv").is_file()


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
