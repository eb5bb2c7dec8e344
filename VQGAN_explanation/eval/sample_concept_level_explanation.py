"""Concept-level explanation evaluation (SPEC §5): mask a label's concept tokens in its test images.

    cd VQGAN_explanation/eval
    python sample_concept_level_explanation.py --model 1 --top_n 20 --token_num 100
    python sample_concept_level_explanation.py --model 1 --top_n 20 --token_num 8 --evaluators synthetic

Per label: CORTEX's concept tokens = the first --token_num rows of section "Top {top_n} Tokens" of
results/TIS/Net{m}/TIS_statistics_train/label_{k}.csv; the baseline = the --token_num most frequent tokens
of results/TIS/frequency_baseline/label_{k}.csv. For each test image of the label, every position whose id
is in the set is blacked out; each evaluator scores the unmasked and the two masked images on the label.

Inputs are checked before any evaluator is loaded: the test split and its images, and a statistics file
and a frequency-baseline file for every test label, from the current TIS run. Anything missing is an error
naming it; --allow_partial evaluates the labels that have both, saying which it skips.

Writes results/Explanation/model_{m}/
  sample_concept_level_results_top{n}_token{k}.csv   Model,Avg_Diff_Target,Avg_Diff_Baseline,Avg_Original_Prob,
                                                     Avg_Masked_Prob_Target,Avg_Masked_Prob_Baseline (+ row Overall,
                                                     the mean over evaluators; Diff = original logit - masked logit;
                                                     the authors' columns and numbers, full float precision)
  sample_concept_level_results_top{n}_token{k}_paired.csv  the paired statistic: per image, CORTEX's drop minus
                                                     the baseline's drop (logit and prob), its mean per evaluator
                                                     with a 95% Student-t confidence interval, n images
  sample_concept_level_per_label_top{n}_token{k}.csv  per label and evaluator (incl. masked-position counts)
  sample_concept_level_per_image_top{n}_token{k}.csv
  figures/concept_level_top{n}_token{k}.png
"""
import argparse

from cortex.analysis.frequency import read_frequency_baseline
from cortex.analysis.statistics_files import read_stats_section
from cortex.attribution.attributions import ATTRIBUTIONS, print_smoothgrad_caveat
from cortex.attribution.store import short_list as _short
from cortex.cli import (label_subset_parser, make_parser, paths_parser, position_int, positive_int, run_main,
                        runtime_parser)
from cortex.evaluation.concept_level import PAIRED_COLUMNS, concept_level, concept_paired_stats, paired_stats_path
from cortex.evaluation.evaluators import evaluator_parser
from cortex.evaluation.explain import (CONCEPT_COLUMNS, PER_IMAGE_COLUMNS, check_eval_dataset, eval_setup,
                                       evaluated_labels, load_images, warn_if_near_chance, write_rows)
from cortex.paths import ExperimentPaths, attribution_suffix
from cortex.iem.registry import model_choices
from cortex.provenance import write_output_record
from cortex.utils import CortexError, save_run_args

EXPERIMENT = "vqgan"
PER_LABEL_COLUMNS = ["label", "evaluator", "images", "concept_tokens", "baseline_tokens", "masked_positions_target",
                     "masked_positions_baseline", "original_prob", "masked_prob_target", "masked_prob_baseline"]


def get_args_parser():
    p = make_parser("sample_concept_level_explanation", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter,
                    parents=[paths_parser(__file__, up=1), runtime_parser(), evaluator_parser(),
                             label_subset_parser("evaluate the labels that have statistics and a frequency baseline "
                                                 "even if others lack them (prints what is skipped); default: refuse")])
    p.add_argument("--model", type=int, choices=model_choices("vqgan"), required=True, help="IEM whose TIS statistics are used")
    p.add_argument("--top_n", type=position_int, default=20, help="section 'Top {top_n} Tokens' of the statistics (default: 20)")
    p.add_argument("--token_num", type=positive_int, default=100, help="concept / baseline tokens per label (default: 100)")
    p.add_argument("--attribution", choices=sorted(ATTRIBUTIONS), default="smoothgrad",
                   help="whose TIS statistics (default: the paper's %(default)s)")
    p.add_argument("--no_figures", action="store_true", help="write the CSVs only")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return p


def check_inputs(paths, args) -> tuple[dict, dict]:
    """Test split, images, statistics and frequency baseline of every label, before any evaluator is loaded.

    Returns ``({label: (records, concept tokens, baseline tokens)}`` of the labels to evaluate, the ids of the
    inputs (``cortex.provenance.verify``)).
    """
    by_label = evaluated_labels(check_eval_dataset(paths, "test"), args.labels, args.max_images_per_label, "test",
                                paths.data_dir)
    used = check_statistics(paths, args)
    stats = {k: paths.stats_file(args.model, k, args.attribution) for k in by_label}
    freq = {k: paths.frequency_file(k) for k in by_label}
    no_stats = [k for k, p in stats.items() if not p.is_file()]
    no_freq = [k for k, p in freq.items() if not p.is_file()]
    if no_stats or no_freq:
        what = []
        if no_stats:
            what.append(f"no TIS statistics for labels {_short(no_stats)} in {paths.stats_dir(args.model, args.attribution)} "
                        f"(TIS_analysis.py --model {args.model})")
        if no_freq:
            what.append(f"no frequency baseline for labels {_short(no_freq)} in {paths.frequency_dir()} "
                        f"(generate_freq_based_tokens.py)")
        if not args.allow_partial:
            raise CortexError("; ".join(what) + ". Run those steps, or pass --allow_partial to evaluate only the "
                              "labels that have both")
        print("warning: --allow_partial: skipping labels: " + "; ".join(what))
    out = {}
    for k, recs in by_label.items():
        if k in no_stats or k in no_freq:
            continue
        out[k] = (recs, read_stats_section(stats[k], args.top_n, args.token_num),
                  read_frequency_baseline(freq[k], args.token_num))
    if not out:
        raise CortexError("no label to evaluate: none has both TIS statistics and a frequency baseline")
    return out, used


