"""Choosing the next token, in numpy: greedy, temperature, top-k, top-p, repetition, presence and
frequency penalties, seed.

The conventions are transformers' (so settings mean the same thing in both): the repetition
penalty divides positive and multiplies negative logits of tokens already generated or in the
prompt, then temperature, then top-k, then top-p (smallest set whose probability reaches p).
The presence and frequency penalties are OpenAI's (``ftz-serve`` takes them from requests): over
the tokens generated so far (not the prompt), ``logit[t] -= count[t] * frequency_penalty +
(count[t] > 0) * presence_penalty``, applied to the raw logits before temperature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np


class GenerationConfigError(ValueError):
    """A generation setting out of its range; ``field`` names the setting."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field

    def __reduce__(self):
        return type(self), (self.field, str(self))


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off
    presence_penalty: float = 0.0  # OpenAI's, -2..2; 0 = off
    frequency_penalty: float = 0.0  # OpenAI's, -2..2; 0 = off
    # Any int; a negative one (OpenAI allows int64) seeds as its unsigned 64-bit two's complement.
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)  # stop strings, cut from the answer

    def __post_init__(self) -> None:
        """Raises ``GenerationConfigError`` naming the first setting out of range (NaN included)."""
        checks = (
            ("max_new_tokens", self.max_new_tokens >= 1, "must be at least 1"),
            ("temperature", math.isfinite(self.temperature) and self.temperature >= 0, "must be >= 0 (0 is greedy)"),
            ("top_k", self.top_k >= 0, "must be >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("repetition_penalty", math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0, "must be > 0"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
        )
        for name, ok, rule in checks:
            if not ok:
                raise GenerationConfigError(name, f"{name} {rule}, got {getattr(self, name)!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise GenerationConfigError("seed", f"seed must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class TokenChooser:
    """Chooses one sequence's tokens, in order: every call's result counts as generated (the
    presence and frequency penalties are over those), so use one chooser per answer."""

    def __init__(self, config: GenerationConfig):
        self.config = config
        seed = config.seed if config.seed is None or config.seed >= 0 else config.seed % (1 << 64)
        self.rng = np.random.default_rng(seed)
        self.generated: List[int] = []  # the tokens chosen so far

    def __call__(self, logits: np.ndarray, history: Sequence[int]) -> int:
        """``logits`` (vocab,) of the last position; ``history``: prompt and generated token ids."""
        token = self._choose(logits, history)
        self.generated.append(token)
        return token

    def _choose(self, logits: np.ndarray, history: Sequence[int]) -> int:
        config = self.config
        logits = logits.astype(np.float64, copy=True)
        if config.repetition_penalty != 1.0 and len(history):
            seen = np.unique(np.asarray([t for t in history if 0 <= t < logits.size], dtype=np.int64))
            values = logits[seen]
            logits[seen] = np.where(values > 0, values / config.repetition_penalty, values * config.repetition_penalty)
        if (config.presence_penalty or config.frequency_penalty) and self.generated:
            tokens, counts = np.unique(np.asarray(self.generated, dtype=np.int64), return_counts=True)
            inside = (tokens >= 0) & (tokens < logits.size)
            tokens, counts = tokens[inside], counts[inside]
            logits[tokens] -= counts * config.frequency_penalty + config.presence_penalty
        if config.greedy:
            return int(logits.argmax())
        logits /= config.temperature
        if config.top_k and config.top_k < logits.size:
            kth = np.partition(logits, -config.top_k)[-config.top_k]
            logits[logits < kth] = -np.inf
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if config.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            keep = order[: int(np.searchsorted(cumulative, config.top_p) + 1)]
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        return int(self.rng.choice(probs.size, p=probs))


class StopChecker:
    """Finds stop strings in the decoded answer and says where to cut it."""

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]

    def cut(self, text: str) -> Optional[int]:
        positions = [text.find(s) for s in self.stop if s in text]
        return min(positions) if positions else None

    def holdback(self, text: str) -> int:
        """How many trailing characters might be the start of a stop string (not streamed yet)."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    longest = max(longest, n)
                    break
        return longest
