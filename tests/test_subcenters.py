"""Sub-center ArcFace: the reference written from the paper (gradcheck) and
the clean-up step. The fused loss with sub-centers is not implemented yet."""
import math

import pytest
import torch

from margin_kernels import reference
from margin_kernels.subcenters import dominant_subcenters, far_from_dominant


def test_reference_gradcheck_reaches_the_argmax_only():
    g = torch.Generator().manual_seed(0)
    c, k, d = 5, 3, 6
    x = torch.randn(7, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(c * k, d, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 4, 0, -100])
    assert torch.autograd.gradcheck(lambda a, b: reference.subcenter_loss(a, b, y, subcenters=k), (x, w))
    reference.subcenter_loss(x, w, y, subcenters=k).backward()
    # rows of W that are the arg-max of no (sample, class) pair get no gradient
    cos = torch.nn.functional.normalize(x[:6].detach()) @ torch.nn.functional.normalize(w.detach()).t()
    used = torch.zeros(c * k, dtype=torch.bool)
    used[(cos.view(6, c, k).argmax(2) + torch.arange(c) * k).flatten()] = True
    assert (w.grad[~used] == 0).all() and (w.grad[used].abs().sum(1) > 0).all()


def test_with_one_subcenter_it_is_arcface():
    g = torch.Generator().manual_seed(1)
    x, w, y = torch.randn(9, 8, generator=g), torch.randn(11, 8, generator=g), torch.randint(0, 11, (9,), generator=g)
    from margin_kernels import ArcFace

    loss, _ = reference.margin_cross_entropy(x, w, y, ArcFace().row_margins(9), s=64.0)
    assert abs(reference.subcenter_loss(x, w, y, subcenters=1).item() - loss.item()) < 1e-4


def _clustered(n_per_class=40, classes=6, k=3, d=16, noisy=4, seed=0):
    """Each class's samples around its sub-center 1 (dominant), a few around
    sub-center 2, and ``noisy`` samples per class pointing away from them."""
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.functional.normalize(torch.randn(classes * k, d, generator=g), dim=1)
    xs, ys, noise = [], [], []
    for c in range(classes):
        for i in range(n_per_class):
            centre = w[c * k + (1 if i < 30 else 2)]
            xs.append(centre + 0.1 * torch.randn(d, generator=g))
            ys.append(c)
            noise.append(False)
        for _ in range(noisy):
            xs.append(-w[c * k + 1] + 0.1 * torch.randn(d, generator=g))  # ~180 degrees away
            ys.append(c)
            noise.append(True)
    return torch.stack(xs), torch.tensor(ys), w, torch.tensor(noise)


def test_dominant_subcenters_and_the_samples_far_from_them():
    x, y, w, noise = _clustered()
    dominant = dominant_subcenters(x, y, w, 3, chunk=50)
    assert dominant.tolist() == [1] * 6
    far = far_from_dominant(x, y, w, 3, chunk=50)
    # every noisy sample, and none of the dominant clusters' samples
    in_dominant_cluster = (torch.arange(len(y)) % 44) < 30
    assert far[noise].all()
    assert not far[in_dominant_cluster].any()


def test_classes_without_samples_and_bad_input():
    x, y, w, _ = _clustered(classes=3)
    w = torch.cat([w, torch.randn(6, w.shape[1])])  # two more classes, no samples
    assert dominant_subcenters(x, y, w, 3)[-2:].tolist() == [-1, -1]
    with pytest.raises(ValueError, match="not a multiple of subcenters"):
        dominant_subcenters(x, y, w[:-1], 3)
    with pytest.raises(ValueError, match="labels must be in"):
        dominant_subcenters(x, y + 10, w, 3)
    with pytest.raises(ValueError, match="subcenters must be an int"):
        dominant_subcenters(x, y, w, 0)
    with pytest.raises(ValueError, match="max_angle_degrees"):
        far_from_dominant(x, y, w, 3, max_angle_degrees=math.inf)
