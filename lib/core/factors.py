"""The ablation factors, each declared once.

A factor is one config key with an off value. Its record says everything the
rest of the code derives from it:

  * `base_config` gets the key, at its default (the off value);
  * `resolve` validates it (`valid`, with a one-line error that names the key,
    the valid values and the off value);
  * `hparams` carries it into the compiled step as a float32 array when it is
    `traced` (a continuous strength: one program serves every value, and arms of a
    vectorized sweep may differ in it);
  * arm grouping (lib/training/arms.py): a traced key, a `data` key (the training order,
    each arm's own indices), an `init` key (used only to draw the
    initial weights) or a `stop` key (when a run ends) may differ between the arms
    of one program; an arm that has the factor off in a program that has it on
    gets `identity` (the off value unless said otherwise), except for a `switch`,
    whose being on adds to the state or the model: arms of one program then agree
    on whether it is on, and differ only in its value; a key `of` another
    factor means nothing while that factor is off, so it does not keep arms apart;
  * the README's factor table (`markdown_table`, kept current by a test).

`site` says where it acts, in the order of the train step:
  pixel -> normalized -> mix -> input -> params / model -> loss -> optimizer,
plus `data` (which training examples each epoch reads: the order of
lib/data/order.py, an input of the step), `init` (the initial weights), `eval`
(evaluation only) and `stop` (when a run ends). Implementations find the factors of their site here: augmentations
register with `lib.training.augment.register(name, keys, stage)`, parameter transforms
and loss penalties with `lib.training.regularize.register`.

Adding a factor: one `declare(Factor(...))` below, its function registered at
its site, and its test. See README "Adding a factor".
"""
import dataclasses
import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from lib.core.errors import UserError

SITES = ('data', 'pixel', 'normalized', 'mix', 'input', 'params', 'model', 'loss', 'optimizer',
         'init', 'eval', 'stop')


@dataclasses.dataclass(frozen=True)
class Factor:
  key: str                    # 'section.field'
  off: Any                    # the value that leaves it out of the program (its default)
  what: str                   # one line: what it is (README)
  values: str                 # the valid values, in words (README, errors)
  site: str                   # where it acts (SITES)
  valid: Optional[Callable[[Any], bool]] = None   # None: checked by its registry
  traced: bool = False        # a continuous strength, passed to the step as an array
  identity: Any = None        # an arm's strength when off in a program that has it on
  of: str = ''                # the factor without which this key means nothing
  default: Any = None         # the config default where it is not `off` (optim.lr)
  choices: Tuple[str, ...] = ()  # the valid values of a named choice
  # A traced strength whose being on adds to the state or the model (an EMA of the
  # weights, a reference to tie them to, an auxiliary head): arms of one program may
  # differ in its value only if all of them have it on, or all off.
  switch: bool = False

  def __post_init__(self):
    assert self.site in SITES, (self.key, self.site)
    assert self.key.count('.') == 1, self.key
    assert self.traced or not self.switch, self.key

  @property
  def section(self) -> str:
    return self.key.split('.')[0]

  @property
  def field(self) -> str:
    """The name of its strength in `hparams` (fields are unique across sections)."""
    return self.key.split('.')[1]

  @property
  def initial(self) -> Any:
    return self.off if self.default is None else self.default

  @property
  def program_free(self) -> bool:
    """Whether arms of one compiled program may differ in it."""
    return self.traced or self.site in ('data', 'init', 'stop')

  def arm_identity(self) -> Any:
    return self.off if self.identity is None else self.identity

  def check(self, value) -> None:
    if self.choices and value not in self.choices:
      raise UserError(f'unknown {self.key}={value!r}; valid: {", ".join(sorted(self.choices))}')
    if self.valid is not None and not _safe(self.valid, value):
      # An init value is never "off": it is just the default.
      off = ('' if self.off is None else f' (default {_fmt(self.off)})' if self.site == 'init'
             else f' ({_fmt(self.off)} = off)')
      raise UserError(f'{self.key}={value!r} must be {self.values}{off}')


