"""Command line, launchers, run configs and demos of the UniTok project."""
