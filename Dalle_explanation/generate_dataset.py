"""Build the bias datasets and the neutral-prompt set of the DALL-E-mini experiment (SPEC §6).

    cd Dalle_explanation
    python generate_dataset.py --source synthetic                          # both bias types + neutral set
    python generate_dataset.py --source synthetic --bias_type doctor_gender --gender_ratio 0.7
    python generate_dataset.py --source images --bias_type doctor_gender \
        --image_dir pictures/doctor_gender --neutral_image_dir pictures/doctor_none \
        --vqgan_config vqgan_imagenet_f16_16384/configs/model.yaml --vqgan_ckpt vqgan_imagenet_f16_16384/checkpoints/last.ckpt

Synthetic (the default, no download; see cortex/data/bias_world.py): one world for both bias types. Every image is a
"doctor" object (shared tokens) with a gender square (male/female tokens) and a skin-colour square (light/dark
tokens) on the shared background. ``doctor_gender`` labels images 0 male / 1 female (colour drawn 50/50),
``doctor_color`` 0 light / 1 dark (gender drawn 50/50). The neutral-prompt set is shared: each image has both
attributes; exactly round(--gender_ratio * N) images are male and round(--color_ratio * N) light-skinned (both
default to --bias_ratio 0.8). Changing only a ratio rewrites only the neutral set (and the ground truth).

Writes, per bias type, datasets/{bias_type}/embeddings/ ({train,validation,test}_embeddings.csv, train/ val/
test/ .npy files or codebook.npy only with --layout compact, images/, dataset_info.json, ground_truth.json,
synthetic_vq.pt), and datasets/doctor_original/information/results_none.csv (filename,indices,gender,color)
with neutral_info.json; the neutral pictures go to datasets/doctor_original/images/ (not with --no_images).

--source images encodes folders of generated pictures with a taming VQGAN (cortex.data.real_data): --image_dir with
one sub-folder per label (sorted names -> 0, 1), --neutral_image_dir for the neutral-prompt set.
"""
import argparse
import json
from pathlib import Path

from cortex.data.bias_world import ATTRIBUTES, BiasWorld, BiasWorldConfig, write_neutral_set
from cortex.cli import (BIAS_TYPES, float_in, fraction, int_in, make_parser, nonneg_float, nonneg_int,
                        paths_parser, positive_int, run_main, runtime_parser)
from cortex.data.writer import DatasetWriter
from cortex.data.dataset_tools import holds_dataset, recover_staged, staged_dataset
from cortex.paths import ExperimentPaths
from cortex.data.synthetic import save_vq, write_json, write_world
from cortex.utils import CortexError, save_run_args

EXPERIMENT = "dalle"


def synthetic_parser():
    p = make_parser(add_help=False)
    g = p.add_argument_group("synthetic bias world (--source synthetic)")
    g.add_argument("--train_per_class", type=positive_int, default=300, help="training images per label")
    g.add_argument("--val_per_class", type=positive_int, default=50, help="validation images per label")
    g.add_argument("--test_per_class", type=positive_int, default=100, help="test images per label")
    g.add_argument("--neutral_images", type=positive_int, default=500, help="images of the neutral-prompt set")
    g.add_argument("--bias_ratio", type=fraction, default=0.8,
                   help="fraction of neutral images carrying attribute 0 (male / light), for both attributes")
    g.add_argument("--gender_ratio", type=fraction, default=None, help="fraction of male neutral images (default: --bias_ratio)")
    g.add_argument("--color_ratio", type=fraction, default=None,
                   help="fraction of light-skinned neutral images (default: --bias_ratio)")
    g.add_argument("--n_codes", type=positive_int, default=1024, help="codebook size (DALL-E-mini's VQGAN: 16384)")
    g.add_argument("--attribute_tokens", type=positive_int, default=12, help="tokens of each attribute value")
    g.add_argument("--doctor_tokens", type=positive_int, default=64, help="tokens of the shared doctor object")
    g.add_argument("--n_background", type=nonneg_int, default=384, help="background tokens shared by all images")
    g.add_argument("--zipf", type=nonneg_float, default=0.3,
                   help="skew of the background token frequencies (the VQGAN world uses 1.1 over 48 tokens; a flat, large "
                        "pool keeps single background tokens from dominating the per-image counts)")
    g.add_argument("--n_distractors", type=nonneg_int, default=16, help="distractor tokens (any image, any place)")
    g.add_argument("--distractors_per_image", type=nonneg_int, default=6, help="distractor positions per image")
    g.add_argument("--doctor_size", type=int_in(1, 16), nargs=2, default=(4, 6), metavar=("MIN", "MAX"),
                   help="side of the doctor square, in tokens")
    g.add_argument("--attribute_size", type=int_in(1, 16), nargs=2, default=(3, 4), metavar=("MIN", "MAX"),
                   help="side of each attribute square, in tokens")
    g.add_argument("--attribute_dropout", type=fraction, default=BiasWorldConfig.attribute_dropout,
                   help="fraction of labelled images whose attribute square is not drawn (both labels alike), so an IEM "
                        "cannot read one label as 'the other attribute is absent' without a cost; caps the test accuracy "
                        "at 1 - dropout/2 (default: %(default)s; 0.2 makes the tiny IEMs memorise the coin-flip images "
                        "and their accuracy and bias verdicts vary with the seed and the CPU)")
    g.add_argument("--group_cosine", type=float_in(-1, 1), default=0.5,
                   help="cosine between two codes of one token group (doctor, male, ...): alike codes lie close, as in "
                        "a trained VQGAN; 0 = independent Gaussian codes")
    g.add_argument("--patch_size", type=positive_int, default=4, help="pixels per token side (image = 16 x patch_size)")
    return p


