"""Memory of a compiled program next to the memory of the devices that run it.

The train step is compiled before the loop anyway; XLA's memory analysis of
it tells, before the first step, whether it can fit at all, instead of a
resource-exhausted traceback a minute later.
"""
import os
from typing import NamedTuple, Optional



def device_memory_bytes(compiled) -> Optional[int]:
  """Per-device bytes of the compiled program: its live set at peak, bounded.

  arguments + outputs + temporaries − aliased (donated) buffers, as XLA's
  memory analysis reports them; None where the backend gives none.
  """
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
             + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def new_buffer_bytes(compiled) -> Optional[int]:
  """Per-device bytes the program allocates beyond its arguments (outputs +
  temporaries − donated aliases); None where the backend gives none."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return int(stats.output_size_in_bytes + stats.temp_size_in_bytes
             - stats.alias_size_in_bytes)


def host_available_bytes() -> Optional[int]:
  """MemAvailable of /proc/meminfo (Linux); None elsewhere."""
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  return None


class Fit(NamedTuple):
  """What a step needs and what there is, in bytes, with their wording."""
  needed: int
  available: int
  needed_what: str
  available_what: str

  def fits(self) -> bool:
    return self.needed <= self.available

  def line(self) -> str:
    return (f'{self.needed_what} needs {size_text(self.needed)} but '
            f'{self.available_what} {size_text(self.available)}')


def size_text(num_bytes: int) -> str:
  """'2.00 MiB', '79.65 GiB': bytes in the largest binary unit below them."""
  for unit, scale in (('GiB', 2**30), ('MiB', 2**20), ('KiB', 2**10)):
    if num_bytes >= scale:
      return f'{num_bytes / scale:.2f} {unit}'
  return f'{num_bytes} B'


def step_fit(compiled, device, local_device_count: int) -> Optional[Fit]:
  """The compiled step's memory against `device`'s, or None if unknown.

  Accelerators report their memory (`bytes_limit` of memory_stats()): the
  step's whole live set (its arguments included) must fit in one device.
  CPU devices share the host's RAM and report nothing: the arguments (train
  state, batch) are allocated already, so what the step adds on every local
  device must fit in the host's available memory.
  """
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  limit = (stats or {}).get('bytes_limit')
  if limit:
    needed = device_memory_bytes(compiled)
    if needed is None:
      return None
    return Fit(needed, int(limit), 'the compiled train step (arguments, '
               'outputs and temporaries per device)',
               f'{device.device_kind} {device.id} holds')
  available = host_available_bytes()
  added = new_buffer_bytes(compiled)
  if available is None or added is None:
    return None
  return Fit(added * local_device_count, available,
             f'the compiled train step (outputs and temporaries on '
             f'{local_device_count} {device.platform} device(s))',
             f'host {os.uname().nodename} has available')
