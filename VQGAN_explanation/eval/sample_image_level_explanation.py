"""Sample-level explanation evaluation (SPEC §5): mask the tokens at an image's top-n TIS positions.

    cd VQGAN_explanation/eval
    python sample_image_level_explanation.py --model 1                          # ImageNet evaluators
    python sample_image_level_explanation.py --model 1 --evaluators synthetic   # the synthetic world's

For each test image (its TIS row read once, from results/TIS/Net{m}/TIS_value_test/label_{k}.csv) and
n = 5, 10, ..., 50: every position whose token id is among the ids at the image's top-n TIS positions is
blacked out in the decoded image (datasets/images/<a>/<b>.png), and, as control, every position whose id
is among the ids at n random positions, drawn as the authors draw them: one random.sample(range(256), n)
per image and n from a single stream seeded 42 (--random_seed), images in the order labels ascending /
test CSV order. Each evaluator scores the masked variants (in batches) on the image's label; ImageNet
evaluators see the authors' PIL Resize((224, 224)) of the uint8 image.

Inputs are checked before anything is loaded: the dataset's test split and images, and a TIS file for
every label of the split with one row per image, from one TIS_computation.py run (tis_config.json).
Anything missing is an error naming it; --allow_partial evaluates the complete labels only, saying what
it skips.

Writes results/Explanation/model_{m}/
  sample_image_level_results.csv   Model,Num_Masked_Tokens,Method,Avg_Logits,Avg_Probs,Logits_Diff,Probs_Diff
                                   (Method original [n = 0] / target [top-n TIS] / random; as the authors:
                                   diffs = mean(masked) - mean(unmasked), negative when masking hurts; full
                                   float precision)
  sample_image_level_per_image.csv one row per image, evaluator, method and n (with the masked-position count)
  figures/sample_level_deletion_curves.png, figures/sample_level_tis_grid.png
"""
import argparse

from cortex.attribution.attributions import ATTRIBUTIONS
from cortex.attribution.store import check_tis_inputs, read_tis_file
from cortex.cli import (label_subset_parser, make_parser, nonneg_int, paths_parser, position_int, run_main,
                        runtime_parser, seed_int)
from cortex.evaluation.evaluators import evaluator_parser
from cortex.evaluation.explain import (DEFAULT_NS, PER_IMAGE_COLUMNS, SAMPLE_COLUMNS, check_eval_dataset, eval_setup,
                                       evaluated_labels, load_images, records_by_label, warn_if_near_chance,
                                       write_rows)
from cortex.evaluation.masking import AUTHORS_RANDOM_SEED, authors_random_draws, check_ns
from cortex.evaluation.sample_level import sample_level
from cortex.data.list_csv import split_label_counts
from cortex.paths import attribution_suffix
from cortex.iem.registry import model_choices
from cortex.provenance import verify, write_output_record
from cortex.utils import CortexError, save_run_args

EXPERIMENT = "vqgan"


def get_args_parser():
    p = make_parser("sample_image_level_explanation", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter,
                    parents=[paths_parser(__file__, up=1), runtime_parser(), evaluator_parser(),
                             label_subset_parser("evaluate the labels whose TIS are complete even if others are "
                                                 "missing or partial (prints what is skipped); default: refuse")])
    p.add_argument("--model", type=int, choices=model_choices("vqgan"), required=True, help="IEM whose TIS are evaluated")
    p.add_argument("--num_tokens", type=position_int, nargs="+", default=list(DEFAULT_NS),
                   help="numbers n of top TIS / random positions (default: 5 10 ... 50)")
    p.add_argument("--data_type", default="test", choices=("test", "train"),
                   help="split whose TIS and images are used (default: %(default)s)")
    p.add_argument("--attribution", choices=sorted(ATTRIBUTIONS), default="smoothgrad",
                   help="whose TIS (default: the paper's %(default)s)")
    p.add_argument("--random_seed", type=seed_int, default=AUTHORS_RANDOM_SEED,
                   help="seed of the random control's random.sample stream (default: the authors' %(default)s)")
    p.add_argument("--figure_images", type=nonneg_int, default=8, help="images in the TIS grid figure (default: %(default)s)")
    p.add_argument("--no_figures", action="store_true", help="write the CSVs only")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return p


def check_inputs(paths, args):
    """Dataset split and TIS run, checked before any evaluator is loaded.

    Returns ``(records, by_label, tis_files, used)``: the split's records, those per evaluated label (test CSV
    order), ``{label: TIS file}`` and the ids of the inputs (``cortex.provenance.verify``: the TIS run, the IEM
    and the dataset, each checked against the files on disk now).
    """
    records = check_eval_dataset(paths, args.data_type)
    used = verify(paths, args.model, tis_split=args.data_type, attribution=args.attribution)
    tis_dir = paths.tis_dir(args.model, args.data_type, args.attribution)
    hint = f" (TIS_computation.py --model {args.model} --data_type {args.data_type})"
    info = check_tis_inputs(tis_dir, split_label_counts(paths.data_dir, args.data_type), args.allow_partial,
                            hint=hint)
    by_label = evaluated_labels(records, args.labels, args.max_images_per_label, args.data_type, paths.data_dir)
    skipped = sorted(set(by_label) - set(info.files))
    if skipped:  # only with --allow_partial (else check_tis_inputs raised)
        print(f"warning: --allow_partial: labels {skipped} have no complete TIS file in {tis_dir}; skipped")
        by_label = {k: v for k, v in by_label.items() if k in info.files}
    if not by_label:
        raise CortexError(f"no label to evaluate: none has a complete TIS file in {tis_dir}{hint}")
    return records, by_label, info.files, used


