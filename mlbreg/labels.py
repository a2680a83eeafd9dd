"""Names and colours on the report's tables and plots, and the notes about a run's result that
training and the report print (a leaf module: imports nothing of mlbreg, nor torch).

Keys are the names the configs and run directories use (`method.name`, `model.name`,
`dataset.name`, dotted config keys, the report's time columns); values what a reader sees.
The order of a table is the order of its entries here (methods, models, datasets, inits).
"""

from __future__ import annotations

from collections.abc import Iterable

METHOD_ORDER = ["sgd", "prune_finetune", "gmp", "static", "set", "rigl", "linbreg", "mllinbreg"]
METHOD_LABELS = {
    "sgd": "SGD",
    "prune_finetune": "Prune+Fine-Tuning",
    "gmp": "GMP",
    "static": "Static",
    "set": "SET",
    "rigl": "RigL",
    "linbreg": "LinBreg",
    "mllinbreg": "ML LinBreg",
}
METHOD_COLORS = {
    "sgd": "0.25",
    "prune_finetune": "tab:orange",
    "gmp": "tab:brown",
    "static": "tab:olive",
    "set": "tab:purple",
    "rigl": "tab:green",
    "linbreg": "tab:blue",
    "mllinbreg": "tab:red",
}
MODEL_LABELS = {"resnet18": "ResNet18", "vgg16": "VGG16", "wrn28_10": "WideResNet28-10", "mlp": "MLP", "convnet": "ConvNet"}
DATASET_LABELS = {
    "cifar10": "CIFAR-10",
    "tinyimagenet": "TinyImageNet",
    "digits": "digits (8x8)",
    "mnist": "MNIST",
    "fashion_mnist": "Fashion-MNIST",
    "synthetic": "synthetic",
}
# mask initialization schemes (`init.scheme`), in table order
INIT_LABELS = {"uniform": "Uniform", "er": "ER", "erk": "ERK"}
# config keys (dotted) as they appear in a table's "Setting" column
KEY_LABELS = {
    "lam": "λ",
    "m": "m",
    "init.scheme": "init",
    "init.density": "init density",
    "init.scale": "init scale",
    "sparsity": "target",
    "regularizer.name": "reg",
    "backend": "backend",
    "lr": "lr",
    "epochs": "epochs",
    "method.finetune_epochs": "fine-tune epochs",
    "method.criterion": "criterion",
    "method.scope": "scope",
}
# the timed parts of a training step: metrics.csv column (seconds per epoch) and display name, in the
# order they are stacked; the one list behind the step timers, metrics.csv, the report's time columns
STEP_TIMERS = (
    ("forward_s", "forward"),
    ("backward_s", "backward"),
    ("optimizer_s", "optimizer step"),
    ("swap_s", "layer swaps"),
)
# the report's per-run time columns of those parts, and the rest of the epoch
TIME_PARTS = [(f"time_{col}", name) for col, name in STEP_TIMERS] + [("time_other_s", "other (data, bookkeeping)")]


def epoch_ranges(epochs: Iterable[int]) -> str:
    """[3, 4, 5, 9] -> "3-5, 9"."""
    spans: list[list[int]] = []
    for e in sorted(epochs):
        if spans and e == spans[-1][1] + 1:
            spans[-1][1] = e
        else:
            spans.append([e, e])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def all_zero_note(final: dict | None, lam: float | None = None) -> str | None:
    """The note for a final metrics row whose prunable weights are all zero (the model then
    predicts one class whatever the input), else None. `lam`: the run's λ when its method has
    one (the note then names it and advises a smaller one)."""
    final = final or {}
    nonzeros, prunable = final.get("nonzeros"), final.get("prunable_params")
    if nonzeros is None or prunable is None or not (nonzeros == 0 and prunable > 0):
        return None
    advice = (
        f"lam={lam:g} is too strong for this model and data: train with a smaller lam "
        "(`mlbreg tune --target-sparsity S` finds one)"
        if lam is not None
        else "check lr and the method's settings"
    )
    return f"every prunable weight is zero, so the model predicts one class for every input; {advice}"
