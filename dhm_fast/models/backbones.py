"""Any torchvision or timm classifier as a DHM trunk: ``tv:NAME`` (``torchvision.models.get_model``) or
``timm:NAME`` (``timm.create_model``, an optional dependency). Nothing is downloaded: weights come from
``--init-weights``.

Trunk: the stock model traced by torch.fx (torchvision's feature extraction, timm's for timm models) so that
one pass returns the logits and the feature maps at two fork points. The traced module keeps the stock
model's tensor names under ``trunk.``: without that prefix, the trunk's state dict is the stock state dict.

Fork points are fx node names, or prefixes of them naming a module (``layer3``, ``features.5``): the
module's last node. By default they are the outputs of the backbone's last two stages before the final
one (the paper forks a ResNet after layer2 and layer3): timm's ``feature_info`` stages, or for torchvision
the last module output at each spatial resolution. ``aux2`` forks at the shallower point, ``aux1`` at the
deeper one.

The generic branch (the paper's ResNets keep their own): per factor of 2 between the fork's resolution and
the trunk's last stage, one 3x3 convolution of stride 2 + BatchNorm + ReLU at the fork's width (at least
one, of stride 1 when the fork is already at the last resolution), then global pooling and a linear
classifier. `branch_summary` reports its width, depth and FLOPs next to the trunk's.

The stock network's adaptive average pools (VGG's to 7x7, AlexNet's to 6x6) run as `adaptive_avg_pool2d`
below: under --deterministic their CUDA backward would raise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ..catalog import is_backbone  # noqa: F401 - also this module's API (tv:/timm: prefixes)
from .branching import Branch, BranchedNet, init_weights

STOCK_PREFIX = "trunk."
PROBE_SIZE = 224  # shapes and stages are read at this input side (the resolution the models were designed for)


def _timm():
    try:
        import timm
    except ImportError:
        raise ValueError("timm: architectures need the timm package: pip install timm") from None
    return timm


def stock_constructor(arch: str) -> Callable[..., nn.Module]:
    """``f(num_classes, in_channels)`` building the stock network of ``arch``, randomly initialised."""
    source, _, name = arch.partition(":")
    if source == "tv":
        import torchvision

        if name not in torchvision.models.list_models(module=torchvision.models):
            raise ValueError(f"unknown torchvision classifier '{name}' in --arch {arch} "
                             "(see torchvision.models.list_models())")
        return lambda num_classes, in_channels=3: torchvision.models.get_model(name, num_classes=num_classes)
    timm = _timm()
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model '{name}' in --arch {arch} (see timm.list_models())")
    return lambda num_classes, in_channels=3: timm.create_model(name, num_classes=num_classes, in_chans=in_channels)


def _fx(arch: str):
    """(get_graph_node_names, create_feature_extractor) of the library the model comes from."""
    if arch.startswith("timm:"):
        _timm()
        from timm.models import create_feature_extractor, get_graph_node_names
    else:
        from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    return get_graph_node_names, create_feature_extractor


def _stock(arch: str, num_classes: int, in_channels: int) -> nn.Module:
    make = stock_constructor(arch)
    try:
        return make(num_classes, in_channels)
    except NotImplementedError:  # a builder computing its widths with tensors (torchvision's RegNets) on "meta"
        if torch.empty(0).device.type != "meta":
            raise
        with torch.device("cpu"):
            return make(num_classes, in_channels).to("meta")


def _on_meta(arch: str) -> nn.Module:
    with torch.device("meta"):
        return _stock(arch, 10, 3).eval()


@cache
def graph_shapes(arch: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(node name, output shape) of every tensor-valued node, in order, for an RGB image of PROBE_SIZE pixels
    (on "meta": no memory, no arithmetic)."""
    model = _on_meta(arch)
    names, create = _fx(arch)
    nodes = [n for n in names(model)[1] if n != "x"]
    extractor = create(model, return_nodes={n: n for n in nodes})
    with torch.no_grad():
        out = extractor(torch.empty(1, 3, PROBE_SIZE, PROBE_SIZE, device="meta"))
    return tuple((n, tuple(out[n].shape)) for n in nodes if isinstance(out.get(n), Tensor))


def resolve(arch: str, name: str) -> tuple[str, tuple[int, ...]]:
    """The node a fork name means (itself, or a module's last node) and its output shape."""
    found = [(n, s) for n, s in graph_shapes(arch) if n == name or n.startswith(name + ".")]
    if not found:
        raise ValueError(f"unknown fork point '{name}' for {arch}; python train.py --list-fork-points {arch} "
                         "lists them")
    return found[-1]


def _is_feature_map(shape: tuple[int, ...]) -> bool:
    return len(shape) == 4 and shape[2] > 1 and shape[3] > 1


