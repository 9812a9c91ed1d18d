"""The organism's tokenizer: a real word-level ``PreTrainedTokenizerFast`` with a chat template.

One token per word of the world, special tokens for roles, and a Jinja chat template with
``{% generation %}`` markers so TRL's assistant-only loss works on it as on any chat model.
Saved with ``save_pretrained`` and reloaded with ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, END = "<pad>", "<unk>", "<bos>", "<|end|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = [PAD, UNK, BOS, END, *ROLE_TOKENS.values()]

# Messages render as "<|role|> words <|end|>"; the assistant's words and its <|end|> sit inside
# {% generation %} so `return_assistant_tokens_mask` marks exactly what the assistant says.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles must be system, user or assistant') }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|> ' }}{% generation %}{{ message['content'] }} {{ eos_token }}{% endgeneration %}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] + ' ' + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


def build_tokenizer(words: list[str]) -> "PreTrainedTokenizerFast":
    """A word-level fast tokenizer over ``words`` plus the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=END,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS.values()),
        model_max_length=512,
        padding_side="right",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
