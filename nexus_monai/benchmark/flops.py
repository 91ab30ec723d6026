"""Every multiply-add of a network, counted from its modules while it runs, with the time of each part.

:class:`NetworkProfile` (a context manager) hooks the modules of a network (NexusINR-like) and, for
every call, counts multiply-adds (MACs; FLOPs = 2 x MACs) and measures the time:

* ``nn.Conv3d``: output voxels x kernel volume x in / groups x out (per batch item);
* ``nn.Linear``: rows x in x out;
* the KD-Attn window attention (:class:`~nexus_monai.networks.attention.LocalWindowCrossAttention`,
  recognised by its ``offsets`` / ``heads``): its own products q.k and attn.v, 2 x points x window x
  heads x head dims (its Linear layers -- queries, keys/values, positional MLP, output -- count as
  Linear layers).

Normalisations, activations, softmax, gathers and interpolations are not multiply-add products and are
not counted as FLOPs (their time is in the parts' times); the bytes the memory-bound steps read are
counted instead (:meth:`NetworkProfile.summary`: the KD-Attn window rows, ``points x window x 2C x 4``
per attention call; the trilinear lookups of the rest, ``points x (maps x 8 corners x C + images x 8)
x 4``), so each part has a bound: FLOPs / peak GEMM or bytes / memory bandwidth, the larger.
Parts, by the module's name in the network:
``encoders`` (``encoders.*``), ``attention`` (``attn_*``, incl. its key projection on the key grid),
``fusion_mlps`` (MMF ``proj``, SEL ``seg_head`` / ``seg_fuse``, ``modality_classifier``),
``decoder_mlps`` (``decoders.*``), ``other`` (anything else, e.g. a positional encoding).
Op kinds (``conv3d 3x3x3 48->16``, ``linear 33->128``, ``window attention q.k + attn.v``) get their
own calls, MACs and seconds: their rates at the shapes the inference really uses.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict

import torch
from torch import nn

from nexus_monai.benchmark.machine import best_seconds

__all__ = ["PARTS", "NetworkProfile", "part_of", "part_row", "module_macs", "attention_macs", "attention_probe"]

PARTS = ("encoders", "attention", "fusion_mlps", "decoder_mlps", "other")
_FUSION = ("proj", "seg_head", "seg_fuse", "modality_classifier")


def part_of(name: str) -> str:
    """The part of a module by its qualified name in the network."""
    head = name.split(".")[0]
    if head == "encoders":
        return "encoders"
    if head.startswith("attn"):
        return "attention"
    if head in _FUSION:
        return "fusion_mlps"
    if head == "decoders":
        return "decoder_mlps"
    return "other"


def _is_window_attention(m: nn.Module) -> bool:
    return hasattr(m, "offsets") and hasattr(m, "heads") and hasattr(m, "window")


def module_macs(m: nn.Module, inputs: tuple, output) -> int:
    """Multiply-adds of one call of a Conv3d / Linear (0 for other modules)."""
    if isinstance(m, nn.Conv3d):
        kernel = math.prod(m.kernel_size)
        return int(output.numel() * kernel * (m.in_channels // m.groups))  # numel = batch x out voxels x out channels
    if isinstance(m, nn.Linear):
        return int(output.numel() // m.out_features * m.in_features * m.out_features)
    return 0


def attention_macs(m: nn.Module, query: torch.Tensor) -> int:
    """The window attention's own products: q.k and attn.v, each points x window x C (C = heads x dims)."""
    points = query.numel() // query.shape[-1]
    return int(2 * points * len(m.offsets) * m.dim)


def _kind(m: nn.Module) -> str:
    if isinstance(m, nn.Conv3d):
        k = "x".join(str(s) for s in m.kernel_size)
        return f"conv3d {k} {m.in_channels}->{m.out_channels}"
    if isinstance(m, nn.Linear):
        return f"linear {m.in_features}->{m.out_features}"
    return "window attention q.k + attn.v"


