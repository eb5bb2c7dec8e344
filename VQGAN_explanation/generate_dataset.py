"""Build a dataset of token ids, token-based embeddings, labels and decoded images (SPEC §3).

    python generate_dataset.py --source synthetic                        # the embedded toy world (default)
    python generate_dataset.py --source synthetic --concept_layout scattered
    python generate_dataset.py --source cin_transformer --vqgan_config ... --transformer_ckpt ...
    python generate_dataset.py --source images --image_dir my_images/ --vqgan_config ... --vqgan_ckpt ...

Writes datasets/{train,validation,test}_embeddings.csv, datasets/{train,val,test}/*.npy (or only
datasets/codebook.npy with --layout compact), datasets/images/<label>/<i>.png, the token-index pickles,
dataset_info.json and, for the synthetic world, ground_truth.json and synthetic_vq.pt (its decoder).
A finished dataset with the same arguments is left alone; an interrupted one is resumed.
"""
import argparse
import json
import shutil

from cortex.cli import paths_parser, runtime_parser
from cortex.data import DatasetWriter
from cortex.paths import ExperimentPaths
from cortex.synthetic import SyntheticWorld, WorldConfig, save_vq, write_json, write_world
from cortex.utils import save_run_args

EXPERIMENT = "vqgan"
# Flags that do not change the data (a finished dataset made with other values is still complete).
NOT_DATA = {"root", "data_dir", "checkpoint_dir", "results_dir", "log_dir", "device", "gpu", "num_workers",
            "overwrite", "_argv"}


def synthetic_parser():
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("synthetic world (--source synthetic)")
    g.add_argument("--num_classes", type=int, default=10, help="number of classes")
    g.add_argument("--train_per_class", type=int, default=60, help="training images per class")
    g.add_argument("--val_per_class", type=int, default=10, help="validation images per class")
    g.add_argument("--test_per_class", type=int, default=20, help="test images per class")
    g.add_argument("--n_codes", type=int, default=512, help="codebook size (the paper's VQGAN: 16384)")
    g.add_argument("--concept_tokens", type=int, default=8, help="planted concept tokens per class")
    g.add_argument("--n_background", type=int, default=48, help="background tokens shared by all classes")
    g.add_argument("--n_distractors", type=int, default=16, help="distractor tokens (any class, any place)")
    g.add_argument("--distractors_per_image", type=int, default=6, help="distractor positions per image")
    g.add_argument("--object_size", type=int, nargs=2, default=(4, 6), metavar=("MIN", "MAX"),
                   help="side of the square concept object, in tokens")
    g.add_argument("--concept_layout", choices=("object", "scattered"), default="object",
                   help="concept tokens as one object, or at random positions")
    g.add_argument("--patch_size", type=int, default=4, help="pixels per token side (image = 16 x patch_size)")
    return p


def get_args_parser():
    from cortex.real_data import add_real_source_args

    p = argparse.ArgumentParser("Generate a token-embedding dataset (VQGAN)",
                                parents=[synthetic_parser(), paths_parser(), runtime_parser()],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--source", choices=("synthetic", "cin_transformer", "images"), default="synthetic",
                   help="the toy world, class-conditional sampling with a taming cin_transformer, "
                        "or encoding an image folder with a taming VQGAN")
    p.add_argument("--layout", choices=("files", "compact", "both"), default="files",
                   help="per-image .npy embeddings (the authors'), codebook.npy only, or both")
    p.add_argument("--overwrite", action="store_true", help="delete the dataset folder first")
    add_real_source_args(p)
    return p


def data_args(args) -> dict:
    return {k: v for k, v in sorted(vars(args).items()) if k not in NOT_DATA}


def main(args):
    paths = ExperimentPaths.from_args(args, EXPERIMENT)
    data_dir = paths.data_dir
    if args.overwrite and data_dir.exists():
        shutil.rmtree(data_dir)
    stamp = data_dir / "generation_args.json"
    if stamp.exists() and (data_dir / "test_embeddings.csv").exists():
        if json.loads(stamp.read_text()) == json.loads(json.dumps(data_args(args), default=str)):
            print(f"{data_dir} is complete for these arguments; nothing to do (--overwrite to rebuild)")
            return data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    save_run_args(args, data_dir, "args.json")

    if args.source == "synthetic":
        info = generate_synthetic(args, data_dir)
    else:
        from cortex.real_data import generate_real
        from cortex.utils import get_device

        info = generate_real(args, data_dir, get_device(args.device, args.gpu))
    write_json(stamp, data_args(args))
    print(f"wrote {data_dir}: " + ", ".join(f"{k}={v}" for k, v in info.items() if not isinstance(v, (dict, list))))
    return data_dir


def generate_synthetic(args, data_dir) -> dict:
    cfg = WorldConfig(num_classes=args.num_classes, n_codes=args.n_codes, concept_tokens=args.concept_tokens,
                      n_background=args.n_background, n_distractors=args.n_distractors,
                      distractors_per_image=args.distractors_per_image, object_size=tuple(args.object_size),
                      concept_layout=args.concept_layout, patch_size=args.patch_size, seed=args.seed)
    world = SyntheticWorld.build(cfg)
    vq = world.make_vq()
    writer = DatasetWriter(data_dir, vq.codebook.detach().numpy(), layout=args.layout)
    counts = {"train": args.train_per_class, "validation": args.val_per_class, "test": args.test_per_class}
    write_world(data_dir, writer, world, vq, counts, args.seed)
    info = {"source": "synthetic", "num_classes": cfg.num_classes, "n_codes": cfg.n_codes,
            "image_size": vq.image_size, "layout": args.layout, "concept_layout": cfg.concept_layout}
    writer.close(info)
    save_vq(vq, data_dir / "synthetic_vq.pt")
    write_json(data_dir / "ground_truth.json", world.ground_truth())
    return info


if __name__ == "__main__":
    main(get_args_parser().parse_args())
