"""Paged KV slot allocator.

Bookkeeping lives on the CPU in torch tensors: a stack of free page ids (alloc/free are O(pages
touched), vectorised) and a per-page "is free" bitmap that catches double frees. Returned slots
stay on the CPU: the batch builders upload them with the rest of a batch in one copy.
"""

from __future__ import annotations

import torch


class KVAllocator:
    """Hands out KV slots in pages of page_size tokens. Slot s belongs to page s // page_size.

    Page 0 is the dummy page and is never handed out; usable pages are 1..num_slots // page_size.
    """

    def __init__(self, num_slots: int, page_size: int, device: torch.device | str):
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = page_size
        self.num_pages = num_slots // page_size
        if self.num_pages < 1:
            raise ValueError(f"num_slots={num_slots} gives no whole page of size {page_size}")
        self.total_tokens = self.num_pages * page_size
        self.device = torch.device(device)
        self._offsets = torch.arange(page_size, dtype=torch.int64)
        self.clear()

    # ---- state -------------------------------------------------------------------------------

    def clear(self) -> None:
        # Top of the stack is the end; page 1 on top so early allocations get low, contiguous slots.
        self._stack = torch.arange(self.num_pages, 0, -1, dtype=torch.int64)
        self._top = self.num_pages
        self._is_free = torch.ones(self.num_pages + 1, dtype=torch.bool)
        self._is_free[0] = False  # the dummy page is never free, so freeing it raises

    def available_size(self) -> int:
        """Free tokens = free pages * page_size."""
        return self._top * self.page_size

    def free_page_ids(self) -> torch.Tensor:
        """Copy of the free page ids (CPU), for debugging and invariant checks."""
        return self._stack[: self._top].clone()

    # ---- alloc -------------------------------------------------------------------------------

    def pages_needed(self, prefix_len: int, num_new: int) -> int:
        """How many new pages alloc_for_sequence(prefix_len, _, num_new) would take."""
        room = (-prefix_len) % self.page_size  # unused slots left in the sequence's last page
        rest = max(0, num_new - room)
        return -(-rest // self.page_size)

    def alloc_for_sequence(self, prefix_len: int, last_slot: int, num_new: int) -> torch.Tensor | None:
        """int64 slots (on the CPU) for positions prefix_len .. prefix_len+num_new-1 of one sequence.

        An unaligned prefix first continues in its last page (last_slot+1, ...), then whole new
        pages follow. Returns None, allocating nothing, when there are not enough free pages.
        """
        if num_new <= 0:
            return torch.empty(0, dtype=torch.int64)
        ps = self.page_size
        if ps == 1:
            return self._pop_pages(num_new)

        fill = min((-prefix_len) % ps, num_new)
        if fill:
            self._check_last_slot(prefix_len, last_slot)
        rest = num_new - fill
        pages = self._pop_pages(-(-rest // ps))
        if pages is None:
            return None
        parts = []
        if fill:
            parts.append(torch.arange(last_slot + 1, last_slot + 1 + fill, dtype=torch.int64))
        if rest:
            parts.append((pages[:, None] * ps + self._offsets).reshape(-1)[:rest])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def alloc_decode(self, prefix_lens: list[int], last_slots: list[int]) -> torch.Tensor | None:
        """One new slot (on the CPU) for each of many sequences (a decode step), in one call.

        Equivalent to alloc_for_sequence(prefix_lens[i], last_slots[i], 1) for each i, but
        vectorised. Returns None, allocating nothing, when there are not enough free pages.
        """
        n = len(prefix_lens)
        if n == 0:
            return torch.empty(0, dtype=torch.int64)
        ps = self.page_size
        if ps == 1:
            return self._pop_pages(n)
        lens = torch.as_tensor(prefix_lens, dtype=torch.int64)
        last = torch.as_tensor(last_slots, dtype=torch.int64).cpu()
        new_page = lens % ps == 0
        cont = ~new_page
        if cont.any():
            cl, cp = last[cont], last[cont] // ps
            ok = (cp >= 1) & (cp <= self.num_pages) & (cl % ps == (lens[cont] - 1) % ps)
            if not bool(ok.all()) or bool(self._is_free[cp].any()):
                raise ValueError("alloc_decode: a last_slot is not an owned slot at its prefix_len - 1")
        pages = self._pop_pages(int(new_page.sum()))
        if pages is None:
            return None
        out = last + 1
        out[new_page] = pages * ps
        return out

    # ---- free --------------------------------------------------------------------------------

    def free(self, slots: torch.Tensor) -> None:
        """Free the distinct pages of these slots (the caller owns those pages wholly)."""
        if slots.numel() == 0:
            return
        pages = torch.unique(slots.detach().to("cpu", torch.int64).reshape(-1) // self.page_size)
        if int(pages[0]) < 1 or int(pages[-1]) > self.num_pages:
            raise ValueError(f"free: page ids {int(pages[0])}..{int(pages[-1])} outside 1..{self.num_pages}")
        if bool(self._is_free[pages].any()):
            raise ValueError("free: a KV page was freed twice")
        # Push highest first so the lowest freed page is reused first.
        self._push_pages(pages.flip(0))

    # ---- internals ---------------------------------------------------------------------------

    def _pop_pages(self, n: int) -> torch.Tensor | None:
        if n > self._top:
            return None
        pages = self._stack[self._top - n : self._top].flip(0)  # flip copies, so later pushes can't alias
        self._top -= n
        self._is_free[pages] = False
        return pages

    def _push_pages(self, pages: torch.Tensor) -> None:
        k = pages.numel()
        self._stack[self._top : self._top + k] = pages
        self._top += k
        self._is_free[pages] = True

    def _check_last_slot(self, prefix_len: int, last_slot: int) -> None:
        ps = self.page_size
        page = last_slot // ps
        if (
            page < 1
            or page > self.num_pages
            or last_slot % ps != (prefix_len - 1) % ps
            or self._is_free[page]
        ):
            raise ValueError(
                f"alloc_for_sequence: last_slot={last_slot} is not an owned slot at position {prefix_len - 1}"
            )
