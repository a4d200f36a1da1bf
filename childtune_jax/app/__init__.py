"""The ``childtune`` application: GLUE fine-tuning runs built on the library.

The library (``childtune_jax``: the transformations, masks, Fisher pass, models and
sharding helpers) never imports this package; the application is one user of it.

- :mod:`~childtune_jax.app.cli`: the command line (``childtune train|demo|overlap``).
- :mod:`~childtune_jax.app.train`: one seed's run, as named steps.
- :mod:`~childtune_jax.app.loading`: models and tokenizers, local or from the hub.
- :mod:`~childtune_jax.app.checkpoints`: orbax checkpoints and saved child networks.
- :mod:`~childtune_jax.app.data`, :mod:`~childtune_jax.app.metrics`,
  :mod:`~childtune_jax.app.files`: GLUE data, metrics, and files written atomically.
"""

import os as _os

# The application uses transformers for tokenizers only: its "PyTorch was not found"
# advice, printed at import, is noise here (set the variable to 0 to see it again).
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
