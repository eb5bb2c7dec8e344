"""Token gallery: what each concept token of a label looks like (one PNG per label).

    cd VQGAN_explanation
    python token_gallery.py --model 1 --label 3 --top_n 20 --k 8          # one label
    python token_gallery.py --model 1 --top_n 20 --k 8                    # every label with TIS statistics
    python token_gallery.py --model 1 --label 3 --tokenizer diffusers --tokenizer_config vqvae/

Reads the label's concept tokens (the first --k rows of section 'Top {top_n} Tokens' of
results/TIS[_<attribution>]/Net{m}/TIS_statistics_train/label_{k}.csv), decodes each token on its own (a grid
filled with it, through the tokenizer's decoder) and cuts its patches from the dataset's decoded images
datasets/images/<a>/<b>.png where it sits; writes
results/Explanation/model_{m}/figures/token_gallery_label{k}_top{n}.png.

The tokenizer is the one that made the dataset (--tokenizer auto: the synthetic world's synthetic_vq.pt, or
the tokenizer recorded in datasets/dataset_info.json), or the one named by --tokenizer/--tokenizer_config.
"""
import argparse

from cortex.attribution.attributions import ATTRIBUTIONS
from cortex.cli import make_parser, nonneg_int, paths_parser, position_int, positive_int, run_main, runtime_parser
from cortex.paths import ExperimentPaths, PAPER_ATTRIBUTION
from cortex.data.tokenizers import tokenizer_for_dataset, tokenizer_kinds
from cortex.iem.registry import model_choices
from cortex.provenance import verify
from cortex.utils import CortexError, get_device, save_run_args

EXPERIMENT = "vqgan"


def get_args_parser():
    p = make_parser("token_gallery", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter,
                    parents=[paths_parser(__file__), runtime_parser()])
    g = p.add_argument_group("gallery")
    g.add_argument("--model", type=int, choices=model_choices("vqgan"), required=True,
                   help="IEM whose TIS statistics name the concept tokens: ClassificationNet{m}")
    g.add_argument("--label", type=nonneg_int, nargs="+", default=None,
                   help="label(s) to draw (default: every label with a TIS statistics file)")
    g.add_argument("--top_n", type=position_int, default=20, help="statistics section 'Top n Tokens' (default: %(default)s)")
    g.add_argument("--k", type=positive_int, default=8, help="concept tokens per label: the section's first k rows "
                                                     "(default: %(default)s)")
    g.add_argument("--patches", type=positive_int, default=6,
                   help="patches cut from the dataset's images per token (default: %(default)s)")
    g.add_argument("--context", type=nonneg_int, default=0,
                   help="tokens of surrounding image shown around each patch, the token boxed in red (default: "
                        "%(default)s: the token's own patch only)")
    g.add_argument("--split", default="train", choices=("train", "validation", "test"),
                   help="images the patches are cut from (default: %(default)s, the split the statistics count)")
    g.add_argument("--attribution", default=PAPER_ATTRIBUTION, choices=sorted(ATTRIBUTIONS),
                   help="which TIS statistics (default: %(default)s, the paper's)")
    g.add_argument("--tokenizer", default="auto", choices=("auto", *tokenizer_kinds()),
                   help="tokenizer that decodes the tokens (default: the dataset's, from dataset_info.json)")
    g.add_argument("--tokenizer_config", default=None,
                   help="taming: the VQGAN YAML; diffusers: the VQModel.save_pretrained folder; synthetic: "
                        "synthetic_vq.pt (default: as recorded in dataset_info.json)")
    g.add_argument("--vqgan_ckpt", default=None, help="taming: the VQGAN checkpoint")
    return p


def main(args):
    from cortex.report.gallery import build_gallery, draw_gallery
    from cortex.report.plots import class_name, class_names_of
    from cortex.paths import label_files

    paths = ExperimentPaths.from_args(args, EXPERIMENT)
    stats_dir = paths.stats_dir(args.model, args.attribution)
    available = label_files(stats_dir)
    labels = args.label if args.label is not None else list(available)
    if not labels:
        raise CortexError(f"no TIS statistics in {stats_dir}; run TIS_analysis.py --model {args.model} first")
    verify(paths, args.model, statistics=True, attribution=args.attribution)  # dataset -> IEM -> TIS -> statistics
    tok = tokenizer_for_dataset(paths.data_dir, args.tokenizer, args.tokenizer_config, args.vqgan_ckpt,
                                get_device(args.device, args.gpu))
    print(f"tokenizer: {tok}")
    out = {}
    names = class_names_of(paths.data_dir)
    for label in labels:
        cards = build_gallery(paths.data_dir, tok, paths.stats_file(args.model, label, args.attribution), label,
                              args.top_n, args.k, args.patches, args.split, args.context)
        path = paths.token_gallery_file(args.model, label, args.top_n, args.attribution)
        title = f"Net{args.model}, label {class_name(label, names)}: {len(cards)} concept tokens (top {args.top_n})"
        out[label] = draw_gallery(cards, path, title)
        print(f"label {label}: {len(cards)} tokens -> {out[label]}")
    save_run_args(args, paths.figures_dir(args.model), "token_gallery_args.json", quiet=True)
    return out


if __name__ == "__main__":
    run_main(main, get_args_parser)
