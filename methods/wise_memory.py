"""WISE's side memory as a module adaptor (:class:`SideMemory`), its router and the TIES merge of its shards, after
the authors' code as EasyEdit ships it (``easyeditor/models/wise/WISE.py``, ``merge/gta.py``, ``merge/utils.py``).

The memory lives at one MLP output projection W0 and holds weight deltas from W0 (a side copy W0 + dW costs only
dW): the shard being edited and the shards saved before it (``memories``), each with the least in-scope
activation distance any of its edits reached (``min_act``). Routing ("WISE-Retrieve", the authors' default): for
each sequence, the distance between the activations of the original projection and of a side copy is the mean
over its tokens of ||act(W0 x) - act(W x)|| (``act`` = the model's MLP activation; the largest token distance for
sequences over 100 tokens); the original output is kept unless the current shard's distance reaches
``act_ratio * min_act``, and a saved shard takes over when its distance is larger still and reaches its own
threshold. Composition (``earlier + later``, one edit at a time, as the authors count edits): the later edit's
shard delta adds to the current shard, whose ``min_act`` takes the minimum; every ``save_freq`` edits the shard is
saved and a fresh one starts; every ``merge_freq`` edits the last ``merge_freq // save_freq`` saved shards are
merged into one by TIES (magnitude sparsification to ``density``, sign consensus by sum, normalised weights).

Departures: routing is decided per sequence on the positions the module sees first (padding left out by the
attention mask) and kept for the tokens a KV-cached decoding adds after them (EasyEdit routes each call anew and
leaves generation as a TODO); batches of several sequences are routed row by row (EasyEdit calls ``.item()``).
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

import torch
from torch import Tensor
from transformers.activations import ACT2FN

from bench.models import Adaptor

#: Sequences longer than this are routed by their largest token distance (EasyEdit's ``euc`` at inference).
LONG = 100


def activation_distance(act: str, orig: Tensor, new: Tensor, mask: Tensor | None, infer: bool = False) -> Tensor:
    """(B,) per sequence: the mean over its real tokens (``mask``; all when None) of ||act(orig) - act(new)||;
    with ``infer``, the largest token distance where a sequence has over :data:`LONG` real tokens."""
    fn = ACT2FN[act]
    d = torch.linalg.vector_norm(fn(orig.float()) - fn(new.float()), dim=-1)  # (B, T)
    m = torch.ones_like(d) if mask is None else mask.to(d.device, d.dtype)
    mean = (d * m).sum(-1) / m.sum(-1).clamp(min=1)
    if not infer:
        return mean
    top = d.masked_fill(m == 0, float("-inf")).amax(-1)
    return torch.where(m.sum(-1) > LONG, top, mean)


def side_output(x: Tensor, delta: Tensor, conv1d: bool) -> Tensor:
    """What a side copy W0 + dW adds to the projection's output on input x: x dW^T (x dW for (in, out) storage)."""
    return x @ delta.to(x.dtype) if conv1d else x @ delta.to(x.dtype).T


def ties_merge(deltas: list[Tensor], density: float) -> Tensor:
    """TIES merge of task vectors with equal weights (EasyEdit ``GTA('magnitude', 'sum', normalize=True)``): each
    keeps its ``density`` largest-magnitude entries, the sign of the weighted sum elects each entry's sign, and
    the entries agreeing with it are averaged."""
    kept = []
    for d in deltas:
        k = int(density * d.numel())
        if density >= 1 or k <= 0:
            kept.append(d)
            continue
        mask = torch.zeros(d.numel(), dtype=d.dtype, device=d.device)
        mask[d.abs().flatten().float().topk(k).indices] = 1
        kept.append(d * mask.view_as(d))
    stack = torch.stack(kept)
    w = torch.full((len(deltas),) + (1,) * (stack.dim() - 1), 1.0 / len(deltas), dtype=stack.dtype,
                   device=stack.device)
    weighted = stack * w
    agree = (stack.sign() == ((weighted.sum(0) >= 0).to(stack.dtype) * 2 - 1)).to(stack.dtype)
    divisor = (w * agree).sum(0)
    divisor[divisor == 0] = 1
    return (weighted * agree).sum(0) / divisor


