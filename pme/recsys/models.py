"""FM and DeepFM over per-field embedding bags, plus training and evaluation.

The models read the batch dicts of :mod:`pme.recsys.data`::

    {"fields": {name: (values int64 [nnz], offsets int64 [B])},
     "dense": float32 [B, num_dense] or None,
     "labels": float32 [B]}

and return logits ``[B]`` (float32).

Embedding tables are real ``nn.EmbeddingBag`` modules kept in
``model.embeddings`` (an ``nn.ModuleDict`` keyed by field name; mode ``"sum"``
for single-valued fields, ``"mean"`` for multi-valued ones).  The models only
ever call ``table(values, offsets)`` and expect ``[B, D]`` back, so any module
with the ``nn.EmbeddingBag`` forward signature (e.g.
``pme.MultiSizeEmbeddingBag``) can replace a table in place and the rest of
the code is shared.  First-order (linear) terms live in a separate
``model.linear`` dict of ``nn.EmbeddingBag(card, 1)`` so that a size search
over ``model.embeddings`` leaves them alone.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .data import CTRDataset, batch_to

__all__ = ["FM", "DeepFM", "auc", "log_loss", "predict", "evaluate", "train_model"]


# --------------------------------------------------------------------------- #
# Models
# --------------------------------------------------------------------------- #
class FM(nn.Module):
    """Factorization machine over bagged categorical fields.

    ``logit = bias + sum_f linear_f(x_f) + dense_linear(dense)
    + sum_{f<g} <e_f, e_g>`` where ``e_f = embeddings[f](values_f, offsets_f)``
    ``[B, D]``; with dense features, ``dense_embedding(dense)`` ``[B, D]``
    joins the interaction as one more field.

    Args:
        cardinality: per field, number of token ids (field order = key order
            unless ``field_names`` is given).
        embedding_dim: ``D``, the width of every table's output.
        mode_by_field: pooling mode per field (default ``"sum"``); use
            ``"mean"`` for multi-valued fields.
        num_dense: number of dense float features (0 = none).
        field_names: field order (default: the keys of ``cardinality``).
        init_std: embedding tables are initialised ``N(0, init_std^2)``.

    Attributes:
        embeddings: ``nn.ModuleDict`` field -> ``nn.EmbeddingBag(card, D)``.
        linear: ``nn.ModuleDict`` field -> ``nn.EmbeddingBag(card, 1)`` (zeros).
        bias: scalar parameter.
        dense_linear / dense_embedding: ``nn.Linear`` (only when ``num_dense > 0``).
    """

    def __init__(
        self,
        cardinality: Mapping[str, int],
        embedding_dim: int = 16,
        mode_by_field: Mapping[str, str] | None = None,
        num_dense: int = 0,
        field_names: Sequence[str] | None = None,
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        self.field_names: list[str] = list(field_names) if field_names is not None else list(cardinality)
        if not self.field_names:
            raise ValueError("a model needs at least one field")
        missing = [f for f in self.field_names if f not in cardinality]
        if missing:
            raise ValueError(f"no cardinality for field(s) {missing}")
        mode_by_field = dict(mode_by_field or {})
        unknown = set(mode_by_field) - set(self.field_names)
        if unknown:
            raise ValueError(f"mode_by_field names unknown field(s) {sorted(unknown)}")
        if int(embedding_dim) < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
        self.embedding_dim = int(embedding_dim)
        self.num_dense = int(num_dense)
        self.embeddings = nn.ModuleDict()
        self.linear = nn.ModuleDict()
        for f in self.field_names:
            mode = mode_by_field.get(f, "sum")
            if mode not in ("sum", "mean", "max"):
                raise ValueError(f"field {f!r}: mode must be 'sum', 'mean' or 'max', got {mode!r}")
            card = int(cardinality[f])
            emb = nn.EmbeddingBag(card, self.embedding_dim, mode=mode)
            nn.init.normal_(emb.weight, std=init_std)
            self.embeddings[f] = emb
            lin = nn.EmbeddingBag(card, 1, mode=mode)
            nn.init.zeros_(lin.weight)
            self.linear[f] = lin
        self.bias = nn.Parameter(torch.zeros(()))
        if self.num_dense > 0:
            self.dense_linear = nn.Linear(self.num_dense, 1)
            self.dense_embedding = nn.Linear(self.num_dense, self.embedding_dim)
        else:
            self.dense_linear = None
            self.dense_embedding = None

    @classmethod
    def from_dataset(cls, data: CTRDataset, embedding_dim: int = 16, **kwargs) -> FM:
        """Build from a dataset's fields, cardinalities, pooling modes and dense width."""
        kwargs.setdefault("mode_by_field", data.mode_by_field)
        kwargs.setdefault("num_dense", data.num_dense)
        return cls(data.cardinality, embedding_dim, field_names=data.field_names, **kwargs)

    # ------------------------------------------------------------ pieces
    def field_embeddings(self, batch: Mapping) -> Tensor:
        """Pooled field embeddings ``[B, F', D]`` (``F' = F + 1`` with dense features)."""
        fields = batch["fields"]
        embs = [self.embeddings[f](*fields[f]) for f in self.field_names]
        if self.dense_embedding is not None:
            embs.append(self.dense_embedding(batch["dense"]))
        return torch.stack(embs, dim=1)

    def first_order(self, batch: Mapping) -> Tensor:
        """``bias + sum_f linear_f + dense_linear`` as ``[B]``."""
        fields = batch["fields"]
        out = sum(self.linear[f](*fields[f]) for f in self.field_names).squeeze(1)
        if self.dense_linear is not None:
            out = out + self.dense_linear(batch["dense"]).squeeze(1)
        return out + self.bias

    @staticmethod
    def interaction(emb: Tensor) -> Tensor:
        """FM pairwise term ``sum_{f<g} <e_f, e_g>`` of ``emb [B, F, D]`` -> ``[B]``."""
        s = emb.sum(1)
        return 0.5 * (s * s - (emb * emb).sum(1)).sum(1)

    def forward(self, batch: Mapping) -> Tensor:
        """Logits ``[B]`` for a batch dict of :mod:`pme.recsys.data`."""
        emb = self.field_embeddings(batch)
        return self.first_order(batch) + self.interaction(emb)


