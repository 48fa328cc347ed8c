"""One module per ``moeshard`` subcommand (see moeshard.operator.cli)."""
