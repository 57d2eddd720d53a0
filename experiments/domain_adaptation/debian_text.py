"""Real text from Debian packages, read with the standard library only.

Packages are fetched without root or dependencies (`apt-get download PKG && dpkg-deb -x PKG.deb DIR`) into a
cache folder. Three readers turn them into `(source, text)` documents, `source` naming the unit a train /
validation split keeps whole (`corpus:document`):

- `austen_documents`: Jane Austen's six novels (`r-cran-janeaustenr`), R's lazy-load database
  `data/Rdata.rdb` + `.rdx` index (XDR serialization, zlib blocks); one document per chapter, one text per
  paragraph.
- `bible_documents`: the World English Bible (`sword-text-web`), a SWORD zText module (`.bzs` block index,
  `.bzv` verse index, `.bzz` zlib blocks, OSIS markup); one document per book, texts of about 80 words.
- `python_doc_documents`: the Python 3.11 documentation sources (`python3.11-doc`, `*.rst.txt`); one document
  per source file, one text per paragraph, reStructuredText roles and directives reduced to their words.
"""

import glob
import gzip
import os
import re
import struct
import subprocess
import zlib
from typing import Any, Iterator

PACKAGES = {'austen': 'r-cran-janeaustenr', 'bible': 'sword-text-web', 'python_docs': 'python3.11-doc'}
_MIN_WORDS = 5


def fetch(package: str, cache_dir: str) -> str:
  """Downloads and unpacks a Debian package into `cache_dir/PACKAGE` (once); returns that folder."""
  root = os.path.join(os.path.abspath(cache_dir), package)
  if os.path.isdir(root):
    return root
  os.makedirs(cache_dir, exist_ok=True)
  debs = glob.glob(os.path.join(cache_dir, f'{package}_*.deb'))
  if not debs:
    subprocess.run(['apt-get', 'download', package], cwd=cache_dir, check=True, capture_output=True)
    debs = glob.glob(os.path.join(cache_dir, f'{package}_*.deb'))
  tmp = root + '.tmp'
  subprocess.run(['dpkg-deb', '-x', debs[0], tmp], check=True)
  os.rename(tmp, root)
  return root


# --- R serialization (XDR, format versions 2 and 3): just enough for data objects. ---

class _RReader:
  """Reads R's XDR serialization: vectors, lists, pairlists, symbols and attributes."""

  def __init__(self, buf: bytes):
    self.buf, self.pos, self.refs = buf, 0, []

  def _int(self) -> int:
    (v,) = struct.unpack_from('>i', self.buf, self.pos)
    self.pos += 4
    return v

  def _bytes(self, n: int) -> bytes:
    out = self.buf[self.pos:self.pos + n]
    self.pos += n
    return out

  def read(self) -> Any:
    if self._bytes(2) != b'X\n':
      raise ValueError('not an XDR R serialization')
    version = self._int()
    self._int(), self._int()  # writer's and minimal reader's R versions
    if version == 3:
      self._bytes(self._int())  # native encoding
    return self._item()

  def _item(self) -> Any:
    flags = self._int()
    kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
    if kind in (254, 242, 241, 253):  # NULL, empty / base / global environment
      return None
    if kind == 255:  # reference to an earlier symbol
      index = flags >> 8 or self._int()
      return self.refs[index - 1]
    if kind == 1:  # symbol: its name
      name = self._item()
      self.refs.append(name)
      return name
    if kind == 9:  # CHARSXP
      n = self._int()
      return None if n == -1 else self._bytes(n).decode('utf-8', 'replace')
    if kind == 2:  # pairlist -> dict of tag: value
      out = {}
      while kind == 2:
        if has_attr:
          self._item()
        tag = self._item() if has_tag else len(out)
        out[tag] = self._item()
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
      if kind != 254:
        raise ValueError(f'unsupported pairlist tail of type {kind}')
      return out
    n = self._int()
    if kind in (10, 13):  # logical, integer
      value = list(struct.unpack_from(f'>{n}i', self.buf, self.pos))
      self.pos += 4 * n
    elif kind == 14:  # double
      value = list(struct.unpack_from(f'>{n}d', self.buf, self.pos))
      self.pos += 8 * n
    elif kind in (16, 19, 20):  # character vector, list, expression
      value = [self._item() for _ in range(n)]
    else:
      raise ValueError(f'unsupported R type {kind}')
    if has_attr:
      attrs = self._item()
      if 'names' in attrs:
        value = dict(zip(attrs['names'], value))
    return value


