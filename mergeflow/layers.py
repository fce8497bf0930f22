"""Depth of each parameter in a transformer's block stack, from the parameter names alone.

``layer_depths(names)`` maps every name to ``(l, L)``: the 0-based index l of the block it
belongs to among the L blocks of the model's main block stack (LiNeS scales the update of
block l by alpha + beta * l / (L - 1)). Block stacks are components ``<kind>.<i>.`` with
``kind`` one of ``layers``, ``layer``, ``h``, ``blocks``, ``resblocks``, identified by
everything before the index; the main stack is the one with the most distinct indices, and
L = its largest index + 1. Names outside the main stack (embeddings, norms, the projection,
heads, other stacks) get depth 0, the first block's, as in the LiNeS authors' code.

No stack in the names is a one-line ``MergeflowError``. Pure: no model is loaded.
Details (examples per architecture, ties, the authors' code): docs/internals.md#layers.
"""

from __future__ import annotations

import re
from typing import Iterable

from mergeflow.errors import MergeflowError

BLOCK_KINDS = ("layers", "layer", "h", "blocks", "resblocks")
_BLOCK = re.compile(r"(?<![^.])(?:" + "|".join(BLOCK_KINDS) + r")\.(\d+)(?=\.)")


def _blocks(name: str) -> list[tuple[str, int]]:
    """Every (stack prefix, index) in a name: ``a.layers.3.b`` -> [("a.layers", 3)]."""
    return [(name[: m.start(1) - 1], int(m.group(1))) for m in _BLOCK.finditer(name)]


def layer_depths(names: Iterable[str]) -> dict[str, tuple[int, int]]:
    """``{name: (l, L)}``: 0-based block index l of L in the main block stack (see the module doc);
    names outside the stack get l = 0."""
    names = list(names)
    found = {name: _blocks(name) for name in names}
    indices: dict[str, set[int]] = {}  # insertion order = first occurrence, for the tie-break
    for name in names:
        for prefix, i in found[name]:
            indices.setdefault(prefix, set()).add(i)
    if not indices:
        raise MergeflowError(
            f"layer_depths: no block stack ({', '.join(k + '.<i>.' for k in BLOCK_KINDS)}) among {len(names)} parameter names"
        )
    main = max(indices, key=lambda p: len(indices[p]))  # max keeps the first of equals
    L = max(indices[main]) + 1
    out = {}
    for name in names:
        own = [i for prefix, i in found[name] if prefix == main]
        out[name] = (own[0] if own else 0, L)
    return out
