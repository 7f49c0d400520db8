"""General-dynamic TLS: a module's block in a thread, found as libthread_db's
td_thr_tlsbase finds it. The module id comes from the loader's link map (`_r_debug`, the
public `struct r_debug` and `struct link_map` of <link.h>, then `l_tls_modid` by its
descriptor); the block from the thread's DTV, when the DTV is at least as new as the
module's slot (its generation), else from static TLS when the module has some. Every
pointer read is bounded and checked: the target's memory is hostile."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

from ..resolve.loader import LoaderLayout

ReadRanges = Callable[[int, list[tuple[int, int]]], list[bytes | OSError]]
MAX_LINK_MAPS = 4096   # objects followed along the link map chain
MAX_SLOTINFO_LISTS = 64
MAX_MODULES = 1 << 20
USER_TOP = 1 << 47     # x86_64 user addresses lie below
R_DEBUG_MAP = 8        # struct r_debug { int r_version; struct link_map *r_map; ... }
LINK_MAP_NEXT = 24     # struct link_map { l_addr; l_name; l_ld; l_next; l_prev; ... }
NO_TLS_OFFSET, FORCED_DYNAMIC_TLS_OFFSET = 0, (1 << 64) - 1  # glibc's markers in l_tls_offset
_U64 = struct.Struct("<Q")


class DtvError(Exception):
    """The loader's data does not lead to the module: the message says where it stopped."""


@dataclass(frozen=True)
class Module:
    """A module's TLS identity in one process."""

    modid: int
    generation: int   # of its slotinfo entry: a DTV older than this does not hold it
    tls_offset: int   # l_tls_offset: static TLS below the thread pointer, or a marker


def _word(read: ReadRanges, pid: int, address: int, what: str) -> int:
    if not 0 < address < USER_TOP:
        raise DtvError(f"{what}: address {address:#x} outside user space")
    data = read(pid, [(address, 8)])[0]
    if isinstance(data, OSError):
        raise DtvError(f"{what} at {address:#x}: {data.strerror}")
    return _U64.unpack(data)[0]


def find_module(read: ReadRanges, pid: int, loader: LoaderLayout, load_bias: int) -> Module:
    """The module loaded at `load_bias` (its link map's l_addr); raises DtvError."""
    fields = loader.fields
    node = _word(read, pid, loader.r_debug + R_DEBUG_MAP, "_r_debug.r_map")
    seen: set[int] = set()
    while node and len(seen) < MAX_LINK_MAPS:
        if node in seen:
            raise DtvError("the link map chain loops")
        seen.add(node)
        if _word(read, pid, node, "link_map.l_addr") == load_bias:
            modid = _word(read, pid, fields["link_map_l_tls_modid"].at(node), "l_tls_modid")
            if not 0 < modid < MAX_MODULES:
                raise DtvError(f"l_tls_modid {modid} is implausible")
            tls_offset = _word(read, pid, fields["link_map_l_tls_offset"].at(node),
                               "l_tls_offset")
            return Module(modid, _generation(read, pid, loader, modid, node), tls_offset)
        node = _word(read, pid, node + LINK_MAP_NEXT, "link_map.l_next")
    raise DtvError(f"no link map loaded at {load_bias:#x}")


def _generation(read: ReadRanges, pid: int, loader: LoaderLayout, modid: int,
                link_map: int) -> int:
    """The generation of the module's slotinfo entry (which must name its link map)."""
    fields = loader.fields
    head = fields["rtld_global__dl_tls_dtv_slotinfo_list"].at(loader.rtld_global)
    listing = _word(read, pid, head, "_dl_tls_dtv_slotinfo_list")
    index = modid
    for _ in range(MAX_SLOTINFO_LISTS):
        if not listing:
            break
        length = _word(read, pid, fields["dtv_slotinfo_list_len"].at(listing), "slotinfo len")
        if index < length:
            entry = listing + fields["dtv_slotinfo_list_slotinfo"].offset + index * loader.slotinfo_size
            if _word(read, pid, fields["dtv_slotinfo_map"].at(entry), "slotinfo map") != link_map:
                raise DtvError(f"slotinfo entry {modid} names another link map")
            return _word(read, pid, fields["dtv_slotinfo_gen"].at(entry), "slotinfo gen")
        index -= length
        listing = _word(read, pid, fields["dtv_slotinfo_list_next"].at(listing), "slotinfo next")
    raise DtvError(f"no slotinfo entry for module {modid}")


def block_address(read: ReadRanges, pid: int, loader: LoaderLayout, module: Module,
                  thread_pointer: int) -> int | None:
    """The module's TLS block in the thread whose thread pointer this is; None when the
    thread has none yet (it has not touched the module's TLS). Raises DtvError."""
    fields = loader.fields
    dtv = _word(read, pid, fields["pthread_dtvp"].at(thread_pointer), "pthread.dtvp")
    slots = fields["dtv_dtv"]
    generation = _word(read, pid, fields["dtv_t_counter"].at(slots.at(dtv, 0)), "dtv[0]")
    if generation >= module.generation:
        value = _word(read, pid, fields["dtv_t_pointer_val"].at(slots.at(dtv, module.modid)),
                      f"dtv[{module.modid}]")
        if not value & 1:  # TLS_DTV_UNALLOCATED is all ones; a block is aligned
            if not 0 < value < USER_TOP:
                raise DtvError(f"dtv[{module.modid}] holds {value:#x}")
            return value
    if module.tls_offset not in (NO_TLS_OFFSET, FORCED_DYNAMIC_TLS_OFFSET):
        return thread_pointer - module.tls_offset  # static TLS, below the thread pointer
    return None
