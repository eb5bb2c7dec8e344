"""Codebook-level explanation (SPEC §5): optimise a region's tokens so that the IEM sees the target label.

    cd VQGAN_explanation/eval
    python codebook_level_explanation.py --model 1 --steps 5000 --lr 0.01 --optimization_type token
    python codebook_level_explanation.py --model 1 --optimization_type embedding
    # the synthetic world (10 classes): pairs as flags, fewer steps
    python codebook_level_explanation.py --model 1 --pairs 0:5,1:6,2:7,3:8,4:9 --steps 300 --lr 0.1 \\
        --eval_every 100 --evaluators synthetic

Test images of labels 10..20 except 15 (--labels), target label 30 - label (--target_sum; or explicit
--pairs source:target,...); when the dataset lacks those labels and none of these flags is given, the same
mirror rule on the labels present (sorted labels L: L[i] -> L[K-1-i], the middle one dropped), said on the
console. Only the token rows 7..10 x cols 7..10 (--rows/--cols, inclusive) change (on another dataset's grid
(dataset_info.json grid_size): its central quarter, e.g. 4..5 at 8x8, 13..20 at 32x32).
Token mode: logits (region positions x n_codes), random init, one hard straight-through Gumbel-softmax
sample (temperature --tau) per step, embedding = one_hot @ codebook, loss = -IEM target logit, Adam; the
positions outside the region keep their ids. Embedding mode: Adam on the embedding, gradient masked to the
region. As the authors: at steps 0, 500, 1000, ... (--eval_every) and the last step (0-based) the image is
decoded -- in token mode that step's Gumbel sample, in embedding mode the updated embedding snapped to its
nearest codes -- converted to uint8 (truncated), and scored by the evaluators (ImageNet ones after PIL
Resize 224); per image and evaluator the checkpoint with the highest target prob (the first one on ties,
step 0 included) gives the final_* values; initial_* score the decoded original image.

The VQ decoder: the synthetic world's (datasets/synthetic_vq.pt) when present, else the taming VQGAN in
VQGAN_directory below (or --vqgan_config / --vqgan_ckpt).

Writes results/Explanation/model_{m}/
  codebook_level_results_{type}_{steps}_{lr}.csv   model,initial_original_logit,initial_target_logit,
        initial_original_prob,initial_target_prob,final_original_logit,final_target_logit,final_original_prob,
        final_target_prob   (one row per evaluator, means over images; original = the image's label)
  codebook_level_{type}_{steps}_{lr}/per_image.csv, optimized_tokens.csv (original and optimised ids),
        images/<image>_to<target>_{before,after}.png  (after = the last step)
  figures/codebook_level_{type}_{steps}_{lr}.png
"""
import argparse
from pathlib import Path

import numpy as np
import torch

# Edit this to where the taming VQGAN lives (relative to this eval/ folder, or absolute); it holds
# configs/model.yaml and checkpoints/last.ckpt as downloaded (see docs/real_vqgan_data.md).
VQGAN_directory = "../checkpoints/taming/vqgan_imagenet_f16_16384"

from cortex.cli import (add_vqgan_args, make_parser, model_parser, nonneg_int, paths_parser, positive_float,
                        positive_int, run_main, runtime_parser)  # noqa: E402
from cortex.evaluation.evaluators import evaluator_parser  # noqa: E402
from cortex.evaluation.codebook_level import (PAPER_LABELS, SCORE_KEYS, best_rows, codebook_pairs, default_region,
                                              optimize_embedding, optimize_tokens, region_positions, score_trace)
from cortex.evaluation.explain import CODEBOOK_COLUMNS, check_eval_dataset, eval_setup, warn_if_near_chance, write_rows
from cortex.data.tokenizers import load_tokenizer, tokenizer_kinds  # noqa: E402
from cortex.iem.registry import model_choices  # noqa: E402
from cortex.paths import ExperimentPaths  # noqa: E402
from cortex.utils import CortexError, atomic_write, format_list, save_run_args  # noqa: E402

