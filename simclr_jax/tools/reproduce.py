r"""The paper's findings in miniature: `python -m simclr_jax.tools.reproduce`
(alias: `python -m simclr_jax.reproduce`).

  python -m simclr_jax.tools.reproduce --workdir=DIR [--seeds=0,1,2] \
      [--rows=simclr,no_crop] [--scale=1.0] [--config=configs/reproduce.py] \
      [--config.KEY=VALUE ...]

Runs every row of the grid (reproduce_grid.py: the demo recipe at quarter
width, configs/reproduce.py, and named variants of it) for every seed on
the offline digits, in-process through `train.train_and_evaluate`, one
workdir per run (DIR/work/ROW/seedS). A finished run leaves
DIR/runs/ROW/seedS.json (its final metrics, written atomically);
DIR/results.md and DIR/results.png are rewritten after every run. The same
command resumes a half-done grid: finished runs are skipped, an interrupted
one resumes from its checkpoint. Compiled programs are kept in
DIR/compilation_cache, so the seeds of a row compile once. `--scale`
multiplies every run's train steps (0.02: the CI smoke grid);
`--config.KEY=VALUE` overrides the base config for every row.

Bad flags are one line, `simclr_jax: error: ...`, exit 2, before anything
trains. DIR must be new, empty, or a grid this tool wrote (its marker file,
owned_output.MARKER_FILE); nothing else is ever written into.
"""
import json
import os
import re
import time
from typing import Callable, Dict, Optional, Sequence

from absl import app
from absl import flags

from simclr_jax import config as config_lib
from simclr_jax import main as main_lib  # --config, --workdir; flag errors.
from simclr_jax import preflight
from simclr_jax.evaluators import common as evaluators_common
from simclr_jax.runtime import owned_output
from simclr_jax.runtime import workdir_lock
from simclr_jax.tools import reproduce_grid as grid

FLAGS = flags.FLAGS
flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds of every row.')
flags.DEFINE_list('rows', [], 'Rows to run (default all): '
                  + ', '.join(grid.ROW_NAMES) + '.')
flags.DEFINE_float('scale', 1.0, 'Factor on every run\'s train steps.')

WRITER = 'simclr_jax.tools.reproduce'
GRID_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'configs', 'reproduce.py')
# What the tool writes at the top of its workdir (and atomic-write leftovers).
OWN_ENTRIES = re.compile(
    r'(runs|work|compilation_cache|results\.(md|png)(\.tmp-\d+)?|'
    + re.escape(owned_output.MARKER_FILE) + '|'
    + re.escape(workdir_lock.LOCK_NAME) + r')$')


# ----------------------------------------------------------------------------
# Checks before anything trains.
# ----------------------------------------------------------------------------
def parse_seeds(values: Sequence[str]) -> tuple:
  try:
    seeds = tuple(int(v) for v in values)
  except ValueError:
    seeds = ()
  if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
    raise preflight.BadInput(
        f'--seeds={",".join(values)!r} is invalid: expected distinct '
        'integers >= 0, e.g. --seeds=0,1,2.')
  return seeds


def parse_rows(values: Sequence[str]) -> tuple:
  unknown = [v for v in values if v not in grid.BY_NAME]
  if unknown:
    raise preflight.BadInput(
        f'--rows: unknown row {unknown[0]!r}; known: '
        f'{", ".join(grid.ROW_NAMES)}.')
  return grid.selected(values)


def check_grid_workdir(workdir: str) -> str:
  """DIR made absolute; refused unless absent, empty or this tool's grid."""
  if '://' in workdir:
    raise preflight.BadInput(f'--workdir={workdir!r}: expected a local '
                             'directory.')
  path = os.path.abspath(workdir)
  if os.path.lexists(path) and not os.path.isdir(path):
    raise preflight.BadInput(f'--workdir={workdir!r} exists and is not a '
                             'directory.')
  if not os.path.isdir(path) or not os.listdir(path):
    return path
  try:
    with open(os.path.join(path, owned_output.MARKER_FILE)) as f:
      owner = json.load(f)['written_by']
  except (OSError, ValueError, KeyError, TypeError):
    owner = None
  if owner != WRITER:
    raise preflight.BadInput(
        f'--workdir={workdir!r} is not empty and was not written by {WRITER} '
        f'(no {owned_output.MARKER_FILE} of it); choose a new directory.')
  extra = sorted(n for n in os.listdir(path) if not OWN_ENTRIES.match(n))
  if extra:
    raise preflight.BadInput(
        f'--workdir={workdir!r} holds {extra[0]!r}, which {WRITER} did not '
        'write; not writing into it.')
  return path


