"""Small Hugging Face model directories built from a config, with a word-level tokenizer of the
embedded corpus: what the tests and the decoder demo train, with nothing downloaded.

``word_tokenizer(texts)`` makes a lower-cased word-level tokenizer (``tokenizers``' WordLevel,
punctuation split off) whose vocabulary is every word of ``texts``; ``save_tiny(dir, family)``
writes a randomly initialised BertModel or LlamaForCausalLM of that vocabulary with the tokenizer
beside it, loadable by ``load_pretrained`` and ``python -m mos_models.hf train --model dir``.
"""
import os
from typing import Dict, Optional, Sequence

import torch

SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]", "[CLS]", "[SEP]")


def word_tokenizer(texts: Sequence[str], family: str = "llama"):
    """A transformers fast tokenizer over the words of ``texts``. BERT: [CLS] ... [SEP] around
    each sentence; Llama: [BOS] first. Inputs are input_ids and attention_mask."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    splitter = pre_tokenizers.Whitespace()
    words = sorted({w.lower() for text in texts for w, _ in splitter.pre_tokenize_str(text)})
    vocab = {token: i for i, token in enumerate(list(SPECIALS) + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = splitter
    if family == "bert":
        template = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]),
                                                     ("[SEP]", vocab["[SEP]"])])
    else:
        template = processors.TemplateProcessing(single="[BOS] $A",
                                                 special_tokens=[("[BOS]", vocab["[BOS]"])])
    core.post_processor = template
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]",
                                   bos_token="[BOS]", eos_token="[EOS]", cls_token="[CLS]",
                                   sep_token="[SEP]",
                                   model_input_names=["input_ids", "attention_mask"])


def tiny_config(family: str, vocab_size: int, **sizes):
    """A BertConfig or LlamaConfig: hidden 32, FFN 48, 3 layers, 4 heads unless ``sizes`` say."""
    import transformers
    settings: Dict = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                          num_hidden_layers=3, num_attention_heads=4,
                          max_position_embeddings=128)
    settings.update(sizes)
    if family == "bert":
        return transformers.BertConfig(**settings)
    if family == "llama":
        settings.setdefault("num_key_value_heads", 2)
        return transformers.LlamaConfig(**settings)
    raise ValueError(f"tiny_config: family must be 'bert' or 'llama', got {family!r}")


def save_tiny(out_dir: str, family: str, texts: Optional[Sequence[str]] = None, seed: int = 0,
              **sizes) -> str:
    """Writes a randomly initialised BertModel / LlamaForCausalLM (``tiny_config``) and its
    word-level tokenizer (of ``texts``, default the embedded corpus) to ``out_dir``."""
    import transformers
    from .corpus import default_corpus
    tokenizer = word_tokenizer(default_corpus() if texts is None else texts, family)
    config = tiny_config(family, len(tokenizer), **sizes)
    if family == "llama":
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    cls = transformers.BertModel if family == "bert" else transformers.LlamaForCausalLM
    model = cls(config)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
