"""Concept recovery on the synthetic world: precision@k of the planted concept tokens (SPEC §6).

    cd VQGAN_explanation/explanation_evaluation
    python concept_recovery.py                 # every model and attribution with TIS statistics
    python concept_recovery.py --model 1 --k 5

For each label, the planted concept tokens come from datasets/ground_truth.json (written by
generate_dataset.py). Compared: the first k tokens of each attribution's `Top n Tokens` section
(n = 1, 5, 10, 20), the frequency baseline (results/TIS/frequency_baseline), and random choice
(expected precision of k ids drawn from those occurring in the label's train images).
k defaults to the number of planted tokens of each label. Writes results/Explanation/concept_recovery.csv
(columns model,method,top_n,label,k,precision; rows with label "mean" average over labels).

Significance (issues 16.2, 20): from each run's TIS_statistics_train/tis_significance.csv (TIS_analysis.py's
label-contrast test), the tokens with BH q < --alpha are scored against the truth:
results/Explanation/concept_recovery_significance.csv (columns model,method,top_n,label,kind,significant,
true_positives,recall,false_discoveries; label "mean" rows: recall of the planted tokens, fdp = false share of
the planted labels' significant tokens, and on the null labels (generate_dataset.py --null_classes K) the mean
number of significant tokens and the fraction of null labels with any). Runs analysed with
TIS_analysis.py --enrichment: the within-image test scored the same way in concept_recovery_enrichment.csv.
With null labels, results/Explanation/null_label_pvalues.png shows the null labels' p-values of the
label-contrast test (histogram and QQ plot against the uniform: the calibration check).

Inputs: only statistics of the current runs are used. Each (model, attribution) is checked with
cortex.analysis.significance.check_current_run (statistics match their TIS run, which names the checkpoint and train
CSV on disk now) and must cover every label of ground_truth.json.
Candidates found on disk that fail are left out with a warning (leftovers of an earlier run); one named by
--model/--attribution that fails is refused, unless --allow_partial.
"""

import argparse
import csv

from cortex.analysis.ranking import TOP_NS
from cortex.analysis.recovery import concept_recovery, find_attributions, find_models, read_ground_truth
from cortex.attribution.attributions import ATTRIBUTIONS
from cortex.cli import float_in, int_in, make_parser, paths_parser, position_int, positive_int, run_main
from cortex.paths import ExperimentPaths, label_files
from cortex.provenance import check_frequency_baseline, dataset_hashes, record_id, write_output_record
from cortex.analysis.significance import (ALPHA, ENRICHMENT_FILE, SIGNIFICANCE_FILE, check_current_run, null_labels,
                                 read_significance, significance_recovery)
from cortex.utils import CortexError, atomic_write, save_run_args

COLUMNS = ["model", "method", "top_n", "label", "k", "precision"]
SIG_COLUMNS = ["model", "method", "top_n", "label", "kind", "significant", "true_positives", "recall",
               "false_discoveries", "fdp", "null_discoveries", "null_labels_with_discovery"]


def get_args_parser():
    p = make_parser("concept_recovery", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter,
                    parents=[paths_parser(__file__, up=1)])
    p.add_argument("--model", type=int_in(1, 4), nargs="*", default=None, help="IEMs to evaluate (default: all "
                                                                                "with current statistics)")
    p.add_argument("--attribution", choices=sorted(ATTRIBUTIONS), nargs="*", default=None,
                   help="attributions to evaluate (default: all with current statistics)")
    p.add_argument("--k", type=positive_int, default=None, help="precision@k (default: number of planted tokens per label)")
    p.add_argument("--top_ns", type=position_int, nargs="+", default=list(TOP_NS), help="sections to evaluate")
    p.add_argument("--alpha", type=float_in(0, 1, lo_open=True, hi_open=True), default=ALPHA,
                   help="BH false discovery rate of the significance report")
    p.add_argument("--allow_partial", action="store_true",
                   help="use stale or incomplete statistics named by --model/--attribution on purpose (warns)")
    return p


def current_runs(paths, models, attributions, labels, allow_partial: bool = False,
                 used: dict | None = None) -> dict[int, list[str]]:
    """``{model: [attribution, ...]}`` whose statistics are current and cover ``labels``.

    used: filled with ``{"Net{m} {attribution}": statistics_id}`` of the runs kept (their provenance).

    Runs named explicitly that fail the check raise a CortexError (unless ``allow_partial``: warning, kept);
    runs only found on disk that fail are left out with a warning.
    """
    out = {}
    for m in (models or find_models(paths)):
        named = attributions is not None or models is not None
        for a in (attributions or find_attributions(paths, m)):
            stats_dir = paths.stats_dir(m, a)
            try:
                ids = check_current_run(paths, m, a)
                if used is not None:
                    used[f"Net{m} {a}"] = ids.get("statistics_id")
                missing = sorted(set(labels) - set(label_files(stats_dir)))
                if missing:
                    raise CortexError(f"{stats_dir}: no statistics for labels {missing} of ground_truth.json; "
                                      f"rerun TIS_computation.py and TIS_analysis.py --model {m} --attribution {a}")
            except CortexError as e:
                if named and not allow_partial:
                    raise CortexError(f"{e} (--allow_partial evaluates it anyway, on purpose.)") from None
                if not (named and allow_partial):
                    print(f"warning: left out Net{m} {a} (not the current run): {e}")
                    continue
                print(f"warning: --allow_partial: evaluating Net{m} {a} anyway: {e}")
            out.setdefault(m, []).append(a)
    if not out:
        raise CortexError(f"no current TIS statistics under {paths.results_dir}; run TIS_computation.py and "
                          f"TIS_analysis.py first")
    return out


