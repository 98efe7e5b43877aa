"""Who owns which block of a paged KV pool: the block allocator (host state only, no K or V).

A paged pool (``kvlab.ref.paging``) cuts every layer's cache into ``num_blocks`` blocks of
``block_size`` token slots. This module decides which sequence may use which block. It never
touches K or V: it hands out block ids, and tells the caller when bytes must move (a
copy-on-write pair for ``copy_blocks``). The same allocator serves every backend.

Every block is in exactly one of three states::

    free     ref 0, no prefix-cache entry      empty; handed out first
    cached   ref 0, has a prefix-cache entry   nobody owns it, but its K/V may be hit again;
                                               evicted (least recently used first) when the free
                                               list runs dry
    used     ref >= 1                          owned by ``ref`` block tables

so ``num_free + num_cached + num_used == num_blocks`` always.

**Sharing.** A block's reference count is the number of block tables that list it. :meth:`fork`
shares blocks (parallel sampling, beam search, a common prefix); :meth:`free` drops one reference
per listed block. A shared block is read-only: before writing into it, a sequence calls
:meth:`ensure_writable`, which swaps in a private copy (copy-on-write).

**Prefix caching** (vLLM's "automatic prefix caching"). A *full* block's K/V depend only on the
tokens up to its end, so two prompts that start alike can share those blocks. Each full block is
keyed by a hash chained through its predecessors::

    hash_0 = hash_fn(None,   tokens[0:B])
    hash_i = hash_fn(hash_{i-1}, tokens[i*B:(i+1)*B])

A hash is a shortcut, not a proof: two different prefixes can hash alike. So every cached block
also keeps a :class:`BlockKey` (its token ids and its parent's key), and a hit is accepted only
when the stored tokens of the whole prefix equal the requested ones. A collision costs a miss,
never wrong K/V. ``hash_fn`` is a constructor argument so tests can force collisions.

Errors: arguments that can never be right (a block id out of range, freeing a block nobody owns)
raise ``ValueError``; a valid request the pool cannot serve *right now* raises
:class:`OutOfBlocksError`, a ``RuntimeError``, which a scheduler catches to wait or preempt.
Either way the allocator is left exactly as it was.
"""
from __future__ import annotations

from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from numbers import Integral
from typing import Callable, Hashable, Iterable, Sequence

from kvlab.checks import non_negative_int, positive_int

HashFn = Callable[["Hashable | None", "tuple[int, ...]"], Hashable]


