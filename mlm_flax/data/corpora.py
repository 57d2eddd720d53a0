"""Built-in corpora: real English text that needs no download.

`CORPORA` maps a name (used as `data.dataset = 'builtin:NAME'`) to a function
`cache_dir -> {'train': path, 'validation': path}` of JSON-lines files with a
`text` and a `source` field. Files are built once and cached; the build is
atomic (temp dir + rename), so a killed or concurrent build never leaves a
half-written corpus behind.
"""

import ast
import hashlib
import inspect
import json
import logging
import os
import re
import shutil
import sys
import sysconfig
import tempfile
import warnings
from typing import Callable, Iterator

_VERSION = 'v1'
_SKIP_DIRS = frozenset(
    {'test', 'tests', 'idle_test', 'site-packages', 'dist-packages', '__pycache__'})
_MIN_WORDS = 5
_VALIDATION_FRACTION = 0.05


def normalize_docstring(doc: str) -> str:
  """Cleans a docstring into one text: paragraphs' lines joined, one per line."""
  paragraphs = re.split(r'\n\s*\n', inspect.cleandoc(doc))
  return '\n'.join(p for p in (' '.join(p.split()) for p in paragraphs) if p)


def _docstrings(tree: ast.Module, module: str) -> Iterator[tuple[str, str]]:
  """Yields (qualified name, raw docstring) in source order, module first."""
  def visit(body, prefix):
    for node in body:
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        name = f'{prefix}.{node.name}'
        doc = ast.get_docstring(node, clean=False)
        if doc:
          yield name, doc
        yield from visit(node.body, name)
      else:  # Definitions nested in if/try/with/for/match blocks.
        for field in ('body', 'handlers', 'orelse', 'finalbody', 'cases'):
          yield from visit(getattr(node, field, ()), prefix)

  doc = ast.get_docstring(tree, clean=False)
  if doc:
    yield module, doc
  yield from visit(tree.body, module)


def _stdlib_documents() -> list[tuple[str, str]]:
  """(source, text) pairs: stdlib docstrings by path and line, then pydoc topics."""
  root = sysconfig.get_paths()['stdlib']
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
    paths += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames
              if f.endswith('.py') and not f.startswith('test_')]
  docs = []
  for path in sorted(paths):
    module = path[:-3].replace(os.sep, '.').removesuffix('.__init__')
    try:
      with open(os.path.join(root, path), 'rb') as f, warnings.catch_warnings():
        warnings.simplefilter('ignore')  # SyntaxWarnings from old escapes.
        tree = ast.parse(f.read(), filename=path)
    except (SyntaxError, ValueError):
      continue
    docs.extend(_docstrings(tree, module))
  from pydoc_data import topics  # A plain dict literal: no side effects.
  docs.extend((f'pydoc_data.topics:{name}', text)
              for name, text in sorted(topics.topics.items()))
  docs = [(source, normalize_docstring(doc)) for source, doc in docs]
  return [(s, t) for s, t in docs if len(t.split()) >= _MIN_WORDS]


def _split_key(source: str) -> str:
  """Documents sharing a key go to the same split: the top-level module name.

  Each pydoc topic (a section of the language reference) is its own group.
  """
  return source if ':' in source else source.split('.')[0]


def _stable_hash(key: str) -> int:
  return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], 'big')


def split_documents(docs: list[tuple[str, str]], validation_fraction: float
                    ) -> dict[str, list[tuple[str, str]]]:
  """Splits by group: groups in stable-hash order fill validation to the target.

  Validation documents whose text also occurs in train are then dropped.
  """
  sizes = {}
  for source, _ in docs:
    sizes[_split_key(source)] = sizes.get(_split_key(source), 0) + 1
  target, taken, val_keys = validation_fraction * len(docs), 0, set()
  for key in sorted(sizes, key=_stable_hash):
    if taken + sizes[key] <= target:
      val_keys.add(key)
      taken += sizes[key]
  train = [d for d in docs if _split_key(d[0]) not in val_keys]
  train_texts = {text for _, text in train}
  validation = [d for d in docs
                if _split_key(d[0]) in val_keys and d[1] not in train_texts]
  return {'train': train, 'validation': validation}


def _build_cached(name: str, cache_dir: str,
                  build: Callable[[], dict[str, list[tuple[str, str]]]]) -> dict[str, str]:
  """Returns the split files under cache_dir, building them once atomically."""
  parent = os.path.join(os.path.expanduser(cache_dir), 'corpora')
  final = os.path.join(parent, name)
  paths = {split: os.path.join(final, f'{split}.jsonl') for split in ('train', 'validation')}
  if os.path.isdir(final):
    return paths
  logging.info('Building corpus %s under %s', name, final)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{name}.tmp-', dir=parent)
  try:
    for split, docs in build().items():
      with open(os.path.join(tmp, f'{split}.jsonl'), 'w', encoding='utf-8') as f:
        for source, text in docs:
          f.write(json.dumps({'text': text, 'source': source}, ensure_ascii=False) + '\n')
    os.chmod(tmp, 0o755)  # mkdtemp makes it private.
    try:
      os.rename(tmp, final)
    except OSError:  # Another process finished first: keep its copy.
      if not os.path.isdir(final):
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return paths


def stdlib_docs(cache_dir: str) -> dict[str, str]:
  """Python standard-library docstrings and pydoc topics (no download).

  Sources are parsed with `ast`, never imported. Split by top-level module so
  validation text is about modules never seen in training.
  """
  name = f'stdlib_docs-py{sys.version_info.major}.{sys.version_info.minor}-{_VERSION}'
  return _build_cached(
      name, cache_dir, lambda: split_documents(_stdlib_documents(), _VALIDATION_FRACTION))


CORPORA: dict[str, Callable[[str], dict[str, str]]] = {'stdlib_docs': stdlib_docs}


# A small real classification task (the fine-tuning defaults' check, `experiments/finetune_defaults`): which of
# five standard-library package families a docstring comes from. 578 docstrings: 462 train, 116 held out.
TOPIC_FAMILIES = ('asyncio', 'email', 'logging', 'unittest', 'xml')


def docstring_topics(families: tuple[str, ...] = TOPIC_FAMILIES, size: int = 578,
                     held_out_every: int = 5) -> dict[str, list[dict]]:
  """{'train', 'test'}: rows `{'text', 'label', 'source'}`, the label a docstring's top-level package.

  Deterministic for a Python version (its stdlib): unique texts ranked by a stable hash of their source, the
  first `size` kept, every `held_out_every`-th of them held out (578 and 5: 462 train, 116 test). Split by
  docstring, not module: a package's modules appear on both sides, as topics do in news classification.
  """
  seen, docs = set(), []
  for source, text in _stdlib_documents():
    family = source.split('.')[0]
    if family in families and text not in seen:
      seen.add(text)
      docs.append({'text': text, 'label': family, 'source': source})
  docs = sorted(docs, key=lambda d: _stable_hash(d['source']))[:size]
  return {'train': [d for i, d in enumerate(docs) if i % held_out_every],
          'test': [d for i, d in enumerate(docs) if not i % held_out_every]}
