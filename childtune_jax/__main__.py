
from childtune_jax.app.cli import console_main

console_main()
