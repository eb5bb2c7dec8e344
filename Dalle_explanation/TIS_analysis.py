"""TIS statistics of the train split of a bias IEM: the concept tokens of each attribute (SPEC §1 step 4, §3).

    cd Dalle_explanation
    python TIS_analysis.py --model 1 --bias_type doctor_gender

Reads results/{bias_type}/TIS/Net{m}/TIS_value_train/label_{k}.csv and the token ids
(datasets/{bias_type}/embeddings/train_token_indices.pkl, built from train_embeddings.csv when missing);
writes results/{bias_type}/TIS/Net{m}/TIS_statistics_train/label_{k}.csv (sectioned: Top 1/5/10/20 Tokens),
global_top_tokens_statistics.csv and tis_statistics_long.csv. The work is done by cortex.stats.analyze_tis.
"""
import argparse

from cortex.attribution import ATTRIBUTIONS
from cortex.cli import bias_parser, paths_parser
from cortex.data import load_token_indices
from cortex.paths import ExperimentPaths
from cortex.stats import MAX_ROWS, TOP_NS, analyze_tis
from cortex.utils import save_run_args

EXPERIMENT = "dalle"


def get_args_parser():
    p = argparse.ArgumentParser("TIS_analysis (DALL-E-mini bias)", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                parents=[bias_parser(), paths_parser()])
    p.add_argument("--model", type=int, choices=(1, 2, 3), required=True, help="IEM ClassificationNet{m}")
    p.add_argument("--attribution", choices=sorted(ATTRIBUTIONS), default="smoothgrad",
                   help="whose TIS to analyse (default: the paper's %(default)s)")
    p.add_argument("--top_ns", type=int, nargs="+", default=list(TOP_NS),
                   help="n of the Top n sections (default: 1 5 10 20)")
    p.add_argument("--max_rows", type=int, default=MAX_ROWS, help="tokens listed per section (default: %(default)s)")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return p


def main(args):
    paths = ExperimentPaths.from_args(args, EXPERIMENT)
    stats_dir = paths.stats_dir(args.model, args.attribution)
    stats_dir.mkdir(parents=True, exist_ok=True)
    save_run_args(args, stats_dir)
    token_indices = load_token_indices(paths.data_dir, "train")
    summary = analyze_tis(paths.tis_dir(args.model, "train", args.attribution), stats_dir, token_indices,
                          top_ns=tuple(args.top_ns), limit=args.max_rows, progress=not args.no_progress)
    print(f"TIS statistics of {len(summary['labels'])} labels ({summary['images']} images) -> {stats_dir}")
    return summary


if __name__ == "__main__":
    main(get_args_parser().parse_args())
