"""Hugging Face mapping of BERT, RoBERTa and ELECTRA masked LMs (`BertForMaskedLM`, `RobertaForMaskedLM`,
`ElectraForMaskedLM`: BERT's layers under `electra.`, its embeddings `embedding_size` wide with
`embeddings_project` where that differs from the hidden size, its head `generator_predictions` +
`generator_lm_head`).

Our layer names follow BERT's, so the mapping is one table (`_EMBEDDINGS`, `_LAYER`, `_HEAD`) read in both
directions. Linear weights are transposed (torch stores [out, in]). The MLM decoder is tied to the word
embeddings (only its bias travels) unless the config says `tie_word_embeddings=False`, or the checkpoint's
decoder weight differs from the embeddings (transformers 5 then unties too): then it is our `decoder` param.
Keys we do not use (the pooler, an NSP head, ...) are logged, never silently dropped. `hf.py` dispatches here
on the model type.
"""

import logging
from typing import Any

import ml_collections
import numpy as np

from mlm_flax.interop import check_exportable, read_tensor, tree_get as _get, tree_set as _set
from mlm_flax.models.config import OWN

ARCHITECTURES = {'bert': 'BertForMaskedLM', 'roberta': 'RobertaForMaskedLM', 'electra': 'ElectraForMaskedLM'}
# The switch values the Hugging Face classes have (BERT's own: gelu MLP, LayerNorm, learned positions, post-LN,
# every bias); a model with others trains but does not export.
EXPORTABLE = OWN['bert']

# Task models (`mlm_flax.models.heads`): the Hugging Face class of each head.
TASK_ARCHITECTURES = {t: {'classification': f'{t.title()}ForSequenceClassification',
                          'regression': f'{t.title()}ForSequenceClassification',
                          'token_classification': f'{t.title()}ForTokenClassification',
                          'question_answering': f'{t.title()}ForQuestionAnswering'}
                      for t in ('bert', 'roberta', 'electra')}

_LAYER = {  # ours (under layer_{i}) -> HF (under {prefix}.encoder.layer.{i}.)
    ('query',): 'attention.self.query', ('key',): 'attention.self.key', ('value',): 'attention.self.value',
    ('attention_output',): 'attention.output.dense', ('attention_norm',): 'attention.output.LayerNorm',
    ('intermediate',): 'intermediate.dense', ('output',): 'output.dense', ('output_norm',): 'output.LayerNorm',
}
_EMBEDDINGS = {('word_embeddings',): 'embeddings.word_embeddings', ('position_embeddings',): 'embeddings.position_embeddings',
               ('token_type_embeddings',): 'embeddings.token_type_embeddings', ('embeddings_norm',): 'embeddings.LayerNorm'}
_HEAD = {'bert': {('head_transform',): 'cls.predictions.transform.dense',
                  ('head_norm',): 'cls.predictions.transform.LayerNorm', ('head_bias',): 'cls.predictions.bias'},
         'roberta': {('head_transform',): 'lm_head.dense', ('head_norm',): 'lm_head.layer_norm',
                     ('head_bias',): 'lm_head.bias'},
         'electra': {('head_transform',): 'generator_predictions.dense',
                     ('head_norm',): 'generator_predictions.LayerNorm', ('head_bias',): 'generator_lm_head.bias'}}
_DECODER = {'bert': 'cls.predictions.decoder', 'roberta': 'lm_head.decoder', 'electra': 'generator_lm_head'}
_PROJECT = {('embeddings_project',): 'embeddings_project'}  # ELECTRA's embedding_size -> hidden_size
_BUFFERS = ('embeddings.position_ids', 'embeddings.token_type_ids')  # index buffers some exports carry


def _leaves(ours: tuple, hf: str) -> list[tuple[tuple, str, bool]]:
  """(our path, HF key, transpose?) for one module: bias vector, norm, embedding or dense."""
  if ours[-1] in ('head_bias', 'decoder'):
    return [(ours, hf, False)]
  if ours[-1].endswith('norm'):
    return [(ours + ('scale',), hf + '.weight', False), (ours + ('bias',), hf + '.bias', False)]
  if ours[-1].endswith('_embeddings'):
    return [(ours + ('embedding',), hf + '.weight', False)]
  return [(ours + ('kernel',), hf + '.weight', True), (ours + ('bias',), hf + '.bias', False)]


