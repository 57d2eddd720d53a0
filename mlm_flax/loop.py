"""The one training loop, for every kind of run (MLM or ELECTRA pretraining, fine-tuning).

A run's set-up (`train.py`, `finetune.py`) builds a `Run`: its state, jitted step, batches, evaluation and the
summary of its metrics. `run_loop` does the rest once: the steps (one queued behind the running one on
accelerators, none on CPU: `parallel.steps_queued`; the bar and ETA follow real progress, metrics leave the device
only at log time), the log / eval / checkpoint cadences, tokens/s and MFU, the non-finite policy
(`optimizer.nonfinite`), preemption (SIGTERM/SIGINT save and return), HParams, and checkpoints whose metadata
holds the metrics of the steps since the last log, so a resumed run logs exactly what an uninterrupted one does.
"""

import dataclasses
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

from mlm_flax import checkpoint, parallel, preemption, writers


@dataclasses.dataclass
class Run:
  """What a kind of run supplies to `run_loop`."""
  state: Any  # has .params; checkpointed whole
  start_step: int
  num_steps: int
  step: Callable[[Any, Any], tuple[Any, dict]]  # jitted (state, global batch) -> (state, summed metrics)
  batches: Iterator[tuple[Any, Any]]  # (global batch, data position) per step
  summarize: Callable[[dict], dict]  # summed train metrics -> the train row (loss, accuracy, ...)
  evaluate: Callable[[Any], dict]  # params -> eval metrics
  schedule: optax.Schedule
  writer: writers.MetricWriter
  ckpt: checkpoint.Checkpointer
  log_every: int
  eval_every: int
  checkpoint_every: int
  nonfinite: str  # 'skip' or 'stop'
  tokens_per_step: Callable[[int], int]  # tokens the 0-based step trains on (sequence-length warm-ups vary it)
  progress_bar: bool = True
  hparams: dict | None = None  # the config, written with the final evaluation as TensorBoard HParams
  pending: list[dict] = dataclasses.field(default_factory=list)  # a resumed run's steps since its last log
  flops_per_token: float = 0.0  # with peak_flops: MFU in the train rows
  peak_flops: float = 0.0
  on_eval: Callable[[int, Any, dict], None] = lambda step, params, result: None  # after each eval is written
  checkpoint_meta: Callable[[Any], dict] = lambda data_position: {}  # saved beside the loop's own
  after_save: Callable[[], None] = lambda: None
  row_extras: Callable[[int], dict] = lambda step: {}  # more train-row keys (fine-tuning: epoch)


@dataclasses.dataclass
class Outcome:
  state: Any
  step: int
  result: dict | None  # the last evaluation
  preempted: bool = False


def check_finite(metrics: dict, step: int, mode: str) -> None:
  """With optimizer.nonfinite='stop': raises at the first step that was skipped (one host sync)."""
  if mode == 'stop' and float(metrics['skipped_steps']):
    raise FloatingPointError(
        f'non-finite loss or gradient at step {step}; stopped (optimizer.nonfinite=stop) without applying '
        'it, and the last checkpoint is untouched. Lower optimizer.learning_rate, set '
        'optimizer.grad_clip_norm, or use optimizer.nonfinite=skip.')


def pending_to_meta(pending: list[dict]) -> dict:
  """Metrics of the steps since the last log, for the checkpoint's metadata."""
  rows = parallel.fetch(pending)
  return {'pending_metrics': [{k: np.asarray(v).item() for k, v in r.items()} for r in rows],
          'pending_dtypes': {k: np.asarray(v).dtype.name for k, v in rows[0].items()} if rows else {}}


def pending_from_meta(meta: dict) -> list[dict]:
  """`pending_to_meta`'s rows back (a fine-tuning checkpoint of an older version kept their sums: as one row)."""
  if isinstance(meta.get('pending'), dict):
    sums = dict(meta['pending'])
    steps = int(sums.pop('steps', 0))
    zeros = {k: 0.0 for k in sums}
    return [sums] + [zeros] * (steps - 1) if steps else []
  dtypes = meta.get('pending_dtypes', {})
  return [{k: np.asarray(v, dtypes[k]) for k, v in r.items()} for r in meta.get('pending_metrics', [])]


