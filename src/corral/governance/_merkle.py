"""RFC 6962 Merkle trees (Certificate Transparency's, restated in RFC 9162 §2.1): hashes,
inclusion and consistency proofs, their verification, and a compact range for appends.

A leaf hashes as SHA-256(0x00 || data) and a node as SHA-256(0x01 || left || right), so a leaf
can never pass for a node. The tree of n leaves splits at the largest power of two below n.

Proofs are computed from a ``subtrees`` function, the hash of the perfect subtree of 2**level
leaves that starts at leaf ``index * 2**level``: a list of leaf hashes in memory (`from_leaves`)
or a store that keeps some levels of the tree. Every range a proof needs starts where a
subtree that large would, so it is a few perfect subtrees, folded from the right.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
"""The root of the tree of no leaves."""

Subtrees = Callable[[int, int], bytes]
"""``subtrees(level, index)``: the root of the perfect subtree of ``2**level`` leaves starting
at leaf ``index * 2**level``."""


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def perfect_root(hashes: Sequence[bytes]) -> bytes:
    """The root over ``hashes``, a power of two of them."""
    level = list(hashes)
    while len(level) > 1:
        level = [node_hash(level[i], level[i + 1]) for i in range(0, len(level), 2)]
    return level[0]


def root(leaf_hashes: Iterable[bytes]) -> bytes:
    """MTH over the leaves with these hashes."""
    tree = CompactRange()
    for h in leaf_hashes:
        tree.append(h)
    return tree.root()


def from_leaves(leaf_hashes: Sequence[bytes]) -> Subtrees:
    """`Subtrees` over leaf hashes in memory."""

    def subtrees(level: int, index: int) -> bytes:
        start = index << level
        return perfect_root(leaf_hashes[start:start + (1 << level)])

    return subtrees


def _split(n: int) -> int:
    """The largest power of two below ``n`` (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


def range_root(start: int, end: int, subtrees: Subtrees) -> bytes:
    """MTH over leaves ``start`` .. ``end - 1``; ``start`` is a multiple of a power of two at
    least ``end - start``, as every range of a proof is."""
    parts: list[bytes] = []
    size = end - start
    at = start
    for level in range(size.bit_length() - 1, -1, -1):
        if size >> level & 1:
            parts.append(subtrees(level, at >> level))
            at += 1 << level
    result = parts.pop()
    while parts:
        result = node_hash(parts.pop(), result)
    return result


def inclusion_proof(index: int, size: int, subtrees: Subtrees) -> list[bytes]:
    """PATH(index, D[0:size]) of RFC 6962 §2.1.1: the audit path, nearest the leaf first."""
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is not in a tree of {size}")
    path: list[bytes] = []
    start, end = 0, size
    while end - start > 1:  # descend, collecting the sibling ranges root first
        k = _split(end - start)
        if index - start < k:
            path.append(range_root(start + k, end, subtrees))
            end = start + k
        else:
            path.append(range_root(start, start + k, subtrees))
            start += k
    path.reverse()
    return path


def consistency_proof(old_size: int, new_size: int, subtrees: Subtrees) -> list[bytes]:
    """PROOF(old_size, D[0:new_size]) of RFC 6962 §2.1.2 (empty when a size is 0 or both are
    equal)."""
    if not 0 <= old_size <= new_size:
        raise ValueError(f"no consistency proof from a tree of {old_size} to one of {new_size}")
    if old_size in (0, new_size):
        return []
    path: list[bytes] = []
    m, start, end, complete = old_size, 0, new_size, True
    while m != end:  # SUBPROOF(m, D[start:end], complete), collected root first
        k = _split(end - start)
        if m - start <= k:
            path.append(range_root(start + k, end, subtrees))
            end = start + k
        else:
            path.append(range_root(start, start + k, subtrees))
            start += k
            complete = False
    if not complete:
        path.append(range_root(start, end, subtrees))
    path.reverse()
    return path


def verify_inclusion(leaf: bytes, index: int, size: int, path: Sequence[bytes],
                     expected_root: bytes) -> bool:
    """Whether ``path`` proves the leaf hash ``leaf`` is leaf ``index`` of the tree of ``size``
    whose root is ``expected_root`` (RFC 9162 §2.1.3.2)."""
    if not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == expected_root


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes,
                       path: Sequence[bytes]) -> bool:
    """Whether ``path`` proves the tree of ``old_size`` with ``old_root`` is a prefix of the
    tree of ``new_size`` with ``new_root`` (RFC 9162 §2.1.4.2)."""
    if not 0 <= old_size <= new_size:
        return False
    if old_size == new_size:
        return not path and old_root == new_root
    if old_size == 0:
        return not path
    if not path:
        return False
    proof = list(path)
    if old_size & (old_size - 1) == 0:
        proof.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = proof[0]
    for c in proof[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root


class CompactRange:
    """The roots of the perfect subtrees that make up a tree of ``size`` leaves, largest
    first (one per set bit of ``size``): enough to append in O(log n) and to give the root
    without the leaves."""

    __slots__ = ("hashes", "size")

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = ()) -> None:
        if len(hashes) != size.bit_count():
            raise ValueError(f"a tree of {size} leaves has {size.bit_count()} perfect "
                             f"subtrees, not {len(hashes)}")
        self.size = size
        self.hashes = list(hashes)

    def append(self, leaf: bytes) -> list[tuple[int, int, bytes]]:
        """Add a leaf hash; return the subtrees it completes as (level, index, root)."""
        done: list[tuple[int, int, bytes]] = []
        position, h, level = self.size, leaf, 0
        hashes = self.hashes
        while position >> level & 1:
            h = hashlib.sha256(b"\x01" + hashes.pop() + h).digest()
            level += 1
            done.append((level, position >> level, h))
        hashes.append(h)
        self.size = position + 1
        return done

    def root(self) -> bytes:
        if not self.hashes:
            return EMPTY_ROOT
        r = self.hashes[-1]
        for h in reversed(self.hashes[:-1]):
            r = node_hash(h, r)
        return r

    def copy(self) -> CompactRange:
        return CompactRange(self.size, self.hashes)

    def to_bytes(self) -> bytes:
        return b"".join(self.hashes)

    @classmethod
    def from_bytes(cls, size: int, data: bytes) -> CompactRange:
        return cls(size, [data[i:i + HASH_SIZE] for i in range(0, len(data), HASH_SIZE)])