def check_scale(scale: float) -> float:
  if not scale > 0:
    raise preflight.BadInput(f'--scale={scale} is invalid: must be > 0 (a '
                             'factor on every run\'s train steps).')
  return scale


def check_row_configs(base, rows, seeds, scale, num_train_examples) -> None:
  """Every run's config is valid (init_checkpoint is made by the grid)."""
  for row in rows:
    config = grid.row_config(base, row, seed=seeds[0], scale=scale,
                             num_train_examples=num_train_examples,
                             init_checkpoint='made-by-the-grid' if row.needs
                             else '')
    try:
      config_lib.validate(config)
      evaluators_common.evaluator_entries(config)
      preflight.check_devices(config)
      preflight.check_split_sizes(config, preflight.split_sizes(config))
    except (ValueError, preflight.BadInput) as e:
      raise preflight.BadInput(f'row {row.name}: {preflight.one_line(e)}'
                               ) from None


# ----------------------------------------------------------------------------
# Runs and their results.
# ----------------------------------------------------------------------------
def result_path(workdir: str, row: str, seed: int) -> str:
  return os.path.join(workdir, 'runs', row, f'seed{seed}.json')


def run_workdir(workdir: str, row: str, seed: int) -> str:
  return os.path.join(workdir, 'work', row, f'seed{seed}')


def write_json(path: str, record: dict) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  temporary = f'{path}.tmp-{os.getpid()}'
  with open(temporary, 'w') as f:
    json.dump(record, f, indent=1, sort_keys=True)
  os.replace(temporary, path)


def read_results(workdir: str) -> Dict[str, Dict[int, dict]]:
  """{row: {seed: metrics}} of the finished runs under workdir/runs."""
  results = {}
  for row in grid.ROW_NAMES:
    directory = os.path.join(workdir, 'runs', row)
    for name in sorted(os.listdir(directory)) if os.path.isdir(
        directory) else ():
      match = re.fullmatch(r'seed(\d+)\.json', name)
      if match:
        with open(os.path.join(directory, name)) as f:
          results.setdefault(row, {})[int(match.group(1))] = json.load(
              f)['metrics']
  return results


def fingerprint(config) -> str:
  """The config's training, without its evaluators (which only read it)."""
  values = config.to_dict()
  values.pop('evals', None)
  return json.dumps(values, sort_keys=True, default=str)


def _needed_metrics(row_name: str) -> set:
  return {e.metric for f in grid.FINDINGS for e in f.entries
          if e.row == row_name}


def use_compilation_cache(workdir: str) -> None:
  """XLA programs persist in DIR/compilation_cache: the seeds of a row
  (and a resumed grid) compile identical programs, so only the first pays."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_compilation_cache_dir',
                    os.path.join(workdir, 'compilation_cache'))


def claim(workdir: str) -> None:
  """Makes workdir and marks it as this tool's before anything else."""
  os.makedirs(workdir, exist_ok=True)
  owned_output.write_marker(workdir, WRITER, {'note': 'reproduce grid'})


