"""Device placement for models split over devices (``device_map="auto"``, accelerate's ``dispatch_model``).

A sharded model runs decoder layer ``i`` on its own device; an offloaded layer keeps its weights on ``cpu``/``disk``
(parameters on ``meta``) and runs on an execution device chosen by accelerate's ``AlignDevicesHook``. halludec's
rule: per-call state is built once (in ``prepare``) on the device of the inputs, and every tensor a layer reads
lives on the device of that layer — placed there in ``prepare`` (:func:`layer_device`) or moved once per call and
device and reused at every step (:class:`DeviceCache`, behind ``LayerContext.rows`` / ``keys``). Logits edits run
on the device of the logits (the LM head's output).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary


def hook_device(module: nn.Module) -> torch.device | None:
    """The execution device of an accelerate hook on ``module`` (``AlignDevicesHook``, also inside a
    ``SequentialHook``), or None when it has none.

    Args:
        module: Any module.

    Returns:
        The device its forward runs on according to accelerate, or None.
    """
    hook = getattr(module, "_hf_hook", None)
    hooks = getattr(hook, "hooks", None) or ([hook] if hook is not None else [])
    for h in hooks:
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    return None


def weights_device(module: nn.Module) -> torch.device | None:
    """The device of ``module``'s first parameter or buffer that is not on ``meta`` (None: none, or all offloaded)."""
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return None


def module_device(*modules: nn.Module | None, default: torch.device | None = None) -> torch.device:
    """Where the first of ``modules`` that tells runs: an accelerate hook's execution device, else its weights'.

    Hooks are asked first on every module (an offloaded layer's weights sit on ``meta`` or ``cpu`` while it runs on
    the hook's device), then weights.

    Args:
        *modules: Candidates, most specific first (e.g. an attention module, then its decoder layer).
        default: Returned when none tells (e.g. the inputs' device).

    Returns:
        The device.
    """
    present = [m for m in modules if m is not None]
    for m in present:
        device = hook_device(m)
        if device is not None:
            return device
    for m in present:
        device = weights_device(m)
        if device is not None:
            return device
    return default if default is not None else torch.device("cpu")


def layer_device(adapter: Any, layer: int, default: torch.device | None = None) -> torch.device:
    """The device decoder layer ``layer``'s attention runs on.

    Args:
        adapter: The model's ``VLMAdapter``.
        layer: Decoder layer index.
        default: Fallback (the inputs' device) when neither the attention module nor the layer tells.

    Returns:
        The device.
    """
    return module_device(adapter.attention(layer), adapter.layers[layer], default=default)


class DeviceCache:
    """Copies of per-call tensors on other devices, made once per (tensor, device) and reused at every step.

    Keys are the source tensors by identity (a copy lives as long as its source); on a single device nothing is
    stored and the tensor itself is returned.
    """

    def __init__(self) -> None:
        self._copies: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def to(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``tensor`` on ``device`` (itself when already there).

        Args:
            tensor: A tensor built before decoding (per-row or per-position state).
            device: The device of the layer (or logits) that reads it.

        Returns:
            The tensor or its cached copy on ``device``.
        """
        if tensor.device == device:
            return tensor
        per_device = self._copies.get(tensor)
        if per_device is None:
            per_device = self._copies[tensor] = {}
        copy = per_device.get(device)
        if copy is None:
            copy = per_device[device] = tensor.to(device)
        return copy


def input_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: the device its input embeddings run on.

    ``model.device`` is the device of the first parameter, which is ``meta`` when that module is offloaded; the
    embeddings' execution device is where ``generate`` starts (accelerate's hooks move inputs on from there).

    Args:
        model: A loaded model, dispatched with a ``device_map`` or not.

    Returns:
        The device to put ``input_ids`` / ``pixel_values`` on.
    """
    fallback = getattr(model, "device", None)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    device = module_device(embeddings, model, default=fallback if isinstance(fallback, torch.device) else None)
    return device if device.type != "meta" else torch.device("cpu")
