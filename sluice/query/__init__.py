"""Reading the archive back: `sluice fetch` (store and spool, by the index, with --grep, --where,
--sort, --follow) and `sluice ls`."""
