"""Checkpoint checksums: every single-bit flip is caught (the old fingerprint missed many), per item and leaf,
through the real restore path; checkpoints saved with the old fingerprints still restore."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mlm_flax import checkpoint, parallel
from test_train import setup

# Even and odd positions, both ends and the middle of a 37 x 64 array.
POSITIONS = (0, 1, 2, 3, 6, 7, 1184, 1185, 2366, 2367)


def _flip(x, index: int, bit: int) -> np.ndarray:
  """A copy of `x` (4-byte dtype) with one bit of flat element `index` flipped."""
  y = np.array(x)
  y.reshape(-1).view(np.uint32)[index] ^= np.uint32(1 << bit)
  return y


def test_checksum_catches_every_single_bit_flip_that_the_old_fingerprint_missed():
  rng = np.random.default_rng(0)
  arrays = {'f32': rng.standard_normal((37, 64)).astype(np.float32),
            'i32': rng.integers(-2**31, 2**31, (37, 64), dtype=np.int64).astype(np.int32)}
  old_misses = 0
  for name, x in arrays.items():
    ref, old_ref = checkpoint.checksum(x), int(checkpoint.legacy_fingerprint(x))
    for index in POSITIONS:
      for bit in range(32):  # mantissa, exponent and sign bits of the float
        y = _flip(x, index, bit)
        assert checkpoint.checksum(y) != ref, (name, index, bit)
        old_misses += int(checkpoint.legacy_fingerprint(y)) == old_ref
  # the old position-weighted sum: even weights at odd positions, so it missed their sign bits (and more)
  assert old_misses >= len(POSITIONS) // 2 * 2, old_misses
  assert checkpoint.checksum(arrays['f32']) == checkpoint.checksum(arrays['f32'].copy())  # deterministic


_MESH = r'''
import os, sys
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from mlm_flax import checkpoint, parallel
x = {'w': np.random.default_rng(1).standard_normal((16, 8)).astype(np.float32), 'b': np.arange(8, dtype=np.int32)}
mesh = parallel.make_mesh(8, fsdp=4)  # rows over data (2), columns over fsdp (4); b replicated
split = jax.device_put(x, {'w': NamedSharding(mesh, P('data', 'fsdp')), 'b': parallel.replicated(mesh)})
assert len(split['w'].addressable_shards) == 8 and split['w'].addressable_shards[0].data.shape == (8, 2)
assert checkpoint.checksums({'a': split}) == checkpoint.checksums({'a': x}), 'mesh-dependent checksum'
assert checkpoint.checksum(x['w']) != checkpoint.checksum(x['w'][::-1])  # the bytes in order, not a sum
print('ok')
'''


def test_checksum_is_the_same_on_any_mesh():
  """The checksum of the global array's bytes: a 2-D split over 8 devices gives the host array's."""
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  proc = subprocess.run([sys.executable, '-c', _MESH], capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0 and proc.stdout.strip() == 'ok', proc.stderr[-3000:]


@pytest.fixture
def saved(tmp_path):
  """A real TrainState saved at steps 1 and 2."""
  state = setup(parallel.make_mesh(1))[-1]
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  for step in (1, 2):
    ckpt.save(step, state.replace(step=jnp.int32(step)), {'step': step})
  ckpt.wait()
  yield ckpt, state
  ckpt.close()


def _restore_items(ckpt, state, step):
  targets = {'params': state.params, 'opt_state': state.opt_state, 'extra': {'step': state.step, 'rng': state.rng}}
  return ckpt._restore_step(step, jax.tree.map(checkpoint._abstract, targets))  # pylint: disable=protected-access


def test_a_flipped_bit_in_any_item_is_named_by_verify(saved):
  ckpt, state = saved
  items, meta = _restore_items(ckpt, state, 2)
  assert set(meta['checksums']) == {'params', 'opt_state', 'extra'}
  assert meta['checksums']['params']["['layer_0']['intermediate']['kernel']"].startswith('crc32:')
  checkpoint.verify(items, meta)  # the clean restore passes
  cases = [('params', "['layer_0']['intermediate']['kernel']", 31), ('params', "['head_bias']", 0),
           ('opt_state', None, 30), ('extra', "['rng']", 5)]
  for item, leaf, bit in cases:
    flat = jax.tree_util.tree_flatten_with_path(items[item])[0]
    i = next(i for i, (p, x) in enumerate(flat) if (leaf is None and x.ndim == 2) or jax.tree_util.keystr(p) == leaf)
    leaf = jax.tree_util.keystr(flat[i][0])
    leaves = [x for _, x in flat]
    leaves[i] = jnp.asarray(_flip(leaves[i], 1, bit))  # an odd position: the old fingerprint's blind spot
    bad = {**items, item: jax.tree.unflatten(jax.tree.structure(items[item]), leaves)}
    with pytest.raises(checkpoint.CorruptCheckpointError, match='does not match its checksums') as e:
      checkpoint.verify(bad, meta)
    assert f'{item} ({leaf}' in str(e.value), str(e.value)


def _flip_on_restore(monkeypatch, ckpt, step, index=3):
  """Makes the manager return step `step` with the sign bit of one param flipped, as a bad disk would."""
  real = ckpt.manager.restore

  def restore(s, args):
    out = real(s, args=args)
    if s != step:
      return out
    params = dict(out['params'])
    params['head_bias'] = jnp.asarray(_flip(params['head_bias'], index, 31))
    return ocp.args.Composite(**{**{k: out[k] for k in out.keys()}, 'params': params})

  monkeypatch.setattr(ckpt.manager, 'restore', restore)


def test_restore_falls_back_past_a_flipped_bit(saved, monkeypatch, caplog):
  ckpt, state = saved
  _flip_on_restore(monkeypatch, ckpt, 2)
  restored, meta = ckpt.restore(state, quarantine=False)
  assert meta['step'] == 1 and int(restored.step) == 1
  assert 'checkpoints/2 is corrupt' in caplog.text and "params (['head_bias'])" in caplog.text
  params, meta = ckpt.restore_params(checkpoint._abstract(state.params))  # pylint: disable=protected-access
  assert meta['step'] == 1


def test_checkpoints_with_the_old_fingerprints_or_none_still_restore(tmp_path, monkeypatch, caplog):
  state = setup(parallel.make_mesh(1))[-1]
  items = {'params': state.params, 'opt_state': state.opt_state, 'extra': {'step': state.step, 'rng': state.rng}}
  old = {k: int(checkpoint.legacy_fingerprint(v)) for k, v in items.items()}
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  for step, meta in ((1, {'step': 1}), (2, {'step': 2, 'fingerprints': old})):  # before checksums
    ckpt.manager.save(step, args=ocp.args.Composite(
        meta=ocp.args.JsonSave(meta), **{k: ocp.args.StandardSave(v) for k, v in items.items()}))
  ckpt.wait()
  try:
    restored, meta = ckpt.restore(state, quarantine=False)
    assert meta['step'] == 2
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(restored.params)):
      np.testing.assert_array_equal(a, b)
    _flip_on_restore(monkeypatch, ckpt, 2, index=2)  # an even position: the old fingerprint catches it
    assert ckpt.restore(state, quarantine=False)[1]['step'] == 1 and 'checkpoints/2 is corrupt' in caplog.text
  finally:
    ckpt.close()
