"""Train evaluators on a dataset: torchvision image classifiers trained on the dataset's decoded images, which
the eval scripts use with ``--evaluators trained`` (or ``synthetic``; ``auto`` picks them) in place of the
ImageNet classifiers of the paper (SPEC §5). Works on any dataset with decoded images: the synthetic world,
or your own labelled pictures encoded with ``generate_dataset.py --source images``.

    cd VQGAN_explanation
    python train_evaluators.py                          # vit_tiny_8, vit_tiny_16, resnet10, from scratch
    python train_evaluators.py --archs resnet18 --epochs 4 --weights_dir ~/weights   # ImageNet-pretrained

Reads datasets/{train,validation,test}_embeddings.csv and the images datasets/images/<label>/<i>.png;
writes checkpoints/evaluators/<arch>.pth (arch, num_classes, image_size, normalisation, state_dict; the
epoch with the lowest validation loss; meta: the summary, the training settings and the dataset it was
trained on -- folder, labels, class names, a hash of the split CSVs), checkpoints/evaluators/evaluators.csv
(accuracies, time) and train_evaluators_args.json (the settings of the last run that trained something).

Pretrained backbones: an arch with torchvision ImageNet weights (resnet18, resnet50, vit_b_16, ...) starts
from them when their file is found locally (--weights_dir, $TORCH_HOME; never downloaded) and gets a new
head for the dataset's labels; otherwise it trains from scratch, and says so. --pretrained never: always
from scratch.

An existing checkpoint trained on this dataset is kept unless --overwrite; one trained on another dataset
is an error (use another --checkpoint_dir for this dataset's evaluators, or --overwrite to replace it).

Augmentation: random flips and, with probability --mask_aug, a random fraction (up to half) of the token
patches blacked out, so that black patches -- what the evaluations mask with -- are no evidence for any
class and an evaluator's drop in confidence means the masked tokens carried the class.
"""
import argparse
import time

import torch
import torch.nn.functional as F

from cortex.cli import (fraction, make_parser, nonneg_float, paths_parser, positive_float, positive_int, run_main,
                        runtime_parser)
from cortex.data.formats import dataset_geometry, dataset_info, read_split
from cortex.evaluation.evaluators import (DEFAULT_SYNTHETIC_ARCHS, Evaluator, build_synthetic_net, dataset_record,
                                          describe_dataset, evaluator_folder, evaluator_logits, has_imagenet_weights,
                                          net_input_size, pretrained_net, save_synthetic_evaluator)
from cortex.evaluation.explain import load_images, write_rows
from cortex.evaluation.masking import mask_images
from cortex.paths import ExperimentPaths
from cortex.utils import CortexError, get_device, hold_writer_lock, save_run_args, seed_everything

EXPERIMENT = "vqgan"
SUMMARY_COLUMNS = ["arch", "val_accuracy", "test_accuracy", "val_label_prob", "test_label_prob", "best_epoch", "epochs",
                   "seconds", "parameters", "pretrained"]