class OutOfBlocksError(RuntimeError):
    """The pool has fewer free (or evictable) blocks than a request needs.

    A ``RuntimeError``, not a ``ValueError``: the request was valid and may succeed later, once
    other sequences release blocks; a scheduler catches this to wait or preempt. The allocator is
    unchanged when it is raised. ``needed`` and ``available`` say by how much the pool fell short.
    """

    def __init__(self, needed: int, available: int, what: str = "blocks"):
        self.needed, self.available = needed, available
        super().__init__(f"out of KV blocks: {what} needs {needed} block(s) but only {available} "
                         f"are free or evictable")


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks that hold ``num_tokens`` tokens: ``ceil(num_tokens / block_size)``."""
    return -(-num_tokens // block_size)


def default_block_hash(parent_hash: Hashable | None, token_ids: tuple[int, ...]) -> int:
    """Python's tuple hash of ``(parent_hash, token_ids)``: fast, and deterministic for ints.

    Not collision-resistant, and it need not be: every hit is verified against stored token ids.
    (vLLM, which does not verify, uses SHA-256 so that collisions are astronomically unlikely.)
    The first block's missing parent is spelled 0, not None: before Python 3.12 ``hash(None)``
    depends on None's address, so hashes would change from run to run.
    """
    return hash((0 if parent_hash is None else parent_hash, token_ids))


@dataclass(frozen=True, eq=False)
class BlockKey:
    """What a full block holds: ``token_ids``, following the prefix that ``parent`` stands for.

    ``parent`` is None for a sequence's first block, so following ``parent`` links spells out the
    whole prefix: this is what a hit is verified against. ``hash`` is the chained hash used to find
    the block. Keys are immutable and compared by content with :meth:`same_prefix`.
    """

    hash: Hashable
    token_ids: tuple[int, ...]
    parent: BlockKey | None = field(repr=False)

    def same_prefix(self, other: BlockKey | None) -> bool:
        """True when ``self`` and ``other`` stand for exactly the same tokens from position 0.

        Walks both parent chains together; identical key objects end the walk early, so the usual
        case (a child whose parent is the very key we just matched) costs one comparison.
        """
        a, b = self, other
        while a is not b:
            if a is None or b is None or a.hash != b.hash or a.token_ids != b.token_ids:
                return False
            a, b = a.parent, b.parent
        return True


@dataclass(frozen=True)
class Growth:
    """The result of :meth:`BlockAllocator.grow`: how a sequence's blocks changed.

    blocks: the sequence's new block list (replace the old one with it).
    copies: ``(src, dst)`` pairs the caller must copy with ``copy_blocks`` *before* writing:
        dst is a fresh private block that replaces the shared src.
    new_blocks: blocks appended at the end of ``blocks``.
    """

    blocks: list[int]
    copies: list[tuple[int, int]]
    new_blocks: list[int]


@dataclass(frozen=True)
class AllocatorSnapshot:
    """Everything a :class:`BlockAllocator` holds, as plain values: compare two to see a change."""

    refs: tuple[int, ...]
    free: tuple[int, ...]
    cached_lru: tuple[int, ...]
    hash_to_block: tuple[tuple[Hashable, int], ...]


class BlockAllocator:
    """Free list, reference counts, copy-on-write and prefix cache for ``num_blocks`` blocks.

    num_blocks: blocks in the pool (ids ``0 .. num_blocks-1``).
    block_size: token slots per block; prefix caching keys blocks of exactly this many tokens.
    hash_fn: ``hash_fn(parent_hash, token_ids) -> hashable``; see :func:`default_block_hash`.
    """

    def __init__(self, num_blocks: int, block_size: int = 16, hash_fn: HashFn | None = None):
        self.num_blocks = positive_int("num_blocks", num_blocks)
        self.block_size = positive_int("block_size", block_size)
        self.hash_fn: HashFn = hash_fn or default_block_hash
        self._refs = [0] * num_blocks
        # Free blocks are handed out first-in first-out, so ids come out 0, 1, 2, ... on a fresh
        # pool (easy to draw) and a freed block waits as long as possible before reuse.
        self._free: deque[int] = deque(range(num_blocks))
        # Cached blocks (ref 0, K/V kept for a future hit), least recently released first.
        self._cached_lru: OrderedDict[int, None] = OrderedDict()
        # The prefix cache: each registered block <-> its key. A block has at most one key, and a
        # hash names at most one block (the first one registered wins).
        self._key_of_block: dict[int, BlockKey] = {}
        self._block_of_hash: dict[Hashable, int] = {}

    # --- counts ----------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Empty blocks (ref 0, nothing cached in them)."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks nobody owns whose K/V stay in the prefix cache (evictable, LRU)."""
        return len(self._cached_lru)

    @property
    def num_used(self) -> int:
        """Blocks owned by at least one block table (ref >= 1)."""
        return self.num_blocks - self.num_free - self.num_cached

    @property
    def num_available(self) -> int:
        """Blocks an allocation may take: free ones first, then cached ones by eviction."""
        return self.num_free + self.num_cached

    @property
    def num_registered(self) -> int:
        """Blocks reachable through the prefix cache (used or cached)."""
        return len(self._key_of_block)

    def ref_count(self, block: int) -> int:
        """How many block tables list ``block``."""
        return self._refs[self._check_block(block)]

    def key_of(self, block: int) -> BlockKey | None:
        """The prefix-cache key of ``block``, or None when it is not registered."""
        return self._key_of_block.get(self._check_block(block))

    def is_free(self, block: int) -> bool:
        """True for an empty block (on the free list)."""
        return self.ref_count(block) == 0 and block not in self._key_of_block

    # --- allocate, share, free ---------------------------------------------------------------

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks, each with ref 1: all of them, or none (:class:`OutOfBlocksError`).

        Empty blocks are used first; then cached blocks are evicted, least recently released
        first. Eviction removes the block's prefix-cache entry, so no stale hash can reach it.
        """
        n = non_negative_int("n", n)
        if n > self.num_available:
            raise OutOfBlocksError(n, self.num_available, what=f"allocate({n})")
        blocks = []
        for _ in range(n):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._cached_lru.popitem(last=False)
                self._forget(block)
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def fork(self, blocks: Iterable[int]) -> list[int]:
        """Share ``blocks`` with one more owner (ref += 1 each); return them as a new list.

        Used when a sequence is forked (parallel sampling, beam search): the child's table lists
        the parent's blocks, and copy-on-write separates them on the first write.
        """
        blocks = [self._check_block(b) for b in blocks]
        for block in set(blocks):
            if self._refs[block] == 0:
                raise ValueError(f"cannot fork block {block}: it is not allocated (ref 0)")
        for block in blocks:
            self._refs[block] += 1
        return blocks

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one reference per listed block; a block whose ref reaches 0 leaves the used set.

        It joins the free list, or, when it holds a prefix-cache entry, the cached LRU (at its
        most recently used end, in the order given). Pass a sequence's blocks *last block first*:
        then its tail is evicted before its head, which more prompts are likely to share.

        Raises ValueError, changing nothing, when a block would be freed more times than it is
        referenced (e.g. freed twice).
        """
        blocks = [self._check_block(b) for b in blocks]
        for block, count in Counter(blocks).items():
            if count > self._refs[block]:
                raise ValueError(f"cannot free block {block} {count} time(s): its ref count is "
                                 f"{self._refs[block]} (freed twice, or never allocated?)")
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._key_of_block:
                    self._cached_lru[block] = None
                else:
                    self._free.append(block)

    def ensure_writable(self, block: int) -> tuple[int, int | None]:
        """Make ``block`` safe to write into; return ``(block_to_write, copy_from)``.

        ref 1: the caller is its only owner; returns ``(block, None)``. If the block was in the
            prefix cache its entry is dropped, since its contents are about to change.
        ref > 1 (shared): allocates a private block, drops the caller's reference to the shared
            one, and returns ``(private, block)``: the caller must ``copy_blocks(src=[block],
            dst=[private])`` before writing, and list ``private`` instead of ``block``.

        Raises OutOfBlocksError (changing nothing) when a private copy is needed and none is left.
        """
        block = self._check_block(block)
        if self._refs[block] == 0:
            raise ValueError(f"cannot write block {block}: it is not allocated (ref 0)")
        if self._refs[block] == 1:
            self._forget(block)
            return block, None
        (private,) = self.allocate(1)  # raises before anything changed
        self._refs[block] -= 1  # still >= 1: the other owners keep it
        return private, block

    def grow(self, blocks: Sequence[int], num_tokens: int, num_new_tokens: int) -> Growth:
        """Make a sequence's ``blocks`` ready for ``num_new_tokens`` more tokens. All or nothing.

        blocks: the sequence's block list, holding ``num_tokens`` tokens (it may list more blocks
            than those tokens need; the extra ones are written into first).
        Every listed block the new tokens land in is made writable (copy-on-write when shared), and
        fresh blocks are appended as positions cross block boundaries.

        Raises OutOfBlocksError, changing nothing, when the pool cannot supply every block needed.
        """
        num_tokens = non_negative_int("num_tokens", num_tokens)
        num_new_tokens = non_negative_int("num_new_tokens", num_new_tokens)
        blocks = [self._check_block(b) for b in blocks]
        # Checked before anything changes: a block the caller does not own, or lists twice, would
        # otherwise surface half-way through the copy-on-writes below.
        if len(set(blocks)) != len(blocks):
            raise ValueError(f"blocks lists a block more than once: {blocks}")
        not_owned = [b for b in blocks if self._refs[b] == 0]
        if not_owned:
            raise ValueError(f"blocks {not_owned} are not allocated (ref 0): a sequence can only "
                             f"grow into blocks it owns")
        if len(blocks) < blocks_needed(num_tokens, self.block_size):
            raise ValueError(f"{len(blocks)} block(s) cannot hold {num_tokens} tokens of "
                             f"{self.block_size} per block")
        if num_new_tokens == 0:
            return Growth(blocks, [], [])
        first = num_tokens // self.block_size  # the first block a new token lands in
        last = blocks_needed(num_tokens + num_new_tokens, self.block_size)  # one past the last
        written = range(first, min(last, len(blocks)))
        shared = [i for i in written if self._refs[blocks[i]] > 1]
        missing = max(0, last - len(blocks))
        if len(shared) + missing > self.num_available:
            raise OutOfBlocksError(len(shared) + missing, self.num_available,
                                   what=f"appending {num_new_tokens} token(s)")
        copies = []
        for i in written:  # cannot fail now: enough blocks were checked above
            blocks[i], copy_from = self.ensure_writable(blocks[i])
            if copy_from is not None:
                copies.append((copy_from, blocks[i]))
        new_blocks = self.allocate(missing)
        return Growth(blocks + new_blocks, copies, new_blocks)

    def undo_grow(self, growth: Growth) -> None:
        """Give back what a :meth:`grow` took, when the caller then failed to write the bytes.

        Fresh blocks are freed and each shared block gets back the reference its private copy
        took, so every ref count is as before. Not restored: the free list's order, and cache
        entries the grow evicted or dropped (lost hits, never wrong data). Callers check their
        arguments before growing, so this runs only if a backend fails unexpectedly.
        """
        for src, dst in growth.copies:
            self._refs[src] += 1
        self.free([dst for _, dst in growth.copies] + growth.new_blocks)

    # --- prefix cache --------------------------------------------------------------------------

    def lookup_prefix(self, token_ids: Sequence[int]) -> list[int]:
        """The longest run of cached full blocks that starts ``token_ids``; takes a ref on each.

        Only whole blocks count: ``len(token_ids) // block_size`` at most. A hit requires the
        chained hash to name a block *and* that block's key to hold exactly these tokens after
        exactly this prefix, so a hash collision is a miss. A hit on a cached (ref 0) block takes
        it off the eviction list. The caller owns the returned blocks and frees them as usual.
        """
        tokens = _token_tuple(token_ids)
        hits: list[int] = []
        parent: BlockKey | None = None
        for start in range(0, len(tokens) - self.block_size + 1, self.block_size):
            chunk = tokens[start:start + self.block_size]
            block = self._block_of_hash.get(self.hash_fn(parent.hash if parent else None, chunk))
            if block is None:
                break
            key = self._key_of_block[block]
            if key.token_ids != chunk or not _same_prefix(key.parent, parent):
                break  # a hash collision: same hash, different tokens
            hits.append(block)
            parent = key
        for block in hits:
            if self._refs[block] == 0:
                del self._cached_lru[block]
            self._refs[block] += 1
        return hits

    def register_full_block(self, block: int, token_ids: Sequence[int],
                            parent: BlockKey | None = None) -> BlockKey:
        """Record that ``block`` now holds ``token_ids`` (a full block) after the prefix ``parent``.

        parent: the key of the sequence's previous block (None for its first block): the value
            this method returned for it, or :meth:`key_of` a prefix hit. Taking the parent's *key*
            rather than its bare hash is what lets hits be verified token by token.

        Returns the key standing for this block's contents; keep it as the next block's parent.
        Whether the block becomes reachable depends on the hash's slot:

        - empty: the block is registered under ``hash_fn(parent.hash, token_ids)``;
        - holding a block with the same prefix (the same prompt registered earlier): this block
          is *not* registered too (no hash names two blocks); the existing key is returned;
        - holding a different prefix (a hash collision): the first block keeps the slot; this
          block stays unregistered and gets a key of its own.
        """
        block = self._check_block(block)
        tokens = _token_tuple(token_ids)
        if self._refs[block] == 0:
            raise ValueError(f"cannot register block {block}: it is not allocated (ref 0)")
        if len(tokens) != self.block_size:
            raise ValueError(f"a full block holds block_size={self.block_size} token ids, "
                             f"got {len(tokens)}")
        if parent is not None and not isinstance(parent, BlockKey):
            raise TypeError(f"parent must be a BlockKey or None, got {type(parent).__name__}")
        if block in self._key_of_block:
            raise ValueError(f"block {block} is already registered in the prefix cache")
        key = BlockKey(self.hash_fn(parent.hash if parent else None, tokens), tokens, parent)
        holder = self._block_of_hash.get(key.hash)
        if holder is None:
            self._block_of_hash[key.hash] = block
            self._key_of_block[block] = key
            return key
        existing = self._key_of_block[holder]
        return existing if existing.same_prefix(key) else key

    def _forget(self, block: int) -> None:
        """Remove ``block``'s prefix-cache entry, if any (its hash no longer reaches it)."""
        key = self._key_of_block.pop(block, None)
        if key is not None:
            del self._block_of_hash[key.hash]

    # --- introspection -----------------------------------------------------------------------

    def snapshot(self) -> AllocatorSnapshot:
        """The whole state as plain values; two snapshots are equal iff nothing changed."""
        return AllocatorSnapshot(
            refs=tuple(self._refs),
            free=tuple(self._free),
            cached_lru=tuple(self._cached_lru),
            hash_to_block=tuple(sorted(self._block_of_hash.items(), key=lambda kv: kv[1])),
        )

    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent. O(num_blocks).

        Checks: refs >= 0; every block is exactly one of free / cached / used; free blocks hold no
        cache entry and cached ones do; the hash map and the blocks' keys mirror each other (a
        block is reachable by at most one hash, a hash reaches at most one block).
        """
        def require(ok: bool, why: str) -> None:
            if not ok:
                raise AssertionError(f"BlockAllocator invariant broken: {why}")

        require(len(self._refs) == self.num_blocks, "one ref count per block")
        require(all(r >= 0 for r in self._refs), f"negative ref count in {self._refs}")
        free = set(self._free)
        cached = set(self._cached_lru)
        used = {b for b, r in enumerate(self._refs) if r > 0}
        require(len(free) == len(self._free), f"a block is on the free list twice: {self._free}")
        require(not free & cached, f"blocks both free and cached: {sorted(free & cached)}")
        require(not (free | cached) & used,
                f"blocks with ref > 0 on the free/cached lists: {sorted((free | cached) & used)}")
        require(len(free) + len(cached) + len(used) == self.num_blocks,
                f"free {len(free)} + cached {len(cached)} + used {len(used)} != {self.num_blocks}")
        require(not free & set(self._key_of_block),
                f"free blocks still in the prefix cache: {sorted(free & set(self._key_of_block))}")
        require(cached <= set(self._key_of_block), "a cached block has no prefix-cache entry")
        require(len(self._block_of_hash) == len(self._key_of_block),
                "hash map and block keys differ in size")
        for block, key in self._key_of_block.items():
            require(self._block_of_hash.get(key.hash) == block,
                    f"block {block}'s hash does not lead back to it")
            require(len(key.token_ids) == self.block_size, f"block {block}'s key is not full")

    def __repr__(self) -> str:
        return (f"BlockAllocator(num_blocks={self.num_blocks}, block_size={self.block_size}: "
                f"{self.num_used} used, {self.num_cached} cached, {self.num_free} free)")

    def _check_block(self, block: int) -> int:
        if isinstance(block, bool) or not isinstance(block, Integral):
            raise TypeError(f"a block id must be an int, got {type(block).__name__}")
        if not 0 <= block < self.num_blocks:
            raise ValueError(f"block id {block} is out of range [0, {self.num_blocks})")
        return int(block)


def _same_prefix(a: BlockKey | None, b: BlockKey | None) -> bool:
    return b is None if a is None else a.same_prefix(b)


def _token_tuple(token_ids: Sequence[int]) -> tuple[int, ...]:
    if any(isinstance(t, bool) or not isinstance(t, Integral) for t in token_ids):
        raise TypeError(f"token ids must be ints, got {list(token_ids)[:8]}")
    return tuple(int(t) for t in token_ids)