def key_map(model_type: str, num_layers: int, prefix: str | None = None, tied: bool = True,
            project: bool = False) -> list[tuple[tuple, str, bool]]:
  """Every (our param path, HF state-dict key, transpose?) of a BERT/RoBERTa/ELECTRA masked LM; with
  `tied=False` also the decoder weight ([vocab, embedding width] on both sides); with `project` ELECTRA's
  `embeddings_project`."""
  prefix = model_type if prefix is None else prefix
  dot = f'{prefix}.' if prefix else ''
  out = []
  for ours, hf in (_EMBEDDINGS | _PROJECT if project else _EMBEDDINGS).items():
    out += _leaves(ours, dot + hf)
  for i in range(num_layers):
    for ours, hf in _LAYER.items():
      out += _leaves((f'layer_{i}',) + ours, f'{dot}encoder.layer.{i}.{hf}')
  for ours, hf in _HEAD[model_type].items():
    out += _leaves(ours, hf)
  if not tied:
    out += _leaves(('decoder',), _DECODER[model_type] + '.weight')
  return out


def projects(model: Any) -> bool:
  """Whether the `model` config's embeddings are narrower (or wider) than its hidden states (`embeddings_project`)."""
  width = model.get('embedding_size')
  return width is not None and width != model['hidden_size']


def model_key_map(model: Any, prefix: str | None = None, tied: bool = True) -> list[tuple[tuple, str, bool]]:
  """`key_map` of a `model` config (its type, layers and embeddings projection)."""
  return key_map(model['type'], model['num_layers'], prefix, tied, projects(model))


def encoder_key_map(model: Any) -> list[tuple[tuple, str, bool]]:
  """`key_map` of the encoder alone (a task model's `encoder` params; HF keys with the `bert.`/`roberta.`/
  `electra.` prefix)."""
  return [e for e in model_key_map(model) if not e[0][0].startswith('head')]


def head_key_map(model: Any, task: str, prefix: str | None = None) -> list[tuple[tuple, str, bool]]:
  """(our path under the task head, HF key, transpose?) of a `*ForSequenceClassification` /
  `*ForTokenClassification` / `*ForQuestionAnswering` head; BERT's sequence head includes the encoder's pooler
  (under `prefix`)."""
  model_type = model['type']
  if task == 'question_answering':
    return _leaves(('qa_outputs',), 'qa_outputs')
  if task == 'token_classification':
    return _leaves(('classifier',), 'classifier')
  if model_type == 'bert':
    prefix = model_type if prefix is None else prefix
    pooler = (f'{prefix}.' if prefix else '') + 'pooler.dense'
    return _leaves(('pooler',), pooler) + _leaves(('classifier',), 'classifier')
  return _leaves(('dense',), 'classifier.dense') + _leaves(('out_proj',), 'classifier.out_proj')


def head_config(task: str, classifier_dropout: float, classifier_pooling: str) -> dict:
  """The head's keys of a task model's config.json."""
  del task, classifier_pooling  # cls only
  return {'classifier_dropout': classifier_dropout}