def get_args_parser():
    p = make_parser("Train evaluators on a dataset", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter,
                    parents=[paths_parser(__file__), runtime_parser()])
    p.add_argument("--archs", nargs="+", default=list(DEFAULT_SYNTHETIC_ARCHS),
                   help="architectures: vit_tiny_8, vit_tiny_16, resnet10, shufflenet_tiny, or any torchvision "
                        "classification model name (default: %(default)s)")
    p.add_argument("--epochs", type=positive_int, default=4, help="training epochs (default: %(default)s)")
    p.add_argument("--batch_size", type=positive_int, default=16, help="batch size (default: %(default)s)")
    p.add_argument("--lr", type=positive_float, default=3e-3, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--weight_decay", type=nonneg_float, default=1e-4, help="AdamW weight decay (default: %(default)s)")
    p.add_argument("--mask_aug", type=fraction, default=0.5,
                   help="probability of blacking out a random fraction (<= 1/2) of an image's token patches "
                        "during training (default: %(default)s)")
    p.add_argument("--pretrained", choices=("auto", "never"), default="auto",
                   help="auto: start an arch that has torchvision ImageNet weights from them when their file is "
                        "found locally (--weights_dir, $TORCH_HOME; never downloaded), else from scratch; never: "
                        "always from scratch (default: %(default)s)")
    p.add_argument("--weights_dir", default=None,
                   help="folder with torchvision's ImageNet weight files, e.g. resnet18-f37072fd.pth (a TORCH_HOME "
                        "folder works too; default: torch hub's cache)")
    p.add_argument("--evaluator_dir", default=None,
                   help="where to write the evaluators (default: <checkpoint_dir>/evaluators); give each dataset its "
                        "own, and pass the same --evaluator_dir to the eval scripts")
    p.add_argument("--overwrite", action="store_true",
                   help="retrain archs whose checkpoint exists (also one trained on another dataset)")
    return p


# the settings a checkpoint records and a rerun compares (a kept checkpoint trained otherwise is named)
SETTINGS = ("epochs", "batch_size", "lr", "weight_decay", "mask_aug", "seed", "pretrained")


def augment(x: torch.Tensor, g: torch.Generator, mask_aug: float, grid=(16, 16)) -> torch.Tensor:
    """x (B, 3, H, W) uint8 -> augmented float [0, 1]; grid: the dataset's token grid (h, w)."""
    B = x.shape[0]
    flip_h = torch.rand(B, generator=g) < 0.5
    flip_v = torch.rand(B, generator=g) < 0.5
    x = torch.where(flip_h[:, None, None, None], x.flip(-1), x)
    x = torch.where(flip_v[:, None, None, None], x.flip(-2), x)
    if mask_aug > 0:
        on = torch.rand(B, generator=g) < mask_aug
        frac = torch.rand(B, generator=g) * 0.5
        pos = (torch.rand(B, grid[0] * grid[1], generator=g) < frac[:, None]) & on[:, None]
        x = mask_images(x, pos, grid=grid)
    return x.float() / 255.0


def evaluate(ev: Evaluator, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 128):
    """(accuracy %, mean cross-entropy, mean softmax prob of the true label)."""
    ev.eval()
    logits = evaluator_logits(ev, images, batch_size)
    acc = 100.0 * (logits.argmax(1) == labels).float().mean().item()
    loss = F.cross_entropy(logits, labels).item()
    prob = logits.softmax(1).gather(1, labels[:, None]).mean().item()
    return acc, loss, prob


def train_one(arch, num_classes, image_size, data, args, device, grid=(16, 16)):
    """Train one evaluator (from ImageNet weights found locally, else from scratch); returns (best Evaluator,
    summary dict)."""
    seed_everything(args.seed)
    net, weights = pretrained_net(arch, num_classes, args.weights_dir) if args.pretrained == "auto" else (None, None)
    if net is None:
        net = build_synthetic_net(arch, num_classes, image_size)
    print(f"{arch}: " + (f"fine-tuning from the ImageNet weights {weights}" if weights else "training from scratch"
                         + (" (no local ImageNet weights found; --weights_dir)" if args.pretrained == "auto"
                            and has_imagenet_weights(arch) else "")))
    ev = Evaluator(arch, net, net_input_size(net, image_size), num_classes).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    (xtr, ytr), (xva, yva) = data["train"], data["validation"]
    steps = args.epochs * ((len(ytr) + args.batch_size - 1) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=max(1, steps), pct_start=0.2)
    g = torch.Generator().manual_seed(args.seed)
    best, best_loss, best_epoch, best_stats = None, float("inf"), 0, None
    t0 = time.time()
    from tqdm import tqdm

    bar = tqdm(total=steps, desc=f"training {arch}", unit="batch", leave=False)
    for epoch in range(1, args.epochs + 1):
        ev.train()
        perm = torch.randperm(len(ytr), generator=g)
        total, n = 0.0, 0
        for s in range(0, len(perm), args.batch_size):
            idx = perm[s:s + args.batch_size]
            x = augment(xtr[idx], g, args.mask_aug, grid).to(device)
            loss = F.cross_entropy(ev(x), ytr[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            n += len(idx)
            bar.update(1)
        acc, vloss, prob = evaluate(ev, xva, yva)
        print(f"{arch}: epoch {epoch}/{args.epochs}, training loss {total / n:.4f}, validation loss {vloss:.4f}, "
              f"accuracy {acc:.2f}%, mean prob of the label {prob:.3f}")
        if vloss < best_loss:  # as for the IEMs: the epoch with the lowest validation loss
            best_loss, best_epoch, best_stats = vloss, epoch, (acc, prob)
            best = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    bar.close()
    net.load_state_dict(best)
    ev.eval()
    summary = dict(arch=arch, val_accuracy=best_stats[0], val_label_prob=best_stats[1], best_epoch=best_epoch,
                   epochs=args.epochs,
                   seconds=time.time() - t0, parameters=sum(p.numel() for p in net.parameters()),
                   pretrained=str(weights) if weights else "")
    return ev, summary


def existing_checkpoints(out_dir, archs, record: dict, args) -> list[str]:
    """The archs whose checkpoint in ``out_dir`` is kept (trained on this dataset; not --overwrite). A checkpoint
    of another dataset is a CortexError; one trained with other settings is named on the console."""
    keep = []
    for arch in archs:
        path = out_dir / f"{arch}.pth"
        if args.overwrite or not path.exists():
            continue
        try:
            meta = torch.load(path, map_location="cpu", weights_only=True).get("meta") or {}
        except Exception as e:  # noqa: BLE001 - a torn or foreign file fails in many ways
            raise CortexError(f"{path}: cannot read this evaluator checkpoint ({type(e).__name__}: {e}); "
                              f"retrain it with --overwrite") from e
        trained_on = meta.get("dataset")
        if trained_on is None or trained_on.get("content_hash") != record["content_hash"]:
            was = describe_dataset(trained_on) if trained_on else "an unrecorded dataset (older train_evaluators.py)"
            raise CortexError(f"{path} was trained on {was}, not on {describe_dataset(record)}. Pass "
                              f"--evaluator_dir <folder> to keep this dataset's evaluators apart (and the same "
                              f"--evaluator_dir to the eval scripts), or --overwrite to replace it")
        settings = meta.get("settings") or {}
        differ = [f"{k} {settings[k]} (asked: {getattr(args, k)})" for k in SETTINGS
                  if k in settings and settings[k] != getattr(args, k)]
        print(f"{arch}: kept {path}" + (f", trained with {', '.join(differ)}; --overwrite to retrain" if differ else ""))
        keep.append(arch)
    return keep


def main(args):
    paths = ExperimentPaths.from_args(args, EXPERIMENT)
    device = get_device(args.device, args.gpu)
    out_dir = evaluator_folder(paths, args.evaluator_dir)
    record = dataset_record(paths.data_dir)
    kept = existing_checkpoints(out_dir, args.archs, record, args)
    todo = [a for a in args.archs if a not in kept]
    if not todo:
        print(f"every evaluator in {out_dir} ({', '.join(args.archs)}) was trained on this dataset; nothing to do "
              f"(--overwrite to retrain)")
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    hold_writer_lock(out_dir, "evaluators (train_evaluators.py)", "wait for it to end, or pass another --evaluator_dir")
    save_run_args({**vars(args), "trained": todo}, out_dir, "train_evaluators_args.json")
    data = {}
    for split in ("train", "validation", "test"):
        recs = read_split(paths.data_dir, split)
        data[split] = (load_images(paths.data_dir, recs, progress=True), torch.tensor([r.label for r in recs]))
    num_classes = int(dataset_info(paths.data_dir).get("num_classes", int(data["train"][1].max()) + 1))
    image_size = int(data["train"][0].shape[-1])
    grid = dataset_geometry(paths.data_dir)[:2]
    if image_size % grid[0] or int(data["train"][0].shape[-2]) % grid[1]:
        raise CortexError(f"{paths.data_dir}/images: {image_size}-px images are not a whole number of patches of "
                          f"the dataset's {grid[0]}x{grid[1]} token grid")
    settings = {k: getattr(args, k) for k in SETTINGS}
    summaries = []
    for arch in todo:
        ev, s = train_one(arch, num_classes, image_size, data, args, device, grid)
        s["test_accuracy"], _, s["test_label_prob"] = evaluate(ev, *data["test"])
        save_synthetic_evaluator(out_dir / f"{arch}.pth", ev.net, arch, num_classes, ev.input_size,
                                 meta={**s, "settings": settings, "dataset": record})
        print(f"{arch}: epoch {s['best_epoch']} (lowest validation loss): validation accuracy {s['val_accuracy']:.2f}%, "
              f"test accuracy {s['test_accuracy']:.2f}% (mean prob of the label {s['test_label_prob']:.3f}), "
              f"{s['seconds']:.0f} s -> {out_dir / (arch + '.pth')}")
        summaries.append(s)
    # keep rows of archs trained earlier
    summary_path = out_dir / "evaluators.csv"
    old = []
    if summary_path.exists():
        from cortex.evaluation.explain import read_rows

        old = [r for r in read_rows(summary_path) if r["arch"] not in {s["arch"] for s in summaries}]
    write_rows(summary_path, SUMMARY_COLUMNS, old + summaries, float_fmt="{:.3f}")
    return out_dir


if __name__ == "__main__":
    run_main(main, get_args_parser)
