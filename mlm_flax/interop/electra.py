"""Hugging Face interop of ELECTRA runs (`objectives/electra.py`): the discriminator as `ElectraForPreTraining`,
the generator as `ElectraForMaskedLM`, and back.

`export_electra` writes `OUT` (the discriminator; `embedding_size` = its embedding width) and `OUT/generator`
(the generator: hidden size its own width, `embedding_size` the discriminator's, with `embeddings_project`);
both hold the shared embeddings, the same tensors. `import_electra` reads such a pair (ours, or Google's
`electra-*-discriminator` / `-generator` placed so) into (model config, objective config, params). The layers
map as BERT's (`bert.py`, model type 'electra'); BERT-style architectures with BERT's own switches only (RoBERTa's
position offset and the ablation switches have no ELECTRA equivalent: refused naming why, before anything is
written). `load_hf` reads `OUT/generator` as a masked LM (fill-mask) and `load_encoder` `OUT` as an encoder.
"""

import dataclasses
import os
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from mlm_flax.interop import bert, hf, read_tensor, tree_get, tree_set
from mlm_flax.models import ARCHITECTURES, ModelConfig, make_model
from mlm_flax.objectives import electra

DISCRIMINATOR = 'ElectraForPreTraining'
GENERATOR_DIR = 'generator'  # the generator's folder inside the discriminator's
_HEAD = {('dense',): 'discriminator_predictions.dense',
         ('dense_prediction',): 'discriminator_predictions.dense_prediction'}


def _electra_model(model_cfg: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """`model_cfg` (every key, defaults filled in) as an ELECTRA `model` config, or ValueError naming why it has no
  ELECTRA equivalent."""
  model = dataclasses.asdict(ModelConfig.from_dict(model_cfg))
  if ARCHITECTURES[model['type']] != 'bert':
    raise ValueError(f'cannot export to Hugging Face ELECTRA: transformers\' ELECTRA is a BERT-style encoder, this '
                     f'discriminator is model.type={model["type"]!r}; fine-tune it (finetune --init WORKDIR) or use '
                     'its generator (fill-mask) here, or pretrain with model.type=bert to export.')
  if model['type'] == 'roberta':
    raise ValueError('cannot export to Hugging Face ELECTRA: model.type=roberta numbers positions after the '
                     'padding index, ELECTRA from 0; pretrain with model.type=bert (or electra) to export.')
  return ml_collections.ConfigDict(dict(model, type='electra'))


def _disc_key_map(model: Mapping[str, Any]) -> list[tuple[tuple, str, bool]]:
  """(our path under the discriminator's params, HF key, transpose?) of an `ElectraForPreTraining`."""
  out = [(('encoder',) + ours, key, transpose) for ours, key, transpose in bert.encoder_key_map(model)]
  for ours, key in _HEAD.items():
    out += [(('head',) + ours + (leaf,), f'{key}.{name}', leaf == 'kernel')
            for leaf, name in (('kernel', 'weight'), ('bias', 'bias'))]
  return out


def _disc_folder(params: Any, model: ml_collections.ConfigDict, tok: Any) -> tuple[dict, dict[str, np.ndarray]]:
  config = bert.hf_config_from_model(model, tok)
  config['architectures'] = [DISCRIMINATOR]
  state = {}
  for ours, key, transpose in _disc_key_map(model):
    value = np.asarray(tree_get(params['discriminator'], ours), np.float32)
    state[key] = np.ascontiguousarray(value.T if transpose else value)
  return config, state


def _gen_folder(params: Any, gen: ml_collections.ConfigDict, tok: Any) -> tuple[dict, dict[str, np.ndarray]]:
  config = bert.hf_config_from_model(gen, tok)
  state = bert.state_dict_from_params(electra.generator_params(params), gen)
  if gen.get('tie_word_embeddings', True):  # rebuilt from the word embeddings on load, as `hf.export` does
    del state[bert._DECODER['electra'] + '.weight']  # pylint: disable=protected-access
  return config, state


def export_electra(params: Any, model_cfg: Mapping[str, Any], objective: Mapping[str, Any] | None, tok: Any,
                   out_dir: str) -> None:
  """Writes `out_dir` (the discriminator, `ElectraForPreTraining`) and `out_dir/generator` (`ElectraForMaskedLM`),
  each with config.json, model.safetensors and the tokenizer, loadable with `transformers.AutoModelForPreTraining`
  / `AutoModelForMaskedLM` and `pipeline('fill-mask')`. `params`: `electra.init_params`' layout; `model_cfg` the
  discriminator's `model` config; `objective` the `objective` config (generator size). Both folders are built
  (and anything unexportable refused, ValueError) before either is written."""
  model = _electra_model(model_cfg)
  gen = ml_collections.ConfigDict(electra.generator_model_config(model, objective))
  folders = [(out_dir, *_disc_folder(params, model, tok)), (os.path.join(out_dir, GENERATOR_DIR),
                                                            *_gen_folder(params, gen, tok))]
  max_length = model.max_position_embeddings
  for path, config, state in folders:
    hf._write_folder(path, config, state, tok, max_length)  # pylint: disable=protected-access


def _model_config(hf_config: dict) -> dict:
  """Our whole `model` config (defaults for what config.json does not say) of an ELECTRA config.json;
  `embedding_size` None where it is the hidden size."""
  from mlm_flax.configs import default  # pylint: disable=g-import-not-at-top
  model = default.get_config().model.to_dict()
  model.update(bert.model_config_from_hf(dict(hf_config, model_type='electra')), dtype='float32')
  if model['embedding_size'] == model['hidden_size']:
    model['embedding_size'] = None
  return model


def _objective(model: dict, gen: dict) -> dict:
  """The `objective` config whose `generator_model_config` of `model` is `gen`'s sizes; ValueError if none is."""
  objective = {'type': 'electra', 'generator_hidden_fraction': gen['hidden_size'] / model['hidden_size'],
               'generator_layers_fraction': gen['num_layers'] / model['num_layers'],
               'disc_weight': electra.DEFAULTS['disc_weight']}
  derived = electra.generator_model_config(model, objective)
  sizes = ('hidden_size', 'num_heads', 'intermediate_size', 'num_layers', 'embedding_size', 'vocab_size')
  differ = [f'{k} {gen[k]} (derived {derived[k]})' for k in sizes if (gen[k] or gen['hidden_size']) != derived[k]]
  if differ:
    raise ValueError(f'the generator is not one that objective.generator_hidden_fraction / '
                     f'generator_layers_fraction describe: {", ".join(differ)}.')
  return objective


def _read_disc(path: str, model: dict) -> dict:
  state = bert.legacy_names_renamed(hf.read_state_dict(path))
  shapes = jax.eval_shape(lambda: electra.init_params(jax.random.PRNGKey(0), model, None, 8)['discriminator'])
  params = {}
  for ours, key, transpose in _disc_key_map(model):
    if key not in state:
      raise ValueError(f'{path} has no {key!r}; is it an ElectraForPreTraining of its config.json?')
    tree_set(params, ours, read_tensor(state, key, transpose, tree_get(shapes, ours).shape))
  return params


def _read_gen(path: str, gen: dict) -> dict:
  state = bert.legacy_names_renamed(hf.read_state_dict(path))
  gen = dict(gen, tie_word_embeddings=bert.decoder_is_tied(state, gen))
  shapes = jax.eval_shape(lambda: make_model(gen).init(jax.random.PRNGKey(0), *[np.ones((1, 8), np.int32)] * 2))
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes['params'])
  params, fresh = bert.params_from_state_dict(state, gen, zeros)
  if fresh:
    raise ValueError(f'{path} has no generator head ({", ".join(fresh)}); is it an ElectraForMaskedLM?')
  return params


