"""Readers of the domain-adaptation corpora (experiments/domain_adaptation/debian_text.py).

The fast tests build tiny files in each format by hand; the `slow` test downloads the real Debian packages.
"""

import gzip
import importlib.util
import json
import os
import shutil
import struct
import zlib

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     'experiments', 'domain_adaptation', 'debian_text.py')
_spec = importlib.util.spec_from_file_location('debian_text', _PATH)
debian_text = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(debian_text)


# --- R's XDR serialization, written by hand: version 3 header, then items. ---
def _int(v):
  return struct.pack('>i', v)


def _charsxp(s):
  b = s.encode()
  return _int(0x00040009) + _int(len(b)) + b


def _strsxp(values, names=None):
  flags = 16 | (1 << 9 if names else 0)
  out = _int(flags) + _int(len(values)) + b''.join(_charsxp(v) for v in values)
  if names:  # attribute pairlist: names = <character vector>
    out += _int(2 | 1 << 10) + _int(1) + _charsxp('names') + _strsxp(names) + _int(254)
  return out


def _xdr(item):
  return b'X\n' + _int(3) + _int(0x040201) + _int(0x030500) + _int(5) + b'UTF-8' + item


def test_read_rds_named_character_vector():
  blob = gzip.compress(_xdr(_strsxp(['a', 'b'], names=['x', 'y'])))
  assert debian_text.read_rds(blob) == {'x': 'a', 'y': 'b'}


def test_read_lazyload_db(tmp_path):
  objects = {'emma': ['EMMA', 'CHAPTER I', 'Emma Woodhouse, handsome, clever,', 'and rich.', '', 'End.'],
             'persuasion': ['x']}
  rdb, variables = b'', []
  for value in objects.values():
    payload = _xdr(_strsxp(value))
    block = struct.pack('>I', len(payload)) + zlib.compress(payload)
    variables.append((len(rdb), len(block)))
    rdb += block
  # index: list(variables = list(emma = c(offset, length), ...), ...), as R's makeLazyLoadDB writes it
  var_list = (_int(19 | 1 << 9) + _int(len(variables))
              + b''.join(_int(13) + _int(2) + _int(o) + _int(n) for o, n in variables)
              + _int(2 | 1 << 10) + _int(1) + _charsxp('names') + _strsxp(list(objects)) + _int(254))
  index = (_int(19 | 1 << 9) + _int(1) + var_list
           + _int(2 | 1 << 10) + _int(1) + _charsxp('names') + _strsxp(['variables']) + _int(254))
  (tmp_path / 'Rdata.rdx').write_bytes(gzip.compress(_xdr(index)))
  (tmp_path / 'Rdata.rdb').write_bytes(rdb)
  assert debian_text.read_lazyload_db(str(tmp_path / 'Rdata')) == objects


def test_read_ztext_and_osis(tmp_path):
  books = [['<w>In</w> <w>the</w> beginning,<note>a note</note> God', '<title>Heading</title>Amen.'],
           ['Second book.']]
  bzs, bzv, bzz = b'', b'', b''
  bzv += struct.pack('<IIH', 0, 0, 0)  # an empty slot (module heading)
  for b, verses in enumerate(books):
    text = ''.join(verses).encode()
    offset = 0
    for v in verses:
      bzv += struct.pack('<IIH', b, offset, len(v.encode()))
      offset += len(v.encode())
    block = zlib.compress(text)
    bzs += struct.pack('<3I', len(bzz), len(block), len(text))
    bzz += block
  for ext, data in (('bzs', bzs), ('bzv', bzv), ('bzz', bzz)):
    (tmp_path / f'ot.{ext}').write_bytes(data)
  read = list(debian_text.read_ztext(str(tmp_path), 'ot'))
  assert read == [(0, books[0]), (1, books[1])]
  assert debian_text.osis_to_text(books[0][0]) == 'In the beginning, God'
  assert debian_text.osis_to_text(books[0][1]) == 'Amen.'


