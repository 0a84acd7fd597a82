"""`python -m simclr_jax.reproduce` is an alias of `python -m simclr_jax.tools.reproduce`."""
import runpy

if __name__ == '__main__':
  runpy.run_module('simclr_jax.tools.reproduce', run_name='__main__',
                   alter_sys=True)
