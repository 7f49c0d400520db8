"""Test support: fixture-program builder, process handles and ELF helpers."""
