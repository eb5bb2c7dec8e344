"""Train the synthetic world's evaluators: small torchvision image classifiers (random init, weights=None)
trained on the world's decoded images, which the eval scripts use with ``--evaluators synthetic`` in place
of the ImageNet classifiers of the paper (SPEC §5).

    cd VQGAN_explanation
    python train_evaluators.py                          # vit_tiny_8, vit_tiny_16, resnet10
    python train_evaluators.py --archs resnet18 --epochs 4

Reads datasets/{train,validation,test}_embeddings.csv and the images datasets/images/<label>/<i>.png;
writes checkpoints/evaluators/<arch>.pth (arch, num_classes, image_size, normalisation, state_dict; the
epoch with the lowest validation loss) and checkpoints/evaluators/evaluators.csv (accuracies, time).
An existing checkpoint is kept unless --overwrite.

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
from cortex.data import dataset_info, read_split
from cortex.evaluators import (DEFAULT_SYNTHETIC_ARCHS, Evaluator, build_synthetic_net, evaluator_logits,
                               save_synthetic_evaluator, synthetic_dir)
from cortex.explain import load_images, write_rows
from cortex.masking import mask_images
from cortex.paths import ExperimentPaths
from cortex.utils import CortexError, get_device, hold_writer_lock, save_run_args, seed_everything

EXPERIMENT = "vqgan"
SUMMARY_COLUMNS = ["arch", "val_accuracy", "test_accuracy", "val_label_prob", "test_label_prob", "best_epoch", "epochs",
                   "seconds", "parameters"]


def get_args_parser():
    p = make_parser("Train the synthetic world's evaluators", description=__doc__,
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
    p.add_argument("--overwrite", action="store_true", help="retrain archs whose checkpoint exists")
    return p


def augment(x: torch.Tensor, g: torch.Generator, mask_aug: float) -> torch.Tensor:
    """x (B, 3, H, W) uint8 -> augmented float [0, 1]."""
    B = x.shape[0]
    flip_h = torch.rand(B, generator=g) < 0.5
    flip_v = torch.rand(B, generator=g) < 0.5
    x = torch.where(flip_h[:, None, None, None], x.flip(-1), x)
    x = torch.where(flip_v[:, None, None, None], x.flip(-2), x)
    if mask_aug > 0:
        on = torch.rand(B, generator=g) < mask_aug
        frac = torch.rand(B, generator=g) * 0.5
        pos = (torch.rand(B, 256, generator=g) < frac[:, None]) & on[:, None]
        x = mask_images(x, pos)
    return x.float() / 255.0


def evaluate(ev: Evaluator, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 128):
    """(accuracy %, mean cross-entropy, mean softmax prob of the true label)."""
    ev.eval()
    logits = evaluator_logits(ev, images, batch_size)
    acc = 100.0 * (logits.argmax(1) == labels).float().mean().item()
    loss = F.cross_entropy(logits, labels).item()
    prob = logits.softmax(1).gather(1, labels[:, None]).mean().item()
    return acc, loss, prob


def train_one(arch, num_classes, image_size, data, args, device):
    """Train one evaluator; returns (best Evaluator, summary dict)."""
    seed_everything(args.seed)
    net = build_synthetic_net(arch, num_classes, image_size)
    ev = Evaluator(arch, net, image_size, num_classes).to(device)
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
            x = augment(xtr[idx], g, args.mask_aug).to(device)
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
                   seconds=time.time() - t0, parameters=sum(p.numel() for p in net.parameters()))
    return ev, summary


def main(args):
    paths = ExperimentPaths.from_args(args, EXPERIMENT)
    device = get_device(args.device, args.gpu)
    out_dir = synthetic_dir(paths.checkpoint_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hold_writer_lock(out_dir, "evaluators (train_evaluators.py)", "wait for it to end, or pass another --checkpoint_dir")
    save_run_args(args, out_dir, "train_evaluators_args.json")
    todo = [a for a in args.archs if args.overwrite or not (out_dir / f"{a}.pth").exists()]
    if not todo:
        print(f"every evaluator in {out_dir} exists ({', '.join(args.archs)}); nothing to do (--overwrite to retrain)")
        return out_dir
    data = {}
    for split in ("train", "validation", "test"):
        recs = read_split(paths.data_dir, split)
        data[split] = (load_images(paths.data_dir, recs, progress=True), torch.tensor([r.label for r in recs]))
    num_classes = int(dataset_info(paths.data_dir).get("num_classes", int(data["train"][1].max()) + 1))
    image_size = int(data["train"][0].shape[-1])
    if image_size % 16:
        raise CortexError(f"{paths.data_dir}/images: {image_size}-px images are not a 16x16 token grid")
    summaries = []
    for arch in todo:
        ev, s = train_one(arch, num_classes, image_size, data, args, device)
        s["test_accuracy"], _, s["test_label_prob"] = evaluate(ev, *data["test"])
        save_synthetic_evaluator(out_dir / f"{arch}.pth", ev.net, arch, num_classes, image_size, meta=s)
        print(f"{arch}: epoch {s['best_epoch']} (lowest validation loss): validation accuracy {s['val_accuracy']:.2f}%, "
              f"test accuracy {s['test_accuracy']:.2f}% (mean prob of the label {s['test_label_prob']:.3f}), "
              f"{s['seconds']:.0f} s -> {out_dir / (arch + '.pth')}")
        summaries.append(s)
    # keep rows of archs trained earlier
    summary_path = out_dir / "evaluators.csv"
    old = []
    if summary_path.exists():
        from cortex.explain import read_rows

        old = [r for r in read_rows(summary_path) if r["arch"] not in {s["arch"] for s in summaries}]
    write_rows(summary_path, SUMMARY_COLUMNS, old + summaries, float_fmt="{:.3f}")
    return out_dir


if __name__ == "__main__":
    run_main(main, get_args_parser)
