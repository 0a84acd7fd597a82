"""The grid of `tools/reproduce.py`: named config variants (rows) of the demo
recipe and the paper's findings they test.

A row is the base config (configs/reproduce.py) plus overrides; rows that
fine-tune start from the 'simclr' row of the same seed (`needs`). A finding compares (row, metric)
entries; its `holds` states the paper's ordering over their means. Every
claim is quoted from SimCLR v1 (Chen et al., ICML 2020, arXiv 2002.05709v3)
with the paper's own figure or table next to it.
"""
import dataclasses
from typing import Dict, Mapping, Sequence, Tuple

import ml_collections

from simclr_jax import config as config_lib

# The linear probe on h, the probe on z = g(h), and kNN on h (evaluators/).
PROBE, PROBE_Z, KNN = ('probe/pretrained_top1', 'probe_z/pretrained_top1',
                       'knn/top1')
# The supervised head's top-1 on the test split (finetune / supervised).
HEAD = 'eval/top1'


@dataclasses.dataclass(frozen=True)
class Row:
  """A named config variant: overrides on the base config.

  `steps_factor` multiplies the train steps (a batch-size row keeps the
  epochs of the demo); `needs` names the row whose checkpoint (same seed)
  is `init_checkpoint`; `evals` replaces config.evals (None keeps the demo's
  probe without baselines).
  """
  name: str
  overrides: Mapping[str, object] = dataclasses.field(default_factory=dict)
  steps_factor: float = 1.0
  needs: str = ''
  evals: Mapping[str, Mapping[str, object]] = None
  batch_size: int = 0  # 0: the base config's.
  # The % of the train split the row trains on (0: all); its batch is at
  # most that many examples, so no batch repeats one.
  train_percent: float = 0.0


def _few_labels(mode: str, fraction: str) -> Row:
  # Paper B.5: fine-tuning with Nesterov momentum, no warmup, no weight
  # decay, crop + flip only; the from-scratch network gets the same recipe,
  # labels and steps, so the pretraining is the only difference.
  return Row(
      name=f'{mode}_{fraction}pct',
      overrides=dict(train_mode=mode, train_split=f'train[:{fraction}%]',
                     optimizer='momentum', learning_rate=0.1,
                     learning_rate_scaling='linear', weight_decay=0.0,
                     warmup_epochs=0.0, lineareval_while_pretraining=False,
                     zero_init_logits_layer=mode == 'finetune',
                     ft_proj_selector=0),
      needs='simclr' if mode == 'finetune' else '', evals={},
      train_percent=fraction)


ROWS: Tuple[Row, ...] = (
    # The demo recipe, with kNN beside the probe, both with their baselines,
    # and the probe on z = g(h).
    Row('simclr', evals=dict(
        probe=dict(baselines=('random_init', 'raw_pixels')),
        probe_z=dict(type='probe', output='projection'),
        knn=dict(every_steps=0,
                 baselines=('random_init', 'raw_pixels')))),
    Row('head_linear', dict(proj_head_mode='linear')),
    Row('head_none', dict(proj_head_mode='none')),
    Row('no_crop', dict(random_crop=False)),
    _few_labels('finetune', 1),
    _few_labels('supervised', 1),
    _few_labels('finetune', 10),
    _few_labels('supervised', 10),
    Row('tau_0.1', dict(temperature=0.1)),
    Row('tau_0.5', dict(temperature=0.5)),
    Row('tau_1.0', dict(temperature=1.0)),
    # Figure 9: the same epochs at batch 32, 128 and 512.
    Row('batch_32', batch_size=32),
    Row('batch_128', batch_size=128),
    Row('batch_512', batch_size=512),
)
ROW_NAMES = tuple(r.name for r in ROWS)
BY_NAME: Dict[str, Row] = {r.name: r for r in ROWS}


@dataclasses.dataclass(frozen=True)
class Entry:
  """One table line: a row's metric, its label, the paper's figure."""
  label: str
  row: str
  metric: str
  paper: str