EXPERIMENT = "vqgan"
PER_IMAGE_COLUMNS = ["filename", "label", "target", "evaluator", "best_step", "initial_target_prob",
                     "final_target_prob", "initial_original_prob", "final_original_prob", "iem_initial_target_logit",
                     "iem_final_target_logit"]


def get_args_parser():
    p = make_parser("codebook_level_explanation", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter,
                    parents=[model_parser(model_choices("vqgan")), paths_parser(__file__, up=1),
                                         runtime_parser(), evaluator_parser()])
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimization_type", choices=("token", "embedding"), default="token",
                   help="optimise token choices (Gumbel-softmax) or the embedding itself (default: %(default)s)")
    g.add_argument("--steps", type=positive_int, default=5000, help="optimisation steps (default: %(default)s)")
    g.add_argument("--lr", type=positive_float, default=0.01, help="Adam learning rate (default: %(default)s)")
    g.add_argument("--eval_every", type=positive_int, default=500,
                   help="decode and score every N steps, and at the end (default: %(default)s)")
    g.add_argument("--tau", type=positive_float, default=1.0, help="Gumbel-softmax temperature (default: %(default)s)")
    g.add_argument("--batch_size", type=positive_int, default=16,
                   help="images optimised together (independent parameters; default: %(default)s)")
    g = p.add_argument_group("which images, which region")
    g.add_argument("--labels", type=nonneg_int, nargs="+", default=None,
                   help=f"source labels (default: the paper's {PAPER_LABELS[0]}..{PAPER_LABELS[-1]} except 15, or "
                        f"the labels present when the dataset lacks those)")
    g.add_argument("--target_sum", type=nonneg_int, default=None,
                   help="target label = TARGET_SUM - source label (default: the paper's 30)")
    g.add_argument("--pairs", default=None,
                   help="explicit source:target pairs, e.g. 0:5,1:6 (overrides --labels/--target_sum)")
    g.add_argument("--images_per_label", type=positive_int, default=None, help="first N test images of each source label")
    g.add_argument("--rows", type=nonneg_int, nargs=2, default=None, metavar=("FIRST", "LAST"),
                   help="token rows of the region, inclusive (default: 7 10 on the 16x16 grid; the central quarter "
                        "of another dataset's grid, e.g. 4 5 at 8x8, 13 20 at 32x32)")
    g.add_argument("--cols", type=nonneg_int, nargs=2, default=None, metavar=("FIRST", "LAST"),
                   help="token cols of the region, inclusive (default: as --rows)")
    g = p.add_argument_group("VQ decoder")
    g.add_argument("--vq", choices=("auto", *tokenizer_kinds()), default="auto",
                   help="decoder: synthetic (datasets/synthetic_vq.pt), taming (--vqgan_config/--vqgan_ckpt, default "
                        "VQGAN_directory), diffusers (a VQModel save_pretrained folder, --tokenizer_config), another "
                        "registered tokenizer (--tokenizer_config), or auto: synthetic when that file exists and no "
                        "--vqgan_* flag is given")
    g.add_argument("--tokenizer_config", default=None,
                   help="--vq diffusers (or another registered kind): the VQModel.save_pretrained folder (the "
                        "tokenizer's files) the dataset was encoded with")
    add_vqgan_args(g, "taming VQGAN YAML (default: <VQGAN_directory>/configs/model.yaml)",
                   "taming VQGAN checkpoint (default: <VQGAN_directory>/checkpoints/last.ckpt)")
    p.add_argument("--no_figures", action="store_true", help="write the CSVs and images only")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bars")
    return p


