"""What preprocessing counts, in one type: a batch's counts and the whole run's are the same fields, summed.

Why one type: a handler counts per batch (in whichever process tokenized it) and the main process adds the batches up
for the summary; a counter added to one place only would silently read 0 in the report.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class DocumentCounts:
    records: int = 0  # rows read
    documents: int = 0  # documents written (per output, for the pretrain handler's several --json-keys)
    tokens: int = 0
    empty: int = 0  # skipped: no tokens, or no trainable tokens
    dropped_overlong: int = 0  # skipped: longer than --seq-length (--overlong drop)
    truncated: int = 0  # cut to --seq-length (--overlong truncate)

    def add(self, other: DocumentCounts) -> None:
        """Add every counter of `other` to this one's."""
        for f in fields(DocumentCounts):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
