"""What one snapshot reports, the vocabulary every stage shares: the failure tags (the
probe-summary wire contract's tokens), the summary tallied from them, and the per-process and
per-thread samples.

A new failure tag goes in `tags` (and the README's tag table, whose order is the tie-break).

May import: nothing else from ctprofd."""
