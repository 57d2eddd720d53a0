"""PyTorch transformers `BertForMaskedLM` + `torch.optim.AdamW`, fp32 or bf16 autocast.

Masks come from a host collator as in the Hugging Face PyTorch recipe (prepared before timing: a
DataLoader would prepare them in worker processes); the head runs at every position, as it does there.
"""

import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import common  # pylint: disable=g-import-not-at-top

import torch  # pylint: disable=g-import-not-at-top
import transformers


def make_run(args, model, forward, opt, clip_norm: float):
  """run(i): one step on batch i (host-masked as HF collators do, prepared before timing), autocast in bf16."""
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
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
  return run


def main() -> None:
  args = common.parse_args()
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count())
  config = transformers.BertConfig(vocab_size=args.vocab, num_hidden_layers=args.layers, hidden_size=args.hidden,
                                   num_attention_heads=args.heads, intermediate_size=args.ffn,
                                   max_position_embeddings=max(512, args.seq))
  model = transformers.BertForMaskedLM(config).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
  run = make_run(args, model, model, opt, 1.0)
  result = common.timed(args, run, lambda: None)
  result.update(devices=1, dtype=args.dtype, framework='torch', torch_threads=torch.get_num_threads())
  common.report(result)


if __name__ == '__main__':
  main()
