"""Architectures from torchvision (and timm, when installed) by name: ``model=torchvision.resnet50``,
``model=timm.resnet18d``.

``torchvision.NAME``: any classification model of ``torchvision.models.list_models(torchvision.models)``,
built by ``torchvision.models.get_model(NAME, weights=None, num_classes=...)``; ``timm.NAME``: any
``timm.list_models()`` name, built by ``timm.create_model(NAME, pretrained=False, num_classes=..., in_chans=...)``.
The data set gives the number of classes and the input shape: a torchvision model's first 3-channel conv (its
stem) is rebuilt for the data's channel count (1 for MNIST / digits), and one forward pass at the data's input
shape (train and eval mode, batch 2, no statistics or RNG state touched) checks that the model takes it and
returns one logits tensor. Extra ``model.*`` keys are passed to the builder (``+model.aux_logits=false``).
"""

from __future__ import annotations

import difflib
import importlib

import torch
from torch import nn

from ..checks import ConfigError

PREFIXES = ("torchvision.", "timm.")
TORCHVISION_NAMES = "torchvision.<name> for a name of python -c 'import torchvision.models as m; print(m.list_models(m))'"
HOW_TO_LIST = (
    f"{TORCHVISION_NAMES}, or timm.<name> (with timm installed) for one of python -c 'import timm; print(timm.list_models())'"
)


def is_external(name) -> bool:
    return isinstance(name, str) and name.startswith(PREFIXES)


def _library_names(library: str) -> list[str]:
    if library == "torchvision":
        import torchvision.models

        return torchvision.models.list_models(torchvision.models)
    try:
        timm = importlib.import_module("timm")
    except ImportError:
        raise ConfigError(
            f"invalid model.name='timm.*': timm is not installed (pip install timm); or use {TORCHVISION_NAMES}"
        ) from None
    return timm.list_models()


def check_name(name: str) -> None:
    """ConfigError unless `name` is ``torchvision.X`` / ``timm.X`` with X a model the library has."""
    library, _, arch = name.partition(".")
    names = _library_names(library)
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=3)
        hint = f" (did you mean {', '.join(f'{library}.{c}' for c in close)}?)" if close else ""
        raise ConfigError(
            f"invalid model.name={name!r}: {library} has no classification model {arch!r}{hint}; use {HOW_TO_LIST}"
        )


def create_external(name: str, num_classes: int, in_shape, **kwargs) -> nn.Module:
    """The model `name` (``torchvision.X`` / ``timm.X``) for ``num_classes`` classes and inputs ``in_shape``."""
    check_name(name)
    library, _, arch = name.partition(".")
    try:
        if library == "torchvision":
            import torchvision.models

            model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
            _adapt_stem(model, name, in_shape[0])
        else:
            timm = importlib.import_module("timm")
            model = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_shape[0], **kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid model={name}: building it failed ({err}); check the model.* keys") from err
    _check_forward(model, name, num_classes, tuple(in_shape))
    return model


def _adapt_stem(model: nn.Module, name: str, channels: int) -> None:
    """Rebuild the first conv (a 3-channel stem) for `channels` input channels."""
    if channels == 3:
        return
    first = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if first is not None and first[1].in_channels == 3 and first[1].groups == 1:
        path, conv = first
        parent, _, attr = path.rpartition(".")
        setattr(
            model.get_submodule(parent),
            attr,
            nn.Conv2d(
                channels,
                conv.out_channels,
                conv.kernel_size,
                conv.stride,
                conv.padding,
                conv.dilation,
                bias=conv.bias is not None,
                padding_mode=conv.padding_mode,
            ),
        )
        return
    raise ConfigError(
        f"invalid model={name}: its first conv does not take 3 channels, so it cannot be adapted to "
        f"{channels}-channel data; use a data set with 3-channel images"
    )


def _check_forward(model: nn.Module, name: str, num_classes: int, in_shape: tuple) -> None:
    """One batch of 2 zeros in train and in eval mode: one (2, num_classes) tensor each, else ConfigError.
    BatchNorm statistics and the RNG state are restored."""
    buffers = {
        k: b.clone()
        for k, b in model.state_dict().items()
        if k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }
    x = torch.zeros(2, *in_shape)
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            for mode in (True, False):
                out = model.train(mode)(x)
                if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
                    what = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                    raise ConfigError(
                        f"invalid model={name}: in {'train' if mode else 'eval'} mode it returns {what}, "
                        f"not logits of shape (batch, {num_classes}) (aux outputs: "
                        "+model.aux_logits=false)"
                    )
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - a RuntimeError, an AssertionError (torch._assert), ...: input too small
        raise ConfigError(
            f"invalid model={name}: it does not take inputs of shape {in_shape} "
            f"({str(err).splitlines()[0]}); use a data set with larger images or another model"
        ) from err
    finally:
        model.load_state_dict(buffers, strict=False)
        model.train()