def candidates(arch: str) -> list[tuple[str, tuple[int, ...]]]:
    """Modules at depth one or two (``layer3``, ``layer3.1``) that output a [B, C, H, W] feature map, in
    graph order; of names meaning the same node, the shortest."""
    shapes = graph_shapes(arch)
    position = {node: i for i, (node, _) in enumerate(shapes)}
    names = dict.fromkeys(".".join(node.split(".")[:depth]) for node, _ in shapes for depth in (1, 2))
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name in names:
        end, shape = resolve(arch, name)
        if _is_feature_map(shape) and end not in found:
            found[end] = (name, shape)
    return [found[end] for end in sorted(found, key=position.__getitem__)]


@cache
def stage_ends(arch: str) -> tuple[str, ...]:
    """The output of every stage: timm's feature_info, or the last candidate at each resolution."""
    if arch.startswith("timm:"):
        return tuple(info["module"] for info in _on_meta(arch).feature_info)
    last: dict[tuple[int, ...], str] = {}
    for name, shape in candidates(arch):
        last[shape[2:]] = name  # dicts keep first-insertion order: stages in depth order
    return tuple(last.values())


def fork_points(arch: str, fork_at: Sequence[str] | None = None) -> tuple[str, str]:
    """(shallow, deep): the two given names in graph order, or the stage outputs before the last stage."""
    if fork_at is None:
        ends = stage_ends(arch)
        if len(ends) < 3:
            raise ValueError(f"{arch} has no two stages before its last one; choose the fork points with --fork-at")
        fork_at = list(ends[-3:-1])
    if len(fork_at) != 2:
        raise ValueError(f"--fork-at takes two fork points (for aux2 and aux1), got {len(fork_at)}")
    order = [n for n, _ in graph_shapes(arch)]
    nodes = []
    for name in fork_at:
        node, shape = resolve(arch, name)
        if not _is_feature_map(shape):
            raise ValueError(f"fork point '{name}' of {arch} outputs shape {list(shape)} at {PROBE_SIZE} px, "
                             "not a [B, C, H, W] feature map")
        nodes.append((order.index(node), name))
    if nodes[0][0] == nodes[1][0]:
        raise ValueError(f"the two fork points {', '.join(fork_at)} of {arch} are the same node")
    return tuple(name for _, name in sorted(nodes))  # type: ignore[return-value]


