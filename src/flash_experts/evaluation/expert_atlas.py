"""The expert atlas: what each expert of each MoE layer takes from a text.

Per MoE layer and expert: its share of the layer's token-to-expert assignments, the tokens it takes most often
relative to how often they occur (their lift), and a few of them in context. Lift of token v for expert e:

    lift(e, v) = P(v | routed to e) / P(v) = (c[e, v] / A[e]) / (n[v] / T)

with c[e, v] the assignments of token v to e, A[e] = sum_v c[e, v], n[v] the occurrences of v and T the
tokens of the text. A router that ignores the token gives every lift 1; an expert that takes every " Dragon"
and nothing else of a text where " Dragon" is 1% of the tokens has lift 100 for it. Rare tokens reach high
lifts by chance, so a token must be routed to the expert `min_count` times to be listed.

`atlas_from_assignments` is the arithmetic on recorded assignments (tested against counts made by hand);
`expert_atlas` records them from a model over a token stream, window by window.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from flash_experts.errors import UserError
from flash_experts.model.routing import recording_routers

# Where a run keeps its atlas: the demo writes it into the MoE's run folder, the studio's --run reads it there.
ATLAS_FILE = "expert_atlas.json"


@dataclass
class AtlasToken:
    token_id: int
    text: str
    count: int  # assignments of this token to the expert
    occurrences: int  # the token's occurrences in the text
    lift: float


@dataclass
class AtlasExpert:
    expert: int
    assignments: int
    share: float  # of the layer's assignments
    top_tokens: list[AtlasToken] = field(default_factory=list)  # highest lift first
    examples: list[str] = field(default_factory=list)  # the top token in context: "... left [token] right ..."


@dataclass
class AtlasLayer:
    layer: int
    experts: list[AtlasExpert]

    def line(self, tokens_each: int = 2) -> str:
        """One line: each expert's share and its `tokens_each` highest-lift tokens."""
        parts = []
        for e in self.experts:
            shown = " ".join(f"{t.text.strip() or repr(t.text)!s}x{t.lift:.1f}" for t in e.top_tokens[:tokens_each])
            parts.append(f"e{e.expert} {e.share:.0%}" + (f" {shown}" if shown else ""))
        return f"layer {self.layer}: " + " | ".join(parts)


@dataclass
class ExpertAtlas:
    tokens: int  # tokens of the text routed
    min_count: int
    layers: list[AtlasLayer]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(data: Any) -> "ExpertAtlas":
        """The atlas `as_dict` wrote, read back and checked field by field (a file a person can edit: the studio
        serves only what has this shape). Raises UserError naming the first field that does not fit."""
        def need(ok: bool, where: str) -> None:
            if not ok:
                raise UserError(f"not an expert atlas: {where}")

        def number(value: Any, kind: type = int) -> bool:
            return isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)

        need(isinstance(data, dict), "the file holds no object")
        need(number(data.get("tokens")) and number(data.get("min_count")), "tokens and min_count must be integers")
        need(isinstance(data.get("layers"), list), "layers must be a list")
        layers = []
        for i, layer in enumerate(data["layers"]):
            need(isinstance(layer, dict) and number(layer.get("layer")) and isinstance(layer.get("experts"), list),
                 f"layers[{i}] must have an integer layer and a list of experts")
            experts = []
            for j, e in enumerate(layer["experts"]):
                where = f"layers[{i}].experts[{j}]"
                need(isinstance(e, dict) and number(e.get("expert")) and number(e.get("assignments"))
                     and number(e.get("share"), float), f"{where} needs integer expert and assignments, a share")
                need(isinstance(e.get("top_tokens", []), list) and isinstance(e.get("examples", []), list)
                     and all(isinstance(x, str) for x in e.get("examples", [])), f"{where}: lists of tokens, examples")
                tokens = []
                for k, t in enumerate(e.get("top_tokens", [])):
                    need(isinstance(t, dict) and number(t.get("token_id")) and isinstance(t.get("text"), str)
                         and number(t.get("count")) and number(t.get("occurrences")) and number(t.get("lift"), float),
                         f"{where}.top_tokens[{k}] needs token_id, text, count, occurrences, lift")
                    tokens.append(AtlasToken(t["token_id"], t["text"], t["count"], t["occurrences"], float(t["lift"])))
                experts.append(AtlasExpert(e["expert"], e["assignments"], float(e["share"]), tokens,
                                           list(e.get("examples", []))))
            layers.append(AtlasLayer(layer["layer"], experts))
        return ExpertAtlas(data["tokens"], data["min_count"], layers)


