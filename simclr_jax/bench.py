"""`python -m simclr_jax.bench` is an alias of `python -m simclr_jax.tools.bench`."""
import runpy

if __name__ == '__main__':
  runpy.run_module('simclr_jax.tools.bench', run_name='__main__', alter_sys=True)
