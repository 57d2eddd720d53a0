"""The reference for `mlm-flax answer`: transformers' pipeline("question-answering") of transformers 5.2 (the last
release that ships it), run as `PYTHONPATH=$MLM_FLAX_QA_PIPELINE python tests/qa_pipeline_reference.py` so that
old transformers (and its tokenizers / huggingface_hub) is used whole. Reads {"model": DIR, "calls": [{"inputs",
"kwargs"}]} on stdin, prints the list of the pipeline's results as JSON."""

import json
import os
import sys

sys.modules['kernels'] = None  # transformers 5.2 cannot import the newer `kernels` package; it is optional
os.environ.setdefault('TRANSFORMERS_NO_ADVISORY_WARNINGS', '1')

import transformers  # pylint: disable=g-import-not-at-top


def main() -> None:
  request = json.load(sys.stdin)
  assert transformers.__version__ == '5.2.0', transformers.__file__
  pipe = transformers.pipeline('question-answering', model=request['model'], device='cpu')
  results = []
  for call in request['calls']:
    inputs = call['inputs']
    if isinstance(inputs, list):  # 5.2's __call__ takes keywords only: lists of questions and contexts
      inputs = {'question': [i['question'] for i in inputs], 'context': [i['context'] for i in inputs]}
    results.append(pipe(**inputs, **call['kwargs']))
  json.dump(results, sys.stdout, default=float)


if __name__ == '__main__':
  main()
