"""Bias detection: do a neutral prompt's images carry one attribute's concept tokens more than the other's?

    cd Dalle_explanation
    python bias_detection.py --model 1 --bias_type doctor_gender --top_n 5 --token_num 10

For each label, its tokens are the first --token_num rows of section ``Top {top_n} Tokens`` of
results/{bias_type}/TIS/Net{m}/TIS_statistics_train/label_{k}.csv. For every image of the neutral-prompt set
datasets/doctor_original/information/results_none.csv (column ``indices``) the positions holding one of the
label's tokens are counted; the labels' counts are compared with Cliff's delta.

Writes results/{bias_type}/Bias_detection/token_bias_top{n}_num{k}_cliff.csv with columns
total_files,total_token_occurrences,average_frequency_per_file,number_of_target_tokens,label,tokens,cliff_delta,
cliff_delta_seed, and a figure token_bias_top{n}_num{k}_cliff.png beside it (with --exclude_shared the names end
in _cliff_noshared; with another --attribution than smoothgrad they end in _<attribution>). ``cliff_delta`` is the standard
(#x>y - #x<y)/(n m) of the label's counts against the other label's (> 0: the neutral prompt leans towards this
label); ``cliff_delta_seed`` is the seed code's value, exactly half of it. Extra columns at the end:
``p_value`` (two-sided Mann-Whitney U; delta = 2U/(n m) - 1), ``cliff_delta_ci_low/high`` (seeded percentile
bootstrap 95% CI, --n_boot resamples, --seed) and ``magnitude`` (negligible/small/medium/large). The
``tokens`` cell is written as the authors' script does (``['12', '7']``), rows in ascending label order.

Inputs are checked first: statistics that are stale (the TIS run changed since TIS_analysis.py), unfinished,
missing for a label of the train split or present for a label it lacks are refused; --allow_partial proceeds
on purpose with a warning. An IEM whose accuracy is near chance gets a loud warning. The figure shows only
this run's rows.
"""
import argparse

from cortex.analysis.bias import run_bias_detection
from cortex.attribution.attributions import ATTRIBUTIONS
from cortex.cli import (bias_parser, make_parser, nonneg_int, paths_parser, position_int, positive_int, run_main,
                        seed_int)
from cortex.iem.registry import model_choices
from cortex.paths import ExperimentPaths
from cortex.utils import save_run_args

EXPERIMENT = "dalle"


def get_args_parser():
    p = make_parser("Bias detection (DALL-E-mini)", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter,
                    parents=[bias_parser(), paths_parser(__file__)])
    p.add_argument("--model", type=int, choices=model_choices("dalle"), default=1, help="IEM ClassificationNet{m} (default: 1)")
    p.add_argument("--top_n", type=position_int, default=5, help="section 'Top n Tokens' of the TIS statistics (default: 5)")
    p.add_argument("--token_num", type=positive_int, default=10, help="tokens per label: the first k rows (default: 10)")
    p.add_argument("--attribution", choices=sorted(ATTRIBUTIONS), default="smoothgrad",
                   help="whose TIS statistics (default: the paper's %(default)s)")
    p.add_argument("--neutral_csv", default=None,
                   help="neutral-prompt set (default: <root>/datasets/doctor_original/information/results_none.csv)")
    p.add_argument("--exclude_shared", action="store_true",
                   help="drop the tokens listed for both labels before counting (they cannot tell the labels apart); "
                        "output ..._cliff_noshared.csv. Off by default, as the seed")
    p.add_argument("--no_plot", action="store_true", help="do not draw the figure")
    p.add_argument("--n_boot", type=nonneg_int, default=2000, help="bootstrap resamples of the 95%% CI (0: none; "
                                                           "default: %(default)s)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the bootstrap (default: %(default)s)")
    p.add_argument("--allow_partial", action="store_true",
                   help="use stale / incomplete TIS statistics on purpose (warns) instead of refusing them")
    return p


def main(args):
    paths = ExperimentPaths.from_args(args, EXPERIMENT)
    if args.top_n < 1 or args.token_num < 1:
        from cortex.utils import CortexError

        raise CortexError(f"--top_n {args.top_n} --token_num {args.token_num}: both must be >= 1")
    paths.bias_dir().mkdir(parents=True, exist_ok=True)
    save_run_args(args, paths.bias_dir(), f"args_top{args.top_n}_num{args.token_num}.json")
    out = run_bias_detection(paths, args.model, args.top_n, args.token_num, args.attribution,
                             neutral_csv=args.neutral_csv, plot=not args.no_plot, exclude_shared=args.exclude_shared,
                             allow_partial=args.allow_partial, n_boot=args.n_boot, seed=args.seed)
    print(f"wrote {out['csv']}" + (f" and {out['figure']}" if out["figure"] else ""))
    return out


if __name__ == "__main__":
    run_main(main, get_args_parser)