def _safe(fn, value) -> bool:
  try:
    return bool(fn(value))
  except TypeError:   # a string where a number belongs
    return False


def _fmt(v) -> str:
  return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def _number(v) -> bool:
  return isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)


def at_least(lo) -> Tuple[Callable, str]:
  """A finite number >= lo (an infinite strength is a typo, not an experiment)."""
  return (lambda v: _number(v) and math.isfinite(v) and v >= lo), f'>= {lo}'


def in_range(lo, hi, closed_lo=True, closed_hi=False) -> Tuple[Callable, str]:
  """(valid, values) for a number in the interval, e.g. in_range(0, 1) is [0, 1)."""
  def valid(v):
    return _number(v) and (v >= lo if closed_lo else v > lo) and (v <= hi if closed_hi else v < hi)
  return valid, f'in {"[" if closed_lo else "("}{lo}, {hi}{"]" if closed_hi else ")"}'


def boolean() -> Tuple[Callable, str]:
  return (lambda v: isinstance(v, (bool, np.bool_))), 'True or False'


FACTORS: Dict[str, Factor] = {}


def declare(key: str, off: Any, what: str, site: str, rule=None, values: str = '',
            **kw) -> Factor:
  """Adds a factor (`rule`: one of the (valid, values) helpers above, or None when
  `choices` or a registry checks the value). Returns it; `undeclare` takes it back."""
  assert key not in FACTORS, f'{key} declared twice'
  valid, words = rule if rule is not None else (None, '')
  if kw.get('choices'):
    words = ', '.join(f'`{c}`' for c in kw['choices'])
  f = Factor(key=key, off=off, what=what, values=values or words, site=site, valid=valid, **kw)
  if f.traced:
    assert f.field not in {g.field for g in FACTORS.values() if g.traced}, key
  FACTORS[key] = f
  return f


def undeclare(key: str) -> None:
  del FACTORS[key]


# --- the table. Order within a section is the order of keys in config.json. ---
_nonneg = at_least(0)
declare('data.bootstrap', False,
        'bagging: each seed trains on its own bootstrap resample of the training split (n '
        'draws with replacement, a function of the seed; val and test untouched)', 'data',
        boolean())
declare('optim.lr', None, 'peak learning rate (after warmup)', 'optimizer',
        (lambda v: _number(v) and v > 0, 'positive'), traced=True, default=0.1)
declare('optim.weight_decay', 0.0, 'decoupled weight decay `w -= lr * wd * w` (kernels only)',
        'optimizer', _nonneg, traced=True)
declare('optim.norm_lr_scale', 1.0,
        'learning-rate multiplier of the normalization layers\' offsets (and scales, where '
        'learned): their update after the optimizer\'s direction, before decoupled decay '
        '(airbench\'s 64x for BatchNorm biases)', 'optimizer',
        (lambda v: _number(v) and math.isfinite(v) and v > 0, 'positive'), traced=True,
        switch=True)
declare('optim.lookahead', 0,
        'Lookahead (Zhang et al. 2019, optax.lookahead around the whole update): every k steps '
        'the slow weights move `slow += alpha * (fast - slow)` and the fast weights restart '
        'from them (k = this; weights only, not batch statistics)', 'optimizer',
        (lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0,
         'an integer >= 0'))
declare('optim.lookahead_alpha', None, 'Lookahead: the slow weights\' step size alpha',
        'optimizer', in_range(0, 1, closed_lo=False, closed_hi=True), traced=True, default=0.5)
declare('regularize.l2', 0.0, 'L2 penalty `lambda/2 * sum w^2`', 'loss', _nonneg, traced=True)
declare('regularize.l1', 0.0, 'L1 penalty `lambda * sum abs(w)`', 'loss', _nonneg, traced=True)
declare('regularize.decay_all_params', False,
        'penalties and decay on biases / norm params too', 'loss', boolean())
declare('regularize.activation_l1', 0.0,
        'activation sparsity `alpha * sum abs(h)` (per example, all hidden activations)', 'loss',
        _nonneg, traced=True)