def model_config_from_hf(hf: dict) -> dict:
  """Our `model` config values from a BERT/RoBERTa/ELECTRA config.json."""
  model_type = hf.get('model_type', 'bert')
  act = hf.get('hidden_act', 'gelu')
  if act not in ('gelu', 'gelu_new', 'relu'):
    raise ValueError(f'hidden_act {act!r} is not supported (gelu, gelu_new, relu).')
  if model_type == 'electra' and act != 'gelu':  # its generator head is exact GELU whatever hidden_act says
    raise ValueError(f'hidden_act {act!r}: only ELECTRA checkpoints with hidden_act "gelu" are supported.')
  positions = hf.get('position_embedding_type', 'absolute')
  if positions != 'absolute':
    raise ValueError(f'position_embedding_type {positions!r} is not supported: only absolute position embeddings '
                     'are implemented; use a checkpoint with position_embedding_type "absolute".')
  return dict(type=model_type, num_layers=hf['num_hidden_layers'], hidden_size=hf['hidden_size'],
              num_heads=hf['num_attention_heads'], intermediate_size=hf['intermediate_size'],
              vocab_size=hf['vocab_size'], max_position_embeddings=hf['max_position_embeddings'],
              type_vocab_size=hf.get('type_vocab_size', 2), layer_norm_eps=hf.get('layer_norm_eps', 1e-12),
              hidden_act=act, initializer_range=hf.get('initializer_range', 0.02),
              pad_token_id=hf.get('pad_token_id', 0) or 0,
              hidden_dropout=hf.get('hidden_dropout_prob', 0.1),
              attention_dropout=hf.get('attention_probs_dropout_prob', 0.1), norm_position='post',
              tie_word_embeddings=bool(hf.get('tie_word_embeddings', True)),
              embedding_size=hf['embedding_size'] if model_type == 'electra' else None)


def hf_config_from_model(model: ml_collections.ConfigDict, tok) -> dict:
  """A BERT/RoBERTa/ELECTRA config.json for our `model` config; ValueError (`check_exportable`) for switches
  that `BertForMaskedLM`/`RobertaForMaskedLM`/`ElectraForMaskedLM` cannot represent (pre-LN, a gated MLP,
  RMSNorm, RoPE, no biases; an `embedding_size` other than hidden_size outside ELECTRA; ELECTRA's head is GELU)."""
  check_exportable(model, EXPORTABLE, ARCHITECTURES[model['type']])
  electra = model['type'] == 'electra'
  if projects(model) and not electra:
    raise ValueError(f'cannot export to Hugging Face: {ARCHITECTURES[model["type"]]} has no embeddings_project '
                     f'(model.embedding_size={model["embedding_size"]}, hidden_size={model["hidden_size"]}); export '
                     'it as ELECTRA (model.type=electra) or leave model.embedding_size unset.')
  if electra and model.hidden_act != 'gelu':
    raise ValueError(f'cannot export to Hugging Face: ElectraForMaskedLM\'s head is exact GELU, this model\'s '
                     f'model.hidden_act={model.hidden_act!r}; export needs model.hidden_act=\'gelu\'.')
  max_pos = model.max_position_embeddings
  extra = {'embedding_size': model.get('embedding_size') or model.hidden_size} if electra else {}
  return {**extra, 'architectures': [ARCHITECTURES[model.type]], 'model_type': model.type,
          'vocab_size': model.vocab_size, 'hidden_size': model.hidden_size,
          'num_hidden_layers': model.num_layers, 'num_attention_heads': model.num_heads,
          'intermediate_size': model.intermediate_size, 'hidden_act': model.hidden_act,
          'hidden_dropout_prob': model.hidden_dropout, 'attention_probs_dropout_prob': model.attention_dropout,
          'max_position_embeddings': max_pos, 'type_vocab_size': model.type_vocab_size,
          'initializer_range': model.initializer_range, 'layer_norm_eps': model.layer_norm_eps,
          'pad_token_id': model.pad_token_id, 'bos_token_id': tok.cls_token_id, 'eos_token_id': tok.sep_token_id,
          'tie_word_embeddings': bool(model.get('tie_word_embeddings', True)), 'position_embedding_type': 'absolute'}



