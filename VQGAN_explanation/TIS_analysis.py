"""TIS statistics of the train split (SPEC §1 step 4, §3): the concept tokens of each label.

    cd VQGAN_explanation
    python TIS_analysis.py --model 1                                   # the paper's SmoothGrad TIS
    python TIS_analysis.py --model 1 --attribution smoothgrad_x_input  # another attribution's TIS

Reads results/TIS[_<attribution>]/Net{m}/TIS_value_train/label_{k}.csv and the token ids
(datasets/train_token_indices.pkl, built from train_embeddings.csv when missing); writes
results/TIS[_<attribution>]/Net{m}/TIS_statistics_train/label_{k}.csv (sectioned: Top 1/5/10/20 Tokens),
global_top_tokens_statistics.csv and tis_statistics_long.csv (label,top_n,token,count), and
tis_significance.csv (the label-contrast test per token: does it mark the label's images, and is it more
often in their top n than in other labels' images that contain it? exact label-permutation p-values,
Benjamini-Hochberg across a label's tokens; --enrichment adds tis_enrichment.csv; see cortex/analysis/significance.py).
--significant_only lists only the tokens with q < --alpha there; the sectioned files are unchanged.
The TIS run is checked first: every label of the train split needs a complete label_{k}.csv of the one
run in tis_config.json (no .partial file, no missing/extra label, one row per image, no NaN, no image
twice); --allow_partial analyses the complete labels only, on purpose, with a warning. Files are
byte-equal to the authors' script (ties: first occurrence; Files: one entry per occurrence);
source.json records the TIS run (cortex.provenance.check_statistics_current).
"""
import argparse

from cortex.analysis.statistics import analysis_parser
from cortex.cli import make_parser, paths_parser, run_main
from cortex.analysis.significance import add_significance_args, run_tis_analysis
from cortex.iem.registry import model_choices

EXPERIMENT = "vqgan"


def get_args_parser():
    p = make_parser("TIS_analysis", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter,
                    parents=[analysis_parser(model_choices("vqgan")), paths_parser(__file__)])
    add_significance_args(p)
    return p


def main(args):
    return run_tis_analysis(args, EXPERIMENT)


if __name__ == "__main__":
    run_main(main, get_args_parser)