def check_statistics(paths, args) -> dict:
    """The whole chain up to the dataset (``cortex.provenance.verify``): the statistics come from the current
    TIS run (stale label files, a changed TIS run, an unfinished analysis), that run from the current IEM on
    the current dataset, and the frequency baseline is complete and counted on the current dataset. Inputs
    without provenance (the authors' published files) pass with a warning. With --allow_partial a failed check
    is a warning, not an error. Returns the ids of the inputs."""
    from cortex.provenance import verify

    try:
        return verify(paths, args.model, statistics=True, frequency=True, attribution=args.attribution)
    except CortexError as e:
        if not args.allow_partial:
            raise CortexError(f"{e} (or pass --allow_partial to evaluate with these inputs on purpose)") from None
        print(f"warning: --allow_partial: using the statistics anyway: {e}")
        return {"allow_partial": str(e)}


def label_data(paths, inputs):
    """Per label, lazily: (label, records, images, concept tokens, baseline tokens)."""
    for label, (recs, concept, baseline) in inputs.items():
        yield label, recs, load_images(paths.data_dir, recs), concept, baseline


def main(args):
    inputs, used = check_inputs(ExperimentPaths.from_args(args, EXPERIMENT), args)
    paths, device, evaluators = eval_setup(args, EXPERIMENT)
    warn_if_near_chance(paths, args.model)
    print_smoothgrad_caveat(args.attribution, "concept tokens")
    out_dir = paths.explanation_dir(args.model)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"top{args.top_n}_token{args.token_num}{attribution_suffix(args.attribution)}"
    save_run_args(args, out_dir, f"sample_concept_level_args_{tag}.json")
    from cortex.data.formats import dataset_geometry

    h, w, _ = dataset_geometry(paths.data_dir)  # the token grid (16x16 unless dataset_info.json says otherwise)
    res = concept_level(evaluators, label_data(paths, inputs), batch_size=args.eval_batch_size,
                        progress=not args.no_progress, grid=(h, w))
    out = write_rows(out_dir / f"sample_concept_level_results_{tag}.csv", CONCEPT_COLUMNS, res.rows)
    write_output_record(out, used)  # <out>.source.json: the statistics, baseline, IEM and dataset it used
    paired = concept_paired_stats(res)
    write_rows(paired_stats_path(out), PAIRED_COLUMNS, paired)
    write_rows(out_dir / f"sample_concept_level_per_label_{tag}.csv", PER_LABEL_COLUMNS, res.per_label)
    write_rows(out_dir / f"sample_concept_level_per_image_{tag}.csv", PER_IMAGE_COLUMNS, res.per_image())
    print(f"wrote {out}")
    print(f"{'evaluator':<16} {'diff CORTEX':>11} {'diff freq.':>10} {'p orig':>7} {'p CORTEX':>9} {'p freq.':>8}")
    for r in res.rows:
        print(f"{r['Model']:<16} {r['Avg_Diff_Target']:11.3f} {r['Avg_Diff_Baseline']:10.3f} "
              f"{r['Avg_Original_Prob']:7.3f} {r['Avg_Masked_Prob_Target']:9.3f} {r['Avg_Masked_Prob_Baseline']:8.3f}")
    print("paired (per image: CORTEX logit drop - baseline logit drop), mean [95% t-interval], n:")
    for r in paired:
        if r["Metric"] == "logit_drop":
            print(f"  {r['Model']:<16} {r['Mean_Paired_Diff']:8.3f} [{r['CI_Low']:.3f}, {r['CI_High']:.3f}]  n={r['N']}")
    pos_t = sum(r["masked_positions_target"] for r in res.per_label) / max(1, len(res.per_label))
    pos_b = sum(r["masked_positions_baseline"] for r in res.per_label) / max(1, len(res.per_label))
    print(f"masked positions per image (of {h * w}): CORTEX {pos_t:.1f}, frequency baseline {pos_b:.1f}")
    if not args.no_figures:
        import pandas as pd

        from cortex.report import plots

        p = plots.concept_bars(pd.DataFrame(res.rows), paths.figures_dir(args.model) / f"concept_level_{tag}.png",
                               title=f"Concept level, Net{args.model} {args.attribution}, top {args.top_n}, "
                                     f"{args.token_num} tokens",
                               per_image=pd.DataFrame(res.per_image()))
        print(f"figure: {p}")
    return out


if __name__ == "__main__":
    run_main(main, get_args_parser)