def load_vq(args, paths, device):
    """The tokenizer whose decoder renders the optimised tokens, from the tokenizer registry
    (``cortex.data.tokenizers``): ``--vq auto`` is the synthetic world's when ``datasets/synthetic_vq.pt`` exists
    and no ``--vqgan_*`` flag is given, else the taming VQGAN."""
    synthetic = Path(paths.data_dir) / "synthetic_vq.pt"
    kind = args.vq
    if kind == "auto":
        kind = "taming" if (args.vqgan_config or args.vqgan_ckpt or not synthetic.exists()) else "synthetic"
    config, ckpt = args.tokenizer_config, args.vqgan_ckpt
    if kind == "synthetic":
        config = synthetic
    elif kind == "taming":
        config = args.vqgan_config or str(Path(VQGAN_directory) / "configs" / "model.yaml")
        ckpt = args.vqgan_ckpt or str(Path(VQGAN_directory) / "checkpoints" / "last.ckpt")
        for what, f in (("VQGAN config", config), ("VQGAN checkpoint", ckpt)):
            if not Path(f).is_file():
                raise CortexError(f"{what} not found: {f}. Edit VQGAN_directory at the top of "
                                  f"codebook_level_explanation.py or pass --vqgan_config/--vqgan_ckpt (see "
                                  f"docs/real_vqgan_data.md); on the synthetic world generate datasets/synthetic_vq.pt "
                                  f"with generate_dataset.py")
    print(f"VQ decoder: {kind} {config}" + (f" + {ckpt}" if kind == "taming" else ""))
    return load_tokenizer(kind, config, ckpt, device)


def select_images(records, pairs, per_label):
    """Test images of each pair's source label (CSV order), the pairs ordered by their source label's first
    row in the test CSV (the authors' order). Returns (records, targets)."""
    first = {}
    for i, r in enumerate(records):
        first.setdefault(r.label, i)
    chosen, targets = [], []
    for src, tgt in sorted(pairs, key=lambda st: first.get(st[0], len(records))):
        recs = [r for r in records if r.label == src][:per_label]
        if not recs:
            raise CortexError(f"label {src} has no test images; choose other labels with --labels or --pairs "
                              f"(e.g. on a 10-class world: --pairs 0:5,1:6)")
        chosen += recs
        targets += [tgt] * len(recs)
    return chosen, targets