def get_args_parser():
    from cortex.data.real_data import add_real_source_args

    p = make_parser("Generate the bias datasets (DALL-E-mini)", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter,
                    parents=[synthetic_parser(), paths_parser(__file__), runtime_parser()])
    p.add_argument("--bias_type", choices=BIAS_TYPES + ("all",), default="all",
                   help="which dataset(s) to build (default: %(default)s; the neutral set is always built)")
    p.add_argument("--source", choices=("synthetic", "images"), default="synthetic",
                   help="the toy bias world, or encoding folders of generated pictures with a taming VQGAN")
    p.add_argument("--layout", choices=("files", "compact", "both"), default="files",
                   help="per-image .npy embeddings (the authors'), codebook.npy only, or both")
    p.add_argument("--overwrite", action="store_true",
                   help="rebuild the bias type's dataset (one with other settings, or complete); the old one is "
                        "replaced only when the new one is complete (a killed run resumes with the same command)")
    add_real_source_args(p)
    return p


def world_config(args) -> BiasWorldConfig:
    return BiasWorldConfig(n_codes=args.n_codes, attribute_tokens=args.attribute_tokens,
                           doctor_tokens=args.doctor_tokens, n_background=args.n_background,
                           n_distractors=args.n_distractors, distractors_per_image=args.distractors_per_image,
                           zipf=args.zipf, doctor_size=tuple(args.doctor_size),
                           attribute_size=tuple(args.attribute_size), attribute_dropout=args.attribute_dropout,
                           group_cosine=args.group_cosine,
                           patch_size=args.patch_size, seed=args.seed)


def _paths(args, bias_type) -> ExperimentPaths:
    single = args.bias_type != "all"
    return ExperimentPaths(experiment=EXPERIMENT, root=args.root, bias_type=bias_type,
                           data_dir=args.data_dir if single else None)


def _stamp(data_dir: Path) -> dict | None:
    p = data_dir / "generation_args.json"
    return json.loads(p.read_text()) if p.exists() else None


def main(args):
    bias_types = BIAS_TYPES if args.bias_type == "all" else (args.bias_type,)
    if args.data_dir and args.bias_type == "all":
        raise CortexError("--data_dir needs one --bias_type (doctor_gender or doctor_color), not all")
    root = Path(args.root)
    (root / "datasets").mkdir(parents=True, exist_ok=True)
    save_run_args(args, root / "datasets", "generate_dataset_args.json")
    if args.source == "images":
        return generate_images(args, bias_types)

    world = BiasWorld(world_config(args))
    vq = world.make_vq()
    key = world.config.key()
    for bt in bias_types:
        build_bias_dataset(args, _paths(args, bt), bt, world, vq, key)
    neutral = build_neutral_set(args, world, vq, key)
    refresh_ground_truth(args, world, key, neutral)
    return {"bias_types": list(bias_types), "neutral": neutral}


def build_bias_dataset(args, paths, bias_type, world, vq, key) -> Path:
    """One bias type's dataset, built in ``<data_dir>.generating`` and swapped in when complete (a kill leaves the
    old dataset intact; a rerun with the same flags resumes the staged one)."""
    data_dir = paths.data_dir
    recover_staged(data_dir)
    want = {"world": key, "bias_type": bias_type, "layout": args.layout, "train_per_class": args.train_per_class,
            "val_per_class": args.val_per_class, "test_per_class": args.test_per_class}
    old = None if args.overwrite else _stamp(data_dir)
    if old is not None:
        complete = old.pop("complete", False)
        if old != json.loads(json.dumps(want)):
            raise CortexError(f"{data_dir} was generated with other arguments ({data_dir / 'generation_args.json'}); "
                              f"pass --overwrite to rebuild it, or the same world flags to reuse it")
        if complete:
            print(f"{data_dir} is complete for these arguments; nothing to do (--overwrite to rebuild)")
            return data_dir
    with staged_dataset(data_dir, want) as build:
        write_json(build / "generation_args.json", {**want, "complete": False})
        writer = DatasetWriter(build, vq.codebook.detach().numpy(), layout=args.layout)
        counts = {"train": args.train_per_class, "validation": args.val_per_class, "test": args.test_per_class}
        seed = args.seed * 1009 + 101 * (BIAS_TYPES.index(bias_type) + 1)  # the two datasets draw different images
        write_world(build, writer, world.labelled_world(), vq, counts, seed, sampler=world.sampler(bias_type))
        attribute, names = ATTRIBUTES[bias_type]
        info = {"source": "synthetic_bias", "bias_type": bias_type, "attribute": attribute, "num_classes": 2,
                "class_names": list(names), "n_codes": world.config.n_codes, "image_size": vq.image_size,
                "layout": args.layout}
        writer.close(info)
        save_vq(vq, build / "synthetic_vq.pt")
        write_json(build / "generation_args.json", {**want, "complete": True})
    print(f"wrote {data_dir} ({bias_type}: 0 = {names[0]}, 1 = {names[1]})")
    return data_dir


