"""A minimal compressed-sparse-row container for per-user item sets.

Interactions are stored as sorted ``(user, item)`` pairs; most consumers need "the items of user u" (masking seen
items, ground truth for ranking metrics, training targets). A CSR index answers that in O(1) without scipy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Csr:
    """Rows are users, columns are items; ``indices[indptr[u]:indptr[u + 1]]`` are user u's items (sorted)."""

    indptr: np.ndarray  # [n_rows + 1] int64
    indices: np.ndarray  # [nnz] int64
    n_rows: int
    n_cols: int

    @classmethod
    def from_pairs(cls, rows: np.ndarray, cols: np.ndarray, n_rows: int, n_cols: int) -> "Csr":
        """Builds the index from parallel arrays of row and column ids; duplicate pairs are kept once."""
        rows = np.asarray(rows, dtype=np.int64)
        cols = np.asarray(cols, dtype=np.int64)
        if rows.shape != cols.shape:
            raise ValueError(f"rows and cols differ in length: {rows.shape} vs {cols.shape}")
        if rows.size:
            if rows.min() < 0 or rows.max() >= n_rows:
                raise ValueError(f"row ids must lie in [0, {n_rows}), got [{rows.min()}, {rows.max()}]")
            if cols.min() < 0 or cols.max() >= n_cols:
                raise ValueError(f"column ids must lie in [0, {n_cols}), got [{cols.min()}, {cols.max()}]")
        keys = np.sort(rows * np.int64(n_cols) + cols)  # by (row, col); np.sort + a diff beats np.unique here
        if keys.size:
            keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])]
        rows, cols = keys // n_cols, keys % n_cols
        indptr = np.zeros(n_rows + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=n_rows), out=indptr[1:])
        return cls(indptr=indptr, indices=cols, n_rows=n_rows, n_cols=n_cols)

    @classmethod
    def union(cls, *parts: "Csr") -> "Csr":
        """Every pair of ``parts`` (all of one shape), each once."""
        shapes = {(c.n_rows, c.n_cols) for c in parts}
        if len(shapes) != 1:
            raise ValueError(f"the parts differ in shape: {sorted(shapes)}")
        if len(parts) == 1:
            return parts[0]
        (n_rows, n_cols), = shapes
        return cls.from_pairs(np.concatenate([c.rows_of() for c in parts]), np.concatenate([c.indices for c in parts]),
                              n_rows, n_cols)

    @property
    def nnz(self) -> int:
        return int(self.indices.size)

    def row(self, i: int) -> np.ndarray:
        return self.indices[self.indptr[i] : self.indptr[i + 1]]

    def row_lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

    def rows_of(self) -> np.ndarray:
        """The row id of every stored entry, parallel to ``indices``."""
        return np.repeat(np.arange(self.n_rows, dtype=np.int64), self.row_lengths())

    def batch_pairs(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For a batch of row ids, returns (position in batch, column) of every entry: the scatter index of a
        [len(rows), n_cols] mask or target matrix."""
        rows = np.asarray(rows, dtype=np.int64)
        starts, ends = self.indptr[rows], self.indptr[rows + 1]
        lengths = ends - starts
        pos = np.repeat(np.arange(rows.size, dtype=np.int64), lengths)
        offsets = np.arange(lengths.sum(), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return pos, self.indices[np.repeat(starts, lengths) + offsets]