declare('regularize.tie_l2', 0.0,
        'parameter tying to a reference (L2-SP): `lambda/2 * sum (w - w_ref)^2` over the kernels '
        '(every parameter with `decay_all_params`)', 'loss', _nonneg, traced=True, switch=True)
declare('regularize.tie_to', 'init',
        'the reference of `tie_l2`: `init` (this run\'s initial weights) or `WORKDIR[:best|latest|'
        'STEP]`, another run of the same architecture (default `best`), loaded once',
        'loss', (lambda v: isinstance(v, str) and v.strip() != '',
                 '`init` or a run directory, optionally `:best`, `:latest` or `:STEP`'),
        of='regularize.tie_l2')
declare('regularize.aux_rotation', 0.0,
        'multitask: weight of a self-supervised head (on the shared features) that predicts the '
        'rotation, 0/90/180/270 degrees, of a rotated copy of each batch (square images)', 'loss',
        _nonneg, traced=True, switch=True)
declare('regularize.aux_coarse', 0.0,
        'multitask: weight of a second supervised head predicting the coarse class (sources with '
        'coarse labels: CIFAR-100, npz with `coarse_labels`)', 'loss', _nonneg, traced=True,
        switch=True)
declare('regularize.dropout', 0.0, 'inverted dropout', 'model', in_range(0, 1), traced=True)
declare('regularize.dropout_at', 'head',
        'where dropout acts: `head` (before the classifier), `hidden` (+ after every hidden FC '
        'layer), `conv` (after conv layers; between the two convs of a residual block, as in '
        'WRN), `all`', 'model', choices=('head', 'hidden', 'conv', 'all'),
        of='regularize.dropout')
declare('regularize.dropconnect', 0.0,
        'DropConnect on dense kernels (one mask per step, inverted)', 'params', in_range(0, 1),
        traced=True)
declare('regularize.noise_input', 0.0, 'Gaussian noise on inputs (std, normalized units)',
        'input', _nonneg, traced=True)
declare('regularize.noise_hidden', 0.0, 'Gaussian noise on hidden activations (std)', 'model',
        _nonneg, traced=True)
declare('regularize.noise_weight', 0.0, 'Gaussian noise on conv/dense kernels (std)', 'params',
        _nonneg, traced=True)
declare('regularize.survival_last', 1.0,
        'stochastic depth: survival of block l is `1 - (l/L)(1 - p_L)`, per example; every '
        'block at eval (p_L)', 'model', in_range(0, 1, closed_lo=False, closed_hi=True),
        traced=True)
declare('regularize.label_smoothing', 0.0, 'label smoothing', 'loss', in_range(0, 1),
        traced=True)
declare('regularize.adversarial_eps', 0.0,
        'FGSM adversarial training on `x + eps * sign(grad_x loss)` (pixels in [0, 1])', 'input',
        _nonneg, traced=True)
declare('augment.crop_padding', 0, 'random crop after zero-padding (pixels)', 'pixel', _nonneg)
declare('augment.flip', False, 'random horizontal flip', 'pixel', boolean())
declare('augment.flip_mode', 'random',
        'which images the flip mirrors: `random` (each with p = 1/2, drawn every step) or '
        '`alternate` (airbench\'s derandomized flip: a random half, fixed per seed, in even '
        'epochs and the other half in odd ones; the resident pipeline only)', 'pixel',
        choices=('random', 'alternate'), of='augment.flip')
# A resized crop of scale 1 is the whole image: the identity of an arm without it.
declare('augment.resized_crop_scale', 0.0,
        'random resized crop (area in [s, 1], aspect 3/4..4/3, bilinear; s = min area)', 'pixel',
        in_range(0, 1, closed_hi=True), traced=True, identity=1.0)
for _name in ('brightness', 'contrast', 'saturation'):
  declare(f'augment.{_name}', 0.0, f'colour jitter: {_name} factor in [1-s, 1+s]', 'pixel',
          _nonneg, traced=True)
declare('augment.cutout_size', 0,
        'cutout: side of each zeroed square (pixels; centre anywhere, clipped at borders; after '
        'normalization)', 'normalized', _nonneg, traced=True)
