"""Testing an IEM: top-k accuracy on a split, the testing_results.csv row, the printed line."""
from __future__ import annotations

import csv

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from cortex.data.formats import EmbeddingDataset
from cortex.iem.checkpoints import load_iem
from cortex.utils import CortexError, atomic_write, get_device


# ----------------------------------------------------------------------------- testing

@torch.no_grad()
def topk_accuracy(model, loader, device, ks=(1, 3, 5, 10), lookup=None) -> dict:
    """Top-k accuracy in percent; k larger than the number of classes counts every image correct.

    lookup: turns the loader's id batches (compact layout) into embeddings on ``device``.
    """
    model.eval().to(device)
    correct = {k: 0 for k in ks}
    n = 0
    for x, y, _ in tqdm(loader, desc="testing", unit="batch"):
        x = x.to(device)
        logits = model(lookup(x) if lookup is not None else x)  # (B, C)
        y = y.to(device)
        top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (B, kmax)
        for k in ks:
            correct[k] += (top[:, :k] == y[:, None]).any(1).sum().item()
        n += len(y)
    if n == 0:
        raise CortexError("the test split is empty")
    return {k: 100.0 * c / n for k, c in correct.items()}


def write_csv_row(path, header: list[str], row: list) -> None:
    with atomic_write(path) as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerow(row)


def test_iem(args, paths, experiment: str, ks=(1, 3, 5, 10)) -> dict:
    """Top-k accuracies (percent) of best_model.pth on the test split (``test.py`` checks first that the
    checkpoint was trained on this dataset: ``cortex.provenance.verify``)."""
    device = get_device(args.device, args.gpu)
    model = load_iem(paths.best_ckpt(args.model), experiment, args.model, num_classes=args.num_classes,
                     width=args.width, depth=args.depth)
    num_classes = model_num_classes(model)
    test_set = EmbeddingDataset(paths.data_dir, "test", num_classes, layout=args.data_layout, return_ids=True)
    loader = DataLoader(test_set, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers)
    acc = topk_accuracy(model, loader, device, ks, lookup=test_set.lookup)
    acc["num_classes"] = num_classes  # for topk_line: top-k is n/a when k > classes
    return acc


def topk_line(acc: dict, ks) -> str:
    """``Top-1: 83.33%, Top-3: 100.00%, Top-5: n/a (3 classes)``: a top-k with k above the number of classes
    (``acc["num_classes"]``) would count every image correct, so it is not shown."""
    n = acc.get("num_classes")
    return ", ".join(f"Top-{k}: n/a ({n} classes)" if n is not None and k > n else f"Top-{k}: {acc[k]:.2f}%"
                     for k in ks)


def model_num_classes(model) -> int:
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    return last.out_features