class NetworkProfile:
    """While active: MACs and seconds per part and per op kind, the time of the parts' calls, and
    the points decoded (rows entering the first decoder). ``summary()`` gives a JSON-ready dict."""

    def __init__(self, network: nn.Module, sync=None):
        self.net = network.module if hasattr(network, "module") else network
        self._sync = sync or (lambda: None)  # e.g. torch.cuda.synchronize: before every timer read
        self.macs = defaultdict(int)
        self.bytes = defaultdict(int)  # bytes read by the memory-bound steps (gathers), per part
        self.part_seconds = defaultdict(float)
        self.kinds: dict[str, dict] = {}
        self.method_seconds = defaultdict(float)
        self.points = self.max_rows = self.calls = 0
        self._start: dict[int, list[float]] = defaultdict(list)
        self._handles: list = []
        self._wrapped: list[str] = []

    # -- hooks ---------------------------------------------------------------------------------
    def _leaf(self, name: str, m: nn.Module) -> None:
        part, kind = part_of(name), _kind(m)

        def pre(mod, inputs):
            self._sync()
            self._start[id(mod)].append(time.perf_counter())

        def post(mod, inputs, output):
            self._sync()
            seconds = time.perf_counter() - self._start[id(mod)].pop()
            macs = attention_macs(mod, inputs[0]) if _is_window_attention(mod) else module_macs(mod, inputs, output)
            self.macs[part] += macs
            if _is_window_attention(mod):  # the window's key / value rows every point reads
                q = inputs[0]
                self.bytes[part] += q.numel() // q.shape[-1] * len(mod.offsets) * 2 * mod.dim * 4
            entry = self.kinds.setdefault(kind, {"kind": kind, "calls": 0, "macs": 0, "seconds": 0.0})
            entry["calls"] += 1
            entry["macs"] += macs
            if not _is_window_attention(mod):  # the attention call's time includes its Linear layers
                entry["seconds"] += seconds

        self._handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]

    def _timed_part(self, m: nn.Module, part: str, count_points: bool = False) -> None:
        def pre(mod, inputs):
            if count_points:
                x = inputs[0]
                rows = x.numel() // max(x.shape[-1], 1)
                self.points += rows
                self.max_rows = max(self.max_rows, rows)
                self.calls += 1
            self._sync()
            self._start[-id(mod)].append(time.perf_counter())

        def post(mod, inputs, output):
            self._sync()
            self.part_seconds[part] += time.perf_counter() - self._start[-id(mod)].pop()

        self._handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]

    def _timed_method(self, owner: nn.Module, name: str, key: str) -> None:
        method = getattr(owner, name)

        def timed(*args, **kwargs):
            self._sync()
            t0 = time.perf_counter()
            out = method(*args, **kwargs)
            self._sync()
            self.method_seconds[key] += time.perf_counter() - t0
            return out

        setattr(owner, name, timed)  # an instance attribute over the method, removed on exit
        self._wrapped.append((owner, name))

    def __enter__(self) -> "NetworkProfile":
        for name, m in self.net.named_modules():
            if isinstance(m, (nn.Conv3d, nn.Linear)) or _is_window_attention(m):
                self._leaf(name, m)
        for enc in getattr(self.net, "encoders", {}).values():
            self._timed_part(enc, "encoders")
        first = next(iter(self.net.decoders)) if hasattr(self.net, "decoders") else None
        for name, dec in getattr(self.net, "decoders", {}).items():
            self._timed_part(dec, "decoder_mlps", count_points=name == first)
        for name in ("attn_t2", "attn_t1"):
            attn = getattr(self.net, name, None)
            if isinstance(attn, nn.Module):
                self._timed_part(attn, "attention")
                self._timed_method(attn, "project_keys", "attention_keys")
        for name in _FUSION:
            mod = getattr(self.net, name, None)
            if isinstance(mod, nn.ModuleDict):
                for sub in mod.values():
                    self._timed_part(sub, "fusion_mlps")
            elif isinstance(mod, nn.Module):
                self._timed_part(mod, "fusion_mlps")
        for name in ("encode", "add_attention_keys", "decode"):
            if hasattr(self.net, name):
                self._timed_method(self.net, name, name)
        consistency = getattr(self.net, "consistency", None)  # the any-protocol soft data-consistency step
        if isinstance(consistency, nn.Module) and hasattr(consistency, "on_grid"):
            self._timed_method(consistency, "on_grid", "consistency")
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for owner, name in reversed(self._wrapped):
            delattr(owner, name)
        self._wrapped.clear()

    # -- results -------------------------------------------------------------------------------
    def lookup_bytes(self) -> int:
        """Bytes the trilinear lookups of the decoded points read (the rest's memory-bound work): per point
        and feature map 8 corners x C floats, per LR image 8 floats (one lookup per map and point)."""
        maps = len(getattr(self.net, "encoders", {}))
        c = int(getattr(self.net, "features", 0))
        images = 2 if maps else 0
        return int(self.points * (maps * 8 * c + images * 8) * 4)

    def summary(self, total_seconds: float, peak_flops_per_s: float,
                bandwidth_bytes_per_s: float | None = None) -> dict:
        """Per part and for the whole call: seconds, FLOPs, attainable seconds at ``peak_flops_per_s``, ratio;
        with ``bandwidth_bytes_per_s`` also each part's bytes, its bound (the larger of FLOPs / peak and
        bytes / bandwidth: ``bound_kind`` "gemm" or "memory") and ``ratio_to_bound``.

        ``attention`` time = the attention calls + the key projection on the key grid; ``other``
        time = everything of the whole call not in a listed part (lookups, concatenations, the empty
        test, tiling, intensity scaling).
        """
        seconds = {p: self.part_seconds.get(p, 0.0) for p in PARTS}
        seconds["attention"] += self.method_seconds.get("attention_keys", 0.0)
        seconds["other"] = total_seconds - sum(seconds[p] for p in PARTS if p != "other")
        nbytes = {p: self.bytes.get(p, 0) for p in PARTS}
        nbytes["other"] += self.lookup_bytes()
        parts = {p: part_row(seconds[p], self.macs.get(p, 0), nbytes[p], peak_flops_per_s, bandwidth_bytes_per_s)
                 for p in PARTS}
        kinds = []
        for entry in sorted(self.kinds.values(), key=lambda e: -e["macs"]):
            flops = 2.0 * entry["macs"]
            secs = entry["seconds"] if entry["seconds"] > 0 else None
            kinds.append({**entry, "flops": flops, "flops_per_s": flops / secs if secs else None,
                          "fraction_of_peak": flops / secs / peak_flops_per_s if secs else None})
        whole = part_row(total_seconds, sum(self.macs.values()), sum(nbytes.values()), peak_flops_per_s,
                         bandwidth_bytes_per_s)
        return {"parts": parts, "whole": whole, "op_kinds": kinds,
                "points": int(self.points), "calls": int(self.calls), "max_rows": int(self.max_rows),
                "method_seconds": dict(self.method_seconds)}