declare('augment.cutout_patches', 1, 'cutout: squares per image', 'normalized', at_least(1),
        of='augment.cutout_size')
declare('augment.mixup_alpha', 0.0, 'mixup, `lam ~ Beta(alpha, alpha)` per example', 'mix',
        _nonneg, traced=True)
declare('augment.cutmix_alpha', 0.0,
        'cutmix (labels weighted by the pasted area; with mixup on too, each batch uses one, '
        'p = 1/2)', 'mix', _nonneg, traced=True)
declare('train.loss', 'cross_entropy',
        'loss: `cross_entropy`, `hinge` (multiclass SVM, margin 1), `squared_hinge`', 'loss')
declare('train.ema_decay', 0.0,
        'EMA (Polyak averaging) of the weights and batch statistics, `ema = d * ema + (1 - d) * w` '
        'after every step, evaluated (`val_accuracy_ema`) and checkpointed beside the raw weights',
        'optimizer', in_range(0, 1), traced=True, switch=True)
declare('train.ema_warmup', 'none',
        'EMA decay warmup: `none`, or `timm` (ModelEmaV3: update u uses `min(d, 1 - u^(-2/3))`, '
        'so the first update copies the weights)', 'optimizer', choices=('none', 'timm'),
        of='train.ema_decay')
declare('train.select_by', 'ema',
        'with EMA on, which weights pick the best checkpoint, drive early stopping, give '
        '`best_val_accuracy` and are what `launch.eval` restores by default: `ema` or `raw`',
        'stop', choices=('ema', 'raw'), of='train.ema_decay')
declare('train.early_stop_patience', 0,
        'early stopping: stop after N evaluations without a new best val accuracy; the best '
        'checkpoint is kept and is what `launch.eval` uses', 'stop', _nonneg)
declare('train.eval_tta', 'none',
        'test-time augmentation of evaluations (and `launch.eval --tta`): `flip`, `crops` (4 '
        'corners + centre of the 4-px padded image, each with its flip), `flip_translate` '
        '(airbench\'s: the image and its flip weighted 1/4 each, both shifted 1 px up-left and '
        '1 px down-right, zero-padded, 1/8 each)', 'eval',
        choices=('none', 'flip', 'crops', 'flip_translate'))
declare('model.activation', 'relu',
        'activation: `relu`, `leaky_relu`, `elu`, `gelu`, `tanh`, `sigmoid`, `maxout` (max of 2 '
        'learned affine maps per unit)', 'model')
declare('model.norm', 'batch',
        'normalization: `batch`, `layer` (each example over H, W and C; the features on an MLP), '
        '`layer_channels` (each position over its channels, ConvNeXt\'s; conv models only), '
        '`group`, `instance`, `none`', 'model')
declare('model.init', 'kaiming_normal',
        'kernel initializer of every conv/dense layer (lib/model/inits.py: zeros, constant, normal, '
        'uniform, xavier_*, kaiming_*, lecun_*, orthogonal)', 'init')
declare('model.init_scale', 0.01, 'its scale: std (normal), half-width (uniform), value '
        '(constant)', 'init', at_least(0))
declare('model.init_fan', 'fan_in', 'its fan (variance-scaling inits): fan_in, fan_out, fan_avg',
        'init')
declare('model.init_gain', 'auto', 'Kaiming / orthogonal gain: auto (from the activation), relu, '
        'leaky_relu, tanh, linear, sigmoid; the classifier always gets gain 1', 'init')
declare('model.bias_init', 0.0, 'every bias starts at this constant', 'init',
        values='a number')
declare('model.zero_init_residual', False, 'zero-init residual: the last norm scale of each '
        'branch (or its last conv where no norm closes it)', 'init', boolean())
declare('model.pool', 'max',
        'downsampling of `cnn` and `vgg*`: `max` (2x2 max-pool), `avg` (2x2 average), '
        '`fractional` (fractional max-pooling, Graham 2014: pseudo-random regions 1-2 wide, '
        'a fresh draw each step; a fixed one at eval)', 'model',
        choices=('max', 'avg', 'fractional'))
