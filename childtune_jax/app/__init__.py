"""The ``childtune`` application: fine-tuning runs built on the library.

The library (``childtune_jax``: the transformations, masks, Fisher pass, models and
sharding helpers) never imports this package; the application is one user of it. Its
layers and where each job lives: ``docs/architecture.md``. In short: :mod:`.cli` is
wiring; :mod:`.config` holds every option and default once; :mod:`.modes` is the mode
registry; :mod:`.experiment` runs ``train`` and ``multitask`` through :mod:`.rundir` (the
output folder) and :mod:`.steps` (what every seed's run shares).
"""

import os as _os

# The application uses transformers for tokenizers only: its "PyTorch was not found"
# advice, printed at import, is noise here (set the variable to 0 to see it again).
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