def label_data(paths, args, by_label, tis_files):
    """Per label, lazily: (label, records, TIS scores (N, 256), images (N, 3, H, W) uint8), each read once.

    Images in the split CSV's order (the authors' order); each one's TIS row is looked up by filename.
    """
    for label, recs in by_label.items():
        path = tis_files[label]
        names, _, scores = read_tis_file(path)
        row = {n: i for i, n in reversed(list(enumerate(names)))}  # first row of a name, as the authors read
        missing = [r.filename for r in recs if r.filename not in row]
        if missing and not args.allow_partial:
            raise CortexError(f"{path}: no TIS row for {len(missing)} {args.data_type} images of label {label} "
                              f"(e.g. {missing[0]}); are these TIS from another dataset? Recompute them with "
                              f"TIS_computation.py --model {args.model} --data_type {args.data_type}, or pass "
                              f"--allow_partial to skip those images")
        if missing:
            print(f"warning: --allow_partial: {len(missing)} images of label {label} have no TIS row in {path}; "
                  f"skipped ({', '.join(missing[:5])})")
            recs = [r for r in recs if r.filename in row]
        if recs:
            yield label, recs, scores[[row[r.filename] for r in recs]], load_images(paths.data_dir, recs)


def main(args):
    from cortex.data.formats import dataset_geometry
    from cortex.paths import ExperimentPaths

    paths = ExperimentPaths.from_args(args, EXPERIMENT)
    h, w, _ = dataset_geometry(paths.data_dir)  # 16x16 unless dataset_info.json says otherwise
    ns = check_ns(args.num_tokens, h * w)
    records, by_label, tis_files, used = check_inputs(paths, args)
    paths, device, evaluators = eval_setup(args, EXPERIMENT)
    warn_if_near_chance(paths, args.model)
    out_dir = paths.explanation_dir(args.model)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = attribution_suffix(args.attribution)
    save_run_args(args, out_dir, f"sample_image_level_args{suffix}.json")
    # the random control: drawn over the whole split in the authors' order (labels ascending, CSV order)
    order = [r.filename for recs in records_by_label(records).values() for r in recs]
    draws = authors_random_draws(order, ns, seed=args.random_seed, n_pos=h * w)
    res = sample_level(evaluators, label_data(paths, args, by_label, tis_files), ns, random_draws=draws,
                       batch_size=args.eval_batch_size, n_examples=args.figure_images, progress=not args.no_progress,
                       grid=(h, w))
    out = write_rows(out_dir / f"sample_image_level_results{suffix}.csv", SAMPLE_COLUMNS, res.rows)
    write_rows(out_dir / f"sample_image_level_per_image{suffix}.csv", PER_IMAGE_COLUMNS, res.per_image())
    write_output_record(out, used)  # <out>.source.json: the TIS run, IEM and dataset it used
    print(f"wrote {out}")
    _print_summary(res.rows, ns)
    if not args.no_figures:
        from cortex.report.plots import class_names_of

        figures(res, paths.figures_dir(args.model), args, suffix, grid=(h, w), names=class_names_of(paths.data_dir))
    return out


def _print_summary(rows, ns):
    print(f"{'evaluator':<16} {'original':>8} " + " ".join(f"{'n=' + str(n):>11}" for n in ns))
    for model in dict.fromkeys(r["Model"] for r in rows):
        d = {(r["Method"], r["Num_Masked_Tokens"]): r["Avg_Probs"] for r in rows if r["Model"] == model}
        cells = " ".join(f"{d[('target', n)]:.2f}/{d[('random', n)]:.2f}".rjust(11) for n in ns)
        print(f"{model:<16} {d[('original', 0)]:8.2f} {cells}   (mean prob of the label: TIS-masked/random-masked)")


def figures(res, fig_dir, args, suffix="", grid=None, names=None):
    """The deletion curves (95% bands over images) and the TIS grid; names: the dataset's class names."""
    import pandas as pd

    from cortex.report import plots

    df = pd.DataFrame(res.rows)
    p1 = plots.deletion_curves(df, fig_dir / f"sample_level_deletion_curves{suffix}.png",
                               title=f"Deletion, Net{args.model} {args.attribution} TIS",
                               per_image=pd.DataFrame(res.per_image()))
    ex = res.examples
    mean = lambda e, j: sum(v[j] for v in e["probs"].values()) / len(e["probs"])  # noqa: E731
    p2 = plots.tis_grid([e["image"] for e in ex], [e["scores"] for e in ex],
                        [f"{e['filename']}, label {plots.class_name(e['label'], names)}" for e in ex],
                        fig_dir / f"sample_level_tis_grid{suffix}.png", top_n=ex[0]["top_n"] if ex else 10,
                        masked=[e["masked"] for e in ex],
                        masked_titles=[f"p(label) {mean(e, 0):.2f} -> {mean(e, 1):.2f}" for e in ex],
                        title=f"TIS of Net{args.model} ({args.attribution}), {args.data_type} images",
                        grid=grid)
    print(f"figures: {p1}, {p2}")
    return [p1, p2]


if __name__ == "__main__":
    run_main(main, get_args_parser)
