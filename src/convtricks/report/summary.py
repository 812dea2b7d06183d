"""Keras' model.summary(): layers, output shapes, parameter counts, trainable totals."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

# Activations are folded into the layer before them, as Keras shows `Dense(512, relu)` as one row.
_HIDDEN = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Identity, nn.Hardswish)


def _shown_modules(model: nn.Module, depth: int) -> list[tuple[str, nn.Module]]:
    shown = []
    for name, module in model.named_modules():
        if not name:
            continue
        level = name.count(".") + 1
        is_leaf = not any(True for _ in module.children())
        if (is_leaf and level <= depth) or level == depth:
            if not isinstance(module, _HIDDEN):
                shown.append((name, module))
    return shown


def _shape_text(output) -> str:
    if isinstance(output, torch.Tensor):
        return "(None, " + ", ".join(str(d) for d in output.shape[1:]) + ")"
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return _shape_text(output[0])
    return "-"


def summary_rows(model: nn.Module, input_size, depth: int = 3) -> list[tuple[str, str, int]]:
    """(layer name (type), output shape, parameters) for each shown layer, in call order."""
    probe = copy.deepcopy(model).float().to(memory_format=torch.contiguous_format)
    # Train mode so training-only parts (auxiliary heads) run too; two images for batch norm.
    probe.train()
    shown = _shown_modules(probe, depth)
    shapes: dict[str, str] = {}
    order: list[str] = []
    handles = []
    for name, module in shown:
        def record(_module, _inputs, output, name=name):
            if name not in shapes:
                order.append(name)
            shapes[name] = _shape_text(output)
        handles.append(module.register_forward_hook(record))
    height, width = input_size
    with torch.no_grad():
        probe(torch.rand(2, 3, height, width))
    for handle in handles:
        handle.remove()
    training_only = tuple(getattr(model, "training_only_modules", ()))
    by_name = dict(shown)
    rows = []
    for name in order + [n for n, _ in shown if n not in shapes]:
        module = by_name[name]
        label = f"{name} ({type(module).__name__})"
        if training_only and name.split(".")[0] in training_only:
            label += " [training only]"
        rows.append((label, shapes.get(name, "-"), sum(p.numel() for p in module.parameters())))
    return rows


def count_parameters(model: nn.Module) -> tuple[int, int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable, total - trainable


def summary_text(model: nn.Module, input_size, depth: int = 3, title: str = "") -> str:
    rows = summary_rows(model, input_size, depth)
    name_width = max([len("Layer (type)")] + [len(r[0]) for r in rows]) + 2
    shape_width = max([len("Output Shape")] + [len(r[1]) for r in rows]) + 2
    rule = "=" * (name_width + shape_width + 14)
    lines = [f'Model: "{title or type(model).__name__}"', rule,
             f"{'Layer (type)':<{name_width}}{'Output Shape':<{shape_width}}{'Param #':>12}", rule]
    for label, shape, params in rows:
        lines.append(f"{label:<{name_width}}{shape:<{shape_width}}{params:>12,}")
    total, trainable, frozen = count_parameters(model)
    lines += [rule, f"Total params: {total:,}", f"Trainable params: {trainable:,}",
              f"Non-trainable params: {frozen:,}", "_" * len(rule)]
    if getattr(model, "training_only_modules", ()):
        lines.append("Layers marked [training only] add their loss while training and are skipped at prediction.")
    lines.append("Shapes are (batch, channels, height, width), PyTorch's order.")
    return "\n".join(lines)
