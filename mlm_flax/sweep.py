"""Sweeps: a grid of runs, one workdir each under a root, run one after another (or emitted for a cluster).

  mlm-flax sweep --config configs/tiny.py --sweep optimizer.learning_rate=1e-3,3e-3 --sweep batch_size=8,16 \
      --seeds 2 --workdir workdirs/lr_bs [--config.KEY=VALUE ...] [--dry_run] [--emit slurm|commands]

Points are the product of the `--sweep KEY=V1,V2` values (and of `seed` = 0..N-1 with `--seeds N`), or come from
a Python file `--sweep FILE.py[:get_sweep]` whose function returns a list of override dicts (grids that are not
products, as big_vision's `get_hyper`). Each point is `mlm-flax <command> --config FILE --workdir ROOT/<name>
--config.KEY=VALUE ...` in a fresh process (clean JAX state); its name is the overrides', as the default
`--workdir` of `train` names them. A finished point is skipped; an unfinished one resumes from its checkpoint.
ROOT/sweep.json records the sweep: a rerun in the same ROOT must have the same command, config and common
overrides, and may only add points. Nothing here imports JAX.
"""

import ast
import dataclasses
import hashlib
import importlib.util
import itertools
import os
import re
import shlex
import signal
import subprocess
import sys
from typing import Any, Sequence

from mlm_flax import workdir_json

COMMIT_MARKER = 'commit_success.txt'  # = checkpoint.COMMIT_MARKER (not imported: that module imports JAX)


def default_workdir(config_file: str, overrides: dict[str, Any]) -> str:
  """`workdirs/<config name>`, plus a suffix naming the `--config.KEY=VALUE` overrides, so runs with other
  overrides get other folders: sorted (any order gives the same folder), filesystem-safe, and a readable
  prefix plus a hash of the whole when long or when characters had to be replaced, e.g.
  `workdirs/tiny-batch_size=32+optimizer.learning_rate=0.0003`."""
  name = os.path.splitext(os.path.basename(config_file.split(':')[0]))[0]
  if not overrides:
    return os.path.join('workdirs', name)
  raw = '+'.join(f'{k}={v}' for k, v in sorted(overrides.items()))  # no ',': `plot --workdir a,b`
  suffix = re.sub(r'[^A-Za-z0-9._=+-]', '_', raw)
  if suffix != raw or len(suffix) > 80:  # replaced characters or cut: a hash keeps the names distinct
    suffix = f'{suffix[:60]}-{hashlib.sha256(raw.encode()).hexdigest()[:10]}'
  return os.path.join('workdirs', f'{name}-{suffix}')


@dataclasses.dataclass(frozen=True)
class Point:
  name: str  # its workdir under the sweep's root
  overrides: dict[str, str]  # config key -> value as given on the command line


@dataclasses.dataclass
class Sweep:
  command: str  # train | finetune
  config: str  # config file (absolute), as `--config` takes it (FILE or FILE:ARG)
  overrides: list[str]  # `--config.KEY=VALUE` arguments common to every point
  args: list[str]  # other arguments passed to every point (e.g. finetune's `--init MODEL`)
  points: list[Point]

  def record(self) -> dict:
    return {'command': self.command, 'config': self.config, 'overrides': self.overrides, 'args': self.args,
            'points': [{'name': p.name, 'overrides': p.overrides} for p in self.points]}

  def argv(self, point: Point, root: str) -> list[str]:
    """The point's `mlm-flax` arguments (after the program name)."""
    return [self.command, f'--config={self.config}', f'--workdir={os.path.join(root, point.name)}', *self.overrides,
            *(f'--config.{k}={v}' for k, v in point.overrides.items()), *self.args]


