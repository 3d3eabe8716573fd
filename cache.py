"""
The paged KV cache: one preallocated pool tensor and the block manager that hands out its slots.

A sequence's tokens live in fixed-size blocks of P slots scattered anywhere in the pool; its
block table lists them in order, so token i of the sequence is at
    slot = block_table[i // P] * P + i % P
and the pool never fragments: any free block serves any sequence.

Sharing. Every full block is hashed in a chain, hash(parent block's hash, the block's P token
ids), so equal hashes mean equal prefixes (and a hit re-checks the token ids, in case two
chains collide). A new sequence maps every leading full block already in the pool instead of
recomputing it. Blocks carry reference counts: a block held by several sequences (a shared
prefix, or n samples forked from one prompt) is copied before anyone writes into it
(copy-on-write). A block nobody references keeps its contents and hash, and stays reusable
until the allocator needs it: then the least recently freed such block is evicted.

Layout: (n_layer, 2, K, N, P, D); see KVCache. Memory: every token stores one K and one V
vector per layer and KV head, so
    bytes_per_token = 2 * n_layer * n_kv_head * head_dim * bytes_per_element
and a quantized pool (int8, or fp8 e4m3) adds one fp32 scale per vector:
    bytes_per_token = 2 * n_layer * n_kv_head * (head_dim * 1 + 4).

Prompt caching across processes: full blocks are also written to a directory (DiskTier), named
by a salted SHA-256 chain over their prefix, and a prompt that misses the pool is restored from
there before anything is prefilled.

What this file deliberately is not: a scheduler (it never decides who runs) or a model (the
only tensor work here is the pool itself, block copies and block files). Every operation either
succeeds or raises before changing anything; `check_invariants()` asserts the bookkeeping.

Tests: `pytest test_cache.py`.
"""
import hashlib
import math
import os
import re
import struct
import time
import uuid
import zlib
from collections import OrderedDict, deque
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file


class CacheFull(RuntimeError):
    """The pool has no free block for a requested append. Nothing was changed."""


# the quantized storages of a KV pool (values plus one scale per vector), by name; a pool in
# any other dtype holds the model's K/V as they are
QUANTIZED_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
QUANTIZED = tuple(QUANTIZED_DTYPES.values())
SCALE_DTYPE = torch.float32


def kv_storage_dtype(kv_dtype, dtype, device) -> torch.dtype:
    """The pool's storage: the model's dtype (None, "auto"), or int8 / fp8, quantized."""
    if kv_dtype in (None, "auto") or kv_dtype == dtype:
        return dtype
    if kv_dtype not in QUANTIZED_DTYPES:
        raise ValueError(f"unsupported kv_dtype {kv_dtype!r} (auto, int8 or fp8)")
    device = torch.device(device)
    if kv_dtype == "fp8" and device.type == "cuda" and \
            torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError("kv_dtype fp8 needs a GPU of compute capability 8.9 or newer "
                         "(Ada, Hopper); use int8")
    return QUANTIZED_DTYPES[kv_dtype]


def bytes_per_token(n_layer, n_kv_head, head_dim, dtype) -> int:
    """K and V, every layer, every KV head: 2 * L * K * D * bytes_per_element, plus one scale
    per vector for a quantized dtype."""
    per_vector = head_dim * dtype.itemsize + (SCALE_DTYPE.itemsize if dtype in QUANTIZED else 0)
    return 2 * n_layer * n_kv_head * per_vector