def format_summary(summary) -> str:
    lines = [f"{'model':>5}  {'method':<22} {'top_n':>5} {'k':>7} {'precision@k':>11}  labels"]
    for r in summary:
        lines.append(f"{str(r['model']):>5}  {r['method']:<22} {str(r['top_n']):>5} {str(r['k']):>7} "
                     f"{r['precision']:>11.3f}  {r['labels']}")
    return "\n".join(lines)


def _cell(v):
    return f"{v:.6f}" if isinstance(v, float) else v


def main(args, experiment="vqgan"):
    paths = ExperimentPaths.from_args(args, experiment)
    out = paths.results_dir / "Explanation" / "concept_recovery.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_run_args(args, out.parent, name="concept_recovery_args.json")
    planted = read_ground_truth(paths.data_dir / "ground_truth.json")
    nulls = null_labels(paths.data_dir)
    used = {}
    runs = current_runs(paths, args.model, args.attribution, sorted(planted) + nulls, args.allow_partial, used)
    freq = check_frequency_baseline(paths)  # unfinished or of another dataset: refused, not silently dropped
    if freq is None and not label_files(paths.frequency_dir()):
        print(f"note: no frequency baseline in {paths.frequency_dir()}: no frequency_baseline rows "
              f"(python generate_freq_based_tokens.py adds them)")
    # one call: the train split and ground truth are read once; baseline and random rows come once, after the models'
    rows, summary = concept_recovery(paths, models=list(runs), k=args.k, top_ns=tuple(args.top_ns), attributions=runs)
    print(format_summary(summary))
    with atomic_write(out) as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows + summary:
            w.writerow([_cell(r[c]) for c in COLUMNS])
    write_output_record(out, {"dataset": dataset_hashes(paths.data_dir),
                              "frequency_baseline_id": record_id(freq) if freq else None,
                              "statistics": used})
    print(f"-> {out}")
    for name, test in ((SIGNIFICANCE_FILE, "label-contrast"), (ENRICHMENT_FILE, "enrichment")):
        sig_rows, null_p = [], {}
        for m, attrs in runs.items():
            for a in attrs:
                sig_file = paths.stats_dir(m, a) / name
                if not sig_file.exists():
                    if name == SIGNIFICANCE_FILE:
                        print(f"note: {sig_file} not found (statistics from an older TIS_analysis.py); no "
                              f"significance report")
                    continue
                per, summ = significance_recovery(sig_file, planted, nulls, args.top_ns, args.alpha)
                sig_rows += [dict(model=m, method=a, **r) for r in per]
                for s in summ:
                    sig_rows.append(dict(model=m, method=a, label="mean", kind="", significant="", true_positives="",
                                         false_discoveries="", **s))
                    print(f"Net{m} {a:<20} {test} test, top {s['top_n']:>2}: significant planted tokens recall "
                          f"{s['recall']:.2f}, fdp {s['fdp']:.2f}; null labels: {s['null_discoveries']:.2f} "
                          f"significant tokens each, {s['null_labels_with_discovery']:.2f} with any")
                for r in read_significance(sig_file):
                    if r["label"] in nulls and r["top_n"] in args.top_ns:
                        null_p.setdefault(f"Net{m} {a} top {r['top_n']}", []).append(r["p_value"])
        if sig_rows:
            sig_out = out.with_name("concept_recovery_significance.csv" if test == "label-contrast"
                                    else "concept_recovery_enrichment.csv")
            with atomic_write(sig_out) as f:
                w = csv.writer(f)
                w.writerow(SIG_COLUMNS)
                for r in sig_rows:
                    w.writerow([_cell(r.get(c, "")) for c in SIG_COLUMNS])
            print(f"-> {sig_out}")
        if null_p and test == "label-contrast":
            from cortex.report.plots import null_pvalues

            png = null_pvalues(null_p, out.with_name("null_label_pvalues.png"), args.alpha,
                               title=f"null labels {nulls}: label-contrast p-values")
            print(f"-> {png}")
    return summary


if __name__ == "__main__":
    run_main(main, get_args_parser)
