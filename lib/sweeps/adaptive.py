"""Seeds until the answer is precise enough: a sweep told how wide its confidence
intervals may be, not how many seeds to run.

  get_sweep(arg) -> {'arms': ..., 'baseline': 'none',
                     'seeds': {'min': 5, 'max': 20, 'ci_halfwidth': 0.005,
                               'max_runs': 60, 'max_hours': 0}}     (the last two optional)
  python -m launch.sweep ... --ci_halfwidth=0.005 [--min_seeds=5 --max_seeds=20 --max_runs=60]

The sweep runs in rounds. Round 1 runs `min` seeds of every arm. An arm whose 95%
confidence interval of its paired difference to the baseline (in the ranking metric, best
val accuracy) is wider than ±ci_halfwidth then gets the seeds it needs, up to `max`; the
baseline runs every seed any compared arm runs (each paired difference needs it). Without
a baseline (a grid or search), each arm's own interval of its mean must be narrow enough.
Seeds stay seed_0..seed_k: an arm with n seeds has seeds 0..n-1, so a round extends the
one before. A run that does not finish (diverged, failed) does not count as a pair, and
the next round replaces it.

The interval is Stein's two-stage interval (Stein 1945): with s1 the standard deviation of
the differences of the first round's m pairs, an arm with n pairs reports

    mean difference ± t(0.975, m - 1) · s1 / sqrt(n),

and gets n = ceil((t(0.975, m - 1) · s1 / ci_halfwidth)^2) seeds (clipped to [min, max]).
What it guarantees: with normally distributed seed-to-seed noise, that interval covers the
true difference with probability exactly 95%, whatever the true difference and however many
seeds the rule chose, because the mean over n seeds is independent of s1 (and of every
other statistic of the seeds' spread that decided n). The usual t interval over the n seeds
would not: an arm whose first seeds happen to agree stops early with an interval that is
too narrow (about 91% coverage with min 3, 92-93% with min 5, in tests/test_adaptive.py's
simulation). The price is seeds: t(0.975, m - 1) is 4.30 for m = 3, 2.78 for m = 5, 2.36
for m = 8 (against 1.96 with a known spread), so about (t / 2.1)^2 times the seeds a naive
rule would stop at; min 5 (the default) is a good compromise.

The rule is honest: every decision depends on the spread of the first round only, never on
a difference's sign, its size or its p-value. Stopping on significance ("add seeds until
p < 0.05") makes reported intervals miss the true difference far more often than 5%.

Budget: `max_runs` caps the sweep's runs (all arms and seeds); `max_hours` the hours its
rounds have taken by the sweep's clock (recorded per round, so a resumed sweep counts what
the first launch spent; the time a kill lost is not counted), a round sized by the hours per
run so far. When a round wants more than is left, the largest requests are trimmed first, a
seed at a time, so the arms' counts end level; an arm stopped by the budget reports its
interval as it is (wider than the target, still 95%).

Decisions are a pure function of the runs' results, and each round's is recorded in
W/adaptive.json: rerunning the command after a kill replays the recorded rounds (nothing
finished retrains; their decisions stand, even where a failed run is retried and now
finishes) and continues the round it stopped in, to the same seeds and the same table. A
relaunch with another target, other arms or another baseline decides anew from the runs.
"""
import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from lib.core.errors import UserError
from lib.runs.rundir import read_json, write_json

STATE_FILE = 'adaptive.json'
KEYS = ('min', 'max', 'ci_halfwidth', 'max_runs', 'max_hours')
DEFAULT_MIN, DEFAULT_MAX = 5, 20
# Why an arm stopped getting seeds.
MET, MAX, BUDGET, BASELINE, NO_RUNS = ('target met', 'max seeds', 'budget',
                                       'baseline (runs every seed an arm runs)',
                                       'fewer than 2 finished pairs in round 1')
Values = Mapping[str, Mapping[int, Optional[float]]]   # arm -> seed -> metric (None: unfinished)


