"""The equal-recipe PyTorch peer's step: transformers `ModernBertForMaskedLM` built from the recipe's model keys
(`configs/tiny.py` through `interop.modernbert.hf_config_from_model`: no copied numbers), `torch.optim.AdamW`
with the recipe's betas, eps, weight decay and clipping, host masking at the recipe's rate (as
`DataCollatorForLanguageModeling`), the head at every position (`--sparse`: only at the masked positions, the
model's `sparse_prediction`). `--dtype bfloat16` runs under `torch.autocast('cpu', bfloat16)`, `--compile` wraps the model in
`torch.compile`.
"""

import os
import sys
import types

sys.path.insert(0, os.path.dirname(__file__))
import common  # pylint: disable=g-import-not-at-top
import recipe  # pylint: disable=g-import-not-at-top
import torch_step  # pylint: disable=g-import-not-at-top

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
  run = torch_step.make_run(args, model, forward, optim, opt.grad_clip_norm)
  result = common.timed(args, run, lambda: None)
  result.update(devices=1, dtype=args.dtype, framework='torch_modernbert', torch_threads=torch.get_num_threads(),
                compile=args.compile, sparse=args.sparse, attn=args.attn)
  common.report(result)


if __name__ == '__main__':
  main()