def read_rds(blob: bytes) -> Any:
  """Unserializes R data (gzip-compressed or plain XDR): vectors become lists, named ones dicts."""
  if blob[:2] == b'\x1f\x8b':
    blob = gzip.decompress(blob)
  return _RReader(blob).read()


def read_lazyload_db(path_without_ext: str) -> dict[str, Any]:
  """All objects of an R lazy-load database (`NAME.rdx` index + `NAME.rdb` zlib blocks)."""
  with open(path_without_ext + '.rdx', 'rb') as f:
    index = read_rds(f.read())
  with open(path_without_ext + '.rdb', 'rb') as f:
    db = f.read()
  out = {}
  for name, (offset, length) in index['variables'].items():
    block = db[offset:offset + length]  # 4-byte big-endian uncompressed size, then a zlib stream
    out[name] = read_rds(zlib.decompress(block[4:]))
  return out


AUSTEN_TITLES = {'emma': 'Emma', 'mansfieldpark': 'Mansfield Park', 'northangerabbey': 'Northanger Abbey',
                  'persuasion': 'Persuasion', 'prideprejudice': 'Pride and Prejudice',
                  'sensesensibility': 'Sense and Sensibility'}
_CHAPTER = re.compile(r'^\s*(CHAPTER|Chapter)\s+[0-9IVXLC]+\.?\s*$')


def austen_documents(root: str) -> list[tuple[str, str]]:
  """(source `austen:BOOK:CHAPTER`, paragraph) pairs from an unpacked `r-cran-janeaustenr`."""
  books = read_lazyload_db(os.path.join(root, 'usr/lib/R/site-library/janeaustenr/data/Rdata'))
  docs = []
  for book in sorted(set(books) & set(AUSTEN_TITLES)):
    chapter, paragraph = 0, []
    for line in books[book] + ['']:
      line = (line or '').strip()
      if _CHAPTER.match(line):
        chapter += 1
      if line and not _CHAPTER.match(line):
        paragraph.append(line)
        continue
      text = ' '.join(' '.join(paragraph).replace('_', '').split())
      if chapter and len(text.split()) >= _MIN_WORDS:  # before chapter 1: title page, contents
        docs.append((f'austen:{book}:{chapter}', text))
      paragraph = []
  return docs


# --- SWORD zText modules. ---

def read_ztext(module_dir: str, testament: str) -> Iterator[tuple[int, list[str]]]:
  """Yields (block number, verse texts in canonical order) for `ot` or `nt` of a zText module.

  `.bzv` has 10-byte entries (block, offset, size: u32 u32 u16 little-endian), one per verse slot of the
  versification (headings and empty slots included); `.bzs` has 12-byte entries (offset, compressed
  size, uncompressed size) locating zlib blocks in `.bzz`. With `BlockType=BOOK` a block is a book.
  """
  path = os.path.join(module_dir, testament)
  with open(path + '.bzs', 'rb') as f:
    blocks = list(struct.iter_unpack('<3I', f.read()))
  with open(path + '.bzv', 'rb') as f:
    verses = list(struct.iter_unpack('<IIH', f.read()))
  with open(path + '.bzz', 'rb') as f:
    data = f.read()
  current, text, out = None, b'', []
  for block, offset, size in verses:
    if size == 0:
      continue
    if block != current:
      if out:
        yield current, out
      start, length, _ = blocks[block]
      current, text, out = block, zlib.decompress(data[start:start + length]), []
    out.append(text[offset:offset + size].decode('utf-8', 'replace'))
  if out:
    yield current, out