def main(args):
    from cortex.data.formats import dataset_geometry
    from cortex.iem.checkpoints import load_iem
    from cortex.provenance import verify, write_output_record

    # inputs first (dataset, IEM, VQ decoder), evaluators (maybe a download) last
    paths = ExperimentPaths.from_args(args, EXPERIMENT)
    *grid, code_dim = dataset_geometry(paths.data_dir)  # the token grid (h, w) and code dim (16, 16, 256 by default)
    grid = tuple(grid)
    rows, cols = default_region(grid)
    args.rows, args.cols = tuple(args.rows or rows), tuple(args.cols or cols)
    region = region_positions(args.rows, args.cols, grid)
    test = check_eval_dataset(paths, "test", images=False)
    used = verify(paths, args.model, split="test")  # the IEM was trained on this dataset (cortex.provenance)
    from cortex.utils import get_device

    device = get_device(args.device, args.gpu)
    iem = load_iem(paths.best_ckpt(args.model), EXPERIMENT, args.model, num_classes=args.num_classes,
                   width=args.width, depth=args.depth, map_location=device)
    for p_ in iem.parameters():
        p_.requires_grad_(False)
    iem_classes = [m for m in iem.modules() if isinstance(m, torch.nn.Linear)][-1].out_features
    pairs, note = codebook_pairs({r.label for r in test}, iem_classes, args.labels, args.target_sum, args.pairs)
    if note:
        print(note)
    tok = load_vq(args, paths, device)
    codebook = tok.codebook
    vq = getattr(tok, "model", tok)  # the adapter's model (score_trace decodes taming / synthetic ids through it)
    if codebook.shape[1] != code_dim:
        raise CortexError(f"the VQ codebook has dimension {codebook.shape[1]}; the dataset {paths.data_dir} (and its "
                          f"IEM) has {code_dim}-d codes: pass the VQ model that made it (--vq, --tokenizer_config)")
    records, targets = select_images(test, pairs, args.images_per_label)
    if max(int(r.ids.max()) for r in records) >= codebook.shape[0]:
        raise CortexError(f"token ids of {paths.data_dir} exceed the VQ codebook ({codebook.shape[0]} codes): "
                          f"is this the VQ model that made the dataset?")
    paths, device, evaluators = eval_setup(args, EXPERIMENT, device=device)
    warn_if_near_chance(paths, args.model)
    n_classes = min([iem_classes] + [e.num_classes for e in evaluators])
    bad = [(s, t) for s, t in pairs if not (0 <= s < n_classes and 0 <= t < n_classes)]
    if bad:
        raise CortexError(f"label pairs {bad} are outside 0..{n_classes - 1} (IEM and evaluators have {n_classes} "
                          f"classes); pass --labels/--target_sum or --pairs, e.g. --pairs 0:5,1:6")

    tag = f"{args.optimization_type}_{args.steps}_{args.lr}"
    out_dir = paths.explanation_dir(args.model)
    run_dir = out_dir / f"codebook_level_{tag}"
    (run_dir / "images").mkdir(parents=True, exist_ok=True)
    save_run_args(args, run_dir, "args.json")
    print(f"{len(records)} images, pairs {pairs}, region rows {args.rows[0]}..{args.rows[1]} x cols "
          f"{args.cols[0]}..{args.cols[1]} ({len(region)} positions), {args.optimization_type} mode, "
          f"{args.steps} steps, lr {args.lr}")

    all_scores, traces, firsts, lasts = [], [], [], []
    for s in range(0, len(records), args.batch_size):
        recs, tg = records[s:s + args.batch_size], targets[s:s + args.batch_size]
        ids = torch.from_numpy(np.stack([r.ids for r in recs]))
        tgt = torch.tensor(tg)
        if args.optimization_type == "token":
            trace = optimize_tokens(iem, codebook, ids, tgt, region, args.steps, args.lr, args.eval_every,
                                    seed=args.seed + s, tau=args.tau, progress=not args.no_progress, grid=grid)
        else:
            trace = optimize_embedding(iem, codebook, ids, tgt, region, args.steps, args.lr, args.eval_every,
                                       progress=not args.no_progress, grid=grid)
        scores, first, last = score_trace(evaluators, vq, trace, [r.label for r in recs], tg, args.eval_batch_size)
        all_scores.append(scores)
        traces.append(trace)
        firsts.append(first)
        lasts.append(last)
        print(f"images {s + 1}..{s + len(recs)}: IEM target logit {trace.initial_iem_target_logit.mean():.2f} -> "
              f"{trace.iem_target_logit[-1].mean():.2f}")

    # merge batches: scores[name][key] (T, B) -> (T, N), scores[name]["initial"][key] (B,) -> (N,)
    scores = {n: {k: np.concatenate([sc[n][k] for sc in all_scores], axis=1) for k in SCORE_KEYS}
              for n in all_scores[0]}
    for n in scores:
        scores[n]["initial"] = {k: np.concatenate([sc[n]["initial"][k] for sc in all_scores]) for k in SCORE_KEYS}
    rows, best = best_rows(scores)
    out = write_rows(out_dir / f"codebook_level_results_{tag}.csv", CODEBOOK_COLUMNS, rows)
    write_output_record(out, used)
    steps = traces[0].steps
    iem0 = np.concatenate([t.initial_iem_target_logit for t in traces])
    iem1 = np.concatenate([t.iem_target_logit[-1] for t in traces])
    per_image = []
    for name, s in scores.items():
        for i, r in enumerate(records):
            b = best[name][i]
            pick = (lambda k: s[k][b, i]) if b >= 0 else (lambda k: 0.0)  # noqa: E731 - none beat 0: zeros
            per_image.append(dict(filename=r.filename, label=r.label, target=targets[i], evaluator=name,
                                  best_step=steps[b] if b >= 0 else "", initial_target_prob=s["initial"]["tgt_prob"][i],
                                  final_target_prob=pick("tgt_prob"), initial_original_prob=s["initial"]["orig_prob"][i],
                                  final_original_prob=pick("orig_prob"), iem_initial_target_logit=iem0[i],
                                  iem_final_target_logit=iem1[i]))
    write_rows(run_dir / "per_image.csv", PER_IMAGE_COLUMNS, per_image)
    final_ids = torch.cat([t.ids[-1] for t in traces]).numpy()
    import csv

    with atomic_write(run_dir / "optimized_tokens.csv") as f:
        w = csv.writer(f)
        w.writerow(["filename", "label", "target", "changed_positions", "original_indices", "optimized_indices"])
        for i, r in enumerate(records):
            w.writerow([r.filename, r.label, targets[i], int((final_ids[i] != r.ids).sum()), format_list(r.ids),
                        format_list(final_ids[i])])
    before = np.ascontiguousarray(torch.cat(firsts).permute(0, 2, 3, 1).numpy())  # (N, H, W, 3) uint8
    after = np.ascontiguousarray(torch.cat(lasts).permute(0, 2, 3, 1).numpy())
    _save_pngs(run_dir / "images", records, targets, before, after)

    print(f"wrote {out}")
    print(f"{'evaluator':<16} {'target prob before':>18} {'after (best)':>13} {'label prob before':>18} {'after':>7}")
    for r in rows:
        print(f"{r['model']:<16} {r['initial_target_prob']:18.3f} {r['final_target_prob']:13.3f} "
              f"{r['initial_original_prob']:18.3f} {r['final_original_prob']:7.3f}")
    changed = (final_ids != np.stack([r.ids for r in records])).sum(1)
    print(f"IEM target logit (discrete tokens): {iem0.mean():.2f} -> {iem1.mean():.2f}; region positions whose token "
          f"changed: {changed.mean():.1f} of {len(region)} per image")
    if changed.max() == 0:
        print("note: no token changed: the optimised embedding still snaps to the original codes; use more --steps "
              "or a larger --lr")
    if not args.no_figures:
        from cortex.report import plots

        pick = _figure_picks(records, targets, 8)
        p0 = np.mean([scores[n]["initial"]["tgt_prob"] for n in scores], axis=0)
        p1 = np.mean([scores[n]["tgt_prob"][-1, :] for n in scores], axis=0)
        names = plots.class_names_of(paths.data_dir)
        titles = [f"{plots.class_name(records[i].label, names)} -> {plots.class_name(targets[i], names)}\n"
                  f"p(target) {p0[i]:.2f} -> {p1[i]:.2f}" for i in pick]
        fig = plots.before_after([before[i] for i in pick], [after[i] for i in pick], titles,
                                 paths.figures_dir(args.model) / f"codebook_level_{tag}.png",
                                 region=(args.rows[0], args.rows[1], args.cols[0], args.cols[1]), grid=grid,
                                 title=f"Codebook level, {args.optimization_type}, {args.steps} steps, lr {args.lr}")
        print(f"figure: {fig}")
    return out


def _figure_picks(records, targets, k):
    """Up to k images, spread over the pairs."""
    by = {}
    for i, (r, t) in enumerate(zip(records, targets)):
        by.setdefault((r.label, t), []).append(i)
    picks, j = [], 0
    while len(picks) < k and any(j < len(v) for v in by.values()):
        picks += [v[j] for v in by.values() if j < len(v)][: k - len(picks)]
        j += 1
    return picks


def _save_pngs(folder, records, targets, before, after):
    from PIL import Image

    for i, r in enumerate(records):
        stem = f"{Path(r.filename).stem}_to{targets[i]}"
        for tag, arr in (("before", before[i]), ("after", after[i])):
            with atomic_write(folder / f"{stem}_{tag}.png", "wb") as f:
                Image.fromarray(arr).save(f, format="PNG")


if __name__ == "__main__":
    run_main(main, get_args_parser)
