"""Label partitions: which student owns which classes (MSD sec. 3.1, partition ablation in Table 5).

The condition set {0, ..., C-1} is split into K disjoint subsets of (near-)equal size; student k is
trained only on the labels of subset k, and at inference a label is routed to its student by a
table lookup, so one-step sampling still costs one network evaluation.

    contiguous  consecutive class indices (the paper's default and best: 2.37 FID on ImageNet-64)
    random      a seeded random permutation cut into K pieces (2.45)
    kmeans      k-means on per-class embeddings (e.g. the teacher's label embedding) with an
                equal-size assignment (2.39); works for any per-condition embedding

A partition is plain data, a list of K lists of class indices, saved in every checkpoint.
Run: python -c "import partition; print(partition.make_partition('contiguous', 10, 4))"
"""
import collections
import json
import operator

import torch

STRATEGIES = ('contiguous', 'random', 'kmeans')


def group_sizes(num_classes, k):
    """K sizes that differ by at most one and sum to num_classes (larger groups first)."""
    return [num_classes // k + (1 if i < num_classes % k else 0) for i in range(k)]


def validate(groups, num_classes):
    """Every class exactly once, no empty student, 1 <= K <= num_classes. Raises ValueError.
    Linear in the number of labels listed, which must not exceed twice the number of classes."""
    if not isinstance(groups, (list, tuple)) or not all(isinstance(g, (list, tuple)) for g in groups):
        raise ValueError('a partition must be a list of lists of class indices')
    k = len(groups)
    if not 1 <= k <= num_classes:
        raise ValueError(f'number of students must be between 1 and the number of classes ({num_classes}), got {k}')
    if any(len(g) == 0 for g in groups):
        raise ValueError('partition has an empty student')
    if sum(map(len, groups)) > 2 * num_classes:
        raise ValueError(f'partition lists {sum(map(len, groups))} labels for {num_classes} classes')
    try:
        flat = [operator.index(c) for g in groups for c in g]
    except TypeError:
        raise ValueError('a partition must be a list of lists of class indices') from None
    counts = collections.Counter(flat)
    missing = [c for c in range(num_classes) if c not in counts]
    extra = sorted(c for c in counts if not 0 <= c < num_classes)
    repeated = sorted(c for c, n in counts.items() if n > 1)
    if missing or extra or repeated:
        raise ValueError(f'partition must hold every class 0..{num_classes - 1} exactly once '
                         f'(missing {_few(missing)}, out of range {_few(extra)}, repeated {_few(repeated)})')
    return [[int(c) for c in g] for g in groups]


def _few(xs, n=10):
    """Class indices for a message: the first n, absurdly long numbers (from a file) cut."""
    shown = ', '.join(str(x) if abs(x) < 10 ** 9 else '(huge)' for x in xs[:n])
    return f'[{shown}{", ..." if len(xs) > n else ""}]'


def contiguous(num_classes, k):
    groups, start = [], 0
    for size in group_sizes(num_classes, k):
        groups.append(list(range(start, start + size)))
        start += size
    return groups


def random_partition(num_classes, k, seed=0):
    perm = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed)).tolist()
    groups, start = [], 0
    for size in group_sizes(num_classes, k):
        groups.append(sorted(perm[start:start + size]))
        start += size
    return groups


def balanced_assign(dist, sizes):
    """Assign each row (class) of dist [C, K] to a column (cluster) so that cluster j gets exactly
    sizes[j] rows, greedily by increasing distance: a cheap stand-in for the optimal transport
    assignment that keeps every student the same size."""
    order = torch.argsort(dist.flatten(), stable=True).tolist()
    k = dist.shape[1]
    assign, room = [-1] * dist.shape[0], list(sizes)
    for flat in order:
        c, j = divmod(flat, k)
        if assign[c] < 0 and room[j] > 0:
            assign[c], room[j] = j, room[j] - 1
    return assign


def kmeans_partition(embeddings, k, seed=0, iters=50):
    """Equal-size k-means on class embeddings [C, E]: Lloyd iterations whose assignment step is the
    size-constrained `balanced_assign`; clusters are then ordered by their smallest class index."""
    emb = torch.as_tensor(embeddings, dtype=torch.float64)
    C = emb.shape[0]
    sizes = group_sizes(C, k)
    g = torch.Generator().manual_seed(seed)
    centers = emb[torch.randperm(C, generator=g)[:k]].clone()
    assign = None
    for _ in range(iters):
        new = balanced_assign(torch.cdist(emb, centers), sizes)
        if new == assign:
            break
        assign = new
        for j in range(k):
            centers[j] = emb[[c for c in range(C) if assign[c] == j]].mean(0)
    groups = [[c for c in range(C) if assign[c] == j] for j in range(k)]
    return sorted(groups, key=min)


def make_partition(strategy, num_classes, k, seed=0, embeddings=None):
    """Build and validate a partition. kmeans needs `embeddings` [num_classes, E]."""
    if strategy not in STRATEGIES:
        raise ValueError(f'unknown partition {strategy!r}: choose one of {", ".join(STRATEGIES)}')
    if not 1 <= k <= num_classes:
        raise ValueError(f'number of students must be between 1 and the number of classes ({num_classes}), got {k}')
    if strategy == 'contiguous':
        groups = contiguous(num_classes, k)
    elif strategy == 'random':
        groups = random_partition(num_classes, k, seed)
    else:
        if embeddings is None:
            raise ValueError('kmeans partition needs class embeddings (a teacher)')
        groups = kmeans_partition(embeddings, k, seed)
    return validate(groups, num_classes)


def read_partition(path, num_classes, k):
    """A partition from a JSON file (K lists of class indices, e.g. [[0, 1], [2, 3]]), checked like any other."""
    with open(path) as f:
        try:
            groups = validate(json.load(f), num_classes)
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f'{path}: not a JSON list of lists of class indices ({e})') from None
    if len(groups) != k:
        raise ValueError(f'{path} has {len(groups)} groups but --students is {k}')
    return groups


def class_groups(strategy, num_classes, k, seed=0, teacher=None, path=''):
    """A run's partition: the JSON file at `path`, else `strategy` (kmeans: on the teacher's label embedding)."""
    if path:
        return read_partition(path, num_classes, k)
    emb = teacher.model.map_label.weight.t().detach().cpu() if strategy == 'kmeans' and teacher is not None else None
    return make_partition(strategy, num_classes, k, seed, emb)


def routing_table(groups, num_classes):
    """student_of[c] = index of the student that owns class c (a LongTensor, the inference lookup)."""
    table = torch.full((num_classes,), -1, dtype=torch.long)
    for k, g in enumerate(groups):
        table[torch.as_tensor(g, dtype=torch.long)] = k
    return table


def lookup(table, labels):
    """Student index of each label through a routing table; labels outside the classes are refused."""
    labels = torch.as_tensor(labels, dtype=torch.long, device=table.device)
    if labels.numel():
        lo, hi = torch.stack([labels.min(), labels.max()]).tolist()          # one host sync
        if lo < 0 or hi >= len(table):
            raise ValueError(f'labels must lie in 0..{len(table) - 1}, got {lo}..{hi}')
    return table[labels]


def route(labels, groups, num_classes):
    """label -> student index, for a tensor of integer labels."""
    return lookup(routing_table(groups, num_classes), labels)
