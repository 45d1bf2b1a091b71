"""Foreign PyTorch checkpoints: unwrap, infer the architecture from tensor shapes, map keys, convert shortcuts.

A checkpoint made elsewhere is a state dict, bare or inside a container (``state_dict``, ``model``,
``net``, ``ema``, ... next to epoch, optimizer and accuracy entries), with DataParallel / wrapper prefixes.
Its keys are mapped onto a registry model's keys by rules tried in order, each recorded per key:

1. ``rename``: the user's ``--rename OLD=NEW`` regexes, then an exact name match;
2. ``name``: the same name after the prefixes are stripped;
3. ``alias``: the same name after common spellings are canonicalised (``linear``/``classifier``/``head``
   -> ``fc``, ``downsample`` -> ``shortcut``, ``conv_1`` -> ``conv1``, ``stage_1`` -> ``layer1``, ...);
4. ``order``: what is left, matched one to one in module order, every tensor shape checked.

Anything ambiguous or incomplete is refused with one line naming the first unmatched key and what was
expected. CIFAR ResNets with the zero-padding identity shortcuts of He et al. (2016, "option A") are
converted exactly into the registry's projection form: a stride-2 1x1 convolution whose weight embeds
input channel c into output channel c + planes//4 (the padding's offset), followed by an identity
BatchNorm. The converted shortcut is checked against the zero-padding it replaces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from resopt.errors import InputFileError, UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn

CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "ema", "model_ema",
                  "state_dict_ema", "ema_state_dict", "weights", "params")
WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.", "net.")

# (pattern, replacement) applied to both sides for the ``alias`` rule: spellings of the same module.
ALIASES: tuple[tuple[str, str], ...] = (
    (r"(^|\.)(linear|classifier|head|fc_out|logits)\.", r"\1fc."),
    (r"(^|\.)(downsample|shortcut|proj|projection|skip)\.conv\.", r"\1shortcut.0."),
    (r"(^|\.)(downsample|shortcut|proj|projection|skip)\.(bn|norm)\.", r"\1shortcut.1."),
    (r"(^|\.)(downsample|proj|projection|skip)\.", r"\1shortcut."),
    (r"(^|\.)(stage|layer|res|block)_?(\d+)\.", r"\1layer\3."),
    (r"(^|\.)conv_(\d+)\.", r"\1conv\2."),
    (r"(^|\.)(bn|norm)_?(\d+)\.", r"\1bn\3."),
    (r"^(stem\.conv|conv_?stem|stem_conv|conv0)\.", "conv1."),
    (r"^(stem\.bn|bn_?stem|stem_bn|bn0)\.", "bn1."),
)

CIFAR_DEPTHS = {20: "resnet20", 32: "resnet32", 44: "resnet44", 56: "resnet56", 110: "resnet110"}
TV_ARCHS = {("basic", (2, 2, 2, 2)): "resnet18", ("basic", (3, 4, 6, 3)): "resnet34",
            ("bottleneck", (3, 4, 6, 3)): "resnet50"}


def canonical(name: str) -> str:
    for pattern, repl in ALIASES:
        name = re.sub(pattern, repl, name)
    return name


def unwrap_state_dict(obj: Any, source: str) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a loaded checkpoint and where they were found (``state_dict``, ``bare``, ...)."""
    import torch

    def tensors(d: Any) -> bool:
        return isinstance(d, dict) and len(d) > 0 and all(isinstance(v, torch.Tensor) for v in d.values())

    if tensors(obj):
        return dict(obj), "bare state dict"
    if isinstance(obj, dict):
        for key in CONTAINER_KEYS:
            if tensors(obj.get(key)):
                return dict(obj[key]), f"container key {key!r}"
        # A nested container (e.g. {"model": {"state_dict": ...}}).
        for key in CONTAINER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict):
                for k2 in CONTAINER_KEYS:
                    if tensors(inner.get(k2)):
                        return dict(inner[k2]), f"container key {key!r} -> {k2!r}"
        keys = ", ".join(map(str, list(obj)[:6]))
        raise InputFileError(f"{source} holds no state dict (top-level keys: {keys}); expected a bare state dict "
                             f"or one of the container keys {', '.join(CONTAINER_KEYS[:5])}, ...",
                             hint="re-save it with torch.save(model.state_dict(), PATH)")
    raise InputFileError(f"{source} holds a {type(obj).__name__}, not a state dict",
                         hint="re-save it with torch.save(model.state_dict(), PATH)")


