"""`python -m simclr_jax.data.throughput` is an alias of `python -m simclr_jax.tools.throughput`."""
import runpy

if __name__ == '__main__':
  runpy.run_module('simclr_jax.tools.throughput', run_name='__main__', alter_sys=True)
