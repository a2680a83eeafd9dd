"""Names and colours on the report's tables and plots (a leaf module: imports nothing of mlbreg).

Keys are the names the configs and run directories use (`method.name`, `model.name`,
`dataset.name`, dotted config keys, the report's time columns); values what a reader sees.
The order of a table is the order of its entries here (methods, models, datasets, inits).
"""
from __future__ import annotations

METHOD_ORDER = ["sgd", "prune_finetune", "gmp", "static", "set", "rigl", "linbreg", "mllinbreg"]
METHOD_LABELS = {"sgd": "SGD", "prune_finetune": "Prune+Fine-Tuning", "gmp": "GMP", "static": "Static",
                 "set": "SET", "rigl": "RigL", "linbreg": "LinBreg", "mllinbreg": "ML LinBreg"}
METHOD_COLORS = {"sgd": "0.25", "prune_finetune": "tab:orange", "gmp": "tab:brown", "static": "tab:olive",
                 "set": "tab:purple", "rigl": "tab:green", "linbreg": "tab:blue", "mllinbreg": "tab:red"}
MODEL_LABELS = {"resnet18": "ResNet18", "vgg16": "VGG16", "wrn28_10": "WideResNet28-10", "mlp": "MLP",
                "convnet": "ConvNet"}
DATASET_LABELS = {"cifar10": "CIFAR-10", "tinyimagenet": "TinyImageNet", "digits": "digits (8x8)", "mnist": "MNIST",
                  "fashion_mnist": "Fashion-MNIST", "synthetic": "synthetic"}
# mask initialization schemes (`init.scheme`), in table order
INIT_LABELS = {"uniform": "Uniform", "er": "ER", "erk": "ERK"}
# config keys (dotted) as they appear in a table's "Setting" column
KEY_LABELS = {"lam": "λ", "m": "m", "init.scheme": "init", "init.density": "init density", "init.scale": "init scale",
              "sparsity": "target", "regularizer.name": "reg", "backend": "backend", "lr": "lr", "epochs": "epochs",
              "method.finetune_epochs": "fine-tune epochs", "method.criterion": "criterion",
              "method.scope": "scope"}
# the parts of the training time (the report's per-run time columns) in the order they are stacked
TIME_PARTS = [("time_forward_s", "forward"), ("time_backward_s", "backward"), ("time_optimizer_s", "optimizer step"),
              ("time_swap_s", "layer swaps"), ("time_other_s", "other (data, bookkeeping)")]
