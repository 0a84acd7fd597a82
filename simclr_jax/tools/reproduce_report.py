"""results.md and results.png of `tools/reproduce.py`, from the runs' results.

`summarise(results)` turns {row: {seed: metrics}} into, per finding, each
entry's mean ± sample standard deviation over the seeds measured, and
whether the paper's ordering holds on the means (None until every entry of
the finding is measured).
"""
import dataclasses
import io
import os
from typing import Dict, List, Mapping, Optional

import numpy as np

from simclr_jax.runtime import plots
from simclr_jax.tools import reproduce_grid as grid


@dataclasses.dataclass
class Measured:
  entry: grid.Entry
  values: List[float]  # One per seed measured, in %.

  @property
  def mean(self) -> float:
    return float(np.mean(self.values)) if self.values else float('nan')

  @property
  def std(self) -> float:
    # Sample standard deviation (n − 1): the seeds are a sample.
    return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else 0.0


@dataclasses.dataclass
class FindingSummary:
  finding: grid.Finding
  measured: List[Measured]
  holds: Optional[bool]  # None: not every entry measured yet.


def summarise(results: Mapping[str, Mapping[int, Mapping[str, float]]],
              findings=grid.FINDINGS) -> List[FindingSummary]:
  summaries = []
  for finding in findings:
    measured = []
    for entry in finding.entries:
      runs = results.get(entry.row, {})
      values = [100.0 * float(runs[s][entry.metric]) for s in sorted(runs)
                if entry.metric in runs[s]]
      measured.append(Measured(entry, values))
    if not any(m.values for m in measured):
      continue
    holds = None
    if all(m.values for m in measured):
      holds = finding.holds({m.entry.label: m.mean for m in measured})
    summaries.append(FindingSummary(finding, measured, holds))
  return summaries


def markdown(summaries: List[FindingSummary], *, header: str) -> str:
  lines = ['# SimCLR findings in miniature', '', header, '']
  for s in summaries:
    lines += [f'## {s.finding.name}', '',
              f'Paper: {s.finding.claim} Reference: {s.finding.reference}.',
              '', '| | row | top-1 % (mean ± std) | seeds | paper |',
              '|---|---|---|---|---|']
    for m in s.measured:
      value = (f'{m.mean:.1f} ± {m.std:.1f}' if m.values else 'not run')
      lines.append(f'| {m.entry.label} | {m.entry.row} | {value} | '
                   f'{len(m.values)} | {m.entry.paper} |')
    verdict = {True: 'holds', False: 'does NOT hold',
               None: 'not measured yet (rows missing)'}[s.holds]
    line = f'Ordering ({s.finding.ordering[0]}): **{verdict}**'
    if s.holds is False:
      means = {m.entry.label: m.mean for m in s.measured}
      line += ': ' + '; '.join(f'{a} {means[a]:.1f} ≤ {b} {means[b]:.1f}'
                               for a, b in s.finding.broken_pairs(means))
    lines += ['', line + '.', '']
  return '\n'.join(lines)


def figure(summaries: List[FindingSummary]):
  """One panel per finding: bars of the means, error bars of the stds."""
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  n = max(len(summaries), 1)
  cols = min(n, 3)
  rows = (n + cols - 1) // cols
  fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows),
                           squeeze=False)
  for ax in axes.flat[n:]:
    ax.axis('off')
  for ax, s in zip(axes.flat, summaries):
    labels = [m.entry.label for m in s.measured]
    favoured = s.finding.favoured()
    ax.bar(range(len(labels)), [m.mean if m.values else 0 for m in s.measured],
           yerr=[m.std for m in s.measured], capsize=4,
           color=['tab:green' if label in favoured else 'tab:gray'
                  for label in labels])
    for i, m in enumerate(s.measured):
      if not m.values:
        ax.text(i, 2, 'not run', ha='center', rotation=90, fontsize=8)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha='right',
                  fontsize=8)
    verdict = {True: 'holds', False: 'does not hold', None: 'incomplete'}[
        s.holds]
    ax.set_title(f'{s.finding.name.split(":")[0]}: {verdict}', fontsize=10)
    ax.set_ylabel('top-1 (%)')
    ax.set_ylim(0, 100)
  fig.tight_layout()
  return fig


def write(workdir: str, results, *, header: str) -> Dict[str, str]:
  """Writes workdir/results.md and workdir/results.png (each atomically)."""
  summaries = summarise(results)
  md_path = os.path.join(workdir, 'results.md')
  temporary = f'{md_path}.tmp-{os.getpid()}'
  with io.open(temporary, 'w', encoding='utf-8') as f:
    f.write(markdown(summaries, header=header))
  os.replace(temporary, md_path)
  png_path = plots.write_png(figure(summaries),
                             os.path.join(workdir, 'results.png'))
  return {'md': md_path, 'png': png_path}