@dataclasses.dataclass(frozen=True)
class Finding:
  name: str
  claim: str  # As the paper states it.
  reference: str
  entries: Tuple[Entry, ...]
  # (description, ((better, worse) entry labels, ...)) of the paper's
  # ordering: it holds when every `better` mean exceeds its `worse` mean.
  ordering: Tuple[str, Tuple[Tuple[str, str], ...]]

  def holds(self, means: Mapping[str, float]) -> bool:
    return not self.broken_pairs(means)

  def broken_pairs(self, means: Mapping[str, float]):
    """The (better, worse) pairs of the ordering that the means break."""
    return [(a, b) for a, b in self.ordering[1] if not means[a] > means[b]]

  def favoured(self) -> set:
    """Labels the paper ranks above another and below none."""
    better = {a for a, _ in self.ordering[1]}
    return better - {b for _, b in self.ordering[1]}


def _greater(*pairs):
  return pairs


FINDINGS: Tuple[Finding, ...] = (
    Finding(
        'Finding 1: frozen SimCLR features beat raw pixels and a random '
        'network', 'Linear evaluation: a linear classifier on the frozen '
        'pretrained base network (Section 2.3); SimCLR: 69.3 % top-1.',
        'Section 2.3 protocol, Table 6 (ResNet-50, 1000 epochs: 69.3 %)',
        (Entry('probe: SimCLR', 'simclr', PROBE, '69.3 (Table 6)'),
         Entry('probe: random init', 'simclr', 'probe/random_init_top1', '-'),
         Entry('probe: raw pixels', 'simclr', 'probe/raw_pixels_top1', '-'),
         Entry('kNN: SimCLR', 'simclr', KNN, '-'),
         Entry('kNN: random init', 'simclr', 'knn/random_init_top1', '-'),
         Entry('kNN: raw pixels', 'simclr', 'knn/raw_pixels_top1', '-')),
        ('SimCLR > random init and > raw pixels, under probe and kNN',
         _greater(('probe: SimCLR', 'probe: random init'),
                  ('probe: SimCLR', 'probe: raw pixels'),
                  ('kNN: SimCLR', 'kNN: random init'),
                  ('kNN: SimCLR', 'kNN: raw pixels')))),
    Finding(
        'Finding 2: few labels', 'Fine-tuning the pretrained network on 1 % '
        'or 10 % of the labels is much better than training it from scratch '
        'on them (Section 6, semi-supervised learning).',
        'Table 7 (ResNet-50 top-1: supervised 25.4 / 56.4, SimCLR 48.3 / '
        '65.6 at 1 % / 10 %)',
        (Entry('1 %: fine-tuned SimCLR', 'finetune_1pct', HEAD, '48.3'),
         Entry('1 %: from scratch', 'supervised_1pct', HEAD, '25.4'),
         Entry('10 %: fine-tuned SimCLR', 'finetune_10pct', HEAD, '65.6'),
         Entry('10 %: from scratch', 'supervised_10pct', HEAD, '56.4')),
        ('fine-tuned > from scratch at 1 % and at 10 %',
         _greater(('1 %: fine-tuned SimCLR', '1 %: from scratch'),
                  ('10 %: fine-tuned SimCLR', '10 %: from scratch')))),
    Finding(
        'Finding 3: the projection head', '"a nonlinear projection is better '
        'than a linear projection (+3%), and much better than no projection '
        '(>10%)"; "the layer before the projection head, h, is still much '
        'better (>10%) than the layer after, z = g(h)" (Section 4.2).',
        'Figure 8 (nonlinear +3 % over linear, >10 % over none; h >10 % over '
        'z)',
        (Entry('probe on h: nonlinear head', 'simclr', PROBE, 'best'),
         Entry('probe on h: linear head', 'head_linear', PROBE, '-3 %'),
         Entry('probe on h: no head', 'head_none', PROBE, '< -10 %'),
         Entry('probe on z = g(h): nonlinear head', 'simclr', PROBE_Z,
               '< -10 % vs h')),
        ('nonlinear > linear, nonlinear > none, h > z',
         _greater(('probe on h: nonlinear head', 'probe on h: linear head'),
                  ('probe on h: nonlinear head', 'probe on h: no head'),
                  ('probe on h: nonlinear head',
                   'probe on z = g(h): nonlinear head')))),
    Finding(
        'Finding 4: random cropping', '"no single transformation suffices to '
        'learn good representations"; "One composition of augmentations '
        'stands out: random cropping and random color distortion" (Section '
        '3.1).', 'Figure 5 (linear evaluation per augmentation pair; crop + '
        'colour the best pair)',
        (Entry('crop + colour (default)', 'simclr', PROBE, 'best pair'),
         Entry('colour without crop', 'no_crop', PROBE, 'lower')),
        ('with crop > without crop',
         _greater(('crop + colour (default)', 'colour without crop')))),
    Finding(
        'Finding 5a: temperature', 'With l2 normalisation an appropriate '
        'temperature helps; at batch 4096 and 100 epochs τ = 0.1 is best '
        '(Section 5.1); converged CIFAR-10 runs favour τ = 0.5 (Figure B.8).',
        'Table 5 (τ 0.1 / 0.5 / 1: 64.4 / 60.7 / 58.0)',
        (Entry('τ = 0.1', 'tau_0.1', PROBE, '64.4'),
         Entry('τ = 0.5', 'tau_0.5', PROBE, '60.7'),
         Entry('τ = 1.0', 'tau_1.0', PROBE, '58.0')),
        ('τ 0.1 > 0.5 > 1.0', _greater(('τ = 0.1', 'τ = 0.5'),
                                       ('τ = 0.5', 'τ = 1.0')))),
    Finding(
        'Finding 5b: batch size at few epochs', '"when the number of training '
        'epochs is small (e.g. 100 epochs), larger batch sizes have a '
        'significant advantage over the smaller ones" (Section 5.2).',
        'Figure 9 (linear evaluation per batch size 256..8192 at 100..800 '
        'epochs)',
        (Entry('batch 32', 'batch_32', PROBE, '-'),
         Entry('batch 128', 'batch_128', PROBE, '-'),
         Entry('batch 512', 'batch_512', PROBE, '-')),
        ('512 > 128 > 32 (same epochs)',
         _greater(('batch 512', 'batch 128'), ('batch 128', 'batch 32')))),
)


