"""TIS statistics of the train split of a bias IEM: the concept tokens of each attribute (SPEC §1 step 4, §3).

    cd Dalle_explanation
    python TIS_analysis.py --model 1 --bias_type doctor_gender

Reads results/{bias_type}/TIS/Net{m}/TIS_value_train/label_{k}.csv and the token ids
(datasets/{bias_type}/embeddings/train_token_indices.pkl, built from train_embeddings.csv when missing);
writes results/{bias_type}/TIS/Net{m}/TIS_statistics_train/label_{k}.csv (sectioned: Top 1/5/10/20 Tokens),
global_top_tokens_statistics.csv, tis_statistics_long.csv and tis_significance.csv (the per-token
enrichment test, as in VQGAN_explanation/TIS_analysis.py; --significant_only, --alpha).
The TIS run is checked first: every label of the train split needs a complete label_{k}.csv of the one
run in tis_config.json (no .partial file, no missing/extra label, one row per image, no NaN, no image
twice); --allow_partial analyses the complete labels only, on purpose, with a warning. Files are
byte-equal to the authors' script (ties: first occurrence; Files: one entry per occurrence);
source.json records the TIS run (cortex.provenance.check_statistics_current).
"""
import argparse

from cortex.analysis.statistics import analysis_parser
from cortex.cli import bias_parser, make_parser, paths_parser, run_main
from cortex.analysis.significance import add_significance_args, run_tis_analysis
from cortex.iem.registry import model_choices

EXPERIMENT = "dalle"


def get_args_parser():
    p = make_parser("TIS_analysis (DALL-E-mini bias)", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter,
                    parents=[analysis_parser(model_choices("dalle")), bias_parser(), paths_parser(__file__)])
    add_significance_args(p)
    return p


def main(args):
    return run_tis_analysis(args, EXPERIMENT)


if __name__ == "__main__":
    run_main(main, get_args_parser)