declare('model.fmp_ratio', None, 'fractional max-pooling: each side n pools to floor(n / '
        'ratio)', 'model', in_range(1, 2, closed_lo=False, closed_hi=True),
        values='in (1, 2] (2 with disjoint regions: 2x2 max-pooling, VALID)',
        default=math.sqrt(2), of='model.pool')
declare('model.fmp_overlap', False, 'fractional max-pooling: overlapping regions (each shares '
        'its last row with the next)', 'model', boolean(), of='model.pool')
declare('train.fmp_eval_draws', 1, 'fractional max-pooling at eval: average the softmax over '
        'this many fixed region draws', 'eval',
        (lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1,
         'an integer >= 1'), of='model.pool')


declare('model.whiten_init', 'none',
        'first layer of `airbench`: `none` (an ordinary conv, initialized and trained as the '
        'others) or `patch` (frozen whitening filters: eigenvectors of the covariance of 2x2 '
        'patches of normalized training images over sqrt(eigenvalue + 5e-4), each with both '
        'signs; its bias trains)', 'model', choices=('none', 'patch'))


# --- what the rest of the code derives ---

def in_section(section: str) -> List[Factor]:
  return [f for f in FACTORS.values() if f.section == section]


def _value(config, key: str):
  section, field = key.split('.')
  return config[section][field]


def is_on(key: str, value) -> bool:
  """Whether `value` of factor `key` puts it in the program (it is not the off value)."""
  off = FACTORS[key].off
  return off is None or value != off


def on(config, key: str) -> bool:
  return is_on(key, _value(config, key))


def check(config) -> None:
  """One-line UserError for the first factor value of `config` outside its range."""
  for f in FACTORS.values():
    f.check(_value(config, f.key))


def traced() -> List[Factor]:
  return [f for f in FACTORS.values() if f.traced]


def hparams(config) -> Dict[str, np.ndarray]:
  """Every continuous strength of `config` as a float32 scalar, by field name: the
  compiled step takes them as arrays."""
  for f in traced():
    f.check(_value(config, f.key))
  return {f.field: np.float32(_value(config, f.key)) for f in traced()}


def hparam_keys() -> Dict[str, str]:
  """hparams name -> its config key (e.g. 'dropout' -> 'regularize.dropout')."""
  return {f.field: f.key for f in traced()}


def program_free_keys() -> Tuple[str, ...]:
  return tuple(f.key for f in FACTORS.values() if f.program_free)


def switches() -> Tuple[str, ...]:
  """The traced keys whose on/off arms of one program must agree on."""
  return tuple(f.key for f in FACTORS.values() if f.switch)


def dependents() -> Dict[str, str]:
  """A key -> the factor without which it means nothing."""
  return {f.key: f.of for f in FACTORS.values() if f.of}


def markdown_table() -> str:
  """The README's factor table."""
  rows = ['| factor | config key | values | off (default) | acts at | one program for every value |',
          '| --- | --- | --- | --- | --- | --- |']
  for f in FACTORS.values():
    values = f.values or 'a name of the first column'
    off = f'`{f.initial}`' if f.off is not None else f'none (default `{f.initial}`)'
    shared = ('yes, among arms that have it on (an array)' if f.switch else
              'yes (an array)' if f.traced else 'yes (init only)' if f.site == 'init' else
              'yes (per-arm indices)' if f.site == 'data' else
              'yes' if f.site == 'stop' else 'no (shapes the program)')
    if f.of:
      shared += f'; free while `{f.of}` is off'
    rows.append(f'| {f.what} | `{f.key}` | {values} | {off} | {f.site} | {shared} |')
  return '\n'.join(rows)


README_BEGIN = '<!-- factor table: generated by `python -m launch.factors --write`; do not edit -->'
README_END = '<!-- end of factor table -->'


def readme_with_table(text: str) -> str:
  """`text` (the README) with its generated section replaced by the current table."""
  start, end = text.index(README_BEGIN) + len(README_BEGIN), text.index(README_END)
  return text[:start] + '\n' + markdown_table() + '\n' + text[end:]
