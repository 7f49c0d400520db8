"""Stage 1, reading /proc: the processes and threads on the host, their identity (pid and
start time), owner, unit, maps and auxv (`processes`), and what ctprofd itself may do to them
(`capabilities`), and the kernel's events of their execs, owners, names and threads
(`events`).

May import: nothing else from ctprofd."""
