"""The accelerator suite (`launch.benchmark --suite=accelerator`) runs end to end with a tiny
spec on the CPU: every section measured, one row per model x dtype and arms x mode."""
from lib.diagnostics import accelerator
from conftest import quickstart_mlp

TINY = {'model.width': 16}   # the suite's code, not its models, is under test: an MLP compiles fast


def test_the_accelerator_suite_measures_every_section():
  spec = dict(accelerator.ACCELERATOR_SPEC, steps=[('mlp', 8, 8, TINY)], step_count=1,
              arm_model=('mlp', TINY), arms=(1, 2), arm_batch=8, arm_steps=1,
              fast_examples=64)
  fast = quickstart_mlp(1, **{'train.batch_size': 16})
  lines = []
  out = accelerator.accelerator_suite(spec, fast_config=fast, log=lines.append)
  assert [(r['model'], r['dtype'], r['image_size']) for r in out['train_step']] == [
      ('mlp', 'float32', 8), ('mlp', 'bfloat16', 8)]
  assert [(r['arms'], r['mode']) for r in out['arms']] == [
      (1, 'vmap'), (2, 'vmap'), (1, 'unroll'), (2, 'unroll')]
  (epoch,) = out['fast_baseline']
  assert epoch['steps_per_epoch'] == 64 // 16 and epoch['examples_per_sec'] > 0
  assert all(r['examples_per_sec'] > 0 for r in out['train_step'])
  assert any(l.strip().startswith('fast baseline: mlp, batch 16') for l in lines), lines
