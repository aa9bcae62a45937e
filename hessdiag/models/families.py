"""Model families beyond image classifiers, for the shipped example tasks and yours:
``transformer`` (sequence classification), ``gcn`` (graph classification), ``tiny-lm``
(causal language model). Small by default; all are differentiable twice in every
Hessian-vector product mode (attention runs through PyTorch's math kernel there, and no
module uses the fused "fast path" of ``nn.TransformerEncoder``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _encoder(d_model: int, heads: int, layers: int, dim_feedforward: int,
             dropout: float) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward, dropout=dropout,
                                       batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class SequenceTransformer(nn.Module):
    """Sequence classifier: ``(B, T, F)`` -> linear embedding + learned positions ->
    ``TransformerEncoder`` -> mean over time -> linear head ``(B, num_classes)``.
    Sequences shorter than ``seq_len`` use the first positions."""

    def __init__(self, num_classes: int, seq_len: int, num_features: int, *,
                 d_model: int = 32, heads: int = 4, layers: int = 2,
                 dim_feedforward: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Linear(num_features, d_model)
        self.positions = nn.Parameter(0.02 * torch.randn(seq_len, d_model))
        self.encoder = _encoder(d_model, heads, layers, dim_feedforward, dropout)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x) + self.positions[: x.shape[1]]
        return self.head(self.encoder(h).mean(dim=1))


class GCN(nn.Module):
    """Graph classifier (Kipf & Welling 2017): ``layers`` graph convolutions
    ``H <- relu(A_hat H W)`` on the normalised adjacency ``A_hat`` of a batch of graphs
    (block-diagonal, see :func:`hessdiag.data.synthetic.collate_graphs`), the mean of each
    graph's node states (``graph_index``), a linear head ``(G, num_classes)``."""

    def __init__(self, num_features: int, num_classes: int, *, hidden: int = 32,
                 layers: int = 2) -> None:
        super().__init__()
        sizes = [num_features] + [hidden] * layers
        self.convs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:],
                                                                  strict=False))
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor, adj: Tensor, graph_index: Tensor) -> Tensor:
        h = x
        for conv in self.convs:
            h = torch.relu(adj @ conv(h))
        graphs = int(graph_index.max()) + 1
        pooled = torch.zeros(graphs, h.shape[1], dtype=h.dtype, device=h.device)
        pooled = pooled.index_add(0, graph_index, h)
        sizes = torch.bincount(graph_index, minlength=graphs).to(h.dtype)
        return self.head(pooled / sizes[:, None])


class TinyLM(nn.Module):
    """Causal transformer language model: token and learned position embeddings,
    ``TransformerEncoder`` with an explicit causal mask, logits ``(B, L, vocab_size)``
    for any ``L <= seq_len``. Position ``t`` sees tokens ``0..t`` only, so padding at
    the end of a sample changes nothing before it."""

    def __init__(self, vocab_size: int, seq_len: int, *, d_model: int = 32, heads: int = 2,
                 layers: int = 2, dim_feedforward: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, d_model)
        self.positions = nn.Parameter(0.02 * torch.randn(seq_len, d_model))
        self.encoder = _encoder(d_model, heads, layers, dim_feedforward, dropout)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, ids: Tensor) -> Tensor:
        length = ids.shape[1]
        mask = torch.triu(torch.full((length, length), float("-inf"), device=ids.device), 1)
        h = self.tokens(ids) + self.positions[:length]
        return self.head(self.encoder(h, mask=mask.to(h.dtype)))
