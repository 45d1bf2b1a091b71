"""Latency tables: what each residual block of a network costs on this machine's runtime, per width, and the
predictor pruning chooses against.

* ``describe_model`` turns a ResNet (the registry's CIFAR and torchvision ResNets: stages ``layer1``..) into an
  ``ArchDescription``: per block its stage, input map size and every conv's (in, out, groups, kernel, output
  map); a block-pruned network is the same description with blocks left out (``ArchDescription.without``).
* ``build_table`` measures, with bench's workers in one interleaved run, every block of the parent at each
  width fraction of ``fractions`` (all of the block's channel counts scaled, rounded to ``round_to``), each
  behind a 1x1 adapter with the adapter measured alone and subtracted, plus the whole parent once. Rows are
  cached per machine (``resopt.latency.cache``): another model with the same blocks reuses them.
* ``Predictor.predict(arch)`` takes the parent's measured latency less the time of what ``arch`` removes or
  narrows (a block the table has at exactly its widths is read; any other is interpolated between the
  measured widths of its family, by MACs); where the blocks measured one by one add up to more than the whole
  parent they are scaled down to fit it. The stem, head and per-call cost stay as measured.
  ``predict(...) / parent_ms`` is the latency fraction of a candidate.
"""

from __future__ import annotations

import copy
import hashlib
import json
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resopt.console import log
from resopt.errors import UsageError
from resopt.latency.cache import MachineKey, load_cached, machine_key, save_cached
from resopt.latency.measure import Row, Timing, adapter, check_measured, make_files, time_in_groups

if TYPE_CHECKING:
    from torch import nn

# Width fractions a table measures each block at: every eighth of the parent's channels.
FRACTIONS = (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25)


@dataclass(frozen=True)
class Conv:
    name: str  # within the block
    cin: int
    cout: int
    groups: int
    kernel: int
    out_size: int  # output map side

    @property
    def macs(self) -> int:
        return self.cin // self.groups * self.cout * self.kernel * self.kernel * self.out_size * self.out_size


@dataclass(frozen=True)
class BlockShape:
    """One residual block as the predictor sees it."""

    stage: int  # 1-based, as layer1..layer4
    index: int  # within its stage
    kind: str  # the block's class
    size: int  # input map side
    convs: tuple[Conv, ...]
    linears: tuple[tuple[str, int, int], ...] = ()  # (name, in, out), e.g. a squeeze-excite gate

    @property
    def macs(self) -> int:
        return sum(c.macs for c in self.convs) + sum(i * o for _, i, o in self.linears)

    @property
    def family(self) -> str:
        """What a block is apart from its widths: blocks of one family differ only in channel counts."""
        convs = ",".join(f"{c.name}/k{c.kernel}/{'dw' if c.groups == c.cin and c.groups > 1 else 'g1'}/o{c.out_size}"
                         for c in self.convs)
        return f"{self.kind}@{self.size}[{convs}][{','.join(n for n, _, _ in self.linears)}]"

    @property
    def signature(self) -> str:
        widths = ",".join(f"{c.cin}>{c.cout}" for c in self.convs) + "".join(f";{i}>{o}" for _, i, o in self.linears)
        return f"{self.family}{{{widths}}}"

    @property
    def in_channels(self) -> int:
        return self.convs[0].cin


