"""Run an ablation: every arm x seed of an experiment module's get_sweep(arg).

  python -m launch.sweep --config=experiments/x.py[:arg] --workdir=W [--seeds=N]
      [--executor=local|slurm|submitit_local] [--parallel=N] [--vectorize] [--config.a.b=v ...]
  python -m launch.sweep ... --ci_halfwidth=0.01 [--min_seeds=5 --max_seeds=20 --max_runs=N]
      (seeds in rounds until each arm's 95% CI of its difference is that narrow)

Each run is W/<arm>/seed_<k>, trained by the same code as launch.train. Rerunning
the command skips finished runs and resumes interrupted ones. At the end it writes
W/results.csv, W/report.md and the plots (launch.report) and prints the ranked table.
--vectorize (or --config.train.vectorize=True) trains the runs that can share a
program together, as arms of one compiled program (lib/training/arms.py, lib/runs/group_train.py).
"""
import json
import sys

from absl import flags
from ml_collections import config_flags

from lib.core import cli, determinism, distributed, sharding
from lib.core.errors import UserError
from lib.sweeps import runner
from lib.sweeps import sweep as sweep_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment module[:arg] with '
                                          'get_config(arg) and get_sweep(arg).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Sweep directory: W/<arm>/seed_<k> per run.')
_SEEDS = flags.DEFINE_integer('seeds', None, 'Seeds 0..N-1 per arm (default: the module\'s).')
_CI = flags.DEFINE_float('ci_halfwidth', None, 'Seeds by precision: add seeds in rounds until '
                         'each arm\'s 95% CI of its paired difference is within +-this '
                         '(lib/sweeps/adaptive.py).')
_MIN_SEEDS = flags.DEFINE_integer('min_seeds', None, 'With --ci_halfwidth: seeds of round 1 (5).')
_MAX_SEEDS = flags.DEFINE_integer('max_seeds', None, 'With --ci_halfwidth: most seeds per arm (20).')
_MAX_RUNS = flags.DEFINE_integer('max_runs', None, 'With --ci_halfwidth: most runs in all.')
_MAX_HOURS = flags.DEFINE_float('max_hours', None, 'With --ci_halfwidth: most hours of rounds.')
_EXECUTOR = flags.DEFINE_enum('executor', 'local', list(runner.EXECUTORS),
                              'local: this machine; slurm: a job array through submitit; '
                              'submitit_local: the slurm path run by submitit\'s local executor.')
_PARALLEL = flags.DEFINE_integer('parallel', 1, 'local: runs at once, as worker processes '
                                 'sharing the visible GPUs evenly (1 = in this process).')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print the runs and their overrides; launch nothing.')
_WAIT = flags.DEFINE_bool('wait', True, 'slurm: wait for the jobs, then write the report.')
_REPORT = flags.DEFINE_bool('report', True, 'Write the report at the end.')
_ENSEMBLES = flags.DEFINE_bool('ensembles', True, 'The report evaluates the ensemble of each '
                               'arm\'s seeds (restoring their checkpoints here).')
_DISTRIBUTED = flags.DEFINE_enum('distributed', 'auto', ['auto', 'on', 'off'],
                                 'local: jax.distributed.initialize(), as for launch.train.')
_TIME = flags.DEFINE_integer('slurm_time', 240, 'Minutes per run (job time limit).')
_PARTITION = flags.DEFINE_string('slurm_partition', '', 'SLURM partition.')
_GPUS = flags.DEFINE_integer('slurm_gpus_per_node', 0, 'GPUs per node of each run.')
_NODES = flags.DEFINE_integer('slurm_nodes', 1, 'Nodes per run (multi-host via jax.distributed).')
_TASKS = flags.DEFINE_integer('slurm_tasks_per_node', 1, 'Processes per node (e.g. one per GPU).')
_CPUS = flags.DEFINE_integer('slurm_cpus_per_task', 0, 'CPUs per process (0 = cluster default).')
_MEM = flags.DEFINE_float('slurm_mem_gb', 0, 'Memory per node in GB (0 = cluster default).')
_ARRAY = flags.DEFINE_integer('slurm_array_parallelism', 0, 'Runs at once (0 = no limit).')
_ACCOUNT = flags.DEFINE_string('slurm_account', '', 'SLURM account.')
_QOS = flags.DEFINE_string('slurm_qos', '', 'SLURM QOS.')
_EXTRA = flags.DEFINE_list('slurm_extra', [], 'More sbatch options as key=value,...')
_VECTORIZE = flags.DEFINE_bool('vectorize', None, 'Train runs that share a program (same model, '
                                'data, batch, schedule; other seeds and strengths) together as '
                                'arms of one compiled program. Default: the config\'s '
                                'train.vectorize. Arms per program: train.max_arms (0 = as many '
                                'as fit in memory); how: train.vectorize_mode; arms that '
                                'end early leave the program: train.repack.')