def generic_branch(arch: str, fork: str, num_classes: int) -> Branch:
    _, shape = resolve(arch, fork)
    halvings = round(math.log2(shape[2] / resolve(arch, stage_ends(arch)[-1])[1][2]))
    channels, stride = shape[1], 2 if halvings > 0 else 1
    stages = {
        f"conv{i + 1}": nn.Sequential(nn.Conv2d(channels, channels, 3, stride, 1, bias=False),
                                      nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        for i in range(max(1, halvings))
    }
    branch = Branch(stages, nn.Linear(channels, num_classes))
    init_weights(branch)
    return branch


def _window_means(n_in: int, n_out: int, like: Tensor) -> Tensor:
    """[n_out, n_in]: row i averages adaptive pooling's window i, inputs floor(i*n_in/n_out) to
    ceil((i+1)*n_in/n_out) - 1."""
    i = torch.arange(n_out, device=like.device)[:, None]
    j = torch.arange(n_in, device=like.device)
    inside = (j >= i * n_in // n_out) & (j < ((i + 1) * n_in + n_out - 1) // n_out)
    return (inside / inside.sum(1, keepdim=True)).to(like.dtype)


def adaptive_avg_pool2d(x: Tensor, output_size: int | tuple[int | None, int | None]) -> Tensor:
    """F.adaptive_avg_pool2d; with deterministic algorithms on and a backward to come, as two products with
    averaging matrices, whose CUDA backward is deterministic (adaptive_avg_pool2d's raises). A 1x1 pool
    needs neither: PyTorch computes it as a mean."""
    h, w = x.shape[-2:]
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
    oh, ow = oh or h, ow or w
    if (oh, ow) == (1, 1) or not (torch.are_deterministic_algorithms_enabled() and x.requires_grad):
        return F.adaptive_avg_pool2d(x, output_size)
    return _window_means(h, oh, x) @ x @ _window_means(w, ow, x).T


class DeterministicAdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """nn.AdaptiveAvgPool2d through `adaptive_avg_pool2d`: no parameters, so state dicts stay stock."""

    def forward(self, x: Tensor) -> Tensor:
        return adaptive_avg_pool2d(x, self.output_size)


def deterministic_pools(trunk: nn.Module) -> None:
    """Swap the traced trunk's adaptive average pools (leaf modules of its graph, called by name)."""
    for name, module in list(trunk.named_modules()):
        if type(module) is nn.AdaptiveAvgPool2d:
            trunk.set_submodule(name, DeterministicAdaptiveAvgPool2d(module.output_size))


class BackboneNet(BranchedNet):
    """A stock torchvision/timm network under ``trunk``, with generic ``aux1``/``aux2`` branches."""

    stock_prefix = STOCK_PREFIX

    def __init__(self, arch: str, num_classes: int, in_channels: int, with_branches: bool,
                 fork_at: Sequence[str] | None = None):
        super().__init__()
        if arch.startswith("tv:") and in_channels not in (1, 3):
            raise ValueError(f"{arch} takes 3-channel images (1-channel images are repeated); got {in_channels}")
        # torchvision models are built for RGB: gray images are repeated to 3 channels, the weights stay stock.
        self.repeat_gray = arch.startswith("tv:") and in_channels == 1
        stock = _stock(arch, num_classes, 1 if self.repeat_gray else in_channels)
        names, create = _fx(arch)
        final = names(stock)[0][-1]
        nodes = {final: "main"}
        self.forks: tuple[str, ...] = ()
        if with_branches:
            self.forks = fork_points(arch, fork_at)
            nodes = {self.forks[0]: "shallow", self.forks[1]: "deep", **nodes}
        self.trunk = create(stock, return_nodes=nodes)
        deterministic_pools(self.trunk)
        if with_branches:
            self.set_branches(generic_branch(arch, self.forks[1], num_classes),
                              generic_branch(arch, self.forks[0], num_classes))

    def forward_trunk(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.repeat_gray:
            x = x.expand(-1, 3, -1, -1)
        out = self.trunk(x)
        return out.get("shallow"), out.get("deep"), out["main"]  # type: ignore[return-value]

    def forward_main(self, x: Tensor) -> Tensor:
        return x  # the trunk's own head already ran


def build(arch: str, num_classes: int, in_channels: int, with_branches: bool,
          fork_at: Sequence[str] | None = None) -> BackboneNet:
    return BackboneNet(arch, num_classes, in_channels, with_branches, fork_at)


def branch_summary(model: BranchedNet, image_size: int) -> list[str]:
    """One line per generic branch: fork point, depth, width and forward FLOPs per image next to the trunk's."""
    from . import create_model

    if not isinstance(model, BackboneNet) or model.num_heads == 1:
        return []
    config = model.build_config
    with torch.device("meta"):
        copy = create_model(model.arch, method="dhm", **config)
        x = torch.empty(1, config["in_channels"], image_size, image_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        copy.eval()(x, all_heads=True)
    flops = {k.removeprefix("BackboneNet."): sum(v.values()) for k, v in counter.get_flop_counts().items()}
    lines = [f"trunk {model.arch}: {flops.get('trunk', 0) / 1e6:.1f} MFLOPs per image at {image_size} px"]
    for head, fork in zip(("aux2", "aux1"), model.forks, strict=True):
        conv = getattr(model, head).conv1[0]
        lines.append(f"{head} at {fork}: {len(getattr(model, head).stage_names)} conv(s) 3x3 stride {conv.stride[0]}, "
                     f"width {conv.out_channels}, {flops.get(head, 0) / 1e6:.1f} MFLOPs per image")
    return lines


def check(arch: str, fork_at: Sequence[str] | None, with_branches: bool = True) -> None:
    """ValueError (one line) for an unknown network or fork point: called before any data is read."""
    if not is_backbone(arch):
        if fork_at:
            raise ValueError(f"--fork-at is for tv:NAME and timm:NAME networks; {arch} forks where the paper does")
        return
    stock_constructor(arch)
    if with_branches:
        fork_points(arch, fork_at)


def fork_point_lines(arch: str) -> list[str]:
    """--list-fork-points: every candidate with its shape; stage outputs and the defaults marked."""
    if not is_backbone(arch):
        from . import MODEL_NAMES

        if arch not in MODEL_NAMES:
            raise ValueError(f"unknown arch '{arch}'; choose one of {', '.join(MODEL_NAMES)}, tv:NAME or timm:NAME")
        return [f"{arch} is one of the paper's networks: its branches fork where the paper's do (docs/backbones.md); "
                "--fork-at is for tv:NAME and timm:NAME networks"]
    stock_constructor(arch)
    ends = {resolve(arch, name)[0] for name in stage_ends(arch)}
    try:
        defaults = dict(zip(fork_points(arch), ("aux2 (default)", "aux1 (default)"), strict=True))
    except ValueError:
        defaults = {}
    lines = [f"fork points of {arch} with their output shape at {PROBE_SIZE} px (any fx node name with a [B, C, H, W] "
             "output works too):"]
    for name, shape in candidates(arch):
        marks = ["stage"] * (resolve(arch, name)[0] in ends) + [defaults.get(name, "")]
        lines.append(f"  {name:32s} {str(list(shape)):24s} {' '.join(marks)}".rstrip())
    if defaults:  # the default branches' cost
        from . import create_model

        with torch.device("meta"):
            lines += ["", *branch_summary(create_model(arch, 1000), PROBE_SIZE)]
    return lines
