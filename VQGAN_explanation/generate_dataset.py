"""Build a dataset of token ids, token-based embeddings, labels and decoded images (SPEC §3).

    python generate_dataset.py --source synthetic                        # the embedded toy world (default)
    python generate_dataset.py --source synthetic --concept_layout scattered
    python generate_dataset.py --source cin_transformer --vqgan_config ... --transformer_ckpt ...
    python generate_dataset.py --source images --image_dir my_images/ --vqgan_config ... --vqgan_ckpt ...
    python generate_dataset.py --source images --image_dir my_images/ --tokenizer diffusers --tokenizer_config vqvae/

Writes datasets/{train,validation,test}_embeddings.csv, datasets/{train,val,test}/*.npy (or only
datasets/codebook.npy with --layout compact), datasets/images/<label>/<i>.png, the token-index pickles,
dataset_info.json and, for the synthetic world, ground_truth.json and synthetic_vq.pt (its decoder).
A finished dataset with the same arguments is left alone; an interrupted one is resumed. The dataset is built in
datasets.generating/ beside datasets/ and swapped in when complete, so a killed run leaves the old dataset intact.
A finished dataset made with other arguments (another --seed, --source images over a synthetic world) or not
made by this script (the authors' download, a merge) is only replaced with --overwrite: the IEMs and results
computed from it would no longer match it.
"""
import argparse
import json

from cortex.cli import int_in, make_parser, nonneg_int, paths_parser, positive_int, run_main, runtime_parser
from cortex.data.writer import DatasetWriter
from cortex.data.dataset_tools import holds_dataset, recover_staged, staged_dataset
from cortex.paths import ExperimentPaths
from cortex.data.synthetic import SyntheticWorld, WorldConfig, save_vq, write_json, write_world
from cortex.data.tokenizers import SyntheticTokenizer
from cortex.utils import CortexError, save_run_args, settings_line

EXPERIMENT = "vqgan"
# Flags that do not change the data (a finished dataset made with other values is still complete).
NOT_DATA = {"root", "data_dir", "checkpoint_dir", "results_dir", "log_dir", "device", "gpu", "num_workers",
            "overwrite", "_argv", "verbose", "debug", "quiet"}


def synthetic_parser():
    p = make_parser(add_help=False)
    g = p.add_argument_group("synthetic world (--source synthetic)")
    g.add_argument("--num_classes", type=int_in(2), default=10, help="number of classes")
    g.add_argument("--null_classes", type=nonneg_int, default=None,
                   help="extra labels num_classes .. num_classes+K-1 with NO planted concept (background and "
                        "distractors only), listed as null_labels in ground_truth.json: a null check of the "
                        "significance tests (concept_recovery.py reports their false discoveries). Default: none")
    g.add_argument("--hard_negatives", type=nonneg_int, default=None,
                   help="positions per image holding concept tokens of other classes (every label, null labels "
                        "too): the tokens a label-contrast test must tell apart. Default: none")
    g.add_argument("--train_per_class", type=positive_int, default=60, help="training images per class")
    g.add_argument("--val_per_class", type=positive_int, default=10, help="validation images per class")
    g.add_argument("--test_per_class", type=positive_int, default=20, help="test images per class")
    g.add_argument("--n_codes", type=positive_int, default=512, help="codebook size (the paper's VQGAN: 16384)")
    g.add_argument("--concept_tokens", type=positive_int, default=8, help="planted concept tokens per class")
    g.add_argument("--n_background", type=nonneg_int, default=48, help="background tokens shared by all classes")
    g.add_argument("--n_distractors", type=nonneg_int, default=16, help="distractor tokens (any class, any place)")
    g.add_argument("--distractors_per_image", type=nonneg_int, default=6, help="distractor positions per image")
    g.add_argument("--object_size", type=int_in(1, 16), nargs=2, default=(4, 6), metavar=("MIN", "MAX"),
                   help="side of the square concept object, in tokens")
    g.add_argument("--concept_layout", choices=("object", "scattered"), default="object",
                   help="concept tokens as one object, or at random positions")
    g.add_argument("--patch_size", type=positive_int, default=4, help="pixels per token side (image = 16 x patch_size)")
    return p


