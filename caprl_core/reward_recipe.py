"""The published CapRL reward server's answerer (`RewardConfig.recipe()`): its settings, its caption-length term, and
its parse of a reply (the first capital letter), mapped onto the reader's vocabulary for the "vocab" readout.

The server samples the reply at T = 0.6 and parses its first capital A-I; `token_option_map` maps every vocabulary
token to the letter a reply starting with it is parsed as, which `caprl_core.reward.CapRLReward` reads the expected
reward off (see `caprl_core.reward`'s docstring for what that readout approximates). The server's prompt wording is
in `caprl_core.reward_prompts` (`RECIPE_TEMPLATE`).
"""

from __future__ import annotations

import re
import weakref

import torch

from caprl_core.reward_prompts import LETTERS

# The recipe's answerer: sampled at T = 0.6, at most 10 new tokens, the first of the letters A-I in the reply.
RECIPE_READER_TEMPERATURE = 0.6
RECIPE_ANSWER_TOKENS = 10
RECIPE_ANSWER_LETTERS = "ABCDEFGHI"
# The server drops the data's own "can not answer" line and always appends "F) Can not answer based on the caption".
RECIPE_CANNOT_ANSWER_LETTER = "F"
# The recipe's caption-length term (CapRL++ launch scripts): 1 up to 2,048 tokens, linear to 0 at 3,072, weight 0.2.
RECIPE_LENGTH_WEIGHT = 0.2
RECIPE_LENGTH_L1 = 2048
RECIPE_LENGTH_L2 = 3072


def first_capital_letter(text: str, letters: str = LETTERS) -> str | None:
    """The recipe's parse: the first of `letters` (capitals) in a reply, or None. The recipe's server looks for
    A-I only, so a reply "Not sure: B" is B there (the N is skipped), while with A-Z it would be N."""
    match = re.search(f"[{re.escape(letters)}]", text)
    return match.group(0) if match else None


def token_option_map(tokenizer, vocab_size: int, letters: str = RECIPE_ANSWER_LETTERS) -> torch.Tensor:
    """[vocab_size] int64: for each token id, the option slot (index in LETTERS) that a reply starting with that
    token is parsed as by the server's rule (the first of `letters` anywhere in the reply), or -1 when the token
    decides nothing. A token decides when its text holds one of `letters` ("C", " C", "(C", "Because" -> slot of
    C, A, B): the reply's first such letter is then inside it. Special tokens (EOS and the chat markers) and ids
    past the tokenizer (embedding padding) decide nothing: a stop token ends the reply with no letter (score 0), and
    the others are dropped from the decoded reply."""
    if not (letters and set(letters) <= set(LETTERS)):
        raise ValueError(f"letters: expected capitals A-Z, got {letters!r}")
    out = torch.full((vocab_size,), -1, dtype=torch.int64)
    known = min(vocab_size, len(tokenizer))
    special = set(getattr(tokenizer, "all_special_ids", ()))
    special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    pattern = re.compile(f"[{re.escape(letters)}]")
    texts = tokenizer.batch_decode([[i] for i in range(known)], skip_special_tokens=False)
    for i, text in enumerate(texts):
        match = pattern.search(text)
        if match is not None and i not in special:
            out[i] = LETTERS.index(match.group(0))
    return out


# Decoding Qwen's 151,936 tokens one by one takes ~10 s (2-core CPU): rewards sharing a tokenizer (eval builds two)
# share its map.
_TOKEN_OPTION_MAPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cached_token_option_map(tokenizer, vocab_size: int, letters: str) -> torch.Tensor:
    """`token_option_map(tokenizer, vocab_size, letters)`, computed once per tokenizer and arguments."""
    maps = _TOKEN_OPTION_MAPS.setdefault(tokenizer, {})
    if (vocab_size, letters) not in maps:
        maps[(vocab_size, letters)] = token_option_map(tokenizer, vocab_size, letters)
    return maps[(vocab_size, letters)]