def _log_train(run: Run, step: int, pending: list[dict], elapsed: float, last_step: int, bar: tqdm) -> None:
  """Writes the train row of the steps `last_step` + 1 .. `step` (their metrics: `pending`)."""
  sums = jax.tree.map(lambda *x: np.sum(x), *parallel.fetch(pending))  # the only sync point
  check_finite(sums, step, run.nonfinite)
  skipped = int(sums['skipped_steps'])
  row = run.summarize(sums)
  tokens = sum(run.tokens_per_step(s) for s in range(last_step, step))
  row.update(grad_norm=float(sums['grad_norm']) / max(len(pending) - skipped, 1), skipped_steps=skipped,
             learning_rate=float(run.schedule(step - 1)), tokens_per_second=tokens / max(elapsed, 1e-9),
             **run.row_extras(step))
  if run.flops_per_token and run.peak_flops:
    row['mfu'] = row['tokens_per_second'] * run.flops_per_token / run.peak_flops
  run.writer.write(step, 'train', row)
  if skipped and jax.process_index() == 0:
    bar.write(f'step {step}: skipped {skipped} of the last {len(pending)} steps (non-finite loss or gradient; '
              'optimizer.nonfinite=skip)')
  shown = {k: row[k] for k in ('loss', 'masked_accuracy', 'accuracy') if k in row}
  bar.set_postfix(**{k: f'{v:.4f}' for k, v in shown.items()}, tok_s=f"{row['tokens_per_second']:.0f}",
                  **({'mfu': f"{row['mfu']:.0%}"} if 'mfu' in row else {}))
  if bar.disable and jax.process_index() == 0:  # no bar (logs, notebooks): one line per log step
    eta = (run.num_steps - step) * elapsed / max(step - last_step, 1)
    print(f'step {step}/{run.num_steps}: ' + ' '.join(f'{k} {v:.4f}' for k, v in shown.items())
          + f" {row['tokens_per_second']:.0f} tokens/s" + (f" MFU {row['mfu']:.1%}" if 'mfu' in row else '')
          + f' ETA {eta:.0f}s', flush=True)


def _evaluate(run: Run, step: int, params: Any, bar: tqdm) -> dict:
  result = run.evaluate(params)
  run.writer.write(step, 'eval', result)
  bar.write(f'step {step}: eval ' + ' '.join(f'{k} {v:.4f}' for k, v in result.items()
                                             if isinstance(v, float)))
  run.on_eval(step, params, result)
  return result


def run_loop(run: Run, preempt: preemption.Watcher) -> Outcome:
  """Trains `run` from its start step to `num_steps`; returns the final state and evaluation (or, stopped by a
  signal, the state whose checkpoint was saved, `preempted=True`)."""
  state, pending, result, queued = run.state, list(run.pending), None, parallel.steps_queued()
  last_time, last_step = time.time(), run.start_step
  bar = tqdm(total=run.num_steps, initial=run.start_step, unit='step', dynamic_ncols=True,
             disable=not run.progress_bar or jax.process_index() != 0)
  try:
    for step in range(run.start_step + 1, run.num_steps + 1):
      batch, data_position = next(run.batches)
      state, metrics = run.step(state, batch)
      pending.append(metrics)
      if len(pending) > queued:  # no more queued than that, so the bar and ETA follow real progress
        jax.block_until_ready(pending[-1 - queued]['skipped_steps'])
        check_finite(pending[-1 - queued], step - queued, run.nonfinite)
      bar.update(1)
      last = step == run.num_steps
      if step % run.log_every == 0 or last:
        _log_train(run, step, pending, time.time() - last_time, last_step, bar)
        pending, last_time, last_step = [], time.time(), step
      if step % run.eval_every == 0 or last:
        result = _evaluate(run, step, state.params, bar)
        last_time = time.time()  # eval time is not training throughput
        if last and run.hparams is not None:  # before the last checkpoint: a finished run has its HParams
          run.writer.write_hparams(run.hparams, result)
      stop = preempt.should_stop(step) and not last
      if step % run.checkpoint_every == 0 or last or stop:
        if pending:
          check_finite(pending[-1], step, run.nonfinite)  # never checkpoint past a bad step
        run.ckpt.save(step, state, {'step': step, **pending_to_meta(pending), **run.checkpoint_meta(data_position)},
                      force=stop)  # returns once the previous save is final
        run.after_save()
      if stop:
        run.ckpt.wait()
        print(f'Preempted at step {step}; checkpoint saved in {run.ckpt.directory}; run the same command to '
              'resume.', flush=True)
        return Outcome(state, step, result, preempted=True)
  finally:
    bar.close()
  run.ckpt.wait()
  return Outcome(state, run.num_steps, result)