def run_grid(base, rows, seeds, *, workdir: str, scale: float,
             num_train_examples: int, printer: Callable[[str], None] = print,
             train_fn: Optional[Callable] = None) -> Dict[str, Dict[int, dict]]:
  """Runs what is not finished yet; returns {row: {seed: metrics}}.

  `train_fn(config, run_workdir) -> train.Result` defaults to main's path
  (preflight checks, then train_and_evaluate); tests pass a tiny model.
  """
  if train_fn is None:
    train_fn = _train
  claim(workdir)
  header = (f'Grid of `python -m simclr_jax.tools.reproduce` on '
            f'{base.dataset}: seeds {", ".join(map(str, seeds))}, train '
            f'steps × {scale:g} of the base config (ResNet-'
            f'{base.resnet_depth} ×{base.width_multiplier:g}, '
            f'{base.image_size} px, batch {base.train_batch_size}); top-1 '
            '% on the test split, mean ± sample std over the seeds.')
  from simclr_jax.tools import reproduce_report  # pylint: disable=g-import-not-at-top
  for seed in seeds:
    for row in rows:
      path = result_path(workdir, row.name, seed)
      if os.path.exists(path):
        printer(f'simclr_jax: reproduce: {row.name} seed {seed}: done '
                'earlier, skipped')
        continue
      init = run_workdir(workdir, row.needs, seed) if row.needs else ''
      config = grid.row_config(base, row, seed=seed, scale=scale,
                               num_train_examples=num_train_examples,
                               init_checkpoint=init)
      record = dict(row=row.name, seed=seed, fingerprint=fingerprint(config),
                    train_steps=config.train_steps,
                    train_batch_size=config.train_batch_size,
                    overrides={k: str(v) for k, v in row.overrides.items()})
      same = _same_run(workdir, rows, seed, record['fingerprint'],
                       _needed_metrics(row.name))
      if same:
        record.update(metrics=same[1], same_run_as=same[0], wall_s=0.0)
        printer(f'simclr_jax: reproduce: {row.name} seed {seed}: the same '
                f'training as {same[0]}, its result reused')
      else:
        start = time.perf_counter()
        result = train_fn(config, run_workdir(workdir, row.name, seed))
        if result.preempted:
          printer(f'simclr_jax: reproduce: {row.name} seed {seed}: preempted;'
                  ' run the same command again to resume')
          return read_results(workdir)
        record.update(metrics={k: float(v) for k, v in result.metrics.items()},
                      wall_s=time.perf_counter() - start)
        shown = {m: record['metrics'][m] for m in sorted(
            _needed_metrics(row.name)) if m in record['metrics']}
        printer(f'simclr_jax: reproduce: {row.name} seed {seed}: done in '
                f'{record["wall_s"]:.0f} s: ' + ', '.join(
                    f'{k} {100 * v:.1f} %' for k, v in shown.items()))
      write_json(path, record)
      reproduce_report.write(workdir, read_results(workdir), header=header)
  results = read_results(workdir)
  written = reproduce_report.write(workdir, results, header=header)
  owned_output.write_marker(workdir, WRITER, {'note': 'reproduce grid'})
  printer(f'simclr_jax: reproduce: wrote {written["md"]} and '
          f'{written["png"]}')
  return results


def _same_run(workdir, rows, seed, config_print, needed):
  """(row, metrics) of a finished run of this seed that trained the same
  config and reported every metric needed; None if there is none."""
  for other in rows:
    path = result_path(workdir, other.name, seed)
    if not os.path.exists(path):
      continue
    with open(path) as f:
      record = json.load(f)
    if (record.get('fingerprint') == config_print and not record.get('same_run_as')
        and needed <= set(record['metrics'])):
      return other.name, record['metrics']
  return None


def _train(config, workdir):
  from simclr_jax import train  # pylint: disable=g-import-not-at-top
  preflight.check_config(config)
  data = preflight.check_dataset(config)
  return train.train_and_evaluate(config, workdir, data=data)


# ----------------------------------------------------------------------------
# Entry point.
# ----------------------------------------------------------------------------
def parse_flags(argv):
  """main's flag parsing, with --config defaulting to configs/reproduce.py
  (the demo recipe at quarter width)."""
  if not any(a == '--config' or a.startswith('--config=') for a in argv[1:]):
    argv = [argv[0], f'--config={GRID_CONFIG}', *argv[1:]]
  return main_lib.parse_flags(argv)


def main(argv):
  if len(argv) > 1:
    main_lib._fail(f'unexpected arguments {argv[1:]}.')  # pylint: disable=protected-access
  base = FLAGS.config
  try:
    seeds = parse_seeds(FLAGS.seeds)
    rows = parse_rows(FLAGS.rows)
    check_scale(FLAGS.scale)
    workdir = check_grid_workdir(FLAGS.workdir)
    preflight.check_config(base)
    preflight.check_devices(base)
    data = preflight.check_dataset(base)
    check_row_configs(base, rows, seeds, FLAGS.scale, data.num_train_examples)
  except preflight.BadInput as e:
    main_lib._fail(str(e))  # pylint: disable=protected-access
  claim(workdir)  # Before the lock file: a killed run leaves a grid of ours.
  use_compilation_cache(workdir)
  lock = workdir_lock.WorkdirLock(workdir)
  try:
    lock.acquire()
  except workdir_lock.WorkdirLockedError as e:
    main_lib._fail(preflight.one_line(e))  # pylint: disable=protected-access
  try:
    run_grid(base, rows, seeds, workdir=workdir, scale=FLAGS.scale,
             num_train_examples=data.num_train_examples,
             printer=lambda line: print(line, flush=True))
  finally:
    lock.release()


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