def strip_prefixes(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Drop wrapper prefixes (``module.`` of DataParallel, ``model.``, ...) that every key shares."""
    stripped: list[str] = []
    changed = True
    while changed:
        changed = False
        for p in WRAPPER_PREFIXES:
            if sd and all(k.startswith(p) for k in sd):
                sd = {k[len(p):]: v for k, v in sd.items()}
                stripped.append(p)
                changed = True
    return sd, stripped


def parse_renames(items: list[str] | tuple[str, ...]) -> list[tuple[re.Pattern[str], str]]:
    out = []
    for item in items:
        if "=" not in item:
            raise UsageError(f"--rename {item!r} is not OLD=NEW (a regex and its replacement)")
        old, new = item.split("=", 1)
        try:
            out.append((re.compile(old), new))
        except re.error as e:
            raise UsageError(f"--rename {item!r}: {old!r} is not a valid regex ({e})") from None
    return out


def _weights(sd: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in sd.items() if k.endswith("weight")]


# ------------------------------------------------------------------------------------- architecture


@dataclass(frozen=True)
class ArchGuess:
    arch: str
    width: float
    num_classes: int
    option_a: bool  # zero-padding identity shortcuts (no parameters) to convert into projections
    reason: str


def infer_arch(sd: dict[str, torch.Tensor], forced: str | None, source: str) -> ArchGuess:
    """The registry architecture a state dict fits, from its tensor shapes (and ``--arch`` if given)."""
    convs = [(k, v) for k, v in _weights(sd) if v.dim() == 4]
    linears = [(k, v) for k, v in _weights(sd) if v.dim() == 2]
    if not convs or not linears:
        raise InputFileError(f"{source} has no convolution or no linear weights; not a ResNet image classifier")
    stem_name, stem = convs[0]
    fc_name, fc = linears[-1]
    num_classes = int(fc.shape[0])
    names = [canonical(k) for k in sd]
    blocks: dict[int, set[int]] = {}
    for n in names:
        m = re.match(r"layer(\d+)\.(\d+)\.", n)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    per_stage = tuple(len(blocks[s]) for s in sorted(blocks))
    bottleneck = any(".conv3." in n for n in names)
    stem_k = int(stem.shape[-1])
    stem_out = int(stem.shape[0])
    if forced is None:
        if stem_k == 7 and len(per_stage) == 4:
            kind = "bottleneck" if bottleneck else "basic"
            forced = TV_ARCHS.get((kind, per_stage))
            why = f"7x7 stem, {kind} blocks {list(per_stage)}"
        elif stem_k == 3 and len(per_stage) == 4 and not bottleneck and per_stage == (2, 2, 2, 2):
            forced, why = "resnet18-cifar", "3x3 stem, basic blocks [2, 2, 2, 2]"
        elif stem_k == 3 and len(per_stage) == 3 and len(set(per_stage)) == 1:
            depth = 6 * per_stage[0] + 2
            forced, why = CIFAR_DEPTHS.get(depth), f"3x3 stem, 3 stages of {per_stage[0]} basic blocks (depth {depth})"
        else:
            why = f"{stem_k}x{stem_k} stem, blocks per stage {list(per_stage) or 'not found in the key names'}"
        if forced is None:
            raise InputFileError(f"cannot infer the architecture of {source} ({why}, {len(convs)} convolutions, "
                                 f"classifier {fc_name} {list(fc.shape)})",
                                 hint="pass --arch (resopt info --archs), and --rename OLD=NEW for unusual key names")
    else:
        why = "--arch"
    from resopt.models import get_spec

    spec = get_spec(forced)
    base = 64 if spec.family in ("imagenet-resnet", "cifar-resnet18") else 16
    width = stem_out / base
    option_a = False
    if spec.family == "cifar-resnet":
        per_stage_blocks = (int(forced.replace("resnet", "")) - 2) // 6
        with_projection = 1 + 2 * 3 * per_stage_blocks + 2
        if len(convs) == with_projection - 2:
            option_a = True
        elif len(convs) != with_projection:
            raise InputFileError(f"{source} has {len(convs)} convolutions; {forced} has {with_projection} with 1x1 "
                                 f"projection shortcuts or {with_projection - 2} with zero-padding (option A) ones",
                                 hint="pass the right --arch (resopt info --archs)")
    return ArchGuess(forced, width, num_classes, option_a, why)


# ------------------------------------------------------------------------------------------ mapping


@dataclass
class Mapping:
    """target key -> (source key, rule); ``synthesized`` target keys were made, not mapped."""

    pairs: dict[str, tuple[str, str]] = field(default_factory=dict)
    synthesized: dict[str, str] = field(default_factory=dict)

    def rule_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, rule in self.pairs.values():
            counts[rule] = counts.get(rule, 0) + 1
        for rule in self.synthesized.values():
            counts[rule] = counts.get(rule, 0) + 1
        return counts

    def table(self) -> list[list[str]]:
        rows = [[t, s, rule] for t, (s, rule) in self.pairs.items()]
        return rows + [[t, "", rule] for t, rule in self.synthesized.items()]


def option_a_shortcuts(model: nn.Module) -> list[str]:
    """Module names of the projection shortcuts that stand in for option-A zero-padding shortcuts."""
    from torch import nn

    return [name for name, m in model.named_modules()
            if name.endswith("shortcut") and isinstance(m, nn.Sequential) and len(m) == 2]


def map_state_dict(source_sd: dict[str, torch.Tensor], target_sd: dict[str, torch.Tensor], *,
                   renames: list[tuple[re.Pattern[str], str]], skip_targets: set[str], source: str) -> Mapping:
    """Assign every target tensor a source tensor (rules above); refuse gaps, leftovers and ambiguities."""
    mapping = Mapping()
    targets = [k for k in target_sd if k not in skip_targets and not k.endswith("num_batches_tracked")]
    srcs = [k for k in source_sd if not k.endswith("num_batches_tracked")]
    taken: set[str] = set()

    def assign(t: str, s: str, rule: str) -> None:
        if tuple(source_sd[s].shape) != tuple(target_sd[t].shape):
            raise InputFileError(f"{source}: key {s} (shape {list(source_sd[s].shape)}) maps by {rule} to {t}, "
                                 f"which expects shape {list(target_sd[t].shape)}",
                                 hint="pass the right --arch, or --rename OLD=NEW to map it elsewhere")
        mapping.pairs[t] = (s, rule)
        taken.add(s)

    renamed = {}
    for s in srcs:
        n = s
        for pattern, repl in renames:
            n = pattern.sub(repl, n)
        renamed[s] = n
    target_set = set(targets)
    for s in srcs:
        n = renamed[s]
        if n in target_set and n not in mapping.pairs:
            assign(n, s, "rename" if n != s else "name")
    canon_targets: dict[str, str] = {}
    for t in targets:
        if t not in mapping.pairs:
            canon_targets.setdefault(canonical(t), t)
    claimed: dict[str, str] = {}
    for s in srcs:
        if s in taken:
            continue
        alias = canon_targets.get(canonical(renamed[s]))
        if alias is None or alias in mapping.pairs and alias not in claimed:
            continue
        if alias in claimed:
            raise InputFileError(f"{source}: keys {claimed[alias]} and {s} both map to {alias}; the mapping is "
                                 f"ambiguous", hint="pass --rename OLD=NEW to say which is which")
        claimed[alias] = s
        assign(alias, s, "alias")
    rest_s = [s for s in srcs if s not in taken]
    rest_t = [t for t in targets if t not in mapping.pairs]
    for s, t in zip(rest_s, rest_t, strict=False):
        assign(t, s, "order")
    if len(rest_s) > len(rest_t):
        s = rest_s[len(rest_t)]
        raise InputFileError(f"{source}: key {s} (shape {list(source_sd[s].shape)}) has no place in the target "
                             f"architecture (all {len(targets)} of its tensors are already mapped)",
                             hint="pass the right --arch, or --rename OLD=NEW")
    if len(rest_t) > len(rest_s):
        t = rest_t[len(rest_s)]
        raise InputFileError(f"{source}: nothing left to map onto {t} (expected a tensor of shape "
                             f"{list(target_sd[t].shape)}); the checkpoint has {len(srcs)} tensors, the target "
                             f"needs {len(targets)}", hint="pass the right --arch, or --rename OLD=NEW")
    return mapping


def build_state_dict(model: nn.Module, source_sd: dict[str, torch.Tensor], guess: ArchGuess, *,
                     renames: list[tuple[re.Pattern[str], str]], source: str) -> tuple[Mapping, float | None]:
    """Load ``source_sd`` into ``model`` (in place); returns the mapping and, for option A, the largest
    difference between each converted shortcut and the zero-padding it replaces."""
    import torch

    target_sd = model.state_dict()
    shortcuts = option_a_shortcuts(model) if guess.option_a else []
    skip = {k for k in target_sd for sc in shortcuts if k.startswith(sc + ".")}
    mapping = map_state_dict(source_sd, target_sd, renames=renames, skip_targets=skip, source=source)
    new_sd = {t: source_sd[s].detach().to(torch.float32 if source_sd[s].is_floating_point() else source_sd[s].dtype)
              for t, (s, _) in mapping.pairs.items()}
    for k, v in target_sd.items():
        if k.endswith("num_batches_tracked") and k not in new_sd:
            src = source_sd.get(k)
            new_sd[k] = src if src is not None else torch.zeros_like(v)
    modules = dict(model.named_modules())
    for sc in shortcuts:
        conv, bn = modules[sc][0], modules[sc][1]
        out_c, in_c = conv.weight.shape[:2]
        pad = out_c // 4
        if in_c + 2 * pad != out_c:
            raise InputFileError(f"{source}: block {sc.rsplit('.', 1)[0]} goes from {in_c} to {out_c} channels, "
                                 f"which zero-padding by planes//4 on each side cannot produce")
        w = torch.zeros(out_c, in_c, 1, 1)
        w[torch.arange(in_c) + pad, torch.arange(in_c), 0, 0] = 1.0
        new_sd[f"{sc}.0.weight"] = w
        # running_var = 1 - eps makes (x - 0) / sqrt(var + eps) exactly x: an identity BatchNorm.
        new_sd[f"{sc}.1.weight"] = torch.ones(out_c)
        new_sd[f"{sc}.1.bias"] = torch.zeros(out_c)
        new_sd[f"{sc}.1.running_mean"] = torch.zeros(out_c)
        new_sd[f"{sc}.1.running_var"] = torch.full((out_c,), 1.0 - bn.eps)
        new_sd[f"{sc}.1.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
        for k in (f"{sc}.0.weight", f"{sc}.1.weight", f"{sc}.1.bias", f"{sc}.1.running_mean", f"{sc}.1.running_var"):
            mapping.synthesized[k] = "option-A conversion"
    model.load_state_dict(new_sd, strict=True)
    model.eval()
    max_diff = None
    if shortcuts:
        import torch.nn.functional as F

        g = torch.Generator().manual_seed(0)
        max_diff = 0.0
        with torch.no_grad():
            for sc in shortcuts:
                conv = modules[sc][0]
                in_c, out_c = conv.in_channels, conv.out_channels
                x = torch.randn(4, in_c, 16, 16, generator=g)
                padded = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, out_c // 4, out_c // 4))
                max_diff = max(max_diff, float((modules[sc](x) - padded).abs().max()))
    return mapping, max_diff