class SideMemory(Adaptor):
    """WISE's side memory at one projection (module docstring). ``conv1d``: deltas stored (in, out) like GPT-2's
    weights, else (out, in)."""

    kind = "wise_memory"

    def __init__(self, shard: Tensor, shard_act: float, memories: list[Tensor], memory_acts: list[float],
                 count: int, settings: Mapping[str, Any]) -> None:
        if len(memories) != len(memory_acts):
            raise ValueError(f"side memory: {len(memories)} saved shards but {len(memory_acts)} activation minima")
        self.shard, self.shard_act, self.count = shard, float(shard_act), int(count)
        self.memories, self.memory_acts = list(memories), [float(a) for a in memory_acts]
        self.settings = dict(settings)

    def side(self, x: Tensor, delta: Tensor) -> Tensor:
        """What a side copy adds to the projection's output (:func:`side_output`)."""
        return side_output(x, delta, self.settings["conv1d"])

    def candidates(self) -> list[tuple[Tensor, float]]:
        """(delta, min_act) of the current shard, then of each saved shard."""
        return [(self.shard, self.shard_act)] + list(zip(self.memories, self.memory_acts))

    def route(self, inputs: Tensor, output: Tensor, mask: Tensor | None) -> Tensor:
        """(B,) per sequence: -1 (the original output), 0 (the current shard) or i (saved shard i)."""
        ratio, act = self.settings["act_ratio"], self.settings["act"]
        dists = [activation_distance(act, output, output + self.side(inputs, d), mask, infer=True)
                 for d, _ in self.candidates()]
        cur = dists[0]
        route = torch.where(cur < self.shard_act * ratio, -1, 0)
        best = cur.clone()
        for i, (d, (_, a)) in enumerate(zip(dists[1:], self.candidates()[1:]), start=1):
            take = (d > best) & (d > a * ratio)
            route, best = torch.where(take, i, route), torch.where(take, d, best)
        return route

    def forward(self, inputs: Tensor, output: Tensor, call: dict[str, Any]) -> Tensor:
        route = call.get("route")
        if route is None or route.shape[0] != output.shape[0] or output.shape[1] != 1:
            mask = call.get("attention_mask")
            mask = mask if mask is not None and tuple(mask.shape) == tuple(output.shape[:2]) else None
            route = call["route"] = self.route(inputs, output, mask)
        if bool((route < 0).all()):
            return output
        out = output.clone()
        for i, (d, _) in enumerate(self.candidates()):
            rows = route == i
            if bool(rows.any()):
                out[rows] = output[rows] + self.side(inputs[rows], d)
        return out

    def __add__(self, later: Adaptor) -> "SideMemory":
        if not isinstance(later, SideMemory) or later.count != 1 or later.memories:
            raise TypeError("a WISE side memory composes with one edit's side memory at a time (count 1, no saved "
                            f"shards), not {type(later).__name__}")
        s = self.settings
        out = SideMemory(self.shard + later.shard, min(self.shard_act, later.shard_act), self.memories,
                         self.memory_acts, self.count + 1, s)
        if out.count % s["save_freq"] == 0:  # the shard is full: saved, a fresh one starts
            out.memories.append(out.shard)
            out.memory_acts.append(out.shard_act)
            out.shard, out.shard_act = torch.zeros_like(out.shard), math.inf
        if out.count % s["merge_freq"] == 0:
            n = s["merge_freq"] // s["save_freq"]
            merged = ties_merge(out.memories[-n:], s["density"])
            act = min(out.memory_acts[-n:])
            out.memories, out.memory_acts = out.memories[:-n] + [merged], out.memory_acts[:-n] + [act]
        return out

    def detach(self) -> "SideMemory":
        return SideMemory(self.shard.detach(), self.shard_act, [m.detach() for m in self.memories],
                          self.memory_acts, self.count, self.settings)

    def tensors(self) -> dict[str, Tensor]:
        return {"shard": self.shard, **{f"memory.{i}": m for i, m in enumerate(self.memories)}}

    def meta(self) -> dict[str, str]:
        return {"state": json.dumps({"shard_act": self.shard_act, "memory_acts": self.memory_acts,
                                     "count": self.count, "settings": self.settings})}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], meta: Mapping[str, str]) -> "SideMemory":
        st = json.loads(meta["state"])
        memories = [tensors[f"memory.{i}"] for i in range(len(st["memory_acts"]))]
        return cls(tensors["shard"], st["shard_act"], memories, st["memory_acts"], st["count"], st["settings"])

    def weight_change(self) -> float:
        return math.sqrt(sum(float(d.double().pow(2).sum()) for d, _ in self.candidates()))

    def describe(self) -> dict[str, float]:
        return {"entries": float(len(self.memories) + (self.shard_act < math.inf))}
