"""`python -m simclr_jax.convert_tf2` is an alias of `python -m simclr_jax.tools.convert_tf2`."""
import runpy

if __name__ == '__main__':
  runpy.run_module('simclr_jax.tools.convert_tf2', run_name='__main__', alter_sys=True)