def blocks_for_budget(budget_bytes, block_size, n_layer, n_kv_head, head_dim, dtype) -> int:
    """How many whole blocks fit in a memory budget."""
    return int(budget_bytes // (block_size * bytes_per_token(n_layer, n_kv_head, head_dim, dtype)))


UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
         "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def free_memory(device, meminfo="/proc/meminfo") -> int:
    """Bytes free now: on a GPU what the CUDA driver reports, on a CPU the RAM the kernel says is
    available (MemAvailable: free pages plus the page cache it can drop; free pages alone are
    nearly nil on a machine that has read a few GiB of files), else the free pages."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the kernel writes kB, meaning KiB
    except OSError:
        pass  # not Linux
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


BUDGET_FORMS = ("give bytes with a unit (2GiB, 512MiB, 1.5GB), a whole number of bytes of at "
                "least 1 MiB (1048576), or a fraction of free memory in (0, 1] (0.5)")


SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*")  # a number and a unit of UNITS


def parse_size(size, what="size") -> int:
    """Bytes from a size with a unit ('1GiB', '512 MiB') or a whole number of bytes."""
    m = SIZE.fullmatch(str(size))
    n = int(float(m.group(1)) * UNITS[m.group(2).lower()]) \
        if m and m.group(2).lower() in UNITS else 0
    if n <= 0:
        raise ValueError(f"{what} {size!r}: give bytes with a unit (1GiB, 512MiB) or a whole "
                         f"number of bytes")
    return n


def parse_budget(budget, device="cpu") -> int:
    """A memory budget in bytes from: a size with a unit, '2GiB', '512 MiB', '1.5GB'; a bare
    whole number of at least 1 MiB (bytes: a smaller one is more likely a slip than a budget);
    or a fraction in (0, 1] of the memory free now on the device (a float, or '0.5')."""
    if isinstance(budget, str):
        m = SIZE.fullmatch(budget)
        if not m or m.group(2).lower() not in UNITS:
            raise ValueError(f"KV budget {budget!r}: {BUDGET_FORMS}")
        number, unit = m.group(1), m.group(2).lower()
        if unit:
            budget = int(float(number) * UNITS[unit])
            if budget <= 0:
                raise ValueError(f"KV budget {m.group(0).strip()!r} is empty: {BUDGET_FORMS}")
            return budget
        budget = float(number) if "." in number else int(number)
    if isinstance(budget, float):
        if not 0 < budget <= 1:
            raise ValueError(f"KV budget {budget}: a fraction must be in (0, 1]; {BUDGET_FORMS}")
        return int(budget * free_memory(device))
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise TypeError(f"KV budget {budget!r}: {BUDGET_FORMS}")
    if budget < 1 << 20:
        raise ValueError(f"KV budget {budget}: a number without a unit is bytes only from 1 MiB "
                         f"up; {BUDGET_FORMS}")
    return budget


def chain_hash(parent_hash, tokens) -> int:
    """Hash of a full block: its parent's hash (None for a first block) and its own token ids,
    so it names the whole prefix. Python's hash of a tuple of ints is the same in every process
    (hash(None) is not before Python 3.12, hence the 0)."""
    return hash((0 if parent_hash is None else parent_hash, tuple(tokens)))


# ------------------------------------------------------------------------------------------
# the disk tier: prompt caching that outlives the process
#
# A full block's K/V is a file named by its key, a SHA-256 chain over its whole prefix,
#     key = sha256(salt, parent key, the block's token ids)
# salted with everything that changes what a block holds (the model, dtype, KV storage dtype,
# block size, RoPE settings: see LLM), so that another setup never hits, and the same in every
# process (Python's hash() is salted per process). One safetensors file per block: the block's
# K/V of every layer together (L, 2, K, P, D), its token ids, and in its metadata the salt, the
# key and a CRC-32 of the K/V bytes. Written under a temporary name and renamed, so a reader
# never sees half a file; on read, a file that fails to parse, or whose salt, key, tokens,
# shape or checksum disagree, is removed and counts as a miss. Least recently used files
# (by modification time, touched on every hit) go first when the directory is over budget.

DISK_FORMAT = "1"


def block_key(salt: bytes, parent: bytes | None, tokens) -> bytes:
    """The disk key of a full block: its parent's key (None for a first block) and its tokens."""
    h = hashlib.sha256(salt)
    h.update(parent or bytes(32))
    h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    return h.digest()


def kv_checksum(*tensors) -> str:
    """CRC-32 of the bytes of the given tensors (None skipped), in order: it catches a damaged
    file (a cut, a changed byte), three times faster than SHA-256 here (12 against 34 ms for
    the 46 MB of a 2,000-token prompt); what a block is, the key and salt in its metadata say."""
    crc = 0
    for t in tensors:
        if t is not None:
            crc = zlib.crc32(t.contiguous().view(torch.uint8).numpy(), crc)
    return f"{crc:08x}"


class DiskTier:
    """A directory of K/V blocks under a size budget, shared by any number of processes."""

    STALE_TMP_S = 600  # a temporary file this old belongs to a writer that died

    def __init__(self, path, budget_bytes: int, salt: bytes):
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"prompt cache {path}: cannot create the directory ({e})") from None
        if not os.access(self.path, os.W_OK):
            raise ValueError(f"prompt cache {path}: the directory is not writable")
        self.budget, self.salt = budget_bytes, salt
        self.n_rejected = 0  # files found damaged or foreign, and removed

    def file(self, key: bytes) -> Path:
        return self.path / f"{key.hex()}.safetensors"

    def load(self, key: bytes, tokens, shape, dtype):
        """(kv, scales or None) of the block with this key and tokens, or None."""
        f = self.file(key)
        try:
            with safe_open(f, "pt") as st:
                meta = st.metadata() or {}
                tensors = {name: st.get_tensor(name) for name in st.keys()}
        except FileNotFoundError:
            return None
        except (SafetensorError, OSError, ValueError, RuntimeError):
            return self.reject(f)
        kv, scales, toks = tensors.get("kv"), tensors.get("scales"), tensors.get("tokens")
        ok = (meta.get("format") == DISK_FORMAT and meta.get("salt") == self.salt.hex()
              and meta.get("key") == key.hex() and kv is not None and toks is not None
              and tuple(kv.shape) == tuple(shape) and kv.dtype == dtype
              and toks.tolist() == list(tokens)
              and meta.get("crc32") == kv_checksum(kv, scales))
        if not ok:
            return self.reject(f)
        try:
            os.utime(f)  # most recently used: evicted last
        except OSError:
            pass
        return kv, scales

    def reject(self, f: Path):
        self.n_rejected += 1
        f.unlink(missing_ok=True)
        return None

    def save(self, key: bytes, tokens, kv, scales=None):
        """Write one block, unless a file for its key is there already."""
        f = self.file(key)
        if f.exists():
            return
        tensors = {"kv": kv.contiguous().cpu(), "tokens": torch.tensor(list(tokens))}
        if scales is not None:
            tensors["scales"] = scales.contiguous().cpu()
        meta = {"format": DISK_FORMAT, "salt": self.salt.hex(), "key": key.hex(),
                "crc32": kv_checksum(tensors["kv"], tensors.get("scales"))}
        tmp = self.path / f".{f.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, f)  # atomic: readers see the whole file or none
        finally:
            tmp.unlink(missing_ok=True)

    def enforce_budget(self):
        """Remove least recently used blocks until the directory fits its budget, and the
        temporary files of writers that died."""
        now, files = time.time(), []
        for f in self.path.iterdir():
            try:
                st = f.stat()
            except FileNotFoundError:  # another process removed it meanwhile
                continue
            if f.name.endswith(".tmp") and now - st.st_mtime > self.STALE_TMP_S:
                f.unlink(missing_ok=True)
            elif f.suffix == ".safetensors":
                files.append((st.st_mtime, st.st_size, f))
        total = sum(size for _, size, _ in files)
        for _, size, f in sorted(files):
            if total <= self.budget:
                break
            f.unlink(missing_ok=True)
            total -= size

    def size(self) -> int:
        """Bytes of block files in the directory now."""
        return sum(f.stat().st_size for f in self.path.glob("*.safetensors"))