def get_args_parser():
    from cortex.data.real_data import add_real_source_args

    p = make_parser("Generate a token-embedding dataset (VQGAN)",
                    parents=[synthetic_parser(), paths_parser(__file__), runtime_parser()],
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--source", choices=("synthetic", "cin_transformer", "images"), default="synthetic",
                   help="the toy world, class-conditional sampling with a taming cin_transformer, "
                        "or encoding an image folder with a VQ tokenizer (--tokenizer taming|diffusers)")
    p.add_argument("--layout", choices=("files", "compact", "both"), default="files",
                   help="per-image .npy embeddings (the authors'), codebook.npy only, or both")
    p.add_argument("--overwrite", action="store_true",
                   help="rebuild even when complete, also over a dataset this script did not make; the old "
                        "dataset is replaced only when the new one is complete")
    add_real_source_args(p)
    return p


def data_args(args) -> dict:
    """The flags that define the data; unset (None) flags are left out, so adding a flag keeps old stamps valid."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in NOT_DATA and v is not None}


def main(args):
    paths = ExperimentPaths.from_args(args, EXPERIMENT)
    data_dir = paths.data_dir
    recover_staged(data_dir)
    stamp = data_dir / "generation_args.json"
    if not args.overwrite and stamp.exists() and (data_dir / "test_embeddings.csv").exists():
        old = {k: v for k, v in json.loads(stamp.read_text()).items() if v is not None}
        want = json.loads(json.dumps(data_args(args), default=str))
        if old == want:
            print(f"{data_dir} is complete for these arguments; nothing to do (--overwrite to rebuild)")
            return data_dir
        diff = ", ".join(f"--{k} {old.get(k)} -> {want.get(k)}" for k in sorted(set(old) | set(want))
                         if old.get(k) != want.get(k))
        raise CortexError(f"{data_dir} holds a finished dataset made with other settings ({diff}); the IEMs, TIS "
                          f"and results computed from it would no longer match it: pass --overwrite to replace it, "
                          f"or another --data_dir (--root)")
    if not args.overwrite and not stamp.exists() and holds_dataset(data_dir):
        raise CortexError(f"{data_dir} holds a dataset that generate_dataset.py did not make (no generation_args.json:"
                          f" the authors' download, a merge?); pass --overwrite to replace it, or another --data_dir")

    print(settings_line(vars(args), data_dir), flush=True)  # the run's settings; args.json travels with the data
    with staged_dataset(data_dir, data_args(args)) as build:  # swapped in when complete
        save_run_args(args, build, "args.json", quiet=True)
        if args.source == "synthetic":
            info = generate_synthetic(args, build)
        else:
            from cortex.data.real_data import generate_real
            from cortex.utils import get_device

            info = generate_real(args, build, get_device(args.device, args.gpu))
        write_json(build / "generation_args.json", data_args(args))
    print(f"wrote {data_dir}: " + ", ".join(f"{k}={v}" for k, v in info.items() if not isinstance(v, (dict, list))))
    return data_dir


def generate_synthetic(args, data_dir) -> dict:
    cfg = WorldConfig(num_classes=args.num_classes, n_codes=args.n_codes, concept_tokens=args.concept_tokens,
                      n_background=args.n_background, n_distractors=args.n_distractors,
                      distractors_per_image=args.distractors_per_image, object_size=tuple(args.object_size),
                      concept_layout=args.concept_layout, patch_size=args.patch_size, seed=args.seed,
                      null_classes=getattr(args, "null_classes", None) or 0,
                      hard_negatives=getattr(args, "hard_negatives", None) or 0)
    world = SyntheticWorld.build(cfg)
    vq = world.make_vq()
    writer = DatasetWriter(data_dir, vq.codebook.detach().numpy(), layout=args.layout)
    counts = {"train": args.train_per_class, "validation": args.val_per_class, "test": args.test_per_class}
    write_world(data_dir, writer, world, vq, counts, args.seed)
    info = {"source": "synthetic", "num_classes": cfg.total_classes, "n_codes": cfg.n_codes,
            "image_size": vq.image_size, "layout": args.layout, "concept_layout": cfg.concept_layout}
    info.update(SyntheticTokenizer(vq).info())  # tokenizer, code_dim, grid_size [h, w], patch_size, ...
    writer.close(info)
    save_vq(vq, data_dir / "synthetic_vq.pt")
    write_json(data_dir / "ground_truth.json", world.ground_truth())
    return info


if __name__ == "__main__":
    run_main(main, get_args_parser)
