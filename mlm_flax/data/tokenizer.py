"""Tokenizers for MLM: load a pretrained one or train a WordPiece (BERT) or byte-level BPE (RoBERTa) one.

A trained tokenizer is a `transformers.BertTokenizer` or `RobertaTokenizer`, so
`save_pretrained` + `AutoTokenizer.from_pretrained` give it back unchanged, and an
exported model works with Hugging Face's `pipeline('fill-mask')`.
"""

import hashlib
import json
import os
import shutil
import tempfile
from typing import Callable, Iterable

import jax
import ml_collections
import numpy as np
import tokenizers
from tokenizers import models, normalizers, pre_tokenizers, trainers
import transformers

SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')  # ids 0..4
BPE_SPECIAL_TOKENS = ('<s>', '<pad>', '</s>', '<unk>', '<mask>')  # ids 0..4, RoBERTa's names
TOKENIZER_TYPES = ('wordpiece', 'bpe')


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


def train_bpe(texts: Iterable[str], vocab_size: int) -> transformers.PreTrainedTokenizerBase:
  """Trains a RoBERTa-style byte-level BPE tokenizer on `texts` (cased, no normalizer).

  Special tokens get ids <s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4. `<mask>` is an
  `AddedToken(lstrip=True)` both for the trainer and the wrapper, so `"a <mask>"`
  tokenizes to `a`, `<mask>` (the space goes into the mask, as in RoBERTa). Learned
  tokens get canonical ids (sorted); the merges keep the trainer's (deterministic) order.
  """
  mask = tokenizers.AddedToken('<mask>', lstrip=True, special=True)
  backend = tokenizers.Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(BPE_SPECIAL_TOKENS[:-1]) + [mask],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  backend.train_from_iterator(texts, trainer)
  model = json.loads(backend.to_str())['model']
  learned = sorted(t for t in model['vocab'] if t not in BPE_SPECIAL_TOKENS)
  vocab = {t: i for i, t in enumerate(list(BPE_SPECIAL_TOKENS) + learned)}
  merges = [tuple(m.split(' ')) if isinstance(m, str) else tuple(m) for m in model['merges']]
  return transformers.RobertaTokenizer(vocab=vocab, merges=merges, mask_token=mask)


def word_start_table(tokenizer: transformers.PreTrainedTokenizerBase) -> np.ndarray:
  """[len(tokenizer)] bool: True for tokens that begin a word (whole-word and span masking).

  WordPiece: every token but `##` continuations. Byte-level BPE: tokens starting
  with `Ġ` (a space); SentencePiece: with `▁`. Special tokens count as starts. A
  word also starts after a special token, which the masking handles in-graph.
  """
  vocab = tokenizer.get_vocab()
  table = np.ones(max(len(tokenizer), max(vocab.values()) + 1), bool)
  model = json.loads(tokenizer.backend_tokenizer.to_str())['model'] if hasattr(
      tokenizer, 'backend_tokenizer') else {}
  tokens = [t for t in vocab if not t.startswith(('[', '<'))]
  share = lambda prefix: sum(t.startswith(prefix) for t in tokens) / max(len(tokens), 1)
  if model.get('type') == 'WordPiece' or (not model and share('##') > 0.05):
    prefix = model.get('continuing_subword_prefix') or '##'
    for t, i in vocab.items():
      table[i] = not t.startswith(prefix)
  elif share('Ġ') > 0.05 or share('▁') > 0.05:
    prefix = 'Ġ' if share('Ġ') >= share('▁') else '▁'
    for t, i in vocab.items():
      table[i] = t.startswith(prefix)
  else:
    raise ValueError('masking.strategy whole_word/span needs a WordPiece (## continuations), byte-level '
                     'BPE (Ġ word starts) or SentencePiece (▁) tokenizer; use masking.strategy=token.')
  table[list(special_token_ids(tokenizer))] = True
  return table


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
  resolve = lambda: _resolve(data_cfg, train_texts, workdir, corpus_fingerprint, cache_dir)
  if jax.process_count() > 1:  # process 0 decides and saves; the others get its files (no shared disk)
    return _broadcast_tokenizer(resolve)
  return resolve()


def _resolve(data_cfg, train_texts, workdir, corpus_fingerprint, cache_dir):
  kind = data_cfg.get('tokenizer_type', 'wordpiece')
  if kind not in TOKENIZER_TYPES:
    raise ValueError(f'data.tokenizer_type={kind!r}; use one of {TOKENIZER_TYPES}.')
  saved = os.path.join(workdir, 'tokenizer') if workdir else None
  if saved and os.path.isdir(saved):
    return load_tokenizer(saved)
  if data_cfg.tokenizer:
    tokenizer = load_tokenizer(data_cfg.tokenizer)
  else:
    cached = None
    if corpus_fingerprint and cache_dir:
      lowercase = data_cfg.lowercase if kind == 'wordpiece' else 'cased'
      key = hashlib.sha256(f'{corpus_fingerprint}-{data_cfg.tokenizer_vocab_size}-{lowercase}'
                           .encode()).hexdigest()[:16]
      cached = os.path.join(cache_dir, 'tokenizers', f'{kind}-{key}')
    if cached and os.path.isdir(cached):
      tokenizer = load_tokenizer(cached)
    else:
      if kind == 'wordpiece':
        tokenizer = train_wordpiece(train_texts(), data_cfg.tokenizer_vocab_size, data_cfg.lowercase)
      else:
        tokenizer = train_bpe(train_texts(), data_cfg.tokenizer_vocab_size)
      if cached:
        save_atomic(tokenizer, cached)
  if not saved:
    return tokenizer
  save_atomic(tokenizer, saved)
  return load_tokenizer(saved)  # Exactly what a resumed run will use.


def _broadcast_tokenizer(resolve: Callable[[], transformers.PreTrainedTokenizerBase]
                         ) -> transformers.PreTrainedTokenizerBase:
  """Process 0 resolves (and saves) the tokenizer; every process loads the same files."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  blob = b''
  if jax.process_index() == 0:
    with tempfile.TemporaryDirectory() as tmp:
      resolve().save_pretrained(tmp)
      files = {}
      for name in sorted(os.listdir(tmp)):
        with open(os.path.join(tmp, name), encoding='utf-8') as f:
          files[name] = f.read()
    blob = json.dumps(files).encode()
  size = int(multihost_utils.broadcast_one_to_all(np.int64(len(blob))))
  buf = np.frombuffer(blob, np.uint8) if blob else np.zeros(size, np.uint8)
  files = json.loads(np.asarray(multihost_utils.broadcast_one_to_all(buf)).tobytes())
  with tempfile.TemporaryDirectory() as tmp:
    for name, text in files.items():
      with open(os.path.join(tmp, name), 'w', encoding='utf-8') as f:
        f.write(text)
    return load_tokenizer(tmp)


def special_token_ids(tokenizer: transformers.PreTrainedTokenizerBase) -> tuple[int, ...]:
  """Sorted ids of all special tokens: masking never selects or inserts these."""
  ids = set(tokenizer.all_special_ids)
  ids.update(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
  return tuple(sorted(i for i in ids if i is not None))
