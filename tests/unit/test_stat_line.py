"""parse_stat on stat lines as the kernel writes them: the comm may hold spaces and
parentheses; the flags tell a kernel thread (PF_KTHREAD) without another syscall."""

from ctprofd.procfs.processes import PF_KTHREAD, parse_stat

# pid (comm) state ppid pgrp session tty tpgid flags ... starttime (field 22) ...
TAIL = "0 0 0 0 -1 {flags} 0 0 0 0 0 0 0 0 20 0 1 0 {start} 0 0"


def line(comm: str, state: str, flags: int, start: int) -> str:
    return f"42 ({comm}) {state} " + TAIL.format(flags=flags, start=start)


def test_fields_of_a_user_process():
    stat = parse_stat(line("a (b) c", "S", 0x400100, 12345))
    assert (stat.comm, stat.state, stat.start_time, stat.kernel_thread) == (
        "a (b) c", "S", 12345, False)


def test_a_kernel_thread_is_told_by_its_flags():
    assert parse_stat(line("kthreadd", "S", 0x208040, 2)).kernel_thread
    assert parse_stat(line("kworker/0:1", "I", PF_KTHREAD, 7)).kernel_thread
    assert not parse_stat(line("kthreadd", "S", PF_KTHREAD - 1, 2)).kernel_thread