def legacy_names_renamed(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Old TF-converted BERT checkpoints name LayerNorm params `gamma`/`beta`: renamed `weight`/`bias`."""
  renamed = {}
  for k, v in state.items():
    module, _, leaf = k.rpartition('.')
    leaf = {'gamma': 'weight', 'beta': 'bias'}.get(leaf, leaf) if module else leaf
    renamed.setdefault(f'{module}.{leaf}' if module else leaf, v)
  return renamed


def prefix_of(state: dict, model_type: str) -> str:
  """'bert.' / 'roberta.' when the encoder keys carry it (a *ForMaskedLM), else '' (an encoder-only export)."""
  return model_type + '.' if any(k.startswith(model_type + '.') for k in state) else ''


def decoder_is_tied(state: dict[str, np.ndarray], model: dict) -> bool:
  """Whether the MLM decoder is the word embeddings: the config's `tie_word_embeddings`, except that a
  checkpoint holding a decoder weight different from its word embeddings is loaded untied, with a warning
  (as transformers 5 loads it: `pipeline("fill-mask")` then scores with that decoder weight)."""
  if not model.get('tie_word_embeddings', True):
    return False
  prefix = prefix_of(state, model['type'])
  embeddings = state.get(f'{prefix}embeddings.word_embeddings.weight')
  decoder = state.get(_DECODER[model['type']] + '.weight')
  if embeddings is None or decoder is None or np.array_equal(np.asarray(embeddings), np.asarray(decoder)):
    return True
  logging.warning('the config says tie_word_embeddings=True but the checkpoint\'s %s.weight differs from its word '
                  'embeddings: loaded untied (as transformers does); set tie_word_embeddings=false in its '
                  'config.json to say so.', _DECODER[model['type']])
  return False


def params_from_state_dict(state: dict[str, np.ndarray], model: dict, init_params: Any) -> tuple[dict, list[str]]:
  """Our params from a HF state dict; missing head params come from `init_params`.

  Accepts keys with or without the `bert.` / `roberta.` prefix (encoder-only exports) and legacy LayerNorm
  `gamma`/`beta` names. Keys it does not use are logged: the pooler in one info line (the MLM has none), any
  other in one warning listing them. Returns the params and the list of our params that were initialised fresh.
  """
  state = legacy_names_renamed(state)
  prefix = prefix_of(state, model['type'])
  tied = model.get('tie_word_embeddings', True)
  decoder = _DECODER[model['type']]
  # The head bias is the decoder's bias, which transformers computes with (tied: the same tensor as
  # `cls.predictions.bias` / `lm_head.bias`; untied: that one is a dead parameter).
  params, fresh, used = {}, [], {_HEAD[model['type']][('head_bias',)]}
  if tied:
    used.add(decoder + '.weight')  # the word embeddings (`decoder_is_tied` checked they are equal)
  for ours, hf, transpose in model_key_map(model, prefix.rstrip('.'), tied):
    if ours == ('head_bias',) and decoder + '.bias' in state:
      hf = decoder + '.bias'
    if hf in state:
      value = read_tensor(state, hf, transpose, np.shape(_get(init_params, ours)))
      used.add(hf)
    elif ours[0].startswith('head') or ours[0] == 'decoder':
      value = np.asarray(_get(init_params, ours))
      fresh.append('/'.join(ours))
    else:
      raise ValueError(f'the checkpoint has no {hf!r}; is it a BERT/RoBERTa model of this config?')
    _set(params, ours, value)
  unused = sorted(k for k in state if k not in used and not k.endswith(_BUFFERS))
  pooler = [k for k in unused if k.startswith(f'{prefix}pooler.')]
  if pooler:
    logging.info('the checkpoint\'s pooler (%s) is not used by the masked LM; not loaded.', ', '.join(pooler))
  others = [k for k in unused if k not in pooler]
  if others:
    logging.warning('%d checkpoint key(s) not used by the %s masked LM, not loaded: %s', len(others),
                    model['type'], ', '.join(others))
  return params, fresh


def state_dict_from_params(params: Any, model: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """A HF `*ForMaskedLM` state dict in f32 (decoder weight: the word embeddings, or our untied `decoder`)."""
  state = {}
  tied = model.get('tie_word_embeddings', True)
  for ours, hf, transpose in model_key_map(model, tied=tied):
    value = np.asarray(_get(params, ours), np.float32)
    state[hf] = np.ascontiguousarray(value.T if transpose else value)
  head = _DECODER[model.type]
  if tied:
    state[f'{head}.weight'] = state[f'{model.type}.embeddings.word_embeddings.weight']
  state[f'{head}.bias'] = state[_HEAD[model.type][('head_bias',)]]
  return state
