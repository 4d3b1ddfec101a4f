"""The CapRL reward against references computed from the reader's full-vocabulary logits, against the recipe's
generate-and-parse way, and its prefix sharing counted token by token."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from caprl_core.data import MCQ
from caprl_core.models import tiny_qwen2, tiny_qwen3, tiny_tokenizer
from caprl_core.reward import CapRLReward
from caprl_core.reward_config import RewardConfig
from caprl_core.reward_prompts import LETTERS, RECIPE_TEMPLATE
from caprl_core.reward_recipe import token_option_map

CAPTIONS = [
    "A red circle in the top-left and a blue square in the bottom-right.",
    "Three shapes: a green triangle, a yellow circle and a purple square.",
    "An orange square.",
]
QUESTIONS = [
    [MCQ("What colour is the circle?", ("red", "green", "blue", "yellow"), 0),
     MCQ("How many shapes are there?", ("1", "2", "3", "4"), 1)],
    [MCQ("Is there a triangle?", ("yes", "no"), 0),
     MCQ("What colour is the square?", ("purple", "orange", "red"), 0),
     MCQ("How many shapes are there?", ("1", "2", "3", "4"), 2)],
    [MCQ("What shape is orange?", ("circle", "square", "triangle"), 1)],
]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _reward(tokenizer, reader=None, **config) -> CapRLReward:
    reader = reader if reader is not None else tiny_qwen2(tokenizer=tokenizer, seed=1)
    engine_kwargs = config.pop("engine_kwargs", {"kv_cache_tokens": 32768, "block_size": 1})
    return CapRLReward(reader, tokenizer, RewardConfig(engine_kwargs=engine_kwargs, **config))


def _answer_logits(reward: CapRLReward, step: int) -> tuple[list[torch.Tensor], object]:
    """Reference: the reader's full-vocabulary logits at the answer position of every prompt, one plain HF
    forward per prompt, restricted to the option letters."""
    draws = reward.reader_prompts(CAPTIONS, QUESTIONS, step=step)
    rows = []
    with torch.no_grad():
        for ids, n in zip(draws.prompts, draws.num_options, strict=True):
            logits = reward.model(input_ids=torch.tensor([ids])).logits[0, -1].float()  # [V]
            rows.append(logits[reward.letter_ids[:n]])
    return rows, draws


@pytest.mark.parametrize("build", [tiny_qwen2, tiny_qwen3], ids=["qwen2", "qwen3"])  # Qwen3: the CapRL++ answerer
def test_hard_reward_equals_full_vocabulary_reference(tokenizer, build):
    reward = _reward(tokenizer, build(tokenizer=tokenizer, seed=1), num_draws=6)
    rewards, details = reward.score(CAPTIONS, QUESTIONS, step=3)
    rows, draws = _answer_logits(reward, step=3)
    expect = torch.zeros(len(CAPTIONS))
    for letters, answer, c in zip(rows, draws.answers, draws.caption_index, strict=True):
        others = torch.cat([letters[:answer], letters[answer + 1 :]])
        expect[c] += float(bool((letters[answer] > others).all()))  # ties are wrong
    torch.testing.assert_close(rewards.cpu(), expect / 6, atol=0, rtol=0)
    assert details.chosen_letter == [LETTERS[int(r.argmax())] for r in rows]
    assert details.correct_letter == [LETTERS[a] for a in draws.answers]
    assert len(details.rows()) == len(CAPTIONS) * 6


def test_soft_reward_is_mean_probability_of_the_right_letter(tokenizer):
    reward = _reward(tokenizer, num_draws=5, mode="soft", temperature=0.5)
    rewards, details = reward.score(CAPTIONS, QUESTIONS, step=0)
    rows, draws = _answer_logits(reward, step=0)
    probs = [(r / 0.5).softmax(-1)[a] for r, a in zip(rows, draws.answers, strict=True)]
    expect = torch.zeros(len(CAPTIONS))
    for p, c in zip(probs, draws.caption_index, strict=True):
        expect[c] += p
    torch.testing.assert_close(rewards.cpu(), expect / 5, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(details.correct_prob), torch.stack(probs), atol=1e-5, rtol=0)


def test_hard_reward_equals_the_recipes_generate_and_parse_way(tokenizer):
    """A reader whose greedy next token is always one of the option letters (lm_head bias): scoring the letter
    logits and generating + parsing the first capital letter must agree draw for draw."""
    reader = tiny_qwen2(tokenizer=tokenizer, seed=3, num_layers=1)
    with torch.no_grad():  # larger weights: the answer position's hidden state depends more on the question
        for name, param in reader.named_parameters():
            if "norm" not in name:
                param.mul_(6.0)
    weight = reader.lm_head.weight.detach()
    reader.lm_head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=True)
    letters = [tokenizer.convert_tokens_to_ids("Ġ" + x) for x in "ABCDE"]  # 4 options + "cannot answer"
    with torch.no_grad():
        reader.lm_head.weight.copy_(weight)
        reader.lm_head.bias.fill_(-1e4)
        reader.lm_head.bias[letters] = 0.0
    questions = [[MCQ(q.question, (q.options + ("x", "y", "z"))[:4], q.answer) for q in qs] for qs in QUESTIONS]
    reward = _reward(tokenizer, reader, num_draws=8)
    for step in range(3):
        scored, details = reward.score(CAPTIONS, questions, step=step)
        generated = reward.score_by_generation(CAPTIONS, questions, step=step)
        torch.testing.assert_close(scored.cpu(), generated, atol=0, rtol=0)
    assert 0 < float(generated.sum()) < len(CAPTIONS)  # the comparison is not between all-0 or all-1 rewards
    assert len(set(details.chosen_letter)) > 1


def _distinct_prefix_tokens(prompts: list[list[int]]) -> int:
    """Tokens a perfect prefix cache computes: each prompt minus its longest common prefix with an earlier one
    (the last token of a prompt is always computed: its hidden state is the output)."""
    total = 0
    for i, p in enumerate(prompts):
        shared = 0
        for q in prompts[:i]:
            n = 0
            while n < min(len(p), len(q)) and p[n] == q[n]:
                n += 1
            shared = max(shared, n)
        total += len(p) - min(shared, len(p) - 1)
    return total


def test_prefix_sharing_counts_each_shared_part_once_and_changes_nothing(tokenizer):
    reward = _reward(tokenizer, num_draws=8)
    rewards, details = reward.score(CAPTIONS, QUESTIONS, step=1)
    draws = reward.reader_prompts(CAPTIONS, QUESTIONS, step=1)
    header = len(reward._header_ids)
    caption_parts = [len(reward._encode(reward.config.template.caption.format(caption=c))) for c in CAPTIONS]
    suffixes = [len(p) - header - caption_parts[c] for p, c in zip(draws.prompts, draws.caption_index, strict=True)]
    # Exactly the distinct tokens (a token trie over the prompts): draws of the same question, and "Question: ...",
    # share more than header and caption, so the count can only be below header + captions + suffixes.
    assert details.computed_tokens == _distinct_prefix_tokens(draws.prompts)
    assert header + sum(caption_parts) < details.computed_tokens <= header + sum(caption_parts) + sum(suffixes)
    assert details.prompt_tokens == sum(len(p) for p in draws.prompts)
    assert details.prompt_tokens > 3 * details.computed_tokens  # 24 prompts share one header

    separate = _reward(tokenizer, engine_kwargs={"kv_cache_tokens": 32768, "block_size": 1,
                                                 "enable_prefix_caching": False})  # fmt: skip
    alone, alone_details = separate.score(CAPTIONS, QUESTIONS, step=1)
    assert alone_details.computed_tokens == alone_details.prompt_tokens
    torch.testing.assert_close(rewards, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        torch.tensor(details.correct_prob), torch.tensor(alone_details.correct_prob), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("kv", [{}, {"kv_cache_tokens": 4096}], ids=["by-need", "fixed"])
def test_release_keeping_the_header_gives_the_same_rewards_and_computes_it_once(tokenizer, kv):
    """The trainer's reward phase: score, then `release_kv_cache()` (the header's full blocks kept), over several
    steps. Rewards, probabilities and the logged token count have the bits of a reward whose cache is freed
    whole each step (the header computed alone each time), and the header is computed once."""
    engine_kwargs = {"block_size": 16, **kv}
    kept, freed = (
        _reward(tokenizer, num_draws=4, engine_kwargs=engine_kwargs),
        _reward(tokenizer, num_draws=4, engine_kwargs=engine_kwargs),
    )
    header = len(kept._header_ids)
    assert header >= 2 * 16  # the default template's header spans several full blocks
    for step in range(4):
        captions = CAPTIONS[step % 3 :] + CAPTIONS[: step % 3]
        questions = QUESTIONS[step % 3 :] + QUESTIONS[: step % 3]
        (a, a_details), (b, b_details) = (r.score(captions, questions, step=step) for r in (kept, freed))
        assert torch.equal(a, b) and a_details == b_details
        kept.release_kv_cache()
        freed.engine.free_kv_cache()
        assert kept.engine.kv_cache is None and kept.engine.held_kv_bytes == header // 16 * kept.engine.block_bytes
    assert kept.engine.stats.shared_prefix_tokens == header
    assert freed.engine.stats.shared_prefix_tokens == 4 * header


def test_draws_are_reproducible_per_step(tokenizer):
    reward = _reward(tokenizer, num_draws=8)
    a = reward.reader_prompts(CAPTIONS, QUESTIONS, step=5)
    b = reward.reader_prompts(CAPTIONS, QUESTIONS, step=5)
    c = reward.reader_prompts(CAPTIONS, QUESTIONS, step=6)
    assert a.prompts == b.prompts and a.answers == b.answers
    assert a.prompts != c.prompts
    # Every answer points at the right option text after the shuffle; "cannot answer" is always the last option.
    for ids, answer, c_index, q in zip(a.prompts, a.answers, a.caption_index, a.question_index, strict=True):
        text = tokenizer.decode(ids)
        mcq = QUESTIONS[c_index][q]
        assert f"{LETTERS[answer]}. {mcq.options[mcq.answer]}\n" in text
        assert f"{LETTERS[len(mcq.options)]}. {reward.config.cannot_answer_text}" in text
    # Without a step, calls count up: two calls draw differently, a fresh reward repeats the first.
    r1, _ = reward.score(CAPTIONS, QUESTIONS)
    assert reward.calls == 1


def test_option_letters_must_be_single_tokens():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(["hello world"] * 10, trainer)  # " A" stays two byte tokens
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    with pytest.raises(ValueError, match="option letter 'A'.*not a single token"):
        _reward(fast, tiny_qwen2(vocab_size=len(fast)))


def test_bad_reward_inputs(tokenizer):
    reward = _reward(tokenizer)
    with pytest.raises(ValueError, match="same length"):
        reward.score(CAPTIONS, QUESTIONS[:2])
    with pytest.raises(ValueError, match=r"questions\[1\] is empty"):
        reward.score(CAPTIONS[:2], [QUESTIONS[0], []])
    with pytest.raises(ValueError, match=r"captions\[0\] must be a str"):
        reward.score([None], [QUESTIONS[0]])
    many = MCQ("q?", tuple(f"o{i}" for i in range(5)), 0)  # fits the dataset limit, not a 4-letter reward
    with pytest.raises(ValueError, match=r"questions\[0\]\[0\] has 5 options; at most 3 fit"):
        _reward(tokenizer, max_options=4).score(CAPTIONS[:1], [[many]])
    with pytest.raises(ValueError, match="mode"):
        RewardConfig(mode="medium")
    with pytest.raises(ValueError, match="num_draws"):
        RewardConfig(num_draws=0)


def test_trl_signature_reward_function(tokenizer):
    twin_a, twin_b = _reward(tokenizer, num_draws=4), _reward(tokenizer, num_draws=4)
    fn = twin_a.as_trl_reward()
    rows = [[{"question": q.question, "options": list(q.options), "answer": LETTERS[q.answer]} for q in qs]
            for qs in QUESTIONS]  # fmt: skip
    completions = [CAPTIONS[0], [{"role": "assistant", "content": CAPTIONS[1]}], CAPTIONS[2]]
    out = fn(prompts=["p"] * 3, completions=completions, questions=rows, completion_ids=[[1]] * 3)
    expect, _ = twin_b.score(CAPTIONS, QUESTIONS)
    assert isinstance(out, list) and all(isinstance(x, float) for x in out)
    assert out == expect.tolist()
    with pytest.raises(ValueError, match="no column 'questions'"):
        fn(prompts=["p"], completions=["c"])


def test_trl_reward_follows_the_trainer_step(tokenizer):
    from types import SimpleNamespace

    reward = _reward(tokenizer, num_draws=4)
    fn = reward.as_trl_reward()
    rows = [[{"question": q.question, "options": list(q.options), "answer": q.answer} for q in qs] for qs in QUESTIONS]
    at_7 = fn(prompts=["p"] * 3, completions=CAPTIONS, questions=rows, trainer_state=SimpleNamespace(global_step=7))
    expect, _ = _reward(tokenizer, num_draws=4).score(CAPTIONS, QUESTIONS, step=7)
    assert at_7 == expect.tolist()


def _biased_reader(tokenizer, seed: int, tokens: list[str], scale: float):
    """A tiny random reader that only ever emits `tokens` (lm_head bias -1e4 on every other token), with its weights
    scaled so that their probabilities differ sharply by question, caption and temperature."""
    reader = tiny_qwen2(tokenizer=tokenizer, seed=seed, num_layers=1)
    with torch.no_grad():
        for name, param in reader.named_parameters():
            if "norm" not in name:
                param.mul_(scale)
    weight = reader.lm_head.weight.detach()
    reader.lm_head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=True)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    assert tokenizer.unk_token_id not in ids and len(set(ids)) == len(tokens), tokens
    with torch.no_grad():
        reader.lm_head.weight.copy_(weight)
        reader.lm_head.bias.fill_(-1e4)
        reader.lm_head.bias[ids] = 0.0
    return reader


_WORDS = ["Because", "Clearly", "Definitely", "Hence"]  # first tokens that are words starting with a capital A-I
_SPACE_LETTERS = ["Ġ" + x for x in "ABCDEFGHI"]  # " A" .. " I" in the byte-level vocabulary
# What each reader may emit (the stop token <|im_end|> always: a reply that ends with no letter scores 0).
# out_of_range: all of A-I, on questions of 2-4 options, so C..I can be past the options (F is "cannot answer").
# capital_words: words whose first capital (A, B, C, D, H) decides the reply, bare "C", "An", "Answer".
# undecided: first tokens that decide nothing (" (", " the", " J", " Z", " "); the reply's later tokens decide.
_READERS = {
    "out_of_range": _SPACE_LETTERS,
    "capital_words": _SPACE_LETTERS[:2] + _WORDS + ["An", "Answer", "C"],
    "undecided": _SPACE_LETTERS[:6] + ["(", "Ġthe", "ĠJ", "ĠZ", "Ġ"],
}


@pytest.fixture(scope="module")
def word_tokenizer():
    tok = tiny_tokenizer()
    tok.add_tokens(_WORDS)
    return tok


@pytest.mark.slow  # 2,000 replies of up to 10 tokens for each of 24 prompts: about a minute per reader
@pytest.mark.parametrize("kind", list(_READERS))
def test_soft_recipe_reward_is_the_expectation_of_the_servers_sampled_reward(word_tokenizer, kind):
    """The recipe's server samples the reader's reply at T = 0.6 (at most 10 tokens) and parses the first capital A-I
    anywhere in it: a letter past the options, or no letter, scores 0. The recipe's soft reward is the probability of
    that parse being right over the whole vocabulary. Monte-Carlo over 2,000 sampled replies per prompt
    (`sample_by_generation`, the same draws and shuffles), questions unpadded (2-4 options, "cannot answer" = F):
    the soft reward is within 3 standard errors of the sampled mean for every caption, and the soft reward at
    T = 0.55 and at T = 0.65, and the old soft reward renormalised over the options, each miss it by more than 3
    standard errors for some caption. For the reader whose first tokens may decide nothing, the soft reward counts
    them 0: it is the expectation of the one-token reply exactly, and below the 10-token reply's by the measured gap
    (printed; docs/reward.md, "Two definitions of the soft reward")."""
    tokens = _READERS[kind] + ["<|im_end|>"]
    reader = _biased_reader(word_tokenizer, seed=5, tokens=tokens, scale=8.0)
    # The recipe's layout with a one-line header: the readout is what is tested, and short prompts decode faster.
    config = RewardConfig.recipe(template=replace(RECIPE_TEMPLATE, header="<|im_start|>user\n"),
                                 engine_kwargs={"kv_cache_tokens": 1 << 17, "max_num_seqs": 2048})  # fmt: skip
    reward = CapRLReward(reader, word_tokenizer, config)
    assert (config.num_draws, config.temperature, config.answer_tokens) == (8, 0.6, 10)

    def soft(**changes) -> torch.Tensor:
        other = CapRLReward(reader, word_tokenizer, replace(config, **changes), engine=reward.engine)
        return other.score(CAPTIONS, QUESTIONS, step=7)[0].cpu()

    tokens_per_reply = 1 if kind == "undecided" else None  # None: the server's 10
    samples = reward.sample_by_generation(CAPTIONS, QUESTIONS, step=7, num_samples=2000, seed=11,
                                          max_new_tokens=tokens_per_reply)  # fmt: skip  # [S, C]
    estimate, se = samples.mean(0), samples.std(0) / samples.shape[0] ** 0.5
    at_06 = soft()
    assert (se > 0).all()
    assert ((estimate - at_06).abs() < 3 * se).all(), (estimate, se, at_06)
    z = {}  # the largest distance, in standard errors, of each wrong definition from the samples
    for name, changed in (("T=0.55", soft(temperature=0.55)), ("T=0.65", soft(temperature=0.65)),
                          ("renormalised", soft(readout="options"))):  # fmt: skip
        assert ((estimate - changed).abs() > 3 * se).any(), (name, estimate, se, changed)
        z[name] = round(float(((estimate - changed).abs() / se).max()), 1)
    print(f"\n{kind}: sampled {estimate.tolist()} se {se.tolist()} soft {at_06.tolist()} rejected (s.e.) {z}")
    if kind == "undecided":  # the gap: replies whose first token decides nothing but a later one decides right
        full = reward.sample_by_generation(CAPTIONS, QUESTIONS, step=7, num_samples=2000, seed=12)
        gap = full.mean(0) - estimate
        gap_se = (full.var(0) / full.shape[0] + se**2) ** 0.5  # two independent sample means
        assert (gap > -3 * gap_se).all(), (gap, gap_se)  # counting them 0 can only be low
        print(f"undecided gap (10-token sampled - soft): {gap.tolist()} se {gap_se.tolist()}")


def test_token_option_map_reads_each_token_as_the_server_parses_a_reply_starting_with_it(word_tokenizer):
    options = token_option_map(word_tokenizer, len(word_tokenizer) + 3)  # 3 ids of embedding padding
    tokens = ["\u0120C", "C", "Because", "Hence", "An", "Answer", "(", "\u0120the", "\u0120J", "J", "<|im_end|>"]
    slot = {t: int(options[word_tokenizer.convert_tokens_to_ids(t)]) for t in tokens}
    assert slot == {"\u0120C": 2, "C": 2, "Because": 1, "Hence": 7, "An": 0, "Answer": 0, "(": -1, "\u0120the": -1,
                    "\u0120J": -1, "J": -1, "<|im_end|>": -1}  # fmt: skip
    assert (options[-3:] == -1).all()


def test_recipe_soft_and_hard_rewards_equal_the_whole_vocabulary_reference(word_tokenizer):
    """Soft: the softmax(logits / 0.6) mass, over the whole vocabulary, of the tokens whose first capital A-I is the
    right letter; hard: that slot's mass strictly above every other slot's. From one plain HF forward per prompt."""
    reader = tiny_qwen2(tokenizer=word_tokenizer, seed=2)
    config = RewardConfig.recipe(engine_kwargs={"kv_cache_tokens": 32768, "block_size": 1})
    soft, details = CapRLReward(reader, word_tokenizer, config).score(CAPTIONS, QUESTIONS, step=4)
    hard, _ = CapRLReward(reader, word_tokenizer, replace(config, mode="hard")).score(CAPTIONS, QUESTIONS, step=4)
    reward = CapRLReward(reader, word_tokenizer, config)
    draws = reward.reader_prompts(CAPTIONS, QUESTIONS, step=4)
    slots = reward.token_options
    expect_soft, expect_hard = torch.zeros(len(CAPTIONS)), torch.zeros(len(CAPTIONS))
    with torch.no_grad():
        for ids, answer, c in zip(draws.prompts, draws.answers, draws.caption_index, strict=True):
            probs = (reader(input_ids=torch.tensor([ids])).logits[0, -1].double() / 0.6).softmax(-1)  # [V]
            mass = torch.stack([probs[slots == k].sum() for k in range(9)])  # [9] slots A-I
            expect_soft[c] += float(mass[answer]) / 8
            expect_hard[c] += float(bool((mass[answer] > torch.cat([mass[:answer], mass[answer + 1 :]])).all())) / 8
    torch.testing.assert_close(soft.cpu(), expect_soft, atol=1e-5, rtol=0)
    torch.testing.assert_close(hard.cpu(), expect_hard, atol=0, rtol=0)
    assert sum(details.correct_prob) < len(details.correct_prob)  # mass off the letters is not renormalised away
    undecided = [1 - float(probs[slots >= 0].sum()) for probs in _next_token_probs(reader, draws.prompts, 0.6)]
    torch.testing.assert_close(torch.tensor(details.undecided_prob), torch.tensor(undecided), atol=1e-5, rtol=0)


def _next_token_probs(reader, prompts: list[list[int]], temperature: float) -> list[torch.Tensor]:
    with torch.no_grad():
        return [(reader(input_ids=torch.tensor([ids])).logits[0, -1].double() / temperature).softmax(-1)
                for ids in prompts]  # fmt: skip


def test_recipe_cannot_answer_is_always_f(word_tokenizer):
    """The server's layout: options A, B, ... then "F) Can not answer based on the caption", E unused for 4-option
    questions; a question with more options than fit before F gets the letter after its last."""
    reader = tiny_qwen2(tokenizer=word_tokenizer, seed=2)
    reward = CapRLReward(reader, word_tokenizer, RewardConfig.recipe(num_draws=1))
    for n, letter in ((2, "F"), (4, "F"), (5, "F"), (6, "G")):
        mcq = MCQ("Which?", tuple(f"option {i}" for i in range(n)), 0)
        draws = reward.reader_prompts(["c"], [[mcq]], step=0)
        text = word_tokenizer.decode(draws.prompts[0])
        assert f"- {letter}) Can not answer based on the caption\n" in text, text
        assert draws.num_options == ["ABCDEFGHI".index(letter) + 1]
        if n < 5:
            assert "- E)" not in text
