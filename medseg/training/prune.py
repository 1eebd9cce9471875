"""Structured pruning of a trained model: ``medseg prune -m MODEL --ratio R -o RUN``.

Channels (whole convolution filters, with every tensor that reads them) are removed by
`torch-pruning <https://github.com/VainF/Torch-Pruning>`_'s dependency graph: the filters of each coupled group
(a convolution, its normalisation and activation, the skip connections and residual additions that share its
channels) ranked by their L1 norm, the same fraction ``R`` removed from every group (``int(c * (1 - R))`` kept, as
torch-pruning counts). The network's inputs and its output heads (and the layers coupled to them) keep their
channels.

Because every group loses the same fraction, the pruned network is exactly the network the configuration builds
with ``model.channels`` scaled the same way: the result is an ordinary model folder (``weights.pt`` of a narrower
network, loaded with ``weights_only=True``), which every medseg command, export and backend runs as it runs a
trained one. This is checked tensor by tensor (:func:`prune_network`); a network for which it does not hold is
refused (``PRUNE_UNSUPPORTED``) rather than saved in a form nothing can rebuild.

Pruning alone costs accuracy; the CLI then fine-tunes the pruned network (``model.pretrained`` set to it) for a
few epochs, by default distilling the unpruned model into it with ``medseg distill``'s loss (the labels plus the
unpruned model's softened predictions). ``benchmarks/pruning.py`` measures the Dice change and the CPU speed-up.

PReLU activations with one shared slope (MONAI's default) are widened to one slope per channel while the graph is
built and narrowed back afterwards (torch-pruning cannot count the channels through a shared slope); the values are
unchanged.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from medseg.config import Config
from medseg.errors import ConfigError, ModelError, require_extra
from medseg.models.folder import INFO, ModelFolder, read_info, save_model_dir, write_info
from medseg.models.registry import build_model, spec_of

#: The networks whose pruned form is the network of a narrower ``model.channels`` (checked in the tests). UNet++'s
#: nested concatenations defeat torch-pruning 1.6's channel count (it fails on them); SegResNet's group
#: normalisation ties its widths to multiples of 8, so a uniform ratio does not narrow it to a buildable config.
PRUNABLE = ("unet",)


def kept(channels: int, ratio: float) -> int:
    """Channels a group of ``channels`` keeps at ``ratio`` (torch-pruning's count)."""
    return int(channels * (1 - ratio))


def pruned_config(cfg: Config, ratio: float) -> Config:
    """``cfg`` with ``model.channels`` narrowed by ``ratio``.

    Raises:
        ConfigError: ``CONFIG_INVALID_VALUE`` for a ratio outside (0, 1) or one that leaves a level no channel.
        ModelError: ``PRUNE_UNSUPPORTED`` for a network whose width is not ``model.channels``.
    """
    if not 0 < ratio < 1:
        raise ConfigError("CONFIG_INVALID_VALUE", f"--ratio must lie between 0 and 1 (the share of channels removed), got {ratio}")
    if cfg.model.name not in PRUNABLE or cfg.model.channels is None:
        raise ModelError("PRUNE_UNSUPPORTED", f"{cfg.model.name} cannot be pruned (only {', '.join(PRUNABLE)})",
                         f"prune one of {', '.join(PRUNABLE)}, or train a narrower network (model.channels)")
    channels = tuple(kept(c, ratio) for c in cfg.model.channels)
    if min(channels) < 1:
        raise ConfigError("CONFIG_INVALID_VALUE", f"--ratio {ratio} leaves no channel in a level of {list(cfg.model.channels)}",
                          "use a smaller ratio")
    model = cfg.model.model_copy(update={"channels": channels})
    return Config.model_validate(cfg.model_copy(update={"model": model}).model_dump())


@dataclass
class PruneResult:
    net: nn.Module  # the pruned network (built from ``cfg``) holding the kept filters
    cfg: Config  # the configuration that builds it
    parameters_before: int
    parameters_after: int
    #: (layer name, output channels?, removed indices) for every layer of every pruned group, in pruning order:
    #: which channels went where, for checks against the unpruned network
    removed: list[tuple[str, bool, list[int]]]

    def record(self, ratio: float) -> dict:
        """What the model folder's ``model.json`` keeps (``pruning``)."""
        return {"ratio": ratio, "method": "torch-pruning, L1 magnitude, uniform per group",
                "parameters_before": self.parameters_before, "parameters_after": self.parameters_after}


def _shared_prelus(net: nn.Module, example: torch.Tensor) -> list[str]:
    """Widens each one-slope PReLU to one slope per channel (the same value), returning their names."""
    widths: dict[str, int] = {}
    hooks = [module.register_forward_hook(lambda _m, _i, out, name=name: widths.__setitem__(name, out.shape[1]))
             for name, module in net.named_modules() if isinstance(module, nn.PReLU) and module.num_parameters == 1]
    with torch.no_grad():
        net(example)
    for hook in hooks:
        hook.remove()
    for name, module in net.named_modules():
        if name in widths:
            slope = module.weight.detach()
            module.num_parameters = widths[name]
            module.weight = nn.Parameter(slope.expand(widths[name]).clone())
    return list(widths)


def _narrow_prelus(net: nn.Module, names: list[str]) -> None:
    for name, module in net.named_modules():
        if name in names:
            module.num_parameters = 1
            module.weight = nn.Parameter(module.weight.detach()[:1].clone())


def _class_channel_layers(tp, net: nn.Module, example: torch.Tensor, classes: int) -> list[nn.Module]:
    """The layers that must keep their output channels: the convolutions with one output per class (the heads,
    deep-supervision heads included) and every layer coupled to them (e.g. the transposed convolution that a
    residual addition joins to the head in MONAI UNet's top level). A hidden layer that happens to have ``classes``
    channels is kept whole too; the pruned network then does not match the narrower configuration and is refused."""
    graph = tp.DependencyGraph().build_dependency(net, example_inputs=example)
    ignored: list[nn.Module] = []
    heads = [m for m in net.modules() if isinstance(m, nn.modules.conv._ConvNd) and m.out_channels == classes]
    for head in heads:
        group = graph.get_pruning_group(head, tp.prune_conv_out_channels, idxs=list(range(classes)))
        ignored += [dep.target.module for dep, _ in group
                    if graph.is_out_channel_pruning_fn(dep.handler) and dep.target.module not in ignored]
    return ignored


def prune_network(net: nn.Module, cfg: Config, in_channels: int, out_channels: int, spatial_dims: int,
                  ratio: float) -> PruneResult:
    """Removes ``ratio`` of the channels of every group of ``net`` (a copy; ``net`` is left alone).

    Args:
        net: The trained network (eval mode), built from ``cfg``.
        cfg: Its configuration (``data.patch_size`` gives the example input that traces the graph).
        ratio: Share of channels removed, in (0, 1).

    Raises:
        ModelError: ``PRUNE_UNSUPPORTED`` when the pruned tensors are not those of the narrower configuration.
        ConfigError: ``EXTRA_MISSING`` without torch-pruning (``medseg[prune]``); see :func:`pruned_config`.
    """
    target_cfg = pruned_config(cfg, ratio)
    require_extra("torch_pruning", "prune", "structured pruning")
    import torch_pruning as tp

    spec_of(cfg.model.name)  # a known network
    patch = tuple(cfg.data.patch_size or ())
    example = torch.randn(1, in_channels, *patch[:spatial_dims], generator=torch.Generator().manual_seed(0))
    work = copy.deepcopy(net).eval()
    before = sum(p.numel() for p in work.parameters())
    shared = _shared_prelus(work, example)
    heads = _class_channel_layers(tp, work, example, out_channels)
    pruner = tp.pruner.MagnitudePruner(work, example, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=ratio, ignored_layers=heads, global_pruning=False)
    names = {module: name for name, module in work.named_modules()}
    removed: list[tuple[str, bool, list[int]]] = []
    for group in pruner.step(interactive=True):  # a generator when interactive
        removed += [(names[dep.target.module], bool(pruner.DG.is_out_channel_pruning_fn(dep.handler)),
                     sorted(int(i) for i in idxs)) for dep, idxs in group if dep.target.module in names]
        group.prune()
    _narrow_prelus(work, shared)
    state = work.state_dict()
    target = build_model(target_cfg.model, spatial_dims, in_channels, out_channels).eval()
    expected = target.state_dict()
    differ = [k for k in expected if k not in state or state[k].shape != expected[k].shape]
    if differ or set(state) != set(expected):
        raise ModelError("PRUNE_UNSUPPORTED", f"pruning {cfg.model.name} at {ratio} does not give the network of "
                         f"model.channels {list(target_cfg.model.channels or ())} ({len(differ)} tensors differ, "
                         f"first {differ[:1]})", "train a narrower network (model.channels) instead")
    target.load_state_dict(state)
    return PruneResult(target, target_cfg, before, sum(p.numel() for p in target.parameters()), removed)


def save_pruned(folder: ModelFolder, result: PruneResult, ratio: float, path: Path) -> Path:
    """Writes the pruned, not yet fine-tuned network as a model folder at ``path`` (what fine-tuning starts from:
    ``model.pretrained``). Its ``model.json`` keeps the source's labels, channels, dataset and QC reference, and
    records ``pruning``; the source's validation Dice is not carried over (it is not this network's)."""
    keep = ("labels", "spatial_dims", "in_channels", "modality", "dataset", "qc")
    info = {k: folder.info[k] for k in keep if k in folder.info}
    record = {**result.record(ratio), "source_weights_sha256": folder.network_sha256}
    return save_model_dir(path, result.net, result.cfg, folder.plan, {**info, "pruning": record})


def record_pruning(model_dir: Path, record: dict) -> None:
    """Adds ``pruning`` to a fine-tuned model folder's ``model.json`` (its own hash rewritten with it)."""
    if (model_dir / INFO).is_file():
        write_info(model_dir / INFO, {**read_info(model_dir), "pruning": record})
