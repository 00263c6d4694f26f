"""What runs after pooling: Dense layers, Normalize, Matryoshka truncation.

    head = Head.from_st_folder(folder, device)      # Dense modules + Normalize of the folder
    rows = head(pooled)                             # fp32 [B, D] -> fp32 [B, D_out]
    rows = finish_rows(rows, truncate_dim=256, normalize=True)

The head runs in float32 on the pooled float32 rows, on the model's device: sentence-transformers
runs Dense in the model's dtype, so in bf16/fp16 l2v's result is the more precise one (in fp32 they
are the same computation). A model without Dense or Normalize modules has an empty head
(`Head.identity(dim)`), which returns the rows unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_ACTIVATIONS = {
    "identity": lambda x: x,
    "tanh": torch.tanh,
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,
    "sigmoid": torch.sigmoid,
    "silu": torch.nn.functional.silu,
}


@dataclass
class DenseLayer:
    weight: torch.Tensor  # fp32 [out, in]
    bias: torch.Tensor | None  # fp32 [out]
    activation: str  # a key of _ACTIVATIONS


class Head:
    """Dense layers, then an optional L2 normalization (sentence-transformers' Normalize)."""

    def __init__(self, dim: int, layers: list[DenseLayer] | None = None, normalize: bool = False):
        self.in_dim = dim
        self.layers = list(layers or [])
        self.normalize = normalize
        d = dim
        for layer in self.layers:
            if layer.weight.shape[1] != d:
                raise ValueError(
                    f"a Dense layer takes {layer.weight.shape[1]} features but gets {d}"
                )
            d = layer.weight.shape[0]
        self.out_dim = d

    @classmethod
    def identity(cls, dim: int) -> Head:
        return cls(dim)

    @property
    def is_identity(self) -> bool:
        return not self.layers and not self.normalize

    @classmethod
    def from_st_folder(cls, folder, dim: int, device) -> Head:
        """The Dense modules and Normalize of an l2v_models.st_folder.StFolder whose Transformer
        gives `dim` features (weights read and checked by st_folder.read_dense_weights)."""
        from l2v_models.st_folder import StFolderError, read_dense_weights

        if folder.embedding_dimension is not None and folder.embedding_dimension != dim:
            raise StFolderError(
                f"{folder.root}: the Pooling module expects {folder.embedding_dimension} "
                f"features but the model gives {dim}"
            )
        layers = []
        d = dim
        for spec in folder.dense:
            if spec.in_features != d:
                raise StFolderError(
                    f"{spec.directory / 'config.json'}: in_features is {spec.in_features} but the "
                    f"module before it gives {d} features"
                )
            weight, bias = read_dense_weights(spec)
            layers.append(DenseLayer(
                weight.to(device), None if bias is None else bias.to(device), spec.activation
            ))  # fmt: skip
            d = spec.out_features
        return cls(dim, layers, folder.normalize)

    def to(self, device) -> Head:
        layers = [
            DenseLayer(layer.weight.to(device),
                       None if layer.bias is None else layer.bias.to(device), layer.activation)
            for layer in self.layers
        ]  # fmt: skip
        return Head(self.in_dim, layers, self.normalize)

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """fp32 [B, in_dim] -> fp32 [B, out_dim]."""
        x = rows.float()
        for layer in self.layers:
            x = torch.nn.functional.linear(x, layer.weight, layer.bias)
            x = _ACTIVATIONS[layer.activation](x)
        if self.normalize:
            x = l2_normalize(x)
        return x


def l2_normalize(rows: torch.Tensor) -> torch.Tensor:
    """Each row divided by its L2 norm (a zero row stays zero)."""
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def check_truncate_dim(truncate_dim, dim: int) -> int | None:
    """A valid Matryoshka dimension (1 <= truncate_dim <= dim) or None; ValueError otherwise."""
    if truncate_dim is None:
        return None
    if isinstance(truncate_dim, bool) or not isinstance(truncate_dim, int) or truncate_dim < 1:
        raise ValueError(f"truncate_dim must be a positive integer, got {truncate_dim!r}")
    if truncate_dim > dim:
        raise ValueError(
            f"truncate_dim={truncate_dim} is larger than the model's embedding dimension {dim}"
        )
    return truncate_dim


def finish_rows(rows: torch.Tensor, *, truncate_dim: int | None, normalize: bool) -> torch.Tensor:
    """Matryoshka truncation to the first truncate_dim features, then L2 normalization when asked
    (sentence-transformers' order: truncate, then normalize)."""
    if truncate_dim is not None and truncate_dim < rows.shape[-1]:
        rows = rows[..., :truncate_dim]
    return l2_normalize(rows) if normalize else rows