def import_electra(hf_dir: str) -> tuple[dict, dict, dict]:
  """(model config, objective config, params) of an ELECTRA pair: `hf_dir` an `ElectraForPreTraining` folder
  holding the `ElectraForMaskedLM` generator in `hf_dir/generator` (`export_electra`'s layout). ValueError when
  the generator's embeddings are not the discriminator's (ELECTRA here shares them) or its sizes are not a
  fraction of the discriminator's that `objective` can say."""
  gen_dir = os.path.join(hf_dir, GENERATOR_DIR)
  model = _model_config(hf.read_hf_config(hf_dir))
  gen_model = _model_config(hf.read_hf_config(gen_dir))
  objective = _objective(model, gen_model)
  model['tie_word_embeddings'] = gen_model['tie_word_embeddings']
  disc = _read_disc(hf_dir, model)
  gen = _read_gen(gen_dir, dict(gen_model, embedding_size=gen_model['embedding_size'] or gen_model['hidden_size']))
  for k in electra.SHARED:
    if k in gen and not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(gen[k]),
                                                              jax.tree.leaves(disc['encoder'][k]))):
      raise ValueError(f'the generator\'s {k} differ from the discriminator\'s; ELECTRA here shares the embeddings.')
  return model, objective, {'generator': {k: v for k, v in gen.items() if k not in electra.SHARED},
                            'discriminator': disc}


def is_pair(path: str) -> bool:
  """Whether `path` is an ELECTRA discriminator folder holding its generator (`export_electra`'s layout)."""
  return (hf.is_hf_folder(path) and hf.read_hf_config(path).get('model_type') == 'electra'
          and hf.is_hf_folder(os.path.join(path, GENERATOR_DIR)))


def import_to_workdir(hf_dir: str, workdir: str) -> dict:
  """`mlm-flax import` of an ELECTRA pair: a workdir with `objective.type=electra` whose `train` continues
  ELECTRA pretraining from the imported generator and discriminator (fresh optimizer)."""
  from mlm_flax.configs import default  # pylint: disable=g-import-not-at-top
  from mlm_flax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  hf.check_new_workdir(workdir)
  model_cfg, objective_cfg, params = import_electra(hf_dir)
  config = default.get_config().to_dict()
  config.update(model=model_cfg, objective=objective_cfg)
  return hf.write_imported(workdir, ml_collections.ConfigDict(config), params, tokenizer_lib.load_tokenizer(hf_dir))
