"""Shared by the K-means and DBSCAN plugins (not a plugin: no hooks): input checks,
clustered test data and squared distances in the Gram form.

Inputs are points ``x`` (n, d) in a clustered layout whose distances are O(1) whatever
``d`` is (coordinates scaled by 1/sqrt(d)): a point is ~0.5 from its cluster's centre
and ~1.5 from the others', so hard assignments are unambiguous (no near ties between the
nearest and the second-nearest centre at float32 resolution) and soft ones (tau ~ 1,
eps ~ 0.5) are neither one-hot nor uniform.
"""

from __future__ import annotations

import math

import torch

from lossreg.validate import (
    check_device,
    check_floating,
    check_integer,
    check_ndim,
    check_same_dtype,
)

#: Spread of a cluster around its centre and of the centres around 0 (per unit of
#: distance, i.e. before the 1/sqrt(d) scaling of each coordinate).
CLUSTER_SPREAD = 0.5
CENTER_SPREAD = 1.0


def work(t: torch.Tensor) -> torch.Tensor:
    """At least float32: half-precision Gram-form distances cancel to nothing."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def sq_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """D_ij = |x_i|^2 + |y_j|^2 - 2 x_i . y_j, clamped at 0 (rounding can make it
    negative). The Gram form is what every implementation computes (the explicit
    differences would take n x K x d memory); in float64 it is exact to ~1e-16 |x|^2."""
    sq_x = (x * x).sum(dim=1)
    sq_y = (y * y).sum(dim=1)
    return (sq_x[:, None] + sq_y[None, :] - 2.0 * (x @ y.T)).clamp_min(0.0)


def check_points(loss: str, x) -> None:
    check_floating(loss, x=x)
    check_ndim(loss, "x", x, (2,), "a matrix (n, d) of points")


def check_centroids(loss: str, x, centroids) -> None:
    check_points(loss, x)
    check_floating(loss, centroids=centroids)
    check_same_dtype(loss, x=x, centroids=centroids)
    check_device(loss, "x", x, centroids=centroids)
    check_ndim(loss, "centroids", centroids, (2,), "a matrix (K, d) of centroids")
    if centroids.shape[0] < 1:
        raise ValueError(f"{loss}: centroids must hold K >= 1 centroids, got shape "
                         f"{tuple(centroids.shape)}")
    if centroids.shape[1] != x.shape[1]:
        raise ValueError(f"{loss}: centroids must have d = {x.shape[1]} columns (the "
                         f"dimension of x), got shape {tuple(centroids.shape)}")


def check_cluster_labels(loss: str, x, labels) -> None:
    """Integer labels, one per point, each >= 0 (a cluster) or -1 (noise)."""
    check_integer(loss, "labels", labels)
    check_device(loss, "x", x, labels=labels)
    if tuple(labels.shape) != (x.shape[0],):
        raise ValueError(f"{loss}: labels must have shape ({x.shape[0]},) (one cluster "
                         f"label per point), got {tuple(labels.shape)}")
    bad = labels < -1
    if bool(bad.any()):
        more = f" (and {int(bad.sum()) - 1} more)" if int(bad.sum()) > 1 else ""
        raise ValueError(f"{loss}: labels must be >= 0 (a cluster) or -1 (noise), got "
                         f"{labels[bad][0].item()}{more}")


def clustered_points(case, n: int, clusters: int, d: int):
    """(points, cluster index of each point, cluster centres), as described above."""
    scale = 1.0 / math.sqrt(max(d, 1))
    centers = CENTER_SPREAD * scale * case.randn(clusters, d)
    assign = torch.randint(0, clusters, (n,), device=case.device, generator=case.generator)
    x = centers[assign] + CLUSTER_SPREAD * scale * case.randn(n, d)
    return x, assign, centers


def param(case, key: str, default: int) -> int:
    return int(case.params.get(key, default))
