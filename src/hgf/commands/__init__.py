"""One module per ``hgf`` subcommand; see :mod:`hgf.cli`."""
