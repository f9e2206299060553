"""Chain-graph view of neural networks: node distributions and PCFF.

Reference: "Deriving neural network design and learning from the
probabilistic framework of chain graphs".  :mod:`dualflow.chain.nodes` gives
each activation's node distribution (binary nodes for tanh/sigmoid, rectified
Gaussians for ReLU/softplus): the activation, exact moments and samples;
:mod:`dualflow.chain.pcff` the partially collapsed feed-forward (§5) as a
function and as an NNX layer for :class:`dualflow.nn.Sequential`.
"""

from dualflow.chain.nodes import (
    BINARY_GRADS,
    NODES,
    RELU_MAX_ERROR,
    SOFTPLUS_STD,
    node_mean,
    node_moments,
    node_sample,
    node_std,
    rectified_gaussian_moments,
)
from dualflow.chain.pcff import PCFFActivation, pcff

__all__ = [
    "BINARY_GRADS",
    "NODES",
    "PCFFActivation",
    "RELU_MAX_ERROR",
    "SOFTPLUS_STD",
    "node_mean",
    "node_moments",
    "node_sample",
    "node_std",
    "pcff",
    "rectified_gaussian_moments",
]