class DeepFM(FM):
    """DeepFM: the :class:`FM` logit plus an MLP over the concatenated field
    embeddings ``[B, F' * D]`` (``F' = F + 1`` with dense features).

    Args:
        hidden: (keyword-only) MLP hidden widths (ReLU after each).
        dropout: (keyword-only) dropout probability after each hidden layer (0 = none).
        (the rest as in :class:`FM`, in its order)

    Attributes:
        mlp: ``nn.Sequential`` ending in ``nn.Linear(hidden[-1], 1)``.
    """

    def __init__(
        self, cardinality: Mapping[str, int], *args, hidden: Sequence[int] = (256, 128), dropout: float = 0.0, **kwargs
    ) -> None:
        super().__init__(cardinality, *args, **kwargs)  # FM's arguments, in FM's order
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        width = (len(self.field_names) + (1 if self.num_dense > 0 else 0)) * self.embedding_dim
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(float(dropout)))
            width = int(h)
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, batch: Mapping) -> Tensor:
        emb = self.field_embeddings(batch)
        deep = self.mlp(emb.flatten(1)).squeeze(1)
        return self.first_order(batch) + self.interaction(emb) + deep


# --------------------------------------------------------------------------- #
# Metrics
# --------------------------------------------------------------------------- #
def auc(labels: Tensor, scores: Tensor) -> float:
    """Area under the ROC curve, rank-based (Mann-Whitney U), ties counted 1/2.

    Args:
        labels: ``[n]``, positives are the entries ``> 0.5``.
        scores: ``[n]`` any real scores (logits or probabilities).

    Returns:
        AUC in ``[0, 1]``; ``nan`` when only one class is present.
    """
    y = torch.as_tensor(labels).detach().reshape(-1).cpu() > 0.5
    s = torch.as_tensor(scores).detach().reshape(-1).cpu().double()
    if y.numel() != s.numel():
        raise ValueError(f"labels ({y.numel()}) and scores ({s.numel()}) differ in length")
    n_pos = int(y.sum())
    n_neg = y.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    sorted_s, order = torch.sort(s)
    _, counts = torch.unique_consecutive(sorted_s, return_counts=True)
    ends = torch.cumsum(counts, 0).double()  # 1-based rank of each tie group's last member
    avg = ends - (counts.double() - 1) / 2  # average rank inside each group
    ranks = torch.repeat_interleave(avg, counts)
    pos_rank_sum = float(ranks[y[order]].sum())
    return (pos_rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def log_loss(labels: Tensor, logits: Tensor) -> float:
    """Mean binary cross-entropy of ``logits [n]`` against ``labels [n]`` (float64)."""
    y = torch.as_tensor(labels).detach().reshape(-1).double()
    z = torch.as_tensor(logits).detach().reshape(-1).double().to(y.device)
    return float(F.binary_cross_entropy_with_logits(z, y))


# --------------------------------------------------------------------------- #
# Training / evaluation
# --------------------------------------------------------------------------- #
def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def predict(model: nn.Module, data: CTRDataset, batch_size: int = 8192, device=None) -> Tensor:
    """Logits ``[n]`` (float32, on the CPU) for every row of ``data``, in order."""
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    try:
        outs = [model(batch_to(b, device, non_blocking=True)).float().cpu() for b in data.batches(batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(outs) if outs else torch.zeros(0)


def evaluate(model: nn.Module, data: CTRDataset, batch_size: int = 8192, device=None) -> dict[str, float]:
    """``{"auc": ..., "logloss": ..., "n": rows}`` of ``model`` on ``data``."""
    logits = predict(model, data, batch_size, device)
    labels = data.labels.cpu()
    return {"auc": auc(labels, logits), "logloss": log_loss(labels, logits), "n": len(data)}


def _make_optimizer(model: nn.Module, optimizer, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    if callable(optimizer):
        return optimizer(model.parameters())
    params = [p for p in model.parameters() if p.requires_grad]
    name = str(optimizer).lower()
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {optimizer!r}; use 'adam', 'adamw', 'adagrad', 'sgd' or an Optimizer")


def train_model(
    model: nn.Module,
    train: CTRDataset,
    val: CTRDataset | None = None,
    epochs: int = 1,
    batch_size: int = 2048,
    lr: float = 1e-3,
    optimizer: str | torch.optim.Optimizer = "adam",
    device=None,
    progress: bool = True,
    seed: int | None = 0,
    weight_decay: float = 0.0,
    max_steps: int | None = None,
) -> dict[str, list]:
    """Train ``model`` with binary cross-entropy on shuffled mini-batches.

    Args:
        model: maps a batch dict to logits ``[B]``.
        train, val: datasets (val is evaluated after every epoch when given).
        epochs: passes over ``train``.
        batch_size: rows per step.
        lr, weight_decay: optimizer settings (ignored for a ready Optimizer).
        optimizer: ``"adam"`` (default), ``"adamw"``, ``"adagrad"``, ``"sgd"``,
            an ``Optimizer`` instance, or a callable ``params -> Optimizer``.
        device: where to train (default: where the model's parameters are);
            the model and the datasets are moved there once.
        progress: show a tqdm progress bar and a line per epoch.
        seed: seeds the shuffling generator and ``torch.manual_seed`` (for
            dropout); None leaves the global RNG alone and shuffles from it.
        max_steps: stop after this many optimizer steps in total.

    Returns:
        History ``{"epoch": [...], "train_loss": [...], "val_auc": [...],
        "val_logloss": [...], "seconds": [...], "steps": [...]}`` with one
        entry per epoch (val entries are nan without ``val``).
    """
    if int(epochs) < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if int(batch_size) <= 0:  # before steps_per_epoch divides by it
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if max_steps is not None and int(max_steps) < 0:
        raise ValueError(f"max_steps must be >= 0, got {max_steps}")
    device = torch.device(device) if device is not None else _model_device(model)
    model.to(device)
    train_d = train.to(device)
    gen = None
    if seed is not None:
        torch.manual_seed(int(seed))
        gen = torch.Generator().manual_seed(int(seed))
    opt = _make_optimizer(model, optimizer, lr, weight_decay)
    hist: dict[str, list] = {k: [] for k in ("epoch", "train_loss", "val_auc", "val_logloss", "seconds", "steps")}
    steps_per_epoch = (len(train_d) + int(batch_size) - 1) // int(batch_size)
    step = 0
    for epoch in range(int(epochs)):
        model.train()
        t0 = time.perf_counter()
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{epochs}", leave=False, disable=not progress)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        rows = 0
        for batch in train_d.batches(batch_size, shuffle=True, generator=gen):
            if max_steps is not None and step >= max_steps:  # max_steps=0: no step at all
                break
            logits = model(batch)
            loss = F.binary_cross_entropy_with_logits(logits, batch["labels"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            b = batch["labels"].numel()
            loss_sum += loss.detach().double() * b
            rows += b
            step += 1
            bar.update(1)
            if progress and step % 10 == 0:
                bar.set_postfix_str(f"loss {loss.item():.4f}")
            if max_steps is not None and step >= max_steps:
                break
        bar.close()
        train_loss = float(loss_sum) / rows if rows else float("nan")
        seconds = time.perf_counter() - t0
        if val is not None:
            m = evaluate(model, val, device=device)
            va, vl = m["auc"], m["logloss"]
        else:
            va = vl = float("nan")
        for k, v in zip(hist, (epoch + 1, train_loss, va, vl, seconds, step)):
            hist[k].append(v)
        if progress:
            print(
                f"epoch {epoch + 1}/{epochs}: train loss {train_loss:.4f}, val auc {va:.4f}, "
                f"val logloss {vl:.4f} ({seconds:.1f}s)",
                file=sys.stderr,
                flush=True,
            )
        if max_steps is not None and step >= max_steps:
            break
    return hist
