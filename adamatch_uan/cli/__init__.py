"""What the commands share: how a person's mistakes are reported (``errors``), the help pages (``help``),
what ``fit`` does to its command line (``arguments``), what the console shows (``console``) and where a run
may write (``run_directory``). The commands themselves (``fit``, ``predict``, ``evaluate``, ``export``)
are the package's top-level composition roots."""
