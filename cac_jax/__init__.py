"""cac_jax: CAC (Directional Context-aware Consistency, CVPR 2021) in JAX/Flax.

Importing the package imports neither TensorFlow nor torch: only
`cac_jax.data` (and the entry points that build pipelines) needs TensorFlow.
"""

__version__ = '0.1.0'