class HostTier:
    """Blocks the pool evicted, kept in host memory (pinned, for a GPU pool: the copy back is
    asynchronous) under a byte budget, least recently used first out; looked up by the same
    keys as the disk tier, before it. Lives as long as the process."""

    def __init__(self, budget_bytes: int, pin: bool = False):
        self.budget, self.pin, self.bytes = budget_bytes, pin, 0
        self.blocks: OrderedDict[bytes, tuple] = OrderedDict()  # key -> (tokens, kv, scales)

    def put(self, key: bytes, tokens, kv, scales=None):
        if key in self.blocks:
            self.blocks.move_to_end(key)
            return
        kv, scales = (None if t is None else t.to("cpu", copy=True) for t in (kv, scales))
        if self.pin:
            kv, scales = (None if t is None else t.pin_memory() for t in (kv, scales))
        self.blocks[key] = (tuple(tokens), kv, scales)
        self.bytes += self.nbytes(key)
        while self.bytes > self.budget:
            self.bytes -= self.nbytes(next(iter(self.blocks)))
            self.blocks.popitem(last=False)

    def nbytes(self, key) -> int:
        _, kv, scales = self.blocks[key]
        return kv.nbytes + (0 if scales is None else scales.nbytes)

    def load(self, key: bytes, tokens, shape=None, dtype=None):
        """(kv, scales or None) of the block with this key and tokens, or None."""
        entry = self.blocks.get(key)
        if entry is None or entry[0] != tuple(tokens):
            return None
        self.blocks.move_to_end(key)
        return entry[1], entry[2]


# A table entry whose block was released because every key in it left the sliding window of
# every layer (release_before): the table keeps its length, so a token's block is still
# table[pos // P], and attention never reads the entry (the window masks its positions).
RELEASED = -1


