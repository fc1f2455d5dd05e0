"""The built-in demo of `peft-fast train`: a tiny random Llama, a character-level tokenizer and
a string-reversal task (``data/demo.jsonl``), all offline.

Task: ``{"prompt": "reverse: hbdja\\n", "response": "ajdbh"}`` -- 3 to 7 letters from a-j. The
response is a function of the prompt that needs attention (position-relative copying), so a
falling loss shows the adapters learning, not just the output alphabet (that alone stops at
about ln(11) = 2.4 nats per token).

The demo base model is random and frozen; only the adapters train. It is initialised with
std 0.1 instead of Llama's 0.02: at 0.02 and hidden size 64 the attention logits are ~0, every
head averages uniformly, and a low-rank update needs thousands of steps to break that symmetry;
at 0.1 the random features are diverse enough that LoRA learns the task in a few hundred steps.

Regenerate the shipped data file with ``python -m peft_fast.cli._train_demo``.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

DEMO_DATA = Path(__file__).resolve().parent / "data" / "demo.jsonl"
ALPHABET = "abcdefghij"
N_ROWS, SEED = 2000, 0
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")

# What the demo trains with when the user does not say otherwise: _train_settings.DEMO.
MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=128, initializer_range=0.1,
             tie_word_embeddings=False, attention_dropout=0.0)


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(3, 7)))


def demo_row(word: str) -> dict:
    return {"prompt": f"reverse: {word}\n", "response": word[::-1]}


def demo_rows(n: int = N_ROWS, seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    return [demo_row(_word(rng)) for _ in range(n)]


def heldout_words(k: int, seen: set, seed: int = 12345) -> list[str]:
    """`k` distinct words that are not in the training set (for the demo's closing check)."""
    rng, out = random.Random(seed), []
    while len(out) < k:
        w = _word(rng)
        if w not in seen and w not in out:
            out.append(w)
    return out


def char_tokenizer(texts):
    """A character-level `PreTrainedTokenizerFast` over the characters of `texts`: one token per
    character, <s> prepended to every sequence, special tokens <pad> <s> </s> <unk>. Built in
    memory with `tokenizers` (nothing is downloaded); `save_pretrained` / `AutoTokenizer` work."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("".join(texts)) - set(SPECIALS))
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *chars])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # every character (newlines included) is its own pre-token, looked up as a whole word
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def example_texts(examples) -> list[str]:
    return [t for ex in examples for t in (ex.text, ex.prompt, ex.response) if t]


def build_demo_base(directory: Path, texts, seed: int) -> None:
    """Save a random tiny Llama and a character tokenizer for `texts` into `directory`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = char_tokenizer(texts)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **MODEL)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, max_new_tokens: int, device) -> str:
    """Greedy continuation without a KV cache (tiny model, a few tokens)."""
    ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=device)
    out = []
    for _ in range(max_new_tokens):
        nxt = int(model(input_ids=ids, use_cache=False).logits[0, -1].argmax())
        if nxt == tokenizer.eos_token_id:
            break
        out.append(nxt)
        ids = torch.cat([ids, ids.new_tensor([[nxt]])], dim=1)
    return tokenizer.decode(out)


def write_demo_data(path: Path = DEMO_DATA) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in demo_rows()))


if __name__ == "__main__":
    write_demo_data()
    print(f"wrote {N_ROWS} rows to {DEMO_DATA}")