def test_rst_to_paragraphs():
  rst = """:mod:`json` --- JSON encoder and decoder
========================================

.. module:: json
   :synopsis: Encode and decode the JSON format.

.. A comment that spans
   two lines and must not leak.

Use :func:`json.dumps` to turn ``obj`` into a string, see `the spec <https://json.org>`_ for **details**.

.. note::

   Keys in key/value pairs of JSON are always of the type str here.
"""
  assert debian_text.rst_to_paragraphs(rst) == [
      'json --- JSON encoder and decoder',
      'Use json.dumps to turn obj into a string, see the spec for details.',
      'Keys in key/value pairs of JSON are always of the type str here.']


@pytest.mark.slow
@pytest.mark.skipif(shutil.which('apt-get') is None, reason='needs apt-get (Debian)')
def test_real_packages(tmp_path):
  counts = {}
  for name, package in debian_text.PACKAGES.items():
    docs = debian_text.READERS[name](debian_text.fetch(package, str(tmp_path)))
    counts[name] = (len({s for s, _ in docs}), sum(len(t.split()) for _, t in docs))
  assert counts['austen'][0] > 250 and 650_000 < counts['austen'][1] < 750_000  # 6 novels, by chapter
  assert counts['bible'][0] > 60 and counts['bible'][1] > 800_000  # books
  assert counts['python_docs'][0] > 400 and counts['python_docs'][1] > 500_000  # source files


# --- Downstream tasks (experiments/domain_adaptation/downstream.py). ---
def _downstream():
  import sys  # pylint: disable=g-import-not-at-top
  sys.modules.setdefault('debian_text', debian_text)  # downstream.py imports it by name, as run.py does
  spec = importlib.util.spec_from_file_location('downstream', os.path.join(os.path.dirname(_PATH), 'downstream.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_library_chapters_follow_the_tables_of_contents(tmp_path):
  downstream = _downstream()
  lib = tmp_path / 'library'
  lib.mkdir()
  (lib / 'index.rst.txt').write_text('Title\n=====\n\n.. toctree::\n   :maxdepth: 2\n\n   text.rst\n   net.rst\n\nEnd.\n')
  (lib / 'text.rst.txt').write_text('.. _textservices:\n\n****************\nText Processing\n****************\n\n'
                                    'Intro.\n\n.. toctree::\n\n   string.rst\n   re.rst\n')
  (lib / 'net.rst.txt').write_text('Networking\n==========\n\n.. toctree::\n   :maxdepth: 1\n\n   socket.rst\n'
                                   '   re.rst\n\nNot an entry.rst\n')
  assert downstream.library_chapters(str(tmp_path)) == {
      'library/string': 'Text Processing', 'library/re': 'Text Processing', 'library/socket': 'Networking'}


def test_downstream_splits_keep_groups_whole_and_every_label_in_every_split():
  downstream = _downstream()
  rows = [(f'{label}-g{g}', label, f'{label} group {g} paragraph {i}')
          for label in ('a', 'b', 'c') for g in range(7) for i in range(3)]
  splits = downstream.split_groups(rows)
  group_split = {}
  for split, items in splits.items():
    assert {r['label'] for r in items} == {'a', 'b', 'c'}, split
    for r in items:
      group = r['text'].rsplit(' paragraph', 1)[0]
      assert group_split.setdefault(group, split) == split, f'{group} is in two splits'
  assert sum(len(v) for v in splits.values()) == len(rows)
  assert {s: sorted(r['text'] for r in v) for s, v in splits.items()} == {
      s: sorted(r['text'] for r in v) for s, v in downstream.split_groups(list(reversed(rows))).items()}


def test_bag_of_words_reference_learns_a_planted_keyword_task(tmp_path):
  """The TF-IDF + logistic regression row: fitted on train only, scored on test (a keyword decides the label;
  the filler words are shared, so only the keyword can give 1.0; majority class is 0.5)."""
  downstream = _downstream()
  paths = {}
  for split, n in (('train', 40), ('validation', 10), ('test', 20)):
    paths[split] = str(tmp_path / f'{split}.jsonl')
    with open(paths[split], 'w', encoding='utf-8') as f:
      for i in range(n):
        label, word = ('pos', 'splendid') if i % 2 else ('neg', 'dreadful')
        f.write(json.dumps({'text': f'the weather was {word} on day {i % 7}', 'label': label}) + '\n')
  scores = downstream.bag_of_words(paths)
  assert scores == {'test_accuracy': 1.0, 'test_macro_f1': 1.0}
