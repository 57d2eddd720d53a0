"""The equal-recipe PyTorch peer's step: transformers `ModernBertForMaskedLM` built from the recipe's model keys
(`configs/tiny.py` through `interop.modernbert.hf_config_from_model`: no copied numbers), `torch.optim.AdamW`
with the recipe's betas, eps, weight decay and clipping, host masking at the recipe's rate (as
`DataCollatorForLanguageModeling`), the head at every position (as `ModernBertForMaskedLM` computes it when
given labels of the whole row... it gathers the masked positions itself with `sparse_prediction`, see
`--sparse`). `--dtype bfloat16` runs under `torch.autocast('cpu', bfloat16)`, `--compile` wraps the model in
`torch.compile`.
"""

import contextlib
import os
import sys
import types

sys.path.insert(0, os.path.dirname(__file__))
import common  # pylint: disable=g-import-not-at-top
import recipe  # pylint: disable=g-import-not-at-top

import torch  # pylint: disable=g-import-not-at-top
import transformers

from mlm_flax.interop import modernbert as interop


def build(config, sparse: bool, attn: str):
  """`ModernBertForMaskedLM` of the recipe's model keys (random init)."""
  tok = types.SimpleNamespace(cls_token_id=common.SPECIALS[2], sep_token_id=common.SPECIALS[3])
  hf = interop.hf_config_from_model(config.model.to_dict(), tok)
  hf.pop('architectures')
  hf_config = transformers.ModernBertConfig(**hf, sparse_prediction=sparse, attn_implementation=attn)
  return transformers.ModernBertForMaskedLM(hf_config).train()


def main() -> None:
  args = common.parse_args()
  config = recipe.load(args.config)
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count())
  model = build(config, args.sparse, args.attn)
  opt = config.optimizer
  optim = torch.optim.AdamW(model.parameters(), lr=opt.learning_rate, betas=(opt.b1, opt.b2), eps=opt.eps,
                            weight_decay=opt.weight_decay)
  forward = torch.compile(model) if args.compile else model
  batches = []
  for i in range(args.warmup + args.steps):
    inputs, labels = common.bert_mask(args, common.token_ids(args, i), i)
    batches.append((torch.from_numpy(inputs).long(), torch.from_numpy(labels)))
  autocast = (torch.autocast('cpu', dtype=torch.bfloat16) if args.dtype == 'bfloat16'
              else contextlib.nullcontext())

  def run(i):
    inputs, labels = batches[i]
    with autocast:
      loss = forward(input_ids=inputs, attention_mask=torch.ones_like(inputs), labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip_norm)
    optim.step()
    optim.zero_grad(set_to_none=True)

  result = common.timed(args, run, lambda: None)
  result.update(devices=1, dtype=args.dtype, framework='torch_modernbert', torch_threads=torch.get_num_threads(),
                compile=args.compile, sparse=args.sparse, attn=args.attn)
  common.report(result)


if __name__ == '__main__':
  main()
