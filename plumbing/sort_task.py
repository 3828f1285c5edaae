"""The built-in task: sort a short list of digits. Runs offline, on a CPU, in minutes.

    prompt    "sort 40391: "       response  "01349"  (+ EOS)

Why this task: the gold reward of any response is computable, so win rates need no judge, and preference
pairs of a *known* quality gap can be made on demand (Table 2 of the β-DPO paper,
https://arxiv.org/abs/2407.08639, mixes low-gap and high-gap pairs). Everything is a pure function of a seed.

    gold_reward(prompt, response) = (# positions equal to the sorted list) / max(len(gold), len(response))

so the correct answer scores 1.0, the maximum, and anything else scores less.

Also here: a character tokenizer and a tiny Llama, built locally and saved in the normal Hugging Face
layout, so every script loads them with `from_pretrained` exactly like a hub model.
"""

import random

PROMPT = "sort {}: "


def make_prompt(digits: str) -> str:
    return PROMPT.format(digits)


def parse_prompt(prompt: str) -> str:
    return prompt[len("sort ") : -len(": ")]


def gold_reward(prompt: str, response: str) -> float:
    """Fraction of positions right; a response of the wrong length loses the positions it lacks or adds."""
    gold = "".join(sorted(parse_prompt(prompt)))
    response = response.strip()
    right = sum(a == b for a, b in zip(gold, response))
    return right / max(len(gold), len(response), 1)


def _digits(rng: random.Random, min_len: int, max_len: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(rng.randint(min_len, max_len)))


def _corrupt(rng: random.Random, response: str, gold: str, n: int) -> str:
    """Replace `n` positions that are still right by a different digit: gold reward drops by exactly n/len."""
    out = list(response)
    right = [i for i, (a, b) in enumerate(zip(response, gold)) if a == b]
    for i in rng.sample(right, min(n, len(right))):
        out[i] = rng.choice([d for d in "0123456789" if d != out[i]])
    return "".join(out)


def sft_examples(n: int, seed: int, noise: float, min_len: int, max_len: int) -> list[dict]:
    """Imperfect demonstrations: a fraction `noise` of the targets have one or two wrong digits.

    A policy trained on them is competent but not perfect, which leaves room for preference training.
    """
    rng = random.Random(f"sft-{seed}")
    rows = []
    for _ in range(n):
        digits = _digits(rng, min_len, max_len)
        answer = "".join(sorted(digits))
        if rng.random() < noise:
            answer = _corrupt(rng, answer, answer, rng.randint(1, 2))
        rows.append({"prompt": make_prompt(digits), "response": answer})
    return rows


def preference_pairs(
    n: int, seed: int, high_gap_ratio: float, flip_ratio: float, min_len: int, max_len: int, split: str
) -> list[dict]:
    """`n` (prompt, chosen, rejected) rows with exact proportions of high-gap pairs and flipped labels.

    - low-gap pair:  chosen has 0–1 wrong digits, rejected has one more (gold gap 1/len);
    - high-gap pair: chosen is correct, rejected a random digit string scoring < 0.5 (gold gap > 0.5);
    - flipped pair:  chosen and rejected swapped (label noise), drawn independently of the gap.
    `round(n·ratio)` pairs of each kind, shuffled, so the proportions are exact. Each row also records
    `high_gap` and `flipped` for analysis.
    """
    rng = random.Random(f"pairs-{split}-{seed}")
    n_high, n_flip = round(n * high_gap_ratio), round(n * flip_ratio)
    high = [True] * n_high + [False] * (n - n_high)
    flip = [True] * n_flip + [False] * (n - n_flip)
    rng.shuffle(high)
    rng.shuffle(flip)
    rows = []
    for is_high, is_flipped in zip(high, flip):
        digits = _digits(rng, min_len, max_len)
        answer = "".join(sorted(digits))
        if is_high:
            chosen = answer
            rejected = _digits(rng, len(answer), len(answer))
            while gold_reward(make_prompt(digits), rejected) >= 0.5:  # keep the gap high
                rejected = _digits(rng, len(answer), len(answer))
        else:
            chosen = _corrupt(rng, answer, answer, rng.randint(0, 1))
            rejected = _corrupt(rng, chosen, answer, 1)
        if is_flipped:
            chosen, rejected = rejected, chosen
        rows.append(
            {"prompt": make_prompt(digits), "chosen": chosen, "rejected": rejected, "high_gap": is_high, "flipped": is_flipped}
        )
    return rows


# --------------------------------------------------------------------------------------------------------
# A character tokenizer and a tiny Llama, saved like any hub checkpoint
# --------------------------------------------------------------------------------------------------------
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def build_tokenizer():
    """One token per printable ASCII character (+ newline); anything else is <unk>.
    No BOS, as in the original DPO code (data.py links it)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {s: i for i, s in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # every character is a token
    tok.decoder = decoders.Fuse()  # join characters back without spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_llama(vocab_size: int, hidden_size: int, num_layers: int, seed: int, pad_id: int, eos_id: int):
    """A Llama-architecture model small enough to train on a CPU in minutes (≈0.4M parameters by default)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=max(1, hidden_size // 32),
        num_key_value_heads=max(1, hidden_size // 32),
        max_position_embeddings=2048,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)