class KVCache:
    """The pool `kv` has shape (n_layer, 2, K, N, P, D): kv[layer, 0] is the K cache and
    kv[layer, 1] the V cache of that layer, each (K, N, P, D) and contiguous. Heads outermost:
    gathering a sequence's blocks then yields (K, S, D) per head directly, the layout the
    attention matmuls want, with no transposing copy.

    dtype int8 or fp8 (torch.float8_e4m3fn) quantizes the pool: `scales` (n_layer, 2, K, N, P)
    holds one fp32 scale per stored vector, beside its block, and moves with it (copy-on-write
    copies both). The kernels quantize on store and dequantize on load."""

    # The block hash: a test swaps it for one that collides often, to exercise the token
    # re-check that makes a collision a miss rather than another sequence's K/V.
    chain_hash = staticmethod(chain_hash)

    # A budget given as a fraction of free memory can be far more than one engine can use: the
    # pool is capped at this many full-length contexts (more sequences than that never run at
    # once at full length, and the rest of the memory stays free for activations and others).
    MAX_FULL_CONTEXTS = 64

    @classmethod
    def from_budget(cls, budget, block_size, n_layer, n_kv_head, head_dim, max_seq_len,
                    dtype=torch.float32, device="cpu"):
        """A pool of as many blocks as `budget` (see parse_budget) holds, at least one and at
        most MAX_FULL_CONTEXTS contexts of max_seq_len tokens."""
        budget, free = parse_budget(budget, device), free_memory(device)
        if budget > free:
            raise ValueError(f"a KV budget of {budget / 2**30:.2f} GiB is more than the "
                             f"{free / 2**30:.2f} GiB of memory available on {device}: give at "
                             f"most that, or a fraction of it, like 0.5")
        n_blocks = blocks_for_budget(budget, block_size, n_layer, n_kv_head, head_dim, dtype)
        n_cap = cls.MAX_FULL_CONTEXTS * math.ceil(max_seq_len / block_size)
        return cls(n_layer, n_kv_head, head_dim, max(1, min(n_blocks, n_cap)), block_size,
                   dtype, device)

    def __init__(self, n_layer, n_kv_head, head_dim, n_blocks, block_size=16,
                 dtype=torch.float32, device="cpu"):
        if block_size < 1 or n_blocks < 1:
            raise ValueError(f"block_size ({block_size}) and n_blocks ({n_blocks}) must be >= 1")
        per_block = block_size * bytes_per_token(n_layer, n_kv_head, head_dim, dtype)
        free = free_memory(device) if torch.device(device).type != "meta" else math.inf
        if n_blocks * per_block > free:  # refused before anything is allocated
            raise ValueError(f"a pool of {n_blocks} blocks needs {n_blocks * per_block / 2**30:.2f}"
                             f" GiB, more than the {free / 2**30:.2f} GiB of memory available on "
                             f"{device}: at most {free // per_block} blocks of {block_size} fit")
        self.n_layer, self.n_kv_head, self.head_dim = n_layer, n_kv_head, head_dim
        self.n_blocks, self.block_size, self.dtype = n_blocks, block_size, dtype
        self.kv = torch.zeros(n_layer, 2, n_kv_head, n_blocks, block_size, head_dim,
                              dtype=dtype, device=device)
        self.scales = torch.zeros(n_layer, 2, n_kv_head, n_blocks, block_size, dtype=SCALE_DTYPE,
                                  device=device) if dtype in QUANTIZED else None
        # per layer (k_cache, v_cache, kv_scales) views, built once: the model indexes these
        # every step; kv_scales is (k_scales, v_scales) for a quantized pool, else None
        self.layers = [(layer[0], layer[1], None if self.scales is None else
                        (self.scales[i, 0], self.scales[i, 1])) for i, layer in enumerate(self.kv)]
        # the whole pool as blocks, (L 2 K N, P, D): the compiled decode step's view
        self.blocks = self.kv.view(-1, block_size, head_dim)
        self.bytes_per_token = bytes_per_token(n_layer, n_kv_head, head_dim, dtype)
        # per physical block
        self.ref_counts = [0] * n_blocks          # block-table references
        self.block_hash = [None] * n_blocks       # chain hash of a full block, else None
        self.block_tokens = [None] * n_blocks     # its P token ids, to re-check a hash hit
        self.block_parent = [None] * n_blocks     # the parent hash it was chained on
        # what the hash stands for, checked on every hit with the tokens: the exact parent, as
        # (parent block, its generation), None for a first block; a block's generation goes up
        # whenever its hash is forgotten, so a child of since-forgotten contents never matches
        self.block_origin = [None] * n_blocks
        self.generation = [0] * n_blocks
        # free blocks: never-hashed ones first (deque), then cached ones in LRU order
        self.free_blocks = deque(range(n_blocks))
        self.cached_free: OrderedDict[int, None] = OrderedDict()
        self.hash_to_block: dict[int, int] = {}
        # blocks hashed when their slots were reserved, whose K/V the coming forward pass
        # has not written yet: another sequence may map them (the pass writes before anyone
        # attends), but nothing may copy them, and a failed pass must forget them
        self.unwritten: set[int] = set()
        # the host and disk tiers (attach_tiers), the key of each hashed block in them, and
        # the prompt tokens the last share_prefix read from them
        self.disk: DiskTier | None = None
        self.host: HostTier | None = None
        self.salt: bytes | None = None  # what the tiers' keys are salted with (attach_tiers)
        self.block_key: list[bytes | None] = [None] * n_blocks
        self.n_restored = 0
        # under tensor parallelism, the other ranks, whose pools hold their share of the heads
        # in the same blocks: every change this pool's contents get outside a forward pass (a
        # copy-on-write) is sent there too, by workers.send(op, *args)
        self.workers = None
        self.role = "main"  # which of their pools it is: "main", or "scratch" (generate.run_dense)
        # per sequence
        # seq id -> physical blocks, in order; RELEASED for a block a sliding window left
        self.block_tables: dict[int, list[int]] = {}
        self.seq_tokens: dict[int, list[int]] = {}    # seq id -> token ids it has slots for

    def attach_tiers(self, salt: bytes, host: HostTier | None = None,
                     disk: DiskTier | None = None):
        """Keep evicted blocks in host memory and/or every written block on disk, keyed by
        block_key chains salted with `salt` (set before any block is hashed)."""
        assert not self.hash_to_block, "tiers are attached to an empty pool"
        self.salt, self.host, self.disk = salt, host, disk

    # -- queries ----------------------------------------------------------------------------

    @property
    def n_free_blocks(self) -> int:
        """Blocks that no live sequence references (cached ones included: they are evictable)."""
        return len(self.free_blocks) + len(self.cached_free)

    @property
    def n_used_blocks(self) -> int:
        return self.n_blocks - self.n_free_blocks

    @property
    def n_cached_free_blocks(self) -> int:
        return len(self.cached_free)

    @property
    def bytes_in_use(self) -> int:
        """Bytes of the blocks held by live sequences (whole blocks: that is what they pin)."""
        return self.n_used_blocks * self.block_size * self.bytes_per_token

    @property
    def pool_shape(self) -> tuple:
        """(K, N, P): what attention metadata needs to know of this pool."""
        return self.n_kv_head, self.n_blocks, self.block_size

    @property
    def capacity_tokens(self) -> int:
        return self.n_blocks * self.block_size

    @property
    def seq_lens(self) -> dict:
        return {s: len(t) for s, t in self.seq_tokens.items()}

    def blocks_needed(self, n_tokens) -> int:
        return math.ceil(n_tokens / self.block_size)

    def check_fits(self, n_tokens):
        """Raise a ValueError if one sequence of n_tokens could never fit in the pool."""
        if self.blocks_needed(n_tokens) > self.n_blocks:
            raise ValueError(f"the KV cache ({self.n_blocks} blocks of {self.block_size} tokens "
                             f"= {self.capacity_tokens} tokens) is too small for one request of "
                             f"{n_tokens} tokens; give it more blocks")

    def seq_len(self, seq_id) -> int:
        return len(self.seq_tokens[seq_id])

    def block_table(self, seq_id) -> list[int]:
        return self.block_tables[seq_id]

    def n_new_blocks(self, seq_id, n_tokens) -> int:
        """Fresh blocks that appending n_tokens to seq_id (new or live) takes: the blocks its
        length grows into, plus one copy if its first write lands in a shared block."""
        n_now = len(self.seq_tokens.get(seq_id, ()))
        table = self.block_tables.get(seq_id, [])
        n = max(0, self.blocks_needed(n_now + n_tokens) - len(table))
        return n + (n_tokens > 0 and self._shared_write_block(seq_id) is not None)

    def can_append(self, seq_id, n_tokens) -> bool:
        return self.n_new_blocks(seq_id, n_tokens) <= self.n_free_blocks

    def _shared_write_block(self, seq_id):
        """Index in seq_id's table of the existing block its next token would be written into,
        if another sequence references it too (so it must be copied first); else None."""
        table = self.block_tables.get(seq_id, [])
        i = len(self.seq_tokens.get(seq_id, ())) // self.block_size
        if i < len(table) and self.ref_counts[table[i]] > 1:
            return i
        return None

    # -- block lifecycle --------------------------------------------------------------------

    def _allocate(self) -> int:
        """A block with no references: a never-hashed one if any, else evict the least
        recently freed cached block (its hash is forgotten)."""
        if self.free_blocks:
            block = self.free_blocks.popleft()
        else:
            block, _ = self.cached_free.popitem(last=False)
            if self.host is not None and self.block_key[block] is not None:
                self.host.put(self.block_key[block], self.block_tokens[block],
                              self.kv[:, :, :, block],
                              None if self.scales is None else self.scales[:, :, :, block])
            self._unhash(block)
        self.ref_counts[block] = 1
        return block

    def _take(self, block):
        """Reference a block found by hash (it may be sitting in the cached free list)."""
        if self.ref_counts[block] == 0:
            del self.cached_free[block]
        self.ref_counts[block] += 1

    def _release(self, block):
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            h = self.block_hash[block]
            if h is not None and self.hash_to_block.get(h) == block:
                self.cached_free[block] = None  # most recently freed: evicted last
            else:
                self._unhash(block)
                self.free_blocks.append(block)

    def _unhash(self, block):
        h = self.block_hash[block]
        if h is not None and self.hash_to_block.get(h) == block:
            del self.hash_to_block[h]
        self.block_hash[block] = self.block_tokens[block] = self.block_parent[block] = None
        self.block_origin[block] = self.block_key[block] = None
        self.generation[block] += 1  # whatever it held is forgotten: its children match no more
        self.unwritten.discard(block)

    def _copy_block(self, src) -> int:
        """Copy-on-write: a private copy of src's contents, every layer, K and V."""
        dst = self._allocate()
        if self.workers is not None:
            self.workers.send("copy", src, dst, self.role)
        self.copy_contents(src, dst)
        self._release(src)
        return dst

    def copy_contents(self, src, dst):
        """Block src's K/V (and scales) into block dst, every layer."""
        self.kv[:, :, :, dst] = self.kv[:, :, :, src]
        if self.scales is not None:
            self.scales[:, :, :, dst] = self.scales[:, :, :, src]

    # -- sequence operations ----------------------------------------------------------------

    def share_prefix(self, seq_id, tokens) -> int:
        """Start seq_id (new) on the leading full blocks of `tokens` already in the pool and
        return how many tokens it got for free. If every token is cached, the last one is
        still left to compute (its logits are needed): the count is then len(tokens) - 1, and
        writing that token copies the block first if it is shared."""
        if seq_id in self.block_tables:
            raise ValueError(f"sequence {seq_id} already exists")
        p, parent, hits = self.block_size, None, []
        for i in range(len(tokens) // p):
            block_toks = tuple(tokens[i * p:(i + 1) * p])
            h = self.chain_hash(parent, block_toks)
            block = self.hash_to_block.get(h)
            if block is None or self.block_tokens[block] != block_toks or \
                    self.block_origin[block] != self._origin(hits[-1] if hits else None):
                break  # a miss, or a collision: other tokens, or the same after another prefix
            hits.append(block)
            parent = h
        for block in hits:
            self._take(block)
        self.n_restored = self._restore(hits, tokens) * p if self.salt is not None else 0
        n_cached = min(len(hits) * p, len(tokens) - 1)
        self.block_tables[seq_id] = hits
        self.seq_tokens[seq_id] = list(tokens[:n_cached])
        return n_cached

    def _restore(self, hits, tokens) -> int:
        """Extend hits (blocks taken) with the prompt's next full blocks found in the host tier
        or on disk, copied into free blocks of the pool in one indexed copy; returns how
        many."""
        p, loaded, blocks = self.block_size, [], []
        shape = (self.n_layer, 2, self.n_kv_head, p, self.head_dim)
        parent = self.block_key[hits[-1]] if hits else None
        if hits and parent is None:
            return 0
        for i in range(len(hits), len(tokens) // p):
            if not self.free_blocks and not self.cached_free:
                break
            block_toks = tuple(tokens[i * p:(i + 1) * p])
            key = block_key(self.salt, parent, block_toks)
            found = None
            for tier in (self.host, self.disk):
                if found is None and tier is not None:
                    found = tier.load(key, block_toks, shape, self.kv.dtype)
            if found is None:
                break
            block = self._allocate()
            self._hash(block, hits[-1] if hits else None, block_toks)
            self.unwritten.discard(block)  # its K/V is the file's, copied below
            hits.append(block)
            blocks.append(block)
            loaded.append(found)
            parent = key
        if blocks:
            idx = torch.tensor(blocks, device=self.kv.device)
            self.kv[:, :, :, idx] = torch.stack([kv for kv, _ in loaded], 3).to(self.kv.device)
            if self.scales is not None:
                self.scales[:, :, :, idx] = torch.stack([s for _, s in loaded], 3).to(
                    self.scales.device)
        return len(blocks)

    def spill(self, blocks):
        """Write the given hashed blocks to the disk tier (each once), then keep its budget."""
        for b in sorted(blocks):
            if self.block_key[b] is not None:
                self.disk.save(self.block_key[b], self.block_tokens[b], self.kv[:, :, :, b],
                               None if self.scales is None else self.scales[:, :, :, b])
        self.disk.enforce_budget()

    def append(self, seq_id, tokens) -> list[int]:
        """Give the next len(tokens) tokens of seq_id (created if new) their slots, and return
        the slot ids in order. Copies a shared block before writing into it; hashes every block
        this fills. Raises CacheFull, changing nothing, if the pool is short."""
        n_new = self.n_new_blocks(seq_id, len(tokens))
        if n_new > self.n_free_blocks:
            raise CacheFull(f"sequence {seq_id} needs {n_new} more blocks of {self.block_size} "
                            f"tokens, {self.n_free_blocks} of {self.n_blocks} are free")
        table = self.block_tables.setdefault(seq_id, [])
        seq = self.seq_tokens.setdefault(seq_id, [])
        p, start = self.block_size, len(seq)
        if tokens:
            i = self._shared_write_block(seq_id)
            if i is not None:
                table[i] = self._copy_block(table[i])
            elif start // p < len(table):  # writing into our own block: its hash goes stale
                self._unhash(table[start // p])
        while len(table) < self.blocks_needed(start + len(tokens)):
            table.append(self._allocate())
        seq.extend(tokens)
        for i in range(start // p, len(seq) // p):  # blocks filled by this append
            if i and table[i - 1] == RELEASED:  # its prefix's block left the sliding window
                continue  # (after a truncate): unknown parent, so never shared, never hashed
            self._hash(table[i], table[i - 1] if i else None, seq[i * p:(i + 1) * p])
        return [table[i // p] * p + i % p for i in range(start, len(seq))]

    def _origin(self, parent_block):
        return None if parent_block is None else (parent_block, self.generation[parent_block])

    def _hash(self, block, parent_block, tokens):
        parent = None if parent_block is None else self.block_hash[parent_block]
        h = self.chain_hash(parent, tokens)
        self.block_hash[block], self.block_parent[block] = h, parent
        self.block_origin[block] = self._origin(parent_block)
        self.block_tokens[block] = tuple(tokens)
        if self.salt is not None:  # a parent without a key (none when it was hashed): none
            parent_key = None if parent_block is None else self.block_key[parent_block]
            self.block_key[block] = None if parent_block is not None and parent_key is None \
                else block_key(self.salt, parent_key, tokens)
        self.hash_to_block.setdefault(h, block)  # an equal block already cached stays canonical
        self.unwritten.add(block)

    def copies_unwritten(self, seq_id) -> bool:
        """Whether seq_id's next write would copy (copy-on-write) a shared block whose contents
        the coming forward pass has yet to write: the copy would copy nothing. Such a
        sequence waits a step."""
        i = self._shared_write_block(seq_id)
        return i is not None and self.block_tables[seq_id][i] in self.unwritten

    def mark_written(self):
        """The forward pass has written every reserved slot: nothing is pending any more. The
        blocks it filled go to the disk tier, if there is one."""
        if self.disk is not None and self.unwritten:
            self.spill(self.unwritten)
        self.unwritten.clear()

    def abort_step(self):
        """A forward pass failed: the blocks it was to write hold nothing, so forget their
        hashes (a later request must not map them). Every other cached prefix stays."""
        for block in list(self.unwritten):
            self._unhash(block)
            if block in self.cached_free:  # unreferenced: now a plain free block
                del self.cached_free[block]
                self.free_blocks.append(block)
        self.unwritten.clear()

    def fork(self, parent_id, child_id):
        """child_id shares every block of parent_id (n samples of one prompt): no copy until
        one of them writes into a shared block."""
        if child_id in self.block_tables:
            raise ValueError(f"sequence {child_id} already exists")
        table = self.block_tables[parent_id]
        for block in table:
            if block != RELEASED:
                self.ref_counts[block] += 1
        self.block_tables[child_id] = list(table)
        self.seq_tokens[child_id] = list(self.seq_tokens[parent_id])

    def truncate(self, seq_id, n_drop):
        """Drop the last n_drop tokens of seq_id and release the blocks they alone needed
        (speculative rollback, conversation edits). Released blocks keep their hashes."""
        seq = self.seq_tokens[seq_id]
        if not 0 <= n_drop <= len(seq):
            raise ValueError(f"cannot drop {n_drop} of {len(seq)} tokens")
        keep = self.blocks_needed(len(seq) - n_drop)
        if keep and self.block_tables[seq_id][keep - 1] == RELEASED:
            raise ValueError(f"cannot drop {n_drop} tokens of sequence {seq_id}: its block "
                             f"{keep - 1} has left the sliding window and been released")
        del seq[len(seq) - n_drop:]
        table = self.block_tables[seq_id]
        while len(table) > self.blocks_needed(len(seq)):
            self._release(table.pop())

    def free(self, seq_id):
        """Release every block of seq_id, last first (so a prefix outlives its tail in the LRU).
        Freeing an unknown sequence is a no-op, so a cleanup path may call it unconditionally."""
        for block in reversed(self.block_tables.pop(seq_id, [])):
            if block != RELEASED:
                self._release(block)
        self.seq_tokens.pop(seq_id, None)

    def release_before(self, seq_id, position) -> int:
        """Release the blocks of seq_id that hold only positions before `position` (keys no
        future query of a sliding-window model sees), keeping at least the last two blocks (a
        block's hash chains on the block before it). They go back to the pool, or to the cached
        free list if hashed (another request with that prefix may still map them). Returns
        how many were released."""
        table = self.block_tables[seq_id]
        n = 0
        for i in range(min(position // self.block_size, len(table) - 2)):
            if table[i] != RELEASED:
                self._release(table[i])
                table[i] = RELEASED
                n += 1
        return n

    def forget_cached(self):
        """Drop the hashes of every unreferenced block: the pool starts cold (benchmarks, and
        tests that compare against a cold run). A failed step needs only abort_step."""
        while self.cached_free:
            block, _ = self.cached_free.popitem(last=False)
            self._unhash(block)
            self.free_blocks.append(block)

    def padded_block_tables(self, seq_ids) -> list[list[int]]:
        """The block tables of the given sequences, padded with block 0 to the longest (at
        least one block; padding is never read: context_lens bounds every read)."""
        tables = [[0 if b == RELEASED else b for b in self.block_tables[s]] for s in seq_ids]
        width = max(1, max(len(t) for t in tables))
        return [t + [0] * (width - len(t)) for t in tables]

    def block_table_tensor(self, seq_ids, device=None) -> torch.Tensor:
        """padded_block_tables as a (B, max_blocks) int64 tensor."""
        return torch.tensor(self.padded_block_tables(seq_ids), dtype=torch.int64,
                            device=device or self.kv.device)

    # -- invariants -------------------------------------------------------------------------

    def check_invariants(self):
        """Assert the bookkeeping: reference counts equal block-table references; the free
        and used sets are disjoint and together every block (none lost); every hash entry
        points to a block whose tokens and parent give that hash; cached free blocks are
        exactly the hashed unreferenced ones; every unwritten block is hashed; every table fits
        its sequence's length, and the hashed blocks of a sequence hold its tokens."""
        refs = [0] * self.n_blocks
        for s, table in self.block_tables.items():
            held = [b for b in table if b != RELEASED]
            assert table[len(table) - len(held):] == held, \
                f"sequence {s} holds a block before one the sliding window released"
            for b in held:
                refs[b] += 1
        assert refs == self.ref_counts, "reference counts differ from block-table references"
        free, cached = list(self.free_blocks), list(self.cached_free)
        assert len(set(free + cached)) == len(free) + len(cached), "a block is free twice"
        used = {b for b in range(self.n_blocks) if refs[b]}
        assert not used & set(free + cached), "a block is both free and used"
        assert used | set(free) | set(cached) == set(range(self.n_blocks)), "a block is lost"
        for h, b in self.hash_to_block.items():
            assert self.block_hash[b] == h, f"hash entry of block {b} is stale"
            assert self.chain_hash(self.block_parent[b], self.block_tokens[b]) == h, \
                f"block {b} does not hash to its entry"
            assert len(self.block_tokens[b]) == self.block_size
            origin = self.block_origin[b]
            if origin is not None and self.generation[origin[0]] == origin[1]:
                assert self.block_hash[origin[0]] == self.block_parent[b], \
                    f"block {b} is chained on a hash its parent does not have"
        for b in cached:
            assert self.hash_to_block.get(self.block_hash[b]) == b, f"cached block {b} unhashed"
        for b in free:
            assert self.block_hash[b] is None, f"free block {b} keeps a hash"
        for b in range(self.n_blocks):
            if self.block_hash[b] is None:
                assert self.block_tokens[b] is self.block_parent[b] is self.block_origin[b] \
                    is None, f"unhashed block {b} keeps what its hash stood for"
        for b in self.unwritten:
            assert self.block_hash[b] is not None, f"unwritten block {b} is not hashed"
        assert self.block_tables.keys() == self.seq_tokens.keys(), "tables and tokens disagree"
        p = self.block_size
        for s, table in self.block_tables.items():
            seq = self.seq_tokens[s]
            # a whole-prompt hit maps every block of its prompt but has computed all but the last
            # token: with one-token blocks, that is one block more than its tokens need
            extra = len(table) - self.blocks_needed(len(seq))
            assert extra == 0 or (extra == 1 and p == 1), \
                f"sequence {s} has {len(table)} blocks for {len(seq)} tokens"
            for i, b in enumerate(table):
                if b != RELEASED and self.block_hash[b] is not None and (i + 1) * p <= len(seq):
                    assert self.block_tokens[b] == tuple(seq[i * p:(i + 1) * p]), \
                        f"block {b} of sequence {s} holds other tokens"