_KILL = flags.DEFINE_string('debug_kill_at', None, 'RUN_INDEX:STEP: stop the sweep after that '
                            'pending run\'s first checkpoint at or past STEP (tests resume).')
_PROCESSES, _LOCAL_DEVICES = distributed.define_flags()
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  config_flag = flags.FLAGS['config']
  module_path, _, arg = config_flags.get_config_filename(config_flag).partition(':')
  base = cli.config(_CONFIG)
  spec = sweep_lib.load_spec(module_path, arg or None)
  seeds = sweep_lib.seeds_spec(spec.get('seeds') if isinstance(spec, dict) else None,
                               _SEEDS.value, _CI.value, _MIN_SEEDS.value, _MAX_SEEDS.value,
                               _MAX_RUNS.value, _MAX_HOURS.value)
  sweep = sweep_lib.parse(spec, seeds, where=f'{module_path} get_sweep')
  workdir = _WORKDIR.value
  tasks = runner.plan(base, sweep.runs(), workdir)    # every config checked before launching
  if sweep.adaptive:   # the largest rounds too
    runner.plan(base, sweep.runs_for({a: sweep.adaptive.max for a in sweep.arms}), workdir)
  overrides = {k: v for k, v in config_flags.get_override_values(config_flag).items()}
  manifest = sweep_lib.manifest(module_path, arg or None, overrides, sweep)
  vectorize = base.train.vectorize if _VECTORIZE.value is None else _VECTORIZE.value
  if _DRY_RUN.value:
    for t in tasks:
      print(f'{t["workdir"]}  {json.dumps(t["overrides"])}')
    print(f'{len(tasks)} runs ({len(sweep.arms)} arms x {len(sweep.seeds)} seeds)' +
          (f', then rounds of more seeds until each 95% CI is within '
           f'±{sweep.adaptive.ci_halfwidth:g} (at most {sweep.adaptive.max} seeds per arm)'
           if sweep.adaptive else '') +
          (f', then {sweep.refine["trials"]} refined trials x {len(sweep.seeds)} seeds'
           if sweep.refine else ''))
    if vectorize:
      runner.plan_groups(tasks, log=print)
    return
  if sweep.adaptive and not _WAIT.value and _EXECUTOR.value != 'local':
    raise UserError('seeds by precision decide each round from the last: drop --nowait')
  if _PROCESSES.value > 1 and (_EXECUTOR.value != 'local' or _PARALLEL.value > 1):
    raise UserError('--processes=N trains each run (or vectorized group) with N processes '
                    'together: use it with --executor=local and --parallel=1')
  determinism.request(cli.config(_CONFIG).train.deterministic)   # before JAX's backend starts
  status = distributed.run_as_processes('launch.sweep', _PROCESSES.value, _LOCAL_DEVICES.value,
                                        _DISTRIBUTED.value)
  if status is not None:   # this was the launcher of N processes
    sys.exit(status)
  submitit_args = None
  if _EXECUTOR.value == 'local':
    sharding.initialize_distributed(_DISTRIBUTED.value)
  else:
    submitit_args = runner.submitit_params(
        'slurm' if _EXECUTOR.value == 'slurm' else 'local', _TIME.value, _PARTITION.value,
        _GPUS.value, _NODES.value, _TASKS.value, _CPUS.value, _MEM.value, _ARRAY.value,
        _ACCOUNT.value, _QOS.value, _EXTRA.value, name=f'sweep-{module_path.split("/")[-1][:-3]}')
  primary = sharding.is_primary()   # a parent of worker processes leaves the GPUs alone
  if primary:
    runner.write_manifest(workdir, manifest)
  kill_at = None
  if _KILL.value:
    index, _, step = _KILL.value.partition(':')
    kill_at = {'run': int(index), 'step': int(step)}
  run = lambda ts: runner.execute(ts, workdir, _EXECUTOR.value, _PARALLEL.value, submitit_args,
                                  _WAIT.value, kill_at=kill_at, vectorize=vectorize)
  try:
    if sweep.adaptive:
      runner.execute_adaptive(base, sweep, workdir, run, primary)
    else:
      run(tasks)
    if sweep.refine and (_WAIT.value or _EXECUTOR.value == 'local'):
      space, arms = sweep_lib.refine_arms(sweep, runner.stage_scores(tasks))
      print(f'refining around the top {sweep.refine["top_k"]} trials: '
            f'{json.dumps(space)}', flush=True)
      tasks2 = runner.plan(base, sweep.runs(arms, stage=2), workdir)
      if primary:
        runner.write_manifest(workdir, {**manifest, 'stage2': {'space': space, 'arms': arms}})
      run(tasks2)
  except runner.Killed as e:
    sys.exit(f'stopped: {e}')
  if _REPORT.value and primary and (_WAIT.value or _EXECUTOR.value == 'local'):
    from lib.sweeps import report
    report.write_and_print(workdir, ensembles=_ENSEMBLES.value)


if __name__ == '__main__':
  cli.run(main, report_compiles=True)
