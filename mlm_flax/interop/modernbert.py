"""Hugging Face interop for ModernBERT: `ModernBertForMaskedLM` checkpoints and configs in and out.

`hf.py` dispatches here on the model type. The key map is one list of (our param path, HF key, transpose?) read in both
directions; biases appear only where the config's switches say so. The decoder weight is tied to the token
embeddings on both sides, so only its bias travels. Configs convert both ways in the legacy Hub format
(`global_attn_every_n_layers`, `global_rope_theta`, `local_rope_theta`) and transformers 5's (`layer_types`,
`rope_parameters`); exports carry both, so old and new transformers read them alike.
"""

from typing import Any, Mapping

import numpy as np

from mlm_flax.interop import check_exportable, read_tensor, tree_get as _get, tree_set as _set
from mlm_flax.models import modernbert

ARCHITECTURE = 'ModernBertForMaskedLM'
# The switch values `ModernBertForMaskedLM` has (its biases are its own switches); others train but do not export.
EXPORTABLE = {'mlp': 'geglu', 'norm': 'layernorm'}

# Task models (`mlm_flax.models.heads`): the Hugging Face class of each head.
TASK_ARCHITECTURES = {'modernbert': {'classification': 'ModernBertForSequenceClassification',
                                     'regression': 'ModernBertForSequenceClassification',
                                     'token_classification': 'ModernBertForTokenClassification',
                                     'question_answering': 'ModernBertForQuestionAnswering'}}
_ACTIVATIONS = ('gelu', 'gelu_new', 'gelu_pytorch_tanh', 'relu', 'silu')
_THETAS = {'full_attention': ('global_rope_theta', 160_000.0), 'sliding_attention': ('local_rope_theta', 10_000.0)}


def key_map(model: Mapping[str, Any], prefix: str = 'model') -> list[tuple[tuple, str, bool]]:
  """Every (our param path, HF state-dict key, transpose?) of a `ModernBertForMaskedLM` of this config."""
  dot = f'{prefix}.' if prefix else ''
  norm_bias = modernbert.option(model, 'norm_bias')

  def dense(ours: tuple, hf: str, bias: bool) -> list:
    return [(ours + ('kernel',), hf + '.weight', True)] + ([(ours + ('bias',), hf + '.bias', False)] if bias else [])

  def norm(ours: tuple, hf: str) -> list:
    bias = [(ours + ('bias',), hf + '.bias', False)] if norm_bias else []
    return [(ours + ('scale',), hf + '.weight', False)] + bias

  attn_bias, mlp_bias = modernbert.option(model, 'attention_bias'), modernbert.option(model, 'mlp_bias')
  out = [(('word_embeddings', 'embedding'), dot + 'embeddings.tok_embeddings.weight', False)]
  out += norm(('embeddings_norm',), dot + 'embeddings.norm')
  for i in range(model['num_layers']):
    ours, hf = f'layer_{i}', f'{dot}layers.{i}.'
    if i:  # layer 0 has no attention norm
      out += norm((ours, 'attention_norm'), hf + 'attn_norm')
    out += dense((ours, 'qkv'), hf + 'attn.Wqkv', attn_bias)
    out += dense((ours, 'attention_output'), hf + 'attn.Wo', attn_bias)
    out += norm((ours, 'output_norm'), hf + 'mlp_norm')
    out += dense((ours, 'intermediate'), hf + 'mlp.Wi', mlp_bias)
    out += dense((ours, 'output'), hf + 'mlp.Wo', mlp_bias)
  out += norm(('final_norm',), dot + 'final_norm')
  out += dense(('head_transform',), 'head.dense', modernbert.option(model, 'classifier_bias'))
  out += norm(('head_norm',), 'head.norm')
  if modernbert.option(model, 'decoder_bias'):
    out.append((('head_bias',), 'decoder.bias', False))
  return out


def encoder_key_map(model: Mapping[str, Any]) -> list[tuple[tuple, str, bool]]:
  """`key_map` of the encoder alone (a task model's `encoder` params; HF keys with the `model.` prefix)."""
  return [e for e in key_map(model) if not e[0][0].startswith('head')]