@dataclass(frozen=True)
class ArchDescription:
    """A network as a sequence of residual blocks (what the latency of a pruned candidate is predicted from)."""

    blocks: tuple[BlockShape, ...]
    input_size: int

    def without(self, removed: Iterable[tuple[int, int]]) -> ArchDescription:
        """The same network with blocks ``(stage, index)`` removed (block pruning)."""
        gone = set(removed)
        return replace(self, blocks=tuple(b for b in self.blocks if (b.stage, b.index) not in gone))

    def blocks_per_stage(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for b in self.blocks:
            out[b.stage] = out.get(b.stage, 0) + 1
        return out


def stage_blocks(model: nn.Module) -> list[tuple[int, int, nn.Module]]:
    """(stage, index, block) of every residual block: the children of ``layer1``, ``layer2``, ..."""
    out = []
    for s in range(1, 5):
        stage = getattr(model, f"layer{s}", None)
        if stage is None:
            continue
        out += [(s, i, b) for i, b in enumerate(stage.children())]
    if not out:
        raise UsageError(f"{type(model).__name__} has no residual stages (layer1, layer2, ...): latency tables "
                         f"describe ResNets block by block", hint="prune it with --target-macs instead")
    return out


def describe_model(model: nn.Module, input_size: int) -> ArchDescription:
    """The ``ArchDescription`` of ``model`` at ``input_size`` (one forward pass with hooks)."""
    import torch
    from torch import nn

    blocks = stage_blocks(model)
    sizes: dict[int, int] = {}
    out_sizes: dict[int, int] = {}
    hooks = []
    for _, _, b in blocks:
        hooks.append(b.register_forward_hook(lambda m, i, o: sizes.__setitem__(id(m), int(i[0].shape[-1]))))
        for m in b.modules():
            if isinstance(m, nn.Conv2d):
                hooks.append(m.register_forward_hook(lambda m, i, o: out_sizes.__setitem__(id(m), int(o.shape[-1]))))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, input_size, input_size))
    finally:
        for h in hooks:
            h.remove()
    shapes = []
    for s, i, b in blocks:
        convs = tuple(Conv(n, m.in_channels, m.out_channels, m.groups, int(m.kernel_size[0]), out_sizes[id(m)])
                      for n, m in b.named_modules() if isinstance(m, nn.Conv2d))
        linears = tuple((n, m.in_features, m.out_features) for n, m in b.named_modules() if isinstance(m, nn.Linear))
        shapes.append(BlockShape(s, i, type(b).__name__, sizes[id(b)], convs, linears))
    return ArchDescription(tuple(shapes), input_size)


def scaled_channels(c: int, fraction: float, round_to: int | None) -> int:
    """``c`` channels scaled by ``fraction``, a multiple of ``round_to`` where given (never below one)."""
    n = max(1, round(c * fraction))
    if round_to and round_to > 1:
        n = max(round_to, int(round(n / round_to)) * round_to)
    return min(c, n) if c >= (round_to or 1) else c


def scaled_block(block: nn.Module, fraction: float, round_to: int | None = None) -> nn.Module:
    """A copy of ``block`` with every channel count scaled (what channel pruning at that fraction leaves):
    convs, batch norms and linears are replaced by fresh layers of the scaled shapes."""
    from torch import nn

    new = copy.deepcopy(block)

    def s(c: int) -> int:
        return scaled_channels(c, fraction, round_to)

    for name, m in list(new.named_modules()):
        repl: nn.Module | None = None
        if isinstance(m, nn.Conv2d):
            depthwise = m.groups == m.in_channels and m.groups > 1
            repl = nn.Conv2d(s(m.in_channels), s(m.out_channels), m.kernel_size,  # type: ignore[arg-type]
                             m.stride, m.padding, m.dilation,  # type: ignore[arg-type]
                             groups=s(m.in_channels) if depthwise else m.groups, bias=m.bias is not None)
        elif isinstance(m, nn.BatchNorm2d):
            repl = nn.BatchNorm2d(s(m.num_features))
        elif isinstance(m, nn.Linear):
            repl = nn.Linear(s(m.in_features), s(m.out_features), bias=m.bias is not None)
        if repl is not None and name:
            parent, _, attr = name.rpartition(".")
            setattr(new.get_submodule(parent) if parent else new, attr, repl)
    return new.eval()


