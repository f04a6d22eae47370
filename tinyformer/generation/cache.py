"""Preallocated key/value cache: written in place by position, rolled as a ring once full (RoPE models); for
seq2seq models it also holds the encoded source and each decoder layer's cross-attention keys and values."""
from __future__ import annotations

import sys
import threading

import torch

from ..model.layers import Unpadded, padded_causal_mask


class BufferPool:
    """Key/value buffers of caches that are gone, kept for the next cache of the same shape.

    A fresh buffer's pages fault in one by one as they are first written, and glibc hands big freed blocks back to
    the kernel, so every generation paid again: ~14,600 page faults in a batch-32 beam-4 translation (its 128
    rows x 17 slots are 53 MB): with the pool it ran 1.030x faster (8 of 8 alternating pairs). A buffer is handed
    out again only once nothing else refers to its memory (no view of it lives); the pool keeps at most `limit`
    bytes, of CPU memory only (CUDA has its own caching allocator); `clear()` lets them go."""

    def __init__(self, limit: int = 512 << 20):
        # reentrant: a garbage collection inside take or give may end a cache, whose __del__ gives
        self.limit, self.spare, self._lock = limit, [], threading.RLock()
        self._use_count = getattr(torch._C, "_storage_Use_Count", None)  # torch's own count of a memory's users

    def take(self, shape, dtype: torch.dtype, device) -> torch.Tensor:
        """An uninitialised tensor: a kept one of this shape, dtype and device if free, else a new one."""
        shape, device, inference = torch.Size(shape), torch.device(device), torch.is_inference_mode_enabled()
        with self._lock:  # an inference-mode tensor cannot be written outside that mode: the modes must match
            match = [i for i, b in enumerate(self.spare) if b.shape == shape and b.dtype == dtype
                     and b.device == device and b.is_inference() == inference]
            if match:
                buffer = self.spare.pop(match[0])
                if self._free(buffer):
                    return buffer
                del buffer  # something still refers to it: no longer ours to reuse
        return torch.empty(shape, dtype=dtype, device=device)

    def give(self, *buffers: torch.Tensor) -> None:
        if self._use_count is None:
            return
        with self._lock:
            for buffer in buffers:
                if (buffer is not None and buffer._base is None and buffer.is_contiguous()
                        and buffer.device.type == "cpu"):
                    self.spare.append(buffer)
            while sum(b.nbytes for b in self.spare) > self.limit:
                self.spare.pop(0)  # the oldest first

    def clear(self) -> None:
        with self._lock:
            self.spare.clear()

    def _free(self, buffer: torch.Tensor) -> bool:
        """No other reference to the tensor (3: the caller's, the argument's, getrefcount's) and no view of its
        memory (2: the tensor's own and the storage object made to ask)."""
        return sys.getrefcount(buffer) == 3 and self._use_count(buffer.untyped_storage()._cdata) == 2


POOL = BufferPool()