def build_neutral_set(args, world, vq, key) -> dict:
    paths = ExperimentPaths(experiment=EXPERIMENT, root=args.root)
    csv_path = paths.neutral_csv()
    gender = args.bias_ratio if args.gender_ratio is None else args.gender_ratio
    color = args.bias_ratio if args.color_ratio is None else args.color_ratio
    want = {"world": key, "n_images": args.neutral_images, "gender_ratio": gender, "color_ratio": color,
            "images": not args.no_images}
    info_path = csv_path.parent / "neutral_info.json"
    if csv_path.exists() and info_path.exists():
        old = json.loads(info_path.read_text())
        if old.get("args") == json.loads(json.dumps(want)):
            print(f"{csv_path} is up to date; nothing to do")
            return old
    image_dir = None if args.no_images else csv_path.parent.parent / "images"
    info = write_neutral_set(csv_path, world, vq, args.neutral_images, gender, color, image_dir=image_dir)
    info["csv"] = "datasets/doctor_original/information/results_none.csv"
    info["args"] = want
    write_json(info_path, info)
    print(f"wrote {csv_path}: {info['n_images']} neutral-prompt images, gender 0/1 = "
          f"{info['gender_counts']['0']}/{info['gender_counts']['1']}, colour 0/1 = "
          f"{info['color_counts']['0']}/{info['color_counts']['1']}")
    return info


def refresh_ground_truth(args, world, key, neutral) -> None:
    """ground_truth.json of every bias-type dataset built from this world (the neutral set may have changed)."""
    for bt in BIAS_TYPES:
        data_dir = _paths(args, bt).data_dir if args.bias_type == bt else \
            ExperimentPaths(experiment=EXPERIMENT, root=args.root, bias_type=bt).data_dir
        stamp = _stamp(data_dir)
        if stamp is None:
            continue
        if stamp.get("world") != json.loads(json.dumps(key)):
            print(f"warning: {data_dir} was built from another world (other seed or world flags) than the neutral set "
                  f"just written; its bias detection would compare unrelated tokens. Rebuild it with these flags.")
            continue
        write_json(data_dir / "ground_truth.json", world.ground_truth(bt, neutral))


# flags that do not change an encoded --source images dataset (a staged one is resumed across them)
IMAGES_NOT_DATA = {"root", "data_dir", "checkpoint_dir", "results_dir", "log_dir", "device", "gpu", "num_workers",
                   "overwrite", "neutral_image_dir", "_argv", "quiet"}


def generate_images(args, bias_types) -> dict:
    """--source images: encode labelled pictures of one bias type and/or the neutral-prompt pictures."""
    from cortex.data import real_data
    from cortex.utils import get_device

    if len(bias_types) != 1:
        raise CortexError("--source images needs one --bias_type (its pictures are in --image_dir), not all")
    if not args.image_dir and not args.neutral_image_dir:
        raise CortexError("--source images: pass --image_dir (one sub-folder per label) and/or --neutral_image_dir")
    device = get_device(args.device, args.gpu)
    model, codebook = real_data.load_vq_for_dataset(args, device)
    out = {"bias_types": list(bias_types)}
    if args.image_dir:
        paths = _paths(args, bias_types[0])
        recover_staged(paths.data_dir)
        if not args.overwrite and holds_dataset(paths.data_dir):
            raise CortexError(f"{paths.data_dir} already holds a dataset; pass --overwrite to replace it (the new one "
                              f"is built beside it and swapped in when complete), or another --data_dir")
        stamp = {k: v for k, v in vars(args).items() if k not in IMAGES_NOT_DATA}
        with staged_dataset(paths.data_dir, stamp) as build:
            writer = DatasetWriter(build, codebook, args.layout)
            info = real_data.generate_real(args, writer, device, model=model)
            info["bias_type"] = bias_types[0]
            writer.close(info)
        if info.get("num_classes") != 2:
            print(f"warning: {args.image_dir} gives {info.get('num_classes')} labels; the bias IEMs expect 2")
        out["dataset"] = str(paths.data_dir)
    if args.neutral_image_dir:
        csv_path = ExperimentPaths(experiment=EXPERIMENT, root=args.root).neutral_csv()
        out["neutral"] = str(real_data.encode_neutral_set(args, csv_path, model, device,
                                                          image_dir=args.neutral_image_dir))
    return out


if __name__ == "__main__":
    run_main(main, get_args_parser)