@dataclass
class LatencyTable:
    """Measured rows of one machine key: block signature -> {family, macs, ms}; model signature -> ms."""

    key: MachineKey
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)

    def block_ms(self, b: BlockShape) -> float:
        """The block's measured time, or one interpolated by MACs between the measured widths of its family."""
        row = self.rows.get(b.signature)
        if row is not None:
            return float(row["ms"])
        family = sorted((r["macs"], r["ms"]) for r in self.rows.values() if r.get("family") == b.family)
        if not family:
            raise UsageError(f"the latency table has no block like {b.kind} at {b.size}x{b.size} (stage {b.stage})",
                             hint="build the table from this model (prune measures its parent's blocks)")
        macs = b.macs
        if len(family) == 1 or macs <= family[0][0]:
            m0, t0 = family[0]
            return t0 * macs / m0 if m0 else t0
        if macs >= family[-1][0]:
            m1, t1 = family[-1]
            return t1 * macs / m1
        for (m0, t0), (m1, t1) in zip(family, family[1:], strict=False):
            if m0 <= macs <= m1:
                return t0 + (t1 - t0) * (macs - m0) / (m1 - m0) if m1 > m0 else t0
        raise AssertionError("unreachable")

    def blocks_ms(self, arch: ArchDescription) -> float:
        return sum(self.block_ms(b) for b in arch.blocks)


@dataclass(frozen=True)
class Predictor:
    """Predicted latency of candidates of one parent (see the module doc): ``predict(arch) -> ms per batch``."""

    table: LatencyTable
    parent: ArchDescription
    parent_ms: float  # measured, whole model, batch ``table.key.batch``

    @property
    def scale(self) -> float:
        """How much of a block's measured time the whole model spends on it: 1, unless the blocks measured one
        by one add up to more than the whole model (each piece pays its own memory traffic and per-call
        cost), then scaled down so they add up to it."""
        return min(1.0, self.parent_ms / self.table.blocks_ms(self.parent))

    def predict(self, arch: ArchDescription) -> float:
        """The parent's measured time less what the blocks ``arch`` drops or narrows save: the stem, the head
        and the per-call cost stay (they dominate a tiny model at a small batch)."""
        saved = self.table.blocks_ms(self.parent) - self.table.blocks_ms(arch)
        return max(self.parent_ms - self.scale * saved, 0.0)

    def fraction(self, arch: ArchDescription) -> float:
        return self.predict(arch) / self.parent_ms


def model_signature(model: nn.Module, input_size: int) -> str:
    from resopt.models import model_widths

    text = json.dumps({"class": type(model).__name__, "size": input_size, "widths": model_widths(model)},
                      sort_keys=True)
    return "model:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _whole(model: nn.Module) -> nn.Module:
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.m(x)

    return Logits(copy.deepcopy(model).eval())


