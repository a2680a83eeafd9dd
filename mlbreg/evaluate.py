"""`mlbreg eval RUN_DIR_OR_FILE`: the test accuracy of a run's exported (or saved) model,
checked against the accuracy the run itself recorded.

The model comes from `mlbreg.export.resolve` (an exported file; for a run directory its
model.safetensors when there is one, else model.pt). The test split, its loader and its
normalization are the training's own (`mlbreg.build.build`), and so is the evaluation
(`mlbreg.build.evaluate`): on the run's device and thread count the accuracy is the same
number, not a close one, and the exit code says whether it is.
"""

from __future__ import annotations

import argparse
import sys

import torch

from .build import build, evaluate
from .config import ConfigError, check_device, use_channels_last
from .export import ExportError, model_from, resolve


def _device(requested: str | None, trained_on: str | None) -> torch.device:
    if requested and requested != "auto":
        check_device(requested, "--device", "use --device cpu")  # as `mlbreg train` checks device=
        return torch.device(requested)
    if (trained_on == "cuda" or requested == "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def evaluate_path(path, device: str | None = None) -> dict:
    """Test loss and accuracy of the model at `path` on its run's test split, and the run's own."""
    info = resolve(path)
    cfg = info["cfg"]
    dev = _device(device, info.get("device"))
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))  # as training did: a thread count can change sums
    model = model_from(info, dev)
    if use_channels_last(cfg):
        model.to(memory_format=torch.channels_last)
    # the training's data, loader and normalization; build's fresh model and method are dropped
    parts = build(cfg, dev)
    data, test_loader = parts.data, parts.test_loader
    loss, acc = evaluate(model, test_loader)
    return dict(info=info, device=dev, test_loss=loss, test_acc_pct=acc, test_size=len(data.test))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mlbreg eval", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "path",
        metavar="RUN_DIR_OR_FILE",
        help="a finished run directory (its model.safetensors if exported, else model.pt) or a file written by `mlbreg export`",
    )
    p.add_argument(
        "--device", help="cpu, cuda (cuda:N) or auto (default: the device the run trained on when it is here, else cpu)"
    )
    args = p.parse_args(argv)
    try:
        out = evaluate_path(args.path, args.device)
    except (ExportError, ConfigError) as err:
        print(f"mlbreg eval: {err}", file=sys.stderr)
        return 2
    info, acc, loss = out["info"], out["test_acc_pct"], out["test_loss"]
    correct = round(acc * out["test_size"] / 100)
    source = "exported file" if info["kind"] == "export" else "model.pt"
    print(
        f"mlbreg eval: {info['file']} ({source}; {info['cfg'].dataset.name}/{info['cfg'].model.name}/"
        f"{info['cfg'].method.name}; on {out['device']})"
    )
    print(f"  test accuracy {acc:.4f}% ({correct} of {out['test_size']}), test loss {loss:.6f}")
    final = info.get("final") or {}
    if "test_acc_pct" not in final:
        print(
            "mlbreg eval: the run recorded no test accuracy to compare with (no metrics.csv row, and none stored in the file)",
            file=sys.stderr,
        )
        return 1
    ref, where = float(final["test_acc_pct"]), f"epoch {int(final['epoch'])}" if "epoch" in final else "final"
    ref_loss = final.get("test_loss")
    print(f"  the run's     {ref:.4f}% ({where}" + (f", test loss {float(ref_loss):.6f})" if ref_loss is not None else ")"))
    if acc == ref:
        print("  equal: the model reproduces the run's test accuracy")
        return 0
    hint = (
        ""
        if out["device"].type == (info.get("device") or out["device"].type)
        else f"; the run trained on {info['device']}, this evaluation ran on {out['device']}"
    )
    print(f"mlbreg eval: test accuracy {acc!r}% differs from the run's {ref!r}% by {acc - ref:+.4f} pp{hint}", file=sys.stderr)
    return 1
