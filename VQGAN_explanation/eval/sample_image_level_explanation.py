"""Sample-level explanation evaluation (SPEC §5): mask the tokens at an image's top-n TIS positions.

    cd VQGAN_explanation/eval
    python sample_image_level_explanation.py --model 1                          # ImageNet evaluators
    python sample_image_level_explanation.py --model 1 --evaluators synthetic   # the synthetic world's

For each test image (its TIS row read once, from results/TIS/Net{m}/TIS_value_test/label_{k}.csv) and
n = 5, 10, ..., 50: every position whose token id is among the ids at the image's top-n TIS positions is
blacked out in the decoded image (datasets/images/<a>/<b>.png), and, as control, every position whose id
is among the ids at n random positions (seeded per image by --seed and its filename). Each evaluator
scores the masked variants (in batches) on the image's label.

Writes results/Explanation/model_{m}/
  sample_image_level_results.csv   Model,Num_Masked_Tokens,Method,Avg_Logits,Avg_Probs,Logits_Diff,Probs_Diff
                                   (Method original [n = 0] / target [top-n TIS] / random; diffs = unmasked - masked)
  sample_image_level_per_image.csv one row per image, evaluator, method and n (with the masked-position count)
  figures/sample_level_deletion_curves.png, figures/sample_level_tis_grid.png
"""
import argparse

from cortex.attribution import ATTRIBUTIONS
from cortex.cli import paths_parser, runtime_parser
from cortex.data import read_split
from cortex.evaluators import evaluator_parser
from cortex.explain import (DEFAULT_NS, PER_IMAGE_COLUMNS, SAMPLE_COLUMNS, eval_setup, load_images, output_suffix,
                            sample_level, write_rows)
from cortex.masking import check_ns
from cortex.stats import label_files
from cortex.tis import read_tis_file
from cortex.utils import CortexError, save_run_args

EXPERIMENT = "vqgan"


def get_args_parser():
    p = argparse.ArgumentParser("sample_image_level_explanation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                parents=[paths_parser(root_default=".."), runtime_parser(), evaluator_parser()])
    p.add_argument("--model", type=int, choices=(1, 2, 3, 4), required=True, help="IEM whose TIS are evaluated")
    p.add_argument("--num_tokens", type=int, nargs="+", default=list(DEFAULT_NS),
                   help="numbers n of top TIS / random positions (default: 5 10 ... 50)")
    p.add_argument("--data_type", default="test", choices=("test", "train"),
                   help="split whose TIS and images are used (default: %(default)s)")
    p.add_argument("--attribution", choices=sorted(ATTRIBUTIONS), default="smoothgrad",
                   help="whose TIS (default: the paper's %(default)s)")
    p.add_argument("--labels", type=int, nargs="+", default=None, help="evaluate only these labels (default: all)")
    p.add_argument("--max_images_per_label", type=int, default=None, help="first N images of each label (default: all)")
    p.add_argument("--figure_images", type=int, default=8, help="images in the TIS grid figure (default: %(default)s)")
    p.add_argument("--no_figures", action="store_true", help="write the CSVs only")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return p


def label_data(paths, args):
    """Per label, lazily: (label, records, TIS scores (N, 256), images (N, 3, H, W) uint8), each read once."""
    tis_dir = paths.tis_dir(args.model, args.data_type, args.attribution)
    files = label_files(tis_dir)
    if not files:
        raise CortexError(f"no TIS files in {tis_dir}; run TIS_computation.py --model {args.model} "
                          f"--data_type {args.data_type} first")
    if args.labels is not None:
        missing = sorted(set(args.labels) - set(files))
        if missing:
            raise CortexError(f"--labels {missing}: no TIS file for them in {tis_dir}")
        files = {k: v for k, v in files.items() if k in set(args.labels)}
    records = {r.filename: r for r in read_split(paths.data_dir, args.data_type)}
    for label, path in files.items():
        names, _, scores = read_tis_file(path)
        if args.max_images_per_label is not None:
            names, scores = names[:args.max_images_per_label], scores[:args.max_images_per_label]
        unknown = [n for n in names if n not in records]
        if unknown:
            raise CortexError(f"{path}: image {unknown[0]} is not in the {args.data_type} split of {paths.data_dir}; "
                              f"are these TIS from another dataset?")
        recs = [records[n] for n in names]
        yield label, recs, scores, load_images(paths.data_dir, recs)


def main(args):
    ns = check_ns(args.num_tokens)
    paths, device, evaluators = eval_setup(args, EXPERIMENT)
    out_dir = paths.explanation_dir(args.model)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = output_suffix(args.attribution)
    save_run_args(args, out_dir, f"sample_image_level_args{suffix}.json")
    res = sample_level(evaluators, label_data(paths, args), ns, seed=args.seed, batch_size=args.eval_batch_size,
                       n_examples=args.figure_images, progress=not args.no_progress)
    out = write_rows(out_dir / f"sample_image_level_results{suffix}.csv", SAMPLE_COLUMNS, res.rows)
    write_rows(out_dir / f"sample_image_level_per_image{suffix}.csv", PER_IMAGE_COLUMNS, res.per_image())
    print(f"wrote {out}")
    _print_summary(res.rows, ns)
    if not args.no_figures:
        figures(res, paths.figures_dir(args.model), args, suffix)
    return out


def _print_summary(rows, ns):
    print(f"{'evaluator':<16} {'original':>8} " + " ".join(f"{'n=' + str(n):>11}" for n in ns))
    for model in dict.fromkeys(r["Model"] for r in rows):
        d = {(r["Method"], r["Num_Masked_Tokens"]): r["Avg_Probs"] for r in rows if r["Model"] == model}
        cells = " ".join(f"{d[('target', n)]:.2f}/{d[('random', n)]:.2f}".rjust(11) for n in ns)
        print(f"{model:<16} {d[('original', 0)]:8.2f} {cells}   (mean prob of the label: TIS-masked/random-masked)")


def figures(res, fig_dir, args, suffix=""):
    import pandas as pd

    from cortex import plots

    df = pd.DataFrame(res.rows)
    p1 = plots.deletion_curves(df, fig_dir / f"sample_level_deletion_curves{suffix}.png",
                               title=f"Sample level, IEM Net{args.model} TIS ({args.attribution}): deletion curves")
    ex = res.examples
    mean = lambda e, j: sum(v[j] for v in e["probs"].values()) / len(e["probs"])  # noqa: E731
    p2 = plots.tis_grid([e["image"] for e in ex], [e["scores"] for e in ex],
                        [f"{e['filename']} (label {e['label']})" for e in ex],
                        fig_dir / f"sample_level_tis_grid{suffix}.png", top_n=ex[0]["top_n"] if ex else 10,
                        masked=[e["masked"] for e in ex],
                        masked_titles=[f"p(label), mean of evaluators: {mean(e, 0):.2f} -> {mean(e, 1):.2f}" for e in ex],
                        title=f"TIS of IEM Net{args.model} ({args.attribution}) on {args.data_type} images")
    print(f"figures: {p1}, {p2}")
    return [p1, p2]


if __name__ == "__main__":
    main(get_args_parser().parse_args())
