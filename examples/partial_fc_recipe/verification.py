"""1:1 verification as the field measures it: pairs of photos of held-out
identities, the accuracy at the best threshold, TAR at fixed FARs, ROC points."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .synthetic_faces import PAIRS, eval_images, hash_uniform


def pairs(labels: Tensor, seed: int, negatives: int) -> tuple[Tensor, Tensor, Tensor]:
    """(i, j, same): every pair of photos of one identity, and ``negatives``
    pairs of different identities drawn by the hash."""
    n = labels.numel()
    i, j = torch.triu_indices(n, n, offset=1, device=labels.device)
    same = labels[i] == labels[j]
    pi, pj = i[same], j[same]
    k = torch.arange(4 * negatives, device=labels.device)
    ni = (hash_uniform(seed, PAIRS, 0, k, device=labels.device) * n).long().clamp_max(n - 1)
    nj = (hash_uniform(seed, PAIRS, 1, k, device=labels.device) * n).long().clamp_max(n - 1)
    keep = (labels[ni] != labels[nj]).nonzero().squeeze(1)[:negatives]
    ni, nj = ni[keep], nj[keep]
    return torch.cat([pi, ni]), torch.cat([pj, nj]), torch.cat([torch.ones_like(pi, dtype=torch.bool),
                                                                torch.zeros_like(ni, dtype=torch.bool)])

FARS = (1e-3, 1e-2, 1e-1)


def verification(scores: Tensor, same: Tensor) -> dict:
    """1:1 verification from pair scores: the accuracy at the best threshold
    over genuine and impostor pairs weighted equally (as on LFW's balanced
    pairs: chance is 0.5), TAR at each FAR the impostors allow (at least 1/FAR
    of them), and ROC points."""
    scores, same = scores.double().cpu(), same.cpu()
    pos, neg = scores[same], scores[~same]
    order = torch.argsort(scores, descending=True)
    hits = same[order].double()
    tp = torch.cumsum(hits, 0)  # accepted genuine pairs at each threshold (accept the top k)
    fp = torch.cumsum(1 - hits, 0)
    balanced = 0.5 * (tp / max(pos.numel(), 1) + (neg.numel() - fp) / max(neg.numel(), 1))
    best = int(torch.argmax(balanced))
    out = {"accuracy": float(balanced[best]), "threshold": float(scores[order][best]),
           "pairs_genuine": pos.numel(), "pairs_impostor": neg.numel()}
    neg_sorted = torch.sort(neg, descending=True).values
    for far in FARS:
        allowed = int(far * neg.numel())
        if allowed >= 1:  # the threshold: the (allowed + 1)-th highest impostor score
            out[f"tar@far={far:g}"] = float((pos > neg_sorted[allowed]).double().mean())
    roc = []  # (FAR, TAR) at FARs spaced evenly on a log scale, down to one impostor
    for far in torch.logspace(math.log10(1 / max(neg.numel(), 1)), 0, 40).tolist():
        allowed = min(int(far * neg.numel()), neg.numel() - 1)
        roc.append([allowed / max(neg.numel(), 1), float((pos > neg_sorted[allowed]).double().mean())])
    out["roc"] = roc
    return out


@torch.no_grad()
def evaluate(model: nn.Module, cfg, device, amp: bool) -> dict:
    """Verification of ``model``'s embeddings of the held-out photos (eval mode, bf16 autocast with ``amp``)."""
    model.eval()
    images, labels = eval_images(cfg, device)
    embeddings = []
    for chunk in images.split(256):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            embeddings.append(model(chunk).float())
    model.train()
    e = F.normalize(torch.cat(embeddings), dim=1)
    i, j, same = pairs(labels, cfg.seed, cfg.eval_negatives)
    return verification((e[i] * e[j]).sum(1), same)
