"""The domain view of the expert atlas: which experts take which kind of text (code, prose, card names).

Per MoE layer, a table c[d, e] of the token-to-expert assignments (all k of each token) made on domain d's
validation text, and from it:
- each expert's share of each domain, P(e | d) = c[d, e] / sum_e c[d, e]: with E experts a router blind to the
  domain gives every expert 1/E of every domain;
- where each expert's assignments come from, P(d | e) = c[d, e] / sum_d c[d, e] (domains scored on equal
  token counts, so a blind router gives 1/D each);
- the mutual information between domain and expert, I(D; E) = sum p(d, e) log2(p(d, e) / (p(d) p(e))), in
  bits, with p from the table: 0 when routing ignores the domain, at most log2 D when every domain has experts
  of its own. Divided by H(D) it reads as the share of "which domain is this?" that the layer's routing answers.

`DomainAtlas.from_counts` is the arithmetic (tested against tables made by hand); `domain_atlas` records the
counts from a model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from flash_experts.errors import UserError
from flash_experts.model.routing import recording_routers


def mutual_information_bits(counts_DE: np.ndarray) -> float:
    """I(D; E) in bits of the joint distribution proportional to `counts_DE` (empty cells contribute 0)."""
    joint = np.asarray(counts_DE, dtype=np.float64)
    joint = joint / joint.sum()
    outer = joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True)
    cells = joint > 0
    return float(np.sum(joint[cells] * np.log2(joint[cells] / outer[cells])))


@dataclass
class DomainLayer:
    layer: int
    counts: list[list[int]]  # [domain][expert] assignments
    expert_share_of_domain: list[list[float]]  # P(e | d), [domain][expert]
    domain_share_of_expert: list[list[float]]  # P(d | e), [domain][expert]
    mutual_information: float  # bits
    domain_entropy: float  # H(D), bits: the most I(D; E) can be


@dataclass
class DomainAtlas:
    domains: list[str]
    layers: list[DomainLayer]

    @staticmethod
    def from_counts(domains: list[str], counts: dict[int, np.ndarray]) -> DomainAtlas:
        """counts: layer -> (domains, experts) assignment counts."""
        layers = []
        for layer in sorted(counts):
            c = np.asarray(counts[layer], dtype=np.float64)
            if c.shape[0] != len(domains) or c.sum() == 0:
                raise UserError(f"layer {layer}: a count table of shape {c.shape} for {len(domains)} domains")
            p_d = c.sum(1) / c.sum()
            with np.errstate(invalid="ignore", divide="ignore"):
                of_domain = np.nan_to_num(c / c.sum(1, keepdims=True))
                of_expert = np.nan_to_num(c / c.sum(0, keepdims=True))
            layers.append(DomainLayer(
                layer=layer, counts=c.astype(np.int64).tolist(), expert_share_of_domain=of_domain.tolist(),
                domain_share_of_expert=of_expert.tolist(), mutual_information=mutual_information_bits(c),
                domain_entropy=float(-np.sum(p_d[p_d > 0] * np.log2(p_d[p_d > 0])))))
        return DomainAtlas(domains, layers)

    def lines(self) -> list[str]:
        """Per layer: I(D; E) and its share of H(D), then each expert's domain mix (P(d | e)) with the domain it
        leans to most."""
        out = []
        for layer in self.layers:
            share = layer.mutual_information / layer.domain_entropy if layer.domain_entropy else float("nan")
            out.append(f"layer {layer.layer}: I(domain; expert) = {layer.mutual_information:.3f} bits "
                       f"({share:.0%} of H(domain) = {layer.domain_entropy:.2f} bits)")
            of_expert = np.array(layer.domain_share_of_expert)
            load = np.array(layer.counts).sum(0) / max(1, np.array(layer.counts).sum())
            cells = []
            for e in range(of_expert.shape[1]):
                mix = " ".join(f"{d[:5]} {of_expert[i, e]:.0%}" for i, d in enumerate(self.domains))
                cells.append(f"  e{e} (load {load[e]:.0%}): {mix}")
            out.extend(cells)
        return out

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def domain_expert_counts(model: torch.nn.Module, windows: dict[str, torch.Tensor], batch_size: int = 32,
                         dtype: torch.dtype = torch.float32) -> dict[int, np.ndarray]:
    """layer -> (domains, experts) counts of the router's top-k choices over each domain's windows, recorded
    from the model's own routers (in `windows`' order of domains)."""
    was_training = model.training
    model.eval()
    counts: dict[int, np.ndarray] = {}
    try:
        with recording_routers(model) as seen, torch.autocast("cpu", dtype=dtype, enabled=dtype == torch.bfloat16):
            for d, ids in enumerate(windows.values()):
                for start in range(0, len(ids), batch_size):
                    seen.clear()
                    model(input_ids=ids[start:start + batch_size])
                    for layer, (experts_TK, _, probs_TE) in seen.items():
                        table = counts.setdefault(layer, np.zeros((len(windows), probs_TE.shape[-1]), np.int64))
                        table[d] += np.bincount(experts_TK.reshape(-1).cpu().numpy(), minlength=table.shape[1])
    finally:
        model.train(was_training)
    if not counts:
        raise UserError("the model has no MoE layers: there is no routing to map")
    return counts


def domain_atlas(model: torch.nn.Module, windows: dict[str, torch.Tensor], batch_size: int = 32,
                 dtype: torch.dtype = torch.float32) -> DomainAtlas:
    return DomainAtlas.from_counts(list(windows), domain_expert_counts(model, windows, batch_size, dtype))