@dataclasses.dataclass(frozen=True)
class Target:
  min: int
  max: int
  ci_halfwidth: float
  max_runs: int = 0       # 0: no cap
  max_hours: float = 0.0  # 0: no cap

  def to_dict(self) -> Dict[str, Any]:
    return dataclasses.asdict(self)


def is_adaptive(seeds: Any) -> bool:
  return isinstance(seeds, dict)


def parse(spec: Dict[str, Any], where: str = 'get_sweep') -> Target:
  """A `seeds` dict checked: one line naming the bad value and what it must be."""
  unknown = sorted(set(spec) - set(KEYS))
  if unknown:
    raise UserError(f'{where}: seeds has unknown key {unknown[0]!r}; valid: {", ".join(KEYS)}')
  if 'ci_halfwidth' not in spec:
    raise UserError(f'{where}: seeds={{...}} needs ci_halfwidth (the 95% CI half-width to '
                    'reach, as an accuracy difference, e.g. 0.005), or give seeds as a count')
  try:
    t = Target(_int(spec.get('min', DEFAULT_MIN)), _int(spec.get('max', DEFAULT_MAX)),
               float(spec['ci_halfwidth']), _int(spec.get('max_runs') or 0),
               float(spec.get('max_hours') or 0))
  except (TypeError, ValueError):
    raise UserError(f'{where}: seeds {spec!r}: min, max and max_runs must be whole numbers, '
                    'ci_halfwidth and max_hours numbers') from None
  if not (math.isfinite(t.ci_halfwidth) and t.ci_halfwidth > 0):
    raise UserError(f'{where}: seeds ci_halfwidth={t.ci_halfwidth:g} must be a positive '
                    'accuracy difference (e.g. 0.005)')
  if t.min < 2:
    raise UserError(f'{where}: seeds min={t.min} must be at least 2 (round 1 estimates the '
                    'spread from it)')
  if t.min > t.max:
    raise UserError(f'{where}: seeds min={t.min} > max={t.max}; make max at least min')
  if t.max_runs < 0 or not (math.isfinite(t.max_hours) and t.max_hours >= 0):
    raise UserError(f'{where}: seeds max_runs={t.max_runs} and max_hours={t.max_hours:g} '
                    'must be positive (0 or absent: no budget)')
  return t


def _int(x) -> int:
  if isinstance(x, bool) or (isinstance(x, float) and not x.is_integer()):
    raise ValueError(x)
  return int(x)


def check_budget(target: Target, arms: int) -> None:
  """The first round must fit the run budget: fail before anything launches."""
  if target.max_runs and target.min * arms > target.max_runs:
    raise UserError(f'seeds max_runs={target.max_runs} is less than the first round '
                    f'({arms} arms x min {target.min} seeds = {target.min * arms} runs); '
                    'raise max_runs or lower min')


@functools.lru_cache(maxsize=None)
def t_quantile(df: int) -> float:
  from scipy import stats
  return float(stats.t.ppf(0.975, df))