def head_key_map(model: Mapping[str, Any], task: str, prefix: str | None = None) -> list[tuple[tuple, str, bool]]:
  """(our path under the task head, HF key, transpose?) of a `ModernBertFor{Sequence,Token}Classification` /
  `ModernBertForQuestionAnswering` head: `head.dense`, `head.norm` (the MLM checkpoint's prediction head has the
  same keys) and `classifier`."""
  del task, prefix  # the same head for every task, outside the encoder's prefix
  out = [(('dense', 'kernel'), 'head.dense.weight', True)]
  if modernbert.option(model, 'classifier_bias'):
    out.append((('dense', 'bias'), 'head.dense.bias', False))
  out.append((('norm', 'scale'), 'head.norm.weight', False))
  if modernbert.option(model, 'norm_bias'):
    out.append((('norm', 'bias'), 'head.norm.bias', False))
  return out + [(('classifier', 'kernel'), 'classifier.weight', True),
                (('classifier', 'bias'), 'classifier.bias', False)]


def head_config(task: str, classifier_dropout: float, classifier_pooling: str) -> dict:
  """The head's keys of a task model's config.json."""
  del task
  return {'classifier_dropout': classifier_dropout, 'classifier_pooling': classifier_pooling}


def _periodic(num_layers: int, every: int) -> list[str]:
  return ['sliding_attention' if i % every else 'full_attention' for i in range(num_layers)]


def model_config_from_hf(hf: dict) -> dict:
  """Our `model` config values from a ModernBERT config.json (legacy or transformers 5 keys).

  Missing keys take `ModernBertConfig`'s defaults. `embedding_dropout` and `mlp_dropout` share our
  `hidden_dropout` (`mlp_dropout`'s value is taken).
  """
  act = hf.get('hidden_activation', 'gelu')
  if act not in _ACTIVATIONS:
    raise ValueError(f'hidden_activation {act!r} is not supported ({", ".join(_ACTIVATIONS)}).')
  if hf.get('classifier_activation', 'gelu') != act:
    raise ValueError(f'classifier_activation {hf.get("classifier_activation", "gelu")!r} differs from '
                     f'hidden_activation {act!r}; mlm_flax uses one activation for the MLP and the head.')
  if hf.get('tie_word_embeddings', True) is False:
    raise ValueError('tie_word_embeddings is false; mlm_flax ties the MLM decoder to the token embeddings.')
  if hf.get('rope_scaling'):
    raise ValueError(f'rope_scaling {hf["rope_scaling"]!r} is not supported (only default RoPE).')
  num_layers = hf.get('num_hidden_layers', 22)
  every = hf.get('global_attn_every_n_layers', 3)
  types = list(hf.get('layer_types') or _periodic(num_layers, every))
  rope = hf.get('rope_parameters') or {}
  thetas = {}
  for kind, (legacy, default) in _THETAS.items():
    params = rope.get(kind) or {}
    rope_type = params.get('rope_type', params.get('type', 'default'))
    if rope_type != 'default':
      raise ValueError(f'rope_parameters[{kind!r}] has rope_type {rope_type!r}; only default RoPE is supported.')
    thetas[legacy] = float(params.get('rope_theta', hf.get(legacy, default)))
  pad = hf.get('pad_token_id', 50283)
  return dict(type='modernbert', num_layers=num_layers, hidden_size=hf.get('hidden_size', 768),
              num_heads=hf.get('num_attention_heads', 12), intermediate_size=hf.get('intermediate_size', 1152),
              vocab_size=hf.get('vocab_size', 50368), max_position_embeddings=hf.get('max_position_embeddings', 8192),
              layer_norm_eps=hf.get('norm_eps', 1e-5), hidden_act=act,
              initializer_range=hf.get('initializer_range', 0.02), pad_token_id=0 if pad is None else pad,
              hidden_dropout=float(hf.get('mlp_dropout', 0.0)),
              attention_dropout=float(hf.get('attention_dropout', 0.0)),
              layer_types='' if types == _periodic(num_layers, every) else ','.join(types),
              global_attn_every_n_layers=every, local_attention=hf.get('local_attention', 128), **thetas,
              **{key: bool(hf.get(key, default)) for key, default in modernbert.BIAS_DEFAULTS.items()})


