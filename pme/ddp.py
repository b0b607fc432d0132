"""Data-parallel training of models that hold ``sparse=True`` pme tables.

``torch.nn.parallel.DistributedDataParallel`` decides which parameters get sparse gradients by the
module that owns them: only ``nn.Embedding`` / ``nn.EmbeddingBag`` with ``sparse=True`` count. A pme
table with ``sparse=True`` gives its ``weight`` (the flat buffer ``[total]``) a sparse COO gradient
too, which torch's reducer then tries to copy into a dense bucket and fails in backward ("Cannot
access storage of SparseTensorImpl"). :class:`DistributedDataParallel` is torch's class with that
one decision extended to pme tables; everything else (buckets, the all-reduce of the sparse
gradients, the division by the world size, hooks, ``no_sync``) is torch's.
"""

from __future__ import annotations

import torch

from .modules import _MultiSizeTable


class DistributedDataParallel(torch.nn.parallel.DistributedDataParallel):
    """``torch.nn.parallel.DistributedDataParallel`` that also expects sparse gradients from pme
    tables built with ``sparse=True`` (``pme.MultiSizeEmbeddingBag`` / ``pme.MultiSizeEmbedding``).

    Same arguments and behaviour as torch's class: each rank's ``weight.grad`` of such a table is, after
    backward, the sparse COO gradient ``[total]`` of the mean of the ranks' losses (the rows any
    rank looked up), as for ``nn.EmbeddingBag(sparse=True)``; optimise it with
    ``torch.optim.SparseAdam`` / ``SGD`` / ``Adagrad`` or ``pme.optim.SparseAdam``. Dense pme tables
    work with torch's class as well. Tables with a fused optimizer (``optimizer=``) update
    themselves inside backward and give ``weight`` no gradient: shard them instead
    (``pme.sharding``), or keep them out of DDP's parameters.

    Example::

        model = Model(pme.MultiSizeEmbeddingBag(V, D, sizes=sizes, mode="sum", sparse=True), ...)
        ddp = pme.DistributedDataParallel(model)
        loss_fn(ddp(indices, offsets), labels).backward()
    """

    def _build_params_for_reducer(self):
        # torch's list of (parameters, expects a sparse gradient), the pme tables' weights marked;
        # torch calls this while building the reducer (and again when it rebuilds it).
        parameters, expect_sparse = super()._build_params_for_reducer()
        sparse_weights = {id(m.weight) for m in self.module.modules() if isinstance(m, _MultiSizeTable) and m.sparse}
        return parameters, [e or id(p) in sparse_weights for p, e in zip(parameters, expect_sparse)]
