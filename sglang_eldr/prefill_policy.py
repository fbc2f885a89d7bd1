"""Prefill worker choice: prefix-hash (cache affinity) with a load gate, or round-robin."""

from __future__ import annotations

import hashlib

PREFILL_POLICIES = ("prefix-hash", "rr")


class PrefillPicker:
    def __init__(self, policy: str = "prefix-hash", load_gate: int = 4, prefix_chars: int = 256):
        if policy not in PREFILL_POLICIES:
            raise ValueError(f"prefill policy: unknown {policy!r} (expected one of {', '.join(PREFILL_POLICIES)})")
        if load_gate < 0:
            raise ValueError(f"prefill load gate: must be >= 0, got {load_gate}")
        self.policy = policy
        self.load_gate = load_gate
        self.prefix_chars = prefix_chars
        self._next = 0

    def pick(self, key: str, loads: list[int], healthy: list[bool], names: list[str] | None = None) -> int:
        """Index of the prefill worker for a prompt `key` given in-flight `loads`. `names` (the
        workers' URLs) key the hash, so a membership change moves only the prefixes it must."""
        live = [i for i, ok in enumerate(healthy) if ok]
        if not live:
            raise LookupError("no healthy prefill worker")
        if self.policy == "rr":
            n = len(loads)
            for step in range(n):
                i = (self._next + step) % n
                if healthy[i]:
                    self._next = (i + 1) % n
                    return i
        prefix = key[: self.prefix_chars].encode()
        # Rendezvous hashing: adding or removing a worker only moves the prefixes it owned.
        ids = [n.encode() for n in names] if names is not None else [i.to_bytes(4, "little") for i in range(len(loads))]
        best = max(live, key=lambda i: hashlib.blake2b(prefix + ids[i], digest_size=8).digest())
        least = min(live, key=lambda i: (loads[i], i))
        return least if loads[best] > loads[least] + self.load_gate else best


def prompt_key(body: dict) -> str:
    """The text the prefix hash looks at, for /generate and the OpenAI endpoints."""
    for field in ("text", "prompt"):
        v = body.get(field)
        if isinstance(v, str):
            return v
        if isinstance(v, list) and v and isinstance(v[0], int):
            return ",".join(map(str, v[:256]))
    ids = body.get("input_ids")
    if isinstance(ids, list) and ids and isinstance(ids[0], int):
        return ",".join(map(str, ids[:256]))
    messages = body.get("messages")
    if isinstance(messages, list):
        return "".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
    return ""
