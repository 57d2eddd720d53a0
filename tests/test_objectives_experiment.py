"""experiments/objectives/run.py: its arms compare what they say (configs only, no training)."""

import importlib.util
import os

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     'experiments', 'objectives', 'run.py')
_spec = importlib.util.spec_from_file_location('objectives_run', _PATH)
run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run)


def test_random_arm_is_the_mlm_arm_untrained():
  mlm, random = run.arm_config('mlm', 1100), run.arm_config('random', 1100)
  assert mlm.model.to_dict() == random.model.to_dict() and mlm.data.to_dict() == random.data.to_dict()
  assert mlm.seed == random.seed  # the same initial params as the MLM run starts from
  assert (random.num_train_steps, random.optimizer.learning_rate, random.checkpoint_every_steps) == (1, 0.0, 1)
  assert mlm.num_train_steps == 1100 and mlm.objective.type == 'mlm'


def test_electra_arm_and_half_way_checkpoints():
  electra = run.arm_config('electra', 955)
  assert electra.objective.type == 'electra' and electra.num_train_steps == 955
  assert electra.model.to_dict() == run.arm_config('mlm', 1100).model.to_dict()  # the same encoder as MLM's
  assert electra.masking.rate == 0.15
  assert electra.checkpoint_every_steps == 477 and electra.optimizer.warmup_steps == 136
  pre = {'mlm': {'steps': 1100}, 'electra': {'steps': 955}, 'random': {'steps': 1}}
  assert run.model_steps(pre) == {'mlm': 1100, 'electra': 955, 'random': 1, 'mlm@550': 550, 'electra@477': 477}


def test_each_arm_gets_the_recipe_its_validation_accuracy_picks():
  """The selection reads validation accuracy only: a recipe with the better test score but the worse validation
  score is not chosen."""
  m = lambda val, test: {'metrics': {'accuracy': val, 'test_accuracy': test, 'test_accuracy_std': 0.01}}
  results = {'t': {'mlm': m(0.5, 0.9), 'lr1e-3/mlm': m(0.6, 0.7), 'random': m(0.4, 0.4), 'lr1e-3/random': m(0.3, 0.8)}}
  chosen = run.selected(results, ['default', 'lr1e-3'])
  assert chosen['t']['mlm'] == {'recipe': 'lr1e-3', 'validation_accuracy': 0.6, 'test_accuracy': 0.7,
                                'test_accuracy_std': 0.01}
  assert chosen['t']['random']['recipe'] == 'default' and 'electra' not in chosen['t']
  assert '| `t` | `mlm` | `lr1e-3` | 0.600 | 0.700 ± 0.010 |' in run.selected_table(chosen)