def row_config(base: ml_collections.ConfigDict, row: Row, *, seed: int,
               scale: float, num_train_examples: int,
               init_checkpoint: str = '') -> ml_collections.ConfigDict:
  """The base config `base` turned into `row` for `seed`, steps × scale.

  The steps are the base's (from its epochs over `num_train_examples` when
  it sets no train_steps) times the row's factor and `scale`.
  """
  config = base.copy_and_resolve_references()
  steps = config_lib.config_schedule_steps(
      base, num_train_examples)['total_steps']
  batch = row.batch_size or base.train_batch_size
  if row.train_percent:
    batch = min(batch, int(num_train_examples * row.train_percent / 100))
  factor = row.steps_factor * base.train_batch_size / batch
  with config.unlocked():
    config.update(dict(row.overrides))
    config.seed = seed
    config.train_batch_size = batch
    config.train_epochs = 0
    config.train_steps = max(1, int(round(steps * factor * scale)))
    # Warmup is in epochs: shrink it with the run so it stays a fraction.
    config.warmup_epochs = float(config.warmup_epochs) * scale
    config.checkpoint_every_steps = max(1, min(config.checkpoint_every_steps,
                                               config.train_steps))
    config.demo_plot = False
    if init_checkpoint:
      config.init_checkpoint = init_checkpoint
    # A row's evaluator keeps the demo's fields of its type (the probe's
    # train examples, the kNN bank), without baselines unless it asks.
    def demo_fields(kind):
      return {**base.evals.get(kind, {}), 'baselines': ()}
    evals = {'probe': demo_fields('probe')} if row.evals is None else {}
    for name, fields in (row.evals or {}).items():
      evals[name] = {**demo_fields(fields.get('type', name)), **fields}
    config.evals = ml_collections.ConfigDict(evals)
  return config


def selected(names: Sequence[str]) -> Tuple[Row, ...]:
  """The rows named (all when empty), with the rows they need, grid order."""
  wanted = set(names or ROW_NAMES)
  for name in list(wanted):
    if BY_NAME[name].needs:
      wanted.add(BY_NAME[name].needs)
  return tuple(r for r in ROWS if r.name in wanted)