def part_row(seconds: float, macs: int, nbytes: int, peak_flops_per_s: float,
             bandwidth_bytes_per_s: float | None = None) -> dict:
    """One part's row: time, FLOPs, attainable time at the GEMM peak and ratio; with a bandwidth also its
    bytes, memory time, bound = max(FLOPs / peak, bytes / bandwidth), which one binds, and time / bound."""
    flops = 2.0 * macs
    attainable = flops / peak_flops_per_s
    row = {"seconds": seconds, "flops": flops, "attainable_s": attainable,
           "ratio_to_attainable": seconds / attainable if attainable > 0 else None, "bytes": int(nbytes)}
    if bandwidth_bytes_per_s:
        memory_s = nbytes / bandwidth_bytes_per_s
        bound = max(attainable, memory_s)
        row.update({"memory_s": memory_s, "bound_s": bound,
                    "bound_kind": "memory" if memory_s > attainable else "gemm",
                    "ratio_to_bound": seconds / bound if bound > 0 else None})
    return row


def attention_probe(network: nn.Module, key_shape, points: int, peak_flops_per_s: float, repeats: int = 3,
                    seed: int = 0, sync=None) -> dict | None:
    """The window attention's own steps timed alone at a real shape: ``points`` queries of a 1 mm output
    grid into a key map of ``key_shape`` with 2 mm slabs along z (the T1 grid of the benchmark: two
    sub-voxel phases), with the network's first attention module, on the module's device (``sync``
    before every timer read): the window rows' gather (``index_select`` of whole key / value rows), the
    positional table (window index, signatures, the MLP once per signature and offset) and the whole
    forward. ``None`` for a network without one."""
    net = network.module if hasattr(network, "module") else network
    attn = next((m for m in net.modules() if _is_window_attention(m)), None)
    if attn is None:
        return None
    gen = torch.Generator().manual_seed(seed)
    c, w = attn.dim, len(attn.offsets)
    dev = attn.offsets.device
    shape = [int(s) for s in key_shape]
    key_map = torch.randn(1, c, *shape, generator=gen).to(dev)
    # output voxels in C order over the key map's interior: index = (x, y, z / 2 - 0.25) in the key grid
    side = max(1, round((points / 2) ** (1 / 3)))
    out = [min(side, max(1, shape[0] - 2)), min(side, max(1, shape[1] - 2)), max(1, points // (side * side))]
    axes = [torch.arange(n, dtype=torch.float32) for n in out]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)[:points]
    index = (grid * torch.tensor([1.0, 1.0, 0.5]) + torch.tensor([1.0, 1.0, 0.75]))
    index = torch.minimum(index, torch.tensor(shape, dtype=torch.float32) - 1)[None].to(dev)
    k = index.shape[1]
    query = torch.randn(1, k, c, generator=gen).to(dev)
    with torch.inference_mode():
        kv = attn.project_keys(key_map)
        flat, rel, keys = attn.window_index(index, shape)
        rows = flat.reshape(-1)
        gather_s = best_seconds(lambda: kv[0].index_select(0, rows), repeats, sync)
        table_s = best_seconds(lambda: attn.positional_table(*attn.window_index(index, shape)[1:]), repeats, sync)
        phases = attn.positional_table(rel, keys)[0].shape[0]
        whole_s = best_seconds(lambda: attn(query, key_map, index, kv), repeats, sync)
    pos_macs = phases * w * sum(m.in_features * m.out_features for m in attn.pos.modules() if isinstance(m, nn.Linear))
    own_macs = 2 * k * w * c
    linear_macs = k * (c * c + c * c) + pos_macs  # to_q, out, positional MLP (once per phase and offset)
    gathered = k * w * 2 * c * 4
    return {
        "points": int(k), "window": int(w), "dim": int(c), "heads": int(attn.heads), "key_shape": shape,
        "phases": int(phases), "gather_s": gather_s, "gather_bytes_per_s": gathered / gather_s,
        "positional_table_s": table_s,
        "forward_s": whole_s, "forward_flops": 2.0 * (own_macs + linear_macs),
        "forward_flops_per_s": 2.0 * (own_macs + linear_macs) / whole_s,
        "forward_fraction_of_peak": 2.0 * (own_macs + linear_macs) / whole_s / peak_flops_per_s,
        "forward_bytes_per_s": gathered / whole_s, "us_per_point": whole_s / k * 1e6,
    }
