"""Stage 2, from a process to where its binary keeps jemalloc's counters: which object
holds jemalloc and its TLS (`attach`, `elf`), the counters' offsets from DWARF (`dwarf`) or
from machine code (`machine_code`), the layout those make (`layout`), where the debug info
is (`debuginfo`: build-id path, debuglink, then `debuginfod`; `debughelp` tells an operator
how to install it), parsing in a sandboxed worker (`parse_worker`), beside the snapshot loop
(`resolver`, `retry`), and the results kept per binary (`cache`, `offsets_file`).

A new way of finding debug info goes in `debuginfo`'s search order.

May import: procfs, files, report."""
