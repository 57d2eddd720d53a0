"""A small real SQuAD-format question-answering set from the Python standard library's signatures and docstrings.

  python experiments/qa/make_dataset.py [--out experiments/qa/data]

Each context is one function or method: `name(signature)` then its docstring's first paragraphs (at most ~600
characters, cut at a paragraph end). Three kinds of question, each answered by an exact span of the context:
- "What does NAME return?": the phrase after "Return"/"Returns" in the docstring's first such sentence (2-20
  words; the model must find the sentence and where the phrase ends);
- "What is the default value of PARAM in NAME?": the default written in the signature (not None; the model must
  find PARAM among the parameters);
- "Which exception does NAME raise?": every exception the docstring says it raises ("raise(s) XError" /
  "XError is raised"), each a gold answer.
Split by module (a stable hash of the module's name), so train and test contexts come from different modules.
Deterministic for a Python version (its stdlib); writes OUT/{train,test}.jsonl (`id`, `title` = module,
`question`, `context`, `answers` = {`text`, `answer_start`}) and prints the counts.
"""

import argparse
import importlib
import inspect
import json
import os
import re
import sys
import warnings
import zlib

MODULES = (
    'abc argparse ast base64 binascii bisect bz2 calendar cmd codecs collections colorsys concurrent.futures '
    'configparser contextlib copy csv dataclasses datetime decimal difflib dis doctest email.utils enum filecmp '
    'fnmatch fractions ftplib functools getopt gettext glob graphlib gzip hashlib heapq hmac html html.parser '
    'http.client http.cookies imaplib inspect io ipaddress itertools json linecache locale logging lzma mailbox '
    'mimetypes netrc numbers operator optparse os pathlib pickle pickletools platform plistlib poplib pprint '
    'profile pstats queue quopri random re reprlib sched secrets selectors shelve shlex shutil smtplib socket '
    'sqlite3 ssl statistics string stringprep struct subprocess sysconfig tabnanny tarfile tempfile textwrap '
    'threading timeit tokenize tomllib trace traceback types typing unittest.case urllib.parse urllib.request uuid '
    'warnings wave weakref xml.dom.minidom xml.etree.ElementTree zipfile zoneinfo').split()
TEST_EVERY = 3  # modules whose stable hash is 0 mod 3 are held out
_RETURN = re.compile(r'(?:^|(?<=[.\n] )|(?<=\n))Returns? (?!the result\b)([^.;:\n]+(?:\n[^.;:\n]+)?)[.;:]', re.M)
_RAISE = re.compile(r'\b(?:[Rr]aises?|[Tt]hrows?) (?:an? )?([A-Z]\w*(?:Error|Exception|Warning|Exit))\b|'
                    r'\b([A-Z]\w*(?:Error|Exception))\b is raised')


def _functions(module_name: str):
  """(qualified name, function) of the module's own public functions and methods of its public classes."""
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    module = importlib.import_module(module_name)
  for name, obj in sorted(vars(module).items()):
    if name.startswith('_') or getattr(obj, '__module__', None) != module.__name__:
      continue
    if inspect.isfunction(obj):
      yield name, obj
    elif inspect.isclass(obj):
      for attr, member in sorted(vars(obj).items()):
        if not attr.startswith('_') and inspect.isfunction(member):
          yield f'{name}.{attr}', member


def _context(name: str, func) -> str | None:
  doc = inspect.getdoc(func)
  try:
    signature = str(inspect.signature(func))
  except (TypeError, ValueError):
    return None
  if not doc or len(doc) < 40:
    return None
  text = ''
  for paragraph in doc.split('\n\n'):
    if text and len(text) + len(paragraph) > 600:
      break
    text += ('\n\n' if text else '') + paragraph
  return f'{name}{signature}\n\n{text[:900]}'


def _questions(name: str, func, context: str) -> list[tuple[str, list[str], list[int]]]:
  """(question, answer texts, answer starts) of one context."""
  short = name.split('.')[-1]
  out = []
  match = _RETURN.search(context)
  if match and 2 <= len(match.group(1).split()) <= 20:
    out.append((f'What does {short} return?', [match.group(1)], [match.start(1)]))
  signature = inspect.signature(func)
  for param in list(signature.parameters.values())[:6]:
    if param.default is inspect.Parameter.empty or param.default is None:
      continue
    written = f'{param.name}={param.default!r}'
    at = context.find(written)
    if at >= 0 and len(repr(param.default)) <= 40 and context.count(f'{param.name}=') == 1:
      out.append((f'What is the default value of {param.name} in {short}?', [repr(param.default)],
                  [at + len(param.name) + 1]))
  raised = [(m.group(1) or m.group(2), m.start(1) if m.group(1) else m.start(2)) for m in _RAISE.finditer(context)]
  if raised:
    texts, starts = [], []
    for text, start in raised:
      if text not in texts:
        texts.append(text)
        starts.append(start)
    out.append((f'Which exception does {short} raise?', texts, starts))
  return out


def build() -> dict[str, list[dict]]:
  """{'train', 'test'}: the SQuAD-format rows, split by module."""
  splits, seen = {'train': [], 'test': []}, set()
  for module_name in MODULES:
    split = 'test' if zlib.crc32(module_name.encode()) % TEST_EVERY == 0 else 'train'
    for name, func in _functions(module_name):
      context = _context(name, func)
      if context is None or context in seen:
        continue
      seen.add(context)
      for k, (question, texts, starts) in enumerate(_questions(name, func, context)):
        assert all(context[s:s + len(t)] == t for t, s in zip(texts, starts)), (name, texts)
        splits[split].append({'id': f'{module_name}.{name}/{k}', 'title': module_name, 'question': question,
                              'context': context, 'answers': {'text': texts, 'answer_start': starts}})
  return splits


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data'))
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  for split, rows in build().items():
    with open(os.path.join(args.out, f'{split}.jsonl'), 'w', encoding='utf-8') as f:
      f.writelines(json.dumps(r) + '\n' for r in rows)
    kinds = {q: sum(r['question'].startswith(q) for r in rows) for q in ('What does', 'What is the default', 'Which')}
    print(f'{split}: {len(rows)} questions, {len({r["context"] for r in rows})} contexts, '
          f'{len({r["title"] for r in rows})} modules; {kinds}')
  print(f'Python {sys.version.split()[0]}')


if __name__ == '__main__':
  main()
