"""Which feature vectors the model was trained on: a compact set of 64-bit row hashes carried by the export,
so `evaluate` / `predict` can say how many "new" rows were in fact in the training split (docs/predict.md).

Up to EXACT_MAX distinct vectors it is the sorted hashes themselves (exact up to 64-bit collisions); above,
a Bloom filter sized for BLOOM_FP_RATE false positives (it never misses a training row)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cic_gpt2.files import atomic_path

EXACT_MAX = 4_000_000
"""Above this many distinct training vectors (32 MB of hashes) the export carries a Bloom filter instead."""
BLOOM_FP_RATE = 0.01
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass(frozen=True)
class Membership:
    kind: str  # "exact" | "bloom"
    data: np.ndarray  # sorted unique uint64 hashes, or the Bloom filter's bits as uint8
    num_items: int
    num_hashes: int = 0  # Bloom: probes per item

    @property
    def fp_rate(self) -> float:
        """Probability that a vector never seen in training is reported as seen."""
        if self.kind == "exact":
            return 0.0
        bits = self.data.size * 8
        return (1.0 - math.exp(-self.num_hashes * self.num_items / bits)) ** self.num_hashes

    @classmethod
    def build(cls, hashes: np.ndarray, exact_max: int = EXACT_MAX, fp_rate: float = BLOOM_FP_RATE) -> "Membership":
        unique = np.unique(np.asarray(hashes, dtype=np.uint64))
        if unique.size <= exact_max:
            return cls("exact", unique, int(unique.size))
        bits = max(64, int(math.ceil(-unique.size * math.log(fp_rate) / math.log(2) ** 2)))
        bits = 8 * -(-bits // 8)
        k = max(1, int(round(bits / unique.size * math.log(2))))
        filt = np.zeros(bits // 8, dtype=np.uint8)
        for start in range(0, unique.size, 1 << 20):  # bounded memory: 1M items at a time
            pos = _probes(unique[start:start + (1 << 20)], k, bits).ravel()
            np.bitwise_or.at(filt, pos >> 3, (1 << (pos & 7)).astype(np.uint8))
        return cls("bloom", filt, int(unique.size), k)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        hashes = np.asarray(hashes, dtype=np.uint64)
        if self.kind == "exact":
            if self.data.size == 0:
                return np.zeros(hashes.shape, dtype=bool)
            at = np.minimum(np.searchsorted(self.data, hashes), self.data.size - 1)
            return self.data[at] == hashes
        pos = _probes(hashes, self.num_hashes, self.data.size * 8)
        return ((self.data[pos >> 3] >> (pos & 7).astype(np.uint8)) & 1).astype(bool).all(axis=1)

    def save(self, path: str | Path) -> None:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, kind=np.array(self.kind), data=self.data, num_items=self.num_items,
                     num_hashes=self.num_hashes)

    @classmethod
    def load(cls, path: str | Path) -> "Membership":
        with np.load(path, allow_pickle=False) as z:
            return cls(str(z["kind"]), z["data"], int(z["num_items"]), int(z["num_hashes"]))


def _probes(hashes: np.ndarray, k: int, bits: int) -> np.ndarray:
    """[n, k] bit positions by double hashing (Kirsch-Mitzenmacher) of the two 32-bit halves."""
    h1 = hashes & np.uint64(0xFFFFFFFF)
    h2 = (hashes >> np.uint64(32)) | np.uint64(1)
    i = np.arange(k, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return ((h1[:, None] + i[None, :] * h2[:, None]) & _MASK64) % np.uint64(bits)
