"""The sparse delta: a frozen weight plus trainable values at a sorted int32 index.

The effective weight of a wrapped layer is ``W + scatter(indices, values)``. The
autograd function never builds the dense weight gradient on an ordinary step: the
values' gradient is a sampled dense-dense matmul (SDDMM) over the index only.

- ``layout``    checking an index, and the forms of it the kernels read (``IndexLayout``);
- ``backends``  the SDDMM backends and how ``auto`` picks one (the cost model);
- ``scratch``   reused per-thread buffers of the kernels;
- ``weight``    the ways to form W + S for one matmul (weight modes);
- ``function``  the autograd.Function and torch custom ops, with their one backward;
- ``layer``     ``SparseDeltaLayer``, the module that wraps a Linear or Conv1D.

Tuning knobs (``backends.SDDMM_TOKEN_BLOCK`` ...) are read from their own module: set them there.
"""
from .backends import gather_is_cheaper, sddmm
from .function import SparseDeltaFunction, delta_linear_backward, sparse_delta_linear
from .layer import SparseDeltaLayer
from .layout import IndexLayout, is_conv1d, linear_shape, validate_indices, weight_is_transposed, weight_shape
from .scratch import release_scratch
from .weight import INPLACE_MAX_DENSITY, WEIGHT_MODES, effective_weight, resolve_weight_mode, with_effective_weight

__all__ = [
    "INPLACE_MAX_DENSITY", "IndexLayout", "SparseDeltaFunction", "SparseDeltaLayer", "WEIGHT_MODES",
    "delta_linear_backward", "effective_weight", "gather_is_cheaper", "is_conv1d", "linear_shape",
    "release_scratch", "resolve_weight_mode", "sddmm", "sparse_delta_linear", "validate_indices",
    "weight_is_transposed", "weight_shape", "with_effective_weight",
]