def atlas_from_assignments(token_ids_T: Sequence[int], experts_by_layer: dict[int, Any], num_experts: int,
                           decode: Any, *, top: int = 8, min_count: int = 5, examples: int = 3,
                           window: int = 6) -> ExpertAtlas:
    """The atlas of one text: `token_ids_T` its T tokens, `experts_by_layer` layer -> (T, K) the experts each
    token was routed to, `decode` ids -> text. `window` tokens each side of an example."""
    ids_T = np.asarray(token_ids_T, dtype=np.int64)
    T = len(ids_T)
    if T == 0:
        raise UserError("the expert atlas needs at least one token")
    uniques, inverse_T, occurrences = np.unique(ids_T, return_inverse=True, return_counts=True)
    layers = []
    for layer in sorted(experts_by_layer):
        experts_TK = np.asarray(experts_by_layer[layer], dtype=np.int64).reshape(T, -1)
        K = experts_TK.shape[1]
        # c[e, u]: assignments of the u-th distinct token to expert e
        counts_EU = np.zeros((num_experts, len(uniques)), dtype=np.int64)
        np.add.at(counts_EU, (experts_TK.reshape(-1), np.repeat(inverse_T, K)), 1)
        assignments_E = counts_EU.sum(axis=1)
        entries = []
        for e in range(num_experts):
            A = int(assignments_E[e])
            entry = AtlasExpert(expert=e, assignments=A, share=A / (T * K))
            if A:
                lift_U = counts_EU[e] * T / (A * occurrences)
                eligible = np.flatnonzero(counts_EU[e] >= min_count)
                # highest lift first; ties by count, then by token id (a fixed order)
                order = sorted(eligible, key=lambda u: (-lift_U[u], -counts_EU[e, u], uniques[u]))[:top]
                entry.top_tokens = [AtlasToken(int(uniques[u]), decode([int(uniques[u])]), int(counts_EU[e, u]),
                                               int(occurrences[u]), float(lift_U[u])) for u in order]
                if entry.top_tokens:
                    first = entry.top_tokens[0].token_id
                    positions = np.flatnonzero((ids_T == first) & (experts_TK == e).any(axis=1))[:examples]
                    entry.examples = [_in_context(ids_T, int(p), window, decode) for p in positions]
            entries.append(entry)
        layers.append(AtlasLayer(layer=layer, experts=entries))
    return ExpertAtlas(tokens=T, min_count=min_count, layers=layers)


def _in_context(ids_T: np.ndarray, position: int, window: int, decode: Any) -> str:
    left = decode(ids_T[max(0, position - window):position].tolist())
    right = decode(ids_T[position + 1:position + 1 + window].tolist())
    middle = decode([int(ids_T[position])])
    return f"...{left}[{middle}]{right}...".replace("\n", " / ")


@torch.inference_mode()
def expert_atlas(model: torch.nn.Module, tokenizer: Any, tokens: Any, *, context: int = 256,
                 max_tokens: int | None = 65_536, batch_size: int = 8, **options: Any) -> ExpertAtlas:
    """Route `tokens` (a 1-D sequence of ids, the first `max_tokens`) through `model` in non-overlapping windows
    of `context` tokens, the last one shorter (every token routed once, as the routing statistics count them),
    and build the atlas; `options` go to `atlas_from_assignments`. A dense model gives an atlas without layers."""
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64)).reshape(-1)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() == 0:
        raise UserError("the expert atlas needs at least one token")
    full = ids.numel() // context
    batches = [ids[: full * context].view(full, context)[start:start + batch_size]
               for start in range(0, full, batch_size)]
    if ids.numel() % context:  # the tail, a shorter window of its own: every token is routed
        batches.append(ids[full * context:].view(1, -1))
    device = next(model.parameters()).device
    recorded: dict[int, list[torch.Tensor]] = {}
    num_experts = 0
    for batch in batches:
        with recording_routers(model) as seen:
            model(input_ids=batch.to(device))
        for layer, (experts_TK, _weights, probs_TE) in seen.items():
            recorded.setdefault(layer, []).append(experts_TK.cpu())
            num_experts = probs_TE.shape[-1]
    experts_by_layer = {layer: torch.cat(parts).numpy() for layer, parts in recorded.items()}
    return atlas_from_assignments(ids.tolist(), experts_by_layer, num_experts, tokenizer.decode, **options)
