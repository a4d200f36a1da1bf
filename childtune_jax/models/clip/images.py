"""Images as CLIP takes them."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def normalise_images(images: jax.Array, size: int,
                     mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073),
                     std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
                     ) -> jax.Array:
  """Grey images ``(n, h, w)`` in [0, 1] as CLIP's input: resized (bicubic) to ``size``,
  three channels, normalised by CLIP's mean and std; ``(n, 3, size, size)`` float32.

  Traceable (``jit``): the images can be prepared inside the step that uses them.
  """
  x = jnp.asarray(images, jnp.float32)[..., None]
  x = jax.image.resize(x, (x.shape[0], size, size, 1), "bicubic").clip(0.0, 1.0)
  x = (jnp.repeat(x, 3, -1) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return jnp.transpose(x, (0, 3, 1, 2))
