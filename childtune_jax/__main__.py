from childtune_jax.cli_entry import main

main()