def kv_cache_bytes(config, batch_size: int, length: int, dtype: torch.dtype = torch.float32) -> int:
    """2 (keys and values) x layers x kv_heads x head_dim x length x batch x bytes per element."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.n_layers * config.kv_heads * config.hidden_head_dim * length * batch_size * element


def cross_cache_bytes(config, sources: int, source_length: int, dtype: torch.dtype = torch.float32) -> int:
    """Cross-attention keys and values: 2 x decoder layers x kv_heads x head_dim x source length x sources x bytes
    (one copy per source, shared by its beams)."""
    return kv_cache_bytes(config, sources, source_length, dtype)


class KVCache:
    """Keys and values of every layer, [layers, batch, kv_heads, capacity, head_dim].

    `length` counts tokens written so far. While length < capacity, token t lives in slot t. A rolling cache
    (only valid for relative positions, i.e. RoPE) then wraps: token t lives in slot t % capacity, and since
    keys already carry their rotation, the order of slots does not matter to attention.
    """

    def __init__(self, config, batch_size: int, capacity: int, dtype=torch.float32, device="cpu",
                 rolling: bool = False):
        shape = (config.n_layers, batch_size, config.kv_heads, capacity, config.hidden_head_dim)
        # empty, not zeros: attention only ever reads slots already written, and zeroing a fresh buffer costs a
        # page fault per page up front (40 ms for GPT-2 at batch 8 here)
        self.k, self.v = POOL.take(shape, dtype, device), POOL.take(shape, dtype, device)
        self.key_valid = torch.ones(batch_size, capacity, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.capacity, self.rolling, self.length = capacity, rolling, 0
        self.padded = False  # some slot in use holds padding, so masks are needed
        self._slots, self._read = slice(0, 0), 0
        self._spare = None  # (k, v) buffers that row reorders gather into, allocated on the first one
        # rows[b, s]: the cache row holding row b's slot s, after beam search reordered rows without moving their
        # keys (see select); None: each row holds its own slots
        self.rows: torch.Tensor | None = None
        self._attended = False  # the last step attended through kernels.cpp (attend), which reads that table
        self.checked_stack = None  # the model's DecodeStack once its weights were checked as packed (layers.py)
        self.memory = self.memory_mask = None  # seq2seq: encoder output [sources, S, D] and its key mask
        self.cross: list = []  # seq2seq: per decoder layer, (k, v) [sources, kv_heads, S, head_dim]
        self._unpadded = None

    def __del__(self):
        if POOL is not None and hasattr(self, "v"):  # POOL is None while the interpreter shuts down
            POOL.give(self.k, self.v, *(getattr(self, "_spare", None) or ()))

    def set_memory(self, memory: torch.Tensor, memory_mask) -> None:
        """The encoded source; batch rows are grouped by source (rows // group belong to one source)."""
        self.memory, self.memory_mask = memory, memory_mask
        self.cross = [None] * self.k.shape[0]
        self._unpadded = None  # the source's real tokens, which cross_kv projects

    @property
    def group(self) -> int:
        """Decoder rows per source (the beams of beam search; 1 otherwise)."""
        return self.batch_size // (self.cross_sources or self.batch_size)

    @property
    def cross_sources(self) -> int:
        if self.memory is not None:
            return self.memory.shape[0]
        return self.cross[0][0].shape[0] if self.cross and self.cross[0] is not None else 0

    def cross_kv(self, layer: int, attention, memory) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s cross-attention keys and values, projected from the source once and then reused."""
        if self.cross[layer] is None:
            valid = self.memory_mask[0]
            if valid is not None and self._unpadded is None:
                self._unpadded = Unpadded(valid[:, 0, 0, :])
            self.cross[layer] = attention.project_kv(self.memory if memory is None else memory, self._unpadded)
            if all(kv is not None for kv in self.cross):
                self.memory = None  # every layer has projected it: the encoder output is no longer needed
        return self.cross[layer]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def prepare(self, T: int, new_mask: torch.Tensor | None):
        """Choose the slots for T new tokens and return SDPA's (attn_mask, is_causal) for this forward."""
        start = self.length
        if start + T <= self.capacity:
            self._slots, self._read = slice(start, start + T), start + T
        elif self.rolling and T == 1:
            slot = start % self.capacity
            self._slots, self._read = slice(slot, slot + 1), self.capacity
        else:
            raise ValueError(f"{T} new tokens do not fit a cache of {self.capacity} holding {start}"
                             + ("" if self.rolling else " (this cache does not roll)"))
        if self.rows is not None:  # every row writes these slots itself
            self.rows[:, self._slots] = torch.arange(self.batch_size, device=self.rows.device).unsqueeze(1)
        if new_mask is not None:
            valid = new_mask.bool()
            self.key_valid[:, self._slots] = valid
            self.padded = self.padded or not bool(valid.all())
        else:
            self.key_valid[:, self._slots] = True
        if self._read == self.capacity and start >= self.capacity:  # wrapped: every slot is in the past
            return (self.key_valid[:, None, None, :] if self.padded else None), False
        if not self.padded:
            if start == 0:
                return None, T > 1
            if T == 1:
                return None, False
        return padded_causal_mask(self.key_valid[:, :self._read], T, start), False

    def positions(self, T: int, new_mask: torch.Tensor | None) -> torch.Tensor:
        """Position ids of the new tokens: real tokens count up per row, padding repeats the last position."""
        if new_mask is None and T == 1:  # a decode step: two small ops instead of six (next_position is >= 0)
            positions, self.next_position = self.next_position.unsqueeze(1), self.next_position + 1
            return positions
        if new_mask is None:
            steps = torch.arange(1, T + 1, device=self.next_position.device).expand(self.batch_size, T)
        else:
            steps = new_mask.long().cumsum(-1)
        positions = (self.next_position.unsqueeze(1) + steps - 1).clamp(min=0)
        self.next_position = self.next_position + steps[:, -1]
        return positions

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # select + narrow + copy_: 4.7 us against 6.1 for indexing with a tuple of slices (here), 24 times a GPT-2 step
        self._gather_rows()
        self._attended = False
        start, T = self._slots.start, self._slots.stop - self._slots.start
        keys, values = self.k[layer], self.v[layer]
        keys.narrow(2, start, T).copy_(k)
        values.narrow(2, start, T).copy_(v)
        return keys.narrow(2, 0, self._read), values.narrow(2, 0, self._read)

    def attend(self, layer: int, q, k, v, mask, cached_decode_attention) -> torch.Tensor:
        """A decode step's self-attention through kernels.cpp (layers.Attention): writes k, v [B, kv_heads, 1,
        head_dim] into the slot `prepare` chose and attends over the slots in use -> [B, 1, heads, head_dim]."""
        self._attended = True
        return cached_decode_attention(q, k, v, self.k, self.v, layer, self._slots.start, self._read, mask, self.rows)

    def attend_fused(self, layer: int, qkv, mask, cached_decode_attention_fused) -> torch.Tensor:
        """attend() on the fused q/k/v product [B, 1, 3 x heads x head_dim] (heads = kv_heads)."""
        self._attended = True
        return cached_decode_attention_fused(qkv, self.k, self.v, layer, self._slots.start, self._read, mask, self.rows)

    def decode_stack(self, stack, x, mask, memory=None, memory_mask=None, rope=None):
        """Every decoder layer's decode step in one kernels.cpp call (layers.DecodeStack): attend's arguments, plus
        each layer's cross-attention keys and values when the layers have cross-attention, and the rotary cos/sin
        when given."""
        self._attended = True
        cross = [self.cross_kv(layer, attention, memory) for layer, attention in enumerate(stack.cross)]
        cos, sin = rope if rope is not None else (None, None)
        return stack.step(x, self.k, self.v, self._slots.start, self._read, mask, self.rows, [k for k, _ in cross],
                          [v for _, v in cross], memory_mask, cos, sin)

    def advance(self, T: int) -> None:
        self.length += T

    def _select_sources(self, rows: torch.Tensor, old_group: int, new_group: int) -> None:
        """Follow a row selection on the per-source tensors. Rows come in whole groups, ordered by source (beam
        search reorders beams only within their source, and drops a source's beams together)."""
        sources = rows[::new_group] // old_group
        if len(sources) == self.cross_sources and bool((sources == torch.arange(len(sources), device=rows.device)).all()):
            return
        self.cross = [None if kv is None else (kv[0].index_select(0, sources), kv[1].index_select(0, sources))
                      for kv in self.cross]
        if self.memory is not None:
            self.memory = self.memory.index_select(0, sources)
            self._unpadded = None
        mask, causal = self.memory_mask
        self.memory_mask = (None if mask is None else mask.index_select(0, sources), causal)
        if mask is not None and self.memory is None:
            self._trim_sources()

    @property
    def source_length(self) -> int:
        """Key slots of the cross-attention (the longest source held, padding included)."""
        return self.memory.shape[1] if self.memory is not None else self.cross[0][0].shape[2]

    def _source_valid(self, width: int) -> torch.Tensor:
        """[sources, width] True on each source's real tokens (slots past source_length are padding)."""
        mask = self.memory_mask[0]
        valid = torch.zeros(self.cross_sources, width, dtype=torch.bool, device=self.k.device)
        valid[:, :self.source_length] = True if mask is None else mask[:, 0, 0, :]
        return valid

    def _trim_sources(self) -> None:
        """Drop trailing cross-attention key slots that are padding for every source (its long source left)."""
        valid = self._source_valid(self.source_length)
        used = valid.any(0)
        width = int(used.nonzero().max()) + 1 if bool(used.any()) else self.source_length
        if width < self.source_length:
            self.cross = [(k[:, :, :width], v[:, :, :width]) for k, v in self.cross]
        valid = valid[:, :width]
        self.memory_mask = (None if bool(valid.all()) else valid[:, None, None, :], self.memory_mask[1])

    def select(self, rows: torch.Tensor, group: int | None = None) -> None:
        """Keep (and reorder) batch rows: beam search reorders beams, finished rows are dropped. `group` is the new
        number of rows per source (seq2seq), when it changes (beam search spreading one row into its beams)."""
        old_group = self.group
        if self.memory_mask is not None:
            self._select_sources(rows, old_group, group or old_group)
        if len(rows) == self.batch_size:
            if rows.tolist() == list(range(len(rows))):
                return
            if self._attended:
                # reorder (beam search, every step) as a table: row b's slots are where its new parent's are, and
                # the keys stay put (4% of a batch-32 beam-4 translation went to copying them)
                if self.rows is None:
                    self.rows = torch.arange(self.batch_size, device=rows.device).unsqueeze(1).repeat(1, self.capacity)
                self.rows = self.rows.index_select(0, rows)
            else:
                self._gather_rows(rows)
        else:  # rows leave, or beam search spreads each prompt's row into its beams: gather the filled slots only
            # (the whole buffer was 2% of a batch-32 beam-4 translation, at one filled slot of 17)
            self._gather_rows()
            used = min(self.length, self.capacity)
            shape = (self.k.shape[0], len(rows)) + self.k.shape[2:]
            k, v = POOL.take(shape, self.k.dtype, self.k.device), POOL.take(shape, self.v.dtype, self.v.device)
            torch.index_select(self.k[:, :, :, :used], 1, rows, out=k[:, :, :, :used])
            torch.index_select(self.v[:, :, :, :used], 1, rows, out=v[:, :, :, :used])
            (self.k, self.v), old = (k, v), (self.k, self.v)
            POOL.give(*old)  # once read: nothing of this cache refers to them any more
        self.key_valid = self.key_valid.index_select(0, rows)
        self.next_position = self.next_position.index_select(0, rows)
        self.padded = self.padded and not bool(self.key_valid[:, :min(self.length, self.capacity)].all())

    def _gather_rows(self, order: torch.Tensor | None = None) -> None:
        """Lay every row's slots out in the row itself (its slot s from cache row rows[b, s], or from row order[b]
        when given), gathering into a spare buffer of the same shape and swapping: one pass over the filled slots
        instead of gathering to a temporary and copying back (3x faster here)."""
        if self.rows is None and order is None:
            return
        used = min(self.length, self.capacity)
        if self._spare is None or self._spare[0].shape != self.k.shape:
            POOL.give(*(self._spare or ()))
            self._spare = (POOL.take(self.k.shape, self.k.dtype, self.k.device),
                           POOL.take(self.v.shape, self.v.dtype, self.v.device))
        for buffer, spare in zip((self.k, self.v), self._spare):
            if self.rows is None:
                torch.index_select(buffer[:, :, :, :used], 1, order, out=spare[:, :, :, :used])
            else:
                rows = self.rows[:, :used] if order is None else self.rows[order, :used]
                slots = torch.arange(used, device=rows.device).expand_as(rows)
                # buffer[:, rows, :, slots] is [B, used, L, H, D]
                spare[:, :, :, :used] = buffer[:, rows, :, slots].permute(2, 0, 3, 1, 4)
        (self.k, self.v), self._spare = self._spare, (self.k, self.v)
        self.rows = None

    # ---- continuous batching (generation/batcher.py): rows join and leave a running batch between steps.
    # Rows share slot indices, so a row that joins is right-aligned with the others (its last token sits just
    # before the next write) and the slots before its first token are padding for it. Only for caches that
    # have not wrapped (the batcher keeps every row inside the context window).

    def add_rows(self, other: "KVCache") -> None:
        """Append the rows of `other` (a freshly prefilled cache) to this batch, with their sources (seq2seq)."""
        if self.length > self.capacity or other.length > other.capacity:
            raise ValueError("add_rows needs caches that have not wrapped")
        self._gather_rows()
        other._gather_rows()
        if self.memory_mask is not None or other.memory_mask is not None:
            self._add_sources(other)
        shift = max(0, other.length - self.length)  # other holds more tokens: move this batch right to match
        length = self.length + shift
        if shift or length > self.capacity:
            self._resize(max(self.capacity, length), shift)
        start = length - other.length
        rows = other.batch_size
        # zeros, not empty: attention reads the padding slots with weight 0, and 0 x NaN garbage would be NaN
        k = self.k.new_zeros(self.k.shape[:1] + (rows,) + self.k.shape[2:])
        v = self.v.new_zeros(k.shape)
        k[:, :, :, start:length] = other.k[:, :, :, :other.length]
        v[:, :, :, start:length] = other.v[:, :, :, :other.length]
        valid = torch.zeros(rows, self.capacity, dtype=torch.bool, device=self.key_valid.device)
        valid[:, start:length] = other.key_valid[:, :other.length]
        self.k, self.v = torch.cat((self.k, k), 1), torch.cat((self.v, v), 1)
        self.key_valid = torch.cat((self.key_valid, valid))
        self.next_position = torch.cat((self.next_position, other.next_position))
        self._refresh_padded()

    def _add_sources(self, other: "KVCache") -> None:
        """seq2seq: append the joining rows' encoded sources (each decoder layer's cross-attention keys and values)
        to this batch's; the shorter sources are padded with key slots their mask hides."""
        for cache in (self, other):
            if cache.memory_mask is None or cache.memory is not None or cache.group != 1:
                raise ValueError("add_rows joins seq2seq rows one per source, once every decoder layer has "
                                 "projected its source (after the prefill)")
        width = max(self.source_length, other.source_length)

        def padded(kv: torch.Tensor) -> torch.Tensor:  # [sources, kv_heads, S, head_dim] -> S = width, zeros
            return torch.nn.functional.pad(kv, (0, 0, 0, width - kv.shape[2]))

        valid = torch.cat((self._source_valid(width), other._source_valid(width)))
        self.cross = [(torch.cat((padded(k), padded(k2))), torch.cat((padded(v), padded(v2))))
                      for (k, v), (k2, v2) in zip(self.cross, other.cross)]
        self.memory_mask = (None if bool(valid.all()) else valid[:, None, None, :], False)

    def reserve(self, tokens: int, limit: int) -> None:
        """Make room for `tokens` more writes: drop leading slots no row uses, else grow (to at most `limit`)."""
        if self.length + tokens <= self.capacity:
            return
        self.compact()
        if self.length + tokens > self.capacity:
            capacity = min(limit, max(2 * self.capacity, self.length + tokens))
            if self.length + tokens > capacity:
                raise ValueError(f"{self.length + tokens} tokens do not fit the limit of {limit} slots")
            self._resize(capacity, 0)

    def compact(self) -> None:
        """Move every row left over the leading slots that no row uses any more (their rows have left)."""
        used = self.key_valid[:, :self.length].any(0)
        first = int(used.int().argmax()) if bool(used.any()) else self.length
        if first == 0:
            return
        self._gather_rows()
        kept = self.length - first
        for buffer in (self.k, self.v):
            buffer[:, :, :, :kept] = buffer[:, :, :, first:self.length].clone()
        self.key_valid[:, :kept] = self.key_valid[:, first:self.length].clone()
        self.length = kept
        self._refresh_padded()

    def _resize(self, capacity: int, shift: int) -> None:
        """Reallocate to `capacity` slots, moving the filled slots `shift` to the right (new slots are padding)."""
        self._gather_rows()
        L, B, H, _, D = self.k.shape
        k, v = self.k.new_empty((L, B, H, capacity, D)), self.v.new_empty((L, B, H, capacity, D))
        k[:, :, :, :shift], v[:, :, :, :shift] = 0, 0  # padding that attention reads with weight 0
        k[:, :, :, shift:shift + self.length] = self.k[:, :, :, :self.length]
        v[:, :, :, shift:shift + self.length] = self.v[:, :, :, :self.length]
        valid = torch.zeros(B, capacity, dtype=torch.bool, device=self.key_valid.device)
        valid[:, shift:shift + self.length] = self.key_valid[:, :self.length]
        self.k, self.v, self.key_valid = k, v, valid
        self.capacity, self.length = capacity, self.length + shift
        self._refresh_padded()

    def _refresh_padded(self) -> None:
        self.padded = not bool(self.key_valid[:, :self.length].all())