_TAG = re.compile(r'<[^>]*>')
_NOTE = re.compile(r'<note\b.*?</note>', re.S)
_TITLE = re.compile(r'<title\b.*?</title>', re.S)


def osis_to_text(osis: str) -> str:
  """Plain words of an OSIS verse: footnotes and headings dropped, tags stripped."""
  text = _TAG.sub('', _TITLE.sub(' ', _NOTE.sub(' ', osis)))  # words are <w> tags: strip, don't split
  return ' '.join(text.replace('&amp;', '&').replace('&lt;', '<').replace('&gt;', '>').split())


def bible_documents(root: str, words_per_text: int = 80) -> list[tuple[str, str]]:
  """(source `bible:TESTAMENT-BOOK`, passage) pairs from an unpacked `sword-text-web`."""
  module = glob.glob(os.path.join(root, 'usr/share/sword/modules/texts/ztext/*'))[0]
  docs = []
  for testament in ('ot', 'nt'):
    for block, verses in read_ztext(module, testament):
      passage = []
      for verse in verses + ['']:
        words = osis_to_text(verse).split()
        passage += words
        if len(passage) >= words_per_text or (not verse and len(passage) >= _MIN_WORDS):
          docs.append((f'bible:{testament}-{block:02d}', ' '.join(passage)))
          passage = []
  return docs


# --- reStructuredText sources of the Python documentation. ---

_ROLE = re.compile(r':[\w:+-]+:`(?:[^`<]*<)?~?!?([^`>]*)>?`')  # :func:`open` / :ref:`text <target>` -> word
_LINK = re.compile(r'`([^`<]+?)\s*<[^>]+>`__?')  # `text <url>`_ -> text
_MARKUP = re.compile(r'``|\*\*|(?<!\w)[*`]|`_{0,2}(?!\w)|\|')


def rst_to_paragraphs(rst: str) -> list[str]:
  """Paragraphs of a reStructuredText source as plain text, one line each.

  Directive lines (`.. note::`) and their options, section underlines and comments are dropped; roles and
  links keep their text; code blocks stay (they are part of the domain's language).
  """
  out, current, in_comment = [], [], False
  for line in rst.splitlines() + ['']:
    stripped = line.strip()
    if stripped.startswith('..'):  # a comment (`.. text`) runs to the next blank line
      in_comment = not re.match(r'\.\. ([\w:-]+::|_|\[|\|)', stripped)
    elif not stripped:
      in_comment = False
    if (in_comment or stripped.startswith('..') or re.fullmatch(r'([=\-~^"\'`#*+<>_.:])\1{2,}', stripped)
        or re.match(r':[\w-]+:( |$)', stripped)):
      stripped = ''
    if stripped:
      current.append(stripped)
      continue
    text = ' '.join(current)
    text = _MARKUP.sub('', _LINK.sub(r'\1', _ROLE.sub(r'\1', text)))
    text = ' '.join(text.replace('::', ':').split())
    if len(text.split()) >= _MIN_WORDS:
      out.append(text)
    current = []
  return out


def python_doc_documents(root: str) -> list[tuple[str, str]]:
  """(source `pydocs:PATH`, paragraph) pairs from an unpacked `python3.11-doc`."""
  base = os.path.join(root, 'usr/share/doc/python3.11/html/_sources')
  docs = []
  for path in sorted(glob.glob(os.path.join(base, '**', '*.rst.txt'), recursive=True)):
    name = os.path.relpath(path, base).removesuffix('.rst.txt')
    if name.startswith('whatsnew/changelog'):  # one giant list of bug-fix entries, not documentation prose
      continue
    with open(path, encoding='utf-8') as f:
      docs.extend((f'pydocs:{name}', p) for p in rst_to_paragraphs(f.read()))
  return docs


READERS = {'austen': austen_documents, 'bible': bible_documents, 'python_docs': python_doc_documents}
