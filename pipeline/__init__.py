"""The staged pipeline a user runs: the command line (``cli``), pipeline configs (``config``), one
stage (``stage``: train, bake, evaluate, write), running the stages in order here or on Ray
(``runner``), resume points (``resume``), submission to Slurm or a Ray head (``submit``), W&B and
progress (``tracking``), reports and plots (``report``, ``plots``) and ``eval``
(``evaluate``). Imports ``jobs`` and the library; nothing imports it."""
