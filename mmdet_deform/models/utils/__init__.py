"""Model utilities that are not modules of the detector: inference-time
caches derived from a module's weights."""

from .batchnorm_folding import FoldedBatchNormCache, conv_bn_pairs, fold_batchnorms
from .packed_linear import linear
from .tensor_snapshot import TensorSnapshot

__all__ = ['FoldedBatchNormCache', 'TensorSnapshot', 'conv_bn_pairs', 'fold_batchnorms', 'linear']
