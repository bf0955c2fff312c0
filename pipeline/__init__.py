"""Orchestration around the ``elastictrain`` library: the command line, and (later) the staged
pipeline. May import anything; the library never imports this package."""
