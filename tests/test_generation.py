"""The token chooser's OpenAI presence / frequency penalties, and GenerationConfig's checks
(each names the setting it refuses, so ftz-serve can name the request field)."""

import math

import numpy as np
import pytest

from ftz_edge.runtime.generation import GenerationConfig, GenerationConfigError, TokenChooser


def openai_penalized(logits, generated, presence, frequency):
    """OpenAI's definition, written out: over the tokens generated so far,
    logit[t] -= count[t] * frequency_penalty + (count[t] > 0) * presence_penalty."""
    out = np.array(logits, dtype=np.float64)
    counts = np.bincount(np.asarray(generated, dtype=np.int64), minlength=out.size) if generated else np.zeros(out.size)
    return out - counts * frequency - (counts > 0) * presence


@pytest.mark.parametrize("presence, frequency", [(0.3, 0.4), (2.0, 0.0), (0.0, 2.0), (-1.0, -0.5), (1.5, -2.0)])
def test_greedy_path_follows_openai_penalties(presence, frequency):
    """Greedy choices over 40 steps of random logits equal the argmax of OpenAI's formula."""
    rng = np.random.default_rng(0)
    chooser = TokenChooser(GenerationConfig(presence_penalty=presence, frequency_penalty=frequency))
    generated, moved = [], 0
    for _ in range(40):
        # Few tokens, close logits: the penalties decide often, so a wrong formula shows.
        logits = rng.normal(0, 0.5, 6).astype(np.float32)
        expected = int(openai_penalized(logits, generated, presence, frequency).argmax())
        assert chooser(logits, list(range(100)) + generated) == expected
        moved += expected != int(logits.argmax())
        generated.append(expected)
    assert chooser.generated == generated
    assert moved >= 1  # the penalties really decided a choice (so a wrong formula would show)


def test_worked_example_and_prompt_tokens_not_penalised():
    logits = np.array([3.0, 2.5, 2.0, 0.0])
    chooser = TokenChooser(GenerationConfig(presence_penalty=0.3, frequency_penalty=0.4))
    # The prompt (history) holds token 0 many times: OpenAI's penalties count generated tokens only.
    assert chooser(logits, [0] * 50) == 0
    # Token 0 now: 3.0 - 1 * 0.4 - 0.3 = 2.3 < 2.5.
    assert chooser(logits, [0] * 50 + [0]) == 1
    # 0: 2.3, 1: 2.5 - 0.7 = 1.8, 2: 2.0.
    assert chooser(logits, []) == 0
    # 0: 3.0 - 2 * 0.4 - 0.3 = 1.9, 1: 1.8, 2: 2.0.
    assert chooser(logits, []) == 2


def test_zero_penalties_change_nothing():
    rng = np.random.default_rng(1)
    for temperature in (0.0, 1.0):
        plain = TokenChooser(GenerationConfig(temperature=temperature, seed=3))
        zeroed = TokenChooser(GenerationConfig(temperature=temperature, seed=3, presence_penalty=0.0,
                                               frequency_penalty=0.0))
        for _ in range(30):
            logits = rng.normal(0, 1, 50)
            assert plain(logits, []) == zeroed(logits, [])


def test_penalties_apply_before_temperature_when_sampling():
    """A penalised token's probability is softmax((logit - penalty) / T): with a large penalty a
    repeated token is (almost) never drawn again."""
    logits = np.array([5.0, 0.0, 0.0])
    draws = []
    for seed in range(200):
        chooser = TokenChooser(GenerationConfig(temperature=1.0, seed=seed, presence_penalty=2.0, frequency_penalty=2.0))
        chooser.generated = [0, 0]  # token 0 said twice: 5 - 2*2 - 2 = -1
        draws.append(chooser(logits, []))
    share = draws.count(0) / len(draws)
    expected = math.exp(-1) / (math.exp(-1) + 2)
    assert abs(share - expected) < 0.08, (share, expected)


@pytest.mark.parametrize("kwargs, field", [
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(presence_penalty=float("nan")), "presence_penalty"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(top_p=float("nan")), "top_p"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(seed=1.5), "seed"), (dict(seed=True), "seed"),
])
def test_config_errors_name_their_setting(kwargs, field):
    with pytest.raises(GenerationConfigError, match=field) as info:
        GenerationConfig(**kwargs)
    assert info.value.field == field and isinstance(info.value, ValueError)


def test_negative_seed_is_reproducible():
    """OpenAI takes any int64 seed; numpy only non-negative ones: a negative seed is its
    unsigned 64-bit two's complement, so it seeds (and reproduces) rather than failing."""
    logits = np.random.default_rng(2).normal(0, 1, 1000)

    def draws(seed):
        chooser = TokenChooser(GenerationConfig(temperature=1.0, seed=seed))
        return [chooser(logits, []) for _ in range(20)]

    assert draws(-1) == draws(-1) == draws((1 << 64) - 1)
    assert draws(-1) != draws(-2)
