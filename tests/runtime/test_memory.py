"""memory.py: a compiled program's bytes, and what fits where."""
import jax
import jax.numpy as jnp
import pytest

from simclr_jax.runtime import memory


@pytest.mark.parametrize('donate', [False, True])
def test_device_memory_bytes_of_a_known_program(donate):
  """x * 2 on float32 [256, 1024]: a 1 MiB argument and a 1 MiB output, no
  temporaries; donating x lets the output reuse it (1 MiB aliased)."""
  x = jax.ShapeDtypeStruct((256, 1024), jnp.float32)
  compiled = jax.jit(lambda x: x * 2, donate_argnums=(0,) if donate else ()
                     ).lower(x).compile()
  mib = 2**20
  assert memory.device_memory_bytes(compiled) == (1 if donate else 2) * mib
  assert memory.new_buffer_bytes(compiled) == (0 if donate else 1) * mib


def test_fit_wording_and_sizes():
  fit = memory.Fit(3 * 2**30, 2**30 + 2**29, 'the step', 'cuda:0 has')
  assert not fit.fits()
  assert fit.line() == 'the step needs 3.00 GiB but cuda:0 has 1.50 GiB'
  assert memory.size_text(1536) == '1.50 KiB'
  assert memory.size_text(12) == '12 B'


def test_host_available_bytes_is_meminfo():
  available = memory.host_available_bytes()
  with open('/proc/meminfo') as f:
    line = next(l for l in f if l.startswith('MemAvailable:'))
  # Read a moment apart: equal to within 1 GiB of churn.
  assert abs(available - int(line.split()[1]) * 1024) < 2**30
