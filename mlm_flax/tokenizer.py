"""Tokenizers for MLM: load a pretrained one or train a BERT-style WordPiece.

A trained tokenizer is a `transformers.BertTokenizer`, so `save_pretrained` +
`AutoTokenizer.from_pretrained` give it back unchanged, and an exported model
works with Hugging Face's `pipeline('fill-mask')`.
"""

import hashlib
import os
import shutil
import tempfile
from typing import Callable, Iterable

import ml_collections
import tokenizers
from tokenizers import models, normalizers, pre_tokenizers, trainers
import transformers

SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')  # ids 0..4


def _check_mask_token(tokenizer: transformers.PreTrainedTokenizerBase, name: str):
  if tokenizer.mask_token is None or tokenizer.mask_token_id is None:
    raise ValueError(
        f'tokenizer {name!r} has no mask token; MLM needs one. Use a tokenizer '
        'with a mask token (BERT/RoBERTa-style) or leave data.tokenizer unset '
        'to train a WordPiece tokenizer.')


def load_tokenizer(name_or_path: str) -> transformers.PreTrainedTokenizerBase:
  """Loads a tokenizer (hub name or directory) and checks it can do MLM."""
  tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path)
  _check_mask_token(tokenizer, name_or_path)
  return tokenizer


def train_wordpiece(texts: Iterable[str], vocab_size: int,
                    lowercase: bool = True) -> transformers.PreTrainedTokenizerBase:
  """Trains a BERT-style WordPiece tokenizer on `texts`.

  Special tokens get ids [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4. The
  vocabulary is wrapped in `BertTokenizer`, which rebuilds exactly the pipeline
  used for training (BertNormalizer, BertPreTokenizer) and adds the
  `[CLS] $A [SEP]` template and the `##`-joining WordPiece decoder.
  """
  backend = tokenizers.Tokenizer(models.WordPiece(unk_token='[UNK]'))
  backend.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
  backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  trainer = trainers.WordPieceTrainer(
      vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False)
  backend.train_from_iterator(texts, trainer)
  # The trainer's token set is reproducible but its ids are not (hash-map order breaks ties), so ids
  # are re-assigned in a canonical order: the same corpus and config give the same tokenizer.
  learned = sorted(t for t in backend.get_vocab() if t not in SPECIAL_TOKENS)
  vocab = {t: i for i, t in enumerate(list(SPECIAL_TOKENS) + learned)}
  # clean_up_tokenization_spaces: decode "it ' s" as "it's", like bert-base-uncased.
  return transformers.BertTokenizer(vocab=vocab, do_lower_case=lowercase,
                                    clean_up_tokenization_spaces=True)


def save_atomic(tokenizer: transformers.PreTrainedTokenizerBase, path: str) -> None:
  """Saves to `path` via a temp dir + rename; a concurrent or killed save is harmless."""
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.tokenizer.tmp-', dir=parent)
  try:
    tokenizer.save_pretrained(tmp)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private.
    try:
      os.rename(tmp, path)
    except OSError:  # Someone else saved first: keep theirs.
      if not os.path.isdir(path):
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def get_tokenizer(data_cfg: ml_collections.ConfigDict, train_texts: Callable[[], Iterable[str]],
                  workdir: str | None, corpus_fingerprint: str | None = None,
                  cache_dir: str | None = None) -> transformers.PreTrainedTokenizerBase:
  """The run's tokenizer: `{workdir}/tokenizer` (resume), data_cfg.tokenizer, or trained.

  It is saved to `{workdir}/tokenizer` so that resuming (and export) always
  uses the very same vocabulary. A trained tokenizer is also cached under
  `cache_dir`, keyed by `corpus_fingerprint` and the settings: WordPiece training
  breaks frequency ties arbitrarily, and the cache makes the same config give the
  same tokenizer (and so the same run) every time.
  """
  saved = os.path.join(workdir, 'tokenizer') if workdir else None
  if saved and os.path.isdir(saved):
    return load_tokenizer(saved)
  if data_cfg.tokenizer:
    tokenizer = load_tokenizer(data_cfg.tokenizer)
  else:
    cached = None
    if corpus_fingerprint and cache_dir:
      key = hashlib.sha256(f'{corpus_fingerprint}-{data_cfg.tokenizer_vocab_size}-{data_cfg.lowercase}'
                           .encode()).hexdigest()[:16]
      cached = os.path.join(cache_dir, 'tokenizers', f'wordpiece-{key}')
    if cached and os.path.isdir(cached):
      tokenizer = load_tokenizer(cached)
    else:
      tokenizer = train_wordpiece(train_texts(), data_cfg.tokenizer_vocab_size, data_cfg.lowercase)
      if cached:
        save_atomic(tokenizer, cached)
  if not saved:
    return tokenizer
  save_atomic(tokenizer, saved)
  return load_tokenizer(saved)  # Exactly what a resumed run will use.


def special_token_ids(tokenizer: transformers.PreTrainedTokenizerBase) -> tuple[int, ...]:
  """Sorted ids of all special tokens: masking never selects or inserts these."""
  ids = set(tokenizer.all_special_ids)
  ids.update(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
  return tuple(sorted(i for i in ids if i is not None))
