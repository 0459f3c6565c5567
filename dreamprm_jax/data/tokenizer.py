"""Tokenizers from local files only: the checkpoint's own, or a small offline byte-level BPE.

Qwen2-VL's tokenizer is a byte-level BPE (``tokenizer.json``) whose special tokens sit at
the end of the vocabulary::

    <|endoftext|> (pad)   <|im_start|>   <|im_end|> (eos)
    <|vision_start|>   <|vision_end|>   <|image_pad|>   <|video_pad|>

The real one comes with a checkpoint directory. For the CPU demo (no model hub) we train
a tiny byte-level BPE with the same pre-tokenizer, the same special tokens (appended after
the learnt vocabulary, as in Qwen2-VL) and the same chat template, and save it in the same
format, so both are read back through the one code path :func:`load_tokenizer`.

Nothing here touches the network: ``local_files_only=True`` everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

#: Qwen2-VL's special tokens, in the order they appear at the end of its vocabulary.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

#: The Qwen2-VL pre-tokenizer split pattern (from Qwen2-VL's tokenizer.json).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: Qwen2-VL's chat template (chat_template.json of Qwen/Qwen2-VL-2B-Instruct), verbatim.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")

#: The fixed text the chat template wraps every message in. It is added to the offline
#: tokenizer's corpus so that it becomes a few tokens instead of ~40 single letters (every
#: sequence carries it: shorter sequences are faster and spread attention less).
CHAT_TEMPLATE_TEXTS: tuple[str, ...] = ("system\nYou are a helpful assistant.", "user\n", "assistant\n")


class TokenizerError(ValueError):
    """A tokenizer directory is missing, incomplete, or lacks a Qwen2-VL special token."""


def build_offline_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike):
    """Train a small Qwen2-style byte-level BPE on ``texts`` and save it to ``out_dir``.

    The learnt vocabulary holds at most ``vocab_size - len(SPECIAL_TOKENS)`` entries (the
    256 byte symbols first, then merges); the seven Qwen2-VL special tokens are appended
    after it, so ``len(tokenizer) <= vocab_size`` and the special ids are the largest ids,
    as in Qwen2-VL. When the corpus is too small to learn that many merges the tokenizer is
    shorter; read the actual ids from :class:`~dreamprm_jax.data.processor.Processor`'s
    ``special_token_ids`` and size the model's vocabulary from there (any model vocabulary
    ``>= len(tokenizer)`` works, as for the real 151936-row Qwen2-VL embedding).

    Args:
      texts: training corpus (an iterable of strings; read once); the chat template's fixed
        text (:data:`CHAT_TEMPLATE_TEXTS`) is added to it.
      vocab_size: upper bound on the total vocabulary, special tokens included (>= 263).
      out_dir: directory written with ``tokenizer.json``, ``tokenizer_config.json`` and
        ``chat_template.jinja`` (created if needed).

    Returns:
      The tokenizer read back from ``out_dir`` by :func:`load_tokenizer`.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    n_special = len(SPECIAL_TOKENS)
    if vocab_size < 256 + n_special:
        raise ValueError(
            f"build_offline_tokenizer: vocab_size={vocab_size} is too small; a byte-level BPE needs "
            f"256 byte symbols + {n_special} special tokens = {256 + n_special} at least"
        )
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_special,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    def corpus():
        n = 0
        for t in texts:
            n += 1
            yield str(t)
        for _ in range(max(n, 100)):  # as frequent as the texts themselves
            yield from CHAT_TEMPLATE_TEXTS

    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))

    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        errors="replace",
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    fast.chat_template = QWEN2_VL_CHAT_TEMPLATE
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(os.fspath(out_dir))
    return load_tokenizer(out_dir)


def load_tokenizer(path: str | os.PathLike):
    """Read the tokenizer saved in a local directory (checkpoint or offline), never the network.

    Raises:
      TokenizerError: the directory does not exist, holds no tokenizer file, or the
        tokenizer lacks one of :data:`SPECIAL_TOKENS`.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise TokenizerError(f"{path}: tokenizer directory does not exist")
    if not any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        raise TokenizerError(
            f"{path}: no tokenizer found; expected one of {', '.join(_TOKENIZER_FILES)} "
            "(build one offline with dreamprm_jax.data.tokenizer.build_offline_tokenizer)"
        )
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - re-raised with the directory named
        raise TokenizerError(f"{path}: could not read the tokenizer ({type(exc).__name__}: {exc})") from exc
    vocab = tokenizer.get_vocab()
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise TokenizerError(f"{path}: tokenizer lacks the Qwen2-VL special token(s) {missing}")
    return tokenizer