def hf_config_from_model(model: Mapping[str, Any], tok) -> dict:
  """A `ModernBertForMaskedLM` config.json for our `model` config (both the legacy and the v5 keys); ValueError
  (`check_exportable`) for an MLP or norm it cannot represent."""
  check_exportable(model, EXPORTABLE, ARCHITECTURE)
  if model.get('embedding_size') not in (None, model['hidden_size']):
    raise ValueError(f'cannot export to Hugging Face: ModernBERT\'s embeddings are hidden_size wide, this model\'s '
                     f'model.embedding_size={model["embedding_size"]} (hidden_size={model["hidden_size"]}) has an '
                     'embeddings projection ModernBertForMaskedLM lacks; export needs model.embedding_size unset.')
  types = list(modernbert.layer_types(model))
  every = model['global_attn_every_n_layers']
  config = {'architectures': [ARCHITECTURE], 'model_type': 'modernbert', 'vocab_size': model['vocab_size'],
            'hidden_size': model['hidden_size'], 'intermediate_size': model['intermediate_size'],
            'num_hidden_layers': model['num_layers'], 'num_attention_heads': model['num_heads'],
            'hidden_activation': model['hidden_act'], 'classifier_activation': model['hidden_act'],
            'max_position_embeddings': model['max_position_embeddings'],
            'initializer_range': model['initializer_range'], 'norm_eps': model['layer_norm_eps'],
            'embedding_dropout': model['hidden_dropout'], 'mlp_dropout': model['hidden_dropout'],
            'attention_dropout': model['attention_dropout'], 'local_attention': model['local_attention'],
            'layer_types': types,
            'rope_parameters': {kind: {'rope_type': 'default', 'rope_theta': float(model[legacy])}
                                for kind, (legacy, _) in _THETAS.items()},
            'global_rope_theta': float(model['global_rope_theta']),
            'local_rope_theta': float(model['local_rope_theta']),
            'pad_token_id': model['pad_token_id'], 'bos_token_id': tok.cls_token_id, 'eos_token_id': tok.sep_token_id,
            'cls_token_id': tok.cls_token_id, 'sep_token_id': tok.sep_token_id, 'tie_word_embeddings': True}
  if types == _periodic(model['num_layers'], every):  # older transformers read only this
    config['global_attn_every_n_layers'] = every
  config.update({key: modernbert.option(model, key) for key in modernbert.BIAS_DEFAULTS})
  return config



def params_from_state_dict(state: Mapping[str, np.ndarray], model: Mapping[str, Any],
                           init_params: Any) -> tuple[dict, list[str]]:
  """Our params from a ModernBERT state dict (with or without the `model.` prefix of `*ForMaskedLM`).

  A missing MLM head (an encoder-only `ModernBertModel`) comes from `init_params`; returns the params and
  the list of our params initialised fresh. An encoder weight the config does not use is an error (a bias
  switch that differs from the checkpoint would otherwise drop it silently).
  """
  prefix = 'model' if any(k.startswith('model.') for k in state) else ''
  params, fresh, used = {}, [], set()
  for ours, hf, transpose in key_map(model, prefix):
    if hf in state:
      value = read_tensor(state, hf, transpose, np.shape(_get(init_params, ours)))
      used.add(hf)
    elif ours[0].startswith('head'):
      value = np.asarray(_get(init_params, ours))
      fresh.append('/'.join(ours))
    else:
      raise ValueError(f'the checkpoint has no {hf!r}; is it a ModernBERT model of this config (bias switches: '
                       f'{", ".join(f"{k}={modernbert.option(model, k)}" for k in modernbert.BIAS_DEFAULTS)})?')
    _set(params, ours, value)
  encoder = f'{prefix}.' if prefix else ('embeddings.', 'layers.', 'final_norm.')
  unused = sorted(k for k in state if k not in used and k.startswith(encoder))
  if unused:
    raise ValueError(f'the checkpoint has {unused[0]!r} ({len(unused)} unused encoder weights) that this config does '
                     'not use; set the matching bias switch (attention_bias, mlp_bias, norm_bias) in its config.json.')
  return params, fresh


def decoder_is_tied(state: Mapping[str, np.ndarray], model: Mapping[str, Any]) -> bool:
  """True, after checking that a `decoder.weight` in the checkpoint is the token embeddings (an untied
  ModernBERT decoder is not supported: it would be dropped silently)."""
  prefix = 'model.' if any(k.startswith('model.') for k in state) else ''
  embeddings, decoder = state.get(prefix + 'embeddings.tok_embeddings.weight'), state.get('decoder.weight')
  if not model.get('tie_word_embeddings', True) or (
      embeddings is not None and decoder is not None and not np.array_equal(embeddings, decoder)):
    raise ValueError('the checkpoint\'s decoder.weight differs from its token embeddings (untied); mlm_flax ties '
                     'the ModernBERT decoder to the token embeddings, so it cannot load this checkpoint exactly.')
  return True


def state_dict_from_params(params: Any, model: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """A `ModernBertForMaskedLM` state dict (`decoder.weight` tied to the token embeddings)."""
  state = {}
  for ours, hf, transpose in key_map(model):
    value = np.asarray(_get(params, ours), np.float32)
    state[hf] = np.ascontiguousarray(value.T if transpose else value)
  state['decoder.weight'] = state['model.embeddings.tok_embeddings.weight']
  return state