def build_predictor(model: nn.Module, input_size: int, *, runtime: str, precision: str, batch: int,
                    threads: int | None = None, fractions: tuple[float, ...] | None = None,
                    round_to: int | None = None, timing: Timing | None = None) -> Predictor:
    """The latency table of ``model``'s blocks on ``runtime``/``precision`` at ``batch`` (from the cache, measuring
    what is missing, with progress on stderr) and the parent's measured latency: a ``Predictor``."""
    import os

    import torch

    from resopt.envinfo import available_cores

    file_precision, options = check_measured(runtime, precision)
    threads = threads or available_cores()
    timing = timing or Timing()
    if fractions is None:  # RESOPT_LATENCY_FRACTIONS="1,0.5": the tests' short table
        env = os.environ.get("RESOPT_LATENCY_FRACTIONS")
        fractions = tuple(float(f) for f in env.split(",")) if env else FRACTIONS
    key = machine_key(runtime, precision, batch=batch, threads=threads)
    rows, why = load_cached(key)
    if why:
        log(why)
    table = LatencyTable(key, rows)
    parent = describe_model(model, input_size)
    parent_sig = model_signature(model, input_size)
    blocks = {(s, i): b for s, i, b in stage_blocks(model)}
    todo: dict[str, tuple[nn.Module, int, int]] = {}  # signature -> (module to time, map size, adapter width)
    for shape in parent.blocks:
        for f in fractions:
            piece = blocks[(shape.stage, shape.index)] if f == 1.0 else scaled_block(
                blocks[(shape.stage, shape.index)], f, round_to)
            pshape = describe_piece(piece, shape)
            if pshape.signature not in table.rows and pshape.signature not in todo:
                todo[pshape.signature] = (piece, shape.size, pshape.in_channels)
    adapters = {f"adapter:{c}@{size}": (c, size) for _, size, c in todo.values()}
    adapters = {k: v for k, v in adapters.items() if k not in table.rows}
    measure_parent = parent_sig not in table.rows
    n = len(todo) + len(adapters) + int(measure_parent)
    if n:
        log(f"latency table for {key.describe()}: {len(parent.blocks)} blocks x {len(fractions)} widths; "
            f"measuring {len(todo)} block shapes, {len(adapters)} adapters"
            f"{' and the whole model' if measure_parent else ''} ({n} files, bench's workers, "
            f"{timing.rounds} interleaved rounds)")
        with tempfile.TemporaryDirectory(prefix="resopt-latency-") as tmp:
            files: list[tuple[str, Path, dict[str, Any]]] = []
            for k, (sig, (piece, size, cin)) in enumerate(todo.items()):
                path = make_files(torch.nn.Sequential(adapter(cin), copy.deepcopy(piece)), size,
                                  Path(tmp) / f"b{k}", file_precision)
                files.append((sig, path, {"family": describe_piece(piece, None, size).family,
                                          "macs": describe_piece(piece, None, size).macs,
                                          "adapter": f"adapter:{cin}@{size}"}))
            for k, (sig, (cin, size)) in enumerate(adapters.items()):
                files.append((sig, make_files(adapter(cin), size, Path(tmp) / f"a{k}", file_precision), {}))
            if measure_parent:
                files.append((parent_sig, make_files(_whole(model), input_size, Path(tmp) / "parent",
                                                     file_precision), {}))
            ms = time_in_groups([Row(p, runtime, tuple(options.items())) for _, p, _ in files], batch=batch,
                                threads=threads, timing=timing, what="latency table")
        measured = {sig: {**info, "ms": t} for (sig, _, info), t in zip(files, ms, strict=True)}
        for info in measured.values():
            if "adapter" in info:
                # The block alone: the adapter's own time (measured in the same run) taken off, never below 2% of
                # what was measured (a block cannot be free).
                base = measured.get(info["adapter"], table.rows.get(info["adapter"], {"ms": 0.0}))["ms"]
                info["ms"] = max(info["ms"] - base, 0.02 * info["ms"])
        table.rows.update(measured)
        path = save_cached(key, table.rows)
        log(f"latency table cached in {path}")
    else:
        log(f"latency table for {key.describe()}: {len(parent.blocks)} blocks x {len(fractions)} widths, cached")
    return Predictor(table, parent, float(table.rows[parent_sig]["ms"]))


def describe_piece(piece: nn.Module, like: BlockShape | None, size: int | None = None) -> BlockShape:
    """The ``BlockShape`` of one block module at the input size of ``like`` (or ``size``)."""
    import torch

    size = like.size if like is not None else int(size or 0)
    holder = torch.nn.Module()
    holder.layer1 = torch.nn.Sequential(piece)  # type: ignore[assignment]
    first = next(m for m in piece.modules() if isinstance(m, torch.nn.Conv2d))

    class Probe(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = torch.nn.Conv2d(3, first.in_channels, 1)
            self.layer1: torch.nn.Module = holder.layer1  # type: ignore[assignment]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer1(self.stem(x))

    shape = describe_model(Probe(), size).blocks[0]
    return shape if like is None else replace(shape, stage=like.stage, index=like.index)


def measure_models(models: list[nn.Module], input_size: int, *, runtime: str, precision: str, batch: int,
                   threads: int | None = None, timing: Timing | None = None) -> list[float]:
    """Milliseconds per batch of each whole model, in one interleaved run of bench's workers."""
    from resopt.envinfo import available_cores

    file_precision, options = check_measured(runtime, precision)
    with tempfile.TemporaryDirectory(prefix="resopt-latency-") as tmp:
        paths = [make_files(_whole(m), input_size, Path(tmp) / f"m{k}", file_precision) for k, m in enumerate(models)]
        return time_in_groups([Row(p, runtime, tuple(options.items())) for p in paths], batch=batch,
                              threads=threads or available_cores(), timing=timing or Timing(), what="latency")
