"""Which split each prepared row goes to: the stratified split, rows with identical feature vectors
(`prepare --dedup group|drop|none`) and the leak report stored as manifest `dedup`.

Rows are identified by `encode.feature_hashes` (64-bit hash of the float32 feature vector; of the text for
text input). Memory: besides the hash (8 bytes) and label (2) per row that prepare already holds, grouping
needs ~20 bytes per row for a few seconds (a sort order and the group of each row). Rules, tolerances and
report keys: docs/prepare.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cic_gpt2.errors import DataError

MODES = ("group", "drop", "none")
# Split codes: 0/1/2 = train/val/test; negative = not written, with the drop reason counted in the manifest.
OVER_CAP, TOO_SMALL, DUPLICATE, TRAIN_CUT = -1, -2, -3, -4
DROP_REASONS = {OVER_CAP: "over_max_per_class", TOO_SMALL: "class_too_small", DUPLICATE: "duplicate",
                TRAIN_CUT: "over_max_train_rows"}
TOP_PAIRS = 5
GREEDY_GROUPS = 10_000  # per stratum: the largest groups placed one by one (a Python loop), the rest vectorised


def cut_train(split_code: np.ndarray, labels: np.ndarray, max_rows: int | None, seed: int) -> None:
    """Keep a seeded stratified `max_rows` of the training rows (every class keeps at least one), marking the
    rest TRAIN_CUT, in place. Validation and test are untouched: the same split with less training data, for
    learning curves (benchmarks/bench_learning_curve.py)."""
    train = np.flatnonzero(split_code == 0)
    if not max_rows or max_rows >= len(train):
        return
    rng = np.random.default_rng([int(seed), 0x7C])
    keep = []
    for c in np.unique(labels[train]):
        rows = train[labels[train] == c]
        take = max(1, int(round(len(rows) * max_rows / len(train))))
        keep.append(rng.choice(rows, size=min(take, len(rows)), replace=False))
    cut = np.ones(len(train), dtype=bool)
    cut[np.searchsorted(train, np.concatenate(keep))] = False
    split_code[train[cut]] = TRAIN_CUT


def min_rows_per_class(ratios) -> int:
    return sum(1 for r in ratios if r > 0)


def _split_counts(n: int, ratios) -> tuple[int, int, int]:
    """(train, val, test) sizes of n rows: at least one in each split with a non-zero ratio."""
    n_val = max(1, round(n * ratios[1])) if ratios[1] > 0 else 0
    n_test = max(1, round(n * ratios[2])) if ratios[2] > 0 else 0
    return n - n_val - n_test, n_val, n_test


def assign_splits(labels: np.ndarray, num_classes: int, ratios, seed: int, max_per_class: int | None,
                  small_classes: set[int]) -> np.ndarray:
    """Split code per row: 0/1/2 = train/val/test, -1 = over --max-per-class, -2 = class too small (dropped).

    Stratified and deterministic: within each class a seeded permutation; the first rows (up to the cap) are
    divided by the ratios, at least one row in each split with a non-zero ratio.
    """
    rng = np.random.default_rng(seed)
    code = np.full(len(labels), OVER_CAP, dtype=np.int8)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(num_classes + 1))
    for c in range(num_classes):
        idx = order[bounds[c]:bounds[c + 1]]
        if len(idx) == 0:
            continue
        if c in small_classes:
            code[idx] = TOO_SMALL
            continue
        idx = idx[rng.permutation(len(idx))]
        if max_per_class is not None:
            idx = idx[:max_per_class]
        n_train, n_val, _ = _split_counts(len(idx), ratios)
        code[idx[:n_train]] = 0
        code[idx[n_train:n_train + n_val]] = 1
        code[idx[n_train + n_val:]] = 2
    return code


# ================================================================================================ groups
@dataclass
class Groups:
    """Rows grouped by feature vector (equal hash), groups numbered in ascending hash order."""

    inverse: np.ndarray  # [rows] group of each row
    sizes: np.ndarray  # [groups] rows
    majority: np.ndarray  # [groups] most frequent label (ties: the lowest label id)
    majority_count: np.ndarray  # [groups] rows with that label
    conflicts: np.ndarray  # [k, 3] (group, label, rows) of every label of groups with > 1 label, sorted
    repeats: np.ndarray | None  # [rows] bool: an earlier row has the same vector and label (want_repeats)

    @property
    def num_groups(self) -> int:
        return len(self.sizes)


def group_rows(hashes: np.ndarray, labels: np.ndarray, want_repeats: bool = False) -> Groups:
    """Group rows by hash; per group its size and majority label, the label counts of conflicting groups.

    Memory beyond the inputs: at most ~22 bytes per row (all rows distinct), ~14 held by the result; the
    steps are ordered and temporaries freed for that (46.7M rows: ~1 GB at the peak)."""
    n = len(hashes)
    index_type = np.int32 if n < 2**31 else np.int64
    order = np.lexsort((labels, hashes))  # by hash, then label; stable: equal rows keep input order
    new_group = np.ones(n, dtype=bool)
    sorted_hashes = hashes[order]
    np.not_equal(sorted_hashes[1:], sorted_hashes[:-1], out=new_group[1:])
    del sorted_hashes
    sorted_labels = labels[order]
    new_run = new_group.copy()  # a run = rows with the same vector and label
    new_run[1:] |= sorted_labels[1:] != sorted_labels[:-1]
    group_sorted = np.cumsum(new_group, dtype=index_type)
    group_sorted -= 1
    inverse = np.empty(n, dtype=index_type)
    inverse[order] = group_sorted
    repeats = None
    if want_repeats:
        repeats = np.zeros(n, dtype=bool)
        repeats[order[~new_run]] = True  # lexsort is stable: a run's first row is its first occurrence
    del order
    # Conflicting groups: a run starts inside the group. Only their rows get (group, label) counts.
    conflicting = np.zeros(int(group_sorted[-1]) + 1 if n else 0, dtype=bool)
    conflicting[group_sorted[new_run & ~new_group]] = True
    in_conflict = np.flatnonzero(conflicting[group_sorted])
    del conflicting
    is_start = new_run[in_conflict]
    run_starts = in_conflict[is_start]  # sorted positions where a (group, label) run starts
    conflicts = np.stack([group_sorted[run_starts], sorted_labels[run_starts],
                          np.diff(np.append(np.flatnonzero(is_start), len(in_conflict)))], axis=1).astype(np.int64)
    del new_run, group_sorted, in_conflict, is_start, run_starts
    majority = sorted_labels[new_group]
    del sorted_labels
    starts = np.flatnonzero(new_group)
    del new_group
    sizes = np.empty(len(starts), dtype=index_type)
    np.subtract(starts[1:], starts[:-1], out=sizes[:-1], casting="unsafe")
    if len(starts):
        sizes[-1] = n - starts[-1]
    del starts
    majority_count = sizes.copy()
    if len(conflicts):
        run_group, run_label, run_rows = conflicts.T
        first = np.flatnonzero(np.append(True, run_group[1:] != run_group[:-1]))
        best = np.maximum.reduceat(run_rows, first)
        winner = np.flatnonzero(run_rows == np.repeat(best, np.diff(np.append(first, len(run_rows)))))
        winner = winner[np.append(True, run_group[winner][1:] != run_group[winner][:-1])]  # lowest label
        majority[run_group[winner]] = run_label[winner]
        majority_count[run_group[winner]] = run_rows[winner]
    return Groups(inverse=inverse, sizes=sizes, majority=majority, majority_count=majority_count,
                  conflicts=conflicts, repeats=repeats)


def assign_group_splits(groups: Groups, num_classes: int, ratios, rng: np.random.Generator) -> np.ndarray:
    """Split code of each group: stratified over groups, a group's stratum being its majority label.

    Per stratum, the split sizes are those of the row split (`_split_counts` of its rows). Groups of more
    than one row are put in a seeded random order; the largest (at most GREEDY_GROUPS, largest first) each go
    to the split furthest below its size; the other multi-row groups are laid end to end and each goes where
    its middle row falls when the remaining room of each split is scaled to the rows left. Single-row groups
    then fill the remaining room exactly, in a seeded random order. So a split's rows in a stratum differ
    from its size by less than twice the stratum's largest group (by at most 1 row when all are single).
    With at least as many groups as non-empty splits each split gets a group (the smallest of the split
    with most groups moves into an empty one); a stratum with fewer groups fills train, then val, then test.
    """
    code = np.zeros(groups.num_groups, dtype=np.int8)
    nonzero = [s for s in range(3) if ratios[s] > 0]
    for c in range(num_classes):
        in_stratum = groups.majority == c
        n_groups = int(in_stratum.sum())
        if n_groups == 0:
            continue
        single = in_stratum & (groups.sizes == 1)
        idx = np.flatnonzero(in_stratum & ~single)
        idx = idx[rng.permutation(len(idx))]
        idx = idx[np.argsort(-groups.sizes[idx], kind="stable")]  # largest first; ties in random order
        sizes = groups.sizes[idx].astype(np.int64)
        n_single = n_groups - len(idx)
        room = np.array(_split_counts(int(sizes.sum()) + n_single, ratios), dtype=np.float64)
        split = np.empty(len(idx), dtype=np.int8)
        n_greedy = min(GREEDY_GROUPS, len(idx))
        for i in range(n_greedy):
            split[i] = int(np.argmax(room))
            room[split[i]] -= sizes[i]
        rest = sizes[n_greedy:]
        if len(rest):
            left = np.clip(room, 0, None)
            bounds = np.cumsum(left) * (rest.sum() / left.sum())
            split[n_greedy:] = np.minimum(np.searchsorted(bounds, np.cumsum(rest) - rest / 2, side="right"), 2)
            room -= np.bincount(split[n_greedy:], weights=rest, minlength=3)
        single_split = np.repeat(np.arange(3, dtype=np.int8), _share(n_single, np.clip(room, 0, None)))
        rng.shuffle(single_split)
        if n_groups < len(nonzero):  # too few groups to reach every split: train, then val, then test
            split, single_split = np.array(nonzero[:len(idx)], np.int8), np.array(nonzero[len(idx):n_groups], np.int8)
        code[idx] = split
        code[single] = single_split
        _fill_empty_splits(code, in_stratum, groups.sizes, nonzero)
    return code


def _share(n: int, room: np.ndarray) -> np.ndarray:
    """n items divided in proportion to room (largest remainder; all to train when there is no room)."""
    if room.sum() <= 0:
        return np.array([n, 0, 0])
    exact = room * (n / room.sum())
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(-(exact - counts), kind="stable")[:n - counts.sum()]] += 1
    return counts


def _fill_empty_splits(code: np.ndarray, in_stratum: np.ndarray, sizes: np.ndarray, nonzero: list[int]) -> None:
    """Give each empty split of a stratum (with enough groups) the smallest group of its fullest split."""
    idx = np.flatnonzero(in_stratum)
    if len(idx) < len(nonzero):
        return
    for s in nonzero:
        split = code[idx]
        if not (split == s).any():
            donor = max(nonzero, key=lambda d: int((split == d).sum()))
            members = idx[split == donor]
            code[members[np.argmin(sizes[members])]] = s


# ================================================================================================ split
def split_rows(labels: np.ndarray, hashes: np.ndarray, names: list[str], ratios, seed: int,
               max_per_class: int | None, small_classes: str, mode: str, split_text: str = "") -> tuple[np.ndarray, dict]:
    """Split code of each row (0/1/2, or OVER_CAP / TOO_SMALL / DUPLICATE), and the duplicate statistics of all
    rows (`describe_duplicates`).

    none: `assign_splits` as before --dedup existed. drop: the first row of each (vector, label) is kept,
    the rest are DUPLICATE; the kept rows are split by `assign_splits`. group: classes too small and the
    --max-per-class cap are applied to rows first, exactly as with none (the same rows are kept); the kept
    rows are then grouped by vector and split by `assign_group_splits`, so equal vectors share a split.
    The grouping of all rows is freed before the row split runs (peak memory: see `group_rows`).
    """
    if mode not in MODES:
        raise DataError(f"--dedup {mode!r}: choose one of {', '.join(MODES)}")
    num_classes = len(names)
    groups = group_rows(hashes, labels, want_repeats=mode == "drop")
    stats = describe_duplicates(groups, names)
    code = np.full(len(labels), DUPLICATE, dtype=np.int8)
    if mode == "drop":
        kept = ~groups.repeats
        del groups
        small = _small_classes(labels[kept], names, ratios, small_classes, split_text)
        code[kept] = assign_splits(labels[kept], num_classes, ratios, seed, max_per_class, small)
        return code, stats
    small = _small_classes(labels, names, ratios, small_classes, split_text)
    if mode == "none" or max_per_class is not None:
        del groups  # not needed any more (group mode regroups the kept rows): frees ~14 bytes per row
        code[:] = assign_splits(labels, num_classes, ratios, seed, max_per_class, small)
    else:  # group, no cap: every row of a class big enough is split
        code[:] = 0
        if small:
            code[np.isin(labels, sorted(small))] = TOO_SMALL
    if mode == "none":
        return code, stats
    eligible = code >= 0
    if max_per_class is not None or small:
        groups = group_rows(hashes[eligible], labels[eligible])
    group_code = assign_group_splits(groups, num_classes, ratios, np.random.default_rng([seed, 1]))
    code[eligible] = group_code[groups.inverse]
    return code, stats


def _small_classes(labels: np.ndarray, names: list[str], ratios, policy: str, split_text: str) -> set[int]:
    """Classes with fewer rows than splits: a DataError listing them, or (policy "drop") their ids."""
    counts = np.bincount(labels, minlength=len(names))
    need = min_rows_per_class(ratios)
    small = {c for c in range(len(names)) if 0 < counts[c] < need}
    if small and policy == "error":
        listed = ", ".join(f"{names[c]} ({counts[c]} row{'s' if counts[c] != 1 else ''})" for c in sorted(small))
        raise DataError(f"classes too small for a {split_text} split (need >= {need} rows each): {listed}; "
                        f"drop them with --small-classes drop (the default), or use a coarser --classes or more data")
    return small


# ================================================================================================ report
def train_hashes(hashes: np.ndarray, code: np.ndarray) -> np.ndarray:
    """Sorted unique hashes of the train rows (what `train_hashes.npy` holds); np.unique would copy once more."""
    train = hashes[code == 0]
    train.sort()
    new = np.ones(len(train), dtype=bool)
    np.not_equal(train[1:], train[:-1], out=new[1:])
    return train if new.all() else train[new]


def describe_duplicates(groups: Groups, names: list[str]) -> dict:
    """Duplicate and conflicting-label counts and the accuracy ceiling of the grouped rows."""
    dup_groups = groups.sizes > 1
    conflict_groups = np.unique(groups.conflicts[:, 0]).astype(np.int64)
    return {
        "rows": int(len(groups.inverse)),
        "distinct_vectors": int(groups.num_groups),
        "duplicate_rows": int(groups.sizes[dup_groups].sum(dtype=np.int64)),
        "duplicate_groups": int(dup_groups.sum()),
        "conflicting_groups": int(len(conflict_groups)),
        "conflicting_rows": int(groups.sizes[conflict_groups].sum(dtype=np.int64)),
        "top_conflicting_pairs": _top_pairs(groups.conflicts, names),
        "accuracy_ceiling": {"all": round(float(groups.majority_count.sum(dtype=np.int64))
                                          / max(1, len(groups.inverse)), 6)},
    }


def dedup_report(mode: str, hash_name: str, stats: dict, hashes: np.ndarray, labels: np.ndarray,
                 code: np.ndarray, names: list[str], ratios, train_unique: np.ndarray) -> dict:
    """The manifest's `dedup` section. `stats` (from split_rows) describe every row that passed the cell checks
    (before the cap and the drop); overlap, the test ceiling and stratification describe the written splits."""
    report = {"mode": mode, "hash": hash_name, **stats}
    report["accuracy_ceiling"] = {**stats["accuracy_ceiling"], "test": _ceiling(hashes[code == 2], labels[code == 2])}
    report["overlap"] = {split: _overlap(hashes[code == s], train_unique) for s, split in ((1, "val"), (2, "test"))}
    report["stratification"] = stratification(labels, code, ratios, names)
    if mode == "drop":
        report["dropped_duplicates"] = int((code == DUPLICATE).sum())
    return report


def _top_pairs(conflicts: np.ndarray, names: list[str]) -> list[dict]:
    """The most frequent label pairs among conflicting groups: [{labels, groups, rows}] (rows of those two
    labels in those groups)."""
    if not len(conflicts):
        return []
    group, label, rows = conflicts.T
    pairs, pair_rows = [], []
    for d in range(1, int(np.bincount(group).max())):  # pair each label with the d-th next one of its group
        same = group[d:] == group[:-d]
        pairs.append(label[:-d][same] * len(names) + label[d:][same])
        pair_rows.append(rows[:-d][same] + rows[d:][same])
    keys, inverse, counts = np.unique(np.concatenate(pairs), return_inverse=True, return_counts=True)
    total_rows = np.bincount(inverse, weights=np.concatenate(pair_rows)).astype(np.int64)
    top = sorted(range(len(keys)), key=lambda i: (-counts[i], -total_rows[i], keys[i]))[:TOP_PAIRS]
    return [{"labels": [names[keys[i] // len(names)], names[keys[i] % len(names)]], "groups": int(counts[i]),
             "rows": int(total_rows[i])} for i in top]


def _ceiling(hashes: np.ndarray, labels: np.ndarray) -> float | None:
    """Best accuracy any function of the vector can reach on these rows: majority label of each vector."""
    if not len(hashes):
        return None
    return round(float(group_rows(hashes, labels).majority_count.sum(dtype=np.int64)) / len(hashes), 6)


def _overlap(split_hashes: np.ndarray, train_unique: np.ndarray) -> dict:
    """Rows of a split whose vector is also in train."""
    pos = np.searchsorted(train_unique, split_hashes).clip(max=max(0, len(train_unique) - 1))
    seen = int((train_unique[pos] == split_hashes).sum()) if len(train_unique) else 0
    return {"rows_in_train": seen, "fraction": round(seen / max(1, len(split_hashes)), 6)}


def stratification(labels: np.ndarray, code: np.ndarray, ratios, names: list[str]) -> dict:
    """How far the written classes' split shares are from the ratios: the max over present classes and splits
    of |rows of the class in the split / rows of the class written - ratio|, and where it is."""
    written = code >= 0
    counts = np.bincount(labels[written].astype(np.int64) * 3 + code[written], minlength=3 * len(names))
    counts = counts.reshape(len(names), 3)
    present = np.flatnonzero(counts.sum(axis=1))
    if not len(present):
        return {"max_share_deviation": 0.0}
    dev = np.abs(counts[present] / counts[present].sum(axis=1, keepdims=True) - np.asarray(ratios))
    c, s = np.unravel_index(int(np.argmax(dev)), dev.shape)
    return {"max_share_deviation": round(float(dev.max()), 6),
            "worst": {"class": names[present[c]], "split": ("train", "val", "test")[s]}}


def report_lines(report: dict) -> list[str]:
    """The summary lines prepare prints."""
    r = report
    lines = [f"dedup {r['mode']}: {r['duplicate_rows']:,} of {r['rows']:,} rows share their feature vector with "
             f"another row ({r['duplicate_groups']:,} vectors); {r['conflicting_groups']:,} vectors "
             f"({r['conflicting_rows']:,} rows) carry conflicting labels; accuracy ceiling "
             f"{r['accuracy_ceiling']['all']:.4f} (all rows), {r['accuracy_ceiling']['test'] or 0:.4f} (test)"]
    ov = r["overlap"]
    lines.append(f"overlap with train: test {ov['test']['rows_in_train']:,} rows ({ov['test']['fraction']:.1%}), "
                 f"val {ov['val']['rows_in_train']:,} rows ({ov['val']['fraction']:.1%}); class shares within "
                 f"{r['stratification']['max_share_deviation']:.3f} of the split ratios")
    if r["mode"] == "none":
        lines.append("note: --dedup none: the splits may share feature vectors (test rows seen in training); "
                     "--dedup group keeps equal vectors in one split")
    elif r["mode"] == "drop" and (ov["test"]["rows_in_train"] or ov["val"]["rows_in_train"]):
        lines.append("note: --dedup drop keeps one row per (vector, label): vectors with conflicting labels can "
                     "still be in two splits; --dedup group avoids this")
    return lines