def _ok(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def measured(values: Values, baseline: Optional[str], arm: str, n: int) -> List[float]:
  """What an arm's interval is of, over its first n seeds: its paired differences to the
  baseline (the seeds both finished), or, without a baseline, its own values."""
  mine = values.get(arm, {})
  if baseline is None:
    return [mine[s] for s in range(n) if _ok(mine.get(s))]
  base = values.get(baseline, {})
  return [mine[s] - base[s] for s in range(n) if _ok(mine.get(s)) and _ok(base.get(s))]


def interval(values: Values, baseline: Optional[str], arm: str, first: int,
             n: int) -> Optional[Dict[str, Any]]:
  """Stein's interval of an arm over its first n seeds, the spread from its first `first`
  (round 1): {mean, halfwidth, p, pairs, sd1, df}; None with fewer than 2 round-1 pairs."""
  d1 = measured(values, baseline, arm, first)
  if len(d1) < 2:
    return None
  d = measured(values, baseline, arm, n)
  mean1 = sum(d1) / len(d1)
  sd1 = math.sqrt(sum((x - mean1) ** 2 for x in d1) / (len(d1) - 1))
  df, k = len(d1) - 1, len(d)
  mean = sum(d) / k
  half = t_quantile(df) * sd1 / math.sqrt(k)
  p = math.nan
  if sd1 > 1e-12 * max(1.0, max(abs(x) for x in d1)):   # no spread: no t-test (as stats.paired)
    from scipy import stats
    p = float(2 * stats.t.sf(abs(mean) * math.sqrt(k) / sd1, df))
  return {'mean': mean, 'halfwidth': half, 'p': p, 'pairs': k, 'sd1': sd1, 'df': df}


def decide(target: Target, arms: Sequence[str], baseline: Optional[str],
           counts: Mapping[str, int], values: Values, spent_runs: int = 0,
           spent_hours: float = 0.0):
  """One round's decision: (seed counts for the next round, per arm {seeds, width,
  stopped}) from this round's counts and per-seed values. The counts come back unchanged
  when every arm has stopped. Depends on the round-1 spreads and the counts of finished
  pairs only: never on a difference's sign, size or p-value."""
  compared = [a for a in arms if a != baseline]
  want, info = {}, {}
  for arm in compared:
    n = counts[arm]
    iv = interval(values, baseline, arm, target.min, n)
    width = iv['halfwidth'] if iv else math.inf
    stopped = (NO_RUNS if iv is None else MET if width <= target.ci_halfwidth
               else MAX if n >= target.max else None)
    if stopped:
      want[arm] = n
    else:
      need = math.ceil((t_quantile(iv['df']) * iv['sd1'] / target.ci_halfwidth) ** 2)
      want[arm] = int(min(max(need + (n - iv['pairs']), n + 1), target.max))
    info[arm] = {'seeds': n, 'width': width, 'stopped': stopped}
  want = _within_budget(target, compared, baseline, counts, want, info, spent_runs,
                        spent_hours)
  if baseline is not None:
    want[baseline] = max([counts[baseline]] + [want[a] for a in compared])
    info[baseline] = {'seeds': counts[baseline], 'width': math.nan, 'stopped': BASELINE}
  return want, {a: info[a] for a in arms}


def _within_budget(target, compared, baseline, counts, want, info, spent_runs, spent_hours):
  """`want` trimmed to what the budget has left: a seed at a time from the largest request
  (of equal ones, first from the arm nearest its target), so the arms' requests end level;
  an arm left without new seeds stops with BUDGET. Hours: those per run so far."""
  left = math.inf
  if target.max_runs:
    left = target.max_runs - spent_runs
  if target.max_hours:
    per_run = spent_hours / max(spent_runs, 1)
    hours_left = target.max_hours - spent_hours
    left = min(left, math.floor(hours_left / per_run) if per_run > 0 else math.inf)
  if left == math.inf:
    return want

  def cost(w):
    extra = sum(w[a] - counts[a] for a in compared)
    if baseline is not None:
      extra += max([counts[baseline]] + [w[a] for a in compared]) - counts[baseline]
    return extra

  want = dict(want)
  nearest_first = sorted(compared, key=lambda a: (info[a]['width'] / target.ci_halfwidth, a))
  while cost(want) > max(left, 0):
    grown = [a for a in nearest_first if want[a] > counts[a]]
    if not grown:
      break
    top = max(want[a] for a in grown)
    want[next(a for a in grown if want[a] == top)] -= 1   # the nearest of the largest
  for a in compared:
    if info[a]['stopped'] is None and want[a] == counts[a]:
      info[a]['stopped'] = BUDGET
  return want


def run_rounds(target: Target, arms: Sequence[str], baseline: Optional[str],
               run_round: Callable[[Dict[str, int]], Any],
               read: Callable[[Dict[str, int]], Any],
               on_round: Callable[[Dict[str, Any]], Any] = lambda state: None,
               log=print, agree=lambda want: want,
               history: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
  """The rounds: `run_round(counts)` trains (or skips, where finished) the first
  counts[arm] seeds of every arm; `read(counts)` returns (values, runs) of those runs.
  `on_round(state)` gets the state after each round (W/adaptive.json: the rounds so far,
  each with the sweep's training hours by then, and the `next` counts); the last one (done:
  True) is returned. `agree` makes every process of a job take process 0's counts.

  `history`, the state of an earlier launch with the same target, arms and baseline
  (`matching_state`), is replayed: its rounds' decisions stand, so a rerun reaches the same
  seeds even where a run that failed then is retried and finishes now. Rounds after the
  recorded ones are decided anew."""
  recorded = list(history['rounds']) if history else []
  counts = {a: target.min for a in arms}
  rounds: List[Dict[str, Any]] = []
  hours = 0.0
  while True:
    start = time.monotonic()
    run_round(counts)
    elapsed = (time.monotonic() - start) / 3600
    values, runs = read(counts)
    i = len(rounds)
    if i < len(recorded) and recorded[i]['seeds'] == counts:   # decided before: it stands
      rec = recorded[i]
      hours = rec.get('hours', hours + elapsed)
      info = rec['arms']
      want = (recorded[i + 1]['seeds'] if i + 1 < len(recorded)
              else dict(counts) if history.get('done') else history['next'])
    else:
      hours += elapsed
      want, info = decide(target, arms, baseline, counts, values, runs, hours)
      info = _finite_json(info)
    want = agree(dict(want))
    rounds.append({'seeds': dict(counts), 'arms': info, 'hours': hours})
    done = want == counts
    state = {'target': target.to_dict(), 'baseline': baseline, 'arms': list(arms),
             'rounds': rounds, 'next': dict(want), 'runs': runs, 'done': done}
    on_round(state)
    widths = '; '.join(f'{a} ±{_w(info[a]["width"])}' + (f' ({info[a]["stopped"]})'
                                                         if info[a]['stopped'] else '')
                       for a in arms if a != baseline)
    if done:
      log(f'round {len(rounds)}: {widths} (target ±{target.ci_halfwidth:g}); '
          f'every arm has stopped after {runs} runs')
      return state
    more = {a: want[a] - counts[a] for a in arms if want[a] > counts[a]}
    log(f'round {len(rounds)}: {widths} (target ±{target.ci_halfwidth:g}); round '
        f'{len(rounds) + 1} adds ' + ', '.join(f'{k} seed(s) of {a}' for a, k in more.items()))
    counts = want


def matching_state(workdir: str, manifest: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
  """W/adaptive.json if it belongs to the sweep of `manifest` (the same target, arms and
  baseline); None otherwise (a relaunch with another target decides anew)."""
  if not manifest or not manifest.get('adaptive'):
    return None
  state = read_state(workdir)
  if not state or state.get('target') != manifest['adaptive'] or \
      state.get('baseline') != manifest.get('baseline') or \
      state.get('arms') != list(manifest['arms']):
    return None
  return state


def planned_seeds(workdir: str, manifest: Dict[str, Any]) -> Optional[Dict[str, int]]:
  """How many seeds of each arm an adaptive sweep has asked for so far (its last round's,
  from W/adaptive.json; round 1's before the first decision); None for a fixed sweep."""
  if not manifest.get('adaptive'):
    return None
  state = matching_state(workdir, manifest) or {}
  first = len(manifest['seeds'])
  counts = {a: first for a in manifest['arms']}
  for a, n in (state.get('next') or {}).items():
    if a in counts:
      counts[a] = max(counts[a], int(n))
  return counts


def _w(x: Optional[float]) -> str:
  return f'{x:.4f}' if x is not None and math.isfinite(x) else 'inf'


def _finite_json(x):
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: _finite_json(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_finite_json(v) for v in x]
  return x


def write_state(workdir: str, state: Dict[str, Any]) -> None:
  write_json(os.path.join(workdir, STATE_FILE), _finite_json(state))   # atomic


def read_state(workdir: str) -> Optional[Dict[str, Any]]:
  """W/adaptive.json; None if absent or unreadable (it is derived: the rounds are then
  decided anew from the runs)."""
  try:
    return read_json(os.path.join(workdir, STATE_FILE))
  except ValueError:
    return None