def _load_sweep_file(spec: str) -> list[dict[str, str]]:
  path, _, fn = spec.partition(':')
  if not os.path.isfile(path):
    raise ValueError(f'--sweep={spec}: no such file; use --sweep KEY=V1,V2 or --sweep FILE.py[:get_sweep].')
  module_spec = importlib.util.spec_from_file_location('_mlm_flax_sweep', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  fn = fn or 'get_sweep'
  if not callable(getattr(module, fn, None)):
    raise ValueError(f'--sweep={spec}: {path} has no function {fn}() returning the list of override dicts.')
  points = getattr(module, fn)()
  if not isinstance(points, (list, tuple)) or not all(isinstance(p, dict) for p in points) or not points:
    raise ValueError(f'--sweep={spec}: {fn}() must return a non-empty list of dicts {{config key: value}}.')
  return [{str(k): str(v) for k, v in p.items()} for p in points]


def grid(specs: Sequence[str], seeds: int | None = None) -> list[dict[str, str]]:
  """The points' overrides: the product of every `KEY=V1,V2` spec, sweep file and `seed` = 0..seeds-1."""
  axes = []
  for spec in specs:
    if '=' in spec:
      key, _, values = spec.partition('=')
      values = [v for v in values.split(',') if v]
      if not key or not values:
        raise ValueError(f'--sweep={spec}: use KEY=V1,V2,... (values with commas: a sweep file FILE.py).')
      axes.append([{key: v} for v in values])
    else:
      axes.append(_load_sweep_file(spec))
  if seeds is not None:
    if seeds < 1:
      raise ValueError(f'--seeds={seeds}: give a positive number of seeds (0..N-1), or leave it out.')
    axes.append([{'seed': str(s)} for s in range(seeds)])
  points = []
  for combo in itertools.product(*axes):
    merged = {}
    for part in combo:
      twice = set(merged) & set(part)
      if twice:
        raise ValueError(f'config key {sorted(twice)[0]} is swept twice (in two --sweep flags, or in a sweep file '
                         'and --seeds); sweep each key once.')
      merged.update(part)
    points.append(merged)
  return points


def _parsed(overrides: dict[str, str]) -> tuple:
  """The overrides as the config will hold them, for telling equal points apart: numbers as floats (`1e-3` is
  `0.001`), booleans and None as such, other strings as written."""
  def value(v: str) -> Any:
    try:
      parsed = ast.literal_eval(v)
    except (ValueError, SyntaxError):
      return {'true': True, 'false': False, 'none': None}.get(v.lower(), v)
    return float(parsed) if isinstance(parsed, (int, float)) and not isinstance(parsed, bool) else parsed
  return tuple(sorted((k, repr(value(v))) for k, v in overrides.items()))


def make_sweep(command: str, config: str, specs: Sequence[str], seeds: int | None = None,
               overrides: Sequence[str] = (), args: Sequence[str] = ()) -> Sweep:
  """A Sweep of `command` over the grid; `overrides` (`--config.KEY=VALUE`) apply to every point."""
  if not specs and seeds is None:
    raise ValueError('sweep needs at least one --sweep KEY=V1,V2 (or --sweep FILE.py, or --seeds N).')
  path, sep, arg = config.partition(':')
  config = os.path.abspath(path) + sep + arg
  common = {o[len('--config.'):].split('=', 1)[0] for o in overrides}
  points, seen = [], {}
  for p in grid(specs, seeds):
    both = common & set(p)
    if both:
      raise ValueError(f'--config.{sorted(both)[0]} is both swept and set for every point; drop one of them.')
    name, same = os.path.basename(default_workdir(config, p)), _parsed(p)
    if same in seen:
      raise ValueError(f'two points have the same overrides ({seen[same]} and {p}: equal values); give each value '
                       'once.')
    seen[same] = p
    points.append(Point(name, p))
  return Sweep(command, config, list(overrides), list(args), points)


def merge_record(old: dict, sweep: Sweep, root: str) -> None:
  """Refuses to run `sweep` in `root` if its sweep.json (`old`) holds another sweep: a rerun must keep the
  command, config, common overrides and arguments, and every recorded point (new points may be added)."""
  new = sweep.record()
  for key in ('command', 'config', 'overrides', 'args'):
    if old.get(key) != new[key]:
      raise ValueError(f'{root} holds another sweep ({key}: {old.get(key)!r} in {root}/sweep.json, {new[key]!r} '
                       'now); rerun it with the same command, --config and --config.KEY=VALUE flags (a sweep may '
                       'only add points), or use another --workdir.')
  names = {p.name for p in sweep.points}
  missing = [p['name'] for p in old.get('points', []) if p['name'] not in names]
  if missing:
    raise ValueError(f'{root}/sweep.json has points this grid lacks ({", ".join(missing[:4])}'
                     f'{", ..." if len(missing) > 4 else ""}); a rerun may only add points: keep every earlier '
                     '--sweep value and --seeds (more values or seeds extend the grid), or use another --workdir.')


def finished(workdir: str, command: str = 'train') -> bool:
  """Whether the run in `workdir` is complete: `finetune` wrote results.json; `train` has a finalised
  checkpoint of its config's num_train_steps (the last step always saves one)."""
  if command != 'train':
    return os.path.isfile(os.path.join(workdir, 'results.json'))
  step = last_checkpoint(workdir)
  try:
    return step is not None and step >= workdir_json.read_config(workdir)['num_train_steps']
  except (OSError, ValueError, KeyError, TypeError):
    return False


def last_checkpoint(workdir: str) -> int | None:
  """The newest finalised checkpoint step in `workdir`, read from the folder names (no JAX, no Orbax)."""
  d = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(d):
    return None
  steps = [int(n) for n in os.listdir(d) if n.isdigit() and os.path.isfile(os.path.join(d, n, COMMIT_MARKER))]
  return max(steps, default=None)


def status(workdir: str, command: str = 'train') -> str:
  if finished(workdir, command):
    return 'finished'
  step = last_checkpoint(workdir)
  return 'new' if step is None else f'resumes from step {step}'


def _read_record(root: str) -> dict | None:
  path = os.path.join(root, 'sweep.json')
  if not os.path.isfile(path):
    return None
  return workdir_json.read_json(path, workdir_json.SWEEP_FIX)


def _write_record(sweep: Sweep, root: str) -> None:
  os.makedirs(root, exist_ok=True)
  workdir_json.write_json(os.path.join(root, 'sweep.json'), sweep.record(), all_processes=True)


def shell_command(sweep: Sweep, point: Point, root: str, program: str = 'mlm-flax') -> str:
  return shlex.join([program, *sweep.argv(point, root)])


def emit(sweep: Sweep, root: str, kind: str) -> list[str]:
  """Writes ROOT/commands.txt (one command per point, in order) and, for `slurm`, ROOT/sweep.sbatch: an array
  job whose index i runs point i in the same workdir as a local sweep. Returns the paths written."""
  commands = [shell_command(sweep, p, root) for p in sweep.points]
  paths = [os.path.join(root, 'commands.txt')]
  with open(paths[0], 'w') as f:
    f.writelines(c + '\n' for c in commands)
  if kind == 'slurm':
    paths.append(os.path.join(root, 'sweep.sbatch'))
    lines = ['#!/bin/bash', f'#SBATCH --job-name={shlex.quote("sweep-" + os.path.basename(root))}',
             f'#SBATCH --array=0-{len(commands) - 1}', f'#SBATCH --output={shlex.quote(root)}/slurm-%A_%a.out',
             '#SBATCH --signal=B:TERM@120  # SIGTERM 2 minutes before the time limit: the point saves a checkpoint',
             '# Add your cluster\'s options (partition, GPUs, time) above or on the sbatch command line.',
             '# One array index per point of sweep.json (index i = line i+1 of commands.txt). Resubmitting resumes:',
             '# an interrupted point continues from its checkpoint; a finished one evaluates and exits.',
             'set -euo pipefail', f'cd {shlex.quote(os.getcwd())}', 'COMMANDS=(']
    lines += [f'  {shlex.quote(c)}' for c in commands]
    lines += [')', 'echo "${COMMANDS[$SLURM_ARRAY_TASK_ID]}"',
              'eval "exec ${COMMANDS[$SLURM_ARRAY_TASK_ID]}"  # the point replaces this shell: it gets the SIGTERM']
    with open(paths[1], 'w') as f:
      f.write('\n'.join(lines) + '\n')
  return paths


def _die_with_parent() -> None:
  """In the point's process (Linux): SIGTERM it when the sweep dies, even by SIGKILL, so it checkpoints."""
  try:
    import ctypes  # pylint: disable=g-import-not-at-top
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass


def run(sweep: Sweep, root: str, dry_run: bool = False, emit_kind: str | None = None,
        python: str = sys.executable) -> int:
  """Runs (or, with `dry_run`, lists; with `emit_kind`, writes the cluster files for) the sweep's points in
  `root`. Points run one at a time, each in a fresh process; SIGTERM/SIGINT are passed on to the running point
  (it saves a checkpoint) and stop the sweep. Returns the exit status: 0 when every point finished."""
  if emit_kind not in (None, 'slurm', 'commands'):
    raise ValueError(f'--emit={emit_kind}: use --emit slurm (sweep.sbatch and commands.txt) or --emit commands.')
  old = _read_record(root)
  if old is not None:
    merge_record(old, sweep, root)
  if dry_run:
    for i, p in enumerate(sweep.points):
      print(f'[{i + 1}/{len(sweep.points)}] {p.name} ({status(os.path.join(root, p.name), sweep.command)})\n'
            f'  {shell_command(sweep, p, root)}')
    return 0
  _write_record(sweep, root)
  if emit_kind:
    for path in emit(sweep, root, emit_kind):
      print(f'Wrote {path}')
    return 0
  failed, stop, current = [], [], [None]

  def forward(signum, frame):  # pylint: disable=unused-argument
    stop.append(signum)
    if current[0] is not None and current[0].poll() is None:
      current[0].send_signal(signum)  # the point saves a checkpoint and exits (a second Ctrl-C: at once)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    for i, p in enumerate(sweep.points):
      if stop:
        break
      workdir = os.path.join(root, p.name)
      state = status(workdir, sweep.command)
      print(f'[{i + 1}/{len(sweep.points)}] {p.name}: {"skipped (finished)" if state == "finished" else state}',
            flush=True)
      if state == 'finished':
        continue
      current[0] = subprocess.Popen([python, '-m', 'mlm_flax.cli', *sweep.argv(p, root)], start_new_session=True,
                                    preexec_fn=_die_with_parent)  # own session: Ctrl-C reaches it once, via us
      rc = current[0].wait()
      current[0] = None
      if not stop and (rc != 0 or not finished(workdir, sweep.command)):
        print(f'[{i + 1}/{len(sweep.points)}] {p.name}: failed (exit status {rc}); going on', flush=True)
        failed.append(p.name)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  if stop:
    print(f'Sweep stopped by signal {stop[0]}; run the same command to resume (finished points are skipped).',
          flush=True)
    return 128 + stop[0]
  if failed:
    print(f'{len(failed)} of {len(sweep.points)} points failed: {", ".join(failed)}; their workdirs are under '
          f'{root}. Fix the cause and run the same command again (finished points are skipped).', flush=True)
    return 1
  print(f'All {len(sweep.points)} points finished in {root}; compare them: mlm-flax compare {root}', flush=True)
  return 0
