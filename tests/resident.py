"""How much of a file this test process holds resident through its mappings (for the loaders' page-dropping tests)."""

from __future__ import annotations

from pathlib import Path


def resident_kib(path: Path) -> int:
    """Rss of this process's mappings of ``path`` (/proc/self/smaps), KiB."""
    target, total, inside = str(path.resolve()), 0, False
    with open("/proc/self/smaps", encoding="utf-8") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
                inside = len(head) == 6 and head[5] == target
            elif inside and line.startswith("Rss:"):
                total += int(head[1])
    return total
