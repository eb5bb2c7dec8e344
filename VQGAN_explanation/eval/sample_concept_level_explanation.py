"""Concept-level explanation evaluation (SPEC §5): mask a label's concept tokens in its test images.

    cd VQGAN_explanation/eval
    python sample_concept_level_explanation.py --model 1 --top_n 20 --token_num 100
    python sample_concept_level_explanation.py --model 1 --top_n 20 --token_num 8 --evaluators synthetic

Per label: CORTEX's concept tokens = the first --token_num rows of section "Top {top_n} Tokens" of
results/TIS/Net{m}/TIS_statistics_train/label_{k}.csv; the baseline = the --token_num most frequent tokens
of results/TIS/frequency_baseline/label_{k}.csv. For each test image of the label, every position whose id
is in the set is blacked out; each evaluator scores the unmasked and the two masked images on the label.

Writes results/Explanation/model_{m}/
  sample_concept_level_results_top{n}_token{k}.csv   Model,Avg_Diff_Target,Avg_Diff_Baseline,Avg_Original_Prob,
                                                     Avg_Masked_Prob_Target,Avg_Masked_Prob_Baseline (+ row Overall,
                                                     the mean over evaluators; Diff = original logit - masked logit)
  sample_concept_level_per_label_top{n}_token{k}.csv  per label and evaluator (incl. masked-position counts)
  sample_concept_level_per_image_top{n}_token{k}.csv
  figures/concept_level_top{n}_token{k}.png
"""
import argparse

from cortex.attribution import ATTRIBUTIONS
from cortex.cli import paths_parser, runtime_parser
from cortex.data import read_split
from cortex.evaluators import evaluator_parser
from cortex.explain import (CONCEPT_COLUMNS, PER_IMAGE_COLUMNS, concept_level, eval_setup, load_images,
                            output_suffix, records_by_label, write_rows)
from cortex.stats import read_frequency_baseline, read_stats_section
from cortex.utils import CortexError, save_run_args

EXPERIMENT = "vqgan"
PER_LABEL_COLUMNS = ["label", "evaluator", "images", "concept_tokens", "baseline_tokens", "masked_positions_target",
                     "masked_positions_baseline", "original_prob", "masked_prob_target", "masked_prob_baseline"]


def get_args_parser():
    p = argparse.ArgumentParser("sample_concept_level_explanation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                parents=[paths_parser(root_default=".."), runtime_parser(), evaluator_parser()])
    p.add_argument("--model", type=int, choices=(1, 2, 3, 4), required=True, help="IEM whose TIS statistics are used")
    p.add_argument("--top_n", type=int, default=20, help="section 'Top {top_n} Tokens' of the statistics (default: 20)")
    p.add_argument("--token_num", type=int, default=100, help="concept / baseline tokens per label (default: 100)")
    p.add_argument("--attribution", choices=sorted(ATTRIBUTIONS), default="smoothgrad",
                   help="whose TIS statistics (default: the paper's %(default)s)")
    p.add_argument("--labels", type=int, nargs="+", default=None, help="evaluate only these labels (default: all)")
    p.add_argument("--max_images_per_label", type=int, default=None, help="first N test images of each label")
    p.add_argument("--no_figures", action="store_true", help="write the CSVs only")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return p


def label_data(paths, args):
    """Per label, lazily: (label, records, images, concept tokens, baseline tokens)."""
    by_label = records_by_label(read_split(paths.data_dir, "test"), args.labels, args.max_images_per_label)
    if args.labels is not None and not by_label:
        raise CortexError(f"--labels {args.labels}: none of them is in the test split of {paths.data_dir}")
    for label, recs in by_label.items():
        concept = read_stats_section(paths.stats_file(args.model, label, args.attribution), args.top_n, args.token_num)
        baseline = read_frequency_baseline(paths.frequency_file(label), args.token_num)
        yield label, recs, load_images(paths.data_dir, recs), concept, baseline


def main(args):
    if args.token_num < 1 or args.top_n < 1:
        raise CortexError(f"--top_n {args.top_n} --token_num {args.token_num}: both must be >= 1")
    paths, device, evaluators = eval_setup(args, EXPERIMENT)
    out_dir = paths.explanation_dir(args.model)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"top{args.top_n}_token{args.token_num}{output_suffix(args.attribution)}"
    save_run_args(args, out_dir, f"sample_concept_level_args_{tag}.json")
    res = concept_level(evaluators, label_data(paths, args), batch_size=args.eval_batch_size,
                        progress=not args.no_progress)
    out = write_rows(out_dir / f"sample_concept_level_results_{tag}.csv", CONCEPT_COLUMNS, res.rows)
    write_rows(out_dir / f"sample_concept_level_per_label_{tag}.csv", PER_LABEL_COLUMNS, res.per_label)
    write_rows(out_dir / f"sample_concept_level_per_image_{tag}.csv", PER_IMAGE_COLUMNS, res.per_image())
    print(f"wrote {out}")
    print(f"{'evaluator':<16} {'diff CORTEX':>11} {'diff freq.':>10} {'p orig':>7} {'p CORTEX':>9} {'p freq.':>8}")
    for r in res.rows:
        print(f"{r['Model']:<16} {r['Avg_Diff_Target']:11.3f} {r['Avg_Diff_Baseline']:10.3f} "
              f"{r['Avg_Original_Prob']:7.3f} {r['Avg_Masked_Prob_Target']:9.3f} {r['Avg_Masked_Prob_Baseline']:8.3f}")
    pos_t = sum(r["masked_positions_target"] for r in res.per_label) / max(1, len(res.per_label))
    pos_b = sum(r["masked_positions_baseline"] for r in res.per_label) / max(1, len(res.per_label))
    print(f"masked positions per image (of 256): CORTEX {pos_t:.1f}, frequency baseline {pos_b:.1f}")
    if not args.no_figures:
        import pandas as pd

        from cortex import plots

        p = plots.concept_bars(pd.DataFrame(res.rows), paths.figures_dir(args.model) / f"concept_level_{tag}.png",
                               title=f"Concept level (Net{args.model} {args.attribution} TIS, top {args.top_n}, {args.token_num} tokens; "
                                     f"masked positions/image: CORTEX {pos_t:.0f}, freq. {pos_b:.0f})")
        print(f"figure: {p}")
    return out


if __name__ == "__main__":
    main(get_args_parser().parse_args())
