"""The recommender toolkit of ``pme demo`` and ``benchmarks/quality.py`` (not the library).

- :mod:`pme.recsys.data`: CTR datasets (MovieLens-100K, census adult, Criteo, planted sizes,
  your own columns) and their batches;
- :mod:`pme.recsys.models`: FM and DeepFM over ``nn.EmbeddingBag`` tables, training, AUC and
  log loss;
- :mod:`pme.recsys.experiment`: the PME experiment (train, search, retrain against the
  baselines at equal budget, report).

The library (``pme.ops``, ``modules``, ``optim``, ``search``, ``reference``, ``collection``)
never imports this package; it uses the library like any other caller::

    from pme.recsys import data, models
"""
