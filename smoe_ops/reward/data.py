"""`PreferenceData`: labelled preference pairs as feature tensors, one row per pair."""

from typing import Optional, Union

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError

__all__ = ["PreferenceData"]

_REQUIRED = ("context", "chosen", "rejected")


def _features(name: str, value, expected_rows: Optional[int]) -> torch.Tensor:
    tensor = torch.as_tensor(value)
    if tensor.dim() != 2:
        raise ValueError(
            f"PreferenceData: {name} must be 2-d [P, D], got shape {tuple(tensor.shape)}"
        )
    if not tensor.is_floating_point():
        raise TypeError(f"PreferenceData: {name} must be floating point, got {tensor.dtype}")
    if expected_rows is not None and tensor.shape[0] != expected_rows:
        raise ValueError(
            f"PreferenceData: {name} has {tensor.shape[0]} rows, expected {expected_rows} "
            "(one per pair, as context)"
        )
    return tensor.to(torch.float32).contiguous()


def _labels(name: str, value, num_pairs: int) -> torch.Tensor:
    if value is None:
        return torch.full((num_pairs,), -1, dtype=torch.int64)
    tensor = torch.as_tensor(value)
    if tensor.shape != (num_pairs,):
        raise ValueError(
            f"PreferenceData: {name} must have shape ({num_pairs},), "
            f"got {tuple(tensor.shape)}"
        )
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"PreferenceData: {name} must be an integer tensor, got {tensor.dtype}")
    return tensor.to(torch.int64).contiguous()


class PreferenceData:
    """Labelled pairs: in pair i, response `chosen[i]` was preferred to `rejected[i]`.

    Args:
        context: [P, Dc] float features of the prompt and/or rater (the router's input).
        chosen: [P, Dr] float features of the preferred response.
        rejected: [P, Dr] float features of the other response.
        user_ids: [P] integer, who labelled the pair; None or -1 means unknown.
        categories: [P] integer, known group labels (for reports only); None or -1 unknown.

    Features are stored as float32, labels as int64, all contiguous on the CPU.
    """

    def __init__(self, context, chosen, rejected, user_ids=None, categories=None):
        self.context = _features("context", context, None)
        num_pairs = self.context.shape[0]
        self.chosen = _features("chosen", chosen, num_pairs)
        self.rejected = _features("rejected", rejected, num_pairs)
        if self.chosen.shape[1] != self.rejected.shape[1]:
            raise ValueError(
                f"PreferenceData: rejected has {self.rejected.shape[1]} features, expected "
                f"{self.chosen.shape[1]} (the same response_dim as chosen)"
            )
        self.user_ids = _labels("user_ids", user_ids, num_pairs)
        self.categories = _labels("categories", categories, num_pairs)

    @property
    def context_dim(self) -> int:
        return self.context.shape[1]

    @property
    def response_dim(self) -> int:
        return self.chosen.shape[1]

    def __len__(self) -> int:
        return self.context.shape[0]

    def __repr__(self) -> str:
        return (
            f"PreferenceData(pairs={len(self)}, context_dim={self.context_dim}, "
            f"response_dim={self.response_dim})"
        )

    def __getitem__(self, index: Union[int, slice, torch.Tensor, list]) -> "PreferenceData":
        """The pairs selected by `index` (an int, a slice, an index or bool mask tensor).
        As with tensors, an int or slice gives views that share memory with this data."""
        if isinstance(index, int):
            index = slice(index, index + 1) if index != -1 else slice(-1, None)
        if isinstance(index, list):
            index = torch.as_tensor(index, dtype=torch.int64)
        return PreferenceData(
            self.context[index],
            self.chosen[index],
            self.rejected[index],
            self.user_ids[index],
            self.categories[index],
        )

    def split(self, fraction: float, seed: int = 0):
        """Shuffle the pairs (seeded) and cut them into (first, second) with
        round(fraction * P) pairs in the first part."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"PreferenceData.split: fraction must be in [0, 1], got {fraction}")
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self), generator=generator)
        cut = round(fraction * len(self))
        return self[order[:cut]], self[order[cut:]]

    def save_npz(self, path) -> None:
        """Write the five arrays to `path` with numpy.savez (uncompressed)."""
        np.savez(path, **{name: tensor.numpy() for name, tensor in self._arrays().items()})

    @classmethod
    def load_npz(cls, path) -> "PreferenceData":
        """Read a file written by `save_npz` (user_ids and categories may be absent)."""
        with np.load(path, allow_pickle=False) as archive:
            _check_keys("load_npz", path, archive.files)
            arrays = {key: torch.from_numpy(archive[key]) for key in archive.files}
        return cls._from_arrays(arrays)

    def save_safetensors(self, path) -> None:
        """Write the five tensors to `path` as one safetensors file."""
        safetensors.torch.save_file(self._arrays(), path)

    @classmethod
    def load_safetensors(cls, path) -> "PreferenceData":
        """Read a safetensors file with tensors context, chosen, rejected (and optionally
        user_ids, categories), as `save_safetensors` writes."""
        try:
            tensors = safetensors.torch.load_file(path)
        except SafetensorError as error:
            raise ValueError(
                f"PreferenceData.load_safetensors: {path} is not a readable safetensors "
                f"file: {error}"
            ) from None
        _check_keys("load_safetensors", path, list(tensors))
        return cls._from_arrays(tensors)

    @classmethod
    def from_jsonl(cls, path, encoder=None, **kwargs) -> "PreferenceData":
        """Text pairs from a JSONL file, encoded by `encoder` (None: MiniLM); keyword
        arguments (cache_dir, batch_size, progress, user_index, category_index) as for
        `smoe_ops.reward.text.load_jsonl`, which this calls. That function also returns
        the name -> id maps of string user ids and categories, which this one drops."""
        # Imported here: the text module builds on this one.
        from smoe_ops.reward.text import load_jsonl

        data, _ = load_jsonl(path, encoder, **kwargs)
        return data

    def _arrays(self) -> dict:
        return dict(context=self.context, chosen=self.chosen, rejected=self.rejected,
                    user_ids=self.user_ids, categories=self.categories)

    @classmethod
    def _from_arrays(cls, arrays: dict) -> "PreferenceData":
        return cls(arrays["context"], arrays["chosen"], arrays["rejected"],
                   arrays.get("user_ids"), arrays.get("categories"))


def _check_keys(loader: str, path, found) -> None:
    missing = [key for key in _REQUIRED if key not in found]
    if missing:
        raise ValueError(
            f"PreferenceData.{loader}: {path} lacks the array(s) {missing}; expected "
            f"{list(_REQUIRED)} (and optionally user_ids, categories), found {sorted(found)}"
        )
